"""Pre-LN to Pre-CRMSNorm, exact (DESIGN.md 3.4). Runs when asked: ``--preln-form crmsnorm``.

After the re-centring of :mod:`normdeploy.rewrite.preln_to_rmsnorm` every vector on the
residual stream has zero mean, so its last coordinate is minus the sum of the others and
need not be stored (Jiang et al., NeurIPS 2023)::

    writes:   w (width d)            -> w[..., :d-1]           (Slice on the write)
    LN:       LN(h) = g h / rms(h) + b   with   rms(h)^2 = (sum_{j<d} h_j^2 + (sum_{j<d} h_j)^2) / d
              -> u = CRMSNorm(h[..., :d-1])    (unit gain, same eps)
    readers:  y = [u, -sum(u)] * g + b  feeds  z = y W + c
              -> z = u W' + c'  with  W'_j = g_j W_j - g_d W_d  (j < d),  c' = c + b W

Every step is an identity on zero-mean vectors, so the model computes the same function up
to float rounding. The reconstruction ``[u, -sum(u)]`` is folded into readers that are
linear (MatMul with a constant weight, Gemm), directly or through Reshape (whose last
dimension is patched from d to d-1), Gather or Slice on another axis; where a reader is
not linear the reconstruction stays as ReduceSum, Neg, Concat, Mul, Add (still exact).
The conditions on the stream are those of Pre-RMSNorm (explicit re-centrings included: an
explicitly re-centred write is sliced like any other); the stream is refused with the same
reasons, and also where the narrower stream would change what a reader computes: a Shape
reader that reads the stream's width (a TorchScript export reads the batch and token counts
with ``Shape -> Gather``, which is fine), or a Reshape between the stream and an LN whose
target shape is not a constant. A token selection between the stream and an LN (Gather,
Slice, ReduceMean over tokens) carries d-1 coordinates just as well; a Reshape there gets
its last dimension patched from d to d-1.
"""
from __future__ import annotations

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
from ..core.linear import linear_layer
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult
from .preln_to_rmsnorm import SHAPE_READERS, Plan, Stream, convert_streams


def _narrow(v: ir.Value, d: int) -> None:
    """``v`` now holds d-1 of its d last-axis coordinates: its known shape, else no shape (re-inferred later)."""
    shape = shape_of(v)
    if shape and shape[-1] == d:
        dims = list(v.shape)
        v.shape = ir.Shape(dims[:-1] + [d - 1])
    else:
        v.shape = None


def _narrowed(v: ir.Value, d: int, last: int | None = None) -> ir.Shape | None:
    """The shape of ``v`` with its last dimension (d) replaced by ``last`` (default d-1), or None if unknown."""
    shape = shape_of(v)
    if not shape or shape[-1] != d:
        return None
    return ir.Shape(list(v.shape)[:-1] + [d - 1 if last is None else last])


def _slice_writes(graph: ir.Graph, stream: Stream, d: int, namer: Namer) -> None:
    """Store d-1 coordinates: every write into the stream is sliced before it is added."""
    on_stream = stream.readers_on_stream()
    for w in stream.writes:
        base = w.name
        cut = value(namer, base, "crms", dtype=w.dtype, shape=_narrowed(w, d))
        slice_name = namer(base, "Slice")
        add_node(namer, "Slice", [
            w, constant(namer, base, "starts", np.array([0], np.int64)),
            constant(namer, base, "ends", np.array([d - 1], np.int64)),
            constant(namer, base, "axes", np.array([-1], np.int64))], [cut], base=base, name=slice_name)
        for reader, i in list(w.uses()):
            if id(reader) in on_stream:
                reader.replace_input_with(i, cut)


