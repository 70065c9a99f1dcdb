"""Recognize an eval-mode division by a running statistic and rewrite it to ``normdeploy::UnifiedNorm``.

Math, per channel c on one axis (DESIGN.md 2):

    y = w_c * x / sqrt(r_c + eps) + b_c   =   UnifiedNorm(X=x, R=r, W=w, B=b, epsilon=eps, axis)

Unified Normalization's eval branch (hikvision-research/Unified-Normalization,
``image_classification/models/unified_normalization/unified_normalization.py``, class
``UN1d``, ``self.training`` False) divides by the running (uncentred) second moment:
``x / (running_var.view(1, C, 1, 1) + eps).sqrt()``, then ``weight.view(1, C, 1, 1) * x +
bias.view(1, C, 1, 1)``, on the tokens laid out as ``[B, C, N, 1]`` (permute, reshape,
unsqueeze). PowerNorm's eval branch (sIncerass/powernorm ``MaskPowerNorm``) has the same
arithmetic with its running quadratic mean ``running_phi`` ([1, C, 1, 1]); :mod:`.powernorm`
joins it with the GroupScaling before it. Spellings::

    x ──> Div(x, Sqrt(Add(r, eps))) ──> Mul(w, .) ──> Add(., b) ──> y     dynamo raw (opset 17):
                                                                         r, w, b through Reshape(Concat(1, C, 1, 1))
    x ──> Div(x, s) ──────────────────> Mul(w, .) ──> Add(., b) ──> y     the exporter folded s = sqrt(r + eps)
                                                                         (TorchScript; dynamo at opset >= 18)

Where only ``s`` is left, R = s^2 and epsilon = 0 (``sqrt(s^2) = s`` up to the rounding of
the square, computed in float64 and stored once). The statistic, weight and bias are read
through the exporters' shape arithmetic (:mod:`.static_values`), e.g. TorchScript's
``Reshape(w, Concat(1, Gather(Shape(x), 1), 1, 1))`` with a dynamic batch.

The canonical node keeps the layout around it (the Transposes and Reshapes stay):
``fold_affine_into_linear`` folds it through them into the neighbouring linear layer
(UnifiedNorm is a pure per-channel affine), and ``lower`` writes a Mul and an Add otherwise.

Exact (to the rounding of ``w / s`` computed once in float64 instead of two roundings).
Candidates are divisions by (the root of) a constant; conditions (each failure is a skip
reason naming the Div): w and b are constants; they vary along one common channel axis, with the input's channel count there,
and do not raise its rank; ``r + eps > 0`` (``s > 0``: a folded divisor must be a square
root); no intermediate tensor is read outside the match. A Div whose input is itself a
per-channel constant shift or scale of something (``(x - mean) / sqrt(var + eps)``: a decomposed
BatchNorm) is not this recognizer's: a BatchNorm spelling is left to the affine folds. A shift
of another shape (ViT's ``tokens + pos_embed``, one value per token and channel) is an input.

The scale computed first, ``x * (w / sqrt(r + eps)) + b`` (a ``.pt2`` of
:class:`normdeploy.nn.UnifiedNorm` or :class:`normdeploy.nn.PowerNorm`: ``torch.export`` traces
their eval arithmetic), is the same affine::

    x ──> Mul(x, [Reshape](Div(w, Sqrt(Add(r, eps))))) ──> Add(., b) ──> y

The export stage's constant folder would compute ``w / sqrt(r + eps)`` into one constant, after
which nothing tells it apart from any other frozen affine (a FrozenBatchNorm2d, a layer scale);
it leaves the ``r + eps`` of such a scale alone (:func:`normdeploy.export.finalize`), so this
stage reads ``r``, ``eps`` and ``w`` apart and names the UnifiedNorm. The scale's Reshape gives
``r`` and ``w`` the layout along ``x``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..core.graph import Namer, add_node, constant
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult
from ..core.pattern import Match, Recognizer, Var, any_of, dtype_of, op, outside_consumer, static_shape, take_over
from .static_values import evaluate, onnx_reshape, per_channel

X = Var("x")
ROOT = op("Sqrt", op("Add", Var("r"), Var("eps")), name="root")
NORMED = op("Div", X, any_of(ROOT, Var("s")), name="div")
#: the scale computed first, ``w / sqrt(r + eps)``, viewed to broadcast (``v.reshape(-1, 1, 1)``) or not
SCALE = op("Div", Var("w"), ROOT, name="div")
VIEWED_SCALE = any_of(SCALE, op("Reshape", SCALE, Var("view"), name="viewed"))
RUNNING_AFFINE = any_of(op("Add", op("Mul", Var("w"), NORMED), Var("b")),
                        op("Add", op("Mul", X, VIEWED_SCALE, name="scaled"), Var("b")))
STATISTIC = op("Div", X, ROOT, name="div")  # a candidate: x divided by the root of a constant + eps


@dataclass
class UnifiedNormPlan:
    x: ir.Value
    r: np.ndarray
    w: np.ndarray
    b: np.ndarray
    epsilon: float
    axis: int
    folded: bool


def _shifted_input(x: ir.Value, channels: int) -> bool:
    """``x`` is a per-channel constant shift or scale of something, ``channels`` values (the statistic's),
    maybe times scalars: a decomposed BatchNorm's ``x - mean``. A shift of another shape (ViT's
    ``tokens + pos_embed``, one value per token and channel) is an input like any other."""
    for _ in range(8):  # through scalar factors: MPBN's tdBatchNorm2d divides alpha * V_th * (x - mean)
        n = x.producer()
        if n is None or n.op_type not in ("Sub", "Add", "Mul", "Div") or len(n.inputs) != 2 or None in n.inputs:
            return False
        consts = [evaluate(i) for i in n.inputs]
        if any(c is not None and c.size == channels for c in consts):
            return True
        if not any(c is not None and c.size == 1 for c in consts) or all(c is not None for c in consts):
            return False
        x = n.inputs[0] if consts[0] is None else n.inputs[1]
    return False


def _candidate(m: Match) -> bool:
    r, eps = evaluate(m.bound["r"]), evaluate(m.bound["eps"])
    return (r is not None and eps is not None and max(r.size, eps.size) > 1
            and not _shifted_input(m.bound["x"], max(r.size, eps.size)))


def _statistic(m: Match) -> tuple[np.ndarray, float, bool] | str | None:
    """``(r, eps, folded)`` of the divisor; None where another match of the same nodes reads it better."""
    div = m.bound["div"].name
    if "root" in m.bound:
        a, c = evaluate(m.bound["r"]), evaluate(m.bound["eps"])
        if a is None or c is None:
            return None  # a statistic computed at run time (a LayerNorm's, an RMSNorm's): not a running statistic
        if a.size == 1 and c.size > 1:
            return None  # eps is the first operand: the other operand order reads it
        if c.size != 1:
            return f"Div {div}: neither operand of the divisor's Add is one scalar eps"
        eps = float(np.asarray(c, np.float64).reshape(-1)[0])
        if eps < 0 or np.any(np.asarray(a, np.float64) + eps <= 0):
            return f"Div {div}: running statistic + eps is not positive (the original divides by zero or NaN)"
        return a, eps, False
    s = m.bound["s"]
    root = s.producer()
    if root is not None and root.op_type == "Sqrt":
        inner = root.inputs[0].producer() if root.inputs and root.inputs[0] is not None else None
        if inner is not None and inner.op_type == "Add":
            return None  # the root form reads it (with r and eps apart)
        v = evaluate(root.inputs[0])  # sqrt of one constant: eps already added in
        if v is None:
            return None  # the root of a run-time statistic: not a running statistic
        if not np.all(np.asarray(v, np.float64) > 0):
            return f"Div {div}: the divisor's radicand has entries <= 0 (the original divides by zero or NaN)"
        return v, 0.0, False
    v = evaluate(s)
    if v is None:
        return None  # a division by a run-time tensor: not a running statistic
    if not np.all(np.asarray(v, np.float64) > 0):
        return f"Div {div}: the divisor has entries <= 0 (not the root of a running statistic)"
    return v, 0.0, True


def _viewed(a: np.ndarray, view: ir.Node) -> np.ndarray | None:
    """``a`` reshaped as the scale's ``Reshape`` node ``view`` reshapes the scale (same element count)."""
    shape = evaluate(view.inputs[1])
    if shape is None:
        return None
    try:
        return onnx_reshape(a, [int(d) for d in shape.reshape(-1)], view.attributes.get_int("allowzero", 0))
    except ValueError:
        return None


