"""optimize --autotune (normdeploy/autotune.py): the choice by measurement, its report, and where the
session-level choice goes (the sessions normdeploy times, the Triton entry)."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from normdeploy import autotune, pipeline
from normdeploy.bench.timing import BenchResult, Timing
from normdeploy.core.errors import InputError
from normdeploy.nn import PowerNorm, RMSNorm
from normdeploy.options import Options
from tests.conftest import MODELS


class Small(torch.nn.Module):
    """Linear -> PowerNorm(4 groups of 16) -> Linear -> RMSNorm -> Linear, every norm parameter random."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)
        self.pn, self.rms = PowerNorm(64, groups=4), RMSNorm(64)
        with torch.no_grad():
            self.pn.weight.copy_(torch.rand(64, generator=g) + 0.5)
            self.pn.bias.copy_(torch.randn(64, generator=g))
            self.pn.running_phi.copy_(torch.rand(64, generator=g) + 0.5)
            self.rms.weight.copy_(torch.rand(64, generator=g) + 0.5)

    def forward(self, x):
        return self.c(self.rms(self.b(self.pn(self.a(x)))))


OPTIONS = Options.from_flat(inputs=("input:2x32",), threads=1, autotune=True, autotune_seconds=1.0)


@pytest.fixture(scope="module")
def prepared():
    return pipeline.prepare(Small().eval(), OPTIONS)


def fake_timer(medians: dict[str, float], rounds: int = 60, seen: list | None = None):
    """A timing function giving each runner the median it has in ``medians`` (1.0 ms otherwise), 1 % noise."""
    def timer(runners, feed, seconds, warmup, progress=None, sessions=1):
        if seen is not None:
            seen.append(sorted(runners))
        rng = np.random.default_rng(0)
        timings = {n: Timing(n, list(medians.get(n, 1.0) * (1 + 0.01 * rng.standard_normal(rounds))))
                   for n in runners}
        return BenchResult(timings, 1, {"cpu": "fake"})
    return timer


def test_fastest_exact_candidate_is_chosen_and_all_are_listed(prepared):
    tuning = autotune.tune(prepared, OPTIONS, "ort-cpu",
                           timer=fake_timer({"graph_optimization=basic": 0.80, "graph_optimization=extended": 0.90}))
    names = [c["name"] for c in tuning.report["candidates"]]
    for axis in autotune.AXES:  # every axis applies to this model: every other value is a candidate
        for v in axis.values:
            if v != getattr(getattr(OPTIONS, autotune.FLAT[axis.field]), axis.field):
                assert f"{axis.name}={v}" in names
    assert tuning.chosen.name == "graph_optimization=basic"
    assert tuning.options.ort.graph_optimization == "basic" and not tuning.options.tune.autotune
    basic = next(c for c in tuning.report["candidates"] if c["name"] == "graph_optimization=basic")
    assert basic["speedup_vs_default"] == pytest.approx(1.25, rel=0.02)
    assert basic["speedup_ci95"][0] > 1.0 and basic["exact"]
    assert tuning.report["flags"] == "--ort-graph-optimization basic"
    assert not tuning.report["kept_default"]
    assert all(c["exact"] for c in tuning.report["candidates"] if c["timed"])


def test_an_inexact_candidate_is_never_timed_or_chosen(prepared, monkeypatch):
    real = pipeline.lower_variant

    def corrupted(rewritten, ctx):  # rms_op=standard computes something else: a gain scaled by 1.5
        model, results = real(rewritten, ctx)
        if ctx.ort_rms_op == "standard":
            for v in model.graph.initializers.values():
                if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size > 8:
                    v.const_value = ir.tensor(v.const_value.numpy() * 1.5, name=v.name)
                    break
        return model, results

    monkeypatch.setattr(pipeline, "lower_variant", corrupted)
    seen = []
    tuning = autotune.tune(prepared, OPTIONS, "ort-cpu", timer=fake_timer({"rms_op=standard": 0.5}, seen=seen))
    bad = next(c for c in tuning.candidates if c.name == "rms_op=standard")
    assert bad.exact is False and not bad.timed and "not exact" in bad.note
    assert all("rms_op=standard" not in names for names in seen)
    assert tuning.chosen.name != "rms_op=standard"


def test_ties_keep_the_default(prepared):
    tuning = autotune.tune(prepared, OPTIONS, "ort-cpu", timer=fake_timer({}))
    assert tuning.chosen.name == "default" and tuning.report["kept_default"]
    assert tuning.report["flags"] == "" and "no candidate is measurably faster" in tuning.report["why"]
    assert tuning.options == Options.from_flat(OPTIONS, autotune=False)
    timed = [c for c in tuning.report["candidates"] if c["timed"] and c["name"] != "default"]
    assert timed and all(c["speedup_ci95"][0] <= 1.0 <= c["speedup_ci95"][1] for c in timed)


