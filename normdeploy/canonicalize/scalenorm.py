"""Recognize ScaleNorm and rewrite it to the canonical ``normdeploy::ScaleNorm`` (DESIGN.md 2).

Math (Nguyen & Salazar, "Transformers without Tears", 2019), over the last axis:

    y = g * x / max(||x||_2, eps),   g one scalar   =   ScaleNorm(X=x, G=g, epsilon=eps)

The reference (tnq177/transformers_without_tears ``layers.py``, class ``ScaleNorm``) writes
``x * (self.scale / torch.norm(x, dim=-1, keepdim=True).clamp(min=self.eps))`` with
``scale`` a 0-d parameter: eps bounds the norm itself, as the canonical op does. Spellings
recognized (``n`` the norm, ``c = max(n', eps)``)::

    n  = ReduceL2(x, -1)                                   torch.norm, torch.linalg.norm
       | Sqrt(ReduceSum(Pow(x, 2) | Mul(x, x), -1))       sqrt of a sum of squares
       | Sqrt(Cast(ReduceSum(Cast(Pow(x, 2), f32)), f16)) the same in float16 (sum in float32)
       | Sqrt(ReduceSumSquare(x, -1))
       | Sqrt(ReduceMean(Pow(x, 2) | Mul(x, x), -1))      an RMS: n / sqrt(d), d the static width
    n' = n | Mul(n, k)                                     k > 0 a scalar (mmpose: d ** -0.5)
    c  = Clip(n', eps) | Clip(n', eps, +inf) | Max(n', eps) | Max(eps, n')   (.clamp(min=), torch.max)
         [Expand(c, shape of x)]                           F.normalize
    y  = Mul(x, Div(g, c))                                 the reference: x * (g / c)
       | Div(Mul(g, x), c) | Div(x, c) | Mul(Div(x, c), g) torch.max form, F.normalize [* g], mmpose

With k (and the RMS form's 1/sqrt(d)) folded in: ``g x / max(k n, eps) = (g / k) x /
max(n, eps / k)``, so G = g / k and epsilon = eps / k (in float64, then stored), exact in
real arithmetic and to rounding in floats. Float16: eps is the float16 constant the file
holds (1.00136e-05 for 1e-5). Where the exporter sums the squares in float32 (a float16
``x.pow(2).sum()``), the canonical node runs in float32 between ``Cast(x, float32)`` and a
Cast back, so the sum keeps its precision (the squares and the division gain precision).

Conditions (each failure is a skip reason naming the statistic: the ReduceL2, ReduceSum or
ReduceMean): the norm reduces the last axis only, with keepdims; eps, k and every gain are constant scalars (a per-channel
gain stays outside, after a canonical node with G = 1), eps >= 0, k > 0; a Clip has no
finite upper bound; an Expand broadcasts to x's own shape; no intermediate tensor is read
outside the match. A norm divided without an eps (``x / x.norm()``, CLIP's embeddings)
is left alone and reported: max(n, 0) = n would make it a ScaleNorm with epsilon 0, but
nothing there asks for a normalization kernel.

The RMS form ``sqrt(mean(x^2))`` is also the start of an RMSNorm; this pass runs before
:mod:`.rmsnorm` and takes it only when a clamp follows (an RMSNorm adds eps *inside* the
root, which this pattern never matches), so the two never claim one subgraph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx import helper

from ..core.graph import Namer, add_node, constant, consumers
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult
from ..core.pattern import (
    Lit,
    Match,
    Recognizer,
    Var,
    any_of,
    dtype_of,
    op,
    outside_consumer,
    reduce_axes,
    static_shape,
    take_over,
)
from ..core.layout import same_dim
from ..core.graph import shape_of
from .static_values import evaluate

X = Var("x")
SQUARES = any_of(op("Pow", X, Lit(2.0)), op("Mul", X, X))
SUM_OF_SQUARES = any_of(
    op("ReduceSum", SQUARES, name="stat", extra_inputs=True),
    op("Cast", op("ReduceSum", op("Cast", SQUARES, name="up"), name="stat", extra_inputs=True), name="down"),
    op("ReduceSumSquare", X, name="stat", extra_inputs=True),
)
L2 = any_of(
    op("ReduceL2", X, name="stat", extra_inputs=True),
    op("Sqrt", SUM_OF_SQUARES, name="root"),
)
RMS = op("Sqrt", op("ReduceMean", SQUARES, name="stat", extra_inputs=True), name="root")
NORM = any_of(L2, RMS)
SCALED = any_of(op("Mul", NORM, Var("k")), NORM)
CLAMPED = any_of(
    op("Clip", SCALED, Var("eps"), name="clamp", extra_inputs=True),
    op("Max", SCALED, Var("eps"), name="clamp"),
    op("Max", Var("eps"), SCALED, name="clamp"),
)
DENOMINATOR = any_of(op("Expand", CLAMPED, Var("shape"), name="expand"), CLAMPED)
NUMERATOR = any_of(op("Mul", X, Var("g_pre")), X)
SCALENORM = any_of(
    op("Mul", X, op("Div", Var("g_div"), CLAMPED)),
    op("Mul", op("Div", NUMERATOR, DENOMINATOR), Var("g_post")),
    op("Div", NUMERATOR, DENOMINATOR),
)
# the statistic that identifies a candidate (the node its reasons name): a ReduceL2, or a sum of squares under a root
L2_STATISTIC = any_of(
    op("ReduceL2", X, name="stat", extra_inputs=True),
    op("ReduceSum", SQUARES, name="stat", extra_inputs=True),
    op("ReduceSum", op("Cast", SQUARES), name="stat", extra_inputs=True),
    op("ReduceSumSquare", X, name="stat", extra_inputs=True),
)


def _rooted(stat: ir.Node) -> bool:
    """``stat``'s value is read by a Sqrt (directly or after a Cast): an L2 norm."""
    readers = consumers(stat.outputs[0])
    readers += [c for r in readers if r.op_type == "Cast" for c in consumers(r.outputs[0])]
    return any(r.op_type == "Sqrt" for r in readers)


