"""Run plugin-lowered ONNX graphs on CPU: one ``onnx.reference`` op per normdeploy plugin.

Each op checks the node's wiring the way TensorRT's parser would see it (namespace,
number of inputs, attribute types; an attribute the plugin added later, such as RMSNorm's
``eps_outside`` and ``partial``, may be absent and then takes its default) and computes its
output with the plugin's Triton kernel under the Triton interpreter
(:mod:`normdeploy.lower.plugins.kernels`, CPU tensors). So a lowered model runs end to end without a GPU::

    from onnx.reference import ReferenceEvaluator
    from normdeploy.lower.plugins.emulate import PLUGIN_OPS
    outputs = ReferenceEvaluator(lowered_model, new_ops=PLUGIN_OPS).run(None, feeds)

numpy has no bfloat16, so bf16 graphs are out of reach here (the kernels' bf16 path is
tested directly under the interpreter).
"""
from __future__ import annotations

import numpy as np
from onnx import AttributeProto
from onnx.reference.op_run import OpRun

from .trt_plugins import NAMESPACE, PLUGINS

__all__ = ["PLUGIN_OPS", "PluginOp"]


def _torch(a: np.ndarray):
    import torch

    return torch.from_numpy(np.array(a, copy=True, order="C"))


class PluginOp(OpRun):
    """Base class: validates a plugin node, then calls :meth:`compute` with torch tensors and typed attributes."""

    op_domain = NAMESPACE

    def _run(self, *inputs, **attrs):
        spec = PLUGINS[type(self).__name__]
        ns = attrs.get("plugin_namespace")
        ns = ns.decode() if isinstance(ns, bytes) else ns
        if ns != NAMESPACE:
            raise ValueError(f"{spec.name}: plugin_namespace is {ns!r}, expected {NAMESPACE!r}")
        if len(inputs) != len(spec.inputs):
            raise ValueError(f"{spec.name}: {len(inputs)} inputs, the plugin takes {len(spec.inputs)}")
        # the attribute types TensorRT's parser turns into plugin fields: INT -> INT32, FLOAT -> FLOAT32
        kinds = {a.name: a.type for a in self.onnx_node.attribute}
        defaults = dict(spec.defaults)
        values = {}
        for name, typ in spec.attributes:
            want = AttributeProto.INT if typ is int else AttributeProto.FLOAT
            if name not in kinds and name in defaults:  # a field added later: its default is the old behaviour
                values[name] = defaults[name]
                continue
            if name not in kinds:
                raise ValueError(f"{spec.name}: attribute {name} missing (TensorRT would leave the field unset)")
            if kinds[name] != want:
                raise TypeError(f"{spec.name}: attribute {name} is ONNX type {kinds[name]}, "
                                f"the plugin field needs {want}")
            values[name] = typ(attrs[name])
        if kinds.get("plugin_namespace") != AttributeProto.STRING:
            raise TypeError(f"{spec.name}: plugin_namespace must be a STRING attribute")
        x = inputs[0]
        if x.dtype not in (np.float32, np.float16):
            raise TypeError(f"{spec.name}: input dtype {x.dtype}")
        y = self.compute(*[_torch(a) for a in inputs], **values)
        return (y.numpy().astype(x.dtype, copy=False),)

    def compute(self, *tensors, **attrs):  # pragma: no cover - abstract
        raise NotImplementedError


class NormdeployRMSNorm(PluginOp):
    def compute(self, x, g, epsilon, eps_outside=0, partial=0):
        from .kernels import rms_norm

        return rms_norm(x, g, epsilon, eps_outside=bool(eps_outside), partial=partial)


class NormdeployCRMSNorm(PluginOp):
    def compute(self, x, g, epsilon):
        from .kernels import crms_norm

        return crms_norm(x, g, epsilon)


class NormdeployGroupScaling(PluginOp):
    def compute(self, x, groups, epsilon):
        from .kernels import group_scaling

        return group_scaling(x, groups, epsilon)


class NormdeployScaleNorm(PluginOp):
    def compute(self, x, scale, epsilon):
        from .kernels import scale_norm

        return scale_norm(x, scale, epsilon)


class NormdeployDynamicTanh(PluginOp):
    def compute(self, x, w, b, alpha, axis):
        from .kernels import dynamic_tanh

        return dynamic_tanh(x, alpha, w, b, axis)


class NormdeployDynamicTanhGain(PluginOp):
    def compute(self, x, w, alpha, axis):
        from .kernels import dynamic_tanh

        return dynamic_tanh(x, alpha, w, None, axis)


class NormdeployDynamicTanhPlain(PluginOp):
    def compute(self, x, alpha):
        from .kernels import dynamic_tanh

        return dynamic_tanh(x, alpha)


#: the ``new_ops`` for ``onnx.reference.ReferenceEvaluator``
PLUGIN_OPS = [NormdeployRMSNorm, NormdeployCRMSNorm, NormdeployGroupScaling, NormdeployScaleNorm,
              NormdeployDynamicTanh, NormdeployDynamicTanhGain, NormdeployDynamicTanhPlain]

assert {op.__name__ for op in PLUGIN_OPS} == set(PLUGINS), "an emulator per plugin"
