"""Lower canonical normalization nodes to normdeploy's TensorRT plugin nodes (``trt-*`` targets).

::

    X -> [normdeploy::RMSNorm(X, G)]           -> Y  =>  X -> [NormdeployRMSNorm(X, G)] -> Y
    X -> [normdeploy::PowerNorm(X, Phi, W, B)] -> Y  =>  X -> [NormdeployGroupScaling(X)] -> Mul(a) -> Add(b) -> Y
    X -> [normdeploy::UnifiedNorm(X, R, W, B)] -> Y  =>  X -> Mul(a) -> Add(b) -> Y

| canonical node | becomes | exact |
|---|---|---|
| RMSNorm(X, G)        | NormdeployRMSNorm(X, G), attribute epsilon | yes |
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
PowerNorm or UnifiedNorm parameter is not a constant.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..core.affine_gs import affine_of
from ..core.graph_gs import Namer, const_value
from ..core.ops import ATTRIBUTES, DOMAIN
from ..core.passes import PassContext, PassResult
from .plugins.trt_plugins import NAMESPACE, PLUGINS, plugin_attributes

TARGETS = ("trt-fp32", "trt-fp16", "trt-bf16")


# ----------------------------------------------------------------------------- helpers

def _attrs(node: gs.Node) -> dict:
    return {**ATTRIBUTES[node.op], **node.attrs}


def _channels(x: gs.Tensor, axis: int = -1) -> int | None:
    shape = getattr(x, "shape", None)
    if not shape:
        return None
    try:
        c = shape[axis]
    except IndexError:
        return None
    return c if isinstance(c, (int, np.integer)) and c > 0 else None


def _rank(x: gs.Tensor) -> int | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else len(shape)


def _dtype_of(x: gs.Tensor, *fallback: np.ndarray):
    """X's element type as something :func:`_constant` can store: a numpy dtype or ``"bfloat16"``."""
    dt = getattr(x, "dtype", None)
    if dt is not None:
        if dt == onnx.TensorProto.BFLOAT16 or str(dt) == "bfloat16":
            return "bfloat16"
        try:
            return np.dtype(dt)
        except TypeError:
            pass
    for v in fallback:
        if v is not None:
            return "bfloat16" if str(v.dtype) == "bfloat16" else v.dtype
    return np.dtype(np.float32)


def _constant(namer: Namer, base: str, suffix: str, value64: np.ndarray, dtype) -> gs.Constant:
    """A new constant holding ``value64`` rounded once to ``dtype``."""
    name = namer(base, suffix)
    if dtype == "bfloat16":  # numpy has no bfloat16: hand graphsurgeon a finished TensorProto
        import ml_dtypes
        from onnx import numpy_helper

        proto = numpy_helper.from_array(np.ascontiguousarray(value64.astype(ml_dtypes.bfloat16)), name)
        return gs.Constant(name, gs.ir.tensor.LazyValues(proto))
    return gs.Constant(name, np.ascontiguousarray(value64.astype(dtype)))


def _scalar(t: gs.Tensor) -> float | None:
    v = const_value(t)
    if v is None or np.asarray(v).size != 1:
        return None
    return float(np.asarray(v, np.float64).reshape(()))


def _channel_param(namer: Namer, node: gs.Node, t: gs.Tensor, c: int | None,
                   what: str) -> tuple[gs.Tensor | None, str | None]:
    """``t`` as a per-channel vector [C] input of a plugin (a scalar constant is expanded), or a skip reason."""
    v = const_value(t)
    if v is not None:
        v = np.asarray(v)
        if v.size == 1 and v.ndim <= 1 and c is not None and c != 1:
            return _constant(namer, node.name or node.op, what, np.full(c, float(v.reshape(())), np.float64),
                             _dtype_of(t, v)), None
        if v.ndim == 1 and (c is None or v.shape[0] == c):
            return t, None
        if v.size == c and c is not None:
            return _constant(namer, node.name or node.op, what, v.reshape(c).astype(np.float64), _dtype_of(t, v)), None
        return None, f"{what} of shape {list(v.shape)} is not one value per channel ({c})"
    shape = getattr(t, "shape", None)
    if shape is not None and len(shape) == 1 and (c is None or shape[0] in (c, None) or isinstance(shape[0], str)):
        return t, None
    return None, f"{what} is not a constant and not a 1-D per-channel tensor"


def _plugin_node(namer: Namer, node: gs.Node, plugin: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor],
                 values: dict) -> gs.Node:
    spec = PLUGINS[plugin]
    return gs.Node(op=plugin, name=namer(node.name or node.op, "plugin"), domain=NAMESPACE,
                   attrs=plugin_attributes(spec, values), inputs=inputs, outputs=outputs)


def _detach(node: gs.Node) -> list[gs.Tensor]:
    outs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    return outs