def _linear_terminals(t: ir.Value, graph: ir.Graph, d: int, path: list) -> list | None:
    """Linear readers of ``t`` (reached through width-preserving ops), or None if any reader is not linear."""
    found = []
    for r in consumers(t):
        if t.is_graph_output():
            return None
        if r.op_type == "MatMul" and r.inputs[0] is t and const_value(r.inputs[1]) is not None \
                and const_value(r.inputs[1]).ndim == 2 or r.op_type == "Gemm" and r.inputs[0] is t and not int(attr(r, "transA", 0)) \
                and const_value(r.inputs[1]) is not None \
                and (len(r.inputs) < 3 or r.inputs[2] is None or const_value(r.inputs[2]) is not None):
            found.append((r, list(path)))
        elif r.op_type == "Reshape" and r.inputs[0] is t:
            shape = const_value(r.inputs[1])
            if shape is None or shape.ndim != 1 or int(shape[-1]) != d or int(attr(r, "allowzero", 0)):
                return None
            sub = _linear_terminals(r.outputs[0], graph, d, path + [r])
            if sub is None:
                return None
            found += sub
        elif r.op_type in ("Gather", "Slice") and r.inputs[0] is t and _keeps_last_axis(r, t):
            sub = _linear_terminals(r.outputs[0], graph, d, path + [r])
            if sub is None:
                return None
            found += sub
        else:
            return None
    return found


def _keeps_last_axis(node: ir.Node, t: ir.Value) -> bool:
    rank = rank_of(t)
    if rank is None:
        return False
    if node.op_type == "Gather":
        return int(attr(node, "axis", 0)) % rank != rank - 1
    axes = const_value(node.inputs[3]) if len(node.inputs) > 3 else None
    return axes is not None and all(int(a) % rank != rank - 1 for a in np.atleast_1d(axes))


def _fold_reader(graph: ir.Graph, node: ir.Node, g: np.ndarray, b: np.ndarray | None, namer: Namer) -> None:
    """``z = [u, -sum(u)] g W + b W + c``: ``W'_j = g_j W_j - g_d W_d``, bias ``+ b W`` (:mod:`..core.linear`)."""
    layer = linear_layer(graph, node, 0)
    layer.scale_inputs(g)
    if b is not None:
        layer.add_to_output(layer.input_shift(b))
    layer.drop_last_input()
    layer.apply(namer)


def _patch_reshape(node: ir.Node, d: int, namer: Namer) -> None:
    shape = np.array(const_value(node.inputs[1]), np.int64)
    shape[-1] = d - 1
    node.replace_input_with(1, constant(namer, node.name or "reshape", "crms_shape", shape))


