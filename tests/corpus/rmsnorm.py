"""RMSNorm corpus: modules written as the paper's code, timm, Hugging Face and torch write RMSNorm.

Canonical math (DESIGN.md 2): ``y = g x / sqrt(mean(x^2) + eps)`` over the last axis (axis 1 of
NCHW for the channels-first forms). The spellings differ in where eps sits (inside the root or
added to the rms outside it), how the mean of squares is formed (Pow, Mul(x, x), a 2-norm scaled
by d^-1/2), the reciprocal (Div, rsqrt), the gain ((1 + w) for Gemma, before or after the
product), the axis, partial statistics (bzhang's ``p``) and the Casts of mixed precision.

Every module is an own re-spelling of the arithmetic of the file its docstring names (same ops,
same order), except the Hugging Face classes, which are the real ones. timm is not installed
here (its 1.0 packages import torchvision), so its modules are written as timm writes them.
"""
from __future__ import annotations

import torch
from torch import nn

BZHANG = "bzhangGo/rmsnorm@2e726f1a"
TIMM = "huggingface/pytorch-image-models@aa4b5850"


class BzhangRMSNorm(nn.Module):
    """The paper's PyTorch RMSNorm (bzhangGo/rmsnorm, rmsnorm_torch.py, class RMSNorm).

    ``rms = ||x_[:k]||_2 * k^(-1/2)``, ``y = scale * (x / (rms + eps)) [+ offset]``, with k = d, or
    ``int(d * p)`` for partial RMSNorm (0 <= p <= 1: the statistic over the first k channels of
    ``torch.split(x, [k, d - k], -1)``, applied to all d). eps (1e-8) is added OUTSIDE the root:
    a different function from the plain RMSNorm, the canonical node's ``eps_outside=1`` (and ``partial=k``).
    """

    def __init__(self, d: int, p: float = -1.0, eps: float = 1e-8, bias: bool = False):
        super().__init__()
        self.d, self.p, self.eps, self.bias = d, p, eps, bias
        self.scale = nn.Parameter(torch.ones(d))
        if bias:
            self.offset = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        if 0.0 <= self.p <= 1.0:
            k = int(self.d * self.p)
            part, _ = torch.split(x, [k, self.d - k], dim=-1)
            norm = part.norm(2, dim=-1, keepdim=True)
        else:
            k = self.d
            norm = x.norm(2, dim=-1, keepdim=True)
        normed = x / (norm * k ** (-1.0 / 2) + self.eps)
        return self.scale * normed + self.offset if self.bias else self.scale * normed


class BzhangRMSNormTF(nn.Module):
    """The paper's TensorFlow ``rms_norm`` (bzhangGo/rmsnorm, rmsnorm_tensorflow.py) in torch ops.

    ``ms = mean(x_[:k] ** 2, -1, keepdims)``, ``y = scale * x * rsqrt(ms + eps) + offset``; eps (1e-8)
    INSIDE the root; ``offset`` is the constant 0. without bias (still added, as the source does). With p, the
    canonical node's ``partial=k``.
    """

    def __init__(self, d: int, p: float = -1.0, eps: float = 1e-8, bias: bool = False):
        super().__init__()
        self.d, self.p, self.eps = d, p, eps
        self.scale = nn.Parameter(torch.ones(d))
        self.offset = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x):
        if 0.0 <= self.p <= 1.0:
            k = int(self.d * self.p)
            part, _ = torch.split(x, [k, self.d - k], dim=-1)
            ms = torch.mean(part ** 2, -1, keepdim=True)
        else:
            ms = torch.mean(x ** 2, -1, keepdim=True)
        offset = self.offset if self.offset is not None else 0.0
        return self.scale * x * torch.rsqrt(ms + self.eps) + offset


