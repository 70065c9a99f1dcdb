"""The benchmark floor (DESIGN.md section 6): the same graph with every normalization node
replaced by identity. It computes the wrong thing, but bounds what any normalization
optimization can reach."""
from __future__ import annotations

import onnx

from ..core.norms import kind_of
from ..core.ops import attach_functions


def floor_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every normalization node replaced by Identity on its data input.

    It computes the wrong thing, but bounds what any normalization optimization can reach.
    """
    floor = onnx.ModelProto()
    floor.CopyFrom(model)
    nodes = []
    for n in floor.graph.node:
        if kind_of(n):
            nodes.append(onnx.helper.make_node("Identity", [n.input[0]], [n.output[0]], name=f"{n.name}_identity"))
        else:
            nodes.append(n)
    del floor.graph.node[:]
    floor.graph.node.extend(nodes)
    return attach_functions(floor)
