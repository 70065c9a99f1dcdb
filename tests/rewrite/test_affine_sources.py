"""Per-channel constant affines (Mul / Div / Add / Sub by constants) as affine sources of fold_affine_into_linear,
and the linear layers they fold into that exporters spell unusually (a tied LM head, per-step convs stacked by a
Concat, a conv whose output shape is also read).

The modules are tests/corpus/affine.py's: torchvision's FrozenBatchNorm2d, timm's LayerScale and ConvNeXt gamma,
MPBN's tdBatchNorm2d, a tied LM head as Hugging Face ties it. Each is exported the three ways and optimized for
ort-cpu; the fold is asserted (what was folded, what is left) and the result compared with eager torch.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from normdeploy.core.passes import PassContext
from tests.corpus import affine as A
from tests.corpus.harness import EXPORTS, WAYS, check, export
from tests.graph_helpers import op_counts, run_step

from .test_fold_affine import G, assert_same

PASS = "fold_affine_into_linear"


def _fold_result(result):
    (p,) = [p for p in result.report["passes"] if p["name"] == PASS]
    return p


def _optimized_ops(result):
    return op_counts(ir.to_proto(result.optimized_model))


# ----------------------------------------------------------------------------- graph level (fast)

def _fold(model, target="ort-cpu"):
    after, result = run_step(model, PASS, PassContext(target=target))
    assert result.matched == len(result.rewrites) + len(result.skipped), result
    return after, result


@pytest.mark.parametrize("bias_first", [False, True])
def test_layer_scale_after_a_linear_whose_bias_add_reads_the_bias_first(bias_first):
    """``Add(b, MatMul)`` (TorchScript's operand order) is the MatMul's own bias, not part of the layer scale:
    folding ``gamma (W x + b)`` must scale W and b once (a regression: the chain took the bias in and the
    fold scaled the bias twice)."""
    g = G(seed=1)
    mm = g("MatMul", g.input([2, 5, 8]), g.rand(8, 6))
    b = g.rand(6)
    t = g("Add", b, mm) if bias_first else g("Add", mm, b)
    before = g.model(g("Mul", t, g.rand(6, low=0.5, high=1.5), out="out"))
    after, result = _fold(before)
    assert len(result.rewrites) == 1 and result.rewrites[0].spelling == "constant affine: Mul", result.rewrites
    assert op_counts(after) == {"MatMul": 1, "Add": 1}
    assert_same(before, after)


def test_decomposed_bn_is_one_affine_and_folds_into_the_conv():
    """``(x - m) * k / s * w + b`` on a Conv output: one five-op chain, folded into the Conv (producer)."""
    g = G(seed=2)
    c = 4
    y = g("Conv", g.input([1, 3, 6, 6]), g.rand(c, 3, 3, 3), g.rand(c), pads=[1, 1, 1, 1])
    y = g("Sub", y, g.rand(c, 1, 1))
    y = g("Mul", g.const(0.5), y)
    y = g("Div", y, g.rand(c, 1, 1, low=0.5, high=2.0))
    y = g("Mul", y, g.rand(c, 1, 1))
    before = g.model(g("Add", y, g.rand(c, 1, 1), out="out"))
    after, result = _fold(before)
    (rw,) = result.rewrites
    assert rw.spelling == "constant affine: Sub Mul Div Mul Add" and "into Conv" in rw.what, rw
    assert op_counts(after) == {"Conv": 1}
    assert_same(before, after)


def test_affine_whose_shift_is_cast_like_its_scaled_value_folds():
    """dynamo's GroupNorm affine below opset 21: ``Add(t, CastLike(b, t))`` with ``t = Mul(y, w)``: the CastLike reads
    t for its type only, so the chain is ``Mul Add``; after the fold the CastLike reads the chain's input."""
    g = G(seed=8)
    c = 4
    y = g("Conv", g.input([1, 3, 5, 5]), g.rand(c, 3, 1, 1), g.rand(c))
    t = g("Mul", y, g.rand(c, 1, 1, low=0.5, high=1.5))
    before = g.model(g("Add", t, g("CastLike", g.rand(c, 1, 1), t), out="out"))
    after, result = _fold(before)
    (rw,) = result.rewrites
    assert rw.spelling == "constant affine: Mul Add" and "into Conv" in rw.what, rw
    onnx.checker.check_model(after, full_check=True)
    assert op_counts(after)["Mul"] == 0
    assert_same(before, after)


def test_scalar_and_two_axis_constants_are_not_affine_sources():
    """Attention's ``q / sqrt(d)`` (a scalar) and a positional embedding (varies along two axes) are left alone
    without being counted; a lone bias (unit scale) too."""
    g = G(seed=3)
    x = g("MatMul", g.input([2, 5, 8]), g.rand(8, 8))
    y = g("Div", x, g.const(2.0))
    y = g("Add", y, g.rand(5, 8))
    before = g.model(g("Relu", y, out="out"))
    after, result = _fold(before)
    assert result.matched == 0 and not result.rewrites
    assert after.SerializeToString() == before.SerializeToString()


def test_affine_read_only_by_a_comparison_is_not_a_source():
    """A per-channel Mul read only by a comparison (a folded MPBN's ``sign(gamma) u``) is a threshold's business."""
    g = G(seed=4)
    y = g("Mul", g.input([2, 3, 4, 4]), g.const(np.array([1.0, -1.0, 1.0]).reshape(3, 1, 1)))
    before = g.model(g("Greater", y, g.rand(3, 1, 1), out="out"), types={"out": np.bool_})
    _, result = _fold(before)
    assert result.matched == 0


def test_bn_after_per_step_convs_stacked_by_concat_folds_into_every_conv():
    """``Concat(Unsqueeze(conv_t(x_t)))`` over time, then a BN whose channel is not the stacked axis: folds into
    each conv (the arrays are constant along the Concat axis); a Shape read of a conv output does not block it."""
    g = G(seed=5)
    c = 3
    w, b = g.rand(c, 2, 3, 3), g.rand(c)
    xs = [g.input([2, 2, 5, 5], name=f"x{i}") for i in range(2)]
    convs = [g("Conv", x, w, b, pads=[1, 1, 1, 1]) for x in xs]
    g("Shape", convs[0], out="conv_shape")
    stacked = g("Concat", *[g("Unsqueeze", t, g.const(np.array([0]), np.int64)) for t in convs], axis=0)
    before = g.model(g.bn(g("Transpose", stacked, perm=[1, 2, 0, 3, 4]), c, name="out"), "conv_shape",
                     types={"conv_shape": np.int64})
    after, result = _fold(before)
    (rw,) = result.rewrites
    assert rw.what.count("into Conv") == 2 and "through Concat" in rw.what, rw.what
    assert op_counts(after)["BatchNormalization"] == 0
    assert_same(before, after)


def test_bn_varying_along_the_concat_axis_stays():
    g = G(seed=6)
    xs = [g.input([2, 3, 4], name=f"x{i}") for i in range(2)]
    mms = [g("MatMul", x, g.rand(4, 4)) for x in xs]
    y = g("Concat", *mms, axis=1)  # [2, 6, 4]: the BN channel axis 1 is the concatenated one
    before = g.model(g.bn(y, 6, name="out"))
    _, result = _fold(before)
    (skip,) = result.skipped
    assert "varies along the concatenated axis" in skip.reason, skip.reason


def test_gain_folds_into_a_matmul_with_a_transposed_constant_weight():
    """``MatMul(x, Transpose(W))`` with W also read by a Gather (a tied LM head): the gain folds into a new
    weight; the Gather keeps reading W, unchanged."""
    g = G(seed=7)
    W = g.const(g.rng.uniform(-1, 1, (20, 8)), name="wte")
    g.inputs.append(onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 5]))
    emb = g("Gather", W, "ids")
    # no LN bias: a non-zero one stays in the LayerNormalization, the head having no bias to take it
    ln = g("LayerNormalization", g("Tanh", emb), g.rand(8, low=0.5, high=1.5), g.const(np.zeros(8)), axis=-1)
    before = g.model(g("MatMul", ln, g("Transpose", W, perm=[1, 0]), out="out"))
    after, result = _fold(before)
    assert len(result.rewrites) == 1 and "into MatMul" in result.rewrites[0].what, result.skipped
    gather = next(n for n in after.graph.node if n.op_type == "Gather")
    head = next(n for n in after.graph.node if n.op_type == "MatMul")
    assert gather.input[0] == "wte" and head.input[1] != "wte"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in after.graph.initializer}
    ref = {i.name: onnx.numpy_helper.to_array(i) for i in before.graph.initializer}
    assert np.array_equal(inits["wte"], ref["wte"])
    ln_after = next(n for n in after.graph.node if n.op_type == "LayerNormalization")
    assert np.all(inits[ln_after.input[1]] == 1) and len(ln_after.input) == 2
    assert_same(before, after)  # (ids drawn from N(0, 1): in [-4, 4], valid Gather indices)


