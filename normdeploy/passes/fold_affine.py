"""Fold every per-channel affine into a neighbouring linear layer (DESIGN.md 3.1).

Sources. Each of these computes ``y = a * core(x) + c`` with constant ``a``, ``c`` that
vary along one channel axis (or, for LayerNormalization over several axes, along the
normalized axes), float64 here:

* BatchNormalization: ``a = gamma / sqrt(var + eps)``, ``c = beta - a * mean``, core = identity
* UnifiedNorm:        ``a = w / sqrt(r + eps)``,       ``c = b``,            core = identity
* PowerNorm:          ``a = w / sqrt(phi + eps)``,     ``c = b``,            core = GroupScaling
* LayerNormalization: ``a = scale``, ``c = bias``; RMSNorm, CRMSNorm: ``a = g``; ScaleNorm: ``a = g``
  (one scalar); DynamicTanh: ``a = w``, ``c = b``; core = the normalization with unit gain

Directions. With ``t = W x + b`` a linear layer (Conv with any groups, stride and
dilation, ConvTranspose with any groups, Gemm with transA, transB, alpha, beta, with
or without C, MatMul with a constant weight of any rank on either side):

* into the producer (identity-core sources only)::

      X -> [linear] -> t -> (Reshape | Flatten | Transpose | Squeeze | Unsqueeze)* -> BN -> Y
      X -> [linear, W' = diag(a) W, b' = a*b + c] -> (the same movers) -------------> Y

  exact: ``a * (W x + b) + c = (diag(a) W) x + (a b + c)``. A MatMul without bias gets
  the shift as an ``Add`` (or folds it into the ``Add`` of a MatMul + Add pair; a 2-D
  ``X @ W`` becomes a Gemm whose C is the shift).
* into the consumers (every source)::

      X -> BN -> y -> (movers, Gather, Slice)* -> [linear]    (every reader of y, at any depth)
      X ---------> (the same) ------------------> [linear, W' = W diag(a), b' = b + W c]

  exact: ``W (a x + c) + b = (W diag(a)) x + (W c + b)``, *except* for ``W c`` under a
  Conv that pads (padding inserts zeros the original never shifted) or a ConvTranspose
  (border pixels receive fewer taps): there the scale folds and the shift stays as an
  ``Add(c / a)`` before the layer, exact in real arithmetic because
  ``W (a x + c) = (W diag(a)) (x + c / a)``, refused where ``a = 0`` and ``c != 0``. The
  report says which layer kept a shift. Sources with a non-trivial core keep it with a
  unit gain (LayerNorm with scale 1 and no bias, DynamicTanh with w = 1 and b = 0, ...;
  PowerNorm becomes its GroupScaling).

Movers map the channel axis: Transpose permutes it; Reshape, Flatten, Squeeze and
Unsqueeze keep it when their static shapes leave a common prefix and suffix around a
reshaped middle (the affine is materialized over the middle and reshaped with it); on
the consumer side Gather and Slice pass it along axes where the affine is constant.

Rules (each failure is the skip reason): parameters are constant and finite with
``var + eps > 0``; a producer's output is read by the affine only (through movers whose
outputs also have one reader) and is not a graph output; every reader of a folded
normalized tensor is linear in it (a residual Add of a post-norm block keeps the affine);
graph outputs keep their names and values. Folded weights are computed in float64 and
stored once in the weight's dtype (fp16 models included); every folded weight is a new
constant, so a weight shared with another node is never edited.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Namer, const_value, constant, is_graph_output, rank_of, rewire_output
from ..ops import ATTRIBUTES, DOMAIN
from . import PassContext, PassResult, register

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MOVERS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
SELECTORS = ("Gather", "Slice")  # consumer side only: they pick along axes where the affine is constant
ONNX_DOMAINS = (None, "", "ai.onnx")
CANONICAL_SOURCES = ("UnifiedNorm", "PowerNorm", "RMSNorm", "CRMSNorm", "DynamicTanh", "ScaleNorm")


# ----------------------------------------------------------------------------- sources

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


def _is_source(node: gs.Node) -> bool:
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


# ----------------------------------------------------------------------------- array plumbing

def _pad(arr: np.ndarray, rank: int) -> np.ndarray | None:
    """Right-aligned broadcast array as rank ``rank`` (None if it has more non-unit axes)."""
    if arr.ndim > rank:
        lead = arr.shape[: arr.ndim - rank]
        if any(d != 1 for d in lead):
            return None
        return arr.reshape(arr.shape[arr.ndim - rank:])
    return arr.reshape((1,) * (rank - arr.ndim) + arr.shape)


def _compress(arr: np.ndarray) -> np.ndarray:
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
    a = _pad(arr, rank)
    if a is None:
        return None
    ax = axis % rank
    if any(a.shape[i] != 1 for i in range(rank) if i != ax):
        return None
    v = a.reshape(-1)
    if v.size == 1:
        return np.full(n, v[0])
    return v if v.size == n else None


def _dims(t: gs.Tensor) -> list | None:
    shape = getattr(t, "shape", None)
    return None if shape is None else list(shape)


def _same_dim(p, q) -> bool:
    if isinstance(p, (int, np.integer)) and isinstance(q, (int, np.integer)):
        return int(p) == int(q)
    return isinstance(p, str) and isinstance(q, str) and p == q


def _reshape_arr(arr: np.ndarray, src: list | None, dst: list | None) -> np.ndarray | str:
    """Map an affine array on a tensor of shape ``src`` to the same tensor reshaped to ``dst``."""
    if src is None or dst is None:
        return "shape unknown (run shape inference)"
    a = _pad(arr, len(src))
    if a is None:
        return "affine rank exceeds the tensor rank"
    p = 0
    while p < min(len(src), len(dst)) and _same_dim(src[p], dst[p]):
        p += 1
    q = 0
    while q < min(len(src), len(dst)) - p and _same_dim(src[len(src) - 1 - q], dst[len(dst) - 1 - q]):
        q += 1
    mid_in, mid_out = src[p:len(src) - q], dst[p:len(dst) - q]
    if all(n == 1 for n in a.shape[p:len(src) - q]):
        # the affine is constant along every reshaped axis (e.g. [batch, S, d] -> [batch*S, d]
        # with a per-d affine): no sizes are needed, symbolic or not
        return _compress(a.reshape(a.shape[:p] + (1,) * len(mid_out) + a.shape[len(src) - q:]))
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in mid_in + mid_out):
        return "the reshaped axes have symbolic sizes"
    if int(np.prod(mid_in, dtype=np.int64)) != int(np.prod(mid_out, dtype=np.int64)):
        return "reshape sizes disagree"
    lead, tail = a.shape[:p], a.shape[len(src) - q:]
    full = np.broadcast_to(a, lead + tuple(int(d) for d in mid_in) + tail)
    return _compress(full.reshape(lead + tuple(int(d) for d in mid_out) + tail))


def _transpose_arr(arr: np.ndarray, perm: list[int]) -> np.ndarray | None:
    a = _pad(arr, len(perm))
    return None if a is None else np.transpose(a, perm)


def _const_ints(t: gs.Tensor) -> list[int] | None:
    v = const_value(t)
    return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]


def _perm(node: gs.Node, rank: int | None) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(range(rank))[::-1]


def _map_layout(node: gs.Node, arrs: list[np.ndarray], backward: bool) -> list[np.ndarray] | str | None:
    """Identity, Transpose and the reshapes, either way; None when ``node`` is none of those."""
    src, dst = _dims(node.inputs[0]), _dims(node.outputs[0])
    if node.op == "Identity":
        return arrs
    if node.op == "Transpose":
        perm = _perm(node, len(src) if src is not None else rank_of(node.outputs[0]))
        if perm is None:
            return "Transpose rank unknown"
        out = [_transpose_arr(a, list(np.argsort(perm)) if backward else perm) for a in arrs]
        return "affine rank exceeds the tensor rank" if any(o is None for o in out) else out
    if node.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        out = [_reshape_arr(a, dst, src) if backward else _reshape_arr(a, src, dst) for a in arrs]
        bad = next((o for o in out if isinstance(o, str)), None)
        return bad if bad else out
    return None


def map_forward(node: gs.Node, arrs: list[np.ndarray]) -> list[np.ndarray] | str:
    """Affine arrays on ``node.inputs[0]`` mapped to ``node.outputs[0]`` (consumer direction)."""
    mapped = _map_layout(node, arrs, backward=False)
    if mapped is not None:
        return mapped
    src = _dims(node.inputs[0])
    if node.op in SELECTORS:
        if src is None:
            return "shape unknown (run shape inference)"
        rank = len(src)
        full = [_pad(a, rank) for a in arrs]
        if any(f is None for f in full):
            return "affine rank exceeds the tensor rank"
        if node.op == "Gather":
            axis = int(node.attrs.get("axis", 0)) % rank
            idx = const_value(node.inputs[1])
            if idx is None:
                return "Gather indices are not constant"
            if any(f.shape[axis] != 1 for f in full):
                return "Gather picks along the channel axis"
            return [f.reshape(f.shape[:axis] + (1,) * np.ndim(idx) + f.shape[axis + 1:]) for f in full]
        axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 else list(range(rank))
        if axes is None:
            return "Slice axes are not constant"
        if any(f.shape[ax % rank] != 1 for f in full for ax in axes):
            return "Slice cuts along the channel axis"
        return full
    return f"{node.op} does not map the channel axis"


def map_backward(node: gs.Node, arrs: list[np.ndarray]) -> list[np.ndarray] | str:
    """Affine arrays on ``node.outputs[0]`` mapped back to ``node.inputs[0]`` (producer direction)."""
    mapped = _map_layout(node, arrs, backward=True)
    return mapped if mapped is not None else f"{node.op} does not map the channel axis"


# ----------------------------------------------------------------------------- plans

@dataclass
class Plan:
    """What a fold will do, computed before the graph is touched; ``apply`` edits it."""

    apply: Callable[[], None]
    what: str
    notes: list[str] = field(default_factory=list)


def _dtype_of(t: gs.Tensor, fallback) -> np.dtype:
    dt = getattr(t, "dtype", None)
    try:
        return np.dtype(dt) if dt is not None else np.dtype(fallback)
    except TypeError:
        return np.dtype(fallback)


def _set_input(node: gs.Node, i: int, t: gs.Tensor) -> None:
    while len(node.inputs) <= i:
        node.inputs.append(gs.Variable.empty())
    node.inputs[i] = t


def _as_gemm(node: gs.Node, value: np.ndarray) -> bool:
    """Whether ``node`` is a 2-D ``X @ W`` (W constant) whose added per-column ``value`` can be Gemm's C."""
    if node.op != "MatMul" or const_value(node.inputs[1]) is None or const_value(node.inputs[1]).ndim != 2:
        return False
    n = const_value(node.inputs[1]).shape[1]
    return rank_of(node.inputs[0]) == 2 and value.size in (1, n) and value.ndim <= 2 and value.shape[:-1] in ((), (1,))


