"""Small helpers over onnx-ir graphs shared by every pass.

Every stage edits one in-memory :class:`onnx_ir.Model`: its initializers may be
memory-mapped external data (``onnx_ir.load``) or the tensors of a torch module
(``torch.onnx.export``), and they are never copied unless a rewrite computes a new value.

Rules these helpers encode: constants are never edited in place (a folded weight is a new
initializer, so a weight shared with another node is in effect cloned); names of new values
and nodes are derived deterministically from existing names, so the same input gives a
byte-identical output; a graph output keeps its name when a rewrite replaces the node that
computes it (:func:`replace_value`).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")
logger = logging.getLogger(__name__)


def opset_of(graph: ir.Graph, domain: str = "") -> int | None:
    """The graph's opset of ``domain`` (default: the ONNX domain), or None when it imports none."""
    for d in ((domain,) if domain else DEFAULT_DOMAINS):
        if d in graph.opset_imports:
            return graph.opset_imports[d]
    return None


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    """``node`` is one of ``op_types`` of the default ONNX domain."""
    return node is not None and node.op_type in op_types and node.domain in DEFAULT_DOMAINS


def attr(node: ir.Node, name: str, default=None):
    """The Python value of attribute ``name`` of ``node`` (ints, floats, strs and their lists), or ``default``.

    A float attribute is read as the float32 a file stores: an exporter may hold ``1e-5`` as a
    Python float in memory, and a fold must compute with what ONNX Runtime will read.
    """
    a = node.attributes.get(name)
    if a is None:
        return default
    v = a.value
    if a.type == ir.AttributeType.FLOAT:
        return float(np.float32(v))
    if a.type == ir.AttributeType.FLOATS:
        return [float(np.float32(x)) for x in v]
    return list(v) if isinstance(v, tuple) else v


def const_value(v: ir.Value | None) -> np.ndarray | None:
    """The value of ``v`` if it is a constant (initializer or Constant node output), else None."""
    if v is None:
        return None
    try:
        t = ir.convenience.get_const_tensor(v)
    except ValueError:  # a malformed Constant node
        return None
    return None if t is None else np.asarray(t.numpy())


def consumers(v: ir.Value) -> list[ir.Node]:
    """The nodes that read ``v``, each once, in the order of their first use."""
    return list(dict.fromkeys(node for node, _ in v.uses()))


def is_graph_output(v: ir.Value) -> bool:
    return v.is_graph_output()


def shape_of(v: ir.Value | None) -> list | None:
    """``v``'s shape as a list of ints (static), strs (named) or None (unknown); None when the rank is unknown."""
    if v is None or v.shape is None:
        return None
    out = []
    for d in v.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(getattr(d, "value", None))
    return out


def rank_of(v: ir.Value | None) -> int | None:
    return None if v is None or v.shape is None else len(v.shape)


def dtype_of(v: ir.Value | None):
    """``v``'s element type as a numpy dtype (``ml_dtypes.bfloat16`` for bf16), or None."""
    if v is None or v.dtype is None:
        return None
    try:
        return np.dtype(v.dtype.numpy())
    except (TypeError, ValueError):
        return None


def ir_dtype(dtype) -> ir.DataType:
    """The onnx-ir element type of a numpy dtype (or of ``"bfloat16"``)."""
    if str(dtype) == "bfloat16":
        return ir.DataType.BFLOAT16
    return ir.DataType.from_numpy(np.dtype(dtype))


class Namer:
    """Deterministic fresh names for values and nodes: ``<base>_<suffix>`` then ``<base>_<suffix>_1`` ..."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.used = set()
        for node in graph.all_nodes():
            if node.name:
                self.used.add(node.name)
            self.used.update(o.name for o in node.outputs if o.name)
        self.used.update(v.name for v in graph.inputs if v.name)
        self.used.update(graph.initializers)

    def __call__(self, base: str, suffix: str) -> str:
        name, i = f"{base}_{suffix}", 0
        while name in self.used:
            i += 1
            name = f"{base}_{suffix}_{i}"
        self.used.add(name)
        return name


def constant(namer: Namer, base: str, suffix: str, value: np.ndarray) -> ir.Value:
    """A new initializer of ``namer``'s graph holding ``value`` (never an edit of an existing one); spilled to
    the run's tensor store when large and one is active (:mod:`normdeploy.core.store`)."""
    from .store import tensor

    name = namer(base, suffix)
    arr = np.ascontiguousarray(value)
    v = ir.Value(name=name, const_value=tensor(arr, name), shape=ir.Shape(arr.shape),
                 type=ir.TensorType(ir_dtype(arr.dtype)))
    namer.graph.register_initializer(v)
    return v


