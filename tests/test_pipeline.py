"""The whole pipeline on the shipped example (BN + UN), every input format, determinism."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from normdeploy import load as load_mod
from normdeploy.pipeline import Options, optimize
from tests.conftest import MODELS

EXAMPLE = os.path.join(MODELS, "digits_cnn_bn_un.pt")
DATA = os.path.join(MODELS, "digits_test.npz")


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    from click.testing import CliRunner

    from normdeploy.cli import main

    out = tmp_path_factory.mktemp("e2e") / "out"
    r = CliRunner().invoke(main, ["optimize", EXAMPLE, "--data", DATA, "--out", str(out), "--bench-seconds", "1",
                                  "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


def test_output_directory_layout(example_run):
    out, _ = example_run
    for f in ("original.onnx", "model.onnx", "report.json", "report.md", "latency.png",
              "triton/digits_cnn_bn_un/config.pbtxt", "triton/digits_cnn_bn_un/1/model.onnx"):
        assert (out / f).is_file(), f
    onnx.checker.check_model(onnx.load(out / "model.onnx"), full_check=True)
    assert not [p for p in os.listdir(out.parent) if p.startswith(".out.")]


def test_report_has_every_field_of_design_section_7(example_run):
    out, printed = example_run
    r = json.loads((out / "report.json").read_text())
    assert printed["out"] == str(out) and printed["target"] == r["target"] == "ort-cpu"
    for p in r["passes"]:
        assert {"name", "exact", "rewrites", "skipped"} <= set(p)
    assert r["norm_nodes"]["before"] == {"BatchNorm": 1, "UnifiedNorm": 1}
    assert r["norm_nodes"]["after"] == {}
    acc = r["accuracy"]
    assert acc["max_abs_err"] <= 1e-5 and acc["max_rel_err"] <= 1e-5 and acc["cosine_min"] > 0.999999
    assert acc["top1_agreement"] == 1.0 and acc["data"]["samples"] == 360
    lat = r["latency"]
    assert lat["speedup"] == pytest.approx(lat["original"]["p50_ms"] / lat["optimized"]["p50_ms"])
    assert lat["original"]["runs"] == lat["optimized"]["runs"] == lat["floor"]["runs"] >= 10
    assert lat["machine"]["onnxruntime"] and lat["threads"] >= 1
    assert "speedup" in (out / "report.md").read_text()


def test_report_accuracy_is_measured_not_assumed(example_run):
    """Recompute the error of model.onnx against original.onnx on the real digits."""
    from tests.conftest import ort_run

    out, printed = example_run
    x = np.load(DATA)["input"]
    (ref,) = ort_run(onnx.load(out / "original.onnx"), x)
    (opt,) = ort_run(onnx.load(out / "model.onnx"), x)
    assert np.abs(ref - opt).max() == pytest.approx(printed["accuracy"]["data"]["max_abs_err"], rel=1e-6, abs=1e-12)
    torch_model = load_mod.load(EXAMPLE).obj
    with torch.no_grad():
        labels = np.load(DATA)["label"]
        assert (torch_model(torch.from_numpy(x)).numpy().argmax(1) == labels).mean() == (opt.argmax(1) == labels).mean()


def test_triton_config_parses(example_run):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out, _ = example_run
    cfg = text_format.Parse((out / "triton/digits_cnn_bn_un/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "digits_cnn_bn_un" and cfg.backend == "onnxruntime" and cfg.max_batch_size > 0
    assert list(cfg.input[0].dims) == [1, 8, 8]


def test_same_input_gives_byte_identical_model(tmp_path):
    opts = Options.from_flat(bench=False)
    a = optimize(EXAMPLE, opts).optimized.SerializeToString()
    b = optimize(EXAMPLE, opts).optimized.SerializeToString()
    assert a == b


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_every_input_format(tmp_path, fmt):
    module = load_mod.load(EXAMPLE).obj
    x = torch.from_numpy(np.load(DATA)["input"][:2])
    path = tmp_path / f"m.{fmt}"
    if fmt == "onnx":
        from tests.conftest import export_module

        onnx.save(export_module(module, (1, 1, 8, 8)), path)
    elif fmt == "pt2":
        torch.export.save(torch.export.export(module, (x,)), path)
    else:
        torch.jit.save(torch.jit.trace(module, x), path)
    inputs = () if fmt != "torchscript" else ("input:1x1x8x8",)
    res = optimize(str(path), Options.from_flat(bench=False, inputs=inputs, data=DATA))
    assert res.report["input"]["kind"] == {"onnx": "onnx", "pt2": "exported_program", "torchscript": "torchscript"}[fmt]
    assert res.report["accuracy"]["max_abs_err"] <= 1e-5
    assert res.report["accuracy"]["top1_agreement"] == 1.0
    assert "BatchNorm" not in res.report["norm_nodes"]["after"]
    if res.report["export_fidelity"]:
        assert res.report["export_fidelity"]["max_rel_err"] <= 1e-5


def test_input_file_is_never_modified(tmp_path):
    import hashlib

    before = hashlib.sha256(open(EXAMPLE, "rb").read()).hexdigest()
    optimize(EXAMPLE, Options.from_flat(bench=False))
    assert hashlib.sha256(open(EXAMPLE, "rb").read()).hexdigest() == before


def test_the_bench_stage_times_the_rounds_an_interval_needs_past_a_short_budget(tmp_path):
    """At 2 threads every timed call waits out the handover (~60 ms), so a 0.2 s budget holds a handful of
    rounds; the bench stage goes on to MIN_ROUNDS_FOR_INTERVAL, and the report has an interval, not a note."""
    from click.testing import CliRunner

    from normdeploy.bench.timing import MIN_ROUNDS_FOR_INTERVAL
    from normdeploy.cli import main

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["optimize", EXAMPLE, "--data", DATA, "--out", str(out), "--bench-seconds", "0.2",
                                  "--threads", "2", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    lat = json.loads((out / "report.json").read_text())["latency"]
    assert lat["threads"] == 2 and lat["original"]["runs"] >= MIN_ROUNDS_FOR_INTERVAL
    assert lat["speedup_note"] is None and lat["speedup_ci95"][0] <= lat["speedup"] <= lat["speedup_ci95"][1]
