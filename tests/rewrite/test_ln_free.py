"""LN-free (approximate): only with --allow-approx and --calib; accuracy reported; refused above --max-error."""
import json

import numpy as np
import pytest
import torch


def _model_and_data(tmp_path, constant_std: bool, reader: str = "linear"):
    """LN -> Linear (folds into the reader) or LN as the graph output (stays linearized)."""
    torch.manual_seed(0)
    layers = [torch.nn.LayerNorm(16)] + ([torch.nn.Linear(16, 4)] if reader == "linear" else [])
    model = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5, 16)).astype(np.float32)
    if constant_std:  # every token has the same std, so freezing it is exact for the first LN
        x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True) * 2.0
    else:
        x *= rng.uniform(0.2, 5.0, (64, 5, 1)).astype(np.float32)
    p = tmp_path / "m.pt"
    model.example_inputs = {"input": (1, 5, 16)}
    torch.save(model, p)
    np.savez(tmp_path / "calib.npz", input=x)
    return p, tmp_path / "calib.npz"


def test_needs_allow_approx_and_calib(cli, tmp_path):
    p, calib = _model_and_data(tmp_path, True)
    r = cli("optimize", p, "--out", tmp_path / "o", "--no-bench", "--json")
    rep = json.loads(r.stdout)
    assert "ln_free" not in [x["name"] for x in rep["passes"]]
    r = cli("optimize", p, "--out", tmp_path / "o2", "--allow-approx")
    assert r.exit_code == 2 and "--calib" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("reader,says", [("linear", "folded into 1 linear reader"), ("output", "linearized")])
def test_reports_accuracy_change(cli, tmp_path, reader, says):
    p, calib = _model_and_data(tmp_path, True, reader)
    r = cli("optimize", p, "--out", tmp_path / "o", "--no-bench", "--json", "--allow-approx", "--calib", calib,
            "--max-error", "1e-4")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    ln = next(x for x in rep["passes"] if x["name"] == "ln_free")
    assert ln["exact"] is False and len(ln["rewrites"]) == 1
    assert says in ln["rewrites"][0]["what"]
    assert rep["norm_nodes"]["after"] == {}
    assert rep["accuracy"]["exact_only"] is False and rep["accuracy"]["tolerance"] == 1e-4
    calib_acc = rep["accuracy"]["calib"]
    assert 0 < calib_acc["max_rel_err"] <= 1e-5  # every calibration token has the frozen std
    assert rep["accuracy"]["random"]["max_rel_err"] > 1e-3  # random tokens do not: reported, not gated
    # recompute the error on the calibration data from the written models
    import onnx

    from tests.conftest import ort_run

    x = np.load(calib)["input"]
    (ref,), (opt,) = ort_run(onnx.load(tmp_path / "o" / "original.onnx"), x), ort_run(onnx.load(tmp_path / "o" / "model.onnx"), x)
    assert np.abs(ref - opt).max() / np.abs(ref).max() == pytest.approx(calib_acc["max_rel_err"], rel=1e-3)


@pytest.mark.slow
def test_refused_above_max_error(cli, tmp_path):
    p, calib = _model_and_data(tmp_path, False)
    out = tmp_path / "o"
    r = cli("optimize", p, "--out", out, "--no-bench", "--allow-approx", "--calib", calib, "--max-error", "1e-3")
    assert r.exit_code == 4, r.stdout
    assert r.stderr.startswith("error: optimized model differs from the original") and "--max-error" in r.stderr
    assert not out.exists()
