"""Stage ``export``: a loaded torch object becomes ONNX with canonical normalization nodes.

* ``nn.Module`` and ``ExportedProgram``: ``torch.onnx.export(dynamo=True, optimize=False)``.
  The exporter's optimizer is off on purpose: it would fold Conv/Gemm + BatchNorm
  itself, and normdeploy's report must account for every fold. normdeploy's modules emit
  single ``normdeploy::*`` nodes (:mod:`normdeploy.nn`); their function bodies are attached.
  Constants are folded and dead nodes removed with onnxscript's constant folder, which
  evaluates only nodes whose inputs are all constant: it folds no statistic computed at run
  time, and it leaves the ``r + eps`` of a running-statistic scale written from parameters
  only (a traced ``w / sqrt(r + eps)``) unfolded, so that the canonicalize stage can still name
  it (:mod:`normdeploy.canonicalize.unified_norm`).
* TorchScript: only the TorchScript exporter reads it (``torch.onnx.export(dynamo=False)``),
  run with ``training=PRESERVE`` on the module in eval mode: that exporter's eval-mode
  peephole would fold Conv + BatchNorm on its own, and the report must account for every
  fold. It sees normdeploy's modules decomposed (the canonicalize stage recognizes what it can).
* Fallback: where the dynamo exporter fails on a module or ExportedProgram (Hugging Face T5
  and Swin fail in torch's own decomposition: a ``view`` of a transposed tensor), the
  TorchScript exporter exports it instead, with the same input names and dynamic axes, and
  the report's notes say so with the dynamo error's one-line cause.

Axes: every input's dynamic axes (``InputSpec.dynamic``, ``{axis: name}``; the first axis,
``batch``, by default) are exported as named dynamic dimensions, one ``torch.export.Dim`` per
name (a Hugging Face folder's ``batch_size`` and ``sequence_length``, bounded by
``Loaded.dim_max``). Where the model fixes them (a Reshape with a literal batch, say) the
dynamo export falls back to static shapes and says so. Outputs are named as
``Loaded.outputs`` says (a Hugging Face folder: Optimum's names); otherwise dynamo names
them, and the TorchScript fallback names them after the model's output structure
(``last_hidden_state`` for a ``ModelOutput`` field, ``output`` / ``output_<i>`` otherwise),
with axis 0 named as the batch where the output carries it.
"""
from __future__ import annotations

import io
import logging
import re
import warnings

import onnx
import onnx_ir as ir

from .core import ops
from .core.affine import constant_of
from .core.errors import UnsupportedError
from .core.graph import infer_shapes
from .core.inputs import InputSpec, example_arrays
from .core.store import store_mapped_views
from .load import Loaded

DEFAULT_OPSET = 20
DEFAULT_DIM_MAX = 65536
#: dtypes torch takes that numpy (and so :func:`example_arrays`) has no native type for
_TORCH_ONLY_DTYPES = ("bfloat16",)


def to_onnx(loaded: Loaded, opset: int = DEFAULT_OPSET) -> tuple[ir.Model, list[str]]:
    """Export ``loaded`` to ONNX, as an in-memory ``onnx_ir.Model``; returns it and notes for the report.

    A torch module's export holds the module's own parameter tensors (no copy); an ONNX
    file's external data stays memory-mapped until a stage reads it.
    """
    notes: list[str] = list(loaded.notes)
    if loaded.kind == "onnx":
        return finalize(loaded.obj, notes), notes
    args = example_tensors(loaded.inputs, batch=max(2, loaded.inputs[0].shape[0]) if loaded.inputs else None)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if loaded.kind == "torchscript":
            model = _export_torchscript(loaded, args, opset)
            notes.append("TorchScript input: exported with the TorchScript exporter (training=PRESERVE, so that "
                         "normdeploy, not the exporter, folds Conv+BatchNorm)")
        else:
            try:
                model, dynamic = _export_dynamo(loaded, args, opset)
                if not dynamic:
                    notes.append("batch axis exported static: the model fixes it (dynamic export failed)")
            except _DynamoFailed as failed:
                try:
                    model = _export_torchscript(loaded, args, opset)
                except UnsupportedError as e:
                    raise UnsupportedError(f"torch.onnx.export failed with both exporters: dynamo: {failed.cause}; "
                                           f"{e.message}"[:400], failed.hint) from None
                notes.append(f"the dynamo exporter failed ({failed.cause}); exported with the TorchScript exporter "
                             "(torch.onnx.export(dynamo=False)) instead, with the same input names and dynamic axes")
                if loaded.kind == "exported_program" and not any(ep_dynamic_axes(loaded.obj).values()):
                    notes.append("batch axis exported static: the .pt2 was saved with static shapes")
    return finalize(model, notes), notes


