"""recognize_rmsnorm: RMSNorm spellings (decomposed, and ONNX RMSNormalization) -> normdeploy::RMSNorm."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper
from torch import nn

from normdeploy.core import ops
from tests.conftest import randomize
from tests.corpus import harness
from tests.corpus import rmsnorm as corpus
from tests.graph_helpers import (
    OPSETS,
    GraphBuilder,
    apply,
    assert_same_outputs,
    attrs_of,
    export_torch,
    initializer,
    op_counts,
    run_step,
)

PASS = "recognize_rmsnorm"
RMSNORM = f"{ops.DOMAIN}::RMSNorm"
DECOMPOSED = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div", "RMSNormalization"}


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: float32 statistics, torch.rsqrt, weight * x.to(input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DivSqrtRMSNorm(nn.Module):
    """x / sqrt(mean(x * x) + eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(dim)), eps

    def forward(self, x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


def _seeded(cls, *args, **kw):
    torch.manual_seed(0)
    return cls(*args, **kw)


def _check_canonical(model, after, result, eps, gain=None):
    """One RMSNorm node with the expected epsilon and gain; nothing of the decomposed form left."""
    counts = op_counts(after)
    assert counts[RMSNORM] == 1 and not DECOMPOSED & set(counts), counts
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, []), result
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    assert attrs_of(node)["epsilon"] == pytest.approx(eps)
    if gain is not None:
        np.testing.assert_array_equal(initializer(after, node.input[1]), gain)
    assert [f.name for f in after.functions] == ["RMSNorm"]  # the body travels with the model
    assert_same_outputs(model, after)
    return counts


# ----------------------------------------------------------------------------- what torch emits


