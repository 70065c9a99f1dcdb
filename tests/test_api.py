"""The public Python API (normdeploy.api): README's snippet runs as written, and every kind of
model the API takes gives what the file path gives."""
from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest

import normdeploy
from normdeploy.core.errors import InputError
from tests.conftest import MODELS, ROOT

EXAMPLE = os.path.join(MODELS, "digits_cnn_bn_un.pt")
DATA = os.path.join(MODELS, "digits_test.npz")


def _readme_snippet() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_and_prints_what_its_comments_say(tmp_path, monkeypatch, capsys):
    os.symlink(MODELS, tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_snippet(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    expected = [line.split("# ", 1)[1].strip() for line in _readme_snippet().splitlines()
                if line.startswith("print(") and "# " in line]
    assert [p.strip() for p in printed] == expected
    assert sorted(os.listdir(tmp_path / "out")) == [".normdeploy-output", "model.onnx", "original.onnx", "report.json",
                                                    "report.md", "triton"]


@pytest.mark.slow
def test_a_module_and_a_modelproto_give_what_the_path_gives():
    import torch

    from normdeploy.load import load_pickled_module

    by_path = normdeploy.optimize(EXAMPLE, bench=False)
    module = load_pickled_module(EXAMPLE, trust_pickle=False)
    by_module = normdeploy.optimize(module, bench=False)
    by_proto = normdeploy.optimize(by_path.original, bench=False)
    assert by_module.report["input"]["path"] == "<nn.Module DigitsCNN>"
    assert by_proto.report["input"]["path"] == "<onnx.ModelProto>"
    for other in (by_module, by_proto):
        assert other.optimized.SerializeToString() == by_path.optimized.SerializeToString()
        assert other.report["norm_nodes"] == by_path.report["norm_nodes"]
    x = np.load(DATA)["input"][:8]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    import onnxruntime as ort

    got = ort.InferenceSession(by_module.optimized.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(InputError, match="unknown option 'bogus'"):
        normdeploy.optimize(EXAMPLE, bogus=1)
    with pytest.raises(InputError, match="cannot optimize a dict"):
        normdeploy.optimize({"not": "a model"})


@pytest.mark.slow
def test_inspect_and_optimize_agree_on_what_is_rewritten_with_calibration():
    """One transform for both: with --allow-approx --calib, inspect reports the LN-free rewrites optimize makes."""
    path, calib = os.path.join(MODELS, "vit_ln.pt"), DATA
    info = normdeploy.inspect(path, allow_approx=True, calib=calib)
    result = normdeploy.optimize(path, allow_approx=True, calib=calib, max_error=1e9, bench=False)
    by_inspect = {e["node"]: sorted(r.split(":", 1)[0] for r in e["rewrites"]) for e in info["normalizations"]}
    by_optimize: dict[str, list[str]] = {}
    for p in result.report["passes"]:
        if p["name"].startswith("recognize_"):
            continue
        for w in p["rewrites"]:
            if w["node"] in by_inspect:
                by_optimize.setdefault(w["node"], []).append(p["name"])
    assert any("ln_free" in v for v in by_inspect.values()), by_inspect
    assert {k: v for k, v in by_inspect.items() if v} == {k: sorted(v) for k, v in by_optimize.items()}
    assert isinstance(onnx.ModelProto.FromString(result.optimized.SerializeToString()), onnx.ModelProto)
