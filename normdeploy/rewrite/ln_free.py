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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..core.graph_gs import Namer, const_value, constant, is_graph_output
from ..core.linear_gs import linear_layer
from ..core.passes import PassContext, PassResult


def calibrate_stds(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean over calibration tokens of ``sqrt(var + eps)`` at each last-axis LayerNormalization input."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    lns = [n for n in probe.graph.node if n.op_type == "LayerNormalization"]
    known = {o.name for o in probe.graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in list(probe.graph.value_info) + list(probe.graph.input)}
    for n in lns:
        if n.input[0] not in known:
            elem = types.get(n.input[0]) or onnx.TensorProto.FLOAT
            probe.graph.output.append(onnx.helper.make_tensor_value_info(n.input[0], elem, None))
            known.add(n.input[0])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    sums: dict[str, list] = {n.name: [0.0, 0] for n in lns}
    for feed in feeds:
        values = dict(zip(names, sess.run(None, feed)))
        for n in lns:
            eps = next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "epsilon"), 1e-5)
            x = np.asarray(values[n.input[0]], np.float64)
            std = np.sqrt(x.var(axis=-1) + eps)
            sums[n.name][0] += float(std.sum())
            sums[n.name][1] += std.size
    return {k: s / c for k, (s, c) in sums.items() if c}


def calibrate_layernorm_std(model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, None]:
    """The model step before :func:`ln_free`: measure every LayerNorm's std on ``ctx.calib_feeds``."""
    ctx.ln_stds = calibrate_stds(model, ctx.calib_feeds)
    return model, None


def _linear_readers(y: gs.Variable, graph: gs.Graph):
    """Every (node, via) that reads ``y`` linearly; None if any reader is not linear."""
    found = []
    for r in y.outputs:
        if r.op == "Reshape" and r.outputs[0].shape and y.shape and r.outputs[0].shape[-1] == y.shape[-1] \
                and isinstance(y.shape[-1], int) and not is_graph_output(graph, r.outputs[0]):
            sub = _linear_readers(r.outputs[0], graph)
            if sub is None:
                return None
            found += sub
        elif r.op == "MatMul" and r.inputs[0] is y and const_value(r.inputs[1]) is not None \
                and const_value(r.inputs[1]).ndim == 2:
            found.append(r)
        elif r.op == "Gemm" and r.inputs[0] is y and not int(r.attrs.get("transA", 0)) \
                and const_value(r.inputs[1]) is not None \
                and (len(r.inputs) < 3 or const_value(r.inputs[2]) is not None):
            found.append(r)
        else:
            return None
    return found


def _fold_into(graph: gs.Graph, node: gs.Node, k: np.ndarray, b: np.ndarray, namer: Namer) -> None:
    """Fold ``y = C x k + b`` into linear ``node``: ``W' = C diag(k) W``, bias ``+ b W`` (:mod:`..core.linear`)."""
    layer = linear_layer(graph, node, 0)
    layer.scale_inputs(k)
    layer.centre_inputs()
    layer.add_to_output(layer.input_shift(b))
    layer.apply(namer)


def ln_free(graph: gs.Graph, ctx: PassContext, result: PassResult) -> None:
    """Freeze LayerNorm's std to its calibrated mean; fold the now-linear LN into linear readers (approximate)."""
    stds = ctx.ln_stds
    if stds is None:
        result.notes.append("no calibration data: ln_free needs --calib")
        return
    namer = Namer(graph)
    for ln in [n for n in graph.nodes if n.op == "LayerNormalization"]:
        result.matched += 1
        x, y = ln.inputs[0], ln.outputs[0]
        axis = int(ln.attrs.get("axis", -1))
        if axis != -1 and not (x.shape is not None and axis == len(x.shape) - 1):
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
        readers = None if is_graph_output(graph, y) else _linear_readers(y, graph)
        if readers:
            for r in readers:
                _fold_into(graph, r, k, b64, namer)
            for r in y.outputs:  # rewire every reader (and Reshape chains) to the LN's input
                for i, t in enumerate(r.inputs):
                    if t is y:
                        r.inputs[i] = x
            ln.outputs.clear()
            ln.inputs.clear()
            result.rewrote(f"LayerNormalization {ln.name} (std frozen to {stds[ln.name]:.4g}) folded into "
                           f"{len(readers)} linear reader(s)", ln.name)
        elif graph.opset >= 18:
            base = ln.name or "ln"
            dtype = np.asarray(g).dtype
            mean = gs.Variable(namer(base, "mean"), dtype=x.dtype)
            cen = gs.Variable(namer(base, "centred"), dtype=x.dtype)
            sc = gs.Variable(namer(base, "scaled"), dtype=x.dtype)
            axes = constant(namer, base, "axes", np.array([-1], np.int64))
            graph.nodes += [gs.Node("ReduceMean", namer(base, "ReduceMean"), {"keepdims": 1}, [x, axes], [mean]),
                            gs.Node("Sub", namer(base, "Sub"), inputs=[x, mean], outputs=[cen]),
                            gs.Node("Mul", namer(base, "Mul"), inputs=[cen, constant(namer, base, "k", k.astype(dtype))], outputs=[sc]),
                            gs.Node("Add", namer(base, "Add"), inputs=[sc, constant(namer, base, "b", b64.astype(dtype))], outputs=[y])]
            ln.outputs.clear()
            ln.inputs.clear()
            result.rewrote(f"LayerNormalization {ln.name} (std frozen to {stds[ln.name]:.4g}) linearized; "
                           "a reader is not linear, so it stays as ReduceMean/Sub/Mul/Add", ln.name)
        else:
            result.skip(ln.name, "a reader is not linear and the opset is below 18")
