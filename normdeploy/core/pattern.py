"""A small pattern language over onnx-ir graphs: the one matching mechanism of local rewrites.

A pattern is a tree of :class:`Op` (an op type and input patterns), :class:`Var` (binds a
value), :class:`Const` (binds a constant), :class:`Lit` (a given constant value) and
:class:`AnyOf` (alternatives); :func:`match` backtracks through alternatives and through
the operand order of commutative ops, and looks through Identity and Casts to the type a
value already has (those nodes join the match). A :class:`Recognizer` runs a pattern over
a graph and turns each candidate into a rewrite or a skip reason.

Why not onnxscript's rewriter (prototyped on the LayerNorm and RMSNorm recognizers, 542
lines against 647): it has no construct to look through no-op Casts (the prototype had to
override a private matcher method), compares repeated variables by identity, folds no
constants through Reshape/Unsqueeze/Cast, commits to the first matching OrValue
alternative, multiplies every rule by ``commute()`` (160 variants for the two), drops the
reason of a failed check unless a tracer is subclassed, and refuses outside readers
before the check runs with a message naming no tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

from .graph import DEFAULT_DOMAINS, Namer, const_value, consumers, is_op, replace_value
from .passes import PassResult

# ----------------------------------------------------------------------------- pattern language


@dataclass(frozen=True)
class Var:
    """Any value, bound to ``name``; a second occurrence must compute the same value."""

    name: str


@dataclass(frozen=True)
class Const:
    """A value that folds to a constant; bound to ``name`` (its value in ``Match.values``)."""

    name: str


@dataclass(frozen=True)
class Lit:
    """A constant every element of which equals ``value``."""

    value: float


@dataclass(frozen=True)
class Op:
    """A default-domain node ``op`` whose first inputs match ``inputs`` (Add and Mul in either order).

    ``name`` binds the node; ``extra_inputs`` lets further inputs (ReduceMean's axes) be
    read by the check instead of the pattern.
    """

    op: str
    inputs: tuple
    name: str | None = None
    extra_inputs: bool = False


@dataclass(frozen=True)
class AnyOf:
    alts: tuple


def op(op_type: str, *inputs, name: str | None = None, extra_inputs: bool = False) -> Op:
    return Op(op_type, tuple(inputs), name, extra_inputs)


def any_of(*alts) -> AnyOf:
    return AnyOf(tuple(alts))


COMMUTATIVE = frozenset({"Add", "Mul"})


@dataclass
class Match:
    """Bindings of one match; ``nodes[0]`` is the root, whose output the rewrite takes over."""

    bound: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    nodes: tuple = ()

    def bind(self, name: str, what, value=None) -> "Match":
        values = self.values if value is None else {**self.values, name: value}
        return Match({**self.bound, name: what}, values, self.nodes)

    def add_nodes(self, nodes) -> "Match":
        return Match(self.bound, self.values, self.nodes + tuple(nodes))

    def unique_nodes(self) -> list[ir.Node]:
        return list(dict.fromkeys(self.nodes))


def match(p, v: ir.Value | None, m: Match) -> Iterator[Match]:
    """Every way value ``v`` matches pattern ``p`` given the bindings in ``m`` (backtracking)."""
    if v is None:
        return
    if isinstance(p, AnyOf):
        for alt in p.alts:
            yield from match(alt, v, m)
    elif isinstance(p, Var):
        if p.name not in m.bound:
            yield m.bind(p.name, v)
        elif same_value(m.bound[p.name], v):
            yield m
    elif isinstance(p, Const):
        c = fold(v)
        if c is None:
            return
        if p.name not in m.bound:
            yield m.bind(p.name, v, c)
        elif same_value(m.bound[p.name], v):
            yield m
    elif isinstance(p, Lit):
        c = fold(v)
        if c is not None and c.size and np.all(c == p.value):
            yield m
    elif isinstance(p, Op):
        skipped, node = producer(v)
        if node is None or node.op_type != p.op or node.domain not in DEFAULT_DOMAINS:
            return
        n = len(p.inputs)
        if len(node.inputs) < n or (len(node.inputs) > n and not p.extra_inputs):
            return
        if p.name is not None:
            if p.name in m.bound:
                if not same_value(m.bound[p.name].outputs[0], node.outputs[0]):
                    return
            else:
                m = m.bind(p.name, node)
        m = m.add_nodes(skipped + [node])
        orders = [p.inputs]
        if p.op in COMMUTATIVE and n == 2 and p.inputs[0] != p.inputs[1]:
            orders.append(p.inputs[::-1])
        for ins in orders:
            yield from _match_all(ins, node.inputs[:n], m)
    else:
        raise TypeError(f"not a pattern: {p!r}")


def _match_all(patterns, values, m: Match) -> Iterator[Match]:
    if not patterns:
        yield m
        return
    for m1 in match(patterns[0], values[0], m):
        yield from _match_all(patterns[1:], values[1:], m1)


def divided_by_sqrt(numerator, radicand):
    """``numerator / sqrt(radicand)`` in each spelling exporters emit: Div, Reciprocal+Mul, Div(1, .)+Mul,
    and Mul by ``radicand ** -0.5``."""
    root = op("Sqrt", radicand)
    return any_of(
        op("Div", numerator, root),
        op("Mul", numerator, op("Reciprocal", root)),
        op("Mul", numerator, op("Div", Lit(1.0), root)),
        op("Mul", numerator, op("Pow", radicand, Lit(-0.5))),
    )

# ----------------------------------------------------------------------------- value helpers


_TYPE_PRESERVING = frozenset({"Identity", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "ReduceMean",
                              "LayerNormalization", "RMSNormalization", "Transpose", "Reshape"})


def _to_dtype(to: int) -> np.dtype | None:
    try:
        return np.dtype(ir.DataType(to).numpy())
    except (TypeError, ValueError):
        return None


def dtype_of(v: ir.Value | None, depth: int = 8) -> np.dtype | None:
    """The element type of ``v``: declared, or derived through Casts and type-preserving ops."""
    if v is None:
        return None
    if v.dtype is not None:
        try:
            return np.dtype(v.dtype.numpy())
        except (TypeError, ValueError):
            return None
    n = v.producer()
    if depth == 0 or n is None:
        c = const_value(v)
        return None if c is None else c.dtype
    if is_op(n, "Cast") and "to" in n.attributes:
        return _to_dtype(n.attributes.get_int("to"))
    if is_op(n, "CastLike") and len(n.inputs) == 2:
        return dtype_of(n.inputs[1], depth - 1)
    if is_op(n, *_TYPE_PRESERVING) and n.inputs:
        return dtype_of(n.inputs[0], depth - 1)
    c = const_value(v)
    return None if c is None else c.dtype


def is_noop_cast(node: ir.Node) -> bool:
    """Identity, or a Cast / CastLike to the type its input already has."""
    if node.domain not in DEFAULT_DOMAINS or not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type == "Identity":
        return True
    src = dtype_of(node.inputs[0])
    if src is None:
        return False
    if node.op_type == "Cast" and "to" in node.attributes:
        return src == _to_dtype(node.attributes.get_int("to"))
    if node.op_type == "CastLike" and len(node.inputs) == 2:
        return src == dtype_of(node.inputs[1])
    return False


def producer(v: ir.Value) -> tuple[list[ir.Node], ir.Node | None]:
    """The node computing ``v``, looking through no-op Casts (returned first, to join the match)."""
    skipped = []
    node = v.producer()
    while node is not None:
        if is_noop_cast(node):
            skipped.append(node)
            node = node.inputs[0].producer()
            continue
        return skipped, node
    return skipped, None


def strip_noop(v: ir.Value) -> ir.Value:
    while (n := v.producer()) is not None and is_noop_cast(n):
        v = n.inputs[0]
    return v


_FOLDABLE = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"})


def fold(v: ir.Value | None, depth: int = 6) -> np.ndarray | None:
    """The value of ``v`` if it is a constant, also through Reshape/Unsqueeze/Squeeze/Cast of constants."""
    c = const_value(v)
    if c is not None or v is None or depth == 0:
        return c
    n = v.producer()
    if n is None or n.op_type not in _FOLDABLE or n.domain not in DEFAULT_DOMAINS or not n.inputs:
        return None
    x = fold(n.inputs[0], depth - 1)
    if x is None:
        return None
    arg = fold(n.inputs[1], depth - 1) if len(n.inputs) > 1 and n.inputs[1] is not None else None
    try:
        if n.op_type == "Identity":
            return x
        if n.op_type == "Cast":
            to = _to_dtype(n.attributes.get_int("to"))
            return None if to is None else x.astype(to)
        if n.op_type == "Reshape":
            if arg is None:
                return None
            shape = [int(s) for s in arg.reshape(-1)]
            if not n.attributes.get_int("allowzero", 0):
                shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return x.reshape(shape)
        axes = n.attributes.get_ints("axes", None)
        axes = list(axes) if axes is not None else (None if arg is None else [int(a) for a in arg.reshape(-1)])
        if n.op_type == "Unsqueeze":
            if axes is None:
                return None
            out_rank = x.ndim + len(axes)
            for a in sorted(a % out_rank for a in axes):
                x = np.expand_dims(x, a)
            return x
        if n.op_type == "Squeeze":
            return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return None


def _attrs_key(node: ir.Node) -> dict | None:
    out = {}
    for k, a in node.attributes.items():
        val = a.value
        if isinstance(val, (list, tuple)):
            val = tuple(val)
        elif not isinstance(val, (int, float, str, bytes)):
            return None  # tensors, graphs: not compared
        out[k] = val
    return out


def same_value(a: ir.Value, b: ir.Value, depth: int = 4) -> bool:
    """True if ``a`` and ``b`` are the same value, equal constants, or equal computations of them."""
    a, b = strip_noop(a), strip_noop(b)
    if a is b:
        return True
    va, vb = fold(a), fold(b)
    if va is not None or vb is not None:
        return va is not None and vb is not None and va.shape == vb.shape and bool(np.all(va == vb))
    pa, pb = a.producer(), b.producer()
    if depth == 0 or pa is None or pb is None:
        return False
    if (pa.op_type, pa.domain, len(pa.inputs), len(pa.outputs), a.index()) != \
            (pb.op_type, pb.domain, len(pb.inputs), len(pb.outputs), b.index()):
        return False
    ka, kb = _attrs_key(pa), _attrs_key(pb)
    if ka is None or kb is None or ka != kb:
        return False
    return all(x is y or (x is not None and y is not None and same_value(x, y, depth - 1))
               for x, y in zip(pa.inputs, pb.inputs))


def static_shape(v: ir.Value) -> list[int | None] | None:
    if v.shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in v.shape]


def scalar(v: ir.Value, what: str) -> float | str:
    """The value of a constant scalar (any shape of one element), or the reason it is not one."""
    c = fold(v)
    if c is None:
        return f"{what} is not a constant"
    if c.size != 1:
        return f"{what} is not a scalar (shape {list(c.shape)})"
    return float(c.reshape(-1)[0])


def reduce_axes(node: ir.Node, rank: int | None) -> list[int] | str:
    """The axes a ReduceMean reduces, keeping them (keepdims=1), as sorted negative indices, or why not."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return f"{node.op_type} {node.name} drops the reduced axes (keepdims=0)"
    return reduction_axes(node, rank)


def reduction_axes(node: ir.Node, rank: int | None) -> list[int] | str:
    """The axes ``node`` (ReduceMean / ReduceSum / ReduceL2 ...) reduces, as sorted negative indices, or why unknown."""
    if "axes" in node.attributes:
        axes = [int(a) for a in node.attributes.get_ints("axes")]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        c = fold(node.inputs[1])
        if c is None:
            return f"{node.op_type} {node.name} axes are not a constant"
        axes = [int(a) for a in c.reshape(-1)]
    else:
        axes = []
    if not axes:
        if node.attributes.get_int("noop_with_empty_axes", 0):
            return f"{node.op_type} {node.name} has empty axes and noop_with_empty_axes (an identity)"
        if rank is None:
            return f"{node.op_type} {node.name} reduces every axis of a tensor of unknown rank"
        axes = list(range(rank))
    if rank is not None:
        if any(not -rank <= a < rank for a in axes):
            return f"{node.op_type} {node.name} axes {axes} out of range for rank {rank}"
        return sorted({a % rank - rank for a in axes})
    if any(a >= 0 for a in axes):
        return f"{node.op_type} {node.name} reduces axes {axes} of a tensor of unknown rank"
    return sorted(set(axes))


def outside_consumer(m: Match) -> str | None:
    """Why the matched nodes other than the root cannot be removed, or None if they can."""
    nodes = m.unique_nodes()
    inside = set(nodes)
    for n in nodes[1:]:
        for o in n.outputs:
            if o.is_graph_output():
                return f"intermediate tensor {o.name} is a graph output"
            for c in consumers(o):
                if c not in inside:
                    return f"intermediate tensor {o.name} has another consumer ({c.op_type} {c.name})"
    return None


def spelling_of(m: Match, graph: ir.Graph | None = None) -> str:
    """The op types of the matched nodes in graph order (Casts looked through included), e.g.
    ``"ReduceMean Sub Pow ReduceMean Add Sqrt Div Mul Add"``: the spelling a report names."""
    nodes = m.unique_nodes()
    if graph is not None:
        order = {n: i for i, n in enumerate(graph)}
        nodes.sort(key=lambda n: order.get(n, -1))
    return " ".join(n.op_type for n in nodes)


def take_over(root: ir.Node, new: ir.Value) -> None:
    """``new`` replaces ``root``'s (single) output: its readers, and its name where it is a graph output.

    The matched nodes are left without readers; the pass runner removes them.
    """
    old = root.outputs[0]
    if new.dtype is None and old.dtype is not None:  # (setting None would leave an untyped TensorType)
        new.dtype = old.dtype
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    replace_value(old, new)


# ----------------------------------------------------------------------------- driver


@dataclass
class Recognizer:
    """One canonicalization: a pattern, a check-and-plan, a rewrite, and what counts as a candidate.

    * ``pattern`` is tried on the output of every node whose op is in ``root_ops``,
      downstream nodes first, so the largest spelling (with gain and bias) wins;
    * ``anchor`` names the bound node (a statistic) that identifies one normalization;
    * ``plan(graph, m)`` returns what to build, a skip reason (str), or None when the
      match is not this recognizer's business (it is then neither counted nor reported);
    * ``rewrite(graph, m, plan, namer)`` edits the graph and returns ``(description, new node name)``
      or ``(description, new node name, label)``; the rewrite's spelling is ``label: `` (if given)
      followed by the matched ops in graph order (:func:`spelling_of`);
    * ``candidate`` (a pattern tried on every node output) finds statistics that look
      like a normalization; one that no full spelling matched is reported with
      ``incomplete`` as the reason.
    """

    pattern: object
    anchor: str
    root_ops: frozenset
    plan: Callable
    rewrite: Callable
    candidate: object
    incomplete: str
    accept_candidate: Callable = lambda m: True
    candidate_ops: frozenset = frozenset({"ReduceMean"})

    def run(self, graph: ir.Graph, result: PassResult) -> None:
        graph.sort()
        namer = Namer(graph)
        nodes = list(graph)
        done: set = set()
        reasons: dict = {}
        candidates: dict = {}
        for node in nodes:
            if node.op_type in self.candidate_ops and node.domain in DEFAULT_DOMAINS and any(
                    self.accept_candidate(m) for m in match(self.candidate, node.outputs[0], Match())):
                candidates[node] = node
        for node in reversed(nodes):
            if node in done or node.op_type not in self.root_ops or len(node.outputs) != 1:
                continue
            for m in match(self.pattern, node.outputs[0], Match()):
                if m.nodes[0] is not node or any(n in done for n in m.nodes):
                    continue
                plan = self.plan(graph, m)
                if plan is None:
                    continue
                anchor = m.bound[self.anchor]
                candidates.setdefault(anchor, anchor)
                if isinstance(plan, str):
                    reasons[anchor] = plan  # the innermost failing match speaks last
                    continue
                spelling = spelling_of(m, graph)
                what, new_node, *label = self.rewrite(graph, m, plan, namer)
                result.rewrote(what, new_node, f"{label[0]}: {spelling}" if label and label[0] else spelling)
                done.update(m.nodes)
                reasons.pop(anchor, None)
                break
        result.matched += len(candidates)
        for node in nodes:  # report in graph order
            if node in candidates and node not in done:
                result.skip(node.name, reasons.get(node, self.incomplete))
