"""DESIGN.md section 8: every bad input gives one line saying what to do, a non-zero exit,
no traceback, no (half-written) output directory, and an untouched input file."""
import hashlib
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from normdeploy import nn as N
from tests.conftest import MODELS

EXAMPLE = os.path.join(MODELS, "digits_cnn_bn_un.pt")


def conv_bn_model(gamma=None, var=None, mean=None, scale_as_input=False, opset=20) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 4
    w = numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w")
    params = {"gamma": np.ones(c, np.float32) if gamma is None else np.asarray(gamma, np.float32),
              "beta": rng.standard_normal(c).astype(np.float32),
              "mean": rng.standard_normal(c).astype(np.float32) if mean is None else np.asarray(mean, np.float32),
              "var": np.ones(c, np.float32) if var is None else np.asarray(var, np.float32)}
    inits = [w] + [numpy_helper.from_array(v, k) for k, v in params.items() if not (scale_as_input and k == "gamma")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])]
    if scale_as_input:
        inputs.append(helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [c]))
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c, 8, 8])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_clean_failure(result, out, *must_say, code=None):
    assert result.exit_code != 0, result.stdout
    if code is not None:
        assert result.exit_code == code
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stderr + result.stdout
    for phrase in must_say:
        assert phrase in err, err
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    assert not [f for f in os.listdir(parent) if f.startswith(f".{os.path.basename(out)}.")], os.listdir(parent)


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "out")


def test_missing_file(cli, out, tmp_path):
    assert_clean_failure(cli("optimize", tmp_path / "nope.onnx", "--out", out), out, "does not exist", code=2)


def test_truncated_onnx(cli, out, tmp_path):
    data = conv_bn_model().SerializeToString()
    p = tmp_path / "m.onnx"
    p.write_bytes(data[: len(data) // 2])
    before = digest(p)
    assert_clean_failure(cli("optimize", p, "--out", out), out, "does not parse")
    assert digest(p) == before


def test_truncated_torch_file(cli, out, tmp_path):
    data = open(EXAMPLE, "rb").read()
    p = tmp_path / "m.pt"
    p.write_bytes(data[: len(data) // 2])
    assert_clean_failure(cli("optimize", p, "--out", out), out)


def test_empty_file(cli, out, tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"")
    assert_clean_failure(cli("optimize", p, "--out", out), out, "is empty")


def test_not_a_model(cli, out, tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("these are my notes, not a model\n" * 20)
    assert_clean_failure(cli("optimize", p, "--out", out), out, "neither an ONNX model nor a torch file")


def test_onnx_failing_the_checker(cli, out, tmp_path):
    m = conv_bn_model()
    m.graph.node[1].input[0] = "undefined_tensor"
    p = tmp_path / "bad.onnx"
    onnx.save(m, p)
    assert_clean_failure(cli("optimize", p, "--out", out), out, "fails the ONNX checker")


def test_missing_external_data(cli, out, tmp_path):
    p = tmp_path / "ext.onnx"
    onnx.save(conv_bn_model(), p, save_as_external_data=True, location="ext.data", size_threshold=0)
    os.remove(tmp_path / "ext.data")
    assert_clean_failure(cli("optimize", p, "--out", out), out, "ext.data", "missing")


def test_unsupported_op(cli, out, tmp_path):
    m = conv_bn_model()
    m.graph.node.append(helper.make_node("FancyOp", ["y"], ["z"], domain="com.example", name="fancy"))
    m.graph.output[0].name = "z"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    assert_clean_failure(cli("optimize", p, "--out", out, "--no-bench"), out, "ONNX Runtime cannot load", code=3)


@pytest.mark.parametrize("bad,phrase", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-0.5, "negative")])
def test_corrupt_running_variance(cli, out, tmp_path, bad, phrase):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(var=[1.0, bad, 1.0, 1.0]), p)
    assert_clean_failure(cli("optimize", p, "--out", out, "--no-bench"), out, phrase, "node bn")


def test_nan_in_unified_norm_moment(cli, out, tmp_path):
    m = N.UnifiedNorm(4).eval()
    with torch.no_grad():
        m.running_moment[2] = float("nan")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), m).eval()
    p = tmp_path / "m.pt"
    torch.save(model, p)
    assert_clean_failure(cli("optimize", p, "--input", "1x1x8x8", "--out", out), out, "UnifiedNorm", "NaN or Inf")


