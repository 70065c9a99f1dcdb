"""Pre-LN to Pre-RMSNorm, exact (DESIGN.md 3.3).

A pre-LN transformer keeps a residual stream ``h`` of width d::

    h_0 = write_0(x)                      embeddings (+ positions, class token)
    h_{i+1} = h_i + write_{i+1}(LN_i(h_i))  each branch ends in a linear projection
    out = head(LN_f(h_L))

If every *write* into the stream is re-centred, ``write' = write - mean_d(write)``, every
``h_i`` has zero mean over d, so ``LN(h) = g (h - mean h) / sqrt(var h + eps) + b`` equals
``g h / sqrt(mean(h^2) + eps) + b``: an RMSNorm with the same gain and epsilon, followed by
the bias (which the rewrite stage folds into the consumers where it can). Re-centring a
linear write is exact and free: for ``y = x W + c`` the mean over the output axis is
``x mean_d(W) + mean_d(c)``, so ``W' = W - mean_d(W)`` (each row minus its mean over d) and
``c' = c - mean_d(c)`` give ``y - mean_d(y)``. Embedding tables, position tables and class
tokens are constants: subtract their mean over d. Weights are re-centred in float64 and
stored once in their dtype; a re-centred table shared with another node (tied input and
output embeddings) is written as a new constant, so the other user keeps the original
(the tie is undone).

Only stream values differ after the rewrite, and the stream is read only by LNs, whose
outputs are unchanged; so the model computes the same function up to float rounding
(the stream's computed mean is zero to rounding rather than exactly).

Conditions, each refused with the node that breaks it:

* the stream is read only through LayerNormalization over its last axis and by the
  residual Adds that extend it (a post-LN block, whose LN output feeds the residual, or
  any other reader, breaks it), and no stream tensor is a graph output;
* every write is affine in a form that can be re-centred: Gemm, MatMul with a constant
  weight, Conv (through Reshape/Flatten/Transpose that move its channel axis to the
  last), Gather from a constant table, a constant, Expand or Concat (on another axis) of
  those, Add of those, a Mul by a factor constant along d, Identity/Dropout/Cast; every
  tensor on the way has no other reader.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..core.graph import (
    Namer,
    add_node,
    attr,
    const_value,
    constant,
    consumers,
    rank_of,
    remove_nodes,
    replace_value,
    shape_of,
    value,
)
from ..core.linear import centre, linear_layer
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult, Refuse


@dataclass
class Stream:
    states: list[ir.Value]  # values read by the LNs (h_i), in no particular order
    adds: list[ir.Node]  # residual Adds that build the states
    writes: list[ir.Value]  # values added into the stream
    lns: list[ir.Node] = field(default_factory=list)


def _is_last_axis_ln(node: ir.Node) -> bool:
    if node.op_type != "LayerNormalization":
        return False
    axis = int(attr(node, "axis", -1))
    rank = rank_of(node.inputs[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def _is_constant(v: ir.Value) -> bool:
    """``v`` is an initializer (what graphsurgeon called a Constant), not a Constant node's output."""
    return v.producer() is None and v.const_value is not None


def find_streams(graph: ir.Graph) -> list[Stream]:
    """Group last-axis LayerNorm inputs into residual streams joined by Add trees."""
    lns = [n for n in graph if _is_last_axis_ln(n)]
    states = {id(n.inputs[0]): n.inputs[0] for n in lns}
    parent = {k: k for k in states}

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    expansions = {}
    for key, t in states.items():
        adds, writes, prev = [], [], []
        _expand(t, states, adds, writes, prev, top=True)
        expansions[key] = (adds, writes)
        for p in prev:
            parent[find(id(p))] = find(key)
    groups: dict[int, Stream] = {}
    for key, t in states.items():
        root = find(key)
        s = groups.setdefault(root, Stream([], [], []))
        s.states.append(t)
        s.adds += expansions[key][0]
        s.writes += expansions[key][1]
    for s in groups.values():
        ids = {id(t) for t in s.states}
        s.lns = [n for n in lns if id(n.inputs[0]) in ids]
    return list(groups.values())


