"""Recognize CRMSNorm and rewrite it to the canonical ``normdeploy::CRMSNorm`` (DESIGN.md 2).

Math (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers", 2023): a zero-mean vector of
d coordinates is stored as its first d-1; the discarded one is ``-sum(x)``, so over the stored
last axis of width w = d - 1

    y = g * x / sqrt((sum(x^2) + sum(x)^2) / (w + 1) + eps)   =   CRMSNorm(X=x, G=g, epsilon=eps)

The reference (ZixuanJiang/pre-rmsnorm-transformer, torch/customized_layer.py ``crms_norm``,
commit 025d43a0) writes ``x * torch.rsqrt((x.square().sum(-1, keepdim=True) +
x.sum(-1, keepdim=True).square()) / (x.shape[-1] + 1) + eps)``, inside ``CRMSNorm.forward``
as ``crms_norm(x.float(), eps).type_as(x)``. Spellings recognized (``s = sum(x)``,
``q = sum of squares``)::

    x ──> Pow(., 2) | Mul(x, x) ──> ReduceSum(last axis) ──> q      (or ReduceSumSquare(x))
    x ──> ReduceSum(last axis) ──> s ──> Pow(., 2) | Mul(s, s) ──> s2
    Add(q, s2) ──> Div(., d) | Mul(., 1/d) ──> Add(eps)
        ──> Sqrt ──> Div(x, .) | Reciprocal+Mul | Div(1, .)+Mul, or Pow(., -0.5)+Mul  ──> [Mul(g)] ──> y

where d (a constant, or ``Cast(Gather(Shape(x), -1) + 1)`` under the TorchScript exporter) must
equal w + 1 for the static width w. Casts whose source and target types are equal are looked
through; a real ``Cast(x, float32)`` (the reference's ``x.float()`` on a half model) is x.

Exact: the canonical op computes the same expression (to float rounding). Conditions (each
failure is a skip reason naming the statistic's Add): eps and the gain constant, the gain
per channel of the last axis; both sums over the last axis only, with keepdims; d = w + 1
(any other divisor is not CRMSNorm: ``/ w`` is a plain RMSNorm written with sums, left to no
recognizer and reported); no intermediate tensor read outside the match.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..core.graph import Namer, add_node, constant, rank_of
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult
from ..core.pattern import (
    Lit,
    Match,
    Recognizer,
    Var,
    any_of,
    divided_by_sqrt,
    dtype_of,
    op,
    reduction_axes,
    static_shape,
    strip_noop,
    take_over,
)
from .statistics import known_value, number_of, outside_reader, scalar_value

X = Var("x")
SUM_SQUARES = any_of(op("ReduceSum", any_of(op("Pow", X, Lit(2.0)), op("Mul", X, X)), name="ss", extra_inputs=True),
                     op("ReduceSumSquare", X, name="ss", extra_inputs=True))
SUM = op("ReduceSum", X, name="s", extra_inputs=True)
STAT = op("Add", SUM_SQUARES, any_of(op("Pow", SUM, Lit(2.0)), op("Mul", SUM, SUM)), name="stat")
MEAN = any_of(op("Div", STAT, Var("d")), op("Mul", STAT, Var("inv_d")))
NUMERATOR = any_of(op("Mul", X, Var("g_pre")), X)
NORMALIZED = divided_by_sqrt(NUMERATOR, op("Add", MEAN, Var("eps")))
CRMSNORM = any_of(op("Mul", NORMALIZED, Var("g_post")), NORMALIZED)


@dataclass
class CRMSNormPlan:
    x: ir.Value
    gain: np.ndarray
    epsilon: float


def _plan(graph: ir.Graph, m: Match) -> CRMSNormPlan | str:
    x = strip_noop(m.bound["x"])  # a no-op Cast (x.float() on float32) is not the norm's input
    stat = m.bound["stat"]
    rank = rank_of(x)
    for name in ("ss", "s"):
        node = m.bound[name]
        if node.attributes.get_int("keepdims", 1) != 1:
            return f"{node.op_type} {node.name} drops the reduced axis (keepdims=0)"
        axes = reduction_axes(node, rank)
        if isinstance(axes, str):
            return axes
        if axes != [-1]:
            return f"{node.op_type} {node.name} sums over axes {axes}, not the last axis only"
    shape = static_shape(x)
    width = shape[-1] if shape else None
    if width is None:
        return f"last dimension of {x.name} is not static (CRMSNorm divides by width + 1)"
    if "d" in m.bound:
        d = number_of(m.bound["d"])
    else:
        inv = number_of(m.bound["inv_d"])
        d = None if not inv else 1.0 / inv
    if d is None:
        return f"the divisor of {stat.name} is not a known number"
    if not np.isclose(d, width + 1, rtol=1e-6, atol=0):
        return (f"(sum x^2 + (sum x)^2) of {stat.name} is divided by {d:g}, not width + 1 = {width + 1}: "
                f"not CRMSNorm's mean over the d = width + 1 coordinates")
    eps = scalar_value(m.bound["eps"], "epsilon")
    if isinstance(eps, str):
        return eps
    gains = []
    for name in ("g_pre", "g_post"):
        if name in m.bound:
            v = known_value(m.bound[name])
            if v is None or v.dtype.kind != "f":
                return f"gain {m.bound[name].name} is not a float constant"
            if v.ndim > (rank or 1) or any(s != 1 for s in v.shape[:-1]) or v.reshape(-1).size not in (1, width):
                return f"gain of shape {list(v.shape)} is not per channel of the last axis"
            gains.append(np.broadcast_to(v.reshape(-1).astype(np.float64), (width,)))
    dtype = dtype_of(x) or np.dtype(np.float32)
    gain = np.ones(width)
    for g in gains:
        gain = gain * g
    reason = outside_reader(m)
    if reason:
        return reason
    return CRMSNormPlan(x, np.ascontiguousarray(gain.astype(dtype)), eps)


def _rewrite(graph: ir.Graph, m: Match, plan: CRMSNormPlan, namer: Namer) -> tuple[str, str, str]:
    root = m.nodes[0]
    base = root.name or "crmsnorm"
    g = constant(namer, base, "crms_gain", plan.gain)
    node = add_node(namer, "CRMSNorm", [plan.x, g], base=base, domain=DOMAIN, attrs={"epsilon": float(plan.epsilon)})
    take_over(root, node.outputs[0])
    return f"decomposed CRMSNorm ending at {root.name} -> {DOMAIN}::CRMSNorm {node.name}", node.name, "crms_norm"


CRMSNORM_RECOGNIZER = Recognizer(
    pattern=CRMSNORM,
    anchor="stat",
    root_ops=frozenset({"Mul", "Div"}),
    plan=_plan,
    rewrite=_rewrite,
    candidate=STAT,
    candidate_ops=frozenset({"Add"}),
    incomplete="sum of squares plus squared sum is not followed by a recognized CRMSNorm spelling "
               "(Div by width + 1, Add eps, Sqrt + Div / Reciprocal+Mul, or Pow -0.5, applied to the same x)",
)


def recognize_crmsnorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite decomposed CRMSNorm (last axis, d = width + 1) to normdeploy::CRMSNorm."""
    CRMSNORM_RECOGNIZER.run(graph, result)
