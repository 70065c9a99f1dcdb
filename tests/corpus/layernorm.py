"""LayerNorm corpus: the spellings of LayerNorm that recognizers meet in real code.

Canonical math (DESIGN.md 2): ``y = g (x - mean) / sqrt(var + eps) + b``, var biased, over the
last axis (tokens) or axis 1 (NCHW). The spellings differ in how the variance is formed:
``(x - u).pow(2).mean``, ``torch.var`` / ``torch.var_mean`` (keepdim or not; the dynamo exporter
writes ``ReduceMean(keepdims=0)`` and a ``Reshape`` or ``Unsqueeze`` back, and var_mean's mean
as ``ReduceSum / N``), ``E[x^2] - E[x]^2`` clamped at 0, or the *unbiased* variance (a different
function: left alone). Every module is an own re-spelling of the arithmetic of the file its
docstring names.
"""
from __future__ import annotations

import torch
from torch import nn

BZHANG = "bzhangGo/rmsnorm@2e726f1a"
TIMM = "huggingface/pytorch-image-models@aa4b5850"
ZJ = "ZixuanJiang/pre-rmsnorm-transformer@025d43a0"


class _Affine(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps


class VarLayerNorm(_Affine):
    """LayerNorm through ``torch.var(x, -1, unbiased=False, keepdim=True)`` and ``x.mean(-1, keepdim=True)``:
    the arithmetic of ``layer_norm`` in ZixuanJiang/pre-rmsnorm-transformer torch/customized_layer.py
    (``x.var(dim=-1, keepdim=True, correction=0)``, ``(x - m) * rsqrt(v + eps)``), with a gain and a bias."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__(d, eps)

    def forward(self, x):
        m = x.mean(dim=-1, keepdim=True)
        v = x.var(dim=-1, keepdim=True, correction=0)
        return (x - m) * torch.rsqrt(v + self.eps) * self.weight + self.bias


class VarNoKeepdimLayerNorm(VarLayerNorm):
    """As :class:`VarLayerNorm` with ``torch.var(x, -1, unbiased=False)[..., None]`` (keepdim off, then a new
    axis), the form of the Theano ``ln`` of bzhangGo/rmsnorm layers.py (``x.var(1)[:, None]``) on tokens."""

    def forward(self, x):
        m = x.mean(-1)[..., None]
        v = torch.var(x, -1, unbiased=False)[..., None]
        return (x - m) * torch.rsqrt(v + self.eps) * self.weight + self.bias


class VarMeanLayerNorm(VarLayerNorm):
    """LayerNorm through ``torch.var_mean(x, dim, unbiased=False, keepdim=True)`` on the last axis: the
    arithmetic of timm's ``_layer_norm_cf`` (timm/layers/norm.py), which does it on axis 1."""

    def forward(self, x):
        v, m = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
        return (x - m) * torch.rsqrt(v + self.eps) * self.weight + self.bias


class TimmLayerNormCf(nn.Module):
    """timm ``_layer_norm_cf`` (timm/layers/norm.py, used by ``LayerNormExp2d`` on non-contiguous NCHW):
    ``s, u = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)``, ``(x - u) * rsqrt(s + eps)``,
    ``x * w[:, None, None] + b[:, None, None]``; eps 1e-6."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        s, u = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        x = (x - u) * torch.rsqrt(s + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class TimmLayerNormCfSqm(TimmLayerNormCf):
    """timm ``_layer_norm_cf_sqm`` (timm/layers/norm.py): the one-pass variance
    ``s = ((x * x).mean(1, keepdim) - u * u).clamp(0)``, then as ``_layer_norm_cf`` with ``w.view(1, -1, 1, 1)``."""

    def forward(self, x):
        u = x.mean(dim=1, keepdim=True)
        s = ((x * x).mean(dim=1, keepdim=True) - (u * u)).clamp(0)
        x = (x - u) * torch.rsqrt(s + self.eps)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class BzhangLN(nn.Module):
    """The Theano ``ln`` of bzhangGo/rmsnorm layers.py in torch ops, on [tokens, d]:
    ``(x - x.mean(1)[:, None]) / sqrt(x.var(1)[:, None] + 1e-5)``, ``s[None, :] * out + b[None, :]``
    (Theano's ``var`` is the biased one)."""

    def __init__(self, d: int):
        super().__init__()
        self.s, self.b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        out = (x - x.mean(1)[:, None]) / torch.sqrt(x.var(1, unbiased=False)[:, None] + 1e-5)
        return self.s[None, :] * out + self.b[None, :]


class TimmSimpleNorm(nn.Module):
    """timm ``SimpleNorm`` (timm/layers/norm.py) through ``simple_norm`` of timm/layers/fast_norm.py:
    ``x * rsqrt(torch.var(x, dim=-1, keepdim=True) + eps) * w`` with the UNBIASED variance and x not
    centred: neither LayerNorm nor RMSNorm (left alone, with the reason)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        v = torch.var(x, dim=-1, keepdim=True)
        return x * torch.rsqrt(v + self.eps) * self.weight


class UnbiasedVarLayerNorm(VarLayerNorm):
    """``(x - m) * rsqrt(torch.var(x, -1, keepdim=True) + eps)`` with torch's default, the UNBIASED variance
    (the slip of writing ``x.var`` without ``correction=0``): a different function from LayerNorm."""

    def forward(self, x):
        m = x.mean(dim=-1, keepdim=True)
        v = x.var(dim=-1, keepdim=True)
        return (x - m) * torch.rsqrt(v + self.eps) * self.weight + self.bias


class ConvNeXtLayerNormCf(nn.Module):
    """ConvNeXt's ``LayerNorm`` with ``data_format="channels_first"`` (facebookresearch/ConvNeXt,
    models/convnext.py): ``u = x.mean(1, keepdim)``, ``s = (x - u).pow(2).mean(1, keepdim)``,
    ``(x - u) / sqrt(s + eps)``, then ``w[:, None, None] * x + b[:, None, None]``; eps 1e-6."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]
