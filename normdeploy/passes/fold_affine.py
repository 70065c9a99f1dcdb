"""Fold a per-channel affine into the linear layer that produces its input (DESIGN.md 3.1).

::

    X -> [Conv | ConvTranspose | Gemm | MatMul(X, W const)] -> t -> [BatchNormalization | UnifiedNorm] -> Y
    X -> [linear with W', b']                                                                          -> Y

Every eval-time BatchNormalization and UnifiedNorm is ``y = a_c x + c_c`` on its channel
axis, with

* BatchNormalization: ``a = gamma / sqrt(var + eps)``, ``c = beta - a * mean``
* UnifiedNorm:        ``a = w / sqrt(r + eps)``,       ``c = b``

and a linear layer ``t = W x + b`` whose output channel is that axis absorbs it:
``W' = diag(a) W`` (the rows of W that write channel c are scaled by a_c) and
``b' = a * b + c``. This is exact in real arithmetic; the fold is computed in float64
and stored once in the weight's dtype, so outputs agree to float rounding.

Conditions (each failure is reported as the skip reason):

* the affine's parameters are constants, finite, variance/moment non-negative;
* its input is written by a linear node whose weight (and bias) is constant and whose
  output channel axis is the affine's channel axis;
* that output is read by the affine only and is not a graph output (otherwise the
  un-normalized value is still needed);
* Gemm: ``transA`` is irrelevant, ``transB`` picks the weight's row/column layout, ``alpha``
  stays, ``beta`` is folded into the new bias; MatMul: the constant weight is the
  right operand, its last axis is the channel axis, the shift becomes an Add.

A folded weight is a new constant: a weight shared with another node is never edited.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Namer, const_value, constant, is_graph_output, rank_of, rewire_output
from ..ops import DOMAIN, ATTRIBUTES
from . import PassContext, PassResult, register


@dataclass
class Affine:
    """``y = scale * x + shift`` along ``axis`` of the node's input (float64 vectors)."""

    node: gs.Node
    scale: np.ndarray
    shift: np.ndarray
    axis: int  # as written on the node; may be negative


def affine_of(node: gs.Node) -> Affine | str:
    """The per-channel affine computed by ``node``, or the reason it is not a foldable one."""
    if node.op == "BatchNormalization" and node.domain in (None, "", "ai.onnx"):
        if node.attrs.get("training_mode", 0):
            return "BatchNormalization in training mode uses batch statistics"
        if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
            return "BatchNormalization running-statistics outputs are used"
        names = ("scale", "bias", "mean", "var")
        vals = [const_value(t) for t in node.inputs[1:5]]
        for n, v in zip(names, vals):
            if v is None:
                return f"BatchNormalization {n} is not a constant"
        g, b, mean, var = (np.asarray(v, np.float64) for v in vals)
        eps = float(node.attrs.get("epsilon", 1e-5))
        a = g / np.sqrt(var + eps)
        return Affine(node, a, b - a * mean, 1)
    if node.op == "UnifiedNorm" and node.domain == DOMAIN:
        vals = [const_value(t) for t in node.inputs[1:4]]
        for n, v in zip(("running moment", "weight", "bias"), vals):
            if v is None:
                return f"UnifiedNorm {n} is not a constant"
        r, w, b = (np.asarray(v, np.float64) for v in vals)
        attrs = {**ATTRIBUTES["UnifiedNorm"], **node.attrs}
        return Affine(node, w / np.sqrt(r + float(attrs["epsilon"])), b, int(attrs["axis"]))
    return f"{node.op} is not a per-channel affine"


def _normalized_axis(axis: int, rank: int | None) -> int | None:
    if axis >= 0:
        return axis
    return None if rank is None else axis + rank


def _single_producer(graph: gs.Graph, aff: Affine) -> gs.Node | str:
    x = aff.node.inputs[0]
    if not x.inputs:
        return "input is not produced by a node"
    prod = x.inputs[0]
    if is_graph_output(graph, x):
        return f"{prod.name} output is also a graph output"
    if len(x.outputs) != 1:
        return f"{prod.name} output has {len(x.outputs)} consumers (the un-normalized value is still needed)"
    return prod


