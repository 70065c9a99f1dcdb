"""Per-channel affine sources: ``y = scale * core(x) + shift`` of every normalization that has one.

``affine_of(node)`` is the one place that reads a normalization's stored parameters as an
affine; the fold (:mod:`normdeploy.rewrite.fold_affine`) and both lowerings
(:mod:`normdeploy.lower.ort`, :mod:`normdeploy.lower.trt`) use it, with one guard: a
statistic ``s`` that is divided by ``sqrt(s + eps)`` must make ``s + eps`` positive.

* BatchNormalization: ``a = gamma / sqrt(var + eps)``, ``c = beta - a * mean``, core = identity
* UnifiedNorm:        ``a = w / sqrt(r + eps)``,       ``c = b``,            core = identity
* PowerNorm:          ``a = w / sqrt(phi + eps)``,     ``c = b``,            core = GroupScaling
* GroupNormalization: ``a = scale``, ``c = bias`` per channel (opset 18's per-group ones repeated), core =
  GroupNorm with unit scale and zero bias
* LayerNormalization: ``a = scale``, ``c = bias``; RMSNorm, CRMSNorm: ``a = g``; ScaleNorm: ``a = g``
  (one scalar); DynamicTanh: ``a = w``, ``c = b``; core = the normalization with unit gain
* a constant affine (:func:`constant_affine`): a chain of Mul / Div / Add / Sub by constants,
  each reading the one before, whose composed scale (and shift) vary along one axis: a frozen
  or decomposed BatchNorm (torchvision's ``FrozenBatchNorm2d``, TorchScript's pre-folded
  ``x * C1 + C2``), a frozen UnifiedNorm, a layer scale ``gamma * x``; core = identity

Scale and shift are float64, broadcast right-aligned against ``y`` (a vector on the channel
axis, shaped ``(C, 1, ..., 1)`` for a channels-first axis).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .graph import attr, const_value, consumers, dtype_of, rank_of, shape_of
from .layout import compress
from .ops import ATTRIBUTES, DOMAIN

ONNX_DOMAINS = ("", "ai.onnx")
CANONICAL_SOURCES = ("UnifiedNorm", "PowerNorm", "RMSNorm", "CRMSNorm", "DynamicTanh", "ScaleNorm")

@dataclass
class Affine:
    """``y = scale * core(x) + shift`` (float64 arrays, broadcast right-aligned against y).

    ``pure`` sources (BatchNormalization, UnifiedNorm, constant affines) have core = identity:
    the node disappears when folded. Others keep their core with unit parameters. A constant
    affine (:func:`constant_affine`) is a chain of nodes: ``nodes`` lists them in order,
    ``node`` is the last (its output is y) and ``data`` is the chain's input x.
    """

    node: ir.Node
    scale: np.ndarray
    shift: np.ndarray
    pure: bool
    rank: int | None = None
    axis: int = 1  # channel axis as written on the node (may be negative); informative
    nodes: tuple = ()  # a constant affine's chain (empty for a normalization node)
    data: ir.Value | None = None  # a constant affine's input

    @property
    def x(self) -> ir.Value:
        return self.data if self.data is not None else self.node.inputs[0]

    @property
    def y(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def all_nodes(self) -> list[ir.Node]:
        """The nodes that compute y from x (the chain, or the normalization node)."""
        return list(self.nodes) if self.nodes else [self.node]

    @property
    def spelling(self) -> str | None:
        """A constant affine's ops in order (``"Mul Add"``); None for a normalization node."""
        return " ".join(n.op_type for n in self.nodes) if self.nodes else None

    def describe(self) -> str:
        """How a report names the source: ``BatchNormalization bn1``, or ``constant affine Mul, Add (mul_3 .. add_4)``."""
        if not self.nodes:
            return f"{self.node.op_type} {self.node.name}"
        names = self.nodes[0].name if len(self.nodes) == 1 else f"{self.nodes[0].name} .. {self.nodes[-1].name}"
        return f"per-channel constant affine {', '.join(n.op_type for n in self.nodes)} ({names})"