# a norm divided by without a clamp: reported (see the module docstring)
UNCLAMPED = any_of(op("Mul", X, op("Div", Var("g_div"), L2)), op("Div", NUMERATOR, L2))


@dataclass
class ScaleNormPlan:
    x: ir.Value
    gain: float
    epsilon: float
    dtype: np.dtype
    upcast: int | None  # ONNX type the squares are summed in, when that is wider than x's


def _scalar(m: Match, name: str, what: str) -> float | str | None:
    if name not in m.bound:
        return None
    v = evaluate(m.bound[name])
    if v is None:
        return f"{what} is not a constant"
    if v.size != 1:
        return f"{what} of shape {list(v.shape)} is not one scalar (ScaleNorm's gain and eps are scalars)"
    return float(np.asarray(v, np.float64).reshape(-1)[0])


def _plan_scalenorm(graph: ir.Graph, m: Match) -> ScaleNormPlan | str | None:
    x, reducer = m.bound["x"], m.bound["stat"]
    where = f"{reducer.op_type} {reducer.name}"
    shape = static_shape(x)
    rank = len(shape) if shape is not None else None
    axes = reduce_axes(reducer, rank)
    if isinstance(axes, str):
        return f"{where}: {axes}"
    if axes != [-1]:
        return f"{where}: the norm reduces axes {axes}, not the last axis only (ScaleNorm normalizes the last axis)"
    factor = 1.0
    if reducer.op_type == "ReduceMean":  # sqrt(mean(x^2)) = ||x|| / sqrt(d)
        if shape is None or shape[-1] is None:
            return f"{where}: the root of a mean of squares needs a static last dimension"
        factor = 1.0 / np.sqrt(shape[-1])
    values = {}
    for name, what in (("eps", "eps"), ("k", "the factor on the norm"), ("g_div", "gain"), ("g_pre", "gain"),
                       ("g_post", "gain")):
        v = _scalar(m, name, what)
        if isinstance(v, str):
            return f"{where}: {v}"
        values[name] = v
    clamp = m.bound["clamp"]
    if clamp.op_type == "Clip" and len(clamp.inputs) > 2 and clamp.inputs[2] is not None:
        hi = evaluate(clamp.inputs[2])
        if hi is None or hi.size != 1 or not np.isposinf(hi.reshape(-1)[0]):
            return f"{where}: Clip {clamp.name} has an upper bound (ScaleNorm clamps from below only)"
    eps, k = values["eps"], values["k"]
    if eps < 0:
        return f"{where}: eps {eps:g} is negative"
    if k is not None:
        if not k > 0:
            return f"{where}: the norm is scaled by {k:g}, not a positive constant"
        factor *= k
    if "expand" in m.bound:
        out, want = shape_of(m.bound["expand"].outputs[0]), shape_of(x)
        if out is None or want is None or len(out) != len(want) or not all(map(same_dim, out, want)):
            return f"{where}: Expand {m.bound['expand'].name} does not broadcast to the shape of {x.name}"
    dtype = dtype_of(x)
    if dtype is None:
        return f"{where}: the element type of {x.name} is unknown"
    upcast = None
    if "up" in m.bound:
        up, down = m.bound["up"], m.bound["down"]
        to_up = np.dtype(helper.tensor_dtype_to_np_dtype(up.attributes.get_int("to")))
        to_down = np.dtype(helper.tensor_dtype_to_np_dtype(down.attributes.get_int("to")))
        if to_down != dtype or to_up.itemsize <= dtype.itemsize or not np.issubdtype(to_up, np.floating):
            return (f"{where}: the sum of squares is cast to {to_up} and back to {to_down}, "
                    f"not a wider float around a {dtype} input")
        upcast = up.attributes.get_int("to")
    reason = outside_consumer(m)
    if reason:
        return f"{where}: {reason}"
    gain = 1.0
    for name in ("g_div", "g_pre", "g_post"):
        if values[name] is not None:
            gain *= values[name]
    return ScaleNormPlan(x, gain / factor, eps / factor, dtype, upcast)


