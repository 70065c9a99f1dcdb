"""The openvino target: normdeploy's folds on OpenVINO's CPU plugin at f32, verified and timed there,
with a Triton entry for Triton's OpenVINO backend (OpenVINO IR)."""
import json
import os
import types

import numpy as np
import onnx
import pytest

import normdeploy
from normdeploy import pipeline
from tests.conftest import MODELS

ov = pytest.importorskip("openvino")
from normdeploy.build.openvino import OpenVinoRunner  # noqa: E402

DIGITS = os.path.join(MODELS, "digits_test.npz")
SEQ = os.path.join(MODELS, "seq_test.npz")


def _optimize(name, **kw):
    data = SEQ if name.startswith("llama") else DIGITS
    return normdeploy.optimize(os.path.join(MODELS, f"{name}.pt"), target="openvino", data=data, threads=1, **kw)


def _count(counts: dict) -> int:
    return sum(counts.values())


def test_digits_folds_on_openvino_exactly(tmp_path):
    r = _optimize("digits_cnn_bn_un", bench=False)
    rep = r.report
    assert rep["target"] == "openvino"
    assert rep["norm_nodes"]["before"] == {"BatchNorm": 1, "UnifiedNorm": 1} and rep["norm_nodes"]["after"] == {}
    assert rep["accuracy"]["max_rel_err"] < 1e-5 and rep["accuracy"]["data"]["top1_agreement"] == 1.0
    assert rep["runtime"]["name"] == "OpenVINO" and rep["runtime"]["inference_precision"] == "f32"
    assert rep["runtime"]["threads"] == 1 and rep["runtime"]["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert not r.optimized.functions and all(n.domain in ("", "ai.onnx") for n in r.optimized.graph.node)
    out = r.save(str(tmp_path / "out"))
    md = open(os.path.join(out, "report.md")).read()
    assert "runtime **OpenVINO" in md and "inference precision **f32**" in md
    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved["triton"]["backend"] == "openvino" and saved["triton"]["max_batch_size"] == 0
    assert "f32" in saved["triton"]["precision_note"]


def _openvino_own_error(r) -> float:
    """max |OpenVINO - ONNX Runtime| / max |ONNX Runtime| over the original's outputs on verify's random inputs:
    how far the two runtimes' f32 kernels differ on the same graph."""
    from normdeploy.build import OrtRunner
    from normdeploy.verify import random_feeds

    ov_run, ort_run = OpenVinoRunner(r.original_model, 1), OrtRunner(r.original_model, "ort-cpu", 1)
    worst = 0.0
    for feed in random_feeds(r.specs, 4):
        for a, b in zip(ov_run.run(feed), ort_run.run(feed)):
            worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30)))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_ln", "vit_dyt", "vit_rmsnorm", "llama_rmsnorm", "vit_powernorm", "vit_scalenorm",
                                  "vit_un", "snn_lif_mpbn"])
def test_zoo_models_exact_on_openvino_and_norms_go_down_as_for_ort_cpu(name):
    r = _optimize(name, bench=False)
    ort = normdeploy.optimize(os.path.join(MODELS, f"{name}.pt"), target="ort-cpu", bench=False)
    rep = r.report
    # exact: within 1e-5, or within twice what OpenVINO's own f32 kernels differ from ONNX Runtime's on the
    # unmodified original (vit_un on an AVX-512 CPU: 8.1e-6 for the original, 1.5e-5 for the folded model;
    # a wrong fold is off by orders of magnitude more); the same model on ort-cpu is held to 1e-5 outright
    assert ort.report["accuracy"]["max_rel_err"] < 1e-5, ort.report["accuracy"]
    assert rep["accuracy"]["max_rel_err"] < max(1e-5, 2 * _openvino_own_error(r)), rep["accuracy"]
    assert rep["runtime"]["inference_precision"] == "f32"
    before, after = rep["norm_nodes"]["before"], rep["norm_nodes"]["after"]
    assert before == ort.report["norm_nodes"]["before"]
    assert _count(after) <= _count(ort.report["norm_nodes"]["after"]) and _count(after) < _count(before) or \
        _count(before) == 0
    # the same rewrites as ort-cpu before lowering
    rewrites = {p["name"]: p["rewrites_count"] for p in rep["passes"] if p["rewrites_count"]}
    ort_rewrites = {p["name"]: p["rewrites_count"] for p in ort.report["passes"] if p["rewrites_count"]}
    lower = {s.name for t in ("openvino", "ort-cpu") for s in pipeline.pass_table(t)["lower"]}
    assert {k: v for k, v in rewrites.items() if k not in lower} == \
        {k: v for k, v in ort_rewrites.items() if k not in lower}
    assert not r.optimized.functions
    layers = rep["norm_nodes"]["openvino_layers"]
    if name in ("vit_ln", "vit_rmsnorm", "llama_rmsnorm"):  # pre-LN LayerNorm (MVN) -> RMSNorm, fused as RMS
        assert layers["optimized"].get("RMS") == _count(before)


@pytest.mark.slow
def test_short_bench_times_all_three_on_openvino():
    r = _optimize("vit_dyt", seconds=0.5, warmup=2)
    lat = r.report["latency"]
    assert {"original", "optimized", "floor"} <= set(lat) and lat["speedup"] > 0
    assert lat["method"].startswith("OpenVINO CPU plugin (f32")


