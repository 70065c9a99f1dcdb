#!/usr/bin/env bash
# Create .venv and install normdeploy with the right PyTorch build.
#   scripts/setup.sh            runtime only
#   scripts/setup.sh test       + test, plugin and peer-tool dependencies
# On a machine without an NVIDIA GPU this pins the CPU build of torch 2.13.0 (a bare
# `torch` requirement would pull a multi-GB CUDA build). On a GPU host set
# NORMDEPLOY_TORCH="torch==2.13.0" (the default CUDA wheel) or any torch spec you want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if [ -z "${NORMDEPLOY_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NORMDEPLOY_TORCH="torch==2.13.0"
  else
    NORMDEPLOY_TORCH="torch==2.13.0+cpu"
    # the CPU wheel: taken from local disk where it lies there, else from PyTorch's CPU index
    if ! "${pip[@]}" "torch==2.13.0" --only-binary=:all: --no-deps --dry-run --report /dev/stdout 2>/dev/null | grep -q '+cpu'; then
      pip+=(--extra-index-url "${NORMDEPLOY_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
    fi
  fi
fi
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "${NORMDEPLOY_TORCH%+cpu}"
extras=""
[ "${1:-}" = "test" ] && extras="[test,plugins,peers]"
"${pip[@]}" -e ".${extras}"