def value(namer: Namer, base: str, suffix: str, dtype=None, shape=None) -> ir.Value:
    """A fresh, unattached value to be a new node's output."""
    v = ir.Value(name=namer(base, suffix))
    if dtype is not None:
        v.dtype = dtype if isinstance(dtype, ir.DataType) else ir_dtype(dtype)
    if shape is not None:
        v.shape = shape if isinstance(shape, ir.Shape) else ir.Shape(shape)
    return v


def add_node(namer: Namer, op_type: str, inputs: list, outputs: list[ir.Value] | None = None, *, base: str,
             suffix: str | None = None, name: str | None = None, domain: str = "", attrs: dict | None = None,
             before: ir.Node | None = None) -> ir.Node:
    """Append (or insert before ``before``) a node; ``outputs`` default to one fresh value named after the node."""
    node_name = name if name is not None else namer(base, suffix or op_type)
    if outputs is None:
        outputs = [ir.Value(name=namer(base, (suffix or op_type).lower()))]
    node = ir.node(op_type, inputs=list(inputs), attributes=attrs or {}, domain=domain, name=node_name,
                   outputs=outputs)
    if before is not None:
        namer.graph.insert_before(before, node)
    else:
        namer.graph.append(node)
    return node


def set_input(node: ir.Node, i: int, v: ir.Value | None) -> None:
    """``node.inputs[i] = v``, growing the input list with empty slots if needed."""
    if len(node.inputs) <= i:
        node.resize_inputs(i + 1)
    node.replace_input_with(i, v)


def replace_value(old: ir.Value, new: ir.Value, except_node: ir.Node | None = None) -> None:
    """Every reader of ``old`` (but ``except_node``) reads ``new``, and ``new`` takes ``old``'s name and, where
    ``old`` is a graph output, its place among the outputs.

    So a rewrite keeps the names of the tensors it recomputes, as an edit in place would. A
    graph input or an initializer keeps its own name; where one of those replaces a graph
    output, an Identity carries the output's name.

    ``new`` computes ``old``'s values, so where the node output that takes ``old``'s place has
    no type or no shape it takes ``old``'s: a graph output keeps the shape it declared (a
    rewrite that routes it to a tensor shape inference could not reach, such as a Conv behind
    a function node, must not leave it without one: ``onnx.checker`` requires a shape on
    every graph output).
    """
    if old is new:
        return
    graph = old.graph
    own_name = new.is_graph_input() or new.is_initializer() or new.is_graph_output() or new.producer() is None
    if old.is_graph_output() and own_name:
        ident = ir.node("Identity", [new], name=f"{old.name}_output")
        graph.append(ident)
        new, own_name = ident.outputs[0], False
    if not own_name:
        if new.type is None and old.type is not None:
            new.type = ir.TensorType(old.type.dtype) if isinstance(old.type, ir.TensorType) else old.type
        if new.shape is None and old.shape is not None:
            new.shape = old.shape.copy()
        name, other = old.name, new.name
        old.name = None
        new.name = name
        old.name = other
    if old.is_graph_output():
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
    for node, index in list(old.uses()):
        if node is not except_node:
            node.replace_input_with(index, new)


def remove_nodes(graph: ir.Graph, nodes) -> None:
    """Remove nodes whose outputs nobody reads any more (their inputs are released)."""
    nodes = [n for n in dict.fromkeys(nodes) if n.graph is graph]
    for n in nodes:  # Graph.remove(safe=False) leaves the node a user of its inputs
        for i in range(len(n.inputs)):
            n.replace_input_with(i, None)
    if nodes:
        graph.remove(nodes, safe=False)