# ----------------------------------------------------------------------------- the corpus, exported (slow)

def _randomized(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return A.randomize_(cls(**kw), seed + 1)


@pytest.mark.slow
@pytest.mark.parametrize("way,opset", EXPORTS)
def test_frozen_batchnorm_backbone_folds_into_both_convs(way, opset, tmp_path):
    """torchvision's FrozenBatchNorm2d after each conv: TorchScript's ``x * C1 + C2``, dynamo's arithmetic on the
    buffers; both fold into their conv (producer), nothing but Conv and Relu left."""
    m = _randomized(A.FrozenBNBackbone)
    r = check(m, (torch.randn(2, 3, 8, 8),), way, tmp_path, before={}, opset=opset)
    rws = _fold_result(r)["rewrites"]
    assert len(rws) == 2 and all(w["spelling"].startswith("constant affine: Mul Add") for w in rws), rws
    assert dict(_optimized_ops(r)) == {"Conv": 2, "Relu": 1}


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_frozen_batchnorm_before_a_padded_conv_keeps_its_shift(way, tmp_path):
    m = _randomized(A.FrozenBNPreAct)
    r = check(m, (torch.randn(2, 3, 8, 8),), way, tmp_path, before={})
    (rw,) = _fold_result(r)["rewrites"]
    assert "into Conv" in rw["what"], rw
    assert any("shift stays as an Add" in n for n in _fold_result(r)["notes"])
    assert _optimized_ops(r)["Mul"] == 0 and _optimized_ops(r)["Add"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("way,opset", EXPORTS)
@pytest.mark.parametrize("module", ["LayerScaleMlp", "ConvNeXtGamma"])
def test_layer_scale_folds_into_the_linear_before_it(module, way, opset, tmp_path):
    """timm's LayerScale (``x * gamma``) and ConvNeXt's ``x.mul(gamma.reshape(1, -1, 1, 1))`` after a permute:
    gamma folds into fc2; the residual Add is the only Add left besides the biases."""
    cls = getattr(A, module)
    m = _randomized(cls)
    x = torch.randn(2, 5, 16) if module == "LayerScaleMlp" else torch.randn(2, 8, 6, 6)
    r = check(m, (x,), way, tmp_path, before={}, opset=opset)
    (rw,) = _fold_result(r)["rewrites"]
    assert rw["spelling"] == "constant affine: Mul" and "into MatMul" in rw["what"], rw
    assert _optimized_ops(r)["Mul"] == op_counts(ir.to_proto(r.original_model))["Mul"] - 1  # (GELU's Muls stay)


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_mpbn_td_batchnorm_folds_through_the_per_step_reshape(way, tmp_path):
    """MPBN's tdBatchNorm2d eval (``alpha V_th (x - mean) / sqrt(var + eps) * w + b`` on axis 2 of [T, B, C, H, W])
    after SpikePool's reshaped conv: one chain, folded into the conv."""
    m = _randomized(A.TdBNConv)
    r = check(m, (torch.randn(2, 2, 4, 6, 6),), way, tmp_path, before={}, batches=(None,))
    (rw,) = _fold_result(r)["rewrites"]
    assert rw["spelling"] == "constant affine: Sub Mul Div Mul Add" and "into Conv" in rw["what"], rw
    ops = _optimized_ops(r)
    assert ops["Sub"] == ops["Div"] == ops["Mul"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("way,opset", EXPORTS)
def test_final_norm_gain_folds_into_a_tied_lm_head(way, opset, tmp_path):
    """``ln_f`` before ``lm_head`` tied to ``wte`` (vocab 4096 x 64: too large for the constant folder, so the
    dynamo spelling keeps ``MatMul(x, Transpose(W))``): ln_f's gain folds into a clone of the head's weight;
    the embedding keeps reading the original, and the logits match torch. ln_f without bias (``nn.LayerNorm(d,
    bias=False)``, OLMo's): a bias would stay in the LayerNormalization, the head having none to take it."""
    import normdeploy
    from tests.conftest import ort_run

    m = _randomized(A.TiedLMHead, vocab=4096, d=64, bias=False)
    ids = torch.randint(0, 4096, (2, 7), generator=torch.Generator().manual_seed(0))
    path = export(m, (ids,), way, str(tmp_path), opset=opset)
    r = normdeploy.optimize(path, target="ort-cpu", bench=False)
    assert r.report["norm_nodes"] == {"before": {"LayerNorm": 1}, "after": {"LayerNorm": 1}}
    (rw,) = _fold_result(r)["rewrites"]
    assert "gain/bias folded into MatMul" in rw["what"], rw
    graph = r.optimized_model.graph
    (ln,) = [n for n in graph if n.op_type == "LayerNormalization"]
    assert np.all(ln.inputs[1].const_value.numpy() == 1) and len(ln.inputs) == 2
    (gather,) = [n for n in graph if n.op_type == "Gather"]
    assert np.array_equal(gather.inputs[0].const_value.numpy(), m.wte.weight.detach().numpy())
    for batch in (2, 3):
        feed = torch.randint(0, 4096, (batch, 7), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = m(feed).numpy()
        got = ort_run(r.optimized_model, feed.numpy())[0]
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.slow
def test_final_norm_gain_is_not_folded_into_a_large_tied_head(tmp_path):
    """A tied head past ``SHARED_COPY_MAX_BYTES`` (vocab 8192 x 64 fp32: 2 MiB; GPT-2's is 154 MB): folding
    ln_f's gain would copy W, which the embedding's Gather reads too, to save one Mul: the affine stays, with
    the reason naming the head, the weight's size and the other reader; W stays one tensor."""
    import normdeploy
    from normdeploy.rewrite.fold_affine import SHARED_COPY_MAX_BYTES
    from tests.conftest import ort_run

    m = _randomized(A.TiedLMHead, vocab=8192, d=64)
    assert m.wte.weight.numel() * 4 > SHARED_COPY_MAX_BYTES
    ids = torch.randint(0, 8192, (2, 7), generator=torch.Generator().manual_seed(0))
    r = normdeploy.optimize(export(m, (ids,), "dynamo", str(tmp_path)), target="ort-cpu", bench=False)
    fold = _fold_result(r)
    assert not fold["rewrites"]
    assert any("(2 MiB) is also read by Gather" in s["reason"] and "a copy of it" in s["reason"]
               for s in fold["skipped"]), fold["skipped"]
    big = [v for v in r.optimized_model.graph.initializers.values() if v.const_value.nbytes >= m.wte.weight.numel() * 4]
    assert len(big) == 1, "the head and the embedding still share one W"
    with torch.no_grad():
        ref = m(ids).numpy()
    got = ort_run(r.optimized_model, ids.numpy())[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def _hf_convnext_layer(d: int = 16):
    """transformers' own ConvNextLayer (modeling_convnext.py): dwconv, permute to NHWC, ConvNextLayerNorm
    (eps 1e-6), pwconv1 Linear, GELU, pwconv2 Linear, the layer-scale gamma, permute back, residual."""
    from transformers import ConvNextConfig
    from transformers.models.convnext.modeling_convnext import ConvNextLayer

    torch.manual_seed(0)
    return ConvNextLayer(ConvNextConfig(), dim=d).eval()


def _ort_optimized_ops(model: ir.Model, tmp_path) -> dict:
    """The op counts of the graph ONNX Runtime runs for ``model`` (its own fusions applied, CPU provider)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    path = str(tmp_path / "nd.onnx")
    ir.save(model, path)
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(tmp_path / "ort.onnx")))


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_ln_bias_folded_into_a_linear_keeps_onnx_runtimes_bias_gelu_fusion(way, tmp_path):
    """LayerNorm's beta folded into the Linear after it becomes that Linear's bias ``b + beta W``: stored 1-D
    (``[4d]``), as the exporter stores a Linear bias. A ``[1, 4d]`` bias broadcasts the same but ONNX Runtime's
    BiasGelu fusion (Add + Gelu) then does not fire (seen on Hugging Face ConvNeXt-T: 18 unfused Adds). On
    transformers' own ConvNextLayer, every parameter randomized."""
    import normdeploy
    from tests.conftest import ort_run

    m = _hf_convnext_layer()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))  # beta and the biases non-zero: the fold does real work
    x = torch.randn(2, 16, 5, 5)
    r = normdeploy.optimize(export(m, (x,), way, str(tmp_path)), target="ort-cpu", bench=False)
    assert [w for w in _fold_result(r)["rewrites"]], "the LayerNorm affine folds into pwconv1"
    proto = ir.to_proto(r.optimized_model)
    inits = {i.name: i for i in proto.graph.initializer}
    bias_adds = [n for n in proto.graph.node if n.op_type == "Add" and any(i in inits for i in n.input)]
    assert bias_adds and all(len(inits[i].dims) == 1 for n in bias_adds for i in n.input if i in inits)
    assert _ort_optimized_ops(r.optimized_model, tmp_path).get("com.microsoft::BiasGelu") == 1
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(ort_run(r.optimized_model, x.numpy())[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_ln_bias_stays_in_the_layernorm_when_the_linear_after_it_has_no_bias(way, tmp_path):
    """Hugging Face ConvNextLayer (transformers' modeling_convnext.py) as ``ConvNextPreTrainedModel`` initialises
    it from a config: every Linear bias zero. Its channels-last LayerNorm stays a LayerNormalization (it reads
    the depthwise conv, not a residual stream), whose kernel adds beta at no cost; folding beta into pwconv1
    would give pwconv1 the bias ``beta W`` it does not have, and ONNX Runtime would run MatMul + Add + Gelu
    where the model had MatMul + Gelu. So the affine stays, with the reason, and the zero biases are cleaned
    away: the optimized graph has no constant Add left (what onnxslim and onnxoptimizer give too)."""
    import normdeploy
    from tests.conftest import ort_run

    m = _hf_convnext_layer()
    with torch.no_grad():
        for lin in (m.pwconv1, m.pwconv2):
            lin.bias.zero_()  # what _init_weights does to every Linear
        m.layernorm.weight.uniform_(0.5, 1.5)
        m.layernorm.bias.uniform_(-0.5, 0.5)
        m.layer_scale_parameter.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 5, 5)
    r = normdeploy.optimize(export(m, (x,), way, str(tmp_path)), target="ort-cpu", bench=False)
    fold = _fold_result(r)
    assert not [w for w in fold["rewrites"] if "LayerNormalization" in w["what"]], fold["rewrites"]
    assert any("adds its bias at no cost" in s["reason"] and "has no bias Add to take it" in s["reason"]
               for s in fold["skipped"]), fold["skipped"]
    graph = r.optimized_model.graph
    (ln,) = [n for n in graph if n.op_type == "LayerNormalization"]
    assert len(ln.inputs) == 3 and np.any(ln.inputs[2].const_value.numpy() != 0), "beta stays in the LayerNorm"
    assert not [n.name for n in graph if n.op_type == "Add" and any(i.const_value is not None for i in n.inputs)]
    assert "com.microsoft::BiasGelu" not in _ort_optimized_ops(r.optimized_model, tmp_path)
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(ort_run(r.optimized_model, x.numpy())[0], ref, rtol=1e-5, atol=1e-5)
