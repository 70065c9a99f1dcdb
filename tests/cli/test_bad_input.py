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
    r = cli("optimize", p, "--out", out, "--no-bench", "--force")  # not normdeploy's: --force does not replace it
    assert r.exit_code == 2 and "not written by normdeploy" in r.stderr
    assert (out / "keep.txt").read_text() == "precious" and sorted(os.listdir(out)) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli("optimize", p, "--out", out, "--no-bench").exit_code == 0  # an empty one it writes
    r = cli("optimize", p, "--out", out, "--no-bench", "--force")  # and its own it replaces
    assert r.exit_code == 0, r.stderr
    assert (out / "model.onnx").exists()


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


# ----------------------------------------------------------------------------- issue 16

def zero_d_output_model() -> onnx.ModelProto:
    """conv_bn_model plus a 0-d output (ReduceSum over every axis, keepdims=0): a scalar loss or count."""
    m = conv_bn_model()
    m.graph.node.append(helper.make_node("ReduceSum", ["y"], ["total"], keepdims=0, name="total"))
    m.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    return m


def test_a_zero_dimensional_output_is_compared(cli, out, tmp_path):
    """Item 4: a 0-d output crashed verify (np.concatenate of 0-d arrays); now it is compared like any other."""
    import json

    p = tmp_path / "m.onnx"
    onnx.save(zero_d_output_model(), p)
    d = tmp_path / "d.npz"
    np.savez(d, x=np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32))
    r = cli("optimize", p, "--out", out, "--no-bench", "--data", d, "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    for key in ("random", "data"):
        total = next(o for o in rep["accuracy"][key]["outputs"] if o["name"] == "total")
        assert total["max_rel_err"] < 1e-5 and total["cosine_min"] > 0.999999, total
    assert rep["norm_nodes"]["after"] == {}


def test_verify_compares_a_scalar_by_sign_and_size():
    from normdeploy.verify import compare_arrays

    same = compare_arrays("s", np.float32(2.0), np.float32(2.0))
    assert same.max_abs_err == 0 and same.cosine_min == 1.0
    flipped = compare_arrays("s", np.float32(2.0), np.float32(-2.0))
    assert flipped.max_abs_err == 4.0 and flipped.max_rel_err == 2.0 and flipped.cosine_min == -1.0
    bad = compare_arrays("s", np.float32(2.0), np.float32(np.nan))
    assert bad.nonfinite == 1 and bad.max_rel_err == float("inf")


def test_internal_errors_have_their_own_exit_code(cli, tmp_path, monkeypatch):
    """Item 4: an internal error exited 1, which under gate reads as 'a check failed'; now 70 (EX_SOFTWARE)."""
    import normdeploy.verify as verify
    from normdeploy.core.errors import EXIT_INTERNAL

    assert EXIT_INTERNAL not in (0, 1, 2, 3, 4)
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)

    def crash(*a, **k):
        raise ValueError("zero-dimensional arrays cannot be concatenated")

    monkeypatch.setattr(verify._Tally, "add", crash)  # where the 0-d crash was: every comparison goes through it
    for args in (("optimize", p, "--out", tmp_path / "out", "--no-bench"), ("gate", p, "--seconds", "0.2")):
        r = cli(*args)
        assert r.exit_code == EXIT_INTERNAL, (args[0], r.exit_code, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert err.startswith("error: internal error (ValueError: zero-dimensional") and len(err.splitlines()) == 1
        assert "--debug" in err
    readme = open(os.path.join(os.path.dirname(MODELS), "README.md")).read()
    assert f"{EXIT_INTERNAL} internal error" in readme


@pytest.mark.parametrize("args,phrase", [
    (("--input", "::::"), "is not NAME:SHAPE[:DTYPE]"),
    (("--input", ":1x3x8x8"), "is not NAME:SHAPE[:DTYPE]"),
    (("--input", "x:1x3x8x8:"), "is not NAME:SHAPE[:DTYPE]"),
    (("--bench-seconds", "0"), "--seconds (--bench-seconds) 0 is out of range"),
    (("--bench-seconds", "-1"), "--seconds (--bench-seconds) -1 is out of range"),
    (("--seconds", "nan"), "is not a number"),
    (("--tolerance", "-1"), "--tolerance -1 is out of range"),
    (("--threads", "-3"), "--threads -3 is out of range"),
    (("--threads", "0"), "--threads 0 is out of range"),
    (("--warmup", "-2"), "--warmup -2 is out of range"),
    (("--max-error", "-0.1"), "--max-error -0.1 is out of range"),
    (("--opset", "0"), "--opset 0 is out of range"),
    (("--input", "x:1x3x8x8:int64"), "model declares x as float32"),
])
def test_option_values_are_checked_before_any_work(cli, out, tmp_path, args, phrase):
    """Item 7: values that reached the pipeline unchecked (internal errors, or silently accepted)."""
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    assert_clean_failure(cli("optimize", p, "--out", out, *args), out, phrase, code=2)


def test_bench_and_gate_check_option_values_too(cli, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    for cmd in ("bench", "gate"):
        for args, phrase in ((("--seconds", "0"), "out of range"), (("--threads", "-3"), "--threads -3"),
                             (("--input", "::::"), "NAME:SHAPE")):
            r = cli(cmd, p, *args)
            assert r.exit_code == 2, (cmd, args, r.stdout, r.stderr)
            assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and phrase in r.stderr


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_non_finite_data_is_refused_not_scored_zero(cli, out, tmp_path, fill):
    """Item 7: all-NaN --data reported a max error of 0 (NaN == NaN everywhere, nothing finite compared)."""
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    d = tmp_path / "d.npz"
    np.savez(d, x=np.full((4, 3, 8, 8), fill, np.float32))
    assert_clean_failure(cli("optimize", p, "--data", d, "--out", out, "--no-bench"), out,
                         "data for input x has 768 NaN or Inf value(s) of 768", code=2)


@pytest.mark.parametrize("args,phrase", [
    (("--bogus",), "No such option '--bogus'"),
    (("--threads", "abc"), "'abc' is not a valid integer"),
    (("--target", "tpu"), "Invalid value for '--target'"),
])
def test_usage_errors_are_one_line(cli, tmp_path, args, phrase):
    """Item 7: click's usage errors were four lines (usage, try, blank, error)."""
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    for cmd in ("optimize", "bench", "gate") + (("inspect",) if "--threads" not in args else ()):
        r = cli(cmd, p, *args)
        assert r.exit_code == 2, (cmd, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and phrase in err, err
        assert f"normdeploy {cmd} --help" in err
    r = cli("optimize")
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: Missing argument 'MODEL'")
    for args, phrase in ((("optimise", p), "No such command 'optimise'"), (("--bogus",), "No such option '--bogus'")):
        r = cli(*args)  # the group's own errors
        err = r.stderr.strip()
        assert r.exit_code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {phrase}"), err


def test_json_errors_are_json_on_stdout(cli, tmp_path):
    """Item 7: with --json an error is also a JSON object on stdout (type, message, hint, exit code)."""
    import json

    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    cases = [(("optimize", tmp_path / "nope.onnx", "--json"), "InputError", 2),
             (("optimize", p, "--json", "--threads", "abc"), "UsageError", 2),
             (("optimize", p, "--json", "--tolerance", "-1"), "InputError", 2),
             (("inspect", p, "--json", "--input", "::::"), "InputError", 2),
             (("gate", p, "--json", "--seconds", "0"), "InputError", 2)]
    for args, kind, code in cases:
        r = cli(*args)
        assert r.exit_code == code, (args, r.stderr)
        doc = json.loads(r.stdout)
        assert doc["error"]["type"] == kind and doc["error"]["exit_code"] == code, doc
        assert doc["error"]["message"] and doc["error"]["message"] in r.stderr
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def _torch_models(tmp_path):
    conv = tmp_path / "conv.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval(), conv)
    emb = tmp_path / "emb.pt"  # a BERT-like start: token ids into an Embedding
    torch.save(torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.LayerNorm(16)).eval(), emb)
    return conv, emb


@pytest.mark.slow
@pytest.mark.parametrize("which,args,phrases", [
    ("conv", ("--input", "1x3x8x8x2"), ("--input input:1x3x8x8x2:float32 does not fit the model",
                                        "Expected 3D (unbatched) or 4D (batched) input to conv2d",
                                        "Conv2d taking 3 channels")),
    ("conv", ("--input", "1x5x8x8"), ("expected input[2, 5, 8, 8] to have 3 channels", "Conv2d taking 3 channels")),
    ("conv", ("--input", "a:1x3x8x8", "--input", "b:1x3x8x8"),
     ("--input gives 2 inputs (a:1x3x8x8:float32, b:1x3x8x8:float32), but the model's forward takes 1 (input)",)),
    ("emb", ("--input", "input_ids:1x8"), ("--input input_ids:1x8 is float32, but the model needs integer ids",
                                           "--input input_ids:1x8:int64")),
])
def test_wrong_input_on_a_torch_model_is_bad_input(cli, out, tmp_path, which, args, phrases):
    """Item 3: a wrong --input on a torch model exited 3 ('unsupported') with the exporter's failure;
    it is bad input (exit 2), and the line says which input and what the model takes."""
    conv, emb = _torch_models(tmp_path)
    r = cli("optimize", conv if which == "conv" else emb, "--out", out, "--no-bench", *args)
    assert_clean_failure(r, out, *phrases, code=2)
    assert "Next steps" not in r.stderr


@pytest.mark.slow
def test_wrong_input_on_a_torch_model_prints_no_torch_log_lines(tmp_path):
    """Item 3: the exporter's own ERROR log lines (``E1202 ... torch/export/_trace.py``) are not printed."""
    import subprocess
    import sys

    _, emb = _torch_models(tmp_path)
    root = os.path.dirname(MODELS)
    r = subprocess.run([sys.executable, "-m", "normdeploy.cli", "optimize", str(emb), "--input", "input_ids:1x8",
                        "--out", str(tmp_path / "out"), "--no-bench"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: --input input_ids"), \
        r.stderr


def test_a_good_input_is_not_blamed_for_an_export_failure(monkeypatch, tmp_path):
    """The diagnosis runs the model on the given inputs: when they fit, the exporter's failure stands."""
    from normdeploy.cli.common import input_mismatch

    conv, emb = _torch_models(tmp_path)
    assert input_mismatch(str(conv), ("1x3x8x8",)) is None
    assert input_mismatch(str(emb), ("input_ids:1x8:int64",)) is None
    assert "integer ids" in input_mismatch(str(emb), ("input_ids:1x8",)).message


@pytest.mark.slow
def test_onnxscript_folding_warnings_are_not_printed_on_a_run_that_works(tmp_path):
    """Item 8: onnxscript's constant folder logged ``Evaluation failed: ...`` on stderr of successful runs.

    A real process (pytest's own log capture would hide the line); the folder's warning is planted
    where it arises, during the pipeline run."""
    import subprocess
    import sys

    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import logging, sys\n"
        "import normdeploy.api as api\n"
        "real = api.optimize\n"
        "def folding(*a, **k):\n"
        "    logging.getLogger('onnxscript.optimizer._constant_folding').warning('Evaluation failed: %s', 'planted')\n"
        "    return real(*a, **k)\n"
        "api.optimize = folding\n"
        "from normdeploy.cli import main\n"
        "main(sys.argv[1:], prog_name='normdeploy')\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(MODELS)}
    for extra, shown in (((), False), (("--debug",), True)):
        r = subprocess.run([sys.executable, str(driver), "optimize", str(p), "--out", str(tmp_path / "out"),
                            "--force", "--no-bench", *extra], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        assert ("Evaluation failed: planted" in r.stderr) == shown, (extra, r.stderr)


# ----------------------------------------------------------------------------- issue 16, item 2: scripts/setup.sh

FAKE_PYTHON = """#!/usr/bin/env bash
# .venv/bin/python for scripts/setup.sh: logs every call; torch is not installed; pip does nothing
echo "$*" >> "$FAKE_LOG"
[ "$1" = "-c" ] && exit 1
[ "$1" = "-" ] && exec "$REAL_PYTHON" "$@"
if [[ "$*" == *--dry-run* ]]; then
  args=("$@"); for i in "${!args[@]}"; do [ "${args[$i]}" = "--report" ] && report=${args[$((i + 1))]}; done
  if [ -n "${FAKE_LOCAL_WHEEL:-}" ]; then  # the resolution report of a wheel on local disk, large, as pip's are
    { echo '{"install": [{"metadata": {"name": "torch", "version": "2.13.0+cpu"}}],'; head -c 4000000 /dev/zero | tr '\\0' ' '; echo '}'; } > "$report"
  else
    echo '{"install": [{"metadata": {"name": "torch", "version": "2.13.0"}}]}' > "$report"
  fi
fi
exit 0
"""


def _run_setup(tmp_path, **env):
    import shutil
    import subprocess
    import sys

    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(MODELS), "scripts", "setup.sh"), root / "scripts" / "setup.sh")
    fake = root / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(log), "REAL_PYTHON": sys.executable,
           **env}
    r = subprocess.run(["bash", str(root / "scripts" / "setup.sh"), "test"], capture_output=True, text=True,
                       env=env, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return r, [c for c in calls if c.startswith("-m pip install") and "--dry-run" not in c]


@pytest.mark.parametrize("attempt", range(3))
def test_setup_uses_a_local_cpu_wheel_without_pytorchs_index(tmp_path, attempt):
    """A large resolution report used to break pip's pipe into `grep -q` (EPIPE): with pipefail the wheel on
    disk read as missing and PyTorch's index was added to every install."""
    r, installs = _run_setup(tmp_path, FAKE_LOCAL_WHEEL="1")
    assert r.returncode == 0, r.stderr
    assert "Broken pipe" not in r.stderr and "the wheel pip finds without PyTorch's index" in r.stderr
    assert installs and not any("--extra-index-url" in c for c in installs), installs
    assert installs[0].endswith(" torch==2.13.0") and installs[-1].endswith("-e .[test,plugins,peers]")


def test_setup_says_when_pytorchs_index_cannot_be_reached(tmp_path):
    """No local wheel and an index this machine cannot reach: one line of its own, at once, not minutes of retries."""
    import time

    t0 = time.monotonic()
    r, installs = _run_setup(tmp_path, NORMDEPLOY_TORCH_INDEX="http://127.0.0.1:9/whl/cpu")
    assert r.returncode == 1 and time.monotonic() - t0 < 60
    assert "setup.sh: error: http://127.0.0.1:9/whl/cpu cannot be reached" in r.stderr, r.stderr
    assert "NORMDEPLOY_TORCH_INDEX" in r.stderr and installs == []


def test_setup_takes_torch_alone_from_pytorchs_index(tmp_path):
    """Where the index is needed it serves the torch install only, not the 34 packages after it."""
    import http.server
    import threading

    (tmp_path / "index" / "torch").mkdir(parents=True)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "index"), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}/"
        r, installs = _run_setup(tmp_path, NORMDEPLOY_TORCH_INDEX=index)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    assert f"--extra-index-url {index}" in installs[0] and installs[0].endswith(" torch==2.13.0")
    assert "--extra-index-url" not in installs[-1] and installs[-1].endswith("-e .[test,plugins,peers]")
