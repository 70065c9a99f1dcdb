"""ScaleNorm corpus: ``y = g x / max(||x||_2, eps)`` (g one scalar, last axis) as its code writes it.

The paper's code (tnq177/transformers_without_tears) divides a 0-d gain by ``torch.norm`` clamped
from below; other code writes the norm as the root of a sum of squares, bounds it with
``torch.max`` against an eps tensor, or scales the norm by ``d ** -0.5`` before clamping
(lucidrains' x-transformers, mmpose's RTMCC block). Every module is an own re-spelling of the
arithmetic of the file its docstring names (same ops, same order).
"""
from __future__ import annotations

import torch
from torch import nn

TNQ = "tnq177/transformers_without_tears (layers.py)"


class ScaleNorm(nn.Module):
    """tnq177/transformers_without_tears ``layers.py``, class ``ScaleNorm`` (commit 02ef0632).

    ``scale`` is a 0-d parameter (``sqrt(d)`` in the paper's encoder); the forward computes
    ``scale / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)`` and multiplies x by it.
    """

    def __init__(self, scale: float, eps: float = 1e-5):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.eps = eps

    def forward(self, x):
        factor = self.scale / torch.norm(x, dim=-1, keepdim=True).clamp(min=self.eps)
        return x * factor


class SqrtSumScaleNorm(nn.Module):
    """The same function with the norm as ``sqrt(sum(x ** 2))`` and the bound as ``torch.max`` with an eps
    tensor (the paper's Eq. 4 written out, as re-implementations do)."""

    def __init__(self, scale: float, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(scale))
        self.register_buffer("eps", torch.tensor(eps))

    def forward(self, x):
        n = torch.sqrt(torch.sum(x ** 2, dim=-1, keepdim=True))
        return self.g * x / torch.max(n, self.eps)


class ScaledNormScaleNorm(nn.Module):
    """lucidrains/x-transformers ``x_transformers.py``, class ``ScaleNorm`` (also mmpose's
    ``rtmcc_block.py``): ``norm = torch.norm(x, dim=-1, keepdim=True) * d ** -0.5``, then
    ``x / norm.clamp(min=eps) * g`` with g a ``[1]`` parameter."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.scale = d ** -0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class ScaleNormFFN(nn.Module):
    """A pre-norm feed-forward sublayer of the paper's encoder (``Encoder.forward`` with ``pre_act``):
    ``x + ff(scale_norm(x))``, ``ff`` = Linear, ReLU, Linear."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.norm = ScaleNorm(d ** 0.5)
        self.in_proj, self.out_proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.out_proj(torch.relu(self.in_proj(self.norm(x))))


# ----------------------------------------------------------------------------- look-alikes (not ScaleNorm)


class L2Normalize(nn.Module):
    """``x / x.norm(dim=-1, keepdim=True)`` (CLIP's embedding normalization): no eps, left alone."""

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)