@pytest.mark.slow
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("opset", OPSETS)
def test_nn_rmsnorm(opset, optimize):
    module = _seeded(nn.RMSNorm, 8, eps=1e-6)
    with torch.no_grad():
        module.weight.normal_()
    model = export_torch(module, torch.randn(2, 3, 8), opset, optimize, key="nn.RMSNorm")
    before = op_counts(model)
    if opset >= 23:
        assert before == {"RMSNormalization": 1}
    else:  # Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul: ONNX Runtime fuses none of it
        assert {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul"} <= set(before) and "Div" not in before
    after, result = apply(model, PASS)
    counts = _check_canonical(model, after, result, 1e-6, module.weight.detach().numpy())
    # the exporter's trailing CastLike(y, x) (a no-op for float32) is outside the norm and stays
    assert set(counts) <= {RMSNORM, "CastLike"}


@pytest.mark.slow
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("opset", OPSETS)
def test_llama_rmsnorm_float32(opset, optimize):
    module = _seeded(LlamaRMSNorm, 8)
    model = export_torch(module, torch.randn(2, 3, 8), opset, optimize, key="LlamaRMSNorm")
    before = op_counts(model)
    if opset >= 23 and optimize:  # onnxscript's optimizer fuses it into the opset-23 op
        assert before == {"RMSNormalization": 1}
    else:  # torch.rsqrt exports as Sqrt + Reciprocal; the float32 -> float32 casts vanish
        assert {"Pow", "Sqrt", "Reciprocal"} <= set(before) and "Cast" not in before
    after, result = apply(model, PASS)
    assert op_counts(after) == {RMSNORM: 1}
    _check_canonical(model, after, result, 1e-6, module.weight.detach().numpy())


@pytest.mark.slow
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("opset", OPSETS)
def test_div_sqrt_rmsnorm(opset, optimize):
    module = _seeded(DivSqrtRMSNorm, 8, eps=1e-5)
    model = export_torch(module, torch.randn(2, 3, 8), opset, optimize, key="DivSqrtRMSNorm")
    assert {"Mul", "ReduceMean", "Sqrt", "Div"} <= set(op_counts(model))
    after, result = apply(model, PASS)
    assert op_counts(after) == {RMSNORM: 1}
    _check_canonical(model, after, result, 1e-5, module.weight.detach().numpy())


@pytest.mark.slow
@pytest.mark.parametrize("opset", [20, 23])
def test_llama_rmsnorm_float16_keeps_float32_statistics(opset):
    module = _seeded(LlamaRMSNorm, 8).half()
    model = export_torch(module, torch.randn(2, 3, 8, dtype=torch.float16), opset, optimize=True)
    if opset >= 23:  # onnxscript's optimizer fuses the float16 spelling into RMSNormalization(stash_type=1)
        assert op_counts(model) == {"RMSNormalization": 1}
    else:
        assert {"Cast", "Pow", "Sqrt", "Reciprocal"} <= set(op_counts(model))
    after, result = apply(model, PASS)
    assert len(result.rewrites) == 1 and result.skipped == []
    # Cast(x, float32) -> RMSNorm(G = ones, float32) -> Cast(float16) -> Mul(weight): the gain stays outside
    assert op_counts(after) == {"Cast": 2, RMSNORM: 1, "Mul": 1}
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    np.testing.assert_array_equal(initializer(after, node.input[1]), np.ones(8, np.float32))
    assert_same_outputs(model, after, rtol=1e-3, atol=1e-3)  # float16 outputs


@pytest.mark.slow
def test_torchscript_export_div_one_and_noop_casts():
    """TorchScript at opset 17: axes attribute, rsqrt as Div(1, Sqrt), Cast(float32) on float32 tensors."""
    module = _seeded(LlamaRMSNorm, 8)
    model = export_torch(module, torch.randn(2, 3, 8), 17, dynamo=False)
    before = op_counts(model)
    assert before["Cast"] == 2 and before["Div"] == 1 and "Reciprocal" not in before
    after, result = apply(model, PASS)
    # both no-op Casts (float32 to float32: the upcast and the cast back) are looked through: the norm reads
    # the tensor before the upcast, and the Casts, read by nothing else, are gone
    assert op_counts(after) == {RMSNORM: 1}
    _check_canonical(model, after, result, 1e-6, module.weight.detach().numpy())


# ----------------------------------------------------------------------------- hand-built spellings


def hand_rmsnorm(b: GraphBuilder, x: str, *, square: str = "pow", inverse: str = "pow_half", axes=(-1,), eps=1e-6,
                 gain_before=None, gain_after=None, out: str = "y") -> dict[str, str]:
    t = {}
    if gain_before is not None:
        num = b("Mul", b.const(gain_before), x)
    else:
        num = x
    sq = b("Pow", x, b.const(2.0)) if square == "pow" else b("Mul", x, x)
    t["ms"] = b.reduce_mean(sq, axes, out="ms")
    t["s"] = b("Add", eps if isinstance(eps, str) else b.const(eps), t["ms"], out="s")
    y_out = out if gain_after is None else None
    if inverse == "pow_half":
        y = b("Mul", b("Pow", t["s"], b.const(-0.5)), num, out=y_out)
    elif inverse == "reciprocal":
        y = b("Mul", num, b("Reciprocal", b("Sqrt", t["s"])), out=y_out)
    else:
        y = b("Div", num, b("Sqrt", t["s"]), out=y_out)
    if gain_after is not None:
        y = b("Mul", y, b.const(gain_after), out=out)
    t["y"] = y
    return t


@pytest.mark.parametrize("opset", [17, 18, 23])
@pytest.mark.parametrize("inverse", ["pow_half", "reciprocal", "div"])
def test_hand_built_spellings(inverse, opset):
    g = np.linspace(-2, 2, 8).astype(np.float32)
    b = GraphBuilder(opset)
    hand_rmsnorm(b, b.input("x", [2, 3, 8]), inverse=inverse, square="mul", eps=1e-4, gain_after=g)
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {RMSNORM: 1}
    _check_canonical(model, after, result, 1e-4, g)


def test_gain_before_the_product():
    g = np.linspace(0.5, 1.5, 8).astype(np.float32)
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [4, 8]), inverse="div", gain_before=g)
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-6, g)


def test_gains_before_and_after_multiply_once():
    g1 = np.linspace(0.5, 1.5, 8).astype(np.float32)
    g2 = np.float32(3.0)  # a scalar gain broadcasts over the last axis
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [4, 8]), inverse="reciprocal", gain_before=g1, gain_after=g2)
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-6, (g1.astype(np.float64) * 3.0).astype(np.float32))


