"""The Triton versions the plugins support, and the ``plugins`` extra that says so (issue 15, item 2).

The AOT path needs no particular Triton: it compiles with ``triton.compile(ASTSource, target=GPUTarget)``
and checks every PTX it returns (launch ABI, hidden parameters, ISA). The extra must therefore
admit the Triton a CUDA build of torch pins (torch 2.13: ``triton==3.7.1``; 2.14: ``~=3.8.0``), or
installing normdeploy replaces torch's Triton. Verified: 3.5.1, 3.6.0, 3.7.1, 3.8.0 and 3.9.0, each
running tests/lower/plugins (interpreter and PTX for sm_80..sm_90).

``NORMDEPLOY_CHECK_OLDEST_TRITON=1`` also installs the oldest supported Triton (3.5.1, a 170 MB
wheel) into a throwaway virtual environment and runs tests/lower/plugins with it there: about
1.5 minutes with the wheel cached, off by default.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

OLDEST = "3.5.1"
VERIFIED = ("3.5.1", "3.6.0", "3.7.1", "3.8.0", "3.9.0")
#: what torch's CUDA wheels pin (their Requires-Dist), and what the lent H200 image carries (torch 2.11)
TORCH_PINS = {"2.11": "3.6.0", "2.13": "3.7.1", "2.14": "3.8.0"}


def plugins_requirement() -> Requirement:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    (req,) = [Requirement(r) for r in extras["plugins"] if Requirement(r).name == "triton"]
    return req


def test_plugins_extra_admits_the_triton_torch_pins():
    spec = plugins_requirement().specifier
    for version in VERIFIED:
        assert spec.contains(version), f"the plugins extra ({spec}) excludes verified Triton {version}"
    for torch_version, triton_version in TORCH_PINS.items():
        assert spec.contains(triton_version), (f"torch {torch_version} pins triton {triton_version}; the plugins "
                                               f"extra ({spec}) would replace it")
    assert not spec.contains("3.4.0")  # older ones are not claimed


def test_installed_torch_and_triton_agree_with_the_extra():
    spec = plugins_requirement().specifier
    triton_version = importlib.metadata.version("triton")
    assert spec.contains(triton_version)
    for r in importlib.metadata.requires("torch") or []:  # a CUDA torch pins triton; the CPU build does not
        req = Requirement(r)
        if req.name == "triton" and (req.marker is None or req.marker.evaluate()):
            for s in req.specifier:
                assert spec.contains(s.version), f"torch requires {req}, outside the plugins extra {spec}"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NORMDEPLOY_CHECK_OLDEST_TRITON") != "1",
                    reason="set NORMDEPLOY_CHECK_OLDEST_TRITON=1 to test the oldest supported Triton (downloads it)")
def test_plugins_with_the_oldest_supported_triton(tmp_path):
    env_dir = tmp_path / f"triton-{OLDEST}"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", f"triton=={OLDEST}"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    # everything else (torch, numpy, onnx, pytest) from this environment, after the old Triton
    site = next(p for p in sys.path if p.endswith("site-packages"))
    (next((env_dir / "lib").glob("python*")) / "site-packages" / "zz_parent.pth").write_text(site + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/lower/plugins",
                        "-k", "not oldest_supported_triton"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert f"triton {OLDEST}" in subprocess.run([str(py), "-c", "import triton; print('triton', triton.__version__)"],
                                                capture_output=True, text=True, env=env).stdout
    assert r.returncode == 0, r.stdout[-4000:]
