"""LN-free (approximate, DESIGN.md 3.5): freeze each LayerNorm's std to a calibrated constant.

``LN(x) = g (x - mean(x)) / sqrt(var(x) + eps) + b``. With the per-token
``sqrt(var + eps)`` replaced by ``s``, its mean over the calibration tokens, LN becomes
linear: ``y = (x - mean(x)) k + b`` with ``k = g / s``. Centring is the matrix
``C = I - 1 1^T / d``, so when every reader of ``y`` is a linear layer ``z = y W + c``
(MatMul with a constant right operand or Gemm, directly or through a Reshape that keeps
the last axis), the whole LN folds into it::

    W' = C diag(k) W   (row i of W times k_i, minus the mean of those rows)
    c' = c + b W

and the LN disappears. Otherwise the linearized LN stays as ReduceMean, Sub, Mul, Add.

This is *not* exact: it is right only where a token's std equals the calibrated mean.
It runs only with ``--allow-approx`` and calibration inputs; the pipeline reports the
accuracy change on those inputs and refuses the result above ``--max-error``.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx_ir as ir

from ..core.graph import (
    LARGE_MODEL_BYTES,
    Namer,
    add_node,
    attr,
    const_value,
    constant,
    consumers,
    opset_of,
    rank_of,
    remove_nodes,
    replace_value,
    shape_of,
    to_proto,
    value,
    weight_bytes,
)
from ..core.linear import linear_layer
from ..core.passes import PassContext, PassResult


def _probe(model: ir.Model) -> tuple[ir.Model, list[ir.Node]]:
    """A clone of ``model`` (sharing its weights) that also outputs every LayerNormalization's input."""
    probe = model.clone()
    lns = [n for n in probe.graph if n.op_type == "LayerNormalization"]
    for n in lns:
        x = n.inputs[0]
        if not x.is_graph_output():
            if x.dtype is None:
                x.dtype = ir.DataType.FLOAT
            probe.graph.outputs.append(x)
    return probe, lns