def test_no_gain_gives_unit_gain():
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", ["batch", 8]))
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-6, np.ones(8, np.float32))


def test_layernorm_is_left_to_recognize_layernorm():
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    d = b("Sub", x, b.reduce_mean(x, (-1,)), out="d")
    hand_rmsnorm(b, d, inverse="div")  # RMSNorm of x - mean(x) is a LayerNorm
    model = b.model("y")
    after, result = apply(model, PASS)
    assert after is model and (result.matched, result.rewrites, result.skipped) == (0, [], [])
    after, result = apply(model, "recognize_layernorm")
    assert op_counts(after) == {"LayerNormalization": 1}


def test_rms_normalization_scalar_scale():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 3, 8]), b.const(np.float32(0.5)), out="y", epsilon=1e-3)
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-3, np.full(8, 0.5, np.float32))


def test_rms_normalization_runtime_scale_is_passed_through():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 3, 8]), b.input("g", [8]), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    assert list(node.input) == ["x", "g"] and attrs_of(node)["epsilon"] == pytest.approx(1e-5)  # the ONNX default
    assert_same_outputs(model, after)


# ----------------------------------------------------------------------------- refusals


def _assert_untouched(model, reason_part: str):
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [], result
    assert len(result.skipped) == 1 and reason_part in result.skipped[0].reason, result.skipped


def test_epsilon_not_constant():
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [2, 8]), eps=b.input("eps", []))
    _assert_untouched(b.model("y"), "epsilon is not a constant")


@pytest.mark.parametrize("axes", [(0,), (-2, -1)])
def test_reduction_neither_over_the_last_axis_nor_channels_first(axes):
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [2, 3, 8]), axes=axes)
    _assert_untouched(b.model("y"), "neither the last axis only nor axis 1")


@pytest.mark.parametrize("shared", ["ms", "s"])
def test_intermediate_with_another_consumer(shared):
    b = GraphBuilder(18)
    t = hand_rmsnorm(b, b.input("x", [2, 8]), inverse="reciprocal")
    b("Neg", t[shared], out="other")
    _assert_untouched(b.model("y", "other"), f"intermediate tensor {shared} has another consumer (Neg n_other)")


def test_dynamic_last_dimension_without_gain():
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [2, "width"]))
    _assert_untouched(b.model("y"), "normalized dimension of x is not static")


def test_gain_that_is_not_per_channel_stays_outside():
    b = GraphBuilder(18)
    t = hand_rmsnorm(b, b.input("x", [2, 3, 8]), inverse="div", out="core")
    b("Mul", t["y"], b.const(np.arange(3, dtype=np.float32).reshape(3, 1)), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {RMSNORM: 1, "Mul": 1} and result.skipped == []
    assert_same_outputs(model, after)


def test_incomplete_spelling_is_reported():
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    ms = b.reduce_mean(b("Mul", x, x), (-1,))
    b("Div", x, b("Add", ms, b.const(1e-6)), out="y")  # no Sqrt
    _assert_untouched(b.model("y"), "mean of squares is not followed by a recognized RMSNorm spelling")


def test_rms_normalization_over_two_axes():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 3, 8]), b.const(np.ones((3, 8))), out="y", axis=-2)
    _assert_untouched(b.model("y"), "RMSNormalization over axis -2")


def test_rms_normalization_float16_keeps_the_stash_type_semantics():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 8], np.float16), b.const(np.linspace(-1, 1, 8), np.float16), out="y")
    model = b.model("y", dtype=np.float16)
    after, result = apply(model, PASS)
    assert op_counts(after) == {"Cast": 2, RMSNORM: 1, "Mul": 1} and len(result.rewrites) == 1
    assert_same_outputs(model, after, rtol=1e-3, atol=1e-3)  # float16 outputs


def test_rms_normalization_stash_type_not_float32():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 8]), b.const(np.ones(8)), out="y", stash_type=0)
    _assert_untouched(b.model("y"), "stash_type 0 is not float32")


# ----------------------------------------------------------------------------- the corpus (issue 12)

