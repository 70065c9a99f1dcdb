"""A small pattern language over onnx-graphsurgeon graphs, for the canonicalize recognizers.

A pattern is a tree of :class:`Op` (an op type and input patterns), :class:`Var` (binds a
tensor), :class:`Const` (binds a constant), :class:`Lit` (a given constant value) and
:class:`AnyOf` (alternatives); :func:`match` backtracks through alternatives and through
the operand order of commutative ops. A :class:`Recognizer` runs patterns over a graph and
turns each candidate into a rewrite or a skip reason. onnx-graphsurgeon's GraphPattern has
neither alternatives nor commutativity, hence this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ..core.graph import Namer, const_value, is_graph_output
from .passes import PassResult

# ----------------------------------------------------------------------------- pattern language


@dataclass(frozen=True)
class Var:
    """Any tensor, bound to ``name``; a second occurrence must compute the same value."""

    name: str


@dataclass(frozen=True)
class Const:
    """A tensor that folds to a constant; bound to ``name`` (its value in ``Match.values``)."""

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
_DEFAULT_DOMAINS = (None, "", "ai.onnx")


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

    def unique_nodes(self) -> list[gs.Node]:
        seen, out = set(), []
        for n in self.nodes:
            if id(n) not in seen:  # membership only; never used for names or order
                seen.add(id(n))
                out.append(n)
        return out


def match(p, t: gs.Tensor, m: Match) -> Iterator[Match]:
    """Every way tensor ``t`` matches pattern ``p`` given the bindings in ``m`` (backtracking)."""
    if isinstance(p, AnyOf):
        for alt in p.alts:
            yield from match(alt, t, m)
    elif isinstance(p, Var):
        if p.name not in m.bound:
            yield m.bind(p.name, t)
        elif same_value(m.bound[p.name], t):
            yield m
    elif isinstance(p, Const):
        v = fold(t)
        if v is None:
            return
        if p.name not in m.bound:
            yield m.bind(p.name, t, v)
        elif same_value(m.bound[p.name], t):
            yield m
    elif isinstance(p, Lit):
        v = fold(t)
        if v is not None and v.size and np.all(v == p.value):
            yield m
    elif isinstance(p, Op):
        skipped, node = producer(t)
        if node is None or node.op != p.op or node.domain not in _DEFAULT_DOMAINS:
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


def _match_all(patterns, tensors, m: Match) -> Iterator[Match]:
    if not patterns:
        yield m
        return
    for m1 in match(patterns[0], tensors[0], m):
        yield from _match_all(patterns[1:], tensors[1:], m1)



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

# ----------------------------------------------------------------------------- tensor helpers


def dtype_of(t: gs.Tensor, depth: int = 8) -> np.dtype | None:
    """The element type of ``t``: declared, or derived through Casts and type-preserving ops."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype
    d = getattr(t, "dtype", None)
    if d is not None:
        try:
            return np.dtype(d)
        except TypeError:
            return None
    if depth == 0 or len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    if n.op == "Cast" and "to" in n.attrs:
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(n.attrs["to"])))
    if n.op == "CastLike" and len(n.inputs) == 2:
        return dtype_of(n.inputs[1], depth - 1)
    if n.op in ("Identity", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "ReduceMean",
                "LayerNormalization", "RMSNormalization", "Transpose", "Reshape") and n.inputs:
        return dtype_of(n.inputs[0], depth - 1)
    v = const_value(t)
    return None if v is None else v.dtype


def is_noop_cast(node: gs.Node) -> bool:
    """Identity, or a Cast / CastLike to the type its input already has."""
    if node.domain not in _DEFAULT_DOMAINS or not node.inputs:
        return False
    if node.op == "Identity":
        return True
    src = dtype_of(node.inputs[0])
    if src is None:
        return False
    if node.op == "Cast" and "to" in node.attrs:
        return src == np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if node.op == "CastLike" and len(node.inputs) == 2:
        return src == dtype_of(node.inputs[1])
    return False


