"""A model normdeploy rewrites nothing in, and figures that are no measurement (issue 16, item 5).

A model without normalization (a torchvision CNN exported to ONNX: the exporter folded its
BatchNorms) or with every normalization left alone gets the note "nothing to rewrite" with the
reason; ``optimize`` then times nothing (a ratio of identical models is noise) and ``bench`` /
``gate`` mark the identical variants instead of giving them a speedup. The share of
normalization cost left is a figure only in [0, 1] where the floor is measurably faster, and no
interval is given from fewer than ``MIN_ROUNDS_FOR_INTERVAL`` rounds. Hand-built graphs only.
"""
import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import normdeploy
from normdeploy.bench import ModelBench, Variant, markdown, variant_rows
from normdeploy.bench import gate as gate_mod
from normdeploy.bench.timing import MIN_ROUNDS_FOR_INTERVAL, BenchResult, Timing, machine_info
from normdeploy.package import render_markdown
from normdeploy.pipeline import bench_latency

FAST = {"inputs": ("x:4x8",), "seconds": 0.2, "warmup": 2, "threads": 1}


def mlp(norm: str | None = None):
    """x -> MatMul -> Relu -> y; ``norm="output"``: a LayerNorm at the end, a graph output (left alone);
    ``norm="input"``: a LayerNorm before the MatMul + bias Add (its affine folds into the MatMul and its bias)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.full(8, 1.5, np.float32), "g"),
             numpy_helper.from_array(np.full(8, 0.1, np.float32), "b")]

    def ln(i, o):
        return helper.make_node("LayerNormalization", [i, "g", "b"], [o], axis=-1, name="ln")

    if norm == "input":
        nodes = [ln("x", "n"), helper.make_node("MatMul", ["n", "w"], ["t"]),
                 helper.make_node("Add", ["t", "mb"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
        inits.append(numpy_helper.from_array(np.full(8, -0.2, np.float32), "mb"))
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r" if norm else "y"])]
        if norm == "output":
            nodes.append(ln("r", "y"))
    if norm is None:
        inits = inits[:1]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


# ----------------------------------------------------------------------------- optimize

def test_model_without_normalization_says_nothing_to_rewrite_and_is_not_timed():
    r = normdeploy.optimize(mlp(), **FAST)
    why = r.report["nothing_to_rewrite"]
    assert why.startswith("nothing to rewrite: no normalization in the model")
    assert why in r.report["notes"]
    assert r.report["latency"] is None and r.bench is None  # no speedup of identical files, no latency.png
    assert any(n.startswith("latency not measured: nothing was rewritten") for n in r.report["notes"])
    md = render_markdown(r.report)
    assert "nothing to rewrite: no normalization" in md and "not measured" in md and "speedup **" not in md


def test_normalizations_left_alone_are_named_with_their_reasons():
    r = normdeploy.optimize(mlp("output"), **FAST)
    why = r.report["nothing_to_rewrite"]
    assert why.startswith("nothing to rewrite: every normalization found (1 LayerNorm) is left alone")
    assert "y is a graph output" in why and "not on a pre-LN residual stream" in why
    assert r.report["latency"] is None


def test_a_model_with_a_rewrite_is_timed_and_fp16_alone_is_a_change():
    r = normdeploy.optimize(mlp("input"), **FAST)
    assert r.report["nothing_to_rewrite"] is None and r.report["latency"]["speedup"] > 0
    # nothing rewritten, but --fp16 changes the precision: the optimized model differs, so it is timed
    r = normdeploy.optimize(mlp(), fp16=True, **FAST)
    assert r.report["nothing_to_rewrite"] and r.report["latency"]["speedup"] > 0


# ----------------------------------------------------------------------------- bench and gate

def test_bench_marks_identical_variants_and_gate_skips_their_latency():
    mb = normdeploy.benchmark(mlp(), **FAST)
    assert "optimized" in mb.timed and "floor" in mb.timed  # still timed: the run's own noise
    assert mb.speedup("optimized") is None and mb.speedup("floor") is None and mb.speedup_ci("optimized") is None
    assert mb.speedup("original") == 1.0
    rows = {r["variant"]: r for r in variant_rows(mb)}
    assert rows["optimized"]["speedup"] == rows["floor"]["speedup"] == "n/a: identical to the original"
    assert "nothing to rewrite" in rows["optimized"]["status"]
    j = mb.to_json()
    assert j["variants"]["optimized"]["latency"]["speedup"] is None
    assert j["norm_cost_left"] == {"optimized": None} and "nothing to rewrite" in j["norm_cost_left_notes"]["optimized"]
    assert any(n.startswith("nothing to rewrite: no normalization") for n in j["notes"])
    assert "optimized n/a (identical to the original: nothing to rewrite)" in markdown(mb)
    rep = gate_mod.report(mb, gate_mod.Thresholds(min_speedup=1.0))
    checks = {c["name"]: c for c in rep["candidates"]["optimized"]["checks"]}
    assert checks["latency"]["verdict"] == checks["speedup"]["verdict"] == "SKIP"
    assert rep["verdict"] == "PASS" and rep["candidates"]["optimized"]["norm_cost_left"] is None


# ----------------------------------------------------------------------------- figures that are no measurement

def _result(samples: dict[str, np.ndarray]) -> BenchResult:
    return BenchResult({n: Timing(n, list(map(float, s))) for n, s in samples.items()}, 1, machine_info(1))


def _noise(seed: int, n: int = 400, sigma: float = 0.05) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(0.0, sigma, n)


def test_no_interval_from_too_few_rounds():
    assert MIN_ROUNDS_FOR_INTERVAL == 20  # the smallest n whose 95 % median interval leaves out 5 rounds per end
    few = _result({"original": 2.0 * _noise(0, 19), "optimized": _noise(1, 19)})
    lo, hi = few.ratio_interval("original", "optimized")
    assert math.isnan(lo) and math.isnan(hi)
    assert few.interval_note("original", "optimized").startswith("too few rounds for an interval (19 < 20")
    enough = _result({"original": 2.0 * _noise(0, 20), "optimized": _noise(1, 20)})
    lo, hi = enough.ratio_interval("original", "optimized")
    assert lo < enough.ratio("original", "optimized") < hi and enough.interval_note("original", "optimized") is None
    lat = bench_latency(few, 1)
    assert lat["speedup"] == pytest.approx(few.ratio("original", "optimized"))
    assert lat["speedup_note"].startswith("too few rounds")
    mb = ModelBench("m.onnx", "onnx", [], 1, 1, {n: Variant(n, "original" if n == "original" else "candidate", n)
                                                for n in ("original", "optimized")}, few, {}, [])
    cell = {r["variant"]: r for r in variant_rows(mb)}["optimized"]["speedup"]
    assert cell.endswith("x [too few rounds for an interval]")


def test_cost_share_of_a_floor_no_faster_than_the_original_is_no_figure():
    """The case of the issue: original, optimized and floor one model; the share came out 630 %."""
    base = 10.0 * _noise(0)
    rng = np.random.default_rng(3)
    res = _result({"original": base, "optimized": rng.permutation(base) * 1.0053, "floor": rng.permutation(base) * 0.999})
    raw = (res.p50("optimized") - res.p50("floor")) / (res.p50("original") - res.p50("floor"))
    assert raw == pytest.approx(6.3)  # what the old code printed as "normalization cost left 630%"
    assert res.norm_cost_left() is None
    share, why = res.norm_cost_share()
    assert share is None and why.startswith("the floor is not measurably faster than the original")
    assert bench_latency(res, 1)["norm_cost_left"] is None


def test_cost_share_is_a_figure_in_0_1_clamped_only_within_noise():
    orig, floor = 2.0 * _noise(0), _noise(1)
    shuffled = np.random.default_rng(9).permutation(floor)  # same median as the floor, rounds unpaired
    cases = {
        "inside": (1.5 * _noise(2), pytest.approx(0.5, abs=0.05)),
        "a hair below the floor": (shuffled * 0.998, 0.0),  # not measurably faster than the floor: clamped
        "measurably below the floor": (shuffled * 0.8, None),  # the floor bounds nothing here
        "a hair above the original": (np.random.default_rng(8).permutation(orig) * 1.002, 1.0),
        "measurably slower than the original": (orig * 1.5, None),
    }
    for name, (opt, expected) in cases.items():
        res = _result({"original": orig, "optimized": opt, "floor": floor})
        share, why = res.norm_cost_share()
        assert share == expected, (name, share, why)
        if expected is None:
            assert why.startswith("outside [0, 1]"), name
        else:
            assert why is None and 0.0 <= share <= 1.0
    res = _result({"original": orig, "optimized": 1.5 * _noise(2)})
    assert res.norm_cost_share() == (None, "no floor was timed")
