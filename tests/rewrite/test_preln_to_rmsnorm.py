"""Pre-LN -> Pre-RMSNorm (DESIGN.md 3.3) on real architectures: exact, and refused where it is not."""
import numpy as np
import pytest
import torch
import transformers

from normdeploy.core.passes import PassContext
from tests.conftest import export_hf, hf_input, ort_run
from tests.graph_helpers import run_step

transformers.logging.set_verbosity_error()


def gpt2(d, layers, heads):
    cfg = transformers.GPT2Config(n_embd=d, n_layer=layers, n_head=heads, vocab_size=100, n_positions=64,
                                  use_cache=False)
    return transformers.GPT2LMHeadModel(cfg), "input_ids", (1, 16), "int64"


def vit(d, layers, heads):
    cfg = transformers.ViTConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=2 * d, image_size=32, patch_size=8, num_labels=10)
    return transformers.ViTForImageClassification(cfg), "pixel_values", (1, 3, 32, 32), "float32"


def _randomize_norms(model, seed=0):
    """Non-trivial LayerNorm gains and biases (fresh models have g = 1, b = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


@pytest.mark.slow  # exports a whole model
@pytest.mark.parametrize("form", ["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("make,size", [(gpt2, (64, 2, 4)), (gpt2, (96, 3, 6)), (vit, (64, 2, 4)), (vit, (128, 3, 4))],
                         ids=["gpt2-d64", "gpt2-d96", "vit-d64", "vit-d128"])
def test_preln_becomes_rmsnorm_or_crmsnorm_exactly(make, size, form):
    torch.manual_seed(0)
    model, name, shape, dtype = make(*size)
    proto = export_hf(_randomize_norms(model), name, shape, dtype)
    n_ln = sum(n.op_type == "LayerNormalization" for n in proto.graph.node)
    op = {"rmsnorm": "RMSNorm", "crmsnorm": "CRMSNorm"}[form]
    out, result = run_step(proto, f"preln_to_{form}", PassContext(preln_form=form))
    assert not result.skipped, result.skipped
    assert sum(n.op_type == "LayerNormalization" for n in out.graph.node) == 0
    assert sum(n.op_type == op and n.domain == "normdeploy" for n in out.graph.node) == n_ln == 2 * size[1] + 1
    if form == "crmsnorm":  # the stream is stored with d-1 coordinates
        widths = {vi.type.tensor_type.shape.dim[-1].dim_value for vi in out.graph.value_info
                  if any(n.op_type == "CRMSNorm" and n.input[0] == vi.name for n in out.graph.node)}
        assert widths == {size[0] - 1}
    for seed in (0, 1):
        x = hf_input(name, (3,) + shape[1:], dtype, seed)
        (ref,), (got,) = ort_run(proto, x), ort_run(out, x)
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, rel


@pytest.mark.slow  # exports a whole model
@pytest.mark.parametrize("form", ["rmsnorm", "crmsnorm"])
def test_trained_preln_vit_from_the_zoo(form):
    """The zoo's trained pre-LN ViT, whole pipeline: exact on the real digits, same predictions."""
    import os

    from normdeploy.pipeline import Options, prepare, transform
    from tests.conftest import MODELS

    _, original, _ = prepare(os.path.join(MODELS, "vit_ln.pt"), Options.from_flat())
    _t = transform(original, PassContext(preln_form=form))
    out, results = _t.optimized, _t.results
    conv = next(r for r in results if r.name == f"preln_to_{form}")
    assert len(conv.rewrites) == 9 and not conv.skipped
    x = np.load(os.path.join(MODELS, "digits_test.npz"))["input"]
    (ref,), (got,) = ort_run(original, x), ort_run(out, x)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.slow  # exports a whole model
