"""Pre-LN transformers as Hugging Face transformers writes them, for the Pre-LN -> Pre-RMSNorm rewrite (issue 12.2).

Every builder returns ``(module, args)`` for :func:`tests.corpus.harness.export` / ``check``: a
transformers model from a small config with random weights (its own ``_init_weights``), every
LayerNorm's gain and bias (and every layer scale) randomized so that a wrong fold or a wrong
re-centring shows, wrapped so that it takes one tensor and returns a tuple of tensors (the
outputs a user exports). The modules are transformers' own (``transformers/models/<m>/modeling_<m>.py``
of the installed release), not re-writes:

* CLIP (``modeling_clip.py``): ``CLIPVisionModel`` (class and position embeddings, a
  ``pre_layrnorm`` whose output starts the stream, ``last_hidden_state`` = the stream itself);
  ``CLIPTextModel`` (token + position embeddings, ``final_layer_norm``);
* DINOv2 (``modeling_dinov2.py``, ``Dinov2LayerScale``: ``hidden * lambda1`` before each residual Add);
* BEiT (``modeling_beit.py``: ``lambda_1 * attention_output`` layer scale, mean-pooling head,
  ``last_hidden_state`` = the stream);
* Whisper's encoder (``modeling_whisper.py``: ``gelu(conv2(gelu(conv1(x))))`` stem);
* Swin (``modeling_swin.py``: window partition / reverse, cyclic shift, patch merging);
* GPT-2 (``modeling_gpt2.py``, ``GPT2LMHeadModel`` with the LM head tied to ``wte``);
* Llama (``modeling_llama.py``: RMSNorm already, RoPE's ``q * cos + rotate_half(q) * sin``).
"""
from __future__ import annotations

import torch

#: the stream width of every builder below (small, so that the fast tests stay fast)
D = 32


class Outputs(torch.nn.Module):
    """``model(x)`` with the named outputs, as a tuple (what an exporter writes as the graph outputs).

    ``mask``: pass ``attention_mask = ones_like(x)`` too, as a text model's user does (without one,
    transformers' mask code looks for packed sequences with ``torch.diff``, which the TorchScript
    exporter cannot export).
    """

    def __init__(self, model, keys: tuple[str, ...], arg: str, mask: bool = False):
        super().__init__()
        self.model, self.keys, self.arg, self.mask = model, keys, arg, mask

    def forward(self, x):
        kw = {"attention_mask": torch.ones_like(x)} if self.mask else {}
        out = self.model(**{self.arg: x}, **kw)
        return tuple(out[k] for k in self.keys)


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial LayerNorm gains and biases and layer scales (fresh models have g = 1, b = 0, lambda = 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
        for name, p in model.named_parameters():
            if name.endswith(("lambda1", "lambda_1", "lambda_2")):  # DINOv2 / BEiT layer scales
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def clip_vision(layers: int = 2, keys=("last_hidden_state", "pooler_output")):
    t = _quiet()
    cfg = t.CLIPVisionConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=layers, num_attention_heads=4,
                             image_size=16, patch_size=8, projection_dim=D)
    torch.manual_seed(0)
    return Outputs(randomize_norms(t.CLIPVisionModel(cfg)), keys, "pixel_values"), (torch.randn(2, 3, 16, 16),)


def clip_text(layers: int = 2, keys=("last_hidden_state", "pooler_output")):
    t = _quiet()
    cfg = t.CLIPTextConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=layers, num_attention_heads=4,
                           vocab_size=100, max_position_embeddings=16, eos_token_id=2)
    torch.manual_seed(0)
    return Outputs(randomize_norms(t.CLIPTextModel(cfg)), keys, "input_ids", mask=True), (torch.randint(0, 100, (2, 8)),)


def dinov2(layers: int = 2, keys=("last_hidden_state", "pooler_output")):
    t = _quiet()
    cfg = t.Dinov2Config(hidden_size=D, num_hidden_layers=layers, num_attention_heads=4, mlp_ratio=2, image_size=16,
                         patch_size=8)
    torch.manual_seed(0)
    return Outputs(randomize_norms(t.Dinov2Model(cfg)), keys, "pixel_values"), (torch.randn(2, 3, 16, 16),)


def beit(layers: int = 2, keys=("last_hidden_state", "pooler_output")):
    t = _quiet()
    cfg = t.BeitConfig(hidden_size=D, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * D,
                       image_size=16, patch_size=8, use_mean_pooling=True, layer_scale_init_value=0.1,
                       use_relative_position_bias=False, use_absolute_position_embeddings=True)
    torch.manual_seed(0)
    return Outputs(randomize_norms(t.BeitModel(cfg)), keys, "pixel_values"), (torch.randn(2, 3, 16, 16),)


def whisper_encoder(layers: int = 2, keys=("last_hidden_state",)):
    t = _quiet()
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = t.WhisperConfig(d_model=D, encoder_layers=layers, encoder_attention_heads=4, encoder_ffn_dim=2 * D,
                          num_mel_bins=8, max_source_positions=8)
    torch.manual_seed(0)
    # WhisperEncoder wants exactly 2 * max_source_positions frames
    return Outputs(randomize_norms(WhisperEncoder(cfg)), keys, "input_features"), (torch.randn(2, 8, 16),)


def swin(depths=(2, 2), keys=("last_hidden_state", "pooler_output")):
    t = _quiet()
    cfg = t.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=list(depths), num_heads=[2] * len(depths),
                       window_size=2, mlp_ratio=2.0)
    torch.manual_seed(0)
    return Outputs(randomize_norms(t.SwinModel(cfg)), keys, "pixel_values"), (torch.randn(2, 3, 16, 16),)


def gpt2_lm(layers: int = 2, d: int = D, vocab: int = 512, keys=("logits",)):
    """GPT-2 with its LM head tied to ``wte``. The exporters' constant folding (onnxscript's, 8192 elements at
    most) writes a transposed copy of a small table for the head; from ``vocab * d > 8192`` on, as in every real
    model, the head reads ``Transpose(wte)``, so the table has two readers."""
    t = _quiet()
    cfg = t.GPT2Config(n_embd=d, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=16, use_cache=False)
    torch.manual_seed(0)
    return (Outputs(randomize_norms(t.GPT2LMHeadModel(cfg)), keys, "input_ids", mask=True),
            (torch.randint(0, vocab, (2, 8)),))


def llama(layers: int = 2, keys=("last_hidden_state",)):
    t = _quiet()
    cfg = t.LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100, max_position_embeddings=16, use_cache=False)
    torch.manual_seed(0)
    model = t.LlamaModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # RMSNorm gains (fresh: 1)
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return Outputs(model.eval(), keys, "input_ids", mask=True), (torch.randint(0, 100, (2, 8)),)


def inputs_like(args: tuple, seed: int, batch: int | None = None) -> list:
    """Fresh inputs shaped like ``args`` (first axis ``batch`` if given): token ids below the largest example id
    (so within the vocabulary), floats normal(0.3, 1.5) (``harness.random_inputs`` would draw ids from a normal)."""
    import numpy as np

    rng = np.random.default_rng(2000 + seed)
    out = []
    for a in args:
        shape = tuple(a.shape) if batch is None else (batch, *tuple(a.shape)[1:])
        if a.dtype.is_floating_point:
            out.append(rng.normal(0.3, 1.5, shape).astype(np.float32))
        else:
            out.append(rng.integers(0, int(a.max()) + 1, shape).astype(np.int64))
    return out