def _replace_ln(graph: ir.Graph, ln: ir.Node, d: int, namer: Namer, result: PassResult) -> None:
    x, y = ln.inputs[0], ln.outputs[0]
    g = np.asarray(const_value(ln.inputs[1]), np.float64)
    b = const_value(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None else None
    b = None if b is None or not np.any(b != 0) else np.asarray(b, np.float64)
    eps = float(attr(ln, "epsilon", 1e-5))
    dtype = np.asarray(const_value(ln.inputs[1])).dtype
    terminals = _linear_terminals(y, graph, d, [])
    base = ln.name or "ln"
    ones = constant(namer, base, "unit_gain", np.ones(d - 1, dtype))
    if terminals:
        u = value(namer, base, "crmsnorm", dtype=y.dtype, shape=_narrowed(y, d))
        add_node(namer, "CRMSNorm", [x, ones], [u], base=base, name=base, domain=DOMAIN, attrs={"epsilon": eps})
        replace_value(y, u)
        remove_nodes(graph, [ln])
        path = list({id(r): r for _, p in terminals for r in p}.values())  # a node shared by terminals: once
        for r in path:
            if r.op_type == "Reshape":
                _patch_reshape(r, d, namer)
        for node, _ in terminals:
            _fold_reader(graph, node, g, b, namer)
        for r in path:  # Reshape, Gather, Slice on the way now carry d-1 coordinates
            _narrow(r.outputs[0], d)
        result.rewrote(f"LayerNormalization {base} -> CRMSNorm; gain, bias and the dropped coordinate folded into "
                       f"{len(terminals)} linear reader(s)", base)
        return
    u = value(namer, base, "crms", dtype=y.dtype, shape=_narrowed(y, d))
    add_node(namer, "CRMSNorm", [x, ones], [u], base=base, name=base, domain=DOMAIN, attrs={"epsilon": eps})
    s = value(namer, base, "sum", dtype=y.dtype, shape=_narrowed(y, d, 1))
    neg = value(namer, base, "last", dtype=y.dtype, shape=_narrowed(y, d, 1))
    full = value(namer, base, "full", dtype=y.dtype, shape=y.shape)
    scaled = value(namer, base, "scaled", dtype=y.dtype, shape=y.shape) if b is not None else None
    axes = constant(namer, base, "axes", np.array([-1], np.int64))
    add_node(namer, "ReduceSum", [u, axes], [s], base=base, name=namer(base, "ReduceSum"), attrs={"keepdims": 1})
    add_node(namer, "Neg", [s], [neg], base=base, name=namer(base, "Neg"))
    add_node(namer, "Concat", [u, neg], [full], base=base, name=namer(base, "Concat"), attrs={"axis": -1})
    mul_name = namer(base, "gain")
    mul = add_node(namer, "Mul", [full, constant(namer, base, "gain", g.astype(dtype))],
                   [scaled] if scaled is not None else None, base=base, name=mul_name)
    out = mul.outputs[0]
    if b is not None:
        add_name = namer(base, "bias")
        out = add_node(namer, "Add", [scaled, constant(namer, base, "bias", b.astype(dtype))], base=base,
                       name=add_name).outputs[0]
    out.dtype, out.shape = y.dtype, y.shape
    replace_value(y, out)
    remove_nodes(graph, [ln])
    result.rewrote(f"LayerNormalization {base} -> CRMSNorm; a reader is not linear, so the dropped coordinate "
                   "is rebuilt (ReduceSum, Neg, Concat)", base)


def _reads_width(shape_node: ir.Node, rank: int | None) -> bool:
    """Whether a Shape reader of a stream tensor may read its last dimension (which becomes d-1)."""
    if rank is None:
        return True
    end = attr(shape_node, "end")
    if end is not None and int(end) < rank:
        return False  # the last axis is left out
    for r in consumers(shape_node.outputs[0]):
        idx = const_value(r.inputs[1]) if r.op_type == "Gather" and len(r.inputs) > 1 else None
        if idx is None or int(attr(r, "axis", 0)) != 0 or np.any(np.atleast_1d(idx) % rank == rank - 1):
            return True
    return False


def _narrowing_breaks(plan: Plan) -> str | None:
    """Why storing d-1 coordinates would change what some reader of the converted stream computes, if it would."""
    s = plan.stream
    tensors = [a.outputs[0] for a in plan.adds]
    for ln in plan.convert:
        root, path = s.paths[id(ln)]
        tensors.append(root)
        tensors += [n.outputs[0] for n in path]
        for n in path:
            if n.op_type == "Reshape":
                shape = const_value(n.inputs[1])
                if shape is None or shape.ndim != 1 or int(shape[-1]) not in (plan.d, -1, 0) or \
                        int(shape[-1]) == 0 and int(attr(n, "allowzero", 0)):
                    return (f"Reshape {n.name} between the stream and LayerNorm {ln.name} has a target shape that "
                            f"is not a constant ending in d, -1 or 0")
    for t in {id(t): t for t in tensors}.values():
        for r in consumers(t):
            if r.op_type in SHAPE_READERS and (r.op_type == "Size" or _reads_width(r, rank_of(t))):
                return (f"stream tensor {t.name} is read by {r.op_type} {r.name}, which would see the stored width "
                        f"d-1 instead of d")
    return None


def _narrow_paths(stream: Stream, d: int, namer: Namer) -> None:
    """Token selections between the stream and its LNs now carry d-1 coordinates."""
    nodes = {id(n): n for _, path in stream.paths.values() for n in path}
    for n in nodes.values():
        if n.op_type == "Reshape" and int(const_value(n.inputs[1])[-1]) == d:
            _patch_reshape(n, d, namer)
        _narrow(n.outputs[0], d)


def preln_to_crmsnorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Pre-LN residual streams stored with d-1 coordinates; their LayerNorms become CRMSNorm (exact; opt-in)."""
    namer = Namer(graph)

    def convert(stream: Stream, d: int) -> None:
        _slice_writes(graph, stream, d, namer)
        _narrow_paths(stream, d, namer)
        for ln in stream.lns:
            _replace_ln(graph, ln, d, namer, result)
        # the stream's width is now d-1: every Add on it (the states that are writes keep width d; LNs read their Slice)
        for v in {id(a.outputs[0]): a.outputs[0] for a in stream.adds}.values():
            _narrow(v, d)
        result.notes.append(f"residual stream of width {d} stored with {d - 1} coordinates; "
                            f"{len(stream.lns)} LayerNorms became CRMSNorm")

    convert_streams(graph, result, convert, check=_narrowing_breaks, namer=namer)