def test_cli_optimize_and_inspect(cli, tmp_path):
    out = tmp_path / "o"
    r = cli("optimize", os.path.join(MODELS, "digits_cnn_bn_un.pt"), "--target", "openvino", "--out", out,
            "--no-bench", "--json", "--threads", "1")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["target"] == "openvino" and rep["runtime"]["inference_precision"] == "f32"
    assert sorted(os.listdir(out / "triton" / "digits_cnn_bn_un" / "1")) == ["model.bin", "model.xml"]
    r = cli("inspect", os.path.join(MODELS, "vit_ln.pt"), "--target", "openvino", "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["target"] == "openvino" and [n["kind"] for n in info["normalizations"]][:1] == ["LayerNorm"]


@pytest.mark.parametrize("flags,phrase", [(("--fp16",), "--fp16 is for the ONNX Runtime targets, not openvino"),
                                          (("--ort-rms-op", "standard"), "--ort-rms-op standard is for the ONNX "
                                                                         "Runtime targets"),
                                          (("--lower-only",), "--lower-only prepares models for TensorRT")])
def test_bad_combinations_refused(cli, tmp_path, flags, phrase):
    r = cli("optimize", os.path.join(MODELS, "digits_cnn_bn_un.pt"), "--target", "openvino", *flags,
            "--out", tmp_path / "o", "--no-bench")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and phrase in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_triton_entry_text_and_ir(tmp_path):
    from normdeploy.package.triton import check_entry, EntryError, plan_entry, write_repository

    r = _optimize("digits_cnn_bn_un", bench=False)
    out = r.save(str(tmp_path / "out"))
    entry = os.path.join(out, "triton", "digits_cnn_bn_un")
    text = open(os.path.join(entry, "config.pbtxt")).read()
    assert 'backend: "openvino"' in text and "max_batch_size: 0" in text and "kind: KIND_CPU" in text
    assert "dims: [ -1, 1, 8, 8 ]" in text and "dynamic_batching" not in text
    for key, value in (("PERFORMANCE_HINT", "LATENCY"), ("INFERENCE_NUM_THREADS", "1"), ("NUM_STREAMS", "1")):
        assert f'key: "{key}"\n  value: {{ string_value: "{value}" }}' in text
    try:
        from normdeploy.package.triton import parse_config

        cfg = parse_config(text)
        assert cfg.backend == "openvino" and cfg.max_batch_size == 0
    except ImportError:
        pass
    # the IR Triton's backend reads computes what model.onnx does, with f32 weights
    xml = os.path.join(entry, "1", "model.xml")
    assert 'element_type="f16"' not in open(xml).read()
    x = np.load(DIGITS)["input"][:4]
    core = ov.Core()
    ir_out = core.compile_model(core.read_model(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    onnx_model = onnx.load(os.path.join(out, "model.onnx"))
    runner = OpenVinoRunner(onnx_model, 1)
    np.testing.assert_array_equal(ir_out, runner.run({runner.input_names[0]: x})[0])
    # what the backend would refuse or mishandle is refused before writing
    sig = onnx_model
    bad = plan_entry(sig, "d", "openvino")
    bad.max_batch_size = 8
    with pytest.raises(EntryError, match="fix the model's batch"):
        check_entry(bad, sig)
    bad = plan_entry(sig, "d", "openvino", instance_kind="KIND_GPU")
    with pytest.raises(EntryError, match="instance kind KIND_GPU"):
        check_entry(bad, sig)
    path = write_repository(str(tmp_path / "repo"), "d", onnx_model, backend="openvino")
    assert sorted(os.listdir(os.path.join(path, "1"))) == ["model.bin", "model.xml"]


def test_serve_refuses_an_openvino_entry_without_the_backend(tmp_path):
    from normdeploy.serve import backend_problem

    env = types.SimpleNamespace(backends=str(tmp_path / "backends"), tritonserver="/x/bin/tritonserver")
    os.makedirs(tmp_path / "backends" / "python")
    why = backend_problem({"name": "m", "backend": "openvino"}, env)
    assert why and "has no openvino backend" in why and "\n" not in why
    assert backend_problem({"name": "m", "backend": "onnxruntime"}, env) is None  # served through a Python variant
    os.makedirs(tmp_path / "backends" / "openvino")
    open(tmp_path / "backends" / "openvino" / "libtriton_openvino.so", "w").close()
    assert backend_problem({"name": "m", "backend": "openvino"}, env) is None


def test_serve_command_refuses_openvino_output(cli, tmp_path, monkeypatch):
    from normdeploy import serve as serve_mod

    out = tmp_path / "o"
    _optimize("digits_cnn_bn_un", bench=False).save(str(out))
    env = types.SimpleNamespace(backends=str(tmp_path / "nb"), tritonserver="/x/bin/tritonserver")
    monkeypatch.setattr(serve_mod.ServeEnv, "find", classmethod(lambda cls, python=None: env))
    r = cli("serve", out, "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
    assert r.exit_code == 3 and "has no openvino backend" in r.stderr and len(r.stderr.strip().splitlines()) == 1