#: module factory, input shape, RMSNorm count, the label the recorded spelling contains ("" when none)
RMSNORM_SPELLINGS = {
    "bzhang rms_norm (tensorflow)": (lambda: corpus.BzhangRMSNormTF(16), (2, 5, 16), 1, ""),
    "bzhang rms_norm with offset": (lambda: corpus.BzhangRMSNormTF(16, bias=True), (2, 5, 16), 1, ""),
    "bzhang rln (theano)": (lambda: corpus.BzhangRLN(16), (6, 16), 1, "keepdims=0 + Unsqueeze"),
    "timm RmsNorm": (lambda: corpus.TimmRmsNorm(16), (2, 5, 16), 1, ""),
    "timm RmsNorm2d": (lambda: corpus.TimmRmsNorm2d(8), (2, 8, 4, 4), 1, "channels-first"),
    "timm convnext_atto_rms block": (lambda: corpus.TimmConvNeXtRmsBlock(), (2, 3, 32, 32), 2, "channels-first"),
    "timm convnext_atto_rms block, conv_mlp off": (lambda: corpus.TimmConvNeXtRmsBlock(conv_mlp=False),
                                                   (2, 3, 32, 32), 2, ""),
    "HF LlamaRMSNorm": (lambda: corpus.hf_classes()["llama"](16), (2, 5, 16), 1, ""),
    "HF T5LayerNorm": (lambda: corpus.hf_classes()["t5"](16), (2, 5, 16), 1, ""),
    "HF GemmaRMSNorm (1 + w)": (lambda: corpus.hf_classes()["gemma"](16), (2, 5, 16), 1, ""),
}


def _corpus_module(factory, dtype=torch.float32):
    torch.manual_seed(0)
    return randomize(factory(), seed=5).to(dtype)


def _pass_report(result, name: str) -> dict:
    (p,) = [p for p in result.report["passes"] if p["name"] == name]
    return p


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 23])
@pytest.mark.parametrize("way", harness.WAYS)
@pytest.mark.parametrize("spelling", list(RMSNORM_SPELLINGS))
def test_corpus_rmsnorm_spellings(spelling, way, opset, tmp_path):
    """Each spelling, exported each way: n RMSNorm before and after (lowered for ONNX Runtime), exact vs torch."""
    factory, shape, n, label = RMSNORM_SPELLINGS[spelling]
    module = _corpus_module(factory)
    result = harness.check(module, (torch.randn(*shape),), way, tmp_path, before={"RMSNorm": n},
                           after={"RMSNorm": n}, opset=opset)
    p = _pass_report(result, "recognize_rmsnorm")
    assert len(p["rewrites"]) == n and p["skipped"] == [], p
    assert all(label in r["spelling"] and "ReduceMean" in r["spelling"] for r in p["rewrites"]), p["rewrites"]
    lowered = {n.op_type for n in result.optimized_model.graph}
    assert lowered & {"SimplifiedLayerNormalization", "RMSNormalization"} and "Sqrt" not in lowered, lowered


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
@pytest.mark.parametrize("spelling", ["bzhang rms_norm (tensorflow)", "bzhang rln (theano)", "timm RmsNorm2d",
                                      "HF GemmaRMSNorm (1 + w)", "HF T5LayerNorm"])
def test_corpus_rmsnorm_spellings_make_trt_plugins(spelling, way, tmp_path):
    """``--target trt-fp16 --lower-only``: each spelling becomes one NormdeployRMSNorm plugin node."""
    factory, shape, n, _ = RMSNORM_SPELLINGS[spelling]
    result = harness.check(_corpus_module(factory), (torch.randn(*shape),), way, tmp_path,
                           before={"RMSNorm": n}, after={"RMSNorm": n}, target="trt-fp16")
    plugins = [node for node in result.optimized_model.graph if node.domain == ops.DOMAIN]
    assert [node.op_type for node in plugins] == ["NormdeployRMSNorm"] * n, [node.op_type for node in plugins]