def is_affine_source(node: ir.Node) -> bool:
    if node.domain in ONNX_DOMAINS:
        return node.op_type in ("BatchNormalization", "LayerNormalization", "GroupNormalization")
    return node.domain == DOMAIN and node.op_type in CANONICAL_SOURCES


def _params(node: ir.Node, names: tuple[str, ...], first: int = 1, optional: tuple[str, ...] = ()
            ) -> list[np.ndarray | None] | str:
    """Constant inputs ``first``, ``first + 1``, ... as float64 (None for a missing optional one), or a reason."""
    vals = []
    for i, n in enumerate(names):
        t = node.inputs[first + i] if len(node.inputs) > first + i else None
        if t is None:
            if n not in optional:
                return f"{node.op_type} has no {n} input"
            vals.append(None)
            continue
        v = const_value(t)
        if v is None:
            return f"{node.op_type} {n} is not a constant"
        vals.append(np.asarray(v, np.float64))
    return vals


def _channel_shape(n: int, axis: int, rank: int | None) -> tuple[int, ...] | None:
    """Shape that places a length-n vector on ``axis`` of a rank-``rank`` tensor, right-aligned."""
    if axis < 0:
        return (n,) + (1,) * (-axis - 1)
    if rank is None:
        return None
    return (n,) + (1,) * (rank - axis - 1)


def tensor_rank(t: ir.Value) -> int | None:
    """Rank from shape inference, else from a Conv/Gemm neighbour's weight."""
    r = rank_of(t)
    if r is not None:
        return r
    for n in ([t.producer()] if t.producer() is not None else []) + consumers(t):
        if n.op_type in ("Conv", "ConvTranspose") and len(n.inputs) > 1 and (n.inputs[0] is t or n.outputs[0] is t):
            w = const_value(n.inputs[1])
            if w is not None:
                return w.ndim
        if n.op_type == "Gemm" and (n.outputs[0] is t or n.inputs[0] is t):
            return 2
    return None


