"""recognize_scalenorm: ``g x / max(||x||, eps)`` in its spellings -> normdeploy::ScaleNorm."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from normdeploy.core import ops
from tests.conftest import randomize
from tests.corpus import harness
from tests.corpus import scalenorm as corpus
from tests.graph_helpers import GraphBuilder, apply, assert_same_outputs, attrs_of, initializer, node_of, op_counts

PASS = "recognize_scalenorm"
SCALENORM = f"{ops.DOMAIN}::ScaleNorm"
D = 8


def _axes(b: GraphBuilder, axes=(-1,)) -> str:
    return b.const(list(axes), np.int64)


def _l2(b: GraphBuilder, x: str, form: str, axes=(-1,)) -> str:
    """The norm; its statistic (the node a reason names) is called ``stat``."""
    if form == "ReduceL2":
        return b("ReduceL2", x, _axes(b, axes), keepdims=1, out="stat")
    squares = b("Pow", x, b.const(2.0)) if form == "sum_pow" else b("Mul", x, x)
    reduce = "ReduceMean" if form == "rms" else "ReduceSum"
    return b("Sqrt", b(reduce, squares, _axes(b, axes), keepdims=1, out="stat"))


def _canonical(after) -> tuple[float, float]:
    node = node_of(after, "ScaleNorm")
    assert node.domain == ops.DOMAIN
    return float(initializer(after, node.input[1]).reshape(-1)[0]), attrs_of(node)["epsilon"]


def _check(model, gain: float, eps: float, spelling: str):
    after, result = apply(model, PASS)
    assert op_counts(after) == {SCALENORM: 1}, op_counts(after)
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, [])
    assert result.rewrites[0].spelling == spelling
    g, e = _canonical(after)
    assert g == pytest.approx(gain, rel=1e-6) and e == pytest.approx(eps, rel=1e-6)
    assert_same_outputs(model, after)
    return after


# ----------------------------------------------------------------------------- hand-built spellings (fast)


def test_reference_spelling_torch_norm_clamp():
    """tnq177: ``x * (g / torch.norm(x).clamp(min=eps))``."""
    b = GraphBuilder(18)
    x = b.input("x", ["batch", 3, D])
    c = b("Clip", _l2(b, x, "ReduceL2"), b.const(1e-5))
    b("Mul", x, b("Div", b.const(np.float32(2.5)), c), out="y")
    _check(b.model("y"), 2.5, 1e-5, "ScaleNorm torch.norm + Clip: ReduceL2 Clip Div Mul")


@pytest.mark.parametrize("square", ["sum_pow", "sum_mul"])
def test_sqrt_of_sum_of_squares_with_max(square):
    b = GraphBuilder(18)
    x = b.input("x", [2, D])
    c = b("Max", _l2(b, x, square), b.const(1e-5))
    b("Div", b("Mul", b.const(np.float32(3.0)), x), c, out="y")
    sq = "Pow" if square == "sum_pow" else "Mul"
    _check(b.model("y"), 3.0, 1e-5, f"ScaleNorm sqrt of a sum of squares + Max: {sq} ReduceSum Sqrt Max Mul Div")


def test_scaled_norm_folds_the_factor_into_gain_and_eps():
    """x-transformers / mmpose: ``x / (norm * d^-0.5).clamp(eps) * g`` = ScaleNorm(G = g sqrt(d), eps sqrt(d))."""
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, D])
    c = b("Clip", b("Mul", _l2(b, x, "ReduceL2"), b.const(D ** -0.5)), b.const(1e-5))
    b("Mul", b("Div", x, c), b.const(np.float32(1.5)), out="y")
    _check(b.model("y"), 1.5 / np.float32(D ** -0.5), 1e-5 / np.float32(D ** -0.5),
           "ScaleNorm torch.norm + Clip: ReduceL2 Mul Clip Div Mul")


def test_root_of_mean_of_squares_with_clamp():
    """sqrt(mean(x^2)) = ||x|| / sqrt(d): a clamped RMS is a ScaleNorm (an RMSNorm adds eps inside the root)."""
    b = GraphBuilder(18)
    x = b.input("x", [2, D])
    b("Div", x, b("Clip", _l2(b, x, "rms"), b.const(1e-6)), out="y")
    _check(b.model("y"), np.sqrt(D), 1e-6 * np.sqrt(D), "ScaleNorm root of a mean of squares + Clip: Mul ReduceMean Sqrt "
           "Clip Div")


def test_per_channel_gain_stays_outside():
    """A ``[d]`` gain is not ScaleNorm's scalar: ScaleNorm(G = 1), the Mul stays after it."""
    b = GraphBuilder(18)
    x = b.input("x", [2, D])
    c = b("Clip", _l2(b, x, "ReduceL2"), b.const(1e-5))
    b("Mul", b("Div", x, c), b.const(np.linspace(0.5, 2, D)), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {SCALENORM: 1, "Mul": 1} and result.skipped == []
    assert _canonical(after) == (1.0, pytest.approx(1e-5))
    assert_same_outputs(model, after)


def _assert_untouched(model, reason_part: str):
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [], result
    assert len(result.skipped) == 1 and reason_part in result.skipped[0].reason, result.skipped
    assert result.skipped[0].node == "n_stat"  # the reason names the statistic


def test_clip_with_an_upper_bound():
    b = GraphBuilder(18)
    x = b.input("x", [2, D])
    b("Div", x, b("Clip", _l2(b, x, "ReduceL2"), b.const(1e-5), b.const(10.0)), out="y")
    _assert_untouched(b.model("y"), "has an upper bound")


def test_norm_not_over_the_last_axis():
    b = GraphBuilder(18)
    x = b.input("x", [2, D, 3])
    b("Div", x, b("Clip", _l2(b, x, "ReduceL2", axes=(1,)), b.const(1e-5)), out="y")
    _assert_untouched(b.model("y"), "not the last axis only")


def test_eps_not_a_constant():
    b = GraphBuilder(18)
    x = b.input("x", [2, D])
    b("Div", x, b("Max", _l2(b, x, "ReduceL2"), b.input("eps", [])), out="y")
    _assert_untouched(b.model("y"), "eps is not a constant")


def test_intermediate_read_elsewhere():
    b = GraphBuilder(18)
    x = b.input("x", [2, D])
    c = b("Clip", _l2(b, x, "ReduceL2"), b.const(1e-5), out="c")
    b("Div", x, c, out="y")
    b("Neg", c, out="other")
    _assert_untouched(b.model("y", "other"), "intermediate tensor c has another consumer")


@pytest.mark.parametrize("form", ["ReduceL2", "sum_pow"])
def test_l2_normalization_without_eps_is_reported(form):
    """``x / x.norm()`` (CLIP's embeddings): no eps, not a ScaleNorm; said so, naming the statistic."""
    b = GraphBuilder(18)
    x = b.input("x", [2, D])
    b("Div", x, _l2(b, x, form), out="y")
    _assert_untouched(b.model("y"), "no eps clamp")


# ----------------------------------------------------------------------------- the corpus (issue 12)


EXPORTS = harness.EXPORTS


def _module(factory):
    torch.manual_seed(0)
    return randomize(factory(), seed=7)


def _pass(result, name: str = PASS) -> dict:
    (p,) = [p for p in result.report["passes"] if p["name"] == name]
    return p


CORPUS = {
    "tnq177 ScaleNorm": (lambda: corpus.ScaleNorm(16 ** 0.5), "ScaleNorm torch.norm + Clip: ReduceL2 Clip Div Mul"),
    "sqrt-sum + torch.max": (lambda: corpus.SqrtSumScaleNorm(16 ** 0.5),
                             "ScaleNorm sqrt of a sum of squares + Max: Pow ReduceSum Sqrt Mul Max Div"),
    "scaled norm": (lambda: corpus.ScaledNormScaleNorm(16), "ScaleNorm torch.norm + Clip: ReduceL2 Mul Clip Div Mul"),
}


@pytest.mark.slow
@pytest.mark.parametrize("way, opset", EXPORTS)
@pytest.mark.parametrize("spelling", list(CORPUS))
def test_corpus_scalenorm(spelling, way, opset, tmp_path):
    """Each spelling, each way: one ScaleNorm before, none after (ort-cpu), exact vs torch; the spelling recorded."""
    factory, want = CORPUS[spelling]
    result = harness.check(_module(factory), (torch.randn(2, 5, 16),), way, tmp_path, before={"ScaleNorm": 1},
                           opset=opset)
    p = _pass(result)
    assert [w["spelling"] for w in p["rewrites"]] == [want] and p["skipped"] == [], p


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_scalenorm_gain_folds_into_the_feed_forward(way, tmp_path):
    """The paper's pre-norm sublayer: the scalar gain folds into the first Linear (G = 1 left)."""
    result = harness.check(_module(corpus.ScaleNormFFN), (torch.randn(2, 5, 16),), way, tmp_path,
                           before={"ScaleNorm": 1})
    assert len(_pass(result)["rewrites"]) == 1
    assert len(_pass(result, "fold_affine_into_linear")["rewrites"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_scalenorm_lowers_to_tensorrt_plugin(way, tmp_path):
    module = _module(lambda: corpus.ScaleNorm(16 ** 0.5))
    result = harness.check(module, (torch.randn(2, 5, 16),), way, tmp_path, before={"ScaleNorm": 1},
                           after={"ScaleNorm": 1}, target="trt-fp16")
    plugins = [n for n in result.optimized.graph.node if n.op_type.startswith("Normdeploy")]
    assert [n.op_type for n in plugins] == ["NormdeployScaleNorm"]
    attrs = {a.name: a for a in plugins[0].attribute}
    assert attrs["plugin_namespace"].s == b"normdeploy"
    assert attrs["scale"].f == pytest.approx(float(module.scale.detach())) and attrs["epsilon"].f == pytest.approx(1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_l2_normalize_is_left_alone_with_a_reason(way, tmp_path):
    result = harness.check(_module(corpus.L2Normalize), (torch.randn(2, 5, 16),), way, tmp_path, before={})
    p = _pass(result)
    assert p["rewrites"] == [] and len(p["skipped"]) == 1 and "no eps clamp" in p["skipped"][0]["reason"], p


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["tnq177 ScaleNorm", "sqrt-sum + torch.max"])
def test_corpus_scalenorm_float16(spelling, tmp_path):
    """float16 modules: recognized; where the exporter sums the squares in float32 (Cast, ReduceSum, Cast) the
    canonical node runs in float32 between Casts. float16 tolerance (2 ulp)."""
    factory, _ = CORPUS[spelling]
    result = harness.check(_module(factory).half(), (torch.randn(2, 5, 16).half(),), "dynamo", tmp_path,
                           before={"ScaleNorm": 1}, tol=2e-3, tolerance=1e-2)
    (spelled,) = [w["spelling"] for w in _pass(result)["rewrites"]]
    if spelling == "sqrt-sum + torch.max":
        assert "Cast ReduceSum Cast" in spelled, spelled
