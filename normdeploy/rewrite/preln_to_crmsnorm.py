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
The conditions on the stream are those of Pre-RMSNorm; the stream is refused with the same
reasons.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..core.graph_gs import Namer, const_value, constant, is_graph_output
from ..core.linear_gs import linear_layer
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult
from .preln_to_rmsnorm import Stream, convert_streams


def _slice_writes(graph: gs.Graph, stream: Stream, d: int, namer: Namer) -> None:
    """Store d-1 coordinates: every write into the stream is sliced before it is added."""
    on_stream = {id(n) for n in stream.adds} | {id(n) for n in stream.lns}
    for w in stream.writes:
        base = w.name
        cut = gs.Variable(namer(base, "crms"), dtype=w.dtype)
        graph.nodes.append(gs.Node("Slice", namer(base, "Slice"), inputs=[
            w, constant(namer, base, "starts", np.array([0], np.int64)),
            constant(namer, base, "ends", np.array([d - 1], np.int64)),
            constant(namer, base, "axes", np.array([-1], np.int64))], outputs=[cut]))
        for reader in list(w.outputs):
            if id(reader) in on_stream:
                for i, x in enumerate(reader.inputs):
                    if x is w:
                        reader.inputs[i] = cut


def _linear_terminals(t: gs.Variable, graph: gs.Graph, d: int, path: list) -> list | None:
    """Linear readers of ``t`` (reached through width-preserving ops), or None if any reader is not linear."""
    found = []
    for r in t.outputs:
        if is_graph_output(graph, t):
            return None
        if r.op == "MatMul" and r.inputs[0] is t and const_value(r.inputs[1]) is not None \
                and const_value(r.inputs[1]).ndim == 2:
            found.append((r, list(path)))
        elif r.op == "Gemm" and r.inputs[0] is t and not int(r.attrs.get("transA", 0)) \
                and const_value(r.inputs[1]) is not None \
                and (len(r.inputs) < 3 or const_value(r.inputs[2]) is not None):
            found.append((r, list(path)))
        elif r.op == "Reshape" and r.inputs[0] is t:
            shape = const_value(r.inputs[1])
            if shape is None or shape.ndim != 1 or int(shape[-1]) != d or int(r.attrs.get("allowzero", 0)):
                return None
            sub = _linear_terminals(r.outputs[0], graph, d, path + [r])
            if sub is None:
                return None
            found += sub
        elif r.op in ("Gather", "Slice") and r.inputs[0] is t and _keeps_last_axis(r, t):
            sub = _linear_terminals(r.outputs[0], graph, d, path + [r])
            if sub is None:
                return None
            found += sub
        else:
            return None
    return found


def _keeps_last_axis(node: gs.Node, t: gs.Variable) -> bool:
    rank = len(t.shape) if t.shape is not None else None
    if rank is None:
        return False
    if node.op == "Gather":
        return int(node.attrs.get("axis", 0)) % rank != rank - 1
    axes = const_value(node.inputs[3]) if len(node.inputs) > 3 else None
    return axes is not None and all(int(a) % rank != rank - 1 for a in np.atleast_1d(axes))


def _fold_reader(graph: gs.Graph, node: gs.Node, g: np.ndarray, b: np.ndarray | None, namer: Namer) -> None:
    """``z = [u, -sum(u)] g W + b W + c``: ``W'_j = g_j W_j - g_d W_d``, bias ``+ b W`` (:mod:`..core.linear`)."""
    layer = linear_layer(graph, node, 0)
    layer.scale_inputs(g)
    if b is not None:
        layer.add_to_output(layer.input_shift(b))
    layer.drop_last_input()
    layer.apply(namer)


def _patch_reshape(node: gs.Node, d: int, namer: Namer) -> None:
    shape = np.array(const_value(node.inputs[1]), np.int64)
    shape[-1] = d - 1
    node.inputs[1] = constant(namer, node.name or "reshape", "crms_shape", shape)


def _replace_ln(graph: gs.Graph, ln: gs.Node, d: int, namer: Namer, result: PassResult) -> None:
    x, y = ln.inputs[0], ln.outputs[0]
    g = np.asarray(const_value(ln.inputs[1]), np.float64)
    b = const_value(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None else None
    b = None if b is None or not np.any(b != 0) else np.asarray(b, np.float64)
    eps = float(ln.attrs.get("epsilon", 1e-5))
    dtype = np.asarray(const_value(ln.inputs[1])).dtype
    terminals = _linear_terminals(y, graph, d, [])
    ln.inputs.clear()
    ln.outputs.clear()
    base = ln.name or "ln"
    ones = constant(namer, base, "unit_gain", np.ones(d - 1, dtype))
    if terminals:
        graph.nodes.append(gs.Node("CRMSNorm", base, {"epsilon": eps}, [x, ones], [y], domain=DOMAIN))
        for node, path in terminals:
            for r in path:
                if r.op == "Reshape":
                    _patch_reshape(r, d, namer)
            _fold_reader(graph, node, g, b, namer)
        result.rewrote(f"LayerNormalization {base} -> CRMSNorm; gain, bias and the dropped coordinate folded into "
                       f"{len(terminals)} linear reader(s)", base)
        return
    u = gs.Variable(namer(base, "crms"), dtype=y.dtype)
    graph.nodes.append(gs.Node("CRMSNorm", base, {"epsilon": eps}, [x, ones], [u], domain=DOMAIN))
    s = gs.Variable(namer(base, "sum"), dtype=y.dtype)
    neg = gs.Variable(namer(base, "last"), dtype=y.dtype)
    full = gs.Variable(namer(base, "full"), dtype=y.dtype)
    scaled = gs.Variable(namer(base, "scaled"), dtype=y.dtype) if b is not None else y
    graph.nodes += [
        gs.Node("ReduceSum", namer(base, "ReduceSum"), {"keepdims": 1},
                [u, constant(namer, base, "axes", np.array([-1], np.int64))], [s]),
        gs.Node("Neg", namer(base, "Neg"), inputs=[s], outputs=[neg]),
        gs.Node("Concat", namer(base, "Concat"), {"axis": -1}, [u, neg], [full]),
        gs.Node("Mul", namer(base, "gain"), inputs=[full, constant(namer, base, "gain", g.astype(dtype))], outputs=[scaled]),
    ]
    if b is not None:
        graph.nodes.append(gs.Node("Add", namer(base, "bias"), inputs=[scaled, constant(namer, base, "bias", b.astype(dtype))],
                                   outputs=[y]))
    result.rewrote(f"LayerNormalization {base} -> CRMSNorm; a reader is not linear, so the dropped coordinate "
                   "is rebuilt (ReduceSum, Neg, Concat)", base)


def preln_to_crmsnorm(graph: gs.Graph, ctx: PassContext, result: PassResult) -> None:
    """Pre-LN residual streams stored with d-1 coordinates; their LayerNorms become CRMSNorm (exact; opt-in)."""
    namer = Namer(graph)

    def convert(stream: Stream, d: int) -> None:
        _slice_writes(graph, stream, d, namer)
        for ln in stream.lns:
            _replace_ln(graph, ln, d, namer, result)
        result.notes.append(f"residual stream of width {d} stored with {d - 1} coordinates; "
                            f"{len(stream.lns)} LayerNorms became CRMSNorm")

    convert_streams(graph, result, convert)
    if result.rewrites:
        for t in graph.tensors().values():  # widths changed: let shape inference recompute them
            if isinstance(t, gs.Variable) and not is_graph_output(graph, t) and t not in graph.inputs:
                t.shape = None