def test_tied_embedding_is_untied_not_edited():
    """GPT-2 ties the input embedding to the LM head: the head must keep the original table."""
    torch.manual_seed(0)
    model, name, shape, dtype = gpt2(64, 2, 4)
    proto = export_hf(model, name, shape, dtype)
    out, _ = run_step(proto, "preln_to_rmsnorm", PassContext())
    import onnx

    table = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    gather = next(n for n in out.graph.node if n.op_type == "Gather" and n.input[0] in table
                  and table[n.input[0]].shape == (100, 64))
    centred = table[gather.input[0]]
    np.testing.assert_allclose(centred.mean(axis=1), 0, atol=1e-6)
    original = model.transformer.wte.weight.detach().numpy()
    assert any(np.array_equal(v, original) or np.array_equal(v, original.T) for v in table.values())


@pytest.mark.slow  # exports a whole model
@pytest.mark.parametrize("arch", ["bert", "minilm"])
def test_post_ln_is_refused_with_the_breaking_node(arch):
    torch.manual_seed(0)
    if arch == "bert":
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=100)
        model = transformers.BertModel(cfg)
    else:
        from tests.conftest import load_minilm

        model = load_minilm()
    proto = export_hf(model, "input_ids", (1, 16), "int64")
    out, result = run_step(proto, "preln_to_rmsnorm", PassContext())
    assert result.rewrites == []
    post = [s for s in result.skipped if s.reason.startswith("post-LN block: the residual Add")]
    assert len(post) >= 2 * 2, result.skipped
    assert all("adds the output of LayerNorm" in s.reason for s in post)
    assert out is proto


@pytest.mark.slow  # exports a whole model
def test_stream_tensor_that_is_a_graph_output_keeps_its_value():
    """Hidden states returned (a stream tensor is a graph output): the stream up to it keeps its values and its
    LNs, the Add past it reads one explicit re-centring, the rest is converted; every output exact."""
    import onnx

    torch.manual_seed(0)
    model, name, shape, dtype = gpt2(64, 2, 4)
    proto = export_hf(_randomize_norms(model), name, shape, dtype)
    ln = next(n for n in proto.graph.node if n.op_type == "LayerNormalization" and "h.1.ln_1" in n.name)
    h1 = ln.input[0]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(h1, onnx.TensorProto.FLOAT, None))
    out, result = run_step(proto, "preln_to_rmsnorm", PassContext())
    kept = sorted(s.node for s in result.skipped)
    assert kept == sorted(n.name for n in proto.graph.node if n.op_type == "LayerNormalization"
                          and ("h.0." in n.name or "h.1.ln_1" in n.name)), kept
    assert all(f"stream tensor {h1} is a graph output" in s.reason for s in result.skipped), result.skipped
    explicit = [r for r in result.rewrites if r.what.startswith("explicit re-centring")]
    assert len(explicit) == 1 and f"= {h1} - mean({h1})" in explicit[0].what
    assert sum(n.op_type == "RMSNorm" for n in out.graph.node) == 2
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    x = hf_input(name, (3,) + shape[1:], dtype, 0)
    for ref, got in zip(ort_run(proto, x), ort_run(out, x)):
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


# ----------------------------------------------------------------------------- hand-built streams (fast)

D = 8