def affine_of(node: ir.Node) -> Affine | str:
    """The per-channel affine part of ``node``, or the reason it has none that folds."""
    op = node.op_type
    rank = tensor_rank(node.outputs[0]) if node.outputs else None
    if rank is None and node.inputs:
        rank = tensor_rank(node.inputs[0])
    if op == "BatchNormalization" and node.domain in ONNX_DOMAINS:
        if attr(node, "training_mode", 0):
            return "BatchNormalization in training mode uses batch statistics"
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return "BatchNormalization running-statistics outputs are used"
        p = _params(node, ("scale", "bias", "mean", "var"))
        if isinstance(p, str):
            return p
        g, b, mean, var = p
        eps = float(attr(node, "epsilon", 1e-5))
        if np.any(var + eps <= 0):
            return "BatchNormalization var + eps is not positive"
        a = g / np.sqrt(var + eps)
        scale, shift, axis, pure = a, b - a * mean, 1, True
    elif op == "LayerNormalization" and node.domain in ONNX_DOMAINS:
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return "LayerNormalization mean / inv-std outputs are used"
        p = _params(node, ("scale", "bias"), optional=("bias",))
        if isinstance(p, str):
            return p
        g, b = p
        axis = int(attr(node, "axis", -1))
        if axis >= 0:
            if rank is None:
                return "rank of the LayerNormalization input is unknown"
            axis -= rank
        if g.ndim > -axis:
            return f"LayerNormalization scale has rank {g.ndim} > the {-axis} normalized axes"
        b = np.zeros_like(g) if b is None else b
        return _finish(node, g, b, False, rank, axis)
    elif op == "GroupNormalization" and node.domain in ONNX_DOMAINS:
        p = _params(node, ("scale", "bias"))
        if isinstance(p, str):
            return p
        g, b = p
        groups = int(attr(node, "num_groups", 0))
        shape = shape_of(node.inputs[0])
        channels = shape[1] if shape is not None and len(shape) > 2 and isinstance(shape[1], int) else None
        if channels is None or groups <= 0 or channels % groups:
            return f"GroupNormalization channel count {channels} unknown or not divisible into {groups} groups"
        graph = node.graph
        opset = (graph.opset_imports.get("", graph.opset_imports.get("ai.onnx")) if graph is not None else None)
        if opset is not None and opset < 21:  # GroupNormalization-18: scale and bias per group
            if g.size != groups or b.size != groups:
                return f"GroupNormalization-18 scale / bias are not per group ({groups})"
            g, b = np.repeat(g.reshape(-1), channels // groups), np.repeat(b.reshape(-1), channels // groups)
        scale, shift, axis, pure = g.reshape(-1), b.reshape(-1), 1, False
    elif node.domain == DOMAIN and op in CANONICAL_SOURCES:
        attrs = {**ATTRIBUTES[op], **{k: attr(node, k) for k in node.attributes}}
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
        return f"{node.op_type} parameters are not finite"
    return Affine(node, scale, shift, pure, rank, axis)


# ----------------------------------------------------------------------------- constant affines

#: elementwise ops that are affine in one operand when the other is a constant
AFFINE_OPS = ("Mul", "Div", "Add", "Sub")
_COMPARISONS = ("Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal")


def _ints(a: np.ndarray | None) -> list[int] | None:
    return None if a is None else [int(i) for i in np.asarray(a).reshape(-1)]


#: the ops :func:`constant_of` evaluates
_EVALUATED = frozenset({"Identity", "Cast", "Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg", "Pow", "Concat",
                        "Reshape", "Unsqueeze", "Squeeze", "Range", "Expand"})


def constant_of(v: ir.Value | None, depth: int = 12) -> np.ndarray | None:
    """The value of ``v`` if it is computed from constants only, else None.

    Evaluated with numpy in the tensors' own types (as a runtime would), through what exporters
    leave unfolded around parameters: ``Reshape(p, Concat(1, -1, 1, 1))``, ``Unsqueeze``, ``Cast`` /
    ``CastLike``, ``Add(var, eps) -> Sqrt -> Reciprocal -> Mul(w, .)``, ``Expand``, ``Range``, and the static
    dimensions a ``Shape -> Gather`` reads back (TorchScript with a dynamic batch).
    """
    c = const_value(v)
    if c is not None or v is None or depth == 0:
        return c
    n = v.producer()
    if n is None or n.domain not in ONNX_DOMAINS or len(n.outputs) != 1:
        return None
    op = n.op_type
    if op == "Shape":
        dims = shape_of(n.inputs[0])
        if dims is None:
            return None
        start, end = attr(n, "start", 0), attr(n, "end", None)
        sel = dims[start:end] if end is not None else dims[start:]
        return np.array(sel, np.int64) if all(isinstance(d, int) for d in sel) else None
    if op == "Gather" and len(n.inputs) == 2:
        idx = constant_of(n.inputs[1], depth - 1)
        src = n.inputs[0].producer()
        if idx is not None and src is not None and src.op_type == "Shape" and src.domain in ONNX_DOMAINS:
            dims = shape_of(src.inputs[0])  # the picked dimensions may be static while others are not
            if dims is None:
                return None
            start, end = attr(src, "start", 0), attr(src, "end", None)
            sel = dims[start:end] if end is not None else dims[start:]
            picked = np.take(np.array(sel, object), idx)
            flat = np.asarray(picked, object).reshape(-1)
            return np.array(picked, np.int64) if all(isinstance(d, int) for d in flat) else None
    if op == "CastLike" and len(n.inputs) == 2:  # only the type of the second operand matters (often the data)
        x, like = constant_of(n.inputs[0], depth - 1), dtype_of(n.inputs[1])
        return None if x is None or like is None else x.astype(like)
    if op not in _EVALUATED:
        return None
    args = []
    for i in n.inputs:  # stop at the first operand that is not a constant (no walk up a whole network)
        a = constant_of(i, depth - 1) if i is not None else None
        if i is not None and a is None:
            return None
        args.append(a)
    present = [a for a, i in zip(args, n.inputs) if i is not None]
    if not present:
        return None
    x = args[0]
    try:
        with np.errstate(all="ignore"):
            if op == "Identity":
                return x
            if op == "Cast":
                return x.astype(np.dtype(ir.DataType(attr(n, "to")).numpy()))
            if op == "CastLike":
                return x.astype(args[1].dtype)
            if op in ("Add", "Sub", "Mul", "Div"):
                out = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](x, args[1])
                if op == "Div" and np.issubdtype(x.dtype, np.integer):
                    out = np.trunc(np.divide(x, args[1])).astype(x.dtype)
                return np.asarray(out, np.result_type(x, args[1]))
            if op == "Sqrt":
                return np.sqrt(x)
            if op == "Reciprocal":
                return np.asarray(np.reciprocal(x), x.dtype)
            if op == "Neg":
                return -x
            if op == "Pow":
                return np.asarray(np.power(x, args[1]), x.dtype)
            if op == "Concat":
                return np.concatenate(present, axis=int(attr(n, "axis", 0)))
            if op == "Reshape":
                shape = _ints(args[1])
                if not attr(n, "allowzero", 0):
                    shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
                return x.reshape(shape)
            if op in ("Unsqueeze", "Squeeze"):
                axes = attr(n, "axes")
                axes = list(axes) if axes is not None else _ints(args[1]) if len(args) > 1 else None
                if op == "Squeeze":
                    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
                out_rank = x.ndim + len(axes)
                for a in sorted(a % out_rank for a in axes):
                    x = np.expand_dims(x, a)
                return x
            if op == "Range" and len(present) == 3:
                return np.arange(*(np.asarray(a).reshape(()) for a in present)).astype(np.result_type(*present))
            if op == "Expand":
                return x * np.ones(_ints(args[1]), x.dtype)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None
    return None


