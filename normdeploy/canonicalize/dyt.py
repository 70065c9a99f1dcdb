"""Recognize Dynamic Tanh (DyT) and rewrite it to the canonical ``normdeploy::DynamicTanh`` (DESIGN.md 2).

Math (Zhu et al., "Transformers without Normalization", 2025), per channel c on one axis:

    y = w_c * tanh(alpha * x) + b_c,   alpha one scalar   =   DynamicTanh(X=x, Alpha, W=w, B=b, axis)

The reference code (facebookresearch/DynamicTanh ``dynamic_tanh.py``, class
``DynamicTanh``; read here through unchanged copies, e.g. showstarpro/MIM_dyt and
A-transformer/PyTorch-DyT) writes ``tanh(self.alpha * x)`` with ``alpha`` a ``[1]``
parameter, then ``x * self.weight + self.bias`` (``channels_last``, weight ``[C]`` on the
last axis) or ``x * self.weight[:, None, None] + self.bias[:, None, None]`` (channels-first,
ConvNeXt's NCHW norms). Every exporter writes it as::

    x ──> Mul(alpha, x) ──> Tanh ──> Mul(., w) ──> [Add(., b)] ──> y

with ``w``, ``b`` a ``[C]`` or ``[C, 1, 1]`` initializer, or (dynamo without constant
folding: opset-17 files) ``Unsqueeze(Unsqueeze(w, 1), 2)`` of one, and either operand
order of each Mul and Add. The reference always has weight and bias; a spelling without
the bias (``w * tanh(alpha x)``) is taken with B = 0. A Tanh of a scaled input
(``Mul`` by a constant, or ``Div`` by one) is a candidate; one without a per-channel weight
after it is not DyT (tanh soft-capping ``c * tanh(x / c)``, a scaled activation) and is
reported, not rewritten, and so is ``tanh(x / c)`` with a per-channel weight (alpha = 1/c
would round differently from the division). A bare ``tanh(x)`` is an activation, not a
candidate, and neither is the tanh-approximated GELU (``tanh(sqrt(2/pi) * (x + 0.044715
x^3))``).

Channel axis: where the weight varies, counted from the right (``[C]``: -1; ``[C, 1, 1]``
on an NCHW input: axis 1, written as a non-negative axis when the input's rank is known).

Exact: the canonical node computes the same expression in the same type (the reference
has no upcast; a float16 module is float16 throughout). Conditions (each failure is a skip
reason naming the Tanh): alpha is one constant scalar; w and b are constants varying along
the same single axis, with the input's channel count there, and not raising the rank of
x; w is not a scalar; no intermediate tensor is read outside the match.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..core.graph import Namer, add_node, constant
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult
from ..core.pattern import Match, Recognizer, Var, any_of, dtype_of, op, outside_consumer, static_shape, take_over
from .static_values import evaluate, per_channel

X = Var("x")
SCALED_TANH = op("Tanh", any_of(op("Mul", X, Var("alpha")), op("Div", X, Var("divisor"), name="div")), name="tanh")
DYT = any_of(
    op("Add", op("Mul", SCALED_TANH, Var("w")), Var("b")),
    op("Mul", SCALED_TANH, Var("w")),
)

_GELU_TANH = float(np.sqrt(2.0 / np.pi))


def _operands(m: Match) -> tuple[ir.Value, np.ndarray] | None:
    """``(x, factor)`` of ``tanh(factor * x)`` or ``tanh(x / factor)``, whichever operand of the Mul is the
    constant; None for the other operand order of the Mul."""
    if "div" in m.bound:
        c = evaluate(m.bound["divisor"])
        if c is None:
            return None  # tanh(x / y) of two run-time tensors: not a scaled tanh
        return m.bound["x"], c
    alpha = evaluate(m.bound["alpha"])
    if alpha is None:
        return None  # the constant is the other operand (the other order matches it), or there is none
    return m.bound["x"], alpha


def _is_gelu_tanh(m: Match) -> bool:
    """tanh(sqrt(2/pi) * (x + 0.044715 x^3)): the tanh approximation of GELU, not a normalization."""
    got = _operands(m)
    if not isinstance(got, tuple) or "div" in m.bound:
        return False
    x, alpha = got
    inner = x.producer()
    return (alpha.size == 1 and abs(float(alpha.reshape(-1)[0]) - _GELU_TANH) <= 1e-6 * _GELU_TANH
            and inner is not None and inner.op_type == "Add")


def _is_scaled_tanh(m: Match) -> bool:
    return isinstance(_operands(m), tuple) and not _is_gelu_tanh(m)


@dataclass
class DyTPlan:
    x: ir.Value
    alpha: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    axis: int


def _plan_dyt(graph: ir.Graph, m: Match) -> DyTPlan | str | None:
    got = _operands(m)
    if not isinstance(got, tuple):
        return got
    if _is_gelu_tanh(m):
        return None
    x, alpha = got
    tanh = m.bound["tanh"].name
    w = evaluate(m.bound["w"])
    if w is None:
        return f"Tanh {tanh}: the weight after it is not a constant"
    if w.size == 1:
        return (f"Tanh {tanh}: the weight after it is one scalar, not DyT's per-channel weight "
                "(a scaled tanh such as soft-capping c * tanh(x / c))")
    if "div" in m.bound:
        return (f"Tanh {tanh}: its input is divided by a constant (tanh(x / c)); DyT multiplies by alpha, and "
                "alpha = 1/c would round differently: not rewritten")
    if alpha.size != 1:
        return f"Tanh {tanh}: alpha of shape {list(alpha.shape)} is not one scalar (DyT's alpha is a scalar)"
    params = {"weight": w}
    if "b" in m.bound:
        b = evaluate(m.bound["b"])
        if b is None:
            return f"Tanh {tanh}: the bias after it is not a constant"
        params["bias"] = b
    layout = per_channel(params, x)
    if isinstance(layout, str):
        return f"Tanh {tanh}: {layout}"
    axis, channels, vectors = layout
    reason = outside_consumer(m)
    if reason:
        return f"Tanh {tanh}: {reason}"
    shape = static_shape(x)
    if shape is not None and axis != -1:
        axis = len(shape) + axis  # channels-first: a non-negative axis, as normdeploy.nn writes it
    dtype = dtype_of(x) or w.dtype
    bias = vectors.get("bias", np.zeros(channels, dtype))
    return DyTPlan(x, np.asarray(alpha.reshape(()), dtype), vectors["weight"].astype(dtype), bias.astype(dtype), axis)


def _rewrite_dyt(graph: ir.Graph, m: Match, plan: DyTPlan, namer: Namer) -> tuple[str, str, str]:
    root = m.nodes[0]
    base = root.name or "dyt"
    params = [constant(namer, base, "dyt_alpha", plan.alpha), constant(namer, base, "dyt_weight", plan.weight),
              constant(namer, base, "dyt_bias", plan.bias)]
    node = add_node(namer, "DynamicTanh", [plan.x, *params], base=base, domain=DOMAIN, attrs={"axis": int(plan.axis)})
    take_over(root, node.outputs[0])
    form = "channels_last" if plan.axis == -1 else f"channels-first (axis {plan.axis})"
    bias = "" if "b" in m.bound else ", no bias (B = 0)"
    return (f"DyT tanh(alpha x) ending at {root.name} ({form}{bias}) -> {DOMAIN}::DynamicTanh {node.name}",
            node.name, f"DynamicTanh {form}")


DYT_RECOGNIZER = Recognizer(
    pattern=DYT,
    anchor="tanh",
    root_ops=frozenset({"Add", "Mul"}),
    plan=_plan_dyt,
    rewrite=_rewrite_dyt,
    candidate=SCALED_TANH,
    candidate_ops=frozenset({"Tanh"}),
    accept_candidate=_is_scaled_tanh,
    incomplete="Tanh of a scaled input (tanh(alpha * x) or tanh(x / c), constant alpha or c) is not followed by a "
               "per-channel weight Mul (DyT: w * tanh(alpha x) + b)",
)


def recognize_dyt(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite DyT (``w * tanh(alpha * x) + b``, channels last or first) to normdeploy::DynamicTanh."""
    DYT_RECOGNIZER.run(graph, result)