def test_too_few_rounds_keep_the_default(prepared):
    tuning = autotune.tune(prepared, OPTIONS, "ort-cpu", timer=fake_timer({"graph_optimization=basic": 0.5}, rounds=8))
    assert tuning.chosen.name == "default" and "too few rounds" in tuning.report["why"]


def test_winners_on_two_axes_are_combined_and_timed_again(prepared):
    seen = []
    medians = {"graph_optimization=basic": 0.9, "short_row=0": 0.85,
               "graph_optimization=basic+short_row=0": 0.7, "short_row=0+graph_optimization=basic": 0.7}
    tuning = autotune.tune(prepared, OPTIONS, "ort-cpu", timer=fake_timer(medians, seen=seen))
    assert len(seen) == 2 and len(seen[1]) == 3 and "default" in seen[1]
    assert tuning.chosen.settings == {"short_row": 0, "graph_optimization": "basic"}
    assert tuning.options.ort.short_row == 0 and tuning.options.ort.graph_optimization == "basic"


def test_candidates_that_give_the_same_model_are_merged(prepared):
    candidates, _, _ = autotune.build_candidates(prepared, OPTIONS, "ort-cpu")
    by = {c.name: c for c in candidates}
    # the groups have 16 channels: below the default 64 they are decomposed already, as with 1 << 20
    assert by["short_row=1048576"].same_as == "default" and by["short_row=1048576"].model is None
    assert by["short_row=0"].same_as is None
    ops = {n.op_type for n in by["short_row=0"].model.graph}
    assert "SimplifiedLayerNormalization" in ops


def test_axes_that_have_nothing_to_choose_say_why():
    prepared = pipeline.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).eval(),
                                Options.from_flat(inputs=("input:2x8",)))
    candidates, notes, _ = autotune.build_candidates(prepared, OPTIONS, "ort-cpu")
    by = {c.name: c for c in candidates}
    assert set(by) == {"default", "graph_optimization=basic", "graph_optimization=extended", "ort_fusions=True"}
    assert by["ort_fusions=True"].same_as == "default"  # no residual Add reads into the LayerNorm: nothing to fuse
    assert any("rms_op" in n and "no RMSNorm" in n for n in notes)
    assert any("short_row" in n and "no GroupScaling" in n for n in notes)