#: bzhangGo/rmsnorm's variants: factory, the canonical node's variant attributes, what the recorded spelling says
RMSNORM_VARIANTS = {
    "bzhang RMSNorm (torch), eps outside the root": (lambda: corpus.BzhangRMSNorm(16), {"eps_outside": 1},
                                                    "eps outside the root: ReduceL2"),
    "bzhang RMSNorm (torch), eps outside, with offset": (lambda: corpus.BzhangRMSNorm(16, bias=True),
                                                        {"eps_outside": 1}, "eps outside the root: ReduceL2"),
    "bzhang partial RMSNorm (torch), p = 0.5": (lambda: corpus.BzhangRMSNorm(16, p=0.5),
                                                {"eps_outside": 1, "partial": 8}, "partial: the statistic of 8 of 16"),
    "bzhang partial RMSNorm (torch), p = 1": (lambda: corpus.BzhangRMSNorm(16, p=1.0), {"eps_outside": 1},
                                              "eps outside the root: ReduceL2"),
    "bzhang partial rms_norm (tensorflow), p = 0.5": (lambda: corpus.BzhangRMSNormTF(16, p=0.5), {"partial": 8},
                                                      "partial: the statistic of 8 of 16"),
    "bzhang partial rms_norm (tensorflow), p = 0.3, offset": (lambda: corpus.BzhangRMSNormTF(16, p=0.3, bias=True),
                                                              {"partial": 4}, "partial: the statistic of 4 of 16"),
}


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 23])
@pytest.mark.parametrize("way", harness.WAYS)
@pytest.mark.parametrize("spelling", list(RMSNORM_VARIANTS))
def test_corpus_rmsnorm_variants_are_recognized_and_exact(spelling, way, opset, tmp_path):
    """eps outside the root and partial RMSNorm, each way: one RMSNorm with the variant attributes, lowered for
    ONNX Runtime to standard ops (no fused op computes them), exact against torch."""
    factory, variant, label = RMSNORM_VARIANTS[spelling]
    result = harness.check(_corpus_module(factory), (torch.randn(2, 5, 16),), way, tmp_path, before={"RMSNorm": 1},
                           opset=opset)
    p = _pass_report(result, "recognize_rmsnorm")
    assert len(p["rewrites"]) == 1 and p["skipped"] == [], p
    assert label in p["rewrites"][0]["spelling"], p["rewrites"]
    shown = ", ".join(f"{k}={v}" for k, v in variant.items())
    assert p["rewrites"][0]["what"].endswith(f"({shown})"), p["rewrites"]  # the canonical node's attributes
    lowered = {n.op_type for n in result.optimized_model.graph}
    assert not lowered & {"SimplifiedLayerNormalization", "RMSNormalization"}, lowered
    assert ("Slice" in lowered) == ("partial" in variant) and ("ReduceL2" in lowered) == ("eps_outside" in variant)


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_rmsnorm_variant_is_a_function_body_exact_and_reported_by_inspect(way, tmp_path):
    """The canonical model (the variant body travels with it) is exact against torch, and inspect names the kind
    and the spelling matched."""
    import normdeploy
    from normdeploy.core.passes import PassContext, run_steps
    from normdeploy.options import Options
    from normdeploy.pipeline import CANONICALIZE, prepare
    from tests.conftest import ort_run

    module = _corpus_module(lambda: corpus.BzhangRMSNorm(16, p=0.5))
    path = harness.export(module, (torch.randn(2, 5, 16),), way, str(tmp_path), opset=18)
    info = normdeploy.inspect(path, opset=18) if way == "pt2" else normdeploy.inspect(path)
    (entry,) = info["normalizations"]
    assert entry["kind"] == "RMSNorm" and entry["recognized_by"] == PASS, entry
    assert "eps outside the root, partial: the statistic of 8 of 16 channels" in entry["spelling"], entry
    canonical = prepare(path, Options.from_flat(opset=18)).original
    run_steps(canonical, CANONICALIZE, PassContext())
    (node,) = [n for n in canonical.graph if n.domain == ops.DOMAIN]
    assert ops.rms_variant(node) == {"eps_outside": 1, "partial": 8}
    assert [f.name for f in canonical.functions.values()] == ["RMSNorm"]
    for seed in range(2):
        feed = harness.random_inputs((torch.randn(2, 5, 16),), seed, batch=3)
        assert harness.max_rel_err(harness.torch_outputs(module, feed)[0], ort_run(canonical, *feed)[0]) <= 1e-5


