"""Recognize decomposed LayerNorm and rewrite it to one ONNX ``LayerNormalization`` (DESIGN.md 2).

Math: over the normalized axes A of x (per token / per pixel),

    y = g * (x - mean_A(x)) / sqrt(mean_A((x - mean_A(x))^2) + eps) + b

which is ``LayerNormalization(x, scale=g, bias=b, axis, epsilon)`` when A is the
trailing axes ``axis .. rank-1``. Spellings recognized (``d = x - mean``, ``s = var + eps``)::

    x ──> ReduceMean ──> mean                        (axes attribute, opset < 18,
    x, mean ──> Sub ──> d                              or axes input, opset >= 18)
    d ──> Pow(., 2) | Mul(d, d) ──> ReduceMean ──> var
    var ──> Add(eps) ──> s
          s ──> Sqrt ──> Div(d, .) ─────────────┐
          s ──> Sqrt ──> Reciprocal ──> Mul(d, .) ┤
          s ──> Sqrt ──> Div(1, .) ──> Mul(d, .)  ┤   (TorchScript's rsqrt)
          s ──> Pow(., -0.5) ──> Mul(d, .) ──────┤
                                                 └──> [Mul(g)] ──> [Add(b)] ──> y

torch's exporter may emit ``x - mean`` twice (one Sub for the numerator, one for the
variance); both are accepted when they compute the same value. Casts whose source and
target types are equal (``x.to(torch.float32)`` on a float32 x) are looked through. A
mixed-precision spelling keeps its real Casts: ``Cast(x, float32)`` feeds the match as x,
and a Cast between the normalized product and the gain keeps the gain outside
(scale = ones; folding it across the Cast would change the rounding).

Channels-first LayerNorm (ConvNeXt: mean and variance over axis 1 of NCHW, gain and
bias shaped [C, 1, 1]) becomes::

    x ──> Transpose(0, 2, .., r-1, 1) ──> LayerNormalization(axis=-1)
      ──> Transpose(0, r-1, 1, .., r-2) ──> y

Exact: the replacement computes the same expression (up to float rounding: the
statistics are computed by one kernel, in float32 for float16 inputs, stash_type 1).

Conditions (each failure is a skip reason): the model's opset is at least 17; epsilon,
gain and bias are constants; mean and variance reduce over the same axes, with
keepdims; those axes are the trailing ones (or axis 1 of a tensor of rank >= 3); the
gain and bias vary only along the normalized axes, whose sizes are static; no
intermediate tensor (mean, d, variance, ...) is a graph output or is read by a node
outside the match. The output tensor keeps its name.

Patterns are written in the small pattern language of :mod:`normdeploy.core.pattern`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..core.graph import Namer, add_node, constant, opset_of, rank_of
from ..core.passes import PassContext, PassResult
from ..core.pattern import (
    Const,
    Lit,
    Match,
    Recognizer,
    Var,
    any_of,
    divided_by_sqrt,
    dtype_of,
    op,
    outside_consumer,
    reduce_axes,
    scalar,
    static_shape,
    take_over,
)

# ----------------------------------------------------------------------------- LayerNorm

X = Var("x")
MEAN = op("ReduceMean", X, name="mean", extra_inputs=True)
CENTRED = op("Sub", X, MEAN)
VARIANCE = op("ReduceMean", any_of(op("Pow", CENTRED, Lit(2.0)), op("Mul", CENTRED, CENTRED)),
              name="var", extra_inputs=True)
VAR_EPS = op("Add", VARIANCE, Var("eps"))
NORMALIZED = divided_by_sqrt(CENTRED, VAR_EPS)
LAYERNORM = any_of(
    op("Add", op("Mul", NORMALIZED, Const("g")), Const("b")),
    op("Mul", NORMALIZED, Const("g")),
    op("Add", NORMALIZED, Const("b")),
    NORMALIZED,
)


@dataclass
class LayerNormPlan:
    x: ir.Value
    axis: int  # negative: LayerNormalization normalizes axis .. rank-1
    epsilon: float
    scale: np.ndarray
    bias: np.ndarray | None
    channels_first_rank: int | None = None  # set: normalize axis 1 through Transposes


def _trailing_param(v: np.ndarray, norm_shape: list[int], rank: int | None, what: str) -> np.ndarray | str:
    """Gain or bias ``v`` (broadcast against x) as a tensor of the normalized shape."""
    k = len(norm_shape)
    if v.ndim > (rank if rank is not None else k):
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    lead = v.shape[:max(0, v.ndim - k)]
    if any(d != 1 for d in lead):
        return f"{what} of shape {list(v.shape)} varies along an axis that is not normalized"
    tail = v.reshape(v.shape[len(lead):])
    tail = tail.reshape((1,) * (k - tail.ndim) + tail.shape)
    if any(t not in (1, n) for t, n in zip(tail.shape, norm_shape)):
        return f"{what} of shape {list(v.shape)} does not broadcast to the normalized shape {norm_shape}"
    return np.broadcast_to(tail, norm_shape)


def _channel_param(v: np.ndarray, channels: int, rank: int, what: str) -> np.ndarray | str:
    """Gain or bias ``v`` of a channels-first norm as a [C] vector."""
    if v.ndim > rank:
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    padded = (1,) * (rank - v.ndim) + v.shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1) or padded[1] not in (1, channels):
        return f"{what} of shape {list(v.shape)} is not per-channel on axis 1"
    return np.broadcast_to(v.reshape(-1), (channels,))


def _plan_layernorm(graph: ir.Graph, m: Match) -> LayerNormPlan | str:
    opset = opset_of(graph)
    if opset is not None and opset < 17:
        return f"model opset {opset} has no LayerNormalization (needs opset 17)"
    eps = scalar(m.bound["eps"], "epsilon")
    if isinstance(eps, str):
        return eps
    x = m.bound["x"]
    rank = rank_of(x)
    mean_axes = reduce_axes(m.bound["mean"], rank)
    if isinstance(mean_axes, str):
        return mean_axes
    var_axes = reduce_axes(m.bound["var"], rank)
    if isinstance(var_axes, str):
        return var_axes
    if mean_axes != var_axes:
        return f"mean and variance reduce over different axes ({mean_axes} vs {var_axes})"
    k = len(mean_axes)
    shape = static_shape(x)
    g, b = m.values.get("g"), m.values.get("b")
    dtype = dtype_of(x) or (g.dtype if g is not None else np.dtype(np.float32))
    if mean_axes == list(range(-k, 0)):
        norm_shape = shape[-k:] if shape is not None else None
        if norm_shape is None or None in norm_shape:
            return f"normalized dimensions of {x.name} are not static (LayerNormalization needs a full scale)"
        scale = np.ones(norm_shape, dtype) if g is None else _trailing_param(g, norm_shape, rank, "gain")
        bias = None if b is None else _trailing_param(b, norm_shape, rank, "bias")
        cf_rank = None
    elif rank is not None and rank >= 3 and mean_axes == [1 - rank]:
        channels = shape[1]
        if channels is None:
            sizes = [v.size for v in (g, b) if v is not None and v.size > 1]
            if not sizes:
                return f"channel dimension of {x.name} is not static"
            channels = sizes[0]
        scale = np.ones(channels, dtype) if g is None else _channel_param(g, channels, rank, "gain")
        bias = None if b is None else _channel_param(b, channels, rank, "bias")
        k, cf_rank = 1, rank
    else:
        return (f"mean and variance reduce over axes {mean_axes}, neither the trailing axes nor axis 1 "
                f"(channels-first) of a rank-{rank} tensor")
    for p in (scale, bias):
        if isinstance(p, str):
            return p
    reason = outside_consumer(m)
    if reason:
        return reason
    return LayerNormPlan(x, -k, eps, np.ascontiguousarray(scale, dtype),
                         None if bias is None else np.ascontiguousarray(bias, dtype), cf_rank)


def _rewrite_layernorm(graph: ir.Graph, m: Match, plan: LayerNormPlan, namer: Namer) -> tuple[str, str]:
    root = m.nodes[0]
    base = root.name or "layernorm"
    params = [constant(namer, base, "ln_scale", plan.scale)]
    if plan.bias is not None:
        params.append(constant(namer, base, "ln_bias", plan.bias))
    attrs = {"axis": plan.axis, "epsilon": plan.epsilon}
    if plan.channels_first_rank is None:
        ln = add_node(namer, "LayerNormalization", [plan.x, *params], base=base, attrs=attrs)
        take_over(root, ln.outputs[0])
        return f"decomposed LayerNorm ending at {root.name} -> LayerNormalization {ln.name} (axis {plan.axis})", ln.name
    r = plan.channels_first_rank
    to_last, to_first = [0, *range(2, r), 1], [0, r - 1, *range(1, r - 1)]
    t_in = add_node(namer, "Transpose", [plan.x], base=base, suffix="to_channels_last", attrs={"perm": to_last})
    ln = add_node(namer, "LayerNormalization", [t_in.outputs[0], *params], base=base, attrs=attrs)
    t_out = add_node(namer, "Transpose", [ln.outputs[0]], base=base, suffix="to_channels_first",
                     attrs={"perm": to_first})
    take_over(root, t_out.outputs[0])
    return (f"channels-first LayerNorm ending at {root.name} -> Transpose, LayerNormalization {ln.name} "
            f"(axis -1), Transpose"), ln.name


LAYERNORM_RECOGNIZER = Recognizer(
    pattern=LAYERNORM,
    anchor="var",
    root_ops=frozenset({"Add", "Mul", "Div"}),
    plan=_plan_layernorm,
    rewrite=_rewrite_layernorm,
    candidate=VARIANCE,
    incomplete="variance of x - mean(x) is not followed by a recognized LayerNorm spelling "
               "(Add eps, Sqrt, Div / Reciprocal+Mul, or Pow -0.5)",
)


def recognize_layernorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite decomposed LayerNorm (trailing axes, or channels-first axis 1) to ONNX LayerNormalization."""
    LAYERNORM_RECOGNIZER.run(graph, result)
