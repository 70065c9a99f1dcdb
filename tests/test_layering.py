"""The import-layering contract of pyproject.toml ([tool.importlinter]): stages import only earlier stages.

Run on the real tree it must hold; run on a copy of the package into which a lower stage
imports a higher one (core importing the pipeline), it must fail and name the offending
import, so the check cannot silently pass.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT

LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(pythonpath: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([LINT, "--config", os.path.join(ROOT, "pyproject.toml"), "--no-cache"], cwd=pythonpath,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_the_layers():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 kept, 0 broken" in run.stdout


def test_a_lower_stage_importing_a_higher_one_is_caught(tmp_path):
    shutil.copytree(os.path.join(ROOT, "normdeploy"), tmp_path / "normdeploy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    graph = tmp_path / "normdeploy" / "core" / "graph.py"
    graph.write_text(graph.read_text() + "\n\ndef _late():\n    from ..pipeline import transform  # a violation\n")
    run = _lint(str(tmp_path))
    assert run.returncode != 0
    assert "normdeploy.core.graph -> normdeploy.pipeline" in run.stdout, run.stdout[-3000:]
