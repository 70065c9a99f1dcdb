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
import onnx_ir as ir

from .core import ops
from .core.errors import UnsupportedError
from .core.graph import infer_shapes
from .core.inputs import example_arrays
from .load import Loaded

DEFAULT_OPSET = 20


def to_onnx(loaded: Loaded, opset: int = DEFAULT_OPSET) -> tuple[ir.Model, list[str]]:
    """Export ``loaded`` to ONNX, as an in-memory ``onnx_ir.Model``; returns it and notes for the report.

    A torch module's export holds the module's own parameter tensors (no copy); an ONNX
    file's external data stays memory-mapped until a stage reads it.
    """
    if loaded.kind == "onnx":
        notes: list[str] = []
        return finalize(loaded.obj, notes), notes
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
    return finalize(model, notes), notes


def _export_dynamo(loaded: Loaded, args, opset: int) -> tuple[ir.Model, bool]:
    import torch

    dyn = tuple({0: torch.export.Dim("batch", min=1, max=65536)} for _ in args)
    errors = []
    for dynamic_shapes in (dyn, None):
        try:
            prog = torch.onnx.export(loaded.obj, args, dynamo=True, optimize=False, opset_version=opset,
                                     dynamic_shapes=dynamic_shapes, verbose=False,
                                     input_names=[s.name for s in loaded.inputs])
            return prog.model, dynamic_shapes is not None
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            errors.append(e)
    msg = str(errors[-1]).strip().splitlines()
    raise UnsupportedError(f"torch.onnx.export failed: {type(errors[-1]).__name__}: {msg[0] if msg else ''}"[:300],
                           "run with --debug for the exporter's trace, or export to ONNX yourself and pass the .onnx")


def _export_torchscript(loaded: Loaded, args, opset: int) -> ir.Model:
    import torch

    names = [s.name for s in loaded.inputs]
    f = io.BytesIO()
    try:
        torch.onnx.export(loaded.obj, args, f, dynamo=False, opset_version=opset, input_names=names,
                          dynamic_axes={n: {0: "batch"} for n in names})
    except Exception as e:  # noqa: BLE001
        raise UnsupportedError(f"TorchScript export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                               "export to ONNX yourself and pass the .onnx") from e
    return ir.from_proto(onnx.load_from_string(f.getvalue()))


def finalize(model: ir.Model, notes: list[str] | None = None) -> ir.Model:
    """Fold constants, drop dead nodes and debug metadata, attach canonical function bodies, infer shapes.

    In place; a failed shape inference is a note (later passes then see fewer shapes).
    """
    from onnxscript import optimizer

    _name_norms_after_modules(model)
    for n in model.graph.all_nodes():
        n.metadata_props.clear()
    for v in list(model.graph.inputs) + list(model.graph.outputs) + list(model.graph.initializers.values()):
        v.metadata_props.clear()
    model.metadata_props.clear()
    if model.opset_imports and ops.model_opset(model) >= 18 and not _has_subgraphs(model):
        try:
            optimizer.fold_constants(model)  # in place
            optimizer.remove_unused_nodes(model)
        except Exception:  # noqa: BLE001 - the folder is a nicety; the graph stays valid without it
            pass
    ops.attach_functions(model)
    failure = infer_shapes(model)
    if failure and notes is not None:
        notes.append(f"exported model: {failure}")
    return model


def _name_norms_after_modules(model: ir.Model) -> None:
    """Name nodes after the torch module that emitted them.

    A normalization node takes the module path itself (``blocks.0.norm1``); any other node
    becomes ``<module path>/<exporter name>``, so that a normalization the canonicalize stage
    later assembles from decomposed ops can take its module's name back
    (:func:`name_norms_by_module`).
    """
    import ast

    from .core.norms import kind_of

    used = {n.name for n in model.graph}
    for n in model.graph:
        scopes = n.metadata_props.get("pkg.torch.onnx.name_scopes")
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


def _has_subgraphs(model: ir.Model) -> bool:
    return any(True for _ in model.graph.subgraphs())
