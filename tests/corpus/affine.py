"""Per-channel constant affine corpus: normalizations that arrive as Mul / Div / Add / Sub by constants.

Canonical math (DESIGN.md 3.1): ``y = a_c x + c_c`` with constant ``a``, ``c`` varying along one
channel axis; :func:`normdeploy.core.affine.constant_affine` composes the chain, and
``fold_affine_into_linear`` folds it into a linear neighbour like a BatchNormalization.

Every module is an own re-spelling of the eval arithmetic of the file its docstring names (same
ops, same order). timm and torchvision are not installed here (timm imports torchvision).
"""
from __future__ import annotations

import torch
from torch import nn

TORCHVISION = "pytorch/vision (torchvision/ops/misc.py, class FrozenBatchNorm2d)"
TIMM = "huggingface/pytorch-image-models@aa4b5850"
MPBN = "yfguo91/MPBN@524aed98 (models/spike_layer.py, class tdBatchNorm2d)"


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameters and buffers: gains in +-[0.5, 1.5], shifts and means N(0, 0.5), variances
    in [0.3, 2] (every float buffer whose name says var), so that a wrong fold cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.dtype.is_floating_point:
                continue
            if "var" in name:
                t.copy_(0.3 + 1.7 * torch.rand(t.shape, generator=g))
            elif name.endswith("weight") and t.dim() == 1 or "gamma" in name:
                sign = torch.where(torch.rand(t.shape, generator=g) < 0.2, -1.0, 1.0)
                t.copy_(sign * (0.5 + torch.rand(t.shape, generator=g)))
            elif t.dim() <= 1:
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
    return module


class FrozenBatchNorm2d(nn.Module):
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones): BatchNorm2d with fixed statistics, written as
    ``scale = w * (rv + eps).rsqrt()``, ``bias = b - rm * scale``, ``x * scale + bias`` on
    ``reshape(1, -1, 1, 1)`` views of the four buffers (eps 1e-5). The TorchScript exporter folds
    scale and bias to two constants (``x * C1 + C2``); dynamo keeps their arithmetic on the buffers."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class FrozenBNBackbone(nn.Module):
    """A detection-backbone stem as torchvision builds it with ``norm_layer=FrozenBatchNorm2d``:
    conv (padded, no bias) -> FrozenBN -> ReLU -> conv -> FrozenBN: both fold into the conv before them."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), FrozenBatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), FrozenBatchNorm2d(c)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class FrozenBNPreAct(nn.Module):
    """Pre-activation order (``bn -> conv``): after a ReLU the FrozenBN has no linear producer and folds into
    the padded conv after it, its scale into the weight and its shift kept as an Add before the conv."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.bn, self.conv = FrozenBatchNorm2d(3), nn.Conv2d(3, c, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(x)))


class LayerScale(nn.Module):
    """timm's ``LayerScale`` (timm/models/vision_transformer.py): ``x * gamma`` (``inplace=False``)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class LayerScaleMlp(nn.Module):
    """A ViT MLP sublayer with layer scale (CaiT, DeiT-III, DINOv2 blocks in timm's vision_transformer.py):
    ``x + ls(fc2(gelu(fc1(x))))``; ``gamma`` folds into ``fc2`` (its producer)."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.fc1, self.fc2, self.ls = nn.Linear(d, hidden), nn.Linear(hidden, d), LayerScale(d, 0.1)

    def forward(self, x):
        return x + self.ls(self.fc2(nn.functional.gelu(self.fc1(x))))


class ConvNeXtGamma(nn.Module):
    """timm's ConvNeXt block tail (timm/models/convnext.py, ``ConvNeXtBlock.forward``, ``use_conv_mlp=False``):
    channels-last MLP, ``permute(0, 3, 1, 2)``, then ``x.mul(self.gamma.reshape(1, -1, 1, 1))`` (its layer
    scale) before the residual add: gamma folds through the permute into ``fc2``."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x):
        shortcut = x
        x = self.dw(x).permute(0, 2, 3, 1)
        x = self.fc2(nn.functional.gelu(self.fc1(x)))
        x = x.permute(0, 3, 1, 2)
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


class TdBatchNorm(nn.Module):
    """The eval branch of MPBN's ``tdBatchNorm2d`` (threshold-dependent BN) on ``[T, B, C, H, W]``:
    ``alpha * V_th * (x - mean.reshape(1, 1, C, 1, 1)) / sqrt(var.reshape(...) + eps)``, then
    ``x * weight.reshape(...) + bias.reshape(...)`` (a decomposed BN on axis 2, V_th = 0.5)."""

    def __init__(self, c: int, alpha: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.alpha, self.V_th, self.eps = alpha, 0.5, eps
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        c = x.shape[2]
        mean, var = self.running_mean, self.running_var
        x = self.alpha * self.V_th * (x - mean.reshape(1, 1, c, 1, 1)) / \
            (torch.sqrt(var.reshape(1, 1, c, 1, 1) + self.eps))
        return x * self.weight.reshape(1, 1, c, 1, 1) + self.bias.reshape(1, 1, c, 1, 1)


class TdBNConv(nn.Module):
    """Per-step conv over ``[T, B, C, H, W]`` as MPBN's ``SpikePool`` runs it (reshape to ``[T*B, C, H, W]``,
    conv, view back), then ``tdBatchNorm2d``: the decomposed BN folds through the reshape into the conv."""

    def __init__(self, c: int = 4, t: int = 2):
        super().__init__()
        self.conv, self.bn, self.t = nn.Conv2d(c, c, 3, padding=1), TdBatchNorm(c), t

    def forward(self, x):
        T, B, C, H, W = x.shape
        out = self.conv(x.reshape(-1, C, H, W))
        out = out.view(T, B, out.shape[1], out.shape[2], out.shape[3])
        return self.bn(out)


class TiedLMHead(nn.Module):
    """A decoder's end with tied embeddings (Hugging Face ``tie_word_embeddings``, GPT-2's ``lm_head.weight =
    wte.weight``): ``logits = ln_f(h) @ wte.weight.T`` (exported ``MatMul(x, Transpose(W))``), the
    embedding ``Gather`` reading the same W. ln_f's gain folds into a clone of the head's weight; a non-zero
    ln_f bias stays in the LayerNormalization (the head has no bias to take it)."""

    def __init__(self, vocab: int = 32, d: int = 16, bias: bool = True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(self.wte(ids)))
        return self.lm_head(self.ln_f(h))