def _plugin_variant_fields(node) -> dict:
    return {a: node.attributes[a].value for a in ("eps_outside", "partial")}


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
@pytest.mark.parametrize("spelling", ["bzhang RMSNorm (torch), eps outside the root",
                                      "bzhang partial RMSNorm (torch), p = 0.5",
                                      "bzhang partial rms_norm (tensorflow), p = 0.5"])
def test_corpus_rmsnorm_variants_make_trt_plugins_with_the_variant_fields(spelling, way, tmp_path):
    """``--target trt-fp16 --lower-only``: one NormdeployRMSNorm plugin node whose ``eps_outside`` / ``partial``
    fields are the canonical node's (its kernel computes both), no standard-op statistic left."""
    factory, variant, _ = RMSNORM_VARIANTS[spelling]
    result = harness.check(_corpus_module(factory), (torch.randn(2, 5, 16),), way, tmp_path,
                           before={"RMSNorm": 1}, after={"RMSNorm": 1}, target="trt-fp16")
    graph = result.optimized_model.graph
    (plugin,) = [n for n in graph if n.domain == ops.DOMAIN]
    assert plugin.op_type == "NormdeployRMSNorm", plugin.op_type
    assert _plugin_variant_fields(plugin) == {"eps_outside": 0, "partial": 0, **variant}, plugin.attributes
    assert not {"ReduceL2", "ReduceMean", "Slice"} & {n.op_type for n in graph}
    (w,) = _pass_report(result, "lower_to_trt_plugins")["rewrites"]
    shown = ", ".join(f"{k}={v}" for k, v in variant.items())
    assert w["what"] == f"RMSNorm ({shown}) -> NormdeployRMSNorm", w


@pytest.mark.slow
@pytest.mark.parametrize("spelling", list(RMSNORM_VARIANTS))
def test_corpus_rmsnorm_variant_trt_plugins_emulated_are_exact_against_torch(spelling, tmp_path):
    """``--target trt-fp32 --lower-only``: the lowered graph run on CPU both ways the plugins are emulated (the
    Triton kernel under the interpreter through ``onnx.reference``, and ``plugins_as_functions`` on ONNX
    Runtime) equals eager torch to max rel err 1e-5, at the example batch and batch 3."""
    from onnx.reference import ReferenceEvaluator

    from normdeploy.lower.plugins.emulate import PLUGIN_OPS
    from normdeploy.verify.precision import plugins_as_functions
    from tests.conftest import ort_run

    factory, variant, _ = RMSNORM_VARIANTS[spelling]
    module = _corpus_module(factory)
    args = (torch.randn(2, 5, 16),)
    result = harness.check(module, args, "dynamo", tmp_path, before={"RMSNorm": 1}, after={"RMSNorm": 1},
                           target="trt-fp32")
    lowered = result.optimized_model
    (plugin,) = [n for n in lowered.graph if n.domain == ops.DOMAIN]
    assert _plugin_variant_fields(plugin) == {"eps_outside": 0, "partial": 0, **variant}
    proto = ir.to_proto(lowered)
    names = [i.name for i in proto.graph.input]
    on_ort = plugins_as_functions(lowered)
    for seed, batch in enumerate((None, 3)):
        feed = harness.random_inputs(args, seed, batch)
        ref = harness.torch_outputs(module, feed)[0]
        kernel = ReferenceEvaluator(proto, new_ops=PLUGIN_OPS).run(None, dict(zip(names, feed)))[0]
        assert harness.max_rel_err(ref, kernel) <= 1e-5, f"kernel emulation, batch {batch}"
        assert harness.max_rel_err(ref, ort_run(on_ort, *feed)[0]) <= 1e-5, f"plugins_as_functions, batch {batch}"


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_rmsnorm_variant_gain_folds_into_the_next_linear(way, tmp_path):
    """partial, eps-outside RMSNorm then a Linear: the gain folds into the Linear (it multiplies every channel after
    the division, as any RMSNorm gain), the variant keeps unit gain, exact against torch."""
    torch.manual_seed(0)
    module = randomize(nn.Sequential(corpus.BzhangRMSNorm(16, p=0.25), nn.Linear(16, 8)), seed=3)
    result = harness.check(module, (torch.randn(2, 5, 16),), way, tmp_path, before={"RMSNorm": 1})
    (w,) = _pass_report(result, "fold_affine_into_linear")["rewrites"]
    lowered = [n.op_type for n in result.optimized_model.graph]
    assert "Slice" in lowered and lowered.count("Mul") == 1, lowered  # k^-1/2 only: the gain Mul is gone


