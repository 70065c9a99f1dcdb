"""MPBN corpus: the LIF neuron with membrane-potential BatchNorm as yfguo91/MPBN writes it.

Canonical math (DESIGN.md 2): ``u_t = decay u_{t-1} (1 - o_{t-1}) + x_t``, ``o_t = [BN(u_t) / V_th > 0.5]``;
``fold_mpbn_into_threshold`` folds BN (and the Div by V_th) into a per-channel threshold on the
un-normalized u. Every module is an own re-spelling of ``models/spike_layer.py`` at commit
524aed98 (same ops, same order): ``mem_update``, ``spike_activation`` (its straight-through
``(out_s.float() - out_bp).detach() + out_bp`` with the tanh surrogate, ``temp = 3``), ``LIFAct``
(decay 0.25, ``V_th = 1.0``), ``SpikePool`` (a conv run on ``[T*B, C, H, W]``), ``SpikeConv`` (one
call per step, ``torch.stack``) and ``myBatchNorm3d`` (``permute(1, 2, 0, 3, 4)``, BatchNorm3d,
``permute(2, 0, 1, 3, 4)``). Only the eval / spiking path is kept (``_spiking = True``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

MPBN = "yfguo91/MPBN@524aed98 (models/spike_layer.py)"


def spike_activation(x, ste: bool = False, temp: float = 1.0):
    """MPBN's ``spike_activation``: the spike ``x > 0.5``, returned straight-through a surrogate."""
    out_s = torch.gt(x, 0.5)
    if ste:
        out_bp = torch.clamp(x, 0, 1)
    else:
        out_bp = torch.clamp(x, 0, 1)
        out_bp = (torch.tanh(temp * (out_bp - 0.5)) + np.tanh(temp * 0.5)) / (2 * (np.tanh(temp * 0.5)))
    return (out_s.float() - out_bp).detach() + out_bp


def mem_update(bn, x_in, mem, V_th, decay, temp=1.0):
    """MPBN's ``mem_update``: leak and integrate, BN on the membrane potential, spike, hard reset."""
    mem = mem * decay + x_in
    mem2 = bn(mem)
    spike = spike_activation(mem2 / V_th, temp=temp)
    mem = mem * (1 - spike)
    return mem, spike


class LIFAct(nn.Module):
    """MPBN's ``LIFAct`` in spiking mode: input ``[T, B, C, H, W]``, BatchNorm2d on the membrane potential."""

    def __init__(self, step: int, channel: int, v_th: float = 1.0, ste: bool = False):
        super().__init__()
        self.step, self.V_th, self.temp, self.ste = step, v_th, 3.0, ste
        self.bn = nn.BatchNorm2d(channel)

    def forward(self, x):
        u = torch.zeros_like(x[0])
        out = []
        for i in range(self.step):
            if self.ste:  # the same update with spike_activation(ste=True)
                u = u * 0.25 + x[i]
                spike = spike_activation(self.bn(u) / self.V_th, ste=True)
                u = u * (1 - spike)
                out_i = spike
            else:
                u, out_i = mem_update(bn=self.bn, x_in=x[i], mem=u, V_th=self.V_th, decay=0.25, temp=self.temp)
            out += [out_i]
        return torch.stack(out)


class SpikePool(nn.Module):
    """MPBN's ``SpikePool``: ``[T, B, C, H, W]`` reshaped to ``[T*B, C, H, W]``, the module, viewed back."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        T, B, C, H, W = x.shape
        out = self.pool(x.reshape(-1, C, H, W))
        B_o, C_o, H_o, W_o = out.shape
        return out.view(T, B, C_o, H_o, W_o).contiguous()


class SpikeConv(nn.Module):
    """MPBN's ``SpikeConv``: the module once per time step, ``torch.stack`` over time (a Concat when exported)."""

    def __init__(self, conv: nn.Module, step: int = 2):
        super().__init__()
        self.conv, self.step = conv, step

    def forward(self, x):
        return torch.stack([self.conv(x[i]) for i in range(self.step)])


class MyBatchNorm3d(nn.Module):
    """MPBN's ``myBatchNorm3d``: BatchNorm3d over ``[B, C, T, H, W]`` between two permutes."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm3d(channels)

    def forward(self, x):
        out = x.permute(1, 2, 0, 3, 4)
        out = self.bn(out)
        return out.permute(2, 0, 1, 3, 4).contiguous()


class SpikingBlock(nn.Module):
    """A spiking conv block as ``SpikeModel`` rewrites a CNN: ``conv -> myBatchNorm3d -> LIFAct``, twice, the
    first conv as ``SpikePool`` (reshape) or ``SpikeConv`` (per step, stacked: ``stacked=True``); the
    input image repeated over ``step`` time steps (``input.repeat(step, 1, 1, 1, 1)``), the spikes
    averaged over time at the end (``out.mean([0])``) after a pooled linear classifier."""

    def __init__(self, c: int = 4, step: int = 3, stacked: bool = False, v_th: float = 1.0, ste: bool = False):
        super().__init__()
        self.step = step
        conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv1 = SpikeConv(conv1, step) if stacked else SpikePool(conv1)
        self.bn1, self.act1 = MyBatchNorm3d(c), LIFAct(step, c, v_th, ste)
        self.conv2, self.bn2, self.act2 = SpikePool(nn.Conv2d(c, c, 3, padding=1)), MyBatchNorm3d(c), \
            LIFAct(step, c, v_th, ste)
        self.fc = SpikeConv(nn.Linear(c, 5), step)

    def forward(self, x):
        x = x.repeat(self.step, 1, 1, 1, 1)
        s1 = self.act1(self.bn1(self.conv1(x)))
        s2 = self.act2(self.bn2(self.conv2(s1)))
        pooled = s2.mean([3, 4])
        return self.fc(pooled).mean([0]), s1, s2


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affines (some gammas negative), conv weights scaled so that the
    neurons fire at a rate far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                n = m.num_features
                sign = torch.where(torch.rand(n, generator=g) < 0.25, -1.0, 1.0)
                m.weight.copy_(sign * (0.5 + torch.rand(n, generator=g)))
                m.bias.copy_(0.5 * torch.randn(n, generator=g) + 0.3)
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.3 + 1.7 * torch.rand(n, generator=g))
    return module