def calibrate_stds(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean over calibration tokens of ``sqrt(var + eps)`` at each last-axis LayerNormalization input."""
    import onnxruntime as ort

    probe, lns = _probe(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="normdeploy-calib-") as tmp:
        if weight_bytes(probe) <= LARGE_MODEL_BYTES:
            source = to_proto(probe).SerializeToString()
        else:  # too large for one protobuf (and no second copy of the weights in memory)
            source = os.path.join(tmp, "probe.onnx")
            ir.save(probe, source, external_data="probe.onnx.data")
        sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        sums: dict[str, list] = {n.name: [0.0, 0] for n in lns}
        for feed in feeds:
            values = dict(zip(names, sess.run(None, feed)))
            for n in lns:
                eps = attr(n, "epsilon", 1e-5)
                x = np.asarray(values[n.inputs[0].name], np.float64)
                std = np.sqrt(x.var(axis=-1) + eps)
                sums[n.name][0] += float(std.sum())
                sums[n.name][1] += std.size
        del sess
    return {k: s / c for k, (s, c) in sums.items() if c}


def calibrate_layernorm_std(model: ir.Model, ctx: PassContext) -> None:
    """The model step before :func:`ln_free`: measure every LayerNorm's std on ``ctx.calib_feeds``."""
    ctx.ln_stds = calibrate_stds(model, ctx.calib_feeds)


def _linear_readers(y: ir.Value, graph: ir.Graph):
    """Every (node, via) that reads ``y`` linearly; None if any reader is not linear."""
    found = []
    for r in consumers(y):
        out_shape, y_shape = (shape_of(r.outputs[0]) if r.outputs else None), shape_of(y)
        if r.op_type == "Reshape" and out_shape and y_shape and out_shape[-1] == y_shape[-1] \
                and isinstance(y_shape[-1], int) and not r.outputs[0].is_graph_output():
            sub = _linear_readers(r.outputs[0], graph)
            if sub is None:
                return None
            found += sub
        elif r.op_type == "MatMul" and r.inputs[0] is y and const_value(r.inputs[1]) is not None \
                and const_value(r.inputs[1]).ndim == 2 or r.op_type == "Gemm" and r.inputs[0] is y and not int(attr(r, "transA", 0)) \
                and const_value(r.inputs[1]) is not None \
                and (len(r.inputs) < 3 or r.inputs[2] is None or const_value(r.inputs[2]) is not None):
            found.append(r)
        else:
            return None
    return found


def _fold_into(graph: ir.Graph, node: ir.Node, k: np.ndarray, b: np.ndarray, namer: Namer) -> None:
    """Fold ``y = C x k + b`` into linear ``node``: ``W' = C diag(k) W``, bias ``+ b W`` (:mod:`..core.linear`)."""
    layer = linear_layer(graph, node, 0)
    layer.scale_inputs(k)
    layer.centre_inputs()
    layer.add_to_output(layer.input_shift(b))
    layer.apply(namer)


def ln_free(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Freeze LayerNorm's std to its calibrated mean; fold the now-linear LN into linear readers (approximate)."""
    stds = ctx.ln_stds
    if stds is None:
        result.notes.append("no calibration data: ln_free needs --calib")
        return
    namer = Namer(graph)
    for ln in [n for n in graph if n.op_type == "LayerNormalization"]:
        result.matched += 1
        x, y = ln.inputs[0], ln.outputs[0]
        axis = int(attr(ln, "axis", -1))
        if axis != -1 and not (rank_of(x) is not None and axis == rank_of(x) - 1):
            result.skip(ln.name, "LayerNorm over more than the last axis")
            continue
        g = const_value(ln.inputs[1])
        b = const_value(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None else np.zeros_like(g)
        if g is None or b is None:
            result.skip(ln.name, "LayerNorm scale or bias is not a constant")
            continue
        if ln.name not in stds:
            result.skip(ln.name, "no calibrated std for this LayerNorm")
            continue
        k = np.asarray(g, np.float64) / stds[ln.name]
        b64 = np.asarray(b, np.float64)
        readers = None if y.is_graph_output() else _linear_readers(y, graph)
        if readers:
            for r in readers:
                _fold_into(graph, r, k, b64, namer)
            replace_value(y, x)  # every reader (and Reshape chain) reads the LN's input
            remove_nodes(graph, [ln])
            result.rewrote(f"LayerNormalization {ln.name} (std frozen to {stds[ln.name]:.4g}) folded into "
                           f"{len(readers)} linear reader(s)", ln.name)
        elif (opset_of(graph) or 0) >= 18:
            base = ln.name or "ln"
            dtype = np.asarray(g).dtype
            mean = value(namer, base, "mean", dtype=x.dtype)
            cen = value(namer, base, "centred", dtype=x.dtype)
            sc = value(namer, base, "scaled", dtype=x.dtype)
            axes = constant(namer, base, "axes", np.array([-1], np.int64))
            add_node(namer, "ReduceMean", [x, axes], [mean], base=base, name=namer(base, "ReduceMean"),
                     attrs={"keepdims": 1})
            add_node(namer, "Sub", [x, mean], [cen], base=base, name=namer(base, "Sub"))
            mul_name = namer(base, "Mul")
            add_node(namer, "Mul", [cen, constant(namer, base, "k", k.astype(dtype))], [sc], base=base, name=mul_name)
            add_name = namer(base, "Add")
            out = add_node(namer, "Add", [sc, constant(namer, base, "b", b64.astype(dtype))], base=base,
                           name=add_name).outputs[0]
            out.dtype, out.shape = y.dtype, y.shape
            replace_value(y, out)
            remove_nodes(graph, [ln])
            result.rewrote(f"LayerNormalization {ln.name} (std frozen to {stds[ln.name]:.4g}) linearized; "
                           "a reader is not linear, so it stays as ReduceMean/Sub/Mul/Add", ln.name)
        else:
            result.skip(ln.name, "a reader is not linear and the opset is below 18")
