"""recognize_powernorm: GroupScaling1D (repeat_interleave spelling) -> normdeploy::GroupScaling, joined with the
running-phi affine after it (a UnifiedNorm) into normdeploy::PowerNorm."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from normdeploy.core import ops
from tests.conftest import randomize
from tests.corpus import harness
from tests.corpus import powernorm as corpus
from tests.graph_helpers import GraphBuilder, apply, assert_same_outputs, attrs_of, initializer, node_of, op_counts

PASS = "recognize_powernorm"
GS = f"{ops.DOMAIN}::GroupScaling"
PN = f"{ops.DOMAIN}::PowerNorm"
T, B, C = 5, 2, 16
GS_SPELLING = "sIncerass/powernorm GroupScaling1D: Reshape Mul ReduceMean Unsqueeze {} Reshape Reshape Add Sqrt Div"


def _ints(b: GraphBuilder, v) -> str:
    return b.const(list(v), np.int64)


def _hand_group_scaling(b: GraphBuilder, x: str, groups: int, eps=1e-5, repeat: str = "Expand",
                        unsqueeze_axis: int = -1) -> str:
    """GroupScaling1D as the dynamo exporter writes it (constant shapes): Reshape to groups, mean of squares,
    repeat_interleave as Unsqueeze + Expand (or Tile) + Reshape, Reshape back, Add eps, Sqrt, Div."""
    cg = C // groups
    grouped = b("Reshape", x, _ints(b, [T, B, groups, cg]))
    ms = b.reduce_mean(b("Mul", grouped, grouped), [3], out="ms")
    u = b("Unsqueeze", ms, _ints(b, [unsqueeze_axis]), out="u")
    if repeat == "Expand":
        rep = b("Expand", u, _ints(b, [1, 1, 1, 1, cg]))
    else:
        rep = b("Tile", u, _ints(b, [1, 1, 1, 1, cg]))
    spread = b("Reshape", b("Reshape", rep, _ints(b, [T, B, groups, cg])), _ints(b, [T, B, C]))
    return b("Div", x, b("Sqrt", b("Add", spread, b.const(np.float32(eps)))), out="gs")


# ----------------------------------------------------------------------------- GroupScaling (fast)


@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("repeat", ["Expand", "Tile"])
def test_group_scaling(groups, repeat):
    b = GraphBuilder(18)
    _hand_group_scaling(b, b.input("x", [T, B, C]), groups, repeat=repeat)
    model = b.model("gs")
    after, result = apply(model, PASS)
    assert op_counts(after) == {GS: 1}
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, [])
    assert result.rewrites[0].spelling == GS_SPELLING.format(repeat)
    a = attrs_of(node_of(after, "GroupScaling"))
    assert a["groups"] == groups and a["epsilon"] == pytest.approx(1e-5)
    assert_same_outputs(model, after)


def _assert_untouched(model, reason_part: str):
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [], result
    assert len(result.skipped) == 1 and reason_part in result.skipped[0].reason, result.skipped
    assert result.skipped[0].node == "n_ms"  # the reason names the mean of squares


def test_unsqueeze_not_a_new_last_axis():
    b = GraphBuilder(18)
    _hand_group_scaling(b, b.input("x", [T, B, C]), 4, unsqueeze_axis=3)
    _assert_untouched(b.model("gs"), "does not add one new last axis")


def test_eps_not_a_constant():
    b = GraphBuilder(18)
    x = b.input("x", [T, B, C])
    grouped = b("Reshape", x, _ints(b, [T, B, 4, 4]))
    ms = b.reduce_mean(b("Mul", grouped, grouped), [3], out="ms")
    u = b("Unsqueeze", ms, _ints(b, [-1]), out="u")
    spread = b("Reshape", b("Reshape", b("Expand", u, _ints(b, [1, 1, 1, 1, 4])), _ints(b, [T, B, 4, 4])),
               _ints(b, [T, B, C]))
    b("Div", x, b("Sqrt", b("Add", spread, b.input("eps", []))), out="gs")
    _assert_untouched(b.model("gs"), "epsilon is not a constant")


def test_statistic_read_elsewhere():
    b = GraphBuilder(18)
    _hand_group_scaling(b, b.input("x", [T, B, C]), 4)
    b("Neg", "ms", out="other")
    _assert_untouched(b.model("gs", "other"), "intermediate tensor ms has another consumer (Neg n_other)")


def test_shape_of_the_statistic_feeding_the_expand_is_no_reader():
    """The dynamo exporter computes the Expand shape from Shape(mean): that Shape only feeds the match."""
    b = GraphBuilder(18)
    x = b.input("x", [T, B, C])
    grouped = b("Reshape", x, _ints(b, [T, B, 4, 4]))
    ms = b.reduce_mean(b("Mul", grouped, grouped), [3], out="ms")
    u = b("Unsqueeze", ms, _ints(b, [-1]), out="u")
    shape = b("Concat", b("Shape", ms), _ints(b, [4]), axis=0)
    spread = b("Reshape", b("Reshape", b("Expand", u, shape), _ints(b, [T, B, 4, 4])), _ints(b, [T, B, C]))
    b("Div", x, b("Sqrt", b("Add", spread, b.const(np.float32(1e-5)))), out="gs")
    model = b.model("gs")
    after, result = apply(model, PASS)
    assert op_counts(after) == {GS: 1} and result.skipped == [], result
    assert_same_outputs(model, after)


# ----------------------------------------------------------------------------- the join into PowerNorm (fast)


def test_group_scaling_and_running_phi_affine_join_into_powernorm():
    """MaskPowerNorm's eval layout: GroupScaling, permute to [B, C, T], reshape, unsqueeze, the running-phi affine
    (folded divisor), reshape and permute back: one PowerNorm on the last axis, the layout ops kept after it."""
    rng = np.random.default_rng(3)
    phi = rng.uniform(0.2, 2.0, C).astype(np.float32)
    w = (rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    s = np.sqrt(phi.astype(np.float64) + 1e-5).astype(np.float32)
    b = GraphBuilder(18)
    gs = _hand_group_scaling(b, b.input("x", [T, B, C]), 4)
    t = b("Unsqueeze", b("Reshape", b("Transpose", gs, perm=[1, 2, 0]), _ints(b, [B, C, -1])), _ints(b, [-1]))
    d = b("Div", t, b.const(s.reshape(1, -1, 1, 1)))
    a = b("Add", b("Mul", b.const(w.reshape(1, -1, 1, 1)), d), b.const(bias.reshape(1, -1, 1, 1)))
    b("Transpose", b("Reshape", a, _ints(b, [B, C, T])), perm=[2, 0, 1], out="y")
    model = b.model("y")
    mid, un = apply(model, "recognize_unified_norm")
    assert op_counts(mid)[f"{ops.DOMAIN}::UnifiedNorm"] == 1 and un.skipped == []
    after, result = apply(mid, PASS)
    counts = op_counts(after)
    assert counts[PN] == 1 and GS not in counts and f"{ops.DOMAIN}::UnifiedNorm" not in counts, counts
    assert [r.spelling for r in result.rewrites] == [
        GS_SPELLING.format("Expand"),
        "PowerNorm eval, the running-phi affine a UnifiedNorm: GroupScaling Transpose Reshape Unsqueeze UnifiedNorm"]
    node = node_of(after, "PowerNorm")
    assert attrs_of(node)["groups"] == 4 and attrs_of(node)["epsilon"] == pytest.approx(1e-5)
    # Phi = s^2 + 0 (the folded affine's eps) - 1e-5 (GroupScaling's): the running phi back, to rounding
    np.testing.assert_allclose(initializer(after, node.input[1]), phi, rtol=1e-5)
    np.testing.assert_array_equal(initializer(after, node.input[2]), w)
    np.testing.assert_array_equal(initializer(after, node.input[3]), bias)
    assert_same_outputs(model, after)


# ----------------------------------------------------------------------------- the corpus (issue 12)


EXPORTS = harness.EXPORTS


def _module(factory):
    torch.manual_seed(0)
    return randomize(factory(), seed=13)


def _pass(result, name: str = PASS) -> dict:
    (p,) = [p for p in result.report["passes"] if p["name"] == name]
    return p


#: how each export writes repeat_interleave's repeat
REPEAT = {"dynamo": "Expand", "pt2": "Expand", "torchscript": "Tile"}
#: what ort-cpu lowers GroupScaling to: one RMSNorm kernel over rows of C/G channels (16), or, for rows
#: shorter than lower/ort.py's SHORT_ROW (4 channels), the decomposed ops
AFTER = {1: {"RMSNorm": 1}, 4: {}}


@pytest.mark.slow
@pytest.mark.parametrize("way, opset", EXPORTS)
@pytest.mark.parametrize("groups", [1, 4])
def test_corpus_group_scaling_1d(groups, way, opset, tmp_path):
    """GroupScaling1D, each way: one GroupScaling before, lowered after, exact vs torch; the spelling recorded."""
    result = harness.check(_module(lambda: corpus.GroupScaling1D(group_num=groups)), (torch.randn(T, B, C),), way,
                           tmp_path, before={"GroupScaling": 1}, after=AFTER[groups], opset=opset)
    p = _pass(result)
    assert [w["spelling"] for w in p["rewrites"]] == [GS_SPELLING.format(REPEAT[way])] and p["skipped"] == [], p


#: TorchScript's exporter writes MaskPowerNorm wrong: its shape inference of repeat_interleave's Tile bakes a
#: wrong length into the ``reshape(B, C, -1)`` after it, so the exported original itself fails on ONNX Runtime
#: at the example's own shape (torch 2.13); see test_torchscript_export_of_maskpowernorm_is_broken
POWERNORM_WAYS = ("dynamo", "pt2")


@pytest.mark.slow
@pytest.mark.parametrize("way, opset", [(w, o) for w, o in EXPORTS if w in POWERNORM_WAYS])
@pytest.mark.parametrize("groups", [1, 4])
def test_corpus_mask_powernorm(groups, way, opset, tmp_path):
    """MaskPowerNorm eval: the GroupScaling and the running-phi affine (a UnifiedNorm) join into one PowerNorm."""
    result = harness.check(_module(lambda: corpus.MaskPowerNorm(C, group_num=groups)), (torch.randn(T, B, C),), way,
                           tmp_path, before={"PowerNorm": 1}, after=AFTER[groups], opset=opset)
    assert len(_pass(result, "recognize_unified_norm")["rewrites"]) == 1
    p = _pass(result)
    assert [w["spelling"] for w in p["rewrites"]] == [
        GS_SPELLING.format(REPEAT[way]),
        "PowerNorm eval, the running-phi affine a UnifiedNorm: GroupScaling Transpose Reshape Unsqueeze UnifiedNorm"], p


@pytest.mark.slow
@pytest.mark.parametrize("way", POWERNORM_WAYS)
def test_corpus_powernorm_affine_folds_into_the_next_linear_layer(way, tmp_path):
    """A pre-norm FFN with MaskPowerNorm: w / sqrt(phi + eps) and b fold into fc1; GroupScaling stays (ort-cpu:
    lowered) and is the TensorRT plugin."""
    module = _module(corpus.PowerNormFFN)
    result = harness.check(module, (torch.randn(T, B, C),), way, tmp_path, before={"PowerNorm": 1})
    assert len(_pass(result, "fold_affine_into_linear")["rewrites"]) == 1
    (tmp_path / "trt").mkdir()
    result = harness.check(module, (torch.randn(T, B, C),), way, tmp_path / "trt", before={"PowerNorm": 1},
                           after={"GroupScaling": 1}, target="trt-fp16")
    plugins = [n for n in result.optimized.graph.node if n.op_type.startswith("Normdeploy")]
    assert [n.op_type for n in plugins] == ["NormdeployGroupScaling"]
    attrs = {a.name: a for a in plugins[0].attribute}
    assert attrs["groups"].i == 4 and attrs["plugin_namespace"].s == b"normdeploy"


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_group_scaling_lowers_to_tensorrt_plugin(way, tmp_path):
    result = harness.check(_module(lambda: corpus.GroupScaling1D(group_num=4)), (torch.randn(T, B, C),), way,
                           tmp_path, before={"GroupScaling": 1}, after={"GroupScaling": 1}, target="trt-fp16")
    plugins = [n for n in result.optimized.graph.node if n.op_type.startswith("Normdeploy")]
    assert [n.op_type for n in plugins] == ["NormdeployGroupScaling"]
    assert {a.name: a.i for a in plugins[0].attribute if a.name == "groups"} == {"groups": 4}


@pytest.mark.slow
def test_torchscript_export_of_maskpowernorm_is_broken(tmp_path):
    """Documents why POWERNORM_WAYS leaves TorchScript out: the exported original fails on ONNX Runtime at the
    example's own shape. When torch fixes its exporter this fails: add the way to POWERNORM_WAYS."""
    import onnxruntime as ort

    module = _module(lambda: corpus.MaskPowerNorm(C, group_num=4))
    x = torch.randn(T, B, C)
    path = harness.export(module, (x,), "torchscript", str(tmp_path), opset=17, dynamic_batch=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="Reshape"):
        session.run(None, {"input": x.numpy()})
    # normdeploy says so in one line (the input's fault, with the failing node), not as an internal error
    import normdeploy
    from normdeploy.core.errors import InputError

    with pytest.raises(InputError, match=r"the input model itself fails on ONNX Runtime before any rewrite: "
                                         r"Reshape node \S+: The input tensor cannot be reshaped") as e:
        normdeploy.optimize(path, target="ort-cpu", bench=False)
    assert "\n" not in str(e.value) and "dynamo=True" in e.value.hint


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["GroupScaling1D", "MaskPowerNorm", "GroupScalingReshaped", "PowerNormReshaped"])
def test_corpus_powernorm_float16(factory, tmp_path):
    """float16 (fairseq's --fp16): recognized and joined; float16 tolerance (2 ulp)."""
    make = {"GroupScaling1D": lambda: corpus.GroupScaling1D(group_num=4),
            "MaskPowerNorm": lambda: corpus.MaskPowerNorm(C, group_num=4),
            "GroupScalingReshaped": lambda: corpus.GroupScalingReshaped(4),
            "PowerNormReshaped": lambda: corpus.PowerNormReshaped(C, groups=4)}[factory]
    kind = {"GroupScaling1D": "GroupScaling", "MaskPowerNorm": "PowerNorm", "GroupScalingReshaped": "GroupScaling",
            "PowerNormReshaped": "PowerNorm"}[factory]
    harness.check(_module(make).half(), (torch.randn(T, B, C).half(),), "dynamo", tmp_path, before={kind: 1},
                  tol=2e-3, tolerance=1e-2)


