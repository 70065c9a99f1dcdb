#!/usr/bin/env bash
# The GPU check of the TensorRT plugins, for a bare NVIDIA machine that has torch and Triton but no TensorRT
# and no network; at most 8 minutes.
#
#   scripts/gpu_check.sh            1. pytest -m gpu (TensorRT tests skip with their reason)
#                                   2. every plugin kernel, as TensorRT's AOT launch runs it, timed on CUDA for
#                                      fp32/fp16/bf16, widths 64..16384, rows 1..65536, against torch, checked
#                                      against the fp32 reference -> benchmarks/results/gpu_kernels.md (+ .json)
#   GPU_CHECK_SMALL=1 scripts/gpu_check.sh
#                                   the small setting CI runs (tests/build/test_gpu_check.py): without a GPU the
#                                   kernels run under the Triton interpreter; the report goes to a temporary
#                                   directory unless GPU_CHECK_OUT says where
#
# Environment: PYTHON (default .venv/bin/python, else python3); GPU_CHECK_OUT (the report's directory);
# GPU_CHECK_WHEELS (a directory of wheels for whatever normdeploy needs and the machine lacks, e.g.
# onnx-graphsurgeon: installed with --no-index into a temporary directory, nothing else is touched);
# OUT (set by a device runner: the report and the logs are copied there too). Exit status: non-zero when a
# GPU test failed or a kernel disagreed with the reference.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$SECONDS
LIMIT=${GPU_CHECK_LIMIT_S:-470}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
SMALL=${GPU_CHECK_SMALL:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [ "$SMALL" = 1 ]; then
  DEST=${GPU_CHECK_OUT:-$WORK}
  BENCH_ARGS=(--small)
else
  DEST=${GPU_CHECK_OUT:-$ROOT/benchmarks/results}
  BENCH_ARGS=()
fi
mkdir -p "$DEST"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

echo "== gpu_check: $($PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())')"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# normdeploy's own dependencies: from GPU_CHECK_WHEELS when the machine lacks them
if ! $PY -c "import normdeploy.pipeline" 2>"$WORK/import.err"; then
  if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    echo "== installing $(ls "$GPU_CHECK_WHEELS" | wc -l) wheels from $GPU_CHECK_WHEELS into $WORK/site"
    $PY -m pip install -q --no-index --no-deps --target "$WORK/site" "$GPU_CHECK_WHEELS"/*.whl || true
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  fi
fi

PYTEST_RC=0
if $PY -c "import normdeploy.pipeline" 2>"$WORK/import.err"; then
  echo "== pytest -m gpu"
  timeout $((LIMIT / 3)) $PY -m pytest -q -m gpu -rs -p no:cacheprovider tests/build 2>&1 | tee "$WORK/pytest.log"
  PYTEST_RC=${PIPESTATUS[0]}
  [ "$PYTEST_RC" = 5 ] && PYTEST_RC=0  # nothing selected is not a failure
else
  echo "== pytest -m gpu not run: normdeploy does not import here ($(tail -1 "$WORK/import.err")); pass GPU_CHECK_WHEELS" \
    | tee "$WORK/pytest.log"
  PYTEST_RC=0
fi

REMAINING=$((LIMIT - (SECONDS - START) - 20))
[ "$REMAINING" -lt 30 ] && REMAINING=30
echo "== kernels (budget ${REMAINING} s)"
timeout $((REMAINING + 60)) $PY normdeploy/lower/plugins/gpu_bench.py --out "$DEST/gpu_kernels.md" \
  --budget-s "$REMAINING" --notes "$WORK/pytest.log" "${BENCH_ARGS[@]}" 2>&1 | tee "$WORK/bench.log"
BENCH_RC=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ -w "$OUT" ] && [ "$OUT" != "$DEST" ]; then
  cp "$DEST"/gpu_kernels.md "$DEST"/gpu_kernels.json "$WORK"/pytest.log "$WORK"/bench.log "$OUT"/ 2>/dev/null || true
fi
echo "== gpu_check done in $((SECONDS - START)) s: pytest rc $PYTEST_RC, kernels rc $BENCH_RC, report $DEST/gpu_kernels.md"
[ "$PYTEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