def affine_step(node: ir.Node) -> tuple[int, np.ndarray] | None:
    """``(data slot, constant)`` when ``node`` is ``x * k``, ``x / k``, ``x + k``, ``x - k`` or ``k - x`` with a
    constant float ``k`` that does not broadcast x to a larger shape; else None."""
    if node.domain not in ONNX_DOMAINS or node.op_type not in AFFINE_OPS or len(node.inputs) != 2 \
            or len(node.outputs) != 1 or any(i is None for i in node.inputs):
        return None
    found = None
    for slot in (0, 1):
        k = constant_of(node.inputs[1 - slot])
        if k is not None and const_value(node.inputs[slot]) is None and constant_of(node.inputs[slot]) is None:
            found = (slot, k)
            break
    if found is None:
        return None
    slot, k = found
    if not np.issubdtype(k.dtype, np.floating) or (node.op_type == "Div" and (slot == 1 or np.any(k == 0))):
        return None
    if k.ndim:
        src, dst = shape_of(node.inputs[slot]), shape_of(node.outputs[0])
        if src is None or k.ndim > len(src):
            return None
        tail = src[len(src) - k.ndim:]
        fits = all(kd == 1 or (isinstance(sd, int) and sd == kd) for kd, sd in zip(k.shape, tail))
        if not fits and not (dst is not None and len(dst) == len(src)
                             and all(p == q and p is not None for p, q in zip(src, dst))):
            return None
    return slot, np.asarray(k, np.float64)


def _compose(scale: np.ndarray, shift: np.ndarray, op: str, slot: int, k: np.ndarray):
    if op == "Mul":
        return scale * k, shift * k
    if op == "Div":
        return scale / k, shift / k
    if op == "Add":
        return scale, shift + k
    if slot == 0:  # x - k
        return scale, shift - k
    return -scale, k - shift  # k - x


def _reads_only_type_or_shape(reader: ir.Node, v: ir.Value) -> bool:
    """``reader`` reads ``v`` for its shape (``Shape``) or its element type (``CastLike``'s second operand) only."""
    if reader.domain not in ONNX_DOMAINS:
        return False
    if reader.op_type == "Shape":
        return True
    return reader.op_type == "CastLike" and len(reader.inputs) == 2 and reader.inputs[0] is not v