def _add_after(graph: gs.Graph, namer: Namer, node: gs.Node, value: np.ndarray, dtype) -> None:
    """Make ``node`` write a fresh tensor and add ``value`` to it into ``node``'s former output.

    A 2-D MatMul becomes a Gemm with ``value`` as C instead (one node, what ONNX Runtime fuses anyway).
    """
    if _as_gemm(node, value):
        base = node.name or "matmul"
        node.op = "Gemm"
        c = np.broadcast_to(np.asarray(value, np.float64).reshape(-1),
                            (const_value(node.inputs[1]).shape[1],))
        node.inputs.append(constant(namer, base, "C_folded", c.astype(dtype)))
        node.attrs = {}
        return
    out = node.outputs[0]
    base = node.name or node.op.lower()
    mid = gs.Variable(namer(out.name, "unshifted"), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = mid
    c = constant(namer, base, "shift", np.asarray(value, np.float64).astype(dtype))
    graph.nodes.append(gs.Node("Add", namer(base, "shift_add"), inputs=[mid, c], outputs=[out]))


def _bias_add_of(graph: gs.Graph, node: gs.Node) -> tuple[gs.Node, int, np.ndarray] | None:
    """The ``Add(node output, constant)`` that alone reads ``node``'s output, if any."""
    out = node.outputs[0]
    if is_graph_output(graph, out) or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = 1 if add.inputs[0] is out else 0
    v = const_value(add.inputs[other])
    return None if v is None else (add, other, v)


def _shift_after(graph: gs.Graph, namer: Namer, node: gs.Node, value: np.ndarray, dtype) -> Callable[[], None]:
    """An edit adding ``value`` to ``node``'s output: into its bias Add when it has one, else a new Add."""
    if not np.any(value != 0):
        return lambda: None
    bias = _bias_add_of(graph, node)
    if bias is not None:
        add, slot, old = bias

        def merge():
            new = old.astype(np.float64) + value
            add.inputs[slot] = constant(namer, add.name or "add", "bias_folded", new.astype(old.dtype))
        return merge
    return lambda: _add_after(graph, namer, node, value, dtype)


# ----------------------------------------------------------------------------- into the producer

def _producer_plan(graph: gs.Graph, lin: gs.Node, a_arr: np.ndarray, c_arr: np.ndarray, namer: Namer,
                   bias_add: tuple[gs.Node, int, np.ndarray] | None) -> Plan | str:
    """Fold ``a * lin(x) + c`` (arrays on lin's output) into ``lin``'s weight and bias."""
    base = lin.name or lin.op.lower()
    if lin.op in ("Conv", "ConvTranspose"):
        w = const_value(lin.inputs[1]) if len(lin.inputs) > 1 else None
        if w is None:
            return f"{lin.op} {lin.name} weight is not a constant"
        b = const_value(lin.inputs[2]) if len(lin.inputs) > 2 and lin.inputs[2].name else None
        if len(lin.inputs) > 2 and lin.inputs[2].name and b is None:
            return f"{lin.op} {lin.name} bias is not a constant"
        group = int(lin.attrs.get("group", 1))
        cout = w.shape[0] if lin.op == "Conv" else w.shape[1] * group
        a, c = vector_along(a_arr, 1, w.ndim, cout), vector_along(c_arr, 1, w.ndim, cout)
        if a is None or c is None:
            return f"the affine is not per output channel of {lin.op} {lin.name}"
        w64 = w.astype(np.float64)
        if lin.op == "Conv":
            w_new = w64 * a.reshape((-1,) + (1,) * (w.ndim - 1))
        else:  # ConvTranspose weight [Cin, Cout/group, k...]; output channel = g * (Cout/group) + j
            cin, cpg = w.shape[0], w.shape[1]
            ws = w64.reshape((group, cin // group, cpg) + w.shape[2:])
            w_new = (ws * a.reshape((group, 1, cpg) + (1,) * (w.ndim - 2))).reshape(w.shape)
        b_new = a * (0.0 if b is None else b.astype(np.float64)) + c

        def apply():
            lin.inputs[1] = constant(namer, base, "weight_folded", w_new.astype(w.dtype))
            _set_input(lin, 2, constant(namer, base, "bias_folded", b_new.astype(w.dtype)))
        return Plan(apply, f"into {lin.op} {lin.name}")
    if lin.op == "Gemm":
        w = const_value(lin.inputs[1])
        if w is None:
            return f"Gemm {lin.name} B is not a constant"
        has_c = len(lin.inputs) > 2 and lin.inputs[2].name
        cval = const_value(lin.inputs[2]) if has_c else None
        if has_c and cval is None:
            return f"Gemm {lin.name} C is not a constant"
        trans_b = int(lin.attrs.get("transB", 0))
        n = w.shape[0] if trans_b else w.shape[1]
        a, c = vector_along(a_arr, 1, 2, n), vector_along(c_arr, 1, 2, n)
        if a is None or c is None:
            return f"the affine is not along the output columns of Gemm {lin.name}"
        w_new = w.astype(np.float64) * (a[:, None] if trans_b else a[None, :])
        beta = float(lin.attrs.get("beta", 1.0))
        c_new = c if cval is None else a * (beta * cval.astype(np.float64)) + c

        def apply():
            lin.inputs[1] = constant(namer, base, "B_folded", w_new.astype(w.dtype))
            _set_input(lin, 2, constant(namer, base, "C_folded", np.asarray(c_new).astype(w.dtype)))
            lin.attrs["beta"] = 1.0
        return Plan(apply, f"into Gemm {lin.name}")
    if lin.op == "MatMul":
        wslot = _matmul_weight_slot(lin)
        if wslot is None:
            return f"MatMul {lin.name} has no constant operand"
        w = const_value(lin.inputs[wslot])
        if w.ndim < 2:
            return f"MatMul {lin.name} weight is a vector"
        if wslot == 1:  # X @ W: output channel is the last axis, W's last axis
            n = w.shape[-1]
            a, c = vector_along(a_arr, -1, None, n), vector_along(c_arr, -1, None, n)
            w_new = None if a is None else w.astype(np.float64) * a
            shift = None if c is None else c
        else:  # W @ X: output channel is axis -2, W's rows
            n = w.shape[-2]
            a, c = vector_along(a_arr, -2, None, n), vector_along(c_arr, -2, None, n)
            w_new = None if a is None else w.astype(np.float64) * a[:, None]
            shift = None if c is None else c[:, None]
        if w_new is None or shift is None:
            return f"the affine is not along the output channels of MatMul {lin.name}"
        dtype = w.dtype
        if bias_add is not None:
            add, slot, old = bias_add
            old_a = np.asarray(a if wslot == 1 else a[:, None])
            new_bias = old_a * old.astype(np.float64) + shift

            def apply():
                lin.inputs[wslot] = constant(namer, base, "weight_folded", w_new.astype(dtype))
                add.inputs[slot] = constant(namer, add.name or "add", "bias_folded", new_bias.astype(old.dtype))
            return Plan(apply, f"into MatMul {lin.name} + Add {add.name}")

        def apply():
            lin.inputs[wslot] = constant(namer, base, "weight_folded", w_new.astype(dtype))
            if np.any(shift != 0):
                _add_after(graph, namer, lin, shift, dtype)
        how = "" if not np.any(shift != 0) else " (now a Gemm, the shift its C)" if _as_gemm(lin, shift) else \
            " (the shift as an Add)"
        return Plan(apply, f"into MatMul {lin.name}{how}")
    return f"producer {lin.name} ({lin.op}) is not linear"


def _matmul_weight_slot(node: gs.Node) -> int | None:
    if const_value(node.inputs[1]) is not None:
        return 1
    if const_value(node.inputs[0]) is not None:
        return 0
    return None


def fold_affine_into_producer(graph: gs.Graph, aff: Affine, namer: Namer) -> Plan | str:
    """Plan folding a pure affine into the linear layer that writes its input (through movers)."""
    t, chain = aff.x, []
    while True:
        if not t.inputs:
            return "its input is not written by a node"
        prod = t.inputs[0]
        if is_graph_output(graph, t):
            return f"{prod.name} output {t.name} is also a graph output"
        if len(t.outputs) != 1:
            return (f"{prod.op} {prod.name} output has {len(t.outputs)} readers "
                    "(the un-normalized value is still needed)")
        if prod.op in MOVERS and prod.domain in ONNX_DOMAINS:
            chain.append(prod)
            t = prod.inputs[0]
            continue
        break
    arrs = [aff.scale, aff.shift]
    for mover in chain:
        arrs = map_backward(mover, arrs)
        if isinstance(arrs, str):
            return f"through {mover.op} {mover.name}: {arrs}"
    bias_add = None
    if prod.op == "Add" and prod.domain in ONNX_DOMAINS and len(prod.inputs) == 2:
        const_slot = next((i for i in (1, 0) if const_value(prod.inputs[i]) is not None), None)
        if const_slot is not None:
            inner = prod.inputs[1 - const_slot]
            mm = inner.inputs[0] if inner.inputs else None
            if (mm is not None and mm.op == "MatMul" and len(inner.outputs) == 1
                    and not is_graph_output(graph, inner) and _matmul_weight_slot(mm) is not None):
                bias_add = (prod, const_slot, const_value(prod.inputs[const_slot]))
                prod = mm
    if prod.op not in LINEAR or prod.domain not in ONNX_DOMAINS:
        return f"producer {prod.name} ({prod.op}) is not linear"
    plan = _producer_plan(graph, prod, arrs[0], arrs[1], namer, bias_add)
    if isinstance(plan, str):
        return plan
    node = aff.node
    inner_apply = plan.apply

    def apply():
        inner_apply()
        rewire_output(node, aff.x.inputs[0])
    via = "".join(f" through {m.op} {m.name}" for m in reversed(chain))
    return Plan(apply, f"{node.op} {node.name} folded {plan.what}{via}", plan.notes)


# ----------------------------------------------------------------------------- into the consumers

@dataclass
class _Leaf:
    node: gs.Node
    slot: int
    scale: np.ndarray
    shift: np.ndarray


def _constant_operand(t: gs.Tensor, n: gs.Node, slots: list[int]) -> np.ndarray | None:
    """The constant other operand of an elementwise ``n(t, k)`` that keeps ``t``'s shape, else None."""
    if n.op not in ("Add", "Sub", "Mul", "Div") or len(n.inputs) != 2 or len(slots) != 1:
        return None
    if n.op in ("Sub", "Div") and slots != [0]:
        return None
    k = const_value(n.inputs[1 - slots[0]])
    if k is None or not np.issubdtype(k.dtype, np.floating) or (n.op == "Div" and np.any(k == 0)):
        return None
    src, dst = _dims(t), _dims(n.outputs[0])
    if k.ndim > 0 and (src is None or dst is None or len(src) != len(dst)
                       or not all(_same_dim(p, q) for p, q in zip(src, dst))):
        return None
    return np.asarray(k, np.float64)


def _collect_leaves(graph: gs.Graph, t: gs.Tensor, arrs: list[np.ndarray], leaves: list[_Leaf],
                    absorbed: list[gs.Node]) -> str | None:
    """Walk every reader of ``t`` down to linear layers; constant Add/Sub/Mul/Div on the way join the affine."""
    if is_graph_output(graph, t):
        return f"{t.name} is a graph output"
    for n in t.outputs:
        slots = [i for i, inp in enumerate(n.inputs) if inp is t]
        if n.domain not in ONNX_DOMAINS:
            return f"{n.op} {n.name} reads the normalized tensor and is not linear"
        if n.op in LINEAR:
            if len(slots) != 1:
                return f"{n.op} {n.name} reads the normalized tensor twice"
            leaves.append(_Leaf(n, slots[0], arrs[0], arrs[1]))
            continue
        if n.op in MOVERS + SELECTORS and slots == [0]:
            mapped = map_forward(n, arrs)
            if isinstance(mapped, str):
                return f"through {n.op} {n.name}: {mapped}"
            why = _collect_leaves(graph, n.outputs[0], mapped, leaves, absorbed)
            if why:
                return why
            continue
        k = _constant_operand(t, n, slots)
        if k is not None:  # y' = y + k, y - k, y * k or y / k: still an affine of the core
            s, c = arrs
            s, c = {"Add": (s, c + k), "Sub": (s, c - k), "Mul": (s * k, c * k), "Div": (s / k, c / k)}[n.op]
            absorbed.append(n)
            why = _collect_leaves(graph, n.outputs[0], [_compress(np.asarray(s)), _compress(np.asarray(c))],
                                  leaves, absorbed)
            if why:
                return why
            continue
        if n.op in ("Add", "Sum"):
            return f"{n.op} {n.name} also reads the normalized tensor (a residual stream): the affine stays"
        return f"{n.op} {n.name} reads the normalized tensor and is not linear"
    return None


def _padded(node: gs.Node) -> bool:
    pads = node.attrs.get("pads")
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    return bool(pads is not None and any(int(p) != 0 for p in pads)) or auto in ("SAME_UPPER", "SAME_LOWER")


def _kept_shift(leaf: _Leaf, a_full: np.ndarray) -> np.ndarray | str:
    """The Add constant ``c / a`` that stays before the layer when ``W c`` cannot fold."""
    c = leaf.shift
    a_b, c_b = np.broadcast_arrays(a_full, c)
    if np.any((a_b == 0) & (c_b != 0)):
        return f"scale is zero where the shift is not, before {leaf.node.op} {leaf.node.name}: the shift cannot stay"
    with np.errstate(divide="ignore", invalid="ignore"):
        return _compress(np.where(c_b == 0, 0.0, c_b / np.where(a_b == 0, 1.0, a_b)))


def _consumer_plan(graph: gs.Graph, leaf: _Leaf, namer: Namer, dtype) -> tuple[Plan, np.ndarray | None] | str:
    """Fold the affine at ``leaf``'s input slot into its weights; returns the plan and any kept Add constant."""
    n, s, c = leaf.node, leaf.scale, leaf.shift
    base = n.name or n.op.lower()
    zero_shift = not np.any(c != 0)
    if n.op in ("Conv", "ConvTranspose"):
        if leaf.slot != 0:
            return f"{n.op} {n.name} reads the normalized tensor as a parameter"
        w = const_value(n.inputs[1])
        if w is None:
            return f"{n.op} {n.name} weight is not a constant"
        has_b = len(n.inputs) > 2 and n.inputs[2].name
        b = const_value(n.inputs[2]) if has_b else None
        if has_b and b is None:
            return f"{n.op} {n.name} bias is not a constant"
        group = int(n.attrs.get("group", 1))
        cin = w.shape[1] * group if n.op == "Conv" else w.shape[0]
        a = vector_along(s, 1, w.ndim, cin)
        if a is None:
            return f"the scale is not per input channel of {n.op} {n.name}"
        w64 = w.astype(np.float64)
        if n.op == "Conv":  # W [Cout, Cin/group, k...]; output channel o reads inputs of group o // (Cout/group)
            cin_g, cout_g = w.shape[1], w.shape[0] // group
            a_rep = np.repeat(a.reshape(group, cin_g), cout_g, axis=0)  # [Cout, Cin/group]
            w_new = w64 * a_rep.reshape(a_rep.shape + (1,) * (w.ndim - 2))
        else:  # ConvTranspose W [Cin, Cout/group, k...]: row i reads input channel i
            w_new = w64 * a.reshape((-1,) + (1,) * (w.ndim - 1))
        c_vec = vector_along(c, 1, w.ndim, cin)
        kept, b_new = None, None
        if not zero_shift:
            if n.op == "Conv" and not _padded(n) and c_vec is not None:
                c_rep = np.repeat(c_vec.reshape(group, cin_g), cout_g, axis=0)
                b_new = (0.0 if b is None else b.astype(np.float64)) + (
                    w64.reshape(w.shape[0], cin_g, -1) * c_rep[:, :, None]).sum(axis=(1, 2))
            else:
                kept = _kept_shift(leaf, s)
                if isinstance(kept, str):
                    return kept

        def apply():
            n.inputs[1] = constant(namer, base, "weight_folded", w_new.astype(w.dtype))
            if b_new is not None:
                _set_input(n, 2, constant(namer, base, "bias_folded", b_new.astype(w.dtype)))
        why = ("pads" if n.op == "Conv" and _padded(n) else
               "is a ConvTranspose" if n.op == "ConvTranspose" else "sees a shift that varies per position")
        notes = [] if kept is None else [
            f"{n.op} {n.name} {why}: its scale folded, the shift stays as an Add before it"]
        return Plan(apply, f"{n.op} {n.name}", notes), kept
    if n.op == "Gemm":
        if leaf.slot != 0:
            return f"Gemm {n.name} reads the normalized tensor as {'B' if leaf.slot == 1 else 'C'}"
        w = const_value(n.inputs[1])
        if w is None:
            return f"Gemm {n.name} B is not a constant"
        has_c = len(n.inputs) > 2 and n.inputs[2].name
        cval = const_value(n.inputs[2]) if has_c else None
        if has_c and cval is None:
            return f"Gemm {n.name} C is not a constant"
        trans_a, trans_b = int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))
        k = w.shape[1] if trans_b else w.shape[0]
        kaxis = 0 if trans_a else 1
        a = vector_along(s, kaxis, 2, k)
        if a is None:
            return f"the scale is not along the contraction axis of Gemm {n.name}"
        w64 = w.astype(np.float64)
        w_new = w64 * (a[None, :] if trans_b else a[:, None])
        op_b = w64.T if trans_b else w64
        alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        c_vec = vector_along(c, kaxis, 2, k)
        kept, c_new = None, None
        if not zero_shift:
            if c_vec is not None:
                add = alpha * (c_vec @ op_b)
                c_new = add if cval is None else beta * cval.astype(np.float64) + add
            else:
                kept = _kept_shift(leaf, s)
                if isinstance(kept, str):
                    return kept

        def apply():
            n.inputs[1] = constant(namer, base, "B_folded", w_new.astype(w.dtype))
            if c_new is not None:
                _set_input(n, 2, constant(namer, base, "C_folded", np.asarray(c_new).astype(w.dtype)))
                n.attrs["beta"] = 1.0
        notes = [] if kept is None else [f"Gemm {n.name} sees a shift that varies per row: it stays as an Add"]
        return Plan(apply, f"Gemm {n.name}", notes), kept
    if n.op == "MatMul":
        wslot = 1 - leaf.slot
        w = const_value(n.inputs[wslot])
        if w is None:
            return f"MatMul {n.name} other operand is not a constant"
        w64 = w.astype(np.float64)
        if leaf.slot == 0:  # X @ W: contraction over X's last axis, W's axis -2 (or W's only axis)
            k = w.shape[-2] if w.ndim >= 2 else w.shape[0]
            a, c_vec = vector_along(s, -1, None, k), vector_along(c, -1, None, k)
            if a is None:
                return f"the scale is not along the contraction axis of MatMul {n.name}"
            w_new = w64 * (a[:, None] if w.ndim >= 2 else a)
            shift_out = None if c_vec is None else (np.matmul(c_vec[None, :], w64) if w.ndim >= 2 else c_vec @ w64)
        else:  # W @ X: contraction over X's axis -2, W's last axis
            if w.ndim < 2:
                return f"MatMul {n.name} left weight is a vector"
            k = w.shape[-1]
            a, c_vec = vector_along(s, -2, None, k), vector_along(c, -2, None, k)
            if a is None:
                return f"the scale is not along the contraction axis of MatMul {n.name}"
            w_new = w64 * a
            shift_out = None if c_vec is None else np.matmul(w64, c_vec[:, None])
        kept, after = None, (lambda: None)
        if not zero_shift:
            if shift_out is not None:
                after = _shift_after(graph, namer, n, shift_out, dtype)
            else:
                kept = _kept_shift(leaf, s)
                if isinstance(kept, str):
                    return kept

        def apply():
            n.inputs[wslot] = constant(namer, base, "weight_folded", w_new.astype(w.dtype))
            after()
        notes = [] if kept is None else [f"MatMul {n.name} sees a shift that varies off the contraction axis: "
                                         "it stays as an Add"]
        return Plan(apply, f"MatMul {n.name}", notes), kept
    return f"{n.op} {n.name} is not linear"


def _neutralize(graph: gs.Graph, node: gs.Node, namer: Namer) -> None:
    """Give a non-pure source unit gain and zero bias (its core stays)."""
    base = node.name or node.op.lower()

    def ones_like(i):
        v = const_value(node.inputs[i])
        return constant(namer, base, "unit_gain", np.ones_like(v))

    def zeros_like(i):
        v = const_value(node.inputs[i])
        return constant(namer, base, "zero_bias", np.zeros_like(v))

    op = node.op
    if op == "LayerNormalization":
        node.inputs[1] = ones_like(1)
        while len(node.inputs) > 2:
            node.inputs.pop()
    elif op in ("RMSNorm", "CRMSNorm", "ScaleNorm"):
        node.inputs[1] = ones_like(1)
    elif op == "DynamicTanh":
        node.inputs[2], node.inputs[3] = ones_like(2), zeros_like(3)
    elif op == "PowerNorm":
        attrs = {**ATTRIBUTES["PowerNorm"], **node.attrs}
        x, y = node.inputs[0], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.append(gs.Node("GroupScaling", namer(base, "group_scaling"),
                                   {"groups": int(attrs["groups"]), "epsilon": float(attrs["epsilon"])},
                                   [x], [y], domain=DOMAIN))


def fold_affine_into_consumers(graph: gs.Graph, aff: Affine, namer: Namer) -> Plan | str:
    """Plan folding ``aff`` into every linear layer that reads its output (through movers)."""
    node = aff.node
    leaves: list[_Leaf] = []
    absorbed: list[gs.Node] = []
    why = _collect_leaves(graph, aff.y, [aff.scale, aff.shift], leaves, absorbed)
    if not aff.pure and not np.any(aff.scale != 1) and not np.any(aff.shift != 0) and not absorbed:
        return "its gain is 1 and its bias 0: nothing to fold"
    if why:
        return why
    if not leaves:
        return "its output has no reader"
    param = next((const_value(t) for t in node.inputs[1:] if const_value(t) is not None), None)
    dtype = _dtype_of(aff.y, param.dtype if param is not None else np.float32)
    plans = []
    for leaf in leaves:
        p = _consumer_plan(graph, leaf, namer, dtype)
        if isinstance(p, str):
            return p
        plans.append((leaf, *p))

    def apply():
        for _, plan, _ in plans:
            plan.apply()
        for n in absorbed:  # their constants are in the weights now: bypass them
            src, out = next(i for i in n.inputs if const_value(i) is None), n.outputs[0]
            for reader in list(out.outputs):
                for i, inp in enumerate(reader.inputs):
                    if inp is out:
                        reader.inputs[i] = src
            n.inputs.clear()
            n.outputs.clear()
        if aff.pure:  # every reader now reads x
            y, x = aff.y, aff.x
            for reader in list(y.outputs):
                for i, inp in enumerate(reader.inputs):
                    if inp is y:
                        reader.inputs[i] = x
            node.inputs.clear()
            node.outputs.clear()
        else:
            _neutralize(graph, node, namer)
        shifted: dict[str, gs.Variable] = {}
        for leaf, _, kept in plans:
            if kept is None:
                continue
            src = leaf.node.inputs[leaf.slot]
            key = f"{src.name}/{kept.tobytes().hex()}/{kept.shape}"
            if key not in shifted:
                out = gs.Variable(namer(src.name, "shifted"), dtype=src.dtype, shape=src.shape)
                c = constant(namer, node.name or node.op.lower(), "kept_shift", kept.astype(dtype))
                graph.nodes.append(gs.Node("Add", namer(node.name or node.op.lower(), "kept_shift_add"),
                                           inputs=[src, c], outputs=[out]))
                shifted[key] = out
            leaf.node.inputs[leaf.slot] = shifted[key]
    targets = ", ".join(plan.what for _, plan, _ in plans)
    if absorbed:
        targets += " (with " + ", ".join(f"{n.op} {n.name}" for n in absorbed) + ")"
    what = (f"{node.op} {node.name} folded into {targets}" if aff.pure else
            f"{node.op} {node.name} gain/bias folded into {targets}"
            + (" (PowerNorm became GroupScaling)" if node.op == "PowerNorm" else ""))
    return Plan(apply, what, [note for _, plan, _ in plans for note in plan.notes])


# ----------------------------------------------------------------------------- the pass

@register("fold_affine_into_linear", stage="rewrite", exact=True)
def fold_affine_into_linear(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Fold BatchNorm, UnifiedNorm, PowerNorm's affine and LN/RMS/DyT/ScaleNorm gains into linear neighbours."""
    result = PassResult("fold_affine_into_linear", exact=True)
    namer = Namer(graph)
    for node in list(graph.nodes):
        if not _is_source(node) or not node.outputs:
            continue
        result.matched += 1
        aff = affine_of(node)
        if isinstance(aff, str):
            result.skip(node.name, aff)
            continue
        reasons = []
        plan: Plan | str = "no direction applies"
        if aff.pure:
            plan = fold_affine_into_producer(graph, aff, namer)
            if isinstance(plan, str):
                reasons.append(f"into the producer: {plan}")
        if isinstance(plan, str):
            plan = fold_affine_into_consumers(graph, aff, namer)
            if isinstance(plan, str):
                reasons.append(f"into the consumers: {plan}" if aff.pure else plan)
        if isinstance(plan, str):
            result.skip(node.name, "; ".join(reasons))
            continue
        plan.apply()
        result.rewrote(plan.what, node.name)
        result.notes.extend(plan.notes)
    return result
