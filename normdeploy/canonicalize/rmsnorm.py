"""Recognize RMSNorm spellings and rewrite them to the canonical ``normdeploy::RMSNorm`` (DESIGN.md 2).

Math, over the last axis of x:  ``y = g * x / sqrt(mean(x^2) + eps)``  =  ``RMSNorm(X=x, G=g, epsilon=eps)``.

Decomposed spellings recognized (``s = mean(x^2) + eps``)::

    x ──> Pow(., 2) | Mul(x, x) ──> ReduceMean(last axis) ──> Add(eps) ──> s
          s ──> Sqrt ──> Div(x, .) ────────────────┐
          s ──> Sqrt ──> Reciprocal ──> Mul(x, .) ──┤  torch.rsqrt, nn.RMSNorm (dynamo, opset < 23)
          s ──> Sqrt ──> Div(1, .) ──> Mul(x, .) ───┤  torch.rsqrt (TorchScript exporter)
          s ──> Pow(., -0.5) ──> Mul(x, .) ─────────┤
                                                    └──> [Mul(g)] ──> y

with the gain either after the product (``Mul(Mul(x, r), g)``, either operand order) or
before it (``Mul(Mul(x, g), r)``, ``Div(Mul(g, x), sqrt)``). ONNX Runtime fuses none of
these Pow/Sqrt/Reciprocal chains; the canonical node is what lowering turns into
RMSNormalization, SimplifiedLayerNormalization or a plugin.

Casts: a Cast whose source and target types are equal is looked through. In a
mixed-precision export (HF Llama on float16: ``Cast(x, float32)`` feeds the statistics
and the product, ``Cast(., float16)`` follows) x is the float32 Cast output, so the
statistics stay in float32; a real Cast between the product and the gain keeps the gain
outside the canonical node (G = ones), since folding it across the Cast changes rounding.

Opset-23 ``RMSNormalization(X, scale, axis=-1, epsilon, stash_type=1)`` becomes
``RMSNorm(X, scale)`` on a float32 X; on a float16 / bfloat16 X (onnxscript's optimizer
fuses the float16 Llama spelling into it) the ONNX definition is kept to the letter::

    X ──> Cast(float32) ──> RMSNorm(G = ones) ──> Cast(X's type) ──> Mul(scale) ──> Y

Exact (up to float rounding of the reordered products). Conditions (each failure is a
skip reason): epsilon and the gain are constants, the gain varies only along the last
axis; the mean of squares reduces the last axis only, with keepdims (the canonical op
normalizes the last axis); without a gain the last dimension is static (G = ones of it);
no intermediate tensor is a graph output or read outside the match; the output keeps its
name. A mean of squares of ``x - mean(x)`` is a LayerNorm and is left to
:mod:`.canonicalize_layernorm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from ..core.graph import DEFAULT_DOMAINS, Namer, add_node, attr, constant, rank_of, remove_nodes
from ..core.ops import DOMAIN
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
    fold,
    match,
    op,
    outside_consumer,
    reduce_axes,
    scalar,
    static_shape,
    take_over,
)

X = Var("x")
MEAN_SQUARE = op("ReduceMean", any_of(op("Pow", X, Lit(2.0)), op("Mul", X, X)), name="ms", extra_inputs=True)
MS_EPS = op("Add", MEAN_SQUARE, Var("eps"))
NUMERATOR = any_of(op("Mul", X, Const("g_pre")), X)
NORMALIZED = divided_by_sqrt(NUMERATOR, MS_EPS)
RMSNORM = any_of(op("Mul", NORMALIZED, Const("g_post")), NORMALIZED)

_CENTRED = op("Sub", Var("a"), op("ReduceMean", Var("a"), extra_inputs=True))


def _is_centred(t: ir.Value) -> bool:
    """``t`` is ``a - mean(a)``: its RMS is a LayerNorm's standard deviation."""
    return any(True for _ in match(_CENTRED, t, Match()))