def cleanup(model: ir.Model) -> None:
    """Drop nodes and initializers nothing reads, and sort the graph topologically."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    model.graph.sort()


def infer_shapes(model: ir.Model) -> str | None:
    """Re-infer shapes and types in place (large initializers are left out of the call); the reason on failure."""
    import onnx
    from onnx_ir.passes.common import _c_api_utils

    def infer(proto):
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

    try:
        inferred = _c_api_utils.call_onnx_api(infer, model)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; the caller reports it
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return f"shape inference failed ({type(e).__name__}: {first})"
    _merge_shapes(model, inferred)
    return None


def _merge_shapes(model: ir.Model, inferred) -> None:
    """Copy the inferred shapes and types onto the values of ``model`` (by name, main graph and subgraphs)."""
    inferred_model = ir.serde.deserialize_model(inferred)
    for graph, other in zip(model.graphs(), inferred_model.graphs()):
        theirs = ir.convenience.create_value_mapping(other)
        for name, v in ir.convenience.create_value_mapping(graph).items():
            w = theirs.get(name)
            if w is None or v.const_value is not None:
                continue
            if w.shape is not None and v.shape != w.shape:
                v.shape = w.shape
            if w.dtype is not None and v.dtype != w.dtype:
                v.type = w.type  # not v.dtype = ...: a clone's values share their type objects with the original's


def channel_vector(value: np.ndarray, channels: int | None = None) -> np.ndarray | None:
    """``value`` as a 1-D per-channel vector if it broadcasts as one (scalar or [C]), else None."""
    v = np.asarray(value)
    if v.ndim == 0:
        return np.full(channels, v) if channels else v.reshape(1)
    if v.ndim == 1:
        return v
    return None


#: a model with more initializer bytes than this is "large": some reports that run every tensor on CPU
#: skip it (the fp16 error report), and its proto forms (``.optimized``) are not built implicitly
LARGE_MODEL_BYTES = 1 << 30
#: a model with more initializer bytes than this is written with its weights in ``<file>.data``
#: (:func:`save_model`): streamed file to file, never all in memory
EXTERNAL_DATA_BYTES = 256 << 20


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the initializers of an ``onnx_ir.Model`` (without reading external data)."""
    return sum(int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model, path: str, external_above: int | None = None) -> None:
    """Write an ``onnx_ir.Model`` (or ``onnx.ModelProto``) to ``path``, self-contained.

    Past ``external_above`` bytes of weights (default :data:`EXTERNAL_DATA_BYTES`) every
    initializer goes to ``<name>.data`` beside it, streamed tensor by tensor (memory-mapped
    weights are copied file to file), so models past the 2 GB protobuf limit are written too.
    Below it, one file: weights that live in external files (the input's own external data,
    a run's spilled tensors) are read into the file, never referenced from where they are.
    """
    import os

    import onnx

    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    limit = EXTERNAL_DATA_BYTES if external_above is None else external_above
    if weight_bytes(model) > limit:
        ir.save(model, path, external_data=os.path.basename(path) + ".data")
    else:
        ir.save(_in_memory(model), path)


def _in_memory(model: ir.Model) -> ir.Model:
    """``model``, or a clone whose external tensors are in-memory tensors over the same bytes.

    (onnx_ir's ``external_data.load_to_model`` would close the memory maps the original shares.)
    """
    if not any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        return model
    model = model.clone()
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            v.const_value = ir.Tensor(t.numpy(), name=t.name)
    return model


def to_proto(model):
    """``model`` as an ``onnx.ModelProto`` that holds its weights (external data read in), for models under
    2 GB; a ModelProto passes through. Large models go to files instead (:func:`save_model`)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    return ir.to_proto(_in_memory(model))


def signature(model):
    """An ``onnx.ModelProto`` holding only ``model``'s graph inputs and outputs (names, types, shapes):
    what a server configuration or an optimization profile reads, without the weights (a ModelProto
    passes through)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    stub = ir.Model(ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports=dict(model.opset_imports)),
                    ir_version=model.ir_version)
    proto = ir.to_proto(stub)
    proto.graph.input.extend(ir.serde.serialize_value(v) for v in model.graph.inputs
                             if v.name not in model.graph.initializers)
    proto.graph.output.extend(ir.serde.serialize_value(v) for v in model.graph.outputs)
    return onnx.ModelProto.FromString(proto.SerializeToString())