class Residual(torch.nn.Module):
    """x + Linear(x) -> LayerNorm (random gain and bias): the residual Add a Skip*Normalization fuses."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.normal_()

    def forward(self, x):
        return self.ln(x + self.fc(x))


def test_ort_fusions_is_a_candidate_and_reproduced_by_its_switch():
    prepared = pipeline.prepare(Residual().eval(), Options.from_flat(inputs=("input:2x8x16",)))
    candidates, _, _ = autotune.build_candidates(prepared, OPTIONS, "ort-cpu")
    fused = {c.name: c for c in candidates}["ort_fusions=True"]
    assert fused.same_as is None
    assert any(n.op_type == "SkipLayerNormalization" for n in fused.model.graph)
    assert autotune.flags(fused.settings) == "--ort-fusions"
    assert autotune.flags({"ort_fusions": False, "short_row": 0}) == "--no-ort-fusions --ort-short-row 0"


def test_trt_targets_are_refused():
    with pytest.raises(InputError, match="--autotune.*runs on TensorRT"):
        autotune.optimize(Small(), Options.from_flat(OPTIONS, target="trt-fp16", lower_only=True))


def test_openvino_target_is_refused():
    pytest.importorskip("openvino")
    with pytest.raises(InputError, match="--autotune.*runs on OpenVINO"):
        autotune.optimize(Small(), Options.from_flat(OPTIONS, target="openvino"))


def test_the_level_reaches_the_sessions(monkeypatch):
    made = []

    class Recording(pipeline.OrtRunner):
        def __init__(self, model, *a, **kw):
            super().__init__(model, *a, **kw)
            made.append(self.session.get_session_options().graph_optimization_level)

    import onnxruntime as ort

    monkeypatch.setattr(pipeline, "OrtRunner", Recording)
    res = pipeline.optimize(Small().eval(), Options.from_flat(inputs=("input:2x32",), graph_optimization="basic",
                                                              seconds=0.2, warmup=1, sessions=2))
    # per timed session: original (ONNX Runtime's default), optimized and floor (the level asked for)
    assert made.count(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) == 2 * 2
    assert made.count(ort.GraphOptimizationLevel.ORT_ENABLE_ALL) == 2
    assert res.report["ort_session"]["graph_optimization_level"] == "ORT_ENABLE_BASIC"
    assert "graph optimization level basic" in res.report["latency"]["method"]


def test_runner_level():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for level, enum in (("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                        ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)):
        r = pipeline.OrtRunner(model, graph_optimization=level)
        assert r.session.get_session_options().graph_optimization_level == enum


def _parse(path: str):
    pytest.importorskip("tritonclient.grpc")
    from normdeploy.package.triton import parse_config

    with open(path) as f:
        return parse_config(f.read())


@pytest.mark.parametrize("level,triton", [("basic", -1), ("extended", 1), ("disable", 2), ("all", 0)])
def test_triton_entry_carries_the_level(tmp_path, level, triton):
    res = pipeline.optimize(Small().eval(), Options.from_flat(inputs=("input:2x32",), graph_optimization=level,
                                                              bench=False))
    out = res.save(str(tmp_path / "out"))
    (name,) = os.listdir(os.path.join(out, "triton"))
    config = _parse(os.path.join(out, "triton", name, "config.pbtxt"))
    # Triton's onnxruntime backend: -1 basic, 1 extended, 2 disable, no graph block (0) = ORT_ENABLE_ALL
    assert config.optimization.graph.level == triton
    assert config.optimization.HasField("graph") == (level != "all")
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["ort_session"]["graph_optimization"] == level


def test_python_backend_entry_carries_the_level(tmp_path):
    res = pipeline.optimize(Small().eval(), Options.from_flat(inputs=("input:2x32",), graph_optimization="basic",
                                                              bench=False))
    out = res.save(str(tmp_path / "out"), triton_backend="python")
    d = os.path.join(out, "triton", os.listdir(os.path.join(out, "triton"))[0])
    config = _parse(os.path.join(d, "config.pbtxt"))
    assert config.parameters["graph_optimization_level"].string_value == "basic"
    assert not config.optimization.HasField("graph")


def test_a_graph_level_only_on_the_onnxruntime_backend():
    from normdeploy.package.triton import EntryError, check_entry, plan_entry

    sig = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])]))
    with pytest.raises(EntryError, match="onnxruntime backend only"):
        check_entry(plan_entry(sig, "m", "python", graph_level=-1), sig)
    with pytest.raises(EntryError, match="none the onnxruntime backend knows"):
        check_entry(plan_entry(sig, "m", "onnxruntime", graph_level=3), sig)


def test_decomposed_rms_op_is_exact(prepared):
    ctx = pipeline.context("ort-cpu", Options.from_flat(OPTIONS, rms_op="decomposed"), prepared.specs)
    out = pipeline.transform(prepared.original, ctx).optimized
    assert not {n.op_type for n in out.graph.node} & {"SimplifiedLayerNormalization", "RMSNormalization"}
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    ref = pipeline.OrtRunner(prepared.original).run({"input": x})[0]
    got = pipeline.OrtRunner(out).run({"input": x})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.slow
def test_end_to_end_vit_rmsnorm(tmp_path):
    from click.testing import CliRunner

    from normdeploy.cli import main

    out = tmp_path / "out"
    r = CliRunner().invoke(main, [
        "optimize", os.path.join(MODELS, "vit_rmsnorm.pt"), "--autotune", "--autotune-seconds", "1",
        "--seconds", "0.5", "--threads", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    tuned = report["autotune"]
    names = {c["name"] for c in tuned["candidates"]}
    assert {"default", "graph_optimization=basic", "rms_op=standard"} <= names
    assert any("short_row" in n and "not tuned" in n for n in tuned["notes"])  # vit_rmsnorm has no GroupScaling
    timed = [c for c in tuned["candidates"] if c["timed"]]
    assert len(timed) >= 2 and all(c["exact"] and c["p50_ms"] > 0 for c in timed)
    assert tuned["chosen"] in names and "## Autotune" in (out / "report.md").read_text()
    # the flags reproduce the chosen model without --autotune
    again = pipeline.optimize(os.path.join(MODELS, "vit_rmsnorm.pt"),
                              Options.from_flat(threads=1, bench=False, **tuned["chosen_settings"]))
    again_out = again.save(str(tmp_path / "again"))
    with open(os.path.join(again_out, "model.onnx"), "rb") as f:
        assert f.read() == (out / "model.onnx").read_bytes()
    assert report["ort_session"]["graph_optimization"] == tuned["chosen_settings"].get("graph_optimization", "all")
