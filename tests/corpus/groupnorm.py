"""GroupNorm and EvoNorm corpus: GroupNorm as diffusion UNets and timm use it, timm's EvoNorm B0 / S0.

GroupNorm math: ``y = w_c (x - mean_g) / sqrt(var_g + eps) + b_c``, statistics per sample over the
``C / G`` channels of group g and all positions. torch's ``F.group_norm`` exports (TorchScript, and
dynamo below opset 21) as ``Reshape(x, [N, G, -1]) -> InstanceNormalization(1, 0) -> Reshape(x's shape)
-> Mul(w) -> Add(b)`` and (dynamo, opset 21+) as one ``GroupNormalization``.

EvoNorm (timm/layers/evo_norm.py at commit 3b93a6c7, written as timm writes it; timm is not
installable here): ``EvoNorm2dB0``: ``x / max(sqrt(running_var + eps), x v + instance_std(x)) * w + b``;
``EvoNorm2dS0``: ``x sigmoid(x v) / group_std(x) * w + b``. Their cores are not affine (a max, a
sigmoid of the input); only the trailing ``* w + b`` is.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

TIMM = "huggingface/pytorch-image-models@3b93a6c7 (timm/layers/evo_norm.py, timm/layers/norm.py)"
DIFFUSERS = "huggingface/diffusers (models/resnet.py ResnetBlock2D, models/attention_processor.py)"


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial gains (some negative), biases, EvoNorm v and running variances."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.dtype.is_floating_point or t.dim() != 1:
                continue
            if "running_var" in name:
                t.copy_(0.3 + 1.7 * torch.rand(t.shape, generator=g))
            elif name.endswith("weight") or name.endswith(".v"):
                sign = torch.where(torch.rand(t.shape, generator=g) < 0.2, -1.0, 1.0)
                t.copy_(sign * (0.5 + torch.rand(t.shape, generator=g)))
            else:
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
    return module


class TimmGroupNorm(nn.GroupNorm):
    """timm's ``GroupNorm`` (timm/layers/norm.py): ``nn.GroupNorm`` whose forward is
    ``F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)`` (eps 1e-5); ``GroupNorm1`` is it
    with one group (PoolFormer, ConvNeXt-GN)."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ResnetBlock(nn.Module):
    """A diffusion UNet ResnetBlock2D (diffusers' resnet.py, without the time embedding):
    ``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``, GroupNorm(groups, eps 1e-6) before each SiLU: the
    gain cannot fold (SiLU is not linear); the normalization stays, lowered to the target's fastest form."""

    def __init__(self, c: int = 8, groups: int = 4):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c, eps=1e-6), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c, eps=1e-6), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class AttnBlock(nn.Module):
    """A diffusion UNet's spatial self-attention (the VAE's ``AttnBlock`` / diffusers' attention on
    ``group_norm``): GroupNorm, then 1x1-conv q, k, v: every reader of the normalized tensor is linear, so
    the gain and bias fold into q, k and v and the GroupNorm keeps unit gain."""

    def __init__(self, c: int = 8, groups: int = 4):
        super().__init__()
        self.norm = TimmGroupNorm(c, groups, eps=1e-6)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = self.q(hn), self.k(hn), self.v(hn)
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        k = k.reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)
        out = torch.bmm(v.reshape(b, c, h * w), attn.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj(out)


def instance_std(x, eps: float = 1e-5):
    """timm's ``instance_std``: ``x.float().var(dim=(2, 3), unbiased=False, keepdim=True).add(eps).sqrt()``."""
    std = x.float().var(dim=(2, 3), unbiased=False, keepdim=True).add(eps).sqrt().to(x.dtype)
    return std.expand(x.shape)


def group_std(x, groups: int = 32, eps: float = 1e-5):
    """timm's ``group_std`` (``flatten=False``): the std over ``[C / G, H, W]`` of ``x.reshape(B, G, C / G, H, W)``."""
    B, C, H, W = x.shape
    x_dtype = x.dtype
    x = x.reshape(B, groups, C // groups, H, W)
    std = x.float().var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(eps).sqrt().to(x_dtype)
    return std.expand(x.shape).reshape(B, C, H, W)


class EvoNorm2dB0(nn.Module):
    """timm's ``EvoNorm2dB0`` eval path (eps 1e-3)."""

    def __init__(self, num_features: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        x_dtype = x.dtype
        v_shape = (1, -1, 1, 1)
        var = self.running_var
        left = var.add(self.eps).sqrt_().to(x_dtype).view(v_shape).expand_as(x)
        v = self.v.to(x_dtype).view(v_shape)
        right = x * v + instance_std(x, self.eps)
        x = x / left.max(right)
        return x * self.weight.to(x_dtype).view(v_shape) + self.bias.to(x_dtype).view(v_shape)


class EvoNorm2dS0(nn.Module):
    """timm's ``EvoNorm2dS0`` (eps 1e-5, ``groups`` groups)."""

    def __init__(self, num_features: int, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))

    def forward(self, x):
        x_dtype = x.dtype
        v_shape = (1, -1, 1, 1)
        v = self.v.view(v_shape).to(x_dtype)
        x = x * (x * v).sigmoid() / group_std(x, self.groups, self.eps)
        return x * self.weight.view(v_shape).to(x_dtype) + self.bias.view(v_shape).to(x_dtype)


class EvoNormConvBlock(nn.Module):
    """timm's ``ConvNormAct`` with an EvoNorm (``norm_act_layer``): conv -> EvoNorm -> conv; the EvoNorm's
    trailing ``* w + b`` folds into the second conv (kept shift: it pads)."""

    def __init__(self, kind: str = "S0", c: int = 8, groups: int = 4):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.norm = EvoNorm2dS0(c, groups) if kind == "S0" else EvoNorm2dB0(c)

    def forward(self, x):
        return self.conv2(self.norm(self.conv1(x)))
