"""TEMPORARY (removed when the port to onnx-ir is complete): the onnx-graphsurgeon version for passes not yet ported.

Per-channel affine sources: ``y = scale * core(x) + shift`` of every normalization that has one.

``affine_of(node)`` is the one place that reads a normalization's stored parameters as an
affine; the fold (:mod:`normdeploy.rewrite.fold_affine`) and both lowerings
(:mod:`normdeploy.lower.ort`, :mod:`normdeploy.lower.trt`) use it, with one guard: a
statistic ``s`` that is divided by ``sqrt(s + eps)`` must make ``s + eps`` positive.

* BatchNormalization: ``a = gamma / sqrt(var + eps)``, ``c = beta - a * mean``, core = identity
* UnifiedNorm:        ``a = w / sqrt(r + eps)``,       ``c = b``,            core = identity
* PowerNorm:          ``a = w / sqrt(phi + eps)``,     ``c = b``,            core = GroupScaling
* LayerNormalization: ``a = scale``, ``c = bias``; RMSNorm, CRMSNorm: ``a = g``; ScaleNorm: ``a = g``
  (one scalar); DynamicTanh: ``a = w``, ``c = b``; core = the normalization with unit gain

Scale and shift are float64, broadcast right-aligned against ``y`` (a vector on the channel
axis, shaped ``(C, 1, ..., 1)`` for a channels-first axis).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .graph_gs import const_value, rank_of
from .ops import ATTRIBUTES, DOMAIN

ONNX_DOMAINS = (None, "", "ai.onnx")
CANONICAL_SOURCES = ("UnifiedNorm", "PowerNorm", "RMSNorm", "CRMSNorm", "DynamicTanh", "ScaleNorm")

@dataclass
class Affine:
    """``y = scale * core(x) + shift`` (float64 arrays, broadcast right-aligned against y).

    ``pure`` sources (BatchNormalization, UnifiedNorm) have core = identity: the node
    disappears when folded. Others keep their core with unit parameters.
    """

    node: gs.Node
    scale: np.ndarray
    shift: np.ndarray
    pure: bool
    rank: int | None = None
    axis: int = 1  # channel axis as written on the node (may be negative); informative

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def y(self) -> gs.Tensor:
        return self.node.outputs[0]


def is_affine_source(node: gs.Node) -> bool:
    if node.domain in ONNX_DOMAINS:
        return node.op in ("BatchNormalization", "LayerNormalization")
    return node.domain == DOMAIN and node.op in CANONICAL_SOURCES


def _params(node: gs.Node, names: tuple[str, ...], first: int = 1, optional: tuple[str, ...] = ()
            ) -> list[np.ndarray | None] | str:
    """Constant inputs ``first``, ``first + 1``, ... as float64 (None for a missing optional one), or a reason."""
    vals = []
    for i, n in enumerate(names):
        t = node.inputs[first + i] if len(node.inputs) > first + i else None
        if t is None or (isinstance(t, gs.Variable) and not t.name):
            if n not in optional:
                return f"{node.op} has no {n} input"
            vals.append(None)
            continue
        v = const_value(t)
        if v is None:
            return f"{node.op} {n} is not a constant"
        vals.append(np.asarray(v, np.float64))
    return vals


def _channel_shape(n: int, axis: int, rank: int | None) -> tuple[int, ...] | None:
    """Shape that places a length-n vector on ``axis`` of a rank-``rank`` tensor, right-aligned."""
    if axis < 0:
        return (n,) + (1,) * (-axis - 1)
    if rank is None:
        return None
    return (n,) + (1,) * (rank - axis - 1)


def tensor_rank(t: gs.Tensor) -> int | None:
    """Rank from shape inference, else from a Conv/Gemm neighbour's weight."""
    r = rank_of(t)
    if r is not None:
        return r
    for n in list(t.inputs) + list(t.outputs):
        if n.op in ("Conv", "ConvTranspose") and len(n.inputs) > 1 and (n.inputs[0] is t or n.outputs[0] is t):
            w = const_value(n.inputs[1])
            if w is not None:
                return w.ndim
        if n.op == "Gemm" and (n.outputs[0] is t or n.inputs[0] is t):
            return 2
    return None