def producer(t: gs.Tensor) -> tuple[list[gs.Node], gs.Node | None]:
    """The node computing ``t``, looking through no-op Casts (returned first, to join the match)."""
    skipped = []
    while len(t.inputs) == 1:
        node = t.inputs[0]
        if is_noop_cast(node):
            skipped.append(node)
            t = node.inputs[0]
            continue
        return skipped, node
    return skipped, None


def strip_noop(t: gs.Tensor) -> gs.Tensor:
    while len(t.inputs) == 1 and is_noop_cast(t.inputs[0]):
        t = t.inputs[0].inputs[0]
    return t


_FOLDABLE = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"})


def fold(t: gs.Tensor, depth: int = 6) -> np.ndarray | None:
    """The value of ``t`` if it is a constant, also through Reshape/Unsqueeze/Squeeze/Cast of constants."""
    v = const_value(t)
    if v is not None or depth == 0 or len(t.inputs) != 1:
        return v
    n = t.inputs[0]
    if n.op not in _FOLDABLE or n.domain not in _DEFAULT_DOMAINS or not n.inputs:
        return None
    x = fold(n.inputs[0], depth - 1)
    if x is None:
        return None
    arg = fold(n.inputs[1], depth - 1) if len(n.inputs) > 1 and n.inputs[1].name else None
    try:
        if n.op == "Identity":
            return x
        if n.op == "Cast":
            return x.astype(helper.tensor_dtype_to_np_dtype(int(n.attrs["to"])))
        if n.op == "Reshape":
            if arg is None:
                return None
            shape = [int(s) for s in arg.reshape(-1)]
            if not n.attrs.get("allowzero", 0):
                shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return x.reshape(shape)
        axes = n.attrs.get("axes", None)
        axes = list(axes) if axes is not None else (None if arg is None else [int(a) for a in arg.reshape(-1)])
        if n.op == "Unsqueeze":
            if axes is None:
                return None
            out_rank = x.ndim + len(axes)
            for a in sorted(a % out_rank for a in axes):
                x = np.expand_dims(x, a)
            return x
        if n.op == "Squeeze":
            return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return None


def same_value(a: gs.Tensor, b: gs.Tensor, depth: int = 4) -> bool:
    """True if ``a`` and ``b`` are the same tensor, equal constants, or equal computations of them."""
    a, b = strip_noop(a), strip_noop(b)
    if a is b:
        return True
    va, vb = fold(a), fold(b)
    if va is not None or vb is not None:
        return va is not None and vb is not None and va.shape == vb.shape and bool(np.all(va == vb))
    if depth == 0 or len(a.inputs) != 1 or len(b.inputs) != 1:
        return False
    pa, pb = a.inputs[0], b.inputs[0]
    if (pa.op, pa.domain, len(pa.inputs), len(pa.outputs)) != (pb.op, pb.domain, len(pb.inputs), len(pb.outputs)):
        return False
    if pa.outputs.index(a) != pb.outputs.index(b):
        return False
    try:
        if pa.attrs != pb.attrs:
            return False
    except ValueError:  # array-valued attributes
        return False
    return all(same_value(x, y, depth - 1) for x, y in zip(pa.inputs, pb.inputs))


def static_shape(t: gs.Tensor) -> list[int | None] | None:
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    return [d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]


def scalar(t: gs.Tensor, what: str) -> float | str:
    """The value of a constant scalar (any shape of one element), or the reason it is not one."""
    v = fold(t)
    if v is None:
        return f"{what} is not a constant"
    if v.size != 1:
        return f"{what} is not a scalar (shape {list(v.shape)})"
    return float(v.reshape(-1)[0])