def test_zero_gamma_folds_exactly_and_is_reported(cli, out, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(gamma=[1.0, 0.0, 2.0, -1.0]), p)
    r = cli("optimize", p, "--out", out, "--no-bench", "--json")
    assert r.exit_code == 0, r.stderr
    import json

    rep = json.loads(r.stdout)
    assert rep["norm_nodes"]["after"] == {}
    assert rep["accuracy"]["max_rel_err"] <= 1e-5
    assert any("gamma is zero in 1 channel" in n for n in rep["notes"])


def test_non_constant_norm_parameter_is_skipped_with_reason(cli, out, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(scale_as_input=True), p)
    import json

    r = cli("optimize", p, "--input", "gamma:4", "--out", out, "--no-bench", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    fold = next(x for x in rep["passes"] if x["name"] == "fold_affine_into_linear")
    assert fold["skipped"] == [{"node": "bn", "reason": "BatchNormalization scale is not a constant"}]
    assert rep["norm_nodes"]["after"] == {"BatchNorm": 1}


@pytest.mark.parametrize("spec,phrase", [
    ("x:1x3x9x8", "fixes it to 8"),
    ("x:1x3x8", "rank 3"),
    ("x:1x3xAx8", "positive integers"),
    ("y:1x3x8x8", "not a model input"),
])
def test_wrong_input_shape(cli, out, tmp_path, spec, phrase):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    assert_clean_failure(cli("optimize", p, "--input", spec, "--out", out), out, phrase)


def test_torch_module_without_input_shape(cli, out, tmp_path):
    p = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 3)), p)
    assert_clean_failure(cli("optimize", p, "--out", out), out, "--input")


def test_output_directory_not_writable(cli, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    r = cli("optimize", p, "--out", "/sys/normdeploy-out")
    assert r.exit_code == 2 and r.stderr.startswith("error: output directory /sys/normdeploy-out is not writable")
    assert len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("optimize", p, "--out", blocker / "out")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_existing_output_directory_is_kept_without_force(cli, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = cli("optimize", p, "--out", out, "--no-bench")
    assert r.exit_code == 2 and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"
    r = cli("optimize", p, "--out", out, "--no-bench", "--force")
    assert r.exit_code == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "model.onnx").exists()


class Evil(torch.nn.Module):
    """A module class outside torch.nn and normdeploy: unpickling it could run any code."""

    def forward(self, x):
        return x


def test_pickle_with_foreign_globals_is_refused_unless_trusted(cli, out, tmp_path):
    p = tmp_path / "evil.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 3), Evil()), p)
    r = cli("optimize", p, "--input", "1x3", "--out", out)
    assert_clean_failure(r, out, "tests.cli.test_bad_input.Evil", "--trust-pickle")
    r = cli("optimize", p, "--input", "1x3", "--out", out, "--trust-pickle", "--no-bench")
    assert r.exit_code == 0, r.stderr


def test_state_dict_is_not_a_model(cli, out, tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), p)
    assert_clean_failure(cli("optimize", p, "--input", "1x3", "--out", out), out, "state_dict")


def test_bad_data_file(cli, out, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    d = tmp_path / "d.npz"
    np.savez(d, x=np.zeros((5, 3, 7, 7), np.float32))
    assert_clean_failure(cli("optimize", p, "--data", d, "--out", out), out, "[N, 3, 8, 8]")
    assert_clean_failure(cli("optimize", p, "--data", tmp_path / "none.npz", "--out", out), out, "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    from click.testing import CliRunner

    from normdeploy.cli import main
    from normdeploy.core.errors import InputError

    with pytest.raises(InputError):
        CliRunner().invoke(main, ["optimize", str(tmp_path / "nope.onnx"), "--debug"], catch_exceptions=False)