def _expand(t, states, adds, writes, prev, top=False):
    """Split stream state ``t`` into residual Adds, earlier states and writes."""
    if not top and id(t) in states:
        prev.append(t)
        return
    p = t.producer()
    if p is not None and p.op_type == "Add" and (top or len(t.uses()) == 1) and _reaches_state(p, states):
        adds.append(p)
        for x in p.inputs:
            _expand(x, states, adds, writes, prev)
        return
    writes.append(t)


def _reaches_state(add: ir.Node, states, depth: int = 0) -> bool:
    """Whether an Add tree contains an earlier stream state (so it is residual, not a write)."""
    if depth > 64:
        return False
    for x in add.inputs:
        if id(x) in states:
            return True
        p = x.producer() if x is not None else None
        if p is not None and p.op_type == "Add" and _reaches_state(p, states, depth + 1):
            return True
    return False


def check_readers(graph: ir.Graph, s: Stream) -> None:
    allowed = {id(n) for n in s.lns} | {id(n) for n in s.adds}
    for t in s.states + [a.outputs[0] for a in s.adds]:
        if t.is_graph_output():
            raise Refuse(f"stream tensor {t.name} is a graph output")
        for reader in consumers(t):
            if id(reader) not in allowed:
                kind = "a LayerNorm over another axis" if reader.op_type == "LayerNormalization" else reader.op_type
                raise Refuse(f"stream tensor {t.name} is read by {reader.name} ({kind}), not only by LayerNorms "
                             f"and residual Adds (post-LN or a side read)")