def reduce_axes(node: gs.Node, rank: int | None) -> list[int] | str:
    """The axes a ReduceMean reduces, as sorted negative indices, or the reason they are not known."""
    attrs = node.attrs
    if int(attrs.get("keepdims", 1)) != 1:
        return f"{node.op} {node.name} drops the reduced axes (keepdims=0)"
    if attrs.get("axes") is not None:
        axes = [int(a) for a in attrs["axes"]]
    elif len(node.inputs) > 1 and node.inputs[1].name:
        v = fold(node.inputs[1])
        if v is None:
            return f"{node.op} {node.name} axes are not a constant"
        axes = [int(a) for a in v.reshape(-1)]
    else:
        axes = []
    if not axes:
        if int(attrs.get("noop_with_empty_axes", 0)):
            return f"{node.op} {node.name} has empty axes and noop_with_empty_axes (an identity)"
        if rank is None:
            return f"{node.op} {node.name} reduces every axis of a tensor of unknown rank"
        axes = list(range(rank))
    if rank is not None:
        if any(not -rank <= a < rank for a in axes):
            return f"{node.op} {node.name} axes {axes} out of range for rank {rank}"
        return sorted({a % rank - rank for a in axes})
    if any(a >= 0 for a in axes):
        return f"{node.op} {node.name} reduces axes {axes} of a tensor of unknown rank"
    return sorted(set(axes))


def outside_consumer(graph: gs.Graph, m: Match) -> str | None:
    """Why the matched nodes other than the root cannot be removed, or None if they can."""
    nodes = m.unique_nodes()
    inside = {id(n) for n in nodes}
    for n in nodes[1:]:
        for o in n.outputs:
            if is_graph_output(graph, o):
                return f"intermediate tensor {o.name} is a graph output"
            for c in o.outputs:
                if id(c) not in inside:
                    return f"intermediate tensor {o.name} has another consumer ({c.op} {c.name})"
    return None


def take_output(root: gs.Node) -> gs.Tensor:
    """Detach ``root`` from its (single) output tensor and return that tensor (name and graph-output status kept)."""
    y = root.outputs[0]
    root.outputs.clear()
    return y


# ----------------------------------------------------------------------------- driver


@dataclass
class Recognizer:
    """One canonicalization: a pattern, a check-and-plan, a rewrite, and what counts as a candidate.

    * ``pattern`` is tried on the output of every node whose op is in ``root_ops``,
      downstream nodes first, so the largest spelling (with gain and bias) wins;
    * ``anchor`` names the bound node (a statistic) that identifies one normalization;
    * ``plan(graph, m)`` returns what to build, a skip reason (str), or None when the
      match is not this recognizer's business (it is then neither counted nor reported);
    * ``rewrite(graph, m, plan, namer)`` edits the graph and returns ``(description, new node name)``;
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

    def run(self, graph: gs.Graph, result: PassResult) -> None:
        graph.toposort()
        namer = Namer(graph)
        done: set[int] = set()
        reasons: dict[int, str] = {}
        candidates: dict[int, gs.Node] = {}
        for node in graph.nodes:
            if node.op == "ReduceMean" and any(
                    self.accept_candidate(m) for m in match(self.candidate, node.outputs[0], Match())):
                candidates[id(node)] = node
        for node in reversed(list(graph.nodes)):
            if id(node) in done or node.op not in self.root_ops or len(node.outputs) != 1:
                continue
            for m in match(self.pattern, node.outputs[0], Match()):
                if m.nodes[0] is not node or any(id(n) in done for n in m.nodes):
                    continue
                plan = self.plan(graph, m)
                if plan is None:
                    continue
                anchor = m.bound[self.anchor]
                candidates.setdefault(id(anchor), anchor)
                if isinstance(plan, str):
                    reasons[id(anchor)] = plan  # the innermost failing match speaks last
                    continue
                what, new_node = self.rewrite(graph, m, plan, namer)
                result.rewrote(what, new_node)
                done.update(id(n) for n in m.nodes)
                reasons.pop(id(anchor), None)
                break
        result.matched += len(candidates)
        for node in graph.nodes:  # report in graph order
            if id(node) in candidates and id(node) not in done:
                result.skip(node.name, reasons.get(id(node), self.incomplete))
