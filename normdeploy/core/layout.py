"""Where a per-channel affine lands after a layout op: Transpose permutes its axes; Reshape,
Flatten, Squeeze and Unsqueeze keep it when their shapes leave a common prefix and suffix
around a reshaped middle (the affine is materialized over the middle and reshaped with it);
Gather and Slice pass it along axes where it is constant. Arrays broadcast right-aligned
against the tensor; both directions (``map_forward``: input to output, ``map_backward``)
use the same mapper.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .graph import attr, const_value, rank_of, shape_of

MOVERS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
SELECTORS = ("Gather", "Slice")  # consumer side only: they pick along axes where the affine is constant

def pad_rank(arr: np.ndarray, rank: int) -> np.ndarray | None:
    """Right-aligned broadcast array as rank ``rank`` (None if it has more non-unit axes)."""
    if arr.ndim > rank:
        lead = arr.shape[: arr.ndim - rank]
        if any(d != 1 for d in lead):
            return None
        return arr.reshape(arr.shape[arr.ndim - rank:])
    return arr.reshape((1,) * (rank - arr.ndim) + arr.shape)


def compress(arr: np.ndarray) -> np.ndarray:
    """Shrink every axis along which ``arr`` is constant to size 1."""
    for ax in range(arr.ndim):
        if arr.shape[ax] > 1:
            first = np.take(arr, [0], axis=ax)
            if np.array_equal(np.broadcast_to(first, arr.shape), arr):
                arr = first
    return arr


def vector_along(arr: np.ndarray, axis: int, rank: int | None, n: int) -> np.ndarray | None:
    """``arr`` as a length-``n`` vector along ``axis``, or None if it varies along another axis."""
    if rank is None:
        if axis >= 0:
            return None
        rank = max(arr.ndim, -axis)
    a = pad_rank(arr, rank)
    if a is None:
        return None
    ax = axis % rank
    if any(a.shape[i] != 1 for i in range(rank) if i != ax):
        return None
    v = a.reshape(-1)
    if v.size == 1:
        return np.full(n, v[0])
    return v if v.size == n else None


def dims(t: ir.Value) -> list | None:
    """The shape of ``t``: ints, named dimensions (str) or None for unknown ones; None for an unknown rank."""
    return shape_of(t)


def same_dim(p, q) -> bool:
    if isinstance(p, (int, np.integer)) and isinstance(q, (int, np.integer)):
        return int(p) == int(q)
    return isinstance(p, str) and isinstance(q, str) and p == q


def _reshape_arr(arr: np.ndarray, src: list | None, dst: list | None) -> np.ndarray | str:
    """Map an affine array on a tensor of shape ``src`` to the same tensor reshaped to ``dst``."""
    if src is None or dst is None:
        return "shape unknown (run shape inference)"
    a = pad_rank(arr, len(src))
    if a is None:
        return "affine rank exceeds the tensor rank"
    p = 0
    while p < min(len(src), len(dst)) and same_dim(src[p], dst[p]):
        p += 1
    q = 0
    while q < min(len(src), len(dst)) - p and same_dim(src[len(src) - 1 - q], dst[len(dst) - 1 - q]):
        q += 1
    mid_in, mid_out = src[p:len(src) - q], dst[p:len(dst) - q]
    if all(n == 1 for n in a.shape[p:len(src) - q]):
        # the affine is constant along every reshaped axis (e.g. [batch, S, d] -> [batch*S, d]
        # with a per-d affine): no sizes are needed, symbolic or not
        return compress(a.reshape(a.shape[:p] + (1,) * len(mid_out) + a.shape[len(src) - q:]))
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in mid_in + mid_out):
        return "the reshaped axes have symbolic sizes"
    if int(np.prod(mid_in, dtype=np.int64)) != int(np.prod(mid_out, dtype=np.int64)):
        return "reshape sizes disagree"
    lead, tail = a.shape[:p], a.shape[len(src) - q:]
    full = np.broadcast_to(a, lead + tuple(int(d) for d in mid_in) + tail)
    return compress(full.reshape(lead + tuple(int(d) for d in mid_out) + tail))


def _transpose_arr(arr: np.ndarray, perm: list[int]) -> np.ndarray | None:
    a = pad_rank(arr, len(perm))
    return None if a is None else np.transpose(a, perm)


def const_ints(t: ir.Value) -> list[int] | None:
    v = const_value(t)
    return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]


def _perm(node: ir.Node, rank: int | None) -> list[int] | None:
    perm = attr(node, "perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(range(rank))[::-1]


def _map_layout(node: ir.Node, arrs: list[np.ndarray], backward: bool) -> list[np.ndarray] | str | None:
    """Identity, Transpose and the reshapes, either way; None when ``node`` is none of those."""
    src, dst = dims(node.inputs[0]), dims(node.outputs[0])
    if node.op_type == "Identity":
        return arrs
    if node.op_type == "Transpose":
        perm = _perm(node, len(src) if src is not None else rank_of(node.outputs[0]))
        if perm is None:
            return "Transpose rank unknown"
        out = [_transpose_arr(a, list(np.argsort(perm)) if backward else perm) for a in arrs]
        return "affine rank exceeds the tensor rank" if any(o is None for o in out) else out
    if node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        out = [_reshape_arr(a, dst, src) if backward else _reshape_arr(a, src, dst) for a in arrs]
        bad = next((o for o in out if isinstance(o, str)), None)
        return bad if bad else out
    return None


def map_forward(node: ir.Node, arrs: list[np.ndarray]) -> list[np.ndarray] | str:
    """Affine arrays on ``node.inputs[0]`` mapped to ``node.outputs[0]`` (consumer direction)."""
    mapped = _map_layout(node, arrs, backward=False)
    if mapped is not None:
        return mapped
    src = dims(node.inputs[0])
    if node.op_type in SELECTORS:
        if src is None:
            return "shape unknown (run shape inference)"
        rank = len(src)
        full = [pad_rank(a, rank) for a in arrs]
        if any(f is None for f in full):
            return "affine rank exceeds the tensor rank"
        if node.op_type == "Gather":
            axis = int(attr(node, "axis", 0)) % rank
            idx = const_value(node.inputs[1])
            if idx is None:
                return "Gather indices are not constant"
            if any(f.shape[axis] != 1 for f in full):
                return "Gather picks along the channel axis"
            return [f.reshape(f.shape[:axis] + (1,) * np.ndim(idx) + f.shape[axis + 1:]) for f in full]
        axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(rank))
        if axes is None:
            return "Slice axes are not constant"
        if any(f.shape[ax % rank] != 1 for f in full for ax in axes):
            return "Slice cuts along the channel axis"
        return full
    return f"{node.op_type} does not map the channel axis"


def map_backward(node: ir.Node, arrs: list[np.ndarray]) -> list[np.ndarray] | str:
    """Affine arrays on ``node.outputs[0]`` mapped back to ``node.inputs[0]`` (producer direction)."""
    mapped = _map_layout(node, arrs, backward=True)
    return mapped if mapped is not None else f"{node.op_type} does not map the channel axis"