def _affine(namer: Namer, graph: gs.Graph, node: gs.Node, x: gs.Tensor, y: gs.Tensor, a: np.ndarray,
            b: np.ndarray, shape: list[int], dtype) -> None:
    """``y = x * a + b`` with float64 ``a``, ``b`` reshaped to ``shape`` and cast once to ``dtype``.

    A unit scale or zero shift is left out (x * 1 and x + 0 are exact); both: Identity.
    """
    base = node.name or node.op
    scale, shift = not np.all(a == 1.0), not np.all(b == 0.0)
    if scale:
        out = gs.Variable(namer(base, "scaled"), dtype=getattr(x, "dtype", None), shape=getattr(x, "shape", None)) \
            if shift else y
        graph.nodes.append(gs.Node(op="Mul", name=namer(base, "scale"), outputs=[out],
                                   inputs=[x, _constant(namer, base, "a", a.reshape(shape), dtype)]))
        x = out
    if shift:
        graph.nodes.append(gs.Node(op="Add", name=namer(base, "shift"), outputs=[y],
                                   inputs=[x, _constant(namer, base, "b", b.reshape(shape), dtype)]))
    if not scale and not shift:
        graph.nodes.append(gs.Node(op="Identity", name=namer(base, "identity"), inputs=[x], outputs=[y]))


# ----------------------------------------------------------------------------- per op

def _lower_rms(graph, namer, node, result) -> str | None:
    x, g = node.inputs[0], node.inputs[1]
    gv, why = _channel_param(namer, node, g, _channels(x), "gain")
    if why:
        return why
    plugin = "NormdeployRMSNorm" if node.op == "RMSNorm" else "NormdeployCRMSNorm"
    graph.nodes.append(_plugin_node(namer, node, plugin, [x, gv], _detach(node), {"epsilon": _attrs(node)["epsilon"]}))
    result.rewrote(f"{node.op} -> {plugin}", node=node.name)
    return None


def _lower_group_scaling(graph, namer, node, result) -> str | None:
    x = node.inputs[0]
    a = _attrs(node)
    c, groups = _channels(x), int(a["groups"])
    if groups < 1 or (c is not None and c % groups):
        return f"{c} channels are not divisible into {groups} groups"
    graph.nodes.append(_plugin_node(namer, node, "NormdeployGroupScaling", [x], _detach(node),
                                    {"groups": groups, "epsilon": a["epsilon"]}))
    result.rewrote("GroupScaling -> NormdeployGroupScaling", node=node.name)
    return None


def _lower_scale(graph, namer, node, result) -> str | None:
    x, g = node.inputs[0], node.inputs[1]
    scale = _scalar(g)
    if scale is None:
        return "ScaleNorm g is not a constant scalar (the plugin takes it as an attribute)"
    graph.nodes.append(_plugin_node(namer, node, "NormdeployScaleNorm", [x], _detach(node),
                                    {"scale": scale, "epsilon": _attrs(node)["epsilon"]}))
    result.rewrote("ScaleNorm -> NormdeployScaleNorm", node=node.name)
    return None


def _lower_dyt(graph, namer, node, result) -> str | None:
    x, alpha_t, w, b = node.inputs[:4]
    alpha = _scalar(alpha_t)
    if alpha is None:
        return "DynamicTanh alpha is not a constant scalar (the plugin takes it as an attribute)"
    axis = int(_attrs(node)["axis"])
    rank = _rank(x)
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
    graph.nodes.append(_plugin_node(namer, node, plugin, inputs, _detach(node), {"alpha": alpha, "axis": axis}))
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
    (y,) = _detach(node)
    base = node.name or node.op
    xs = gs.Variable(namer(base, "group_scaled"), dtype=getattr(x, "dtype", None), shape=getattr(x, "shape", None))
    graph.nodes.append(_plugin_node(namer, node, "NormdeployGroupScaling", [x], [xs],
                                    {"groups": groups, "epsilon": eps}))
    _affine(namer, graph, node, xs, y, aff.scale, aff.shift, list(aff.scale.shape), _dtype_of(x, raw_w))
    result.rewrote("PowerNorm -> NormdeployGroupScaling + per-channel Mul/Add", node=node.name)
    return None


def _lower_unified(graph, namer, node, result) -> str | None:
    x = node.inputs[0]
    aff = affine_of(node)
    if isinstance(aff, str):
        return aff
    raw_w = const_value(node.inputs[2])
    (y,) = _detach(node)
    _affine(namer, graph, node, x, y, aff.scale, aff.shift, list(aff.scale.shape), _dtype_of(x, raw_w))
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


def lower_to_trt_plugins(graph: gs.Graph, ctx: PassContext, result: PassResult) -> None:
    """Turn canonical normalization nodes into normdeploy TensorRT plugin nodes (and folded Mul/Add)."""
    namer = Namer(graph)
    for node in list(graph.nodes):
        if node.domain != DOMAIN or node.op not in _LOWER:
            continue
        result.matched += 1
        why = _LOWER[node.op](graph, namer, node, result)
        if why:
            result.skip(node.name, why)
    if result.rewrites:
        result.notes.append(f"plugin nodes: op_type = plugin name, domain and plugin_namespace = {NAMESPACE!r}, "
                            "aot = 1; register them with normdeploy.lower.plugins.trt_plugins.register_plugins() before parsing")
