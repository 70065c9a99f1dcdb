"""Stage ``export``: a loaded torch object becomes ONNX with canonical normalization nodes.

* ``nn.Module`` and ``ExportedProgram``: ``torch.onnx.export(dynamo=True, optimize=False)``.
  The exporter's optimizer is off on purpose: it would fold Conv/Gemm + BatchNorm
  itself, and normdeploy's report must account for every fold. normdeploy's modules emit
  single ``normdeploy::*`` nodes (:mod:`normdeploy.nn`); their function bodies are attached.
  Constants are folded and dead nodes removed with onnxscript's constant folder, which
  evaluates only nodes whose inputs are all constant (it folds no normalization).
* TorchScript: only the TorchScript exporter reads it (``dynamo=False``); that exporter
  folds Conv + BatchNorm on its own in eval mode and sees normdeploy modules decomposed
  (the canonicalize stage recognizes what it can).

The first axis of every input is exported as a dynamic ``batch`` axis; where the model
fixes it (a Reshape with a literal batch, say) the export falls back to static shapes
and says so.
"""
from __future__ import annotations

import io
import logging
import warnings

import onnx

from .core import ops
from .core.errors import UnsupportedError
from .core.graph_gs import infer_shapes
from .core.inputs import example_arrays
from .load import Loaded

DEFAULT_OPSET = 20


def to_onnx(loaded: Loaded, opset: int = DEFAULT_OPSET) -> tuple[onnx.ModelProto, list[str]]:
    """Export ``loaded`` to ONNX; returns the model and notes for the report."""
    if loaded.kind == "onnx":
        return finalize(loaded.obj), []
    import torch

    arrays = example_arrays(loaded.inputs, batch=max(2, loaded.inputs[0].shape[0]) if loaded.inputs else None)
    args = tuple(torch.from_numpy(a) for a in arrays.values())
    notes: list[str] = []
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if loaded.kind == "torchscript":
            model = _export_torchscript(loaded, args, opset)
            notes.append("TorchScript input: exported with the TorchScript exporter, which folds Conv+BatchNorm itself")
        else:
            model, dynamic = _export_dynamo(loaded, args, opset)
            if not dynamic:
                notes.append("batch axis exported static: the model fixes it (dynamic export failed)")
    return finalize(model), notes


def _export_dynamo(loaded: Loaded, args, opset: int) -> tuple[onnx.ModelProto, bool]:
    import torch

    dyn = tuple({0: torch.export.Dim("batch", min=1, max=65536)} for _ in args)
    errors = []
    for dynamic_shapes in (dyn, None):
        try:
            prog = torch.onnx.export(loaded.obj, args, dynamo=True, optimize=False, opset_version=opset,
                                     dynamic_shapes=dynamic_shapes, verbose=False,
                                     input_names=[s.name for s in loaded.inputs])
            return prog.model_proto, dynamic_shapes is not None
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            errors.append(e)
    msg = str(errors[-1]).strip().splitlines()
    raise UnsupportedError(f"torch.onnx.export failed: {type(errors[-1]).__name__}: {msg[0] if msg else ''}"[:300],
                           "run with --debug for the exporter's trace, or export to ONNX yourself and pass the .onnx")


def _export_torchscript(loaded: Loaded, args, opset: int) -> onnx.ModelProto:
    import torch

    names = [s.name for s in loaded.inputs]
    f = io.BytesIO()
    try:
        torch.onnx.export(loaded.obj, args, f, dynamo=False, opset_version=opset, input_names=names,
                          dynamic_axes={n: {0: "batch"} for n in names})
    except Exception as e:  # noqa: BLE001
        raise UnsupportedError(f"TorchScript export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                               "export to ONNX yourself and pass the .onnx") from e
    return onnx.load_from_string(f.getvalue())


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, drop dead nodes and debug metadata, attach canonical function bodies, infer shapes."""
    from onnxscript import optimizer

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _name_norms_after_modules(model)
    for n in model.graph.node:
        del n.metadata_props[:]
    for vi in list(model.graph.input) + list(model.graph.output):
        del vi.metadata_props[:]
    for i in model.graph.initializer:
        del i.metadata_props[:]
    del model.metadata_props[:]
    if model.opset_import and ops.model_opset(model) >= 18 and not _has_subgraphs(model):
        try:
            optimizer.fold_constants(model)  # in place
            optimizer.remove_unused_nodes(model)
        except Exception:  # noqa: BLE001 - the folder is a nicety; the graph stays valid without it
            pass
    ops.attach_functions(model)
    return infer_shapes(model)


def _name_norms_after_modules(model: onnx.ModelProto) -> None:
    """Name nodes after the torch module that emitted them.

    A normalization node takes the module path itself (``blocks.0.norm1``); any other node
    becomes ``<module path>/<exporter name>``, so that a normalization the canonicalize stage
    later assembles from decomposed ops can take its module's name back
    (:func:`name_norms_by_module`).
    """
    import ast

    from .core.norms import kind_of

    used = {n.name for n in model.graph.node}
    for n in model.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if not scopes:
            continue
        try:
            scope_list = ast.literal_eval(scopes)  # ['', 'blocks', 'blocks.0', 'blocks.0.norm1', 'layer_norm']
        except (ValueError, SyntaxError):
            continue
        path = scope_list[-2] if len(scope_list) >= 2 else ""
        if not path:
            continue
        name = path if kind_of(n) and path not in used else f"{path}/{n.name}"
        if name not in used:
            used.add(name)
            n.name = name


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
               for a in n.attribute)