def affine_of(node: gs.Node) -> Affine | str:
    """The per-channel affine part of ``node``, or the reason it has none that folds."""
    op = node.op
    rank = tensor_rank(node.outputs[0]) if node.outputs else None
    if rank is None and node.inputs:
        rank = tensor_rank(node.inputs[0])
    if op == "BatchNormalization" and node.domain in ONNX_DOMAINS:
        if node.attrs.get("training_mode", 0):
            return "BatchNormalization in training mode uses batch statistics"
        if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
            return "BatchNormalization running-statistics outputs are used"
        p = _params(node, ("scale", "bias", "mean", "var"))
        if isinstance(p, str):
            return p
        g, b, mean, var = p
        eps = float(node.attrs.get("epsilon", 1e-5))
        if np.any(var + eps <= 0):
            return "BatchNormalization var + eps is not positive"
        a = g / np.sqrt(var + eps)
        scale, shift, axis, pure = a, b - a * mean, 1, True
    elif op == "LayerNormalization" and node.domain in ONNX_DOMAINS:
        if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
            return "LayerNormalization mean / inv-std outputs are used"
        p = _params(node, ("scale", "bias"), optional=("bias",))
        if isinstance(p, str):
            return p
        g, b = p
        axis = int(node.attrs.get("axis", -1))
        if axis >= 0:
            if rank is None:
                return "rank of the LayerNormalization input is unknown"
            axis -= rank
        if g.ndim > -axis:
            return f"LayerNormalization scale has rank {g.ndim} > the {-axis} normalized axes"
        b = np.zeros_like(g) if b is None else b
        return _finish(node, g, b, False, rank, axis)
    elif node.domain == DOMAIN and op in CANONICAL_SOURCES:
        attrs = {**ATTRIBUTES[op], **node.attrs}
        if op == "UnifiedNorm":
            p = _params(node, ("running moment", "weight", "bias"))
            if isinstance(p, str):
                return p
            r, w, b = p
            if np.any(r + float(attrs["epsilon"]) <= 0):
                return "UnifiedNorm running moment + eps is not positive"
            scale, shift, axis, pure = w / np.sqrt(r + float(attrs["epsilon"])), b, int(attrs["axis"]), True
        elif op == "PowerNorm":
            p = _params(node, ("running quadratic mean", "weight", "bias"))
            if isinstance(p, str):
                return p
            phi, w, b = p
            if np.any(phi + float(attrs["epsilon"]) <= 0):
                return "PowerNorm running quadratic mean + eps is not positive"
            scale, shift, axis, pure = w / np.sqrt(phi + float(attrs["epsilon"])), b, -1, False
        elif op in ("RMSNorm", "CRMSNorm", "ScaleNorm"):
            p = _params(node, ("gain",))
            if isinstance(p, str):
                return p
            (g,) = p
            if op == "ScaleNorm":
                if g.size != 1:
                    return "ScaleNorm gain is not one scalar"
                g = g.reshape(())
            scale, shift, axis, pure = g, np.zeros_like(g), -1, False
        else:  # DynamicTanh
            p = _params(node, ("weight", "bias"), first=2)  # alpha stays where it is, constant or not
            if isinstance(p, str):
                return p
            w, b = p
            scale, shift, axis, pure = w, b, int(attrs["axis"]), False
    else:
        return f"{op} is not a per-channel affine"
    if scale.ndim == 0 and shift.ndim == 0:
        return _finish(node, scale, shift, pure, rank, axis)
    shape = _channel_shape(max(scale.size, shift.size), axis, rank)
    if shape is None:
        return f"rank of the {op} input is unknown (channel axis {axis})"
    n = shape[0]
    scale = np.broadcast_to(scale.reshape(-1), (n,)).reshape(shape)
    shift = np.broadcast_to(shift.reshape(-1), (n,)).reshape(shape)
    return _finish(node, scale, shift, pure, rank, axis)


def _finish(node, scale, shift, pure, rank, axis) -> Affine | str:
    scale, shift = np.asarray(scale, np.float64), np.asarray(shift, np.float64)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return f"{node.op} parameters are not finite"
    return Affine(node, scale, shift, pure, rank, axis)