# ----------------------------------------------------------------------------- GroupScaling on the grouped tensor (fast)

GSR_SPELLING = "GroupScaling on the grouped tensor: Reshape {} ReduceMean Add Sqrt Div Reshape"


def _hand_grouped_rms(b: GraphBuilder, x: str, groups: int, eps=1e-5, square: str = "Pow", back=None) -> str:
    """normdeploy.nn.GroupScaling as a .pt2 of it traces it: Reshape to [T, B, G, C/G], mean of squares over the
    group with keepdims, Add eps, Sqrt, Div of the grouped tensor, Reshape back to x's shape (or to ``back``)."""
    grouped = b("Reshape", x, _ints(b, [T, B, groups, C // groups]), out="grouped")
    sq = b("Pow", grouped, b.const(np.float32(2.0))) if square == "Pow" else b("Mul", grouped, grouped)
    ms = b.reduce_mean(sq, [-1], out="ms")
    d = b("Div", grouped, b("Sqrt", b("Add", ms, b.const(np.float32(eps)))), out="d")
    return b("Reshape", d, _ints(b, back or [T, B, C]), out="gs")


@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("square", ["Pow", "Mul"])
def test_group_scaling_on_the_grouped_tensor(groups, square):
    b = GraphBuilder(18)
    _hand_grouped_rms(b, b.input("x", [T, B, C]), groups, square=square)
    model = b.model("gs")
    after, result = apply(model, PASS)
    assert op_counts(after) == {GS: 1}
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, [])
    assert result.rewrites[0].spelling == GSR_SPELLING.format(square)
    a = attrs_of(node_of(after, "GroupScaling"))
    assert a["groups"] == groups and a["epsilon"] == pytest.approx(1e-5)
    assert_same_outputs(model, after)


def test_plain_rmsnorm_is_not_group_scaling():
    """Without the grouping Reshape the same chain is an RMSNorm (no gain): recognize_powernorm leaves it silently,
    recognize_rmsnorm (which runs after it) takes it."""
    b = GraphBuilder(18)
    x = b.input("x", [T, B, C])
    ms = b.reduce_mean(b("Pow", x, b.const(np.float32(2.0))), [-1], out="ms")
    b("Div", x, b("Sqrt", b("Add", ms, b.const(np.float32(1e-5)))), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    assert after is model and (result.matched, result.rewrites, result.skipped) == (0, [], [])
    after, result = apply(model, "recognize_rmsnorm")
    assert op_counts(after) == {f"{ops.DOMAIN}::RMSNorm": 1}


@pytest.mark.parametrize("why", ["not reshaped back", "merges leading axes", "mean over two axes"])
def test_grouped_mean_of_squares_that_is_no_group_scaling_is_left_to_rmsnorm(why):
    """An RMSNorm over a reshaped tensor (heads, tokens) that is not a split of x's last axis into groups undone
    after it: not this recognizer's (no candidate, no skip); recognize_rmsnorm's."""
    b = GraphBuilder(18)
    x = b.input("x", [T, B, C])
    if why == "not reshaped back":
        _hand_grouped_rms(b, x, 4, back=[T, B * 4, 4])
    else:
        shape = [T * B, 4, 4] if why == "merges leading axes" else [T, B, 4, 4]
        grouped = b("Reshape", x, _ints(b, shape), out="grouped")
        axes = [-2, -1] if why == "mean over two axes" else [-1]
        ms = b.reduce_mean(b("Pow", grouped, b.const(np.float32(2.0))), axes, out="ms")
        d = b("Div", grouped, b("Sqrt", b("Add", ms, b.const(np.float32(1e-5)))), out="d")
        b("Reshape", d, _ints(b, [T, B, C]), out="gs")
    model = b.model("gs")
    after, result = apply(model, PASS)
    assert after is model and (result.matched, result.rewrites, result.skipped) == (0, [], []), result


def test_grouped_tensor_read_elsewhere_is_a_skip():
    b = GraphBuilder(18)
    _hand_grouped_rms(b, b.input("x", [T, B, C]), 4)
    b("Neg", "d", out="other")
    _assert_untouched(b.model("gs", "other"), "intermediate tensor d has another consumer (Neg n_other)")


@pytest.mark.parametrize("layout", ["direct", "through Transpose"])
def test_group_scaling_and_constant_affine_join_into_powernorm(layout):
    """normdeploy.nn.PowerNorm as a .pt2 traces it: the running-phi affine ``x' * (w / sqrt(phi + eps)) + b`` arrives
    as one constant scale (the export's constant folder) and a bias: joined into one PowerNorm with W = that scale
    and Phi = 1 - eps (sqrt(Phi + eps) = 1), exact to float rounding."""
    rng = np.random.default_rng(5)
    scale = (rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    b = GraphBuilder(18)
    gs = _hand_grouped_rms(b, b.input("x", [T, B, C]), 4)
    if layout == "direct":
        a = b("Add", b("Mul", gs, b.const(scale)), b.const(bias), out="y")
    else:  # the affine on [B, C, T]: mapped back through the Transpose to the last axis, the Transpose kept
        t = b("Transpose", gs, perm=[1, 2, 0])
        a = b("Add", b("Mul", b.const(scale.reshape(-1, 1)), t), b.const(bias.reshape(-1, 1)), out="y")
    model = b.model(a)
    after, result = apply(model, PASS)
    counts = op_counts(after)
    assert counts[PN] == 1 and GS not in counts and "Mul" not in counts and "Add" not in counts, counts
    via = "Transpose " if layout != "direct" else ""
    assert [r.spelling for r in result.rewrites] == [
        GSR_SPELLING.format("Pow"), f"PowerNorm eval, the running-phi affine a constant: GroupScaling {via}Mul Add"]
    node = node_of(after, "PowerNorm")
    assert attrs_of(node)["groups"] == 4 and attrs_of(node)["epsilon"] == pytest.approx(1e-5)
    phi = initializer(after, node.input[1])
    assert np.all(phi + np.float32(1e-5) == np.float32(1.0)), phi  # the divisor is exactly 1 in float32
    np.testing.assert_array_equal(initializer(after, node.input[2]), scale)
    np.testing.assert_array_equal(initializer(after, node.input[3]), bias)
    assert after.graph.output[0].name == "y"
    assert_same_outputs(model, after)


def test_group_scaling_and_a_scalar_scale_stay_apart():
    """A scalar scale is no per-channel affine (constant_affine): nothing to join, GroupScaling alone."""
    b = GraphBuilder(18)
    gs = _hand_grouped_rms(b, b.input("x", [T, B, C]), 4)
    model = b.model(b("Mul", gs, b.const(np.float32(0.5)), out="y"))
    after, result = apply(model, PASS)
    assert op_counts(after) == {GS: 1, "Mul": 1} and len(result.rewrites) == 1


# ----------------------------------------------------------------------------- the corpus: grouped-tensor spelling

#: normdeploy.nn.GroupScaling / PowerNorm written out (tests/corpus/powernorm.py): every way, both opsets; the
#: spelling each way writes (the TorchScript exporter and the dynamo one both square with Pow)
GSR_CORPUS = GSR_SPELLING.format("Pow")


@pytest.mark.slow
@pytest.mark.parametrize("way, opset", EXPORTS)
@pytest.mark.parametrize("groups", [1, 4])
def test_corpus_group_scaling_reshaped(groups, way, opset, tmp_path):
    """GroupScaling without repeat_interleave, each way: one GroupScaling before (not an RMSNorm), lowered after,
    exact vs torch."""
    result = harness.check(_module(lambda: corpus.GroupScalingReshaped(groups)), (torch.randn(T, B, C),), way,
                           tmp_path, before={"GroupScaling": 1}, after=AFTER[groups], opset=opset)
    p = _pass(result)
    assert [w["spelling"] for w in p["rewrites"]] == [GSR_CORPUS] and p["skipped"] == [], p
    assert _pass(result, "recognize_rmsnorm")["rewrites"] == []


#: what the running-phi affine ``x' * (w / sqrt(phi + eps)) + b`` reaches the canonicalize stage as: TorchScript's
#: exporter folds the scale into one constant itself; from dynamo and .pt2 the export stage keeps ``phi + eps``
AFFINE_SEEN = {"torchscript": "a constant: GroupScaling Mul Add", "dynamo": "a UnifiedNorm: GroupScaling UnifiedNorm",
               "pt2": "a UnifiedNorm: GroupScaling UnifiedNorm"}


@pytest.mark.slow
@pytest.mark.parametrize("way, opset", EXPORTS)
@pytest.mark.parametrize("groups", [1, 4])
def test_corpus_powernorm_reshaped(groups, way, opset, tmp_path):
    """normdeploy.nn.PowerNorm's eval arithmetic, each way: GroupScaling and the running-phi affine after it
    (:data:`AFFINE_SEEN`) join into one PowerNorm (ort-cpu: lowered,
    exact vs torch; trt-fp16: the GroupScaling plugin)."""
    module = _module(lambda: corpus.PowerNormReshaped(C, groups=groups))
    result = harness.check(module, (torch.randn(T, B, C),), way, tmp_path, before={"PowerNorm": 1},
                           after=AFTER[groups], opset=opset)
    p = _pass(result)
    assert [w["spelling"] for w in p["rewrites"]] == [
        GSR_CORPUS, f"PowerNorm eval, the running-phi affine {AFFINE_SEEN[way]}"], p
    assert len(_pass(result, "recognize_unified_norm")["rewrites"]) == (way != "torchscript")
    (tmp_path / "trt").mkdir()
    result = harness.check(module, (torch.randn(T, B, C),), way, tmp_path / "trt", before={"PowerNorm": 1},
                           after={"GroupScaling": 1}, target="trt-fp16", opset=opset)
    plugins = [n for n in result.optimized.graph.node if n.op_type.startswith("Normdeploy")]
    assert [n.op_type for n in plugins] == ["NormdeployGroupScaling"]
    assert {a.name: a.i for a in plugins[0].attribute if a.name == "groups"} == {"groups": groups}