def _graph(nodes, inits, outputs, inputs=(("x", [2, 3, 4]),), opset=18):
    """A float32 model: ``inits`` maps names to arrays; ``outputs`` are value names (float32, shapes inferred)."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    g = helper.make_graph(
        nodes, "stream",
        [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "ids" else TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return shape_inference.infer_shapes(m)


def _rng_inits(rng, **shapes):
    return {k: (rng.standard_normal(s) * 0.5 + (0.3 if len(s) == 1 else 0)).astype(np.float32)
            for k, s in shapes.items()}


def _block(i, h, nodes, inits, rng, scale=False, k=D):
    """``h + [gamma *] (LN_i(h) @ W_i + b_i)``, the LN with a random gain and bias; returns the new stream tensor."""
    from onnx import helper

    inits.update(_rng_inits(rng, **{f"g{i}": [k], f"b{i}": [k], f"w{i}": [k, D], f"c{i}": [D]}))
    inits[f"g{i}"] = np.abs(inits[f"g{i}"]) + 0.5
    nodes += [helper.make_node("LayerNormalization", [h, f"g{i}", f"b{i}"], [f"ln{i}"], name=f"LN{i}", axis=-1),
              helper.make_node("MatMul", [f"ln{i}", f"w{i}"], [f"mm{i}"], name=f"MM{i}"),
              helper.make_node("Add", [f"mm{i}", f"c{i}"], [f"br{i}"], name=f"Bias{i}")]
    br = f"br{i}"
    if scale:
        inits[f"gamma{i}"] = (rng.random(D) + 0.5).astype(np.float32)
        nodes.append(helper.make_node("Mul", [f"gamma{i}", br], [f"ls{i}"], name=f"LayerScale{i}"))
        br = f"ls{i}"
    nodes.append(helper.make_node("Add", [h, br], [f"h{i + 1}"], name=f"Res{i}"))
    return f"h{i + 1}"


def _final_ln(i, h, nodes, inits, rng, out="y"):
    from onnx import helper

    inits.update(_rng_inits(rng, **{f"g{i}": [D], f"b{i}": [D]}))
    nodes.append(helper.make_node("LayerNormalization", [h, f"g{i}", f"b{i}"], [out], name=f"LN{i}", axis=-1))


def _stem(nodes, inits, rng, act=None):
    """``h0 = x @ W0 + c0`` (then ``act``, a non-affine stem, when given)."""
    from onnx import helper

    inits.update(_rng_inits(rng, w_in=[4, D], c_in=[D]))
    nodes += [helper.make_node("MatMul", ["x", "w_in"], ["p0"], name="Stem"),
              helper.make_node("Add", ["p0", "c_in"], ["h0" if act is None else "a0"], name="StemBias")]
    if act is not None:
        nodes.append(helper.make_node(act, ["a0"], ["h0"], name="StemAct"))
    return "h0"


def _run(model, ctx=None, name="preln_to_rmsnorm"):
    """The pass through the real runner; the outputs of before and after on ONNX Runtime agree to 1e-5 relative."""
    from tests.graph_helpers import random_feeds
    from tests.graph_helpers import ort_run as run_feeds

    out, result = run_step(model, name, ctx or PassContext())
    converted = [r for r in result.rewrites if r.what.startswith("LayerNormalization")]
    assert result.matched == len(converted) + len(result.skipped), result
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    for seed in (0, 1):
        feeds = random_feeds(model, seed)
        ref, got = run_feeds(model, feeds), run_feeds(out, feeds)
        for k in ref:
            assert np.abs(got[k] - ref[k]).max() <= 1e-5 * np.abs(ref[k]).max(), k
    return out, result


FORMS = {"rmsnorm": "RMSNorm", "crmsnorm": "CRMSNorm"}


def _ops(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def _explicit(result):
    return [r for r in result.rewrites if r.what.startswith("explicit re-centring")]


def test_fuzz_regression_branch_output_is_recentred_explicitly():
    """tests/fuzz/regressions/preln_recentres_branch_output.onnx: the branch projection ``LN(h0) W1`` is also a
    graph output, so W1 stays as it is and the Add reads ``matmul7 - mean(matmul7)``; both LNs converted."""
    import os

    import onnx

    here = os.path.dirname(__file__)
    model = onnx.load(os.path.join(here, "..", "fuzz", "regressions", "preln_recentres_branch_output.onnx"))
    out, result = _run(model)
    assert not result.skipped and len(_ops(out, "RMSNorm")) == 2 and not _ops(out, "LayerNormalization")
    (e,) = _explicit(result)
    assert "matmul7 - mean(matmul7)" in e.what and "also a graph output" in e.what
    w6 = next(i for i in out.graph.initializer if i.name == "w6")  # the branch weight is untouched
    assert any(n.op_type == "MatMul" and "w6" in n.input for n in out.graph.node)
    assert w6 is not None


@pytest.mark.parametrize("form", ["rmsnorm", "crmsnorm"])
def test_layer_scale_is_folded_into_the_branch_projection(form):
    """CaiT / DeiT-III / BEiT / DINOv2: ``h + gamma * (LN(h) W + c)``: gamma goes into W and c, the Mul goes."""
    rng = np.random.default_rng(0)
    nodes, inits = [], {}
    h = _stem(nodes, inits, rng)
    for i in range(2):
        h = _block(i, h, nodes, inits, rng, scale=True)
    _final_ln(2, h, nodes, inits, rng)
    out, result = _run(_graph(nodes, inits, ["y"]), PassContext(preln_form=form), f"preln_to_{form}")
    assert not result.skipped and not _explicit(result)
    assert len(_ops(out, FORMS[form])) == 3
    assert not [n for n in out.graph.node if n.name.startswith("LayerScale")]
    names = {i.name for i in out.graph.initializer}
    assert not any("scaled" in n for n in names), names  # the intermediate scaled weights are gone


@pytest.mark.parametrize("form", list(FORMS))
def test_non_affine_stem_gets_one_explicit_recentring(form):
    """Whisper's conv + GELU stem (here MatMul + Tanh): h0 is re-centred by one node pair, the rest in weights."""
    rng = np.random.default_rng(1)
    nodes, inits = [], {}
    h = _stem(nodes, inits, rng, act="Tanh")
    for i in range(2):
        h = _block(i, h, nodes, inits, rng)
    _final_ln(2, h, nodes, inits, rng)
    out, result = _run(_graph(nodes, inits, ["y"]), PassContext(preln_form=form), f"preln_to_{form}")
    assert not result.skipped and len(_ops(out, FORMS[form])) == 3
    (e,) = _explicit(result)
    assert "h0_recentred = h0 - mean(h0)" in e.what and "Tanh StemAct" in e.what and "not affine" in e.what
    assert len(_ops(out, "ReduceMean")) == 1 or form == "crmsnorm"


