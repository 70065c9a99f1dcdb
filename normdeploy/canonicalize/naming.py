"""Name each normalization node after the torch module that emitted it (a canonicalize step).

The export stage names every node ``<module path>/<exporter name>``
(:func:`normdeploy.export._name_norms_after_modules`); a normalization that a recognizer
assembled from decomposed ops takes its first node's name, and this step gives it its
module's name back when that name is free. Names only: the model computes the same.
"""
from __future__ import annotations

import onnx_ir as ir

from ..core.norms import kind_of
from ..core.passes import PassContext


def name_norms_after_modules(model: ir.Model, ctx: PassContext) -> None:
    name_norms_by_module(model)


def name_norms_by_module(model: ir.Model) -> ir.Model:
    """Give each normalization node named ``<module>/<...>`` its module's name, when that is free."""
    used = {n.name for n in model.graph}
    for n in model.graph:
        if kind_of(n) and n.name and "/" in n.name:
            path = n.name.split("/", 1)[0]
            if path not in used:
                used.add(path)
                n.name = path
    return model
