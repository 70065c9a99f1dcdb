"""PyTorch reference modules for the normalizations normdeploy deploys.

Eval-time math (DESIGN.md section 2; x is the input, c the channel index):

* UnifiedNorm   y = w_c x / sqrt(r_c + eps) + b_c, r = running *uncentred* second moment
* PowerNorm     x' = x / sqrt(mean_group(x^2) + eps_g)   (GroupScaling, per token)
                y  = w_c x' / sqrt(phi_c + eps) + b_c      (per-channel affine)
* RMSNorm       y = g x / sqrt(mean(x^2) + eps)
* CRMSNorm      on d-1 stored coordinates: y = g x / sqrt((sum x^2 + (sum x)^2) / d + eps)
* DynamicTanh   y = w_c tanh(alpha x) + b_c, alpha one scalar
* ScaleNorm     y = g x / max(||x||_2, eps), g one scalar
* LIFNeuron     u_t = tau u_{t-1} (1 - o_{t-1}) + x_t;  o_t = [MPBN(u_t) > theta]

In eval mode, under ``torch.onnx.export``, each normalization module emits one node
in the ONNX domain ``normdeploy`` (see :mod:`normdeploy.core.ops`, which also holds the
ONNX function bodies appended after export, so that the file runs on any runtime).
The LIF neuron exports as its unrolled standard-op form (BatchNormalization,
Greater, Cast per time step) because its normalization folds into the threshold.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .core import ops

__all__ = [
    "UnifiedNorm",
    "GroupScaling",
    "PowerNorm",
    "RMSNorm",
    "CRMSNorm",
    "DynamicTanh",
    "ScaleNorm",
    "LIFNeuron",
    "NORM_MODULES",
]


def _exporting(module: nn.Module) -> bool:
    return torch.onnx.is_in_onnx_export() and not module.training


def _symbolic(op: str, inputs, attrs: dict, like: torch.Tensor) -> torch.Tensor:
    return torch.onnx.ops.symbolic(
        f"{ops.DOMAIN}::{op}", tuple(inputs), attrs, dtype=like.dtype, shape=like.shape, version=1
    )


def _bcast(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """View a per-channel vector so that it broadcasts along ``axis`` of ``x``."""
    pos = axis % x.dim()
    return v.reshape([-1] + [1] * (x.dim() - pos - 1))


class UnifiedNorm(nn.Module):
    """Unified Normalization (Yang et al., CVPR 2022), normalizing by a running second moment.

    Training: the per-channel uncentred second moment ``z`` of the batch (over every axis
    but ``axis``) is smoothed with the geometric mean of the last ``window`` batch
    statistics (fluctuation smoothing); a batch whose ``z`` departs from the smoothed value
    by more than the adaptive threshold (``outlier_factor`` times the running mean of the
    log-ratio's magnitude) is an outlier and is normalized by its own statistics and kept
    out of the window (outlier filtration). The running moment ``r`` follows the smoothed
    statistic with ``momentum``.

    Eval (exact, what is deployed): ``y = w_c x / sqrt(r_c + eps) + b_c``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, axis: int = 1, momentum: float = 0.1,
                 window: int = 4, outlier_factor: float = 5.0):
        super().__init__()
        self.num_features, self.eps, self.axis = num_features, eps, axis
        self.momentum, self.window, self.outlier_factor = momentum, window, outlier_factor
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_moment", torch.ones(num_features))
        self.register_buffer("history", torch.ones(window, num_features))
        self.register_buffer("history_len", torch.zeros((), dtype=torch.long))
        self.register_buffer("log_dev", torch.zeros(()))

    def _batch_moment(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.axis % x.dim()
        dims = [d for d in range(x.dim()) if d != pos]
        return x.pow(2).mean(dim=dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting(self):
            return _symbolic("UnifiedNorm", (x, self.running_moment, self.weight, self.bias),
                             {"epsilon": float(self.eps), "axis": int(self.axis)}, x)
        if self.training:
            z = self._batch_moment(x)
            n = int(self.history_len)
            with torch.no_grad():
                if n:
                    past = self.history[: min(n, self.window)].clamp_min(1e-12).log().mean(0)
                    dev = (z.detach().clamp_min(1e-12).log() - past).abs().mean()
                    outlier = n >= self.window and dev > self.outlier_factor * self.log_dev.clamp_min(1e-3)
                else:
                    past, dev, outlier = None, torch.zeros(()), False
            if n == 0 or outlier:
                stat = z  # outlier filtration: own statistics, not merged into the window
            else:
                k = min(n, self.window - 1)
                logs = torch.cat([self.history[:k].clamp_min(1e-12).log(), z.clamp_min(1e-12).log()[None]])
                stat = logs.mean(0).exp()  # fluctuation smoothing: geometric mean of the window
            with torch.no_grad():
                if not outlier:
                    self.history.copy_(torch.roll(self.history, 1, 0))
                    self.history[0] = z.detach()
                    self.history_len += 1
                    self.log_dev.mul_(0.9).add_(0.1 * dev)
                self.running_moment.mul_(1 - self.momentum).add_(self.momentum * stat.detach())
            r = stat
        else:
            r = self.running_moment
        scale = self.weight / torch.sqrt(r + self.eps)
        return x * _bcast(scale, x, self.axis) + _bcast(self.bias, x, self.axis)


class GroupScaling(nn.Module):
    """PowerNorm's per-token stage: ``x / sqrt(mean over its group of x^2 + eps)``.

    Groups are contiguous blocks of ``C / groups`` channels on the last axis. No gain.
    """

    def __init__(self, groups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting(self):
            return _symbolic("GroupScaling", (x,), {"groups": int(self.groups), "epsilon": float(self.eps)}, x)
        c = x.shape[-1]
        if c % self.groups:
            raise ValueError(f"GroupScaling: {c} channels are not divisible into {self.groups} groups")
        g = x.reshape(*x.shape[:-1], self.groups, c // self.groups)
        g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.reshape(x.shape)


class PowerNorm(nn.Module):
    """PowerNorm (Shen et al., ICML 2020) on token inputs ``[..., C]``.

    ``x' = GroupScaling(x)``; training normalizes ``x'`` by the running quadratic mean
    ``phi`` *before* this batch's update (the forward pass of the paper's Algorithm 1,
    ``psi_{B-1}``), then updates ``phi <- (1 - momentum) phi + momentum mean(x'^2)``.
    Eval: ``y = w_c x' / sqrt(phi_c + eps) + b_c``. The affine part folds; GroupScaling
    needs a kernel.
    """

    def __init__(self, num_features: int, groups: int = 1, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.groups, self.eps, self.momentum = num_features, groups, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_phi", torch.ones(num_features))
        self.scaling = GroupScaling(groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting(self):
            return _symbolic("PowerNorm", (x, self.running_phi, self.weight, self.bias),
                             {"groups": int(self.groups), "epsilon": float(self.eps)}, x)
        xs = self.scaling(x)
        phi = self.running_phi.clone()
        if self.training:
            with torch.no_grad():
                batch_phi = xs.detach().pow(2).reshape(-1, self.num_features).mean(0)
                self.running_phi.mul_(1 - self.momentum).add_(self.momentum * batch_phi)
        return xs * (self.weight / torch.sqrt(phi + self.eps)) + self.bias


class RMSNorm(nn.Module):
    """RMSNorm over the last axis: ``y = g x / sqrt(mean(x^2) + eps)``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting(self):
            return _symbolic("RMSNorm", (x, self.weight), {"epsilon": float(self.eps)}, x)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class CRMSNorm(nn.Module):
    """Compressed RMSNorm (Jiang et al., NeurIPS 2023) on d-1 stored coordinates.

    A zero-mean vector of dimension d is stored without its last coordinate
    (x_d = -sum of the others), so ``sum x^2 over d = sum x^2 + (sum x)^2`` over d-1, and
    ``y = g x / sqrt((sum x^2 + (sum x)^2) / d + eps)``. ``dim`` is the stored width d-1.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting(self):
            return _symbolic("CRMSNorm", (x, self.weight), {"epsilon": float(self.eps)}, x)
        d = x.shape[-1] + 1
        ms = (x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)) / d
        return self.weight * x * torch.rsqrt(ms + self.eps)


class DynamicTanh(nn.Module):
    """Dynamic Tanh (Zhu et al., CVPR 2025): ``y = w_c tanh(alpha x) + b_c``.

    ``axis`` is the channel axis of ``w`` and ``b`` (-1 for tokens, 1 for NCHW).
    """

    def __init__(self, num_features: int, alpha_init: float = 0.5, axis: int = -1):
        super().__init__()
        self.axis = axis
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting(self):
            return _symbolic("DynamicTanh", (x, self.alpha, self.weight, self.bias), {"axis": int(self.axis)}, x)
        return _bcast(self.weight, x, self.axis) * torch.tanh(self.alpha * x) + _bcast(self.bias, x, self.axis)


class ScaleNorm(nn.Module):
    """ScaleNorm (Nguyen and Salazar, 2019): ``y = g x / max(||x||_2, eps)``, g one scalar."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.tensor(math.sqrt(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting(self):
            return _symbolic("ScaleNorm", (x, self.scale), {"epsilon": float(self.eps)}, x)
        return self.scale * x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.eps)


class _Spike(torch.autograd.Function):
    """Heaviside forward, rectangular surrogate gradient of width 1 around the threshold."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * (v.abs() < 0.5).to(grad.dtype)


class LIFNeuron(nn.Module):
    """Leaky integrate-and-fire neuron with Membrane-Potential BatchNorm (Guo et al., ICCV 2023).

    Input ``[T, N, C, ...]``, output spikes of the same shape:
    ``u_t = tau u_{t-1} (1 - o_{t-1}) + x_t``, ``o_t = [BN(u_t) > theta]``, with ``u_0 = 0``.
    The state carried between steps is the un-normalized ``u``, so in eval mode BN folds
    into a per-channel threshold (DESIGN.md section 2). ``mpbn=False`` gives the plain LIF
    ``o_t = [u_t > theta]``. Exports as the unrolled T-step graph of standard ops.
    """

    def __init__(self, channels: int, tau: float = 0.5, theta: float = 1.0, mpbn: bool = True):
        super().__init__()
        self.tau, self.theta = tau, theta
        self.bn = nn.BatchNorm2d(channels) if mpbn else None

    def _norm(self, u: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return u
        if u.dim() == 2:
            return nn.functional.batch_norm(u, self.bn.running_mean, self.bn.running_var, self.bn.weight,
                                            self.bn.bias, self.bn.training, self.bn.momentum, self.bn.eps)
        return self.bn(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.zeros_like(x[0])
        o = torch.zeros_like(x[0])
        out = []
        for t in range(x.shape[0]):
            u = self.tau * u * (1 - o) + x[t]
            o = _Spike.apply(self._norm(u) - self.theta)
            out.append(o)
        return torch.stack(out)


NORM_MODULES = (UnifiedNorm, GroupScaling, PowerNorm, RMSNorm, CRMSNorm, DynamicTanh, ScaleNorm, LIFNeuron)