def test_final_stream_tensor_as_graph_output_keeps_the_stream():
    """CLIP's / BEiT's last_hidden_state: the last stream tensor is a graph output, so every stream value before it
    keeps its value: no LN converted, each skipped naming the output."""
    rng = np.random.default_rng(2)
    nodes, inits = [], {}
    h = _stem(nodes, inits, rng)
    for i in range(2):
        h = _block(i, h, nodes, inits, rng)
    _final_ln(2, h, nodes, inits, rng)
    out, result = _run(_graph(nodes, inits, ["y", h]))
    assert not result.rewrites and len(result.skipped) == 3
    assert all(f"stream tensor {h} is a graph output" in s.reason for s in result.skipped), result.skipped
    assert all("side read" not in s.reason for s in result.skipped)


@pytest.mark.parametrize("form", list(FORMS))
def test_intermediate_graph_output_converts_the_stream_past_it(form):
    """A hidden state returned mid-stream: LNs up to it stay, one re-centring past it, the rest converted."""
    rng = np.random.default_rng(3)
    nodes, inits = [], {}
    h = _stem(nodes, inits, rng)
    for i in range(3):
        h = _block(i, h, nodes, inits, rng)
    _final_ln(3, h, nodes, inits, rng)
    out, result = _run(_graph(nodes, inits, ["y", "h1"]), PassContext(preln_form=form), f"preln_to_{form}")
    assert sorted(s.node for s in result.skipped) == ["LN0", "LN1"]
    assert sorted(n.name for n in _ops(out, FORMS[form])) == ["LN2", "LN3"]
    (e,) = _explicit(result)
    assert "h1_recentred = h1 - mean(h1)" in e.what and "stream tensor h1 is a graph output" in e.what


