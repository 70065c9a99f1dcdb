"""Name each normalization node after the torch module that emitted it (a canonicalize step).

The exporters put the module path into node names, in two spellings:

* dynamo: the export stage names every node ``<module path>/<exporter name>``
  (:func:`normdeploy.export._name_norms_after_modules`): ``blocks.0.norm1/node_ReduceMean_3``;
* TorchScript: the exporter itself names nodes ``/<attr>/<attr>/.../<op>_<i>``:
  ``/encoder/block.0/layer.0/layer_norm/Pow`` is module ``encoder.block.0.layer.0.layer_norm``.

A normalization that a recognizer assembled from decomposed ops takes its first node's name,
and this step gives it its module's name back (:func:`module_path`) when that name is free.
A node of the root module (``/Pow``, ``node_Add_1``) has no module path and keeps its name.
A normalization node with no name at all (an ONNX file written without node names) gets
``<op type>_<i>``, so that every later pass and the report can name it. Names only: the
model computes the same. A report follows a recognizer's record (made under the old name)
to the node with :func:`module_path`.
"""
from __future__ import annotations

import onnx_ir as ir

from ..core.norms import kind_of
from ..core.passes import PassContext


def module_path(name: str | None) -> str | None:
    """The torch module path in an exported node's name, or None when the name carries none.

    ``blocks.0.norm1/node_Mul_2`` -> ``blocks.0.norm1``; ``/encoder/block.0/layer_norm/Pow`` ->
    ``encoder.block.0.layer_norm``; ``/Pow``, ``node_Add``, ``""`` and None -> None.
    """
    if not name or "/" not in name:
        return None
    if name.startswith("/"):  # TorchScript: one segment per module attribute, the op last
        path = ".".join(p for p in name[1:].split("/")[:-1] if p)
    else:  # dynamo, as the export stage writes it
        path = name.split("/", 1)[0]
    return path or None


def name_norms_after_modules(model: ir.Model, ctx: PassContext) -> None:
    name_norms_by_module(model)


def name_norms_by_module(model: ir.Model) -> list[tuple[str, str]]:
    """Rename each normalization node after its module (or give an unnamed one a name); returns ``(old, new)``s."""
    used = {n.name for n in model.graph if n.name}
    renames = []
    for i, n in enumerate(model.graph):
        if not kind_of(n):
            continue
        path = module_path(n.name)
        if path is not None and path not in used:
            new = path
        elif not n.name:
            new, k = f"{n.op_type}_{i}", 0
            while new in used:
                k += 1
                new = f"{n.op_type}_{i}_{k}"
        else:
            continue
        used.add(new)
        renames.append((n.name, new))
        n.name = new
    return renames
