"""PowerNorm corpus: MaskPowerNorm and GroupScaling1D as sIncerass/powernorm writes them (eval mode).

Canonical math (DESIGN.md 2), on time-first tokens ``[T, B, C]``, G groups of C/G contiguous
channels: ``x' = x / sqrt(mean_group(x^2) + eps)`` (GroupScaling), then
``y = w_c x' / sqrt(phi_c + eps) + b_c`` with the running quadratic mean phi.

Both modules are own re-spellings of the arithmetic of
``fairseq/modules/norms/mask_powernorm.py`` (sIncerass/powernorm, commit 1159641f): same ops,
same order, the training branch and the mask bookkeeping of the eval branch (which only feeds
the training statistics) left out.
"""
from __future__ import annotations

import torch
from torch import nn

POWERNORM = "sIncerass/powernorm (fairseq/modules/norms/mask_powernorm.py)"


class GroupScaling1D(nn.Module):
    """``GroupScaling1D``: the second moment per group of ``C // group_num`` channels, spread back over the
    channels with ``torch.repeat_interleave`` BETWEEN the mean and the eps, then ``x / sqrt(m + eps)``."""

    def __init__(self, eps: float = 1e-5, group_num: int = 4):
        super().__init__()
        self.eps, self.group_num = eps, group_num

    def forward(self, input):
        t, b, c = input.shape[0], input.shape[1], input.shape[2]
        cg = c // self.group_num
        grouped = input.contiguous().reshape(t, b, self.group_num, cg)
        second = torch.mean(grouped * grouped, dim=3, keepdim=True)
        moment2 = torch.repeat_interleave(second, repeats=cg, dim=-1).contiguous().reshape(t, b, c)
        return input / torch.sqrt(moment2 + self.eps)


class MaskPowerNorm(nn.Module):
    """``MaskPowerNorm`` in eval mode without a pad mask: GroupScaling1D (its own default eps), the tokens
    laid out as ``[B, C, T, 1]`` (permute, reshape, unsqueeze), ``x / (running_phi + eps).sqrt()``, the
    per-channel ``weight`` and ``bias`` reshaped to ``[1, C, 1, 1]``, and the layout undone."""

    def __init__(self, num_features: int, eps: float = 1e-5, group_num: int = 1):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_phi", torch.ones(1, num_features, 1, 1))
        self.gp = GroupScaling1D(group_num=group_num)

    def forward(self, input):
        input = self.gp(input)
        input = input.permute(1, 2, 0).contiguous()
        input_shape = input.size()
        input = input.reshape(input.size(0), self.num_features, -1).unsqueeze(-1)
        c = input.size(1)
        output = input / (self.running_phi + self.eps).sqrt()
        output = self.weight.reshape(1, c, 1, 1) * output + self.bias.reshape(1, c, 1, 1)
        output = output.reshape(input_shape)
        return output.permute(2, 0, 1).contiguous()


class PowerNormFFN(nn.Module):
    """A fairseq-style pre-norm FFN sublayer with MaskPowerNorm in place of LayerNorm (how the paper uses it in
    its translation models): ``x + fc2(relu(fc1(norm(x))))``; the running-phi affine folds into ``fc1``."""

    def __init__(self, d: int = 16, hidden: int = 32, group_num: int = 4):
        super().__init__()
        self.norm = MaskPowerNorm(d, group_num=group_num)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class GroupScalingReshaped(nn.Module):
    """GroupScaling without ``repeat_interleave``, as :class:`normdeploy.nn.GroupScaling` writes it (and a ``.pt2``
    of it traces it): reshape to ``[..., G, C/G]``, divide each group by the root of its own mean of squares
    (``keepdim``, so it broadcasts over the group's channels), reshape back."""

    def __init__(self, groups: int = 4, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps

    def forward(self, x):
        c = x.shape[-1]
        g = x.reshape(*x.shape[:-1], self.groups, c // self.groups)
        g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.reshape(x.shape)


class PowerNormReshaped(nn.Module):
    """:class:`normdeploy.nn.PowerNorm` in eval, its arithmetic spelled out: :class:`GroupScalingReshaped`, then the
    running-phi affine ``x' * (w / sqrt(phi + eps)) + b`` on the last axis (a constant per-channel affine: its
    scale is computed from parameters only)."""

    def __init__(self, num_features: int, groups: int = 4, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_phi", torch.ones(num_features))
        self.scaling = GroupScalingReshaped(groups, eps)

    def forward(self, x):
        return self.scaling(x) * (self.weight / torch.sqrt(self.running_phi + self.eps)) + self.bias