@pytest.mark.parametrize("form", list(FORMS))
def test_tied_table_is_recentred_where_gathered_not_copied(form):
    """A table read by the embedding Gather and by a tied head (``MatMul(x, Transpose(E))``): the gathered rows are
    re-centred by one node pair; no centred copy of the table is stored."""
    from onnx import helper

    rng = np.random.default_rng(4)
    vocab = 50
    inits = _rng_inits(rng, E=[vocab, D], P=[1, 5, D])
    nodes = [helper.make_node("Gather", ["E", "ids"], ["tok"], name="Embed"),
             helper.make_node("Add", ["tok", "P"], ["h0"], name="AddPos")]
    h = "h0"
    for i in range(2):
        h = _block(i, h, nodes, inits, rng)
    _final_ln(2, h, nodes, inits, rng, out="f")
    nodes += [helper.make_node("Transpose", ["E"], ["Et"], name="HeadT", perm=[1, 0]),
              helper.make_node("MatMul", ["f", "Et"], ["logits"], name="Head")]
    model = _graph(nodes, inits, ["logits"], inputs=(("ids", [2, 5]),))
    out, result = _run(model, PassContext(preln_form=form), f"preln_to_{form}")
    assert not result.skipped and len(_ops(out, FORMS[form])) == 3
    (e,) = _explicit(result)
    assert "tok_recentred = tok - mean(...)" in e.what and "Transpose HeadT" in e.what, e.what
    tables = [i for i in out.graph.initializer if list(i.dims) == [vocab, D]]
    assert [t.name for t in tables] == ["E"]  # the one original table, no copy
    pos = next(i for i in out.graph.initializer if list(i.dims) == [1, 5, D])
    from onnx import numpy_helper

    np.testing.assert_allclose(numpy_helper.to_array(pos).mean(-1), 0, atol=1e-6)  # the positions, in the weights


def test_untied_table_is_centred_a_slice_at_a_time(monkeypatch):
    """The float64 temporaries of a re-centring stay under CHUNK_BYTES: the slices give the same table."""
    import tracemalloc

    from normdeploy.rewrite import preln_to_rmsnorm as p

    rng = np.random.default_rng(5)
    table = rng.standard_normal((4096, 64)).astype(np.float32)
    whole = p.centred_as(table, -1)
    monkeypatch.setattr(p, "CHUNK_BYTES", 1 << 18)
    tracemalloc.start()
    sliced = p.centred_as(table, -1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(sliced, whole)
    assert sliced.dtype == np.float32
    assert peak <= table.nbytes + 2 * (1 << 18) + (1 << 16), peak  # the result and one slice's float64, not 4x
    scale = rng.random(64) + 0.5
    np.testing.assert_allclose(p.centred_as(table, -1, scale),
                               (table * scale - (table * scale).mean(-1, keepdims=True)), rtol=1e-5, atol=1e-6)


def test_weights_are_recentred_one_at_a_time():
    """Issue 13: the pass's float64 temporaries are one weight's, not every re-centred weight's at once."""
    import tracemalloc

    import onnx_ir as ir
    from onnx import helper

    from normdeploy.core.passes import PassResult
    from normdeploy.rewrite.preln_to_rmsnorm import preln_to_rmsnorm

    d, blocks = 256, 8
    rng = np.random.default_rng(6)
    inits = {"w_in": rng.standard_normal((4, d)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"], name="Stem")]
    for i in range(blocks + 1):
        inits[f"g{i}"], inits[f"b{i}"] = (rng.random(d) + 0.5).astype(np.float32), rng.random(d).astype(np.float32)
        nodes.append(helper.make_node("LayerNormalization", [f"h{i}", f"g{i}", f"b{i}"], [f"ln{i}"], name=f"LN{i}"))
        if i < blocks:
            inits[f"w{i}"] = rng.standard_normal((d, d)).astype(np.float32)
            nodes += [helper.make_node("MatMul", [f"ln{i}", f"w{i}"], [f"mm{i}"], name=f"MM{i}"),
                      helper.make_node("Add", [f"h{i}", f"mm{i}"], [f"h{i + 1}"], name=f"Res{i}")]
    model = ir.from_proto(_graph(nodes, inits, [f"ln{blocks}"]))
    result = PassResult("preln_to_rmsnorm", True)
    tracemalloc.start()
    preln_to_rmsnorm(model.graph, PassContext(), result)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len([r for r in result.rewrites if r.what.startswith("LayerNormalization")]) == blocks + 1
    one = d * d * 4  # one weight, float32
    assert held >= blocks * one  # the new weights
    assert peak - held <= 8 * one < blocks * 2 * one, (peak - held) / one  # float64: 2x a weight, for all 8 would be 16x