def example_tensors(specs: list[InputSpec], batch: int | None = None) -> tuple:
    """Torch tensors for ``specs`` (:func:`normdeploy.core.inputs.example_arrays`); bfloat16 from float32 draws."""
    import torch

    plain = [InputSpec(s.name, s.shape, "float32" if s.dtype in _TORCH_ONLY_DTYPES else s.dtype, s.dynamic)
             for s in specs]
    arrays = example_arrays(plain, batch=batch)
    return tuple(torch.from_numpy(a).to(getattr(torch, s.dtype)) if s.dtype in _TORCH_ONLY_DTYPES
                 else torch.from_numpy(a) for s, a in zip(specs, arrays.values()))


class _DynamoFailed(Exception):
    def __init__(self, cause: str, hint: str):
        super().__init__(cause)
        self.cause, self.hint = cause, hint


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEPS = {"1": "in torch.export", "2": "in torch's decomposition", "3": "translating to ONNX"}


def exporter_cause(e: BaseException) -> str:
    """The one-line cause of a ``torch.onnx.export`` failure, e.g. ``ValueError: Cannot view a tensor ...
    (in torch's decomposition)``: the dynamo exporter's "Exception summary" when it has one."""
    text = _ANSI.sub("", str(e))
    cause = None
    summary = text.split("## Exception summary", 1)
    if len(summary) == 2:
        lines = [ln.strip() for ln in summary[1].splitlines() if ln.strip()]
        if lines:
            cause = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>:", r"\1:", lines[0])
    if cause is None:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        cause = f"{type(e).__name__}: {lines[0] if lines else ''}"
    step = re.search(r"This is step (\d)/3", text)
    if step and step.group(1) in _STEPS:
        cause += f" ({_STEPS[step.group(1)]})"
    return cause[:300]