@dataclass
class RMSNormPlan:
    x: ir.Value
    gain: np.ndarray | ir.Value
    epsilon: float


def _gain_vector(v: np.ndarray, rank: int | None, what: str) -> np.ndarray | str:
    if v.ndim > (rank if rank is not None else 1):
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    if any(d != 1 for d in v.shape[:-1]):
        return f"{what} of shape {list(v.shape)} varies along an axis other than the last"
    return v.reshape(-1)


def _plan_rmsnorm(graph: ir.Graph, m: Match) -> RMSNormPlan | str | None:
    x = m.bound["x"]
    if _is_centred(x):
        return None  # a LayerNorm: recognize_layernorm's business
    eps = scalar(m.bound["eps"], "epsilon")
    if isinstance(eps, str):
        return eps
    rank = rank_of(x)
    axes = reduce_axes(m.bound["ms"], rank)
    if isinstance(axes, str):
        return axes
    if axes != [-1]:
        return (f"mean of squares reduces over axes {axes}, not the last axis only "
                f"(the canonical RMSNorm normalizes the last axis)")
    gains = []
    for name, what in (("g_pre", "gain"), ("g_post", "gain")):
        if name in m.values:
            g = _gain_vector(m.values[name], rank, what)
            if isinstance(g, str):
                return g
            gains.append(g)
    shape = static_shape(x)
    width = shape[-1] if shape else None
    if width is None:
        sizes = [g.size for g in gains if g.size > 1]
        if not sizes:
            return f"last dimension of {x.name} is not static (needed for the unit gain G)"
        width = sizes[0]
    if any(g.size not in (1, width) for g in gains):
        return f"gain of size {[g.size for g in gains]} does not match the last dimension {width}"
    dtype = dtype_of(x) or (gains[0].dtype if gains else np.dtype(np.float32))
    if not gains:
        gain = np.ones(width, dtype)
    elif len(gains) == 1:
        gain = np.broadcast_to(gains[0], (width,)).astype(dtype)
    else:  # gains before and after the product: multiply once, in float64
        gain = (gains[0].astype(np.float64) * gains[1].astype(np.float64) * np.ones(width)).astype(dtype)
    reason = outside_consumer(m)
    if reason:
        return reason
    return RMSNormPlan(x, np.ascontiguousarray(gain), eps)


def _canonical_node(namer: Namer, base: str, plan: RMSNormPlan) -> ir.Node:
    g = plan.gain if isinstance(plan.gain, ir.Value) else constant(namer, base, "rms_gain", plan.gain)
    return add_node(namer, "RMSNorm", [plan.x, g], base=base, domain=DOMAIN, attrs={"epsilon": float(plan.epsilon)})


def _rewrite_rmsnorm(graph: ir.Graph, m: Match, plan: RMSNormPlan, namer: Namer) -> tuple[str, str]:
    root = m.nodes[0]
    base = root.name or "rmsnorm"
    node = _canonical_node(namer, base, plan)
    take_over(root, node.outputs[0])
    gain = "with gain" if ("g_pre" in m.values or "g_post" in m.values) else "without gain (G = ones)"
    return f"decomposed RMSNorm ending at {root.name} ({gain}) -> {DOMAIN}::RMSNorm {node.name}", node.name


RMSNORM_RECOGNIZER = Recognizer(
    pattern=RMSNORM,
    anchor="ms",
    root_ops=frozenset({"Mul", "Div"}),
    plan=_plan_rmsnorm,
    rewrite=_rewrite_rmsnorm,
    candidate=MEAN_SQUARE,
    incomplete="mean of squares is not followed by a recognized RMSNorm spelling "
               "(Add eps, Sqrt + Div / Reciprocal+Mul, or Pow -0.5, applied to the same x)",
    accept_candidate=lambda m: not _is_centred(m.bound["x"]),
)


@dataclass
class StashedPlan:
    """RMSNormalization on a non-float32 X: Cast(X, float32), RMSNorm(G = ones), Cast back, Mul(scale)."""

    x: ir.Value
    scale: ir.Value
    width: int
    epsilon: float
    to: int  # ONNX element type of X


