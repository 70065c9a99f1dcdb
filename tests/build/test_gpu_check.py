"""scripts/gpu_check.sh end to end in its small setting: what CI runs so that the script is known to work
before a GPU ever runs it. Without a GPU, ``pytest -m gpu`` skips (each test with its reason) and every
plugin kernel runs under the Triton interpreter with the arguments TensorRT's AOT launch would pass."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import ROOT


def test_gpu_check_small_setting(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("OUT", None)
    t0 = time.perf_counter()
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, capture_output=True,
                       text=True, timeout=180, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "== pytest -m gpu" in r.stdout and "== gpu_check done" in r.stdout
    report = json.loads((tmp_path / "gpu_kernels.json").read_text())
    assert report["small"] and report["failures"] == 0 and not report["skipped_for_budget"]
    assert {(c["kernel"], c["dtype"]) for c in report["cases"]} == {
        (k, d) for k in ("rmsnorm", "crmsnorm", "group_scaling", "scalenorm", "dyt", "dyt_plain")
        for d in ("fp32", "fp16", "bf16")}
    assert all(c["ok"] and c["torch_ms"] for c in report["cases"])
    assert any(c["vector_path"] for c in report["cases"]) and "x_align" in report["cases"][0]
    md = (tmp_path / "gpu_kernels.md").read_text()
    assert "| kernel | dtype | C | rows |" in md and "pytest -m gpu" in md
    if not report["copy_gbps"]:  # no GPU here: the GPU tests said why they skipped
        assert any(line.startswith("SKIPPED") and "GPU" in line for line in report["pytest_gpu"])
    assert seconds < 120, f"the CI setting took {seconds:.0f} s"
