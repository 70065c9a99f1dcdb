"""DyT corpus: Dynamic Tanh as its authors' code writes it, in the blocks that use it, and its look-alikes.

Canonical math (DESIGN.md 2): ``y = w_c tanh(alpha x) + b_c`` with alpha one scalar, w and b per
channel on the last axis (``channels_last``) or on axis 1 of NCHW (channels-first).

Every module is an own re-spelling of the arithmetic of the file its docstring names (same ops,
same order). The look-alikes at the end are NOT normalizations and must come out untouched:
tanh soft-capping ``c tanh(x / c)`` (Gemma 2's logits and attention scores), a bare ``tanh``
activation and the tanh approximation of GELU.
"""
from __future__ import annotations

import math

import torch
from torch import nn

DYT = "facebookresearch/DynamicTanh (dynamic_tanh.py)"


class DynamicTanh(nn.Module):
    """facebookresearch/DynamicTanh ``dynamic_tanh.py``, class ``DynamicTanh``.

    ``alpha`` is a ``[1]`` parameter (init 0.5), ``weight`` / ``bias`` are ``[C]``; the forward takes
    ``tanh(alpha * x)`` first, then ``* weight + bias`` (``channels_last``) or
    ``* weight[:, None, None] + bias[:, None, None]`` (channels-first, NCHW).
    """

    def __init__(self, normalized_shape: int, channels_last: bool, alpha_init_value: float = 0.5):
        super().__init__()
        self.normalized_shape = normalized_shape
        self.channels_last = channels_last
        self.alpha = nn.Parameter(torch.ones(1) * alpha_init_value)
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x):
        t = torch.tanh(self.alpha * x)
        if self.channels_last:
            return t * self.weight + self.bias
        return t * self.weight[:, None, None] + self.bias[:, None, None]


class DyTMlp(nn.Module):
    """A ViT block's pre-norm MLP with DyT in place of LayerNorm (how the DyT repository's ViT uses it:
    ``convert_ln_to_dyt`` swaps each ``nn.LayerNorm`` for ``DynamicTanh(..., channels_last=True)``)."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.norm = DynamicTanh(d, channels_last=True)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class DyTConvStem(nn.Module):
    """ConvNeXt's downsampling stem with channels-first DyT (the DyT repository converts ConvNeXt's
    ``LayerNorm(data_format="channels_first")`` to ``DynamicTanh(..., channels_last=False)``)."""

    def __init__(self, c_in: int = 3, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, kernel_size=2, stride=2)
        self.norm = DynamicTanh(c, channels_last=False)
        self.proj = nn.Conv2d(c, c, kernel_size=1)

    def forward(self, x):
        return self.proj(self.norm(self.conv(x)))


# ----------------------------------------------------------------------------- look-alikes (not DyT)


class SoftCap(nn.Module):
    """Tanh soft-capping ``cap * tanh(x / cap)`` (Gemma 2's final logits, transformers ``modeling_gemma2.py``):
    a scalar on both sides of the tanh, no per-channel weight."""

    def __init__(self, cap: float = 30.0):
        super().__init__()
        self.cap = cap

    def forward(self, x):
        return torch.tanh(x / self.cap) * self.cap


class BareTanh(nn.Module):
    """A plain ``nn.Tanh`` activation after a linear layer."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class TanhGelu(nn.Module):
    """The tanh approximation of GELU written out (GPT-2's ``gelu_new``, transformers ``activations.py``):
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
