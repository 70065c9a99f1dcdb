"""recognize_dyt: Dynamic Tanh (``w * tanh(alpha x) + b``) -> normdeploy::DynamicTanh; look-alikes left alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from normdeploy.core import ops
from tests.conftest import randomize
from tests.corpus import dyt as corpus
from tests.corpus import harness
from tests.graph_helpers import GraphBuilder, apply, assert_same_outputs, attrs_of, initializer, node_of, op_counts

PASS = "recognize_dyt"
DYT = f"{ops.DOMAIN}::DynamicTanh"


def _hand_dyt(b: GraphBuilder, x: str, w: np.ndarray, bias: np.ndarray | None, alpha=0.7, alpha_first=True,
              div: bool = False) -> str:
    a = b.const(np.float32(alpha) if np.ndim(alpha) == 0 else np.asarray(alpha, np.float32))
    scaled = b("Div", x, a) if div else (b("Mul", a, x) if alpha_first else b("Mul", x, a))
    t = b("Tanh", scaled, out="t")
    if bias is None:
        return b("Mul", b.const(w), t, out="y")
    return b("Add", b("Mul", t, b.const(w)), b.const(bias), out="y")


def _canonical(after) -> dict:
    node = node_of(after, "DynamicTanh")
    assert node.domain == ops.DOMAIN
    return {"axis": attrs_of(node).get("axis", -1), "alpha": initializer(after, node.input[1]),
            "w": initializer(after, node.input[2]), "b": initializer(after, node.input[3])}


# ----------------------------------------------------------------------------- hand-built spellings (fast)


@pytest.mark.parametrize("alpha_first", [True, False])
def test_channels_last(alpha_first):
    rng = np.random.default_rng(0)
    w, bias = rng.uniform(-2, 2, 8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    b = GraphBuilder(18)
    _hand_dyt(b, b.input("x", ["batch", 3, 8]), w, bias, alpha_first=alpha_first)
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {DYT: 1}
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, [])
    assert result.rewrites[0].spelling == "DynamicTanh channels_last: Mul Tanh Mul Add"
    c = _canonical(after)
    assert c["axis"] == -1 and c["alpha"].tolist() == [np.float32(0.7)], c["alpha"]
    np.testing.assert_array_equal(c["w"], w)
    np.testing.assert_array_equal(c["b"], bias)
    assert_same_outputs(model, after)


def test_channels_first_and_no_bias():
    """``weight[:, None, None]`` on NCHW: axis 1; no bias Add: B = 0."""
    w = np.linspace(-1.5, 2.0, 4).astype(np.float32).reshape(4, 1, 1)
    b = GraphBuilder(18)
    _hand_dyt(b, b.input("x", [2, 4, 3, 3]), w, None)
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {DYT: 1} and result.skipped == []
    c = _canonical(after)
    assert c["axis"] == 1
    np.testing.assert_array_equal(c["w"], w.reshape(-1))
    np.testing.assert_array_equal(c["b"], np.zeros(4, np.float32))
    assert "no bias" in result.rewrites[0].what
    assert_same_outputs(model, after)


def _assert_untouched(model, reason_part: str | None):
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [], result
    if reason_part is None:
        assert (result.matched, result.skipped) == (0, []), result
    else:
        assert len(result.skipped) == 1 and reason_part in result.skipped[0].reason, result.skipped
        assert result.skipped[0].node == "n_t"  # the reason names the Tanh


def test_soft_capping_is_reported_not_rewritten():
    """``c * tanh(x / c)``: a scalar on both sides of the tanh."""
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    t = b("Tanh", b("Div", x, b.const(30.0)), out="t")
    b("Mul", t, b.const(30.0), out="y")
    _assert_untouched(b.model("y"), "one scalar, not DyT's per-channel weight")


def test_divided_input_with_per_channel_weight_is_reported():
    b = GraphBuilder(18)
    _hand_dyt(b, b.input("x", [2, 8]), np.arange(1, 9, dtype=np.float32), np.zeros(8, np.float32), alpha=2.0,
              div=True)
    _assert_untouched(b.model("y"), "divided by a constant")


def test_alpha_not_a_scalar():
    b = GraphBuilder(18)
    _hand_dyt(b, b.input("x", [2, 8]), np.arange(1, 9, dtype=np.float32), np.ones(8, np.float32),
              alpha=np.linspace(0.1, 0.8, 8))
    _assert_untouched(b.model("y"), "is not one scalar")


def test_alpha_not_a_constant():
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    t = b("Tanh", b("Mul", x, b.input("alpha", [1])), out="t")
    b("Add", b("Mul", t, b.const(np.arange(8, dtype=np.float32))), b.const(np.ones(8, np.float32)), out="y")
    _assert_untouched(b.model("y"), None)  # no constant factor: not a scaled tanh, not a candidate


def test_weight_varying_along_two_axes():
    b = GraphBuilder(18)
    _hand_dyt(b, b.input("x", [2, 3, 8]), np.ones((3, 8), np.float32), np.zeros(8, np.float32))
    _assert_untouched(b.model("y"), "varies along more than one axis")


def test_intermediate_read_elsewhere():
    b = GraphBuilder(18)
    _hand_dyt(b, b.input("x", [2, 8]), np.arange(1, 9, dtype=np.float32), np.zeros(8, np.float32))
    b("Neg", "t", out="other")
    _assert_untouched(b.model("y", "other"), "intermediate tensor t has another consumer")


def test_bare_tanh_and_tanh_gelu_are_not_candidates():
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    b("Tanh", x, out="bare")
    inner = b("Add", x, b("Mul", b.const(0.044715), b("Pow", x, b.const(3.0))))
    t = b("Tanh", b("Mul", b.const(float(np.sqrt(2 / np.pi))), inner))
    b("Mul", b("Mul", x, b.const(0.5)), b("Add", t, b.const(1.0)), out="gelu")
    _assert_untouched(b.model("bare", "gelu"), None)


# ----------------------------------------------------------------------------- the corpus (issue 12)


EXPORTS = harness.EXPORTS


def _module(factory):
    torch.manual_seed(0)
    return randomize(factory(), seed=5)


def _pass(result, name: str = PASS) -> dict:
    (p,) = [p for p in result.report["passes"] if p["name"] == name]
    return p


CORPUS = {
    "channels_last": (lambda: corpus.DynamicTanh(16, channels_last=True), (2, 5, 16), "channels_last"),
    "channels_first": (lambda: corpus.DynamicTanh(8, channels_last=False), (2, 8, 4, 4), "channels-first (axis 1)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("way, opset", EXPORTS)
@pytest.mark.parametrize("form", list(CORPUS))
def test_corpus_dynamic_tanh(form, way, opset, tmp_path):
    """The reference module, each way: one DyT before, none after (ort-cpu: Mul Tanh Mul Add), exact vs torch."""
    factory, shape, label = CORPUS[form]
    result = harness.check(_module(factory), (torch.randn(*shape),), way, tmp_path, before={"DynamicTanh": 1},
                           opset=opset)
    p = _pass(result)
    assert [w["spelling"] for w in p["rewrites"]] == [f"DynamicTanh {label}: Mul Tanh Mul Add"] and p["skipped"] == []


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
@pytest.mark.parametrize("block", ["mlp", "conv"])
def test_corpus_dyt_weight_folds_into_the_next_linear_layer(block, way, tmp_path):
    """DyT before a Linear (ViT) or a 1x1 Conv (ConvNeXt stem): W and B fold into it (exact)."""
    factory, shape = {"mlp": (corpus.DyTMlp, (2, 5, 16)), "conv": (corpus.DyTConvStem, (2, 3, 8, 8))}[block]
    result = harness.check(_module(factory), (torch.randn(*shape),), way, tmp_path, before={"DynamicTanh": 1})
    assert len(_pass(result)["rewrites"]) == 1
    fold = _pass(result, "fold_affine_into_linear")
    assert len(fold["rewrites"]) == 1, fold


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_dyt_lowers_to_tensorrt_plugins(way, tmp_path):
    """--target trt-fp16 --lower-only: the DyT plugin node (the full one; the weight-free one once W, B folded)."""
    result = harness.check(_module(lambda: corpus.DynamicTanh(16, channels_last=True)), (torch.randn(2, 5, 16),),
                           way, tmp_path, before={"DynamicTanh": 1}, after={"DynamicTanh": 1}, target="trt-fp16")
    plugins = [n for n in result.optimized.graph.node if n.op_type.startswith("Normdeploy")]
    assert [n.op_type for n in plugins] == ["NormdeployDynamicTanh"]
    assert {a.name: a.s for a in plugins[0].attribute}["plugin_namespace"] == b"normdeploy"
    (tmp_path / "stem").mkdir()
    result = harness.check(_module(corpus.DyTConvStem), (torch.randn(2, 3, 8, 8),), way, tmp_path / "stem",
                           before={"DynamicTanh": 1}, after={"DynamicTanhPlain": 1}, target="trt-fp16")
    assert [n.op_type for n in result.optimized.graph.node if n.op_type.startswith("Normdeploy")] == \
        ["NormdeployDynamicTanhPlain"]


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_look_alikes_are_left_alone(way, tmp_path):
    """Soft-capping is reported with its reason; a bare tanh and tanh-GELU are not candidates; all exact."""
    result = harness.check(_module(corpus.SoftCap), (torch.randn(2, 5, 16),), way, tmp_path, before={})
    p = _pass(result)
    assert p["rewrites"] == [] and len(p["skipped"]) == 1
    assert "one scalar, not DyT's per-channel weight" in p["skipped"][0]["reason"]
    for factory in (corpus.BareTanh, corpus.TanhGelu):
        (tmp_path / factory.__name__).mkdir()
        result = harness.check(_module(factory), (torch.randn(2, 5, 16),), way, tmp_path / factory.__name__,
                               before={})
        p = _pass(result)
        assert (p["matched"], p["rewrites"], p["skipped"]) == (0, [], []), p


@pytest.mark.slow
def test_corpus_dyt_float16(tmp_path):
    """A float16 module (the reference has no upcast): recognized, run in float16; float16 tolerance (2 ulp)."""
    module = _module(lambda: corpus.DynamicTanh(16, channels_last=True)).half()
    harness.check(module, (torch.randn(2, 5, 16).half(),), "dynamo", tmp_path, before={"DynamicTanh": 1},
                  tol=2e-3, tolerance=1e-2)