class BzhangRLN(nn.Module):
    """The paper's Theano ``rln`` (bzhangGo/rmsnorm, layers.py) in torch ops, on [tokens, d].

    ``y = s[None, :] * (x / sqrt((x * x).mean(1)[:, None] + 1e-5))``: the statistic drops axis 1
    (keepdims off) and ``[:, None]`` brings it back.
    """

    def __init__(self, d: int):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d))

    def forward(self, x):
        out = x / torch.sqrt((x * x).mean(1)[:, None] + 1e-5)
        return self.s[None, :] * out


class TimmRmsNorm(nn.Module):
    """timm ``RmsNorm`` (timm/layers/norm.py) through ``rms_norm`` of timm/layers/fast_norm.py, its path
    without apex: ``v = mean(x.pow(2), dims=(-1,), keepdim)``, ``x * rsqrt(v + eps) * weight``; eps 1e-6."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        v = torch.mean(x.pow(2), dim=(-1,), keepdim=True)
        return x * torch.rsqrt(v + self.eps) * self.weight


class TimmRmsNorm2d(nn.Module):
    """timm ``RmsNorm2d`` (timm/layers/norm.py) through ``rms_norm2d`` of timm/layers/fast_norm.py:
    channels-first NCHW, ``v = mean(x.pow(2), dim=1, keepdim)``, ``x * rsqrt(v + eps) * w.reshape(1, -1, 1, 1)``."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        v = torch.mean(x.pow(2), dim=1, keepdim=True)
        x = x * torch.rsqrt(v + self.eps)
        return x * self.weight.reshape(1, -1, 1, 1)


class TimmRmsNorm2dFp32(TimmRmsNorm2d):
    """timm ``RmsNorm2dFp32`` (timm/layers/norm.py): ``rms_norm2d(x.float(), w.float()).to(x.dtype)``:
    the statistic, product and gain in float32 around a half-precision model."""

    def forward(self, x):
        v = torch.mean(x.float().pow(2), dim=1, keepdim=True)
        y = x.float() * torch.rsqrt(v + self.eps)
        return (y * self.weight.float().reshape(1, -1, 1, 1)).to(x.dtype)


class TimmConvNeXtRmsBlock(nn.Module):
    """The stem and first block of timm's ``convnext_atto_rms`` (timm/models/convnext.py: dims 40,
    ``conv_mlp=True``, ``norm_layer='rmsnorm2d'``): stem Conv 4x4/4 -> RmsNorm2d; ConvNeXtBlock:
    depthwise Conv 7x7 -> RmsNorm2d -> Mlp(use_conv) 1x1 Conv, GELU, 1x1 Conv -> ``x.mul(gamma.reshape(1,
    -1, 1, 1))`` -> + shortcut. With ``conv_mlp=False`` the block's norm is timm's channels-last RmsNorm
    between ``permute(0, 2, 3, 1)`` and ``permute(0, 3, 1, 2)`` and the Mlp is Linear."""

    def __init__(self, dim: int = 40, conv_mlp: bool = True):
        super().__init__()
        self.conv_mlp = conv_mlp
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, 4), TimmRmsNorm2d(dim))
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = TimmRmsNorm2d(dim) if conv_mlp else TimmRmsNorm(dim)
        lin = (lambda i, o: nn.Conv2d(i, o, 1)) if conv_mlp else nn.Linear
        self.fc1, self.act, self.fc2 = lin(dim, 4 * dim), nn.GELU(), lin(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x):
        x = self.stem(x)
        shortcut = x
        x = self.conv_dw(x)
        if self.conv_mlp:
            x = self.fc2(self.act(self.fc1(self.norm(x))))
        else:
            x = self.fc2(self.act(self.fc1(self.norm(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return x.mul(self.gamma.reshape(1, -1, 1, 1)) + shortcut


def hf_classes():
    """The real Hugging Face RMSNorm classes (transformers.models.*.modeling_*)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return {"llama": LlamaRMSNorm, "t5": T5LayerNorm, "gemma": GemmaRMSNorm}
