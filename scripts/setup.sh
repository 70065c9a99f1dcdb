#!/usr/bin/env bash
# Create .venv and install normdeploy with the right PyTorch build.
#   scripts/setup.sh            runtime only
#   scripts/setup.sh test       + test, plugin and peer-tool dependencies
# On a machine without an NVIDIA GPU this pins the CPU build of torch 2.13.0 (a bare
# `torch` requirement would pull a multi-GB CUDA build): from local disk where pip finds
# the wheel there (PIP_FIND_LINKS, a wheelhouse in pip's config), else from PyTorch's CPU
# index (NORMDEPLOY_TORCH_INDEX: another index or mirror). On a GPU host set
# NORMDEPLOY_TORCH="torch==2.13.0" (the default CUDA wheel) or any torch spec you want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup.sh: $*" >&2; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
torch_pip=("${pip[@]}")  # the PyTorch index, where needed, serves torch alone: not every later install
if [ -z "${NORMDEPLOY_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NORMDEPLOY_TORCH="torch==2.13.0"
  else
    NORMDEPLOY_TORCH="torch==2.13.0+cpu"
    # Is the CPU wheel on local disk? pip's resolution report goes to a file, read once pip is done:
    # piped into `grep -q`, pip lost its pipe when grep stopped reading (EPIPE), and pipefail then read
    # a wheel on disk as "not found".
    report=$(mktemp)
    trap 'rm -f "$report"' EXIT
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
      "${pip[@]}" "torch==2.13.0" --only-binary=:all: --no-deps --dry-run --report "$report" --retries 0 \
        --timeout 10 >/dev/null 2>&1 || true
      if grep -q '+cpu' "$report"; then
        say "torch 2.13.0+cpu: the wheel pip finds without PyTorch's index (local disk or its own index)"
      else
        index=${NORMDEPLOY_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
        say "torch 2.13.0+cpu: from $index (set NORMDEPLOY_TORCH_INDEX for another index or mirror)"
        if ! .venv/bin/python - "$index" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
except Exception as e:  # noqa: BLE001 - unreachable, refused, timed out, DNS
    sys.exit(f"setup.sh: error: {sys.argv[1]} cannot be reached ({type(e).__name__}: {e}); set "
             "NORMDEPLOY_TORCH_INDEX to an index this machine reaches, or put the torch 2.13.0+cpu wheel "
             "where pip finds it (PIP_FIND_LINKS=DIR)")
EOF
        then
          exit 1
        fi
        torch_pip+=(--extra-index-url "$index" --retries 2 --timeout 30)
      fi
    fi
  fi
fi
.venv/bin/python -c "import torch" 2>/dev/null || "${torch_pip[@]}" "${NORMDEPLOY_TORCH%+cpu}"
extras=""
[ "${1:-}" = "test" ] && extras="[test,plugins,peers]"
"${pip[@]}" -e ".${extras}"
