"""Lower canonical normalization nodes to normdeploy's TensorRT plugin nodes (``trt-*`` targets).

::

    X -> [normdeploy::RMSNorm(X, G)]           -> Y  =>  X -> [NormdeployRMSNorm(X, G)] -> Y
    X -> [normdeploy::PowerNorm(X, Phi, W, B)] -> Y  =>  X -> [NormdeployGroupScaling(X)] -> Mul(a) -> Add(b) -> Y
    X -> [normdeploy::UnifiedNorm(X, R, W, B)] -> Y  =>  X -> Mul(a) -> Add(b) -> Y

| canonical node | becomes | exact |
|---|---|---|
| RMSNorm(X, G)        | NormdeployRMSNorm(X, G), attributes epsilon, eps_outside = 0, partial = 0 | yes |
| ... eps_outside / partial | NormdeployRMSNorm(X, G), same fields: g x / (sqrt(mean(s^2)) + eps) | yes |
|                      | (eps_outside = 1), s = x[..., :k] (partial = k); fp32 statistic, as the function body | |
| CRMSNorm(X, G)       | NormdeployCRMSNorm(X, G): a kernel variant that sums x and x^2 in one pass | yes |
| GroupScaling(X)      | NormdeployGroupScaling(X), attributes groups, epsilon | yes |
| ScaleNorm(X, G)      | NormdeployScaleNorm(X), attributes scale = G (a constant scalar), epsilon | yes |
| DynamicTanh(X, Alpha, W, B) | NormdeployDynamicTanh(X, W, B), attributes alpha = Alpha (constant), axis | yes |
| ... B all zero       | NormdeployDynamicTanhGain(X, W), same attributes | yes |
| ... and W all one    | NormdeployDynamicTanhPlain(X), attribute alpha | yes |
| PowerNorm(X, Phi, W, B) | NormdeployGroupScaling(X), Mul by a = W / sqrt(Phi + eps), Add B (last axis) | to rounding |
| UnifiedNorm(X, R, W, B) | Mul by a = W / sqrt(R + eps), Add B, on the node's channel axis | to rounding |

LayerNormalization is left alone (TensorRT's own normalization layer). The per-channel
constants are computed in float64 from the stored parameters and cast once to the dtype
of X; "to rounding" means the output differs from the unlowered one by that rounding only.

Plugin node format (see :mod:`normdeploy.lower.plugins`): op_type = plugin name, domain = ``normdeploy``,
attributes = the plugin's fields (ONNX INT / FLOAT, which TensorRT's parser turns into
INT32 / FLOAT32 plugin fields) plus ``plugin_namespace = "normdeploy"`` (STRING) and
``aot = 1``. The domain is the plugin namespace, so a TensorRT 10.10+ parser finds the
plugin even without the attribute, and the ops stay out of the default ONNX domain, where
``onnx.checker`` would reject them. Plugin ops have no function body: the lowered file is
for TensorRT (on CPU, :mod:`normdeploy.lower.plugins.emulate` runs it).

A node is skipped, with the reason, when the plugin cannot express it: a scalar that must
become an attribute (DynamicTanh's alpha, ScaleNorm's g) is not a constant; a gain is not
a vector of one value per channel; the channel count is not divisible by the groups; a
PowerNorm or UnifiedNorm parameter is not a constant; an RMSNorm's ``partial`` is negative
or exceeds the static width of the last axis, or its ``eps_outside`` is neither 0 nor 1.
(An unknown width is no obstacle to either variant: the kernel gets the row length at run time.)
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..core.affine import affine_of
from ..core.graph import (
    Namer,
    add_node,
    attr,
    const_value,
    constant,
    dtype_of,
    rank_of,
    shape_of,
    value,
)
from ..core.ops import ATTRIBUTES, DOMAIN, rms_variant
from ..core.passes import PassContext, PassResult
from ..core.pattern import take_over
from .plugins.trt_plugins import NAMESPACE, PLUGINS, plugin_attributes

TARGETS = ("trt-fp32", "trt-fp16", "trt-bf16")


# ----------------------------------------------------------------------------- helpers

def _attrs(node: ir.Node) -> dict:
    return {**ATTRIBUTES[node.op_type], **{k: attr(node, k) for k in node.attributes}}


def _channels(x: ir.Value, axis: int = -1) -> int | None:
    shape = shape_of(x)
    if not shape:
        return None
    try:
        c = shape[axis]
    except IndexError:
        return None
    return c if isinstance(c, (int, np.integer)) and c > 0 else None


def _dtype_of(x: ir.Value, *fallback: np.ndarray) -> np.dtype:
    """X's element type as a numpy dtype (``ml_dtypes.bfloat16`` for bf16), else the first fallback array's."""
    dt = dtype_of(x)
    if dt is not None:
        return dt
    for v in fallback:
        if v is not None:
            return v.dtype
    return np.dtype(np.float32)


def _constant(namer: Namer, base: str, suffix: str, value64: np.ndarray, dtype) -> ir.Value:
    """A new constant holding ``value64`` rounded once to ``dtype`` (bf16 included: onnx-ir stores ml_dtypes arrays)."""
    return constant(namer, base, suffix, np.ascontiguousarray(value64.astype(dtype)))


def _scalar(t: ir.Value | None) -> float | None:
    v = const_value(t)
    if v is None or np.asarray(v).size != 1:
        return None
    return float(np.asarray(v, np.float64).reshape(()))


def _channel_param(namer: Namer, node: ir.Node, t: ir.Value | None, c: int | None,
                   what: str) -> tuple[ir.Value | None, str | None]:
    """``t`` as a per-channel vector [C] input of a plugin (a scalar constant is expanded), or a skip reason."""
    v = const_value(t)
    if v is not None:
        v = np.asarray(v)
        if v.size == 1 and v.ndim <= 1 and c is not None and c != 1:
            return _constant(namer, node.name or node.op_type, what, np.full(c, float(v.reshape(())), np.float64),
                             _dtype_of(t, v)), None
        if v.ndim == 1 and (c is None or v.shape[0] == c):
            return t, None
        if v.size == c and c is not None:
            return _constant(namer, node.name or node.op_type, what, v.reshape(c).astype(np.float64),
                             _dtype_of(t, v)), None
        return None, f"{what} of shape {list(v.shape)} is not one value per channel ({c})"
    shape = shape_of(t)
    if shape is not None and len(shape) == 1 and (c is None or shape[0] in (c, None) or isinstance(shape[0], str)):
        return t, None
    return None, f"{what} is not a constant and not a 1-D per-channel tensor"


def _plugin_node(namer: Namer, node: ir.Node, plugin: str, inputs: list[ir.Value], values: dict,
                 output: ir.Value | None = None) -> ir.Node:
    """A plugin node computing ``node`` from ``inputs``, writing ``output`` (default: a fresh value)."""
    spec = PLUGINS[plugin]
    base = node.name or node.op_type
    return add_node(namer, plugin, inputs, None if output is None else [output], name=namer(base, "plugin"),
                    base=base, domain=NAMESPACE, attrs=plugin_attributes(spec, values))


def _affine(namer: Namer, node: ir.Node, x: ir.Value, a: np.ndarray, b: np.ndarray, shape: list[int],
            dtype) -> ir.Value:
    """``x * a + b`` with float64 ``a``, ``b`` reshaped to ``shape`` and cast once to ``dtype``; returns the result.

    A unit scale or zero shift is left out (x * 1 and x + 0 are exact); both: Identity.
    """
    base = node.name or node.op_type
    scale, shift = not np.all(a == 1.0), not np.all(b == 0.0)
    if scale:
        out = value(namer, base, "scaled", dtype=x.dtype, shape=x.shape)
        add_node(namer, "Mul", [x, _constant(namer, base, "a", a.reshape(shape), dtype)], [out], base=base,
                 name=namer(base, "scale"))
        x = out
    if shift:
        out = value(namer, base, "shifted", dtype=x.dtype, shape=x.shape)
        add_node(namer, "Add", [x, _constant(namer, base, "b", b.reshape(shape), dtype)], [out], base=base,
                 name=namer(base, "shift"))
        x = out
    if not scale and not shift:
        out = value(namer, base, "identity_out", dtype=x.dtype, shape=x.shape)
        add_node(namer, "Identity", [x], [out], base=base, name=namer(base, "identity"))
        x = out
    return x


# ----------------------------------------------------------------------------- per op

def _rms_variant_attrs(node) -> tuple[dict | None, str | None]:
    """bzhangGo/rmsnorm's eps-outside / partial RMSNorm as the NormdeployRMSNorm plugin's ``eps_outside`` and
    ``partial`` fields (the kernel's EPS_OUTSIDE and its run-time statistic width n_stat), or a skip reason.

    ``eps_outside`` needs no static width (the kernel divides the sum of squares by the n_cols it is launched
    with); ``partial = k`` must be 1..C for a static width C. The canonical defaults (0, 0) are the plain plugin.
    """
    a = _attrs(node)
    eps_outside, partial = int(a["eps_outside"]), int(a["partial"])
    if eps_outside not in (0, 1):
        return None, f"RMSNorm eps_outside={eps_outside} is neither 0 nor 1; left to the op's function body"
    c = _channels(node.inputs[0])
    if partial < 0:
        return None, f"RMSNorm partial={partial} is negative; left to the op's function body"
    if c is not None and partial > c:
        return None, (f"RMSNorm partial={partial} exceeds the {c} channels of the last axis (the plugin's statistic "
                      "covers at most the row); left to the op's function body")
    return {"eps_outside": eps_outside, "partial": partial}, None


def _lower_rms(graph, namer, node, result) -> str | None:
    x, g = node.inputs[0], node.inputs[1]
    variant = rms_variant(_attrs(node)) if node.op_type == "RMSNorm" else {}
    values = {"epsilon": _attrs(node)["epsilon"]}
    if variant:
        fields, why = _rms_variant_attrs(node)
        if why:
            return why
        values.update(fields)
    gv, why = _channel_param(namer, node, g, _channels(x), "gain")
    if why:
        return why
    plugin = "NormdeployRMSNorm" if node.op_type == "RMSNorm" else "NormdeployCRMSNorm"
    new = _plugin_node(namer, node, plugin, [x, gv], values)
    take_over(node, new.outputs[0])
    shown = f" ({', '.join(f'{k}={v}' for k, v in variant.items())})" if variant else ""
    result.rewrote(f"{node.op_type}{shown} -> {plugin}", node=node.name)
    return None


def _lower_group_scaling(graph, namer, node, result) -> str | None:
    x = node.inputs[0]
    a = _attrs(node)
    c, groups = _channels(x), int(a["groups"])
    if groups < 1 or (c is not None and c % groups):
        return f"{c} channels are not divisible into {groups} groups"
    new = _plugin_node(namer, node, "NormdeployGroupScaling", [x], {"groups": groups, "epsilon": a["epsilon"]})
    take_over(node, new.outputs[0])
    result.rewrote("GroupScaling -> NormdeployGroupScaling", node=node.name)
    return None


def _lower_scale(graph, namer, node, result) -> str | None:
    x, g = node.inputs[0], node.inputs[1]
    scale = _scalar(g)
    if scale is None:
        return "ScaleNorm g is not a constant scalar (the plugin takes it as an attribute)"
    new = _plugin_node(namer, node, "NormdeployScaleNorm", [x], {"scale": scale, "epsilon": _attrs(node)["epsilon"]})
    take_over(node, new.outputs[0])
    result.rewrote("ScaleNorm -> NormdeployScaleNorm", node=node.name)
    return None


def _lower_dyt(graph, namer, node, result) -> str | None:
    x, alpha_t, w, b = node.inputs[:4]
    alpha = _scalar(alpha_t)
    if alpha is None:
        return "DynamicTanh alpha is not a constant scalar (the plugin takes it as an attribute)"
    axis = int(_attrs(node)["axis"])
    rank = rank_of(x)
    if rank is not None and not -rank <= axis < rank:
        return f"axis {axis} out of range for rank {rank}"
    c = _channels(x, axis)
    wv, bv = const_value(w), const_value(b)
    ones_w = wv is not None and np.all(np.asarray(wv) == 1)
    zero_b = bv is not None and np.all(np.asarray(bv) == 0)
    if ones_w and zero_b:
        plugin, inputs = "NormdeployDynamicTanhPlain", [x]
    else:
        wt, why = _channel_param(namer, node, w, c, "weight")
        if why:
            return why
        if zero_b:
            plugin, inputs = "NormdeployDynamicTanhGain", [x, wt]
        else:
            bt, why = _channel_param(namer, node, b, c, "bias")
            if why:
                return why
            plugin, inputs = "NormdeployDynamicTanh", [x, wt, bt]
    new = _plugin_node(namer, node, plugin, inputs, {"alpha": alpha, "axis": axis})
    take_over(node, new.outputs[0])
    result.rewrote(f"DynamicTanh -> {plugin}", node=node.name)
    return None


def _lower_power(graph, namer, node, result) -> str | None:
    x = node.inputs[0]
    aff = affine_of(node)
    if isinstance(aff, str):
        return aff
    a = _attrs(node)
    eps, groups, c = float(a["epsilon"]), int(a["groups"]), _channels(x)
    if groups < 1 or (c is not None and c % groups):
        return f"{c} channels are not divisible into {groups} groups"
    raw_w = const_value(node.inputs[2])
    base = node.name or node.op_type
    xs = value(namer, base, "group_scaled", dtype=x.dtype, shape=x.shape)
    _plugin_node(namer, node, "NormdeployGroupScaling", [x], {"groups": groups, "epsilon": eps}, xs)
    take_over(node, _affine(namer, node, xs, aff.scale, aff.shift, list(aff.scale.shape), _dtype_of(x, raw_w)))
    result.rewrote("PowerNorm -> NormdeployGroupScaling + per-channel Mul/Add", node=node.name)
    return None


def _lower_unified(graph, namer, node, result) -> str | None:
    x = node.inputs[0]
    aff = affine_of(node)
    if isinstance(aff, str):
        return aff
    raw_w = const_value(node.inputs[2])
    take_over(node, _affine(namer, node, x, aff.scale, aff.shift, list(aff.scale.shape), _dtype_of(x, raw_w)))
    result.rewrote("UnifiedNorm -> per-channel Mul/Add", node=node.name)
    return None


_LOWER = {
    "RMSNorm": _lower_rms,
    "CRMSNorm": _lower_rms,
    "GroupScaling": _lower_group_scaling,
    "ScaleNorm": _lower_scale,
    "DynamicTanh": _lower_dyt,
    "PowerNorm": _lower_power,
    "UnifiedNorm": _lower_unified,
}


def lower_to_trt_plugins(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Turn canonical normalization nodes into normdeploy TensorRT plugin nodes (and folded Mul/Add).

    The new nodes take over each canonical node's output (its name, where it is a graph
    output); the runner then drops the canonical node and its function body.
    """
    namer = Namer(graph)
    for node in list(graph):
        if node.domain != DOMAIN or node.op_type not in _LOWER:
            continue
        result.matched += 1
        why = _LOWER[node.op_type](graph, namer, node, result)
        if why:
            result.skip(node.name, why)
    if result.rewrites:
        result.notes.append(f"plugin nodes: op_type = plugin name, domain and plugin_namespace = {NAMESPACE!r}, "
                            "aot = 1; register them with normdeploy.lower.plugins.trt_plugins.register_plugins() before parsing")
