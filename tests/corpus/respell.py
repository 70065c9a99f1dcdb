"""The zoo's trained ViTs re-spelled: each ``normdeploy.nn`` normalization replaced by this corpus's
module for the reference code that writes it, carrying the same trained parameters.

What ``benchmarks/readme_table.py`` measures as its "respelled" rows and
``tests/end_to_end/test_respelled_zoo.py`` checks: a user who wrote the zoo's networks with the
papers' or libraries' code would bring these models, and normdeploy must deploy them as it
deploys the zoo's own.
"""
from __future__ import annotations

import copy

import torch

from normdeploy import nn as ndn

from . import dyt, layernorm, powernorm, rmsnorm, scalenorm, unified_norm

#: zoo model -> (how its norms are re-spelled, the reference code named in the row)
RESPELLED = {
    "vit_ln": ("torch.var LayerNorm", "ZixuanJiang/pre-rmsnorm-transformer layer_norm, with gain and bias"),
    "vit_un": ("UN1d", "hikvision-research/Unified-Normalization UN1d, eval"),
    "vit_powernorm": ("MaskPowerNorm", "sIncerass/powernorm MaskPowerNorm + GroupScaling1D, eval"),
    "vit_dyt": ("DynamicTanh", "facebookresearch/DynamicTanh DynamicTanh(channels_last=True)"),
    "vit_rmsnorm": ("timm RmsNorm", "timm RmsNorm (fast_norm.rms_norm without apex)"),
    "vit_scalenorm": ("ScaleNorm", "tnq177/transformers_without_tears ScaleNorm"),
}


def respell(model):
    """The trained zoo ``model`` with each normdeploy.nn normalization replaced by the module its reference
    code writes (``tests/corpus``: re-spellings of the repositories :data:`RESPELLED` names) carrying the same
    parameters: the same trained network, as a user who wrote it with the paper's code would bring it."""
    def convert(m):
        with torch.no_grad():
            if isinstance(m, torch.nn.LayerNorm):
                new = layernorm.VarLayerNorm(m.normalized_shape[-1], m.eps)
                new.weight.copy_(m.weight), new.bias.copy_(m.bias)
            elif isinstance(m, ndn.UnifiedNorm):
                new = unified_norm.UN1d(m.num_features, m.eps)
                new.weight.copy_(m.weight), new.bias.copy_(m.bias), new.running_var.copy_(m.running_moment)
            elif isinstance(m, ndn.PowerNorm):
                new = powernorm.MaskPowerNorm(m.num_features, m.eps, group_num=m.groups)
                new.gp.eps = m.scaling.eps
                new.weight.copy_(m.weight), new.bias.copy_(m.bias)
                new.running_phi.copy_(m.running_phi.reshape(1, -1, 1, 1))
            elif isinstance(m, ndn.DynamicTanh):
                new = dyt.DynamicTanh(m.weight.numel(), channels_last=True)
                new.alpha.copy_(m.alpha.reshape(1)), new.weight.copy_(m.weight), new.bias.copy_(m.bias)
            elif isinstance(m, ndn.RMSNorm):
                new = rmsnorm.TimmRmsNorm(m.weight.numel(), m.eps)
                new.weight.copy_(m.weight)
            elif isinstance(m, ndn.ScaleNorm):
                new = scalenorm.ScaleNorm(float(m.scale), m.eps)
            else:
                return None
        return new

    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for key, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, key, new.eval())
    return model