def _rewrite_scalenorm(graph: ir.Graph, m: Match, plan: ScaleNormPlan, namer: Namer) -> tuple[str, str, str]:
    root = m.nodes[0]
    base = root.name or "scalenorm"
    x = plan.x
    compute = plan.dtype
    if plan.upcast is not None:
        x = add_node(namer, "Cast", [x], base=base, suffix="to_wide", attrs={"to": int(plan.upcast)}).outputs[0]
        compute = np.dtype(helper.tensor_dtype_to_np_dtype(plan.upcast))
    g = constant(namer, base, "scalenorm_gain", np.asarray(plan.gain, compute))
    node = add_node(namer, "ScaleNorm", [x, g], base=base, domain=DOMAIN, attrs={"epsilon": float(plan.epsilon)})
    out = node.outputs[0]
    if plan.upcast is not None:
        to = helper.np_dtype_to_tensor_dtype(plan.dtype)
        out = add_node(namer, "Cast", [out], base=base, suffix="from_wide", attrs={"to": int(to)}).outputs[0]
    take_over(root, out)
    how = {"ReduceL2": "torch.norm", "ReduceMean": "root of a mean of squares"}.get(
        m.bound["stat"].op_type, "sqrt of a sum of squares")
    clamp = m.bound["clamp"].op_type
    extra = "".join([", factor k on the norm" if "k" in m.bound else "", ", F.normalize's Expand" if "expand" in m.bound else "",
                     f", squares summed in {compute}" if plan.upcast is not None else ""])
    return (f"ScaleNorm ({how}, {clamp} eps{extra}) ending at {root.name} -> {DOMAIN}::ScaleNorm {node.name} "
            f"(g {plan.gain:.6g}, eps {plan.epsilon:.6g})", node.name, f"ScaleNorm {how} + {clamp}")


SCALENORM_RECOGNIZER = Recognizer(
    pattern=SCALENORM,
    anchor="stat",
    root_ops=frozenset({"Mul", "Div"}),
    plan=_plan_scalenorm,
    rewrite=_rewrite_scalenorm,
    candidate=L2_STATISTIC,
    candidate_ops=frozenset({"ReduceL2", "ReduceSum", "ReduceSumSquare"}),
    accept_candidate=lambda m: m.bound["stat"].op_type == "ReduceL2" or _rooted(m.bound["stat"]),
    incomplete="an L2 norm (ReduceL2, or the root of a sum of squares) is not followed by a recognized ScaleNorm "
               "spelling (clamp or Max with eps, then x divided by it, times a scalar gain)",
)


def _note_unclamped(graph: ir.Graph, result: PassResult) -> None:
    """A norm divided by with no eps: left alone; give the candidate that reason instead of the generic one."""
    from ..core.pattern import match

    for node in graph:
        if node.op_type not in ("Mul", "Div") or len(node.outputs) != 1:
            continue
        for m in match(UNCLAMPED, node.outputs[0], Match()):
            if m.nodes[0] is not node:
                continue
            name = m.bound["stat"].name
            for i, s in enumerate(result.skipped):
                if s.node == name and s.reason == SCALENORM_RECOGNIZER.incomplete:
                    result.skipped[i].reason = (f"{m.bound['stat'].op_type} {name}: x is divided by its L2 norm with "
                                                "no eps clamp (an L2 normalization, ScaleNorm with epsilon 0): not "
                                                "rewritten")
            break


def recognize_scalenorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite ScaleNorm spellings (torch.norm or sqrt-sum-of-squares, clamp or Max with eps) to normdeploy::ScaleNorm."""
    SCALENORM_RECOGNIZER.run(graph, result)
    _note_unclamped(graph, result)