@pytest.mark.slow
@pytest.mark.parametrize("way", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["t5", "gemma", "llama"])
def test_corpus_hf_rmsnorm_float16_keeps_float32_statistics(name, way, tmp_path):
    """A half-precision HF norm: the statistic stays in float32 (Cast(x, float32) feeds the canonical node)."""
    module = _corpus_module(lambda: corpus.hf_classes()[name](16), torch.float16)
    result = harness.check(module, (torch.randn(2, 5, 16, dtype=torch.float16),), way, tmp_path,
                           before={"RMSNorm": 1}, after={"RMSNorm": 1}, tol=2e-3)
    (node,) = [n for n in result.optimized_model.graph if n.op_type in ("SimplifiedLayerNormalization",
                                                                         "RMSNormalization")]
    assert node.inputs[0].dtype == ir.DataType.FLOAT, node.inputs[0].dtype


# ----------------------------------------------------------------------------- hand-built: issue 12 spellings


def test_channels_first_rmsnorm_becomes_transposed_canonical_node():
    """timm rms_norm2d: mean of squares over axis 1 of NCHW, gain [1, C, 1, 1] -> Transpose, RMSNorm, Transpose."""
    gain = np.linspace(-1.5, 1.5, 4).astype(np.float32)
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 3, 3])
    t = hand_rmsnorm(b, x, axes=(1,), inverse="reciprocal", out="normed")
    b("Mul", t["y"], b.const(gain.reshape(1, 4, 1, 1)), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    counts = op_counts(after)
    assert counts[RMSNORM] == 1 and counts["Transpose"] == 2 and not {"ReduceMean", "Sqrt"} & set(counts), counts
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, []), result
    assert result.rewrites[0].spelling.startswith("channels-first: ")
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    np.testing.assert_array_equal(initializer(after, node.input[1]), gain)
    assert_same_outputs(model, after)


def test_gemma_one_plus_w_gain_before_constant_folding():
    """Gemma's ``(1 + w)`` as the opset-17 export writes it, Add(Cast(w), 1): folded into G."""
    w = np.linspace(-0.5, 0.5, 8).astype(np.float32)
    b = GraphBuilder(17)
    x = b.input("x", [2, 3, 8])
    t = hand_rmsnorm(b, x, inverse="reciprocal", out="normed")
    b("Mul", t["y"], b("Add", b("Cast", b.const(w), to=1), b.const(1.0)), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-6, gain=1.0 + w)


def test_keepdims_off_then_unsqueeze_is_recognized():
    """bzhang's Theano rln, ``(x * x).mean(1)[:, None]``: ReduceMean(keepdims=0), Unsqueeze back."""
    b = GraphBuilder(18)
    x = b.input("x", [6, 8])
    ms = b("ReduceMean", b("Mul", x, x), b.const(np.array([1], np.int64), np.int64), keepdims=0)
    back = b("Unsqueeze", ms, b.const(np.array([1], np.int64), np.int64))
    b("Div", x, b("Sqrt", b("Add", back, b.const(1e-5))), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-5)
    assert result.rewrites[0].spelling.startswith("keepdims=0 + Unsqueeze: ")


