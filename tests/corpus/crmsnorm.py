"""CRMSNorm and Pre-LN / Pre-RMSNorm / Pre-CRMSNorm transformers, written as
ZixuanJiang/pre-rmsnorm-transformer (commit 025d43a0) writes them.

torch/customized_layer.py defines three affine-free norms on the last axis, each applied to
``x.float()`` and cast back with ``.type_as(x)`` inside an ``nn.LayerNorm`` subclass (built with
``elementwise_affine=False``, so there is no gain)::

    layer_norm: (x - mean) * rsqrt(var(correction=0) + eps)
    rms_norm:   x * rsqrt(mean(x^2) + eps)
    crms_norm:  x * rsqrt((sum(x^2) + sum(x)^2) / (d + 1) + eps)     on the d stored coordinates

The source wraps each function in ``torch.compile`` (``decorator = torch.compile``); that is
dropped here: torch.export traces through it to the same graph, and TorchScript's exporter
refuses compiled functions. torch/model.py's GPT: ``h = wte(ids) + wpe(pos)``, per layer
``x = x + attn(norm1(x)); x = x + ff(norm2(x))``, a final norm, an untied ``final_linear``; for
``pre-crms`` the model width is dim - 1; ``pre_rms_training`` re-centres each branch output
(``LinearZeroMeanOutput``) and the embedding sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ZJ = "ZixuanJiang/pre-rmsnorm-transformer@025d43a0"


def layer_norm(x, eps: float):
    """torch/customized_layer.py ``layer_norm``."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


def rms_norm(x, eps: float):
    """torch/customized_layer.py ``rms_norm``."""
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def crms_norm(x, eps: float):
    """torch/customized_layer.py ``crms_norm``: the discarded coordinate is ``-sum(x)``."""
    discarded = x.sum(dim=-1, keepdim=True)
    return x * torch.rsqrt((x.square().sum(dim=-1, keepdim=True) + discarded.square()) / (x.shape[-1] + 1) + eps)


class CustomizedLayerNorm(nn.LayerNorm):
    """torch/customized_layer.py ``CustomizedLayerNorm``: ``layer_norm(x.float(), eps).type_as(x)``."""

    def forward(self, x):
        return layer_norm(x.float(), self.eps).type_as(x)


class RMSNorm(nn.LayerNorm):
    """torch/customized_layer.py ``RMSNorm``: ``rms_norm(x.float(), eps).type_as(x)``."""

    def forward(self, x):
        return rms_norm(x.float(), self.eps).type_as(x)


class CRMSNorm(nn.LayerNorm):
    """torch/customized_layer.py ``CRMSNorm``: ``crms_norm(x.float(), eps).type_as(x)``."""

    def forward(self, x):
        return crms_norm(x.float(), self.eps).type_as(x)


class LinearZeroMeanOutput(nn.Linear):
    """torch/customized_layer.py ``LinearZeroMeanOutput``: W and b re-centred over the output dim at each call."""

    def forward(self, x):
        return F.linear(x, self.weight - self.weight.mean(dim=0, keepdim=True), self.bias - self.bias.mean())


class Attention(nn.Module):
    """torch/model.py ``Attention``: to_qkv, chunk(3), 'b n (h d) -> b h n d' (einops, written as
    reshape + transpose here), scaled_dot_product_attention, 'b h n d -> b n (h d)', to_out."""

    def __init__(self, dim, heads, dim_head, is_causal, zero_mean_output):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.is_causal = heads, is_causal
        self.to_qkv = nn.Linear(dim, inner * 3, bias=True)
        self.to_out = (LinearZeroMeanOutput if zero_mean_output else nn.Linear)(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """torch/model.py ``FeedForward``: Linear, GELU, Linear (or LinearZeroMeanOutput)."""

    def __init__(self, dim, hidden, zero_mean_output):
        super().__init__()
        out = LinearZeroMeanOutput if zero_mean_output else nn.Linear
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), out(hidden, dim))

    def forward(self, x):
        return self.net(x)


METHODS = {"pre-ln": nn.LayerNorm, "pre-customized-ln": CustomizedLayerNorm, "pre-rms": RMSNorm, "pre-crms": CRMSNorm}


class GPT(nn.Module):
    """torch/model.py ``GPT`` (with its ``Transformer``), small: causal attention, norms without affine."""

    def __init__(self, method="pre-ln", vocab=128, seq=16, dim=64, depth=2, heads=4, pre_rms_training=False):
        super().__init__()
        norm = METHODS[method]
        if method == "pre-crms":
            dim -= 1
        self.pre_rms_training = pre_rms_training and method == "pre-rms"
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([norm(dim, elementwise_affine=False), Attention(dim, heads, 16, True, self.pre_rms_training),
                           norm(dim, elementwise_affine=False), FeedForward(dim, 4 * dim, self.pre_rms_training)])
            for _ in range(depth))
        self.norm = norm(dim, elementwise_affine=False)
        self.final_linear = nn.Linear(dim, vocab)

    def forward(self, ids):
        pos = torch.arange(0, ids.shape[1], dtype=torch.long, device=ids.device).unsqueeze(0)
        h = self.wte(ids) + self.wpe(pos)
        if self.pre_rms_training:
            h = h - h.mean(dim=-1, keepdim=True)
        for norm1, attn, norm2, ff in self.layers:
            h = h + attn(norm1(h))
            h = h + ff(norm2(h))
        return self.final_linear(self.norm(h))