class Recentre:
    """Plans the re-centring of every write, then applies it; nothing changes until apply()."""

    def __init__(self, graph: ir.Graph, d: int):
        self.graph, self.d, self.edits = graph, d, []
        self.namer = Namer(graph)

    def plan(self, t: ir.Value, axis: int, reader: ir.Node | None = None) -> None:
        """Plan ``t -> t - mean(t, axis)``; ``axis`` is the model-dimension axis of ``t`` (negative).

        ``reader`` is the node on the write path that reads ``t``; a constant is replaced
        there only, so any other reader keeps the original value.
        """
        if _is_constant(t):
            self.edits.append(("const", t, axis, reader))
            return
        node = t.producer()
        if node is None:
            raise Refuse(f"write {t.name} is a graph input, not an affine map of constants")
        if reader is not None and (len(t.uses()) != 1 or t.is_graph_output()):
            raise Refuse(f"tensor {t.name} on a write into the stream has another reader")
        op = node.op_type
        if op == "Constant":
            self.edits.append(("constnode", node, axis, None))
        elif op in ("Identity", "Dropout", "Cast"):
            self.plan(node.inputs[0], axis, node)
        elif op in ("Add", "Sub"):
            for x in node.inputs:
                self.plan(x, axis, node)
        elif op == "Mul":
            a, b = node.inputs
            for x, other in ((a, b), (b, a)):
                cv = const_value(other)
                if cv is not None and (cv.ndim < -axis or cv.shape[axis] == 1):
                    self.plan(x, axis, node)
                    return
            raise Refuse(f"{node.name} (Mul) scales the model dimension by a non-constant or per-channel factor")
        elif op == "Gemm":
            if axis != -1:
                raise Refuse(f"{node.name} (Gemm) output channel is not the model axis")
            if const_value(node.inputs[1]) is None:
                raise Refuse(f"{node.name} (Gemm) weight is not a constant")
            if len(node.inputs) > 2 and node.inputs[2] is not None and const_value(node.inputs[2]) is None:
                raise Refuse(f"{node.name} (Gemm) bias is not a constant")
            self.edits.append(("linear", node, axis, None))
        elif op == "MatMul":
            if const_value(node.inputs[1]) is None:
                raise Refuse(f"{node.name} (MatMul) right operand is not a constant")
            if axis != -1:
                raise Refuse(f"{node.name} (MatMul) output's model axis is not its last")
            self.edits.append(("linear", node, axis, None))
        elif op == "Conv":
            if not self._is_channel_axis(node, axis):
                raise Refuse(f"{node.name} (Conv) channel axis is not the model axis")
            has_b = len(node.inputs) > 2 and node.inputs[2] is not None
            if const_value(node.inputs[1]) is None or (has_b and const_value(node.inputs[2]) is None):
                raise Refuse(f"{node.name} (Conv) weight or bias is not a constant")
            self.edits.append(("linear", node, axis, None))
        elif op == "Gather":
            table = const_value(node.inputs[0])
            if table is None or int(attr(node, "axis", 0)) != 0:
                raise Refuse(f"{node.name} (Gather) does not read rows of a constant table")
            if axis != -1:
                raise Refuse(f"{node.name} (Gather) table's last axis is not the model axis")
            self.edits.append(("gather", node, axis, None))
        elif op == "Expand":
            self.plan(node.inputs[0], axis, node)
        elif op == "Concat":
            rank = rank_of(t)
            cat = int(attr(node, "axis"))
            if rank is None or (cat % rank) == (axis % rank):
                raise Refuse(f"{node.name} (Concat) joins along the model axis")
            for x in node.inputs:
                self.plan(x, axis, node)
        elif op == "Transpose":
            perm = attr(node, "perm")
            if perm is None:  # the default reverses the axes
                rank = rank_of(t)
                if rank is None:
                    raise Refuse(f"{node.name} (Transpose) reverses axes of unknown rank")
                perm = list(range(rank))[::-1]
            rank = len(perm)
            self.plan(node.inputs[0], perm[axis % rank] - rank, node)
        elif op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            self.plan(node.inputs[0], self._axis_through_reshape(node, axis), node)
        else:
            raise Refuse(f"{node.name} ({op}) writes into the stream and is not an affine map normdeploy can re-centre")

    @staticmethod
    def _is_channel_axis(node: ir.Node, axis: int) -> bool:
        rank = rank_of(node.outputs[0])
        return rank is not None and axis % rank == 1

    @staticmethod
    def _axis_through_reshape(node: ir.Node, axis: int) -> int:
        """Map the model axis back through a reshape that keeps it whole and keeps what precedes it."""
        out, inp = shape_of(node.outputs[0]), shape_of(node.inputs[0])
        if out is None or inp is None:
            raise Refuse(f"{node.name} ({node.op_type}) shapes are unknown")
        pos = axis % len(out)
        size = out[pos]
        if not isinstance(size, int):
            raise Refuse(f"{node.name} ({node.op_type}) model axis size is not static")
        if pos == len(out) - 1 and isinstance(inp[-1], int) and inp[-1] == size:
            return -1
        if list(out[:pos + 1]) == list(inp[:pos + 1]):  # leading dims and the axis kept (e.g. Flatten(2))
            return pos - len(inp)
        raise Refuse(f"{node.name} ({node.op_type}) moves or splits the model axis")

    def apply(self) -> list[str]:
        done = []
        seen = set()
        for kind, obj, axis, reader in self.edits:
            key = (id(obj), id(reader))
            if key in seen:
                continue
            seen.add(key)
            getattr(self, f"_apply_{kind}")(obj, axis, reader)
            done.append(f"{kind} {getattr(obj, 'name', '')}")
        return done

    def _new(self, base: str, v, like) -> ir.Value:
        return constant(self.namer, base, "centred", np.asarray(v).astype(np.asarray(like).dtype))

    def _apply_const(self, t: ir.Value, axis: int, reader: ir.Node) -> None:
        v = const_value(t)
        new = self._new(t.name, centre(v, axis), v)
        for i, x in enumerate(reader.inputs):
            if x is t:
                reader.replace_input_with(i, new)

    def _apply_constnode(self, node: ir.Node, axis: int, reader=None) -> None:
        out = node.outputs[0]
        v = const_value(out)
        new = self._new(out.name, centre(v, axis), v)
        for user, i in list(out.uses()):
            user.replace_input_with(i, new)

    def _apply_linear(self, node: ir.Node, axis: int, reader=None) -> None:
        """Gemm, MatMul, Conv: weight and bias minus their means over the output channels (:mod:`..core.linear`)."""
        layer = linear_layer(self.graph, node, 0, bias_add=False)
        layer.centre_outputs()
        layer.apply(self.namer, "centred")

    def _apply_gather(self, node: ir.Node, axis: int, reader=None) -> None:
        table = const_value(node.inputs[0])
        node.replace_input_with(0, self._new(node.name or "gather", centre(table, -1), table))


