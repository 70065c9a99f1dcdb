"""The benchmark floor (DESIGN.md section 6): the same graph with every normalization node
replaced by identity. It computes the wrong thing, but bounds what any normalization
optimization can reach."""
from __future__ import annotations

import onnx
import onnx_ir as ir

from ..core.graph import cleanup, replace_value
from ..core.norms import kind_of
from ..core.ops import attach_functions


def floor_model(model):
    """The graph with every normalization node replaced by Identity on its data input.

    ``model`` is an ``onnx_ir.Model`` (the floor is a clone sharing its weights) or an
    ``onnx.ModelProto`` (the floor is a copy). On ort-* targets ``pipeline.transform`` then gives
    it the same graph clean-up as the optimized model (``pipeline.FLOOR_STEPS``): a floor left
    uncleaned could be slower than the cleaned optimized model, and the share of normalization
    cost left would go negative.
    """
    if isinstance(model, onnx.ModelProto):
        return ir.to_proto(floor_model(ir.from_proto(model)))
    floor = model.clone()
    graph = floor.graph
    for n in list(graph):
        if not kind_of(n):
            continue
        ident = ir.node("Identity", [n.inputs[0]], name=f"{n.name}_identity")
        graph.insert_before(n, ident)
        replace_value(n.outputs[0], ident.outputs[0])
    cleanup(floor)
    return attach_functions(floor)