def _dim_name(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    return ident if ident and not ident[0].isdigit() else f"d_{ident}"


def _dynamic_shapes(loaded: Loaded) -> tuple:
    """One ``{axis: Dim}`` per input (None where none is dynamic); inputs sharing an axis name share the Dim."""
    import torch

    dims: dict = {}
    shapes = []
    for spec in loaded.inputs:
        axes = {}
        for axis, name in sorted(spec.dynamic.items()):
            if name not in dims:
                dims[name] = torch.export.Dim(_dim_name(name), min=1, max=loaded.dim_max.get(name, DEFAULT_DIM_MAX))
            axes[axis] = dims[name]
        shapes.append(axes or None)
    return tuple(shapes)


def _export_dynamo(loaded: Loaded, args, opset: int) -> tuple[ir.Model, bool]:
    """The dynamo exporter, with dynamic axes, else static; raises :class:`_DynamoFailed` when both fail."""
    import torch

    names = [s.name for s in loaded.inputs]
    output_names = [n for n, _ in loaded.outputs] if loaded.outputs else None
    errors = []
    for dynamic_shapes in (_dynamic_shapes(loaded), None):
        try:
            prog = torch.onnx.export(loaded.obj, args, dynamo=True, optimize=False, opset_version=opset,
                                     dynamic_shapes=dynamic_shapes, verbose=False, input_names=names,
                                     output_names=output_names)
            return prog.model, dynamic_shapes is not None
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            errors.append(e)
    raise _DynamoFailed(exporter_cause(errors[-1]),
                        "run with --debug for the exporter's trace, or export to ONNX yourself and pass the .onnx")


def _output_layout(loaded: Loaded, module, args) -> tuple[list[str] | None, dict]:
    """Output names and dynamic axes for the TorchScript exporter, as the dynamo path would give them.

    ``Loaded.outputs`` when given; otherwise from one eager run: a ``ModelOutput`` / dict field
    keeps its key (``last_hidden_state``, ``hidden_states.0``), other outputs are ``output`` /
    ``output_<i>``, and axis 0 of an output is the batch axis where its size is the example batch.
    """
    import torch
    from torch.utils import _pytree as pytree

    if loaded.outputs:
        return [n for n, _ in loaded.outputs], {n: dict(axes) for n, axes in loaded.outputs if axes}
    batch_axis = loaded.inputs[0].dynamic.get(0) if loaded.inputs else None
    try:
        with torch.no_grad():
            out = module(*args)
        leaves = pytree.tree_flatten_with_path(out)[0]
    except Exception:  # noqa: BLE001 - the exporter will say what is wrong
        return None, {}
    if not leaves or not all(isinstance(v, torch.Tensor) for _, v in leaves):
        return None, {}
    names = []
    for path, _ in leaves:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if not parts:
            names.append("output")
        elif isinstance(path[0], pytree.SequenceKey):
            names.append("output_" + ".".join(parts))
        else:
            names.append(".".join(parts))
    if len(set(names)) != len(names):
        return None, {}
    batch = args[0].shape[0] if args and args[0].ndim else None
    axes = {n: {0: batch_axis} for n, (_, v) in zip(names, leaves)
            if batch_axis and batch is not None and v.ndim and v.shape[0] == batch}
    return names, axes


def ep_dynamic_axes(ep) -> dict[int, set[int]]:
    """``{user input index: axes}`` that an ExportedProgram keeps symbolic (the others its guards fix)."""
    import torch

    user = set(ep.graph_signature.user_inputs)
    out, i = {}, 0
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        shape = getattr(val, "shape", ())
        out[i] = {a for a, d in enumerate(shape) if isinstance(d, torch.SymInt)}
        i += 1
    return out


def _export_torchscript(loaded: Loaded, args, opset: int) -> ir.Model:
    import torch

    module = loaded.obj.module() if loaded.kind == "exported_program" else loaded.obj
    names = [s.name for s in loaded.inputs]
    axes = {s.name: dict(s.dynamic) for s in loaded.inputs if s.dynamic}
    if loaded.kind == "exported_program":  # its guards hold the axes it was saved with: only those stay dynamic
        kept = ep_dynamic_axes(loaded.obj)
        axes = {n: {a: d for a, d in ax.items() if a in kept.get(i, set())} for i, (n, ax) in enumerate(axes.items())}
        axes = {n: ax for n, ax in axes.items() if ax}
        if not axes:
            args = example_tensors(loaded.inputs)  # its example shapes exactly
    output_names, output_axes = _output_layout(loaded, module, args)
    if loaded.kind == "exported_program" and not axes:
        output_axes = {}
    f = io.BytesIO()
    try:
        torch.onnx.export(module, args, f, dynamo=False, opset_version=opset, input_names=names,
                          output_names=output_names, dynamic_axes={**axes, **output_axes},
                          training=torch.onnx.TrainingMode.PRESERVE)
    except Exception as e:  # noqa: BLE001
        raise UnsupportedError(f"TorchScript export failed: {exporter_cause(e)}"[:300],
                               "export to ONNX yourself and pass the .onnx") from e
    return ir.from_proto(onnx.load_from_string(f.getvalue()))


def finalize(model: ir.Model, notes: list[str] | None = None) -> ir.Model:
    """Fold constants, drop dead nodes and debug metadata, attach canonical function bodies, infer shapes.

    A folded constant that is a view of an external weight's memory map is moved to a file of its own
    (:func:`normdeploy.core.store.store_mapped_views`), so that the input's map can close.

    In place; a failed shape inference is a note (later passes then see fewer shapes).
    """
    from onnxscript import optimizer

    _name_norms_after_modules(model)
    for n in model.graph.all_nodes():
        n.metadata_props.clear()
    for v in list(model.graph.inputs) + list(model.graph.outputs) + list(model.graph.initializers.values()):
        v.metadata_props.clear()
    model.metadata_props.clear()
    _drop_reduce_attribute_of_later_opsets(model)
    if model.opset_imports and ops.model_opset(model) >= 18 and not _has_subgraphs(model):
        try:
            optimizer.fold_constants(model, should_fold=_keep_running_statistic)  # in place
            optimizer.remove_unused_nodes(model)
        except Exception:  # noqa: BLE001 - the folder is a nicety; the graph stays valid without it
            pass
        store_mapped_views(model)  # folded Transposes of external weights: off the input's memory map
    ops.attach_functions(model)
    failure = infer_shapes(model)
    if failure and notes is not None:
        notes.append(f"exported model: {failure}")
    return model


def _keep_running_statistic(node: ir.Node) -> bool | None:
    """The constant folder's ``should_fold``: False for the ``r + eps`` of a scale ``w / sqrt(r + eps)``.

    Such a scale, computed from constants only, is how ``torch.export`` traces an eval division by a
    running statistic (:class:`normdeploy.nn.UnifiedNorm`, :class:`normdeploy.nn.PowerNorm`); folded
    into one constant it could no longer be told apart from any frozen affine
    (:mod:`normdeploy.canonicalize.unified_norm` reads it). Kept: an ``Add`` of a per-channel
    constant and one scalar whose output a ``Sqrt`` reads, whose output divides a constant. Every
    other node: the folder's own rules (None). Nothing is lost: the affine folds and the clean-up
    step evaluate what is left (``Sqrt`` included) where nothing recognizes it.
    """
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    sizes = sorted(i.const_value.size for i in node.inputs if i is not None and i.const_value is not None)
    if len(sizes) != 2 or sizes[0] != 1 or sizes[1] == 1:
        return None
    for root, _ in node.outputs[0].uses():
        if root.op_type != "Sqrt":
            continue
        for div, slot in root.outputs[0].uses():
            numerator = div.inputs[0]
            if div.op_type == "Div" and slot == 1 and numerator is not None and constant_of(numerator) is not None:
                return False
    return None


#: reductions that gained ``noop_with_empty_axes`` (and took ``axes`` as an input) at opset 18
_REDUCE_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare")


def _drop_reduce_attribute_of_later_opsets(model: ir.Model) -> None:
    """Remove ``noop_with_empty_axes`` from the reductions of a model below opset 18, which lack it.

    torch 2.13's dynamo exporter writes ``ReduceMean(x, axes=[...], noop_with_empty_axes=0)`` at opset
    17 (``torch.var_mean``, ``x.mean(dim)``), which onnx.checker and ONNX Runtime refuse ("Unrecognized
    attribute"). Exact: the attribute only matters when ``axes`` is empty; it is dropped where it is 0
    (the default of later opsets, the only behaviour opset 17 has) or ``axes`` names axes.
    """
    if not model.opset_imports or ops.model_opset(model) >= 18:
        return
    for n in model.graph.all_nodes():
        if n.domain not in ("", "ai.onnx") or n.op_type not in _REDUCE_18:
            continue
        noop = n.attributes.get("noop_with_empty_axes")
        if noop is None:
            continue
        axes = n.attributes.get("axes")
        if noop.as_int() == 0 or (axes is not None and len(axes.as_ints()) > 0):
            del n.attributes["noop_with_empty_axes"]


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