def ln_params(ln: ir.Node) -> tuple[np.ndarray, np.ndarray | None, float]:
    """A LayerNormalization's constant scale, bias (None when absent) and epsilon."""
    g = const_value(ln.inputs[1])
    b = const_value(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None else None
    return g, b, float(attr(ln, "epsilon", 1e-5))


def replace_lns(graph: ir.Graph, stream: Stream, namer: Namer, result: PassResult, target_op: str = "RMSNorm"):
    for ln in stream.lns:
        x, y = ln.inputs[0], ln.outputs[0]
        g, b, eps = ln_params(ln)
        base = ln.name or "ln"
        has_bias = b is not None and np.any(b != 0)
        mid = value(namer, base, "rms", dtype=y.dtype, shape=y.shape) if has_bias else None
        rms = add_node(namer, target_op, [x, constant(namer, base, "gain", g)], [mid] if mid is not None else None,
                       base=base, name=base, domain=DOMAIN, attrs={"epsilon": eps})
        out = rms.outputs[0]
        if has_bias:
            add_name = namer(base, "bias")
            out = add_node(namer, "Add", [mid, constant(namer, base, "bias", b)], base=base, name=add_name).outputs[0]
        out.dtype, out.shape = y.dtype, y.shape
        replace_value(y, out)
        remove_nodes(graph, [ln])
        result.rewrote(f"LayerNormalization {base} -> {target_op}" + (" + Add(bias)" if has_bias else ""), base)


def prepare_stream(graph: ir.Graph, stream: Stream) -> Recentre:
    """Check every condition and plan the re-centring; raises Refuse naming the culprit."""
    for ln in stream.lns:
        for i in (1, 2):
            if len(ln.inputs) > i and ln.inputs[i] is not None and const_value(ln.inputs[i]) is None:
                raise Refuse(f"{ln.name} (LayerNormalization) {'scale' if i == 1 else 'bias'} is not a constant")
    d = int(np.asarray(const_value(stream.lns[0].inputs[1])).shape[-1])
    check_readers(graph, stream)
    rc = Recentre(graph, d)
    for w in stream.writes:
        if _is_constant(w):
            raise Refuse(f"constant {w.name} is added to the stream directly")
        rc.plan(w, -1)
    return rc


def _why_not_on_stream(ln: ir.Node) -> str:
    """Name the post-LN pattern when it is one: the residual Add feeding this LN adds another LN's output."""
    p = ln.inputs[0].producer()
    if p is not None and p.op_type == "Add":
        for x in p.inputs:
            q = x.producer() if x is not None else None
            for _ in range(3):
                if q is None:
                    break
                if q.op_type == "LayerNormalization":
                    return (f"post-LN block: the residual Add {p.name} feeding it adds the output of LayerNorm "
                            f"{q.name}, so the stream is normalized after the residual, not before")
                q = q.inputs[0].producer() if q.inputs and q.inputs[0] is not None else None
    return "not on a pre-LN residual stream (no residual Add joins it to another LayerNorm's input)"


def convert_streams(graph: ir.Graph, result: PassResult, convert) -> None:
    """For every pre-LN stream that meets the conditions: re-centre its writes, then ``convert(stream, d)``.

    A stream that does not meet them is reported as skipped, LN by LN, with the reason.
    """
    for stream in find_streams(graph):
        result.matched += len(stream.lns)
        if len(stream.lns) < 2 or not stream.adds:
            for ln in stream.lns:
                result.skip(ln.name, _why_not_on_stream(ln))
            continue
        try:
            rc = prepare_stream(graph, stream)
        except Refuse as e:
            for ln in stream.lns:
                result.skip(ln.name, f"stream not convertible: {e}")
            continue
        rc.apply()
        convert(stream, rc.d)


def preln_to_rmsnorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Re-centre every write into a pre-LN residual stream; its LayerNorms become RMSNorm (exact)."""
    namer = Namer(graph)

    def convert(stream: Stream, d: int) -> None:
        replace_lns(graph, stream, namer, result)
        result.notes.append(f"re-centred {len(stream.writes)} writes into a residual stream of width {d}; "
                            f"{len(stream.lns)} LayerNorms became RMSNorm")

    convert_streams(graph, result, convert)