def _fold_conv(prod: gs.Node, aff: Affine, namer: Namer) -> str | None:
    w = const_value(prod.inputs[1])
    if w is None:
        return f"{prod.op} weight is not a constant"
    if _normalized_axis(aff.axis, w.ndim) != 1:
        return f"normalization axis {aff.axis} is not the {prod.op} channel axis 1"
    b = const_value(prod.inputs[2]) if len(prod.inputs) > 2 else None
    if len(prod.inputs) > 2 and b is None:
        return f"{prod.op} bias is not a constant"
    a, c = aff.scale, aff.shift
    w64 = w.astype(np.float64)
    if prod.op == "Conv":
        w_new = w64 * a.reshape([-1] + [1] * (w.ndim - 1))
    else:  # ConvTranspose weight: [Cin, Cout / group, k...]; output channel = g * (Cout/group) + j
        group = int(prod.attrs.get("group", 1))
        cin, cpg = w.shape[0], w.shape[1]
        ws = w64.reshape(group, cin // group, cpg, *w.shape[2:])
        w_new = (ws * a.reshape(group, 1, cpg, *[1] * (w.ndim - 2))).reshape(w.shape)
    b_new = a * (np.zeros_like(a) if b is None else b.astype(np.float64)) + c
    base = prod.name or "linear"
    prod.inputs[1] = constant(namer, base, "weight_folded", w_new.astype(w.dtype))
    bias = constant(namer, base, "bias_folded", b_new.astype(w.dtype))
    if len(prod.inputs) > 2:
        prod.inputs[2] = bias
    else:
        prod.inputs.append(bias)
    return None


def _fold_gemm(prod: gs.Node, aff: Affine, namer: Namer) -> str | None:
    if _normalized_axis(aff.axis, 2) != 1:
        return f"normalization axis {aff.axis} is not the Gemm output channel axis 1"
    w = const_value(prod.inputs[1])
    if w is None:
        return "Gemm B is not a constant"
    cval = const_value(prod.inputs[2]) if len(prod.inputs) > 2 else None
    if len(prod.inputs) > 2 and cval is None:
        return "Gemm C is not a constant"
    a, c = aff.scale, aff.shift
    trans_b = int(prod.attrs.get("transB", 0))
    w_new = w.astype(np.float64) * (a[:, None] if trans_b else a[None, :])
    beta = float(prod.attrs.get("beta", 1.0))
    c_new = c if cval is None else a * (beta * cval.astype(np.float64)) + c
    base = prod.name or "gemm"
    prod.inputs[1] = constant(namer, base, "B_folded", w_new.astype(w.dtype))
    bias = constant(namer, base, "C_folded", np.asarray(c_new).astype(w.dtype))
    if len(prod.inputs) > 2:
        prod.inputs[2] = bias
    else:
        prod.inputs.append(bias)
    prod.attrs["beta"] = 1.0
    return None


def _fold_matmul(graph: gs.Graph, prod: gs.Node, aff: Affine, namer: Namer) -> str | None:
    w = const_value(prod.inputs[1])
    if w is None:
        return "MatMul right operand is not a constant (a constant left operand is not folded here)"
    if w.ndim < 2:
        return "MatMul weight is a vector"
    out_rank = rank_of(prod.outputs[0])
    axis = _normalized_axis(aff.axis, out_rank)
    if out_rank is None or axis is None:
        return "rank of the MatMul output is unknown"
    if axis != out_rank - 1:
        return f"normalization axis {aff.axis} is not the MatMul output's last axis"
    a, c = aff.scale, aff.shift
    base = prod.name or "matmul"
    prod.inputs[1] = constant(namer, base, "weight_folded", (w.astype(np.float64) * a).astype(w.dtype))
    if np.any(c != 0):  # the shift becomes an Add after the MatMul, which writes the affine's output
        y = aff.node.outputs[0]
        aff.node.outputs.clear()
        aff.node.inputs.clear()
        shift = constant(namer, base, "bias_folded", c.astype(w.dtype))
        graph.nodes.append(gs.Node("Add", namer(base, "bias_add"), inputs=[prod.outputs[0], shift], outputs=[y]))
        return "rewired"
    return None


@register("fold_affine_into_linear", stage="rewrite", exact=True)
def fold_affine_into_linear(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Fold BatchNormalization and UnifiedNorm into the Conv, ConvTranspose, Gemm or MatMul before them."""
    result = PassResult("fold_affine_into_linear", exact=True)
    namer = Namer(graph)
    for node in list(graph.nodes):
        if not (node.op in ("BatchNormalization", "UnifiedNorm")):
            continue
        result.matched += 1
        aff = affine_of(node)
        if isinstance(aff, str):
            result.skip(node.name, aff)
            continue
        prod = _single_producer(graph, aff)
        if isinstance(prod, str):
            result.skip(node.name, prod)
            continue
        if prod.op in ("Conv", "ConvTranspose"):
            reason = _fold_conv(prod, aff, namer)
        elif prod.op == "Gemm":
            reason = _fold_gemm(prod, aff, namer)
        elif prod.op == "MatMul":
            reason = _fold_matmul(graph, prod, aff, namer)
        else:
            reason = f"producer {prod.name} ({prod.op}) is not linear"
        if reason not in (None, "rewired"):
            result.skip(node.name, reason)
            continue
        if reason is None:
            rewire_output(node, prod)
        result.rewrote(f"{node.op} {node.name} folded into {prod.op} {prod.name}", node.name)
    return result