def _plan(graph: ir.Graph, m: Match) -> UnifiedNormPlan | str | None:
    x = m.bound["x"]
    if "scaled" in m.bound and (evaluate(x) is not None or evaluate(m.bound["w"]) is None):
        return None  # not a scale of constants times the input: the other spelling reads it
    r = evaluate(m.bound["r"]) if "root" in m.bound else None
    if r is not None and _shifted_input(x, r.size):
        return None  # before the statistic's checks: a decomposed BatchNorm is reported by no one here
    stat = _statistic(m)
    if not isinstance(stat, tuple):
        return stat
    r, eps, folded = stat
    if "root" not in m.bound and _shifted_input(x, r.size):  # (the root form's r was read above)
        return None
    div = m.bound["div"].name
    reason = outside_consumer(m)
    if reason:
        return f"Div {div}: {reason}"
    w, b = evaluate(m.bound["w"]), evaluate(m.bound["b"])
    if w is None or b is None:
        return f"Div {div}: the {'weight' if w is None else 'bias'} after it is not a constant"
    if "viewed" in m.bound:  # r and w broadcast as the scale's view makes them broadcast
        r, w = (_viewed(np.array(a), m.bound["viewed"]) for a in np.broadcast_arrays(r, w))
        if r is None or w is None:
            return f"Div {div}: the Reshape {m.bound['viewed'].name} of the scale is not a static view"
    layout = per_channel({"statistic": r, "weight": w, "bias": b}, x)
    if isinstance(layout, str):
        return f"Div {div}: {layout}"
    axis, channels, vec = layout
    if axis is None:
        return f"Div {div}: statistic, weight and bias are scalars (not per channel)"
    dtype = dtype_of(x) or w.dtype
    r64 = np.asarray(vec["statistic"], np.float64)
    stat = (r64 * r64 if folded else r64).astype(dtype)
    if not np.all(np.isfinite(stat)):
        return f"Div {div}: the squared divisor overflows {dtype}"
    shape = static_shape(x)
    if shape is not None:
        axis = len(shape) + axis
    return UnifiedNormPlan(x, stat, vec["weight"].astype(dtype), vec["bias"].astype(dtype), eps, axis, folded)


