#!/usr/bin/env bash
# Create .serve-venv: the Python environment a real Triton Inference Server runs from
# (`normdeploy serve`, tests/serve/). It holds nvidia-pytriton 0.7.0 (tritonserver 2.51 with
# its Python backend), numpy<2 (the 2.51 backend stub returns empty tensors under numpy 2)
# and the onnxruntime version of .venv, so the server computes what normdeploy verified.
# normdeploy's own .venv (numpy 2) only talks to the server as a client.
#   scripts/setup_serve.sh          idempotent; prints one line
# PYTHON picks the interpreter (default python3; it needs a shared libpython, 3.8 to 3.13).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTRITON=0.7.0
PY=${PYTHON:-python3}
os_arch="$(uname -s)-$(uname -m)"
case "$os_arch" in
  Linux-x86_64|Linux-aarch64) ;;
  *) echo "setup_serve: skipped: nvidia-pytriton (tritonserver) has no wheel for $os_arch"; exit 0 ;;
esac
ort=""
if [ -x .venv/bin/python ]; then
  ort=$(.venv/bin/python -c "from importlib.metadata import version; print(version('onnxruntime'))" 2>/dev/null || true)
fi
ort_spec="onnxruntime${ort:+==$ort}"
check='
import sys
from importlib.metadata import version
want_ort = sys.argv[1]
np, ort, pt = version("numpy"), version("onnxruntime"), version("nvidia-pytriton")
ok = int(np.split(".")[0]) < 2 and pt == sys.argv[2] and (not want_ort or ort == want_ort)
print(f"nvidia-pytriton {pt}, numpy {np}, onnxruntime {ort}")
sys.exit(0 if ok else 1)
'
if have=$(.serve-venv/bin/python -c "$check" "$ort" "$PYTRITON" 2>/dev/null); then
  echo "setup_serve: .serve-venv ready ($have)"
  exit 0
fi
[ -x .serve-venv/bin/python ] || "$PY" -m venv .serve-venv
log=$(mktemp)
if ! .serve-venv/bin/python -m pip install --disable-pip-version-check -q \
     "nvidia-pytriton==$PYTRITON" "numpy<2" "$ort_spec" >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  rm -f "$log"
  echo "setup_serve: error: pip could not install nvidia-pytriton==$PYTRITON, numpy<2, $ort_spec into .serve-venv" >&2
  exit 1
fi
rm -f "$log"
have=$(.serve-venv/bin/python -c "$check" "$ort" "$PYTRITON")
echo "setup_serve: .serve-venv ready ($have)"