def value_readers(v: ir.Value) -> list[ir.Node]:
    """The nodes that read ``v``'s values: every reader but a ``Shape`` or a ``CastLike`` taking v's type (a fold
    keeps every shape and type)."""
    return [n for n in consumers(v) if not _reads_only_type_or_shape(n, v)]


def value_uses(v: ir.Value) -> int:
    return sum(1 for n, _ in v.uses() if not _reads_only_type_or_shape(n, v))


def _chain_from(node: ir.Node) -> list[tuple[ir.Node, int, np.ndarray]] | None:
    """The chain of affine steps that starts at ``node``: each step's output is read by the next step only."""
    first = affine_step(node)
    if first is None:
        return None
    data = node.inputs[first[0]]
    prev = data.producer()
    if prev is not None and affine_step(prev) is not None and value_uses(data) == 1 and not data.is_graph_output():
        return None  # node continues a chain that starts earlier
    chain = [(node, *first)]
    while True:
        out = chain[-1][0].outputs[0]
        if out.is_graph_output() or value_uses(out) != 1:
            break
        (nxt,) = value_readers(out)
        idx = next(i for i, inp in enumerate(nxt.inputs) if inp is out)
        step = affine_step(nxt)
        if step is None or step[0] != idx:
            break
        chain.append((nxt, *step))
    return chain


def _is_bias_of_linear(node: ir.Node, slot: int, data: ir.Value) -> bool:
    """``node`` is the Add that alone reads a MatMul's output (either operand order): the exporters' Linear
    bias, which :func:`normdeploy.core.linear.bias_add_of` treats as the layer's own (Conv and Gemm carry
    their bias as an input, so an Add or Sub after them belongs to the affine)."""
    prod = data.producer()
    return (node.op_type == "Add" and prod is not None and prod.domain in ONNX_DOMAINS and prod.op_type == "MatMul"
            and len(data.uses()) == 1 and not data.is_graph_output())


def constant_affine(node: ir.Node) -> Affine | None:
    """The per-channel constant affine whose chain starts at ``node``, or None when there is none.

    A chain is a run of :func:`affine_step` nodes, each the only reader of the one before;
    composed in float64, ``y = scale * x + shift``. Not counted: a chain that does not start here,
    a lone Add that is a linear layer's own bias (``MatMul -> Add(b)``, the exporters' Linear; it
    is left out of a longer chain too, so ``MatMul -> Add(b) -> Mul(gamma)`` is the layer scale
    ``Mul(gamma)``), a scalar affine (``x * 0.5``, attention's ``q / sqrt(d)``), a constant that
    varies along two axes (a positional embedding, a mask), and a shift with unit scale (a bias).
    What remains varies along one axis: a per-channel scale, with or without a shift.
    """
    chain = _chain_from(node)
    if chain is None:
        return None
    first, slot, _ = chain[0]
    data = first.inputs[slot]
    if _is_bias_of_linear(first, slot, data):
        data = first.outputs[0]
        chain = chain[1:]
    if not chain:
        return None
    y = chain[-1][0].outputs[0]
    readers = consumers(y)
    if readers and not y.is_graph_output() and all(r.op_type in _COMPARISONS for r in readers):
        return None  # a threshold (a folded MPBN's sign(gamma) u): nothing linear to fold into
    scale, shift = np.ones(()), np.zeros(())
    for n, slot, k in chain:
        scale, shift = _compose(scale, shift, n.op_type, slot, k)
    scale, shift = compress(np.asarray(scale, np.float64)), compress(np.asarray(shift, np.float64))
    width = max(scale.ndim, shift.ndim)
    varying = {i - width for a in (scale, shift) for i, d in enumerate((1,) * (width - a.ndim) + a.shape) if d > 1}
    if len(varying) != 1 or not np.any(scale != 1):
        return None
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return None
    (axis,) = varying
    return Affine(chain[-1][0], scale, shift, True, rank_of(chain[-1][0].outputs[0]), axis,
                  tuple(n for n, _, _ in chain), data)
