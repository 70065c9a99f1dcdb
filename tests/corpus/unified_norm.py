"""Unified Normalization corpus: UN1d as hikvision-research/Unified-Normalization writes its eval path.

Canonical math (DESIGN.md 2): ``y = w_c x / sqrt(r_c + eps) + b_c``, r the running uncentred
second moment, per channel. The module is an own re-spelling of the eval branch of ``UN1d``
in ``image_classification/models/unified_normalization/unified_normalization.py`` (commit
6e8497f0): same ops, same order; the training branch (``UN2dFunction``) and the mask
bookkeeping (which only feeds it) left out.
"""
from __future__ import annotations

import torch
from torch import nn

UN = "hikvision-research/Unified-Normalization (image_classification/models/unified_normalization/unified_normalization.py)"


class UN1d(nn.Module):
    """``UN1d`` eval: tokens ``[B, N, C]`` permuted to ``[B, C, N]``, reshaped to ``[B, C, N, 1]``; divided by
    ``(running_var.view(1, C, 1, 1) + eps).sqrt()``; then ``weight.view(1, C, 1, 1) * x + bias.view(1, C, 1, 1)``;
    the layout undone (reshape, permute)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        x = x.permute(0, 2, 1).contiguous()
        input_shape = x.size()
        x = x.reshape(x.size(0), self.num_features, -1).unsqueeze(-1)
        c = x.size(1)
        var = self.running_var.view(1, c, 1, 1)
        x = x / (var + self.eps).sqrt()
        x = self.weight.view(1, c, 1, 1) * x + self.bias.view(1, c, 1, 1)
        x = x.reshape(input_shape)
        return x.permute(0, 2, 1).contiguous()


class UNMlp(nn.Module):
    """A pre-norm transformer MLP sublayer with UN1d in place of LayerNorm (how the paper uses UN in its
    T2T-ViT models): ``x + fc2(gelu(fc1(norm(x))))``; the UN affine folds into ``fc1``."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.norm = UN1d(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
