"""Pre-LN -> Pre-RMSNorm (DESIGN.md 3.3) on real architectures: exact, and refused where it is not."""
import numpy as np
import pytest
import torch
import transformers

from normdeploy.core.passes import PassContext
from tests.conftest import export_hf, hf_input, ort_run
from tests.graph_helpers import run_step

pytestmark = pytest.mark.slow  # exports whole models

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


def test_side_read_of_the_stream_is_refused():
    """A stream tensor that is also a graph output (hidden states returned) breaks the condition."""
    import onnx

    torch.manual_seed(0)
    model, name, shape, dtype = gpt2(64, 2, 4)
    proto = export_hf(model, name, shape, dtype)
    ln = next(n for n in proto.graph.node if n.op_type == "LayerNormalization" and "h.1.ln_1" in n.name)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(ln.input[0], onnx.TensorProto.FLOAT, None))
    out, result = run_step(proto, "preln_to_rmsnorm", PassContext())
    assert result.rewrites == []
    assert all(f"stream tensor {ln.input[0]} is a graph output" in s.reason for s in result.skipped), result.skipped