def _plan_rms_normalization(graph: ir.Graph, node: ir.Node) -> RMSNormPlan | StashedPlan | str:
    """Conditions for ONNX RMSNormalization (opset 23) -> normdeploy::RMSNorm."""
    x, scale = node.inputs[0], node.inputs[1]
    rank = rank_of(x)
    axis = node.attributes.get_int("axis", -1)
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return f"RMSNormalization over axis {axis} (rank {rank}): the canonical RMSNorm normalizes the last axis only"
    if node.attributes.get_int("stash_type", 1) != 1:
        return f"stash_type {node.attributes.get_int('stash_type')} is not float32"
    epsilon = attr(node, "epsilon", 1e-5)
    dtype = dtype_of(x)
    if dtype is None:
        return f"element type of {x.name} is unknown"
    shape = static_shape(x)
    width = shape[-1] if shape else None
    v = fold(scale)
    if v is not None:
        g = _gain_vector(v, rank, "scale")
        if isinstance(g, str):
            return g
        if width is None and g.size > 1:
            width = g.size
        if width is not None and g.size not in (1, width):
            return f"scale of size {g.size} does not match the last dimension {width}"
    elif rank_of(scale) != 1:
        return "scale is not a constant and not a 1-D tensor"
    if dtype != np.float32:
        # stash_type 1: statistics and the normalized value in float32, cast back, then scaled in X's type
        if width is None:
            return f"last dimension of {x.name} is not static (needed for the unit gain G)"
        return StashedPlan(x, scale, width, epsilon, helper.np_dtype_to_tensor_dtype(dtype))
    if v is None:
        return RMSNormPlan(x, scale, epsilon)
    if width is None:
        return f"last dimension of {x.name} is not static (needed to expand a scalar scale)"
    return RMSNormPlan(x, np.ascontiguousarray(np.broadcast_to(g, (width,)).astype(np.float32)), epsilon)


def _rewrite_rms_normalization(graph: ir.Graph, node: ir.Node, plan, namer: Namer) -> tuple[str, str]:
    base = node.name or "rmsnorm"
    if isinstance(plan, RMSNormPlan):
        new = _canonical_node(namer, base, plan)
        take_over(node, new.outputs[0])
        remove_nodes(graph, [node])
        return f"RMSNormalization {node.name} -> {DOMAIN}::RMSNorm {new.name}", new.name
    to32 = add_node(namer, "Cast", [plan.x], base=base, suffix="to_float32", attrs={"to": int(TensorProto.FLOAT)})
    new = _canonical_node(namer, base, RMSNormPlan(to32.outputs[0], np.ones(plan.width, np.float32), plan.epsilon))
    back = add_node(namer, "Cast", [new.outputs[0]], base=base, suffix="from_float32", attrs={"to": plan.to})
    scaled = add_node(namer, "Mul", [back.outputs[0], plan.scale], base=base, suffix="scale")
    take_over(node, scaled.outputs[0])
    remove_nodes(graph, [node])
    return (f"RMSNormalization {node.name} on {helper.tensor_dtype_to_np_dtype(plan.to)} -> Cast(float32), "
            f"{DOMAIN}::RMSNorm {new.name}, Cast back, Mul(scale) (stash_type 1)"), new.name


def recognize_rmsnorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite decomposed RMSNorm and ONNX RMSNormalization (last axis) to normdeploy::RMSNorm."""
    RMSNORM_RECOGNIZER.run(graph, result)
    namer = Namer(graph)
    for node in list(graph):
        if node.op_type != "RMSNormalization" or node.domain not in DEFAULT_DOMAINS:
            continue
        result.matched += 1
        plan = _plan_rms_normalization(graph, node)
        if isinstance(plan, str):
            result.skip(node.name, plan)
            continue
        result.rewrote(*_rewrite_rms_normalization(graph, node, plan, namer))
