"""TEMPORARY (removed when the port to onnx-ir is complete): the onnx-graphsurgeon helpers of the passes not yet ported.

Rules they encode: constants are never edited in place (a folded weight is a new
constant, so a weight shared with another node is in effect cloned); names of new
tensors are derived deterministically from existing names, so the same input gives a
byte-identical output.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` as a model carrying ``like``'s IR version, opsets and metadata."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    from .ops import attach_functions  # local import: ops does not depend on graph

    keep = [f for f in like.functions]
    del model.functions[:]
    model.functions.extend(keep)
    return attach_functions(model)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort; passes handle unknown ranks
        return model


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of ``t`` if it is a constant (initializer or Constant node output), else None."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        if "value" in attrs:
            v = attrs["value"]
            return np.asarray(v.values if isinstance(v, gs.Constant) else v)
        for key in ("value_float", "value_int"):
            if key in attrs:
                return np.asarray(attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in attrs:
                return np.asarray(list(attrs[key]))
    return None


class Namer:
    """Deterministic fresh names: ``<base>_<suffix>`` then ``<base>_<suffix>_1`` ..."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str, suffix: str) -> str:
        name, i = f"{base}_{suffix}", 0
        while name in self.used:
            i += 1
            name = f"{base}_{suffix}_{i}"
        self.used.add(name)
        return name


def constant(namer: Namer, base: str, suffix: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(namer(base, suffix), np.ascontiguousarray(value))


def is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(o is t for o in graph.outputs)


def rank_of(t: gs.Tensor) -> int | None:
    shape = getattr(t, "shape", None)
    return None if shape is None else len(shape)


def channel_vector(value: np.ndarray, channels: int | None = None) -> np.ndarray | None:
    """``value`` as a 1-D per-channel vector if it broadcasts as one (scalar or [C]), else None."""
    v = np.asarray(value)
    if v.ndim == 0:
        return np.full(channels, v) if channels else v.reshape(1)
    if v.ndim == 1:
        return v
    return None


def rewire_output(node: gs.Node, producer: gs.Node) -> None:
    """Make ``producer`` write ``node``'s output tensor and detach ``node`` from the graph.

    The output tensor object (so its name, and its graph-output status) is kept; the
    producer's former output and ``node`` are left dangling for ``cleanup()``.
    """
    out = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    producer.outputs.clear()
    producer.outputs.append(out)
