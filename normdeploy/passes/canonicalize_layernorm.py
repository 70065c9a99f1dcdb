"""Recognize decomposed LayerNorm and rewrite it to one ONNX ``LayerNormalization`` (DESIGN.md 2).

Math: over the normalized axes A of x (per token / per pixel),

    y = g * (x - mean_A(x)) / sqrt(mean_A((x - mean_A(x))^2) + eps) + b

which is ``LayerNormalization(x, scale=g, bias=b, axis, epsilon)`` when A is the
trailing axes ``axis .. rank-1``. Spellings recognized (``d = x - mean``, ``s = var + eps``)::

    x ──> ReduceMean ──> mean                        (axes attribute, opset < 18,
    x, mean ──> Sub ──> d                              or axes input, opset >= 18)
    d ──> Pow(., 2) | Mul(d, d) ──> ReduceMean ──> var
    var ──> Add(eps) ──> s
          s ──> Sqrt ──> Div(d, .) ─────────────┐
          s ──> Sqrt ──> Reciprocal ──> Mul(d, .) ┤
          s ──> Sqrt ──> Div(1, .) ──> Mul(d, .)  ┤   (TorchScript's rsqrt)
          s ──> Pow(., -0.5) ──> Mul(d, .) ──────┤
                                                 └──> [Mul(g)] ──> [Add(b)] ──> y

torch's exporter may emit ``x - mean`` twice (one Sub for the numerator, one for the
variance); both are accepted when they compute the same value. Casts whose source and
target types are equal (``x.to(torch.float32)`` on a float32 x) are looked through. A
mixed-precision spelling keeps its real Casts: ``Cast(x, float32)`` feeds the match as x,
and a Cast between the normalized product and the gain keeps the gain outside
(scale = ones; folding it across the Cast would change the rounding).

Channels-first LayerNorm (ConvNeXt: mean and variance over axis 1 of NCHW, gain and
bias shaped [C, 1, 1]) becomes::

    x ──> Transpose(0, 2, .., r-1, 1) ──> LayerNormalization(axis=-1)
      ──> Transpose(0, r-1, 1, .., r-2) ──> y

Exact: the replacement computes the same expression (up to float rounding: the
statistics are computed by one kernel, in float32 for float16 inputs, stash_type 1).

Conditions (each failure is a skip reason): the model's opset is at least 17; epsilon,
gain and bias are constants; mean and variance reduce over the same axes, with
keepdims; those axes are the trailing ones (or axis 1 of a tensor of rank >= 3); the
gain and bias vary only along the normalized axes, whose sizes are static; no
intermediate tensor (mean, d, variance, ...) is a graph output or is read by a node
outside the match. The output tensor keeps its name.

The small pattern language below (:class:`Op`, :class:`Var`, :class:`Const`, :class:`Lit`,
:class:`AnyOf`, :class:`Recognizer`) is shared with :mod:`.canonicalize_rmsnorm`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph import Namer, const_value, constant, is_graph_output, rank_of
from . import PassContext, PassResult, register

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


# ----------------------------------------------------------------------------- LayerNorm

X = Var("x")
MEAN = op("ReduceMean", X, name="mean", extra_inputs=True)
CENTRED = op("Sub", X, MEAN)
VARIANCE = op("ReduceMean", any_of(op("Pow", CENTRED, Lit(2.0)), op("Mul", CENTRED, CENTRED)),
              name="var", extra_inputs=True)
VAR_EPS = op("Add", VARIANCE, Var("eps"))
STD = op("Sqrt", VAR_EPS)
NORMALIZED = any_of(
    op("Div", CENTRED, STD),
    op("Mul", CENTRED, op("Reciprocal", STD)),
    op("Mul", CENTRED, op("Div", Lit(1.0), STD)),
    op("Mul", CENTRED, op("Pow", VAR_EPS, Lit(-0.5))),
)
LAYERNORM = any_of(
    op("Add", op("Mul", NORMALIZED, Const("g")), Const("b")),
    op("Mul", NORMALIZED, Const("g")),
    op("Add", NORMALIZED, Const("b")),
    NORMALIZED,
)


@dataclass
class LayerNormPlan:
    x: gs.Tensor
    axis: int  # negative: LayerNormalization normalizes axis .. rank-1
    epsilon: float
    scale: np.ndarray
    bias: np.ndarray | None
    channels_first_rank: int | None = None  # set: normalize axis 1 through Transposes


def _trailing_param(v: np.ndarray, norm_shape: list[int], rank: int | None, what: str) -> np.ndarray | str:
    """Gain or bias ``v`` (broadcast against x) as a tensor of the normalized shape."""
    k = len(norm_shape)
    if v.ndim > (rank if rank is not None else k):
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    lead = v.shape[:max(0, v.ndim - k)]
    if any(d != 1 for d in lead):
        return f"{what} of shape {list(v.shape)} varies along an axis that is not normalized"
    tail = v.reshape(v.shape[len(lead):])
    tail = tail.reshape((1,) * (k - tail.ndim) + tail.shape)
    if any(t not in (1, n) for t, n in zip(tail.shape, norm_shape)):
        return f"{what} of shape {list(v.shape)} does not broadcast to the normalized shape {norm_shape}"
    return np.broadcast_to(tail, norm_shape)


def _channel_param(v: np.ndarray, channels: int, rank: int, what: str) -> np.ndarray | str:
    """Gain or bias ``v`` of a channels-first norm as a [C] vector."""
    if v.ndim > rank:
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    padded = (1,) * (rank - v.ndim) + v.shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1) or padded[1] not in (1, channels):
        return f"{what} of shape {list(v.shape)} is not per-channel on axis 1"
    return np.broadcast_to(v.reshape(-1), (channels,))


def _plan_layernorm(graph: gs.Graph, m: Match) -> LayerNormPlan | str:
    if graph.opset is not None and graph.opset < 17:
        return f"model opset {graph.opset} has no LayerNormalization (needs opset 17)"
    eps = scalar(m.bound["eps"], "epsilon")
    if isinstance(eps, str):
        return eps
    x = m.bound["x"]
    rank = rank_of(x)
    mean_axes = reduce_axes(m.bound["mean"], rank)
    if isinstance(mean_axes, str):
        return mean_axes
    var_axes = reduce_axes(m.bound["var"], rank)
    if isinstance(var_axes, str):
        return var_axes
    if mean_axes != var_axes:
        return f"mean and variance reduce over different axes ({mean_axes} vs {var_axes})"
    k = len(mean_axes)
    shape = static_shape(x)
    g, b = m.values.get("g"), m.values.get("b")
    dtype = dtype_of(x) or (g.dtype if g is not None else np.dtype(np.float32))
    if mean_axes == list(range(-k, 0)):
        norm_shape = shape[-k:] if shape is not None else None
        if norm_shape is None or None in norm_shape:
            return f"normalized dimensions of {x.name} are not static (LayerNormalization needs a full scale)"
        scale = np.ones(norm_shape, dtype) if g is None else _trailing_param(g, norm_shape, rank, "gain")
        bias = None if b is None else _trailing_param(b, norm_shape, rank, "bias")
        cf_rank = None
    elif rank is not None and rank >= 3 and mean_axes == [1 - rank]:
        channels = shape[1]
        if channels is None:
            sizes = [v.size for v in (g, b) if v is not None and v.size > 1]
            if not sizes:
                return f"channel dimension of {x.name} is not static"
            channels = sizes[0]
        scale = np.ones(channels, dtype) if g is None else _channel_param(g, channels, rank, "gain")
        bias = None if b is None else _channel_param(b, channels, rank, "bias")
        k, cf_rank = 1, rank
    else:
        return (f"mean and variance reduce over axes {mean_axes}, neither the trailing axes nor axis 1 "
                f"(channels-first) of a rank-{rank} tensor")
    for p in (scale, bias):
        if isinstance(p, str):
            return p
    reason = outside_consumer(graph, m)
    if reason:
        return reason
    return LayerNormPlan(x, -k, eps, np.ascontiguousarray(scale, dtype),
                         None if bias is None else np.ascontiguousarray(bias, dtype), cf_rank)


def _rewrite_layernorm(graph: gs.Graph, m: Match, plan: LayerNormPlan, namer: Namer) -> tuple[str, str]:
    root = m.nodes[0]
    base = root.name or "layernorm"
    y = take_output(root)
    params = [constant(namer, base, "ln_scale", plan.scale)]
    if plan.bias is not None:
        params.append(constant(namer, base, "ln_bias", plan.bias))
    attrs = {"axis": plan.axis, "epsilon": plan.epsilon}
    dtype = plan.scale.dtype
    if plan.channels_first_rank is None:
        ln = gs.Node("LayerNormalization", namer(base, "LayerNormalization"), attrs, [plan.x, *params], [y])
        graph.nodes.append(ln)
        return f"decomposed LayerNorm ending at {root.name} -> LayerNormalization {ln.name} (axis {plan.axis})", ln.name
    r = plan.channels_first_rank
    to_last, to_first = [0, *range(2, r), 1], [0, r - 1, *range(1, r - 1)]
    t_in = gs.Variable(namer(base, "channels_last"), dtype=dtype)
    t_out = gs.Variable(namer(base, "channels_last_normalized"), dtype=dtype)
    ln = gs.Node("LayerNormalization", namer(base, "LayerNormalization"), attrs, [t_in, *params], [t_out])
    graph.nodes.extend([
        gs.Node("Transpose", namer(base, "to_channels_last"), {"perm": to_last}, [plan.x], [t_in]),
        ln,
        gs.Node("Transpose", namer(base, "to_channels_first"), {"perm": to_first}, [t_out], [y]),
    ])
    return (f"channels-first LayerNorm ending at {root.name} -> Transpose, LayerNormalization {ln.name} "
            f"(axis -1), Transpose"), ln.name


LAYERNORM_RECOGNIZER = Recognizer(
    pattern=LAYERNORM,
    anchor="var",
    root_ops=frozenset({"Add", "Mul", "Div"}),
    plan=_plan_layernorm,
    rewrite=_rewrite_layernorm,
    candidate=VARIANCE,
    incomplete="variance of x - mean(x) is not followed by a recognized LayerNorm spelling "
               "(Add eps, Sqrt, Div / Reciprocal+Mul, or Pow -0.5)",
)


@register("recognize_layernorm", stage="canonicalize", exact=True)
def recognize_layernorm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Rewrite decomposed LayerNorm (trailing axes, or channels-first axis 1) to ONNX LayerNormalization."""
    result = PassResult("recognize_layernorm", exact=True)
    LAYERNORM_RECOGNIZER.run(graph, result)
    return result