def _rewrite(graph: ir.Graph, m: Match, plan: UnifiedNormPlan, namer: Namer) -> tuple[str, str, str]:
    root = m.nodes[0]
    base = root.name or "unified_norm"
    params = [constant(namer, base, "un_statistic", plan.r), constant(namer, base, "un_weight", plan.w),
              constant(namer, base, "un_bias", plan.b)]
    node = add_node(namer, "UnifiedNorm", [plan.x, *params], base=base, domain=DOMAIN,
                    attrs={"epsilon": float(plan.epsilon), "axis": int(plan.axis)})
    take_over(root, node.outputs[0])
    how = "divisor folded by the exporter: R = s^2, epsilon 0" if plan.folded else f"eps {plan.epsilon:g}"
    return (f"division by a running statistic ending at {root.name} (axis {plan.axis}, {how}) -> "
            f"{DOMAIN}::UnifiedNorm {node.name}", node.name, "running-statistic affine (UN / PowerNorm eval)")


UNIFIED_NORM_RECOGNIZER = Recognizer(
    pattern=RUNNING_AFFINE,
    anchor="div",
    root_ops=frozenset({"Add"}),
    plan=_plan,
    rewrite=_rewrite,
    candidate=STATISTIC,
    candidate_ops=frozenset({"Div"}),
    accept_candidate=_candidate,
    incomplete="x / sqrt(r + eps) with a constant per-channel r is not followed by a constant weight Mul and bias Add "
               "(Unified Normalization / PowerNorm eval: w * x / sqrt(r + eps) + b)",
)


def recognize_unified_norm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite ``w * x / sqrt(r + eps) + b`` (UN's and PowerNorm's eval affine) to normdeploy::UnifiedNorm."""
    UNIFIED_NORM_RECOGNIZER.run(graph, result)