@pytest.mark.parametrize("form", ["sqrt_mean", "l2_mul", "l2_div"])
def test_eps_outside_the_root_becomes_the_variant(form):
    """``x / (sqrt(mean(x^2)) + eps) * g``, or the 2-norm scaled by d^-1/2 (Mul) or divided by sqrt(d):
    RMSNorm(eps_outside=1), exact."""
    g = np.linspace(-1.5, 1.5, 8).astype(np.float32)
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, 8])
    if form == "sqrt_mean":
        rms = b("Sqrt", b.reduce_mean(b("Mul", x, x), [-1]))
    else:
        l2 = b("ReduceL2", x, b.const(np.array([-1], np.int64), np.int64), keepdims=1)
        rms = b("Mul", l2, b.const(8 ** -0.5)) if form == "l2_mul" else b("Div", l2, b.const(np.sqrt(8.0)))
    normed = b("Div", x, b("Add", rms, b.const(0.05)))
    b("Mul", normed, b.const(g), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    assert attrs_of(node)["eps_outside"] == 1 and attrs_of(node).get("partial", 0) == 0
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, []), result
    np.testing.assert_array_equal(initializer(after, node.input[1]), g)
    assert op_counts(after) == {RMSNORM: 1}
    assert_same_outputs(model, after)


def test_two_norm_scaled_by_the_wrong_count_is_left_alone_with_the_reason():
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, 8])
    l2 = b("ReduceL2", x, b.const(np.array([-1], np.int64), np.int64), keepdims=1)
    b("Div", x, b("Add", b("Mul", l2, b.const(0.5)), b.const(1e-8)), out="y")  # 0.5 is 4^-1/2, not 8^-1/2
    _assert_untouched(b.model("y"), "not an RMS")


@pytest.mark.parametrize("spelling", ["slice", "split"])
def test_partial_rmsnorm_becomes_the_variant(spelling):
    """The statistic of the first 3 of 8 channels divides all 8 (bzhang's p): RMSNorm(partial=3), exact."""
    g = np.linspace(0.5, 1.5, 8).astype(np.float32)
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, 8])
    i64 = lambda v: b.const(np.array(v, np.int64), np.int64)  # noqa: E731
    if spelling == "slice":
        part = b("Slice", x, i64([0]), i64([3]), i64([-1]))
    else:
        b.nodes.append(helper.make_node("Split", [x, i64([3, 5])], ["part", "rest"], name="n_split", axis=-1))
        part = "part"
    ms = b.reduce_mean(b("Mul", part, part), [-1])
    b("Mul", b("Mul", x, b.const(g)), b("Reciprocal", b("Sqrt", b("Add", ms, b.const(1e-3)))), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    assert attrs_of(node)["partial"] == 3 and attrs_of(node).get("eps_outside", 0) == 0
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, []), result
    assert "partial: the statistic of 3 of 8 channels" in result.rewrites[0].spelling
    assert op_counts(after) == {RMSNORM: 1}
    assert_same_outputs(model, after)
    lowered, _ = run_step(after, "lower_canonical_to_standard_ops")
    assert not [n for n in lowered.graph.node if n.domain == ops.DOMAIN]
    assert_same_outputs(model, lowered)


@pytest.mark.parametrize("start,axis,why", [(1, -1, "does not take the leading channels"),
                                            (0, 1, "not the normalized last axis")])
def test_a_slice_that_is_not_leading_channels_is_left_alone_with_the_reason(start, axis, why):
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, 8])
    i64 = lambda v: b.const(np.array(v, np.int64), np.int64)  # noqa: E731
    part = b("Slice", x, i64([start]), i64([start + 2]), i64([axis]))
    ms = b.reduce_mean(b("Mul", part, part), [-1])
    b("Mul", x, b("Reciprocal", b("Sqrt", b("Add", ms, b.const(1e-8)))), out="y")
    _assert_untouched(b.model("y"), why)


def test_partial_rmsnorm_over_no_channel_is_left_alone_with_the_reason():
    """p = 0: the statistic of an empty slice (NaN in the module) is not normalized; said so."""
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, 8])
    i64 = lambda v: b.const(np.array(v, np.int64), np.int64)  # noqa: E731
    part = b("Slice", x, i64([0]), i64([0]), i64([-1]))
    ms = b.reduce_mean(b("Mul", part, part), [-1])
    b("Mul", x, b("Reciprocal", b("Sqrt", b("Add", ms, b.const(1e-8)))), out="y")
    _assert_untouched(b.model("y"), "covers no channel")
