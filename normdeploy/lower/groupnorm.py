"""Lower GroupNorm to the fastest exact form each ONNX Runtime target has (DESIGN.md 4).

ONNX Runtime 1.32 (and 1.31) has no kernel for ONNX ``GroupNormalization`` on any opset (18:
per-group scale and bias, deprecated; 21: per-channel): it expands the op's function body,
ReduceMean, Sub, Mul, ReduceMean, Sub, Add, Sqrt, Div, Reshapes and Casts, which on a
[4, 64, 32, 32] map runs ~1.8x slower than the InstanceNormalization spelling torch's TorchScript
exporter writes. So for ``ort-*`` every ``GroupNormalization(x, scale, bias, num_groups=G, eps)``
becomes::

    x -> Reshape([0, G, -1]) -> InstanceNormalization(ones(G), zeros(G), eps) -> Reshape(Shape(x))
      -> Mul(scale_c [C, 1, ...]) -> Add(bias_c [C, 1, ...])

exact in real arithmetic: InstanceNormalization of the ``[N, G, L]`` view normalizes each (n, g)
row by its own mean and biased variance, which are GroupNorm's group statistics; per-channel
scale and bias (opset 18's per-group ones repeated ``C / G`` times) then apply as GroupNorm
applies them. A unit scale or zero bias (after ``fold_affine_into_linear`` folded them into the
readers) is left out. With ``stash_type = 1`` (float32, opset 21's default) and a float16 /
bfloat16 input, the statistics are computed in float32 (Cast before, Cast back after the
normalization, as the op's function body does); ``stash_type`` other than float32 is refused.

GroupNorms already spelled with InstanceNormalization (:mod:`normdeploy.canonicalize.groupnorm`)
are kept and say so. TensorRT targets do not run this pass: TensorRT's ONNX parser imports both
spellings into its normalization layer; which is faster there is not measured here (no GPU).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..canonicalize.groupnorm import ORT_NOTE, group_norm_of
from ..core.graph import DEFAULT_DOMAINS, Namer, add_node, attr, const_value, constant, opset_of, shape_of
from ..core.passes import PassContext, PassResult
from ..core.pattern import dtype_of, take_over

_FLOAT = 1  # TensorProto.FLOAT


def group_norm_params(node: ir.Node, opset: int | None) -> tuple[np.ndarray, np.ndarray, int, float] | str:
    """``(scale_c, bias_c, groups, eps)`` of a GroupNormalization, per channel (float64), or why not.

    Opset 18 to 20 (GroupNormalization-18) take scale and bias per group; 21 and later per channel.
    """
    if len(node.inputs) < 3 or any(i is None for i in node.inputs[:3]):
        return f"GroupNormalization {node.name} lacks scale or bias"
    scale, bias = const_value(node.inputs[1]), const_value(node.inputs[2])
    if scale is None or bias is None:
        return f"GroupNormalization {node.name} scale or bias is not a constant"
    groups = int(attr(node, "num_groups", 0))
    x_shape = shape_of(node.inputs[0])
    channels = x_shape[1] if x_shape is not None and len(x_shape) > 2 and isinstance(x_shape[1], int) else None
    if groups <= 0:
        return f"GroupNormalization {node.name} has num_groups {groups}"
    if channels is None:
        return f"GroupNormalization {node.name}: the channel count of its input is unknown"
    if channels % groups:
        return f"GroupNormalization {node.name}: {channels} channels do not split into {groups} groups"
    scale, bias = np.asarray(scale, np.float64).reshape(-1), np.asarray(bias, np.float64).reshape(-1)
    per_group = opset is not None and opset < 21
    want = groups if per_group else channels
    if scale.size != want or bias.size != want:
        return (f"GroupNormalization {node.name} (opset {opset}) scale / bias have {scale.size} / {bias.size} "
                f"entries, not {want}")
    if per_group:
        scale, bias = np.repeat(scale, channels // groups), np.repeat(bias, channels // groups)
    return scale, bias, groups, float(attr(node, "epsilon", 1e-5))


def _lower(graph: ir.Graph, node: ir.Node, params, namer: Namer) -> str | None:
    scale, bias, groups, eps = params
    x = node.inputs[0]
    dtype = dtype_of(x)
    if dtype is None:
        return f"GroupNormalization {node.name}: element type of its input is unknown"
    stash = int(attr(node, "stash_type", 1))
    if stash != _FLOAT:
        return f"GroupNormalization {node.name} has stash_type {stash}: only float32 statistics are lowered"
    rank = len(shape_of(x))
    base = node.name or "group_norm"
    upcast = dtype.itemsize < 4
    src = x
    if upcast:
        src = add_node(namer, "Cast", [x], base=base, suffix="to_float", attrs={"to": _FLOAT}).outputs[0]
    grouped = add_node(namer, "Reshape", [src, constant(namer, base, "group_shape", np.array([0, groups, -1], np.int64))],
                       base=base, suffix="group_reshape").outputs[0]
    stat_dtype = np.dtype(np.float32) if upcast else dtype
    normed = add_node(namer, "InstanceNormalization",
                      [grouped, constant(namer, base, "unit_scale", np.ones(groups, stat_dtype)),
                       constant(namer, base, "zero_bias", np.zeros(groups, stat_dtype))],
                      base=base, suffix="instance_norm", attrs={"epsilon": eps}).outputs[0]
    if upcast:
        normed = add_node(namer, "Cast", [normed], base=base, suffix="to_input_type",
                          attrs={"to": int(ir.DataType.from_numpy(dtype))}).outputs[0]
    shape = add_node(namer, "Shape", [x], base=base, suffix="input_shape").outputs[0]
    out = add_node(namer, "Reshape", [normed, shape], base=base, suffix="ungroup").outputs[0]
    channel_shape = (-1,) + (1,) * (rank - 2)
    if np.any(scale != 1):
        out = add_node(namer, "Mul", [out, constant(namer, base, "scale", scale.reshape(channel_shape).astype(dtype))],
                       base=base, suffix="scale").outputs[0]
    if np.any(bias != 0):
        out = add_node(namer, "Add", [out, constant(namer, base, "bias", bias.reshape(channel_shape).astype(dtype))],
                       base=base, suffix="bias").outputs[0]
    take_over(node, out)
    return None


def lower_groupnorm_to_instance_norm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Every GroupNormalization becomes InstanceNormalization between Reshapes (ONNX Runtime has no kernel for it)."""
    namer = Namer(graph)
    opset = opset_of(graph)
    for node in list(graph):
        if node.domain not in DEFAULT_DOMAINS or not node.outputs:
            continue
        if node.op_type == "InstanceNormalization":
            gn = group_norm_of(graph, node)
            if gn is not None and not isinstance(gn, str):
                result.matched += 1
                result.skip(node.name, f"GroupNorm ({gn.groups} groups) kept as {gn.spelling}: {ORT_NOTE}")
            continue
        if node.op_type != "GroupNormalization":
            continue
        result.matched += 1
        params = group_norm_params(node, opset)
        if isinstance(params, str):
            result.skip(node.name, params)
            continue
        if shape_of(node.inputs[0]) is None:
            result.skip(node.name, f"GroupNormalization {node.name}: rank of its input is unknown")
            continue
        why = _lower(graph, node, params, namer)
        if why:
            result.skip(node.name, why)
            continue
        result.rewrote(f"GroupNormalization {node.name} ({params[2]} groups) lowered to Reshape, InstanceNormalization, "
                       f"Reshape{', Mul' if np.any(params[0] != 1) else ''}{', Add' if np.any(params[1] != 0) else ''} "
                       "(ONNX Runtime has no GroupNormalization kernel)", node.name)
