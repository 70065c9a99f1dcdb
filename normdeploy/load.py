"""Stage ``load``: a path becomes an ONNX ModelProto or a torch object, plus its input specs.

Formats, told apart by content, not by extension:

* ONNX protobuf (``.onnx``), external data resolved next to the file;
* ``torch.export`` archives (``.pt2``) -> ``ExportedProgram``;
* TorchScript archives -> ``ScriptModule``;
* ``torch.save``'d ``nn.Module`` pickles. Unpickling runs code, so these load
  weights-only, with an allow-list of ``torch.nn`` module classes and normdeploy's own;
  anything else is refused with the list of offending globals unless ``trust_pickle``.

Input specs come from ``--input name:1x3x224x224[:dtype]`` (repeatable), else from the
model: ONNX graph inputs, an ExportedProgram's example inputs, or an ``example_inputs``
attribute (``{"name": shape}``, dtypes other than float32 in ``example_input_dtypes``) on a
pickled module.
"""
from __future__ import annotations

import importlib
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from .core.errors import InputError, UnsupportedError
from .core.inputs import DTYPES as _DTYPES
from .core.inputs import InputSpec, parse_input_spec


@dataclass
class Loaded:
    kind: str  # "onnx" | "exported_program" | "torchscript" | "module"
    path: str
    obj: object
    inputs: list[InputSpec]


def load(source, input_texts: tuple[str, ...] = (), trust_pickle: bool = False) -> Loaded:
    """A path, or an object a Python caller already holds: ``onnx.ModelProto``, ``nn.Module``, ``ExportedProgram``."""
    if not isinstance(source, (str, os.PathLike)):
        return load_object(source, input_texts)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise InputError(f"model file {path} does not exist", "check the path")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not a model file", "pass an .onnx, .pt or .pt2 file")
    if os.path.getsize(path) == 0:
        raise InputError(f"model file {path} is empty", "re-export or re-copy the model")
    kind = sniff(path)
    if kind == "onnx":
        model = load_onnx(path)
        return Loaded("onnx", path, model, onnx_input_specs(model, input_texts))
    if kind == "exported_program":
        import torch

        try:
            ep = torch.export.load(path)
        except Exception as e:  # noqa: BLE001 - any failure to deserialize is a bad file
            raise InputError(f"{path} is a torch.export archive that cannot be loaded ({type(e).__name__})",
                             "re-save it with torch.export.save from the same torch version") from e
        specs = _specs_from_examples(ep.example_inputs[0] if ep.example_inputs else (), input_texts, path)
        return Loaded(kind, path, ep, specs)
    if kind == "torchscript":
        import torch

        try:
            sm = torch.jit.load(path, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path} is a TorchScript archive that cannot be loaded ({type(e).__name__})",
                             "re-save it with torch.jit.save") from e
        return Loaded(kind, path, sm.eval(), _specs_from_texts(input_texts, path))
    return _module(load_pickled_module(path, trust_pickle), path, input_texts)


def load_object(obj, input_texts: tuple[str, ...] = ()) -> Loaded:
    """An in-memory model; its ``path`` in the report names its type (``<nn.Module DigitsCNN>``)."""
    if isinstance(obj, onnx.ModelProto):
        try:
            onnx.checker.check_model(obj)
        except onnx.checker.ValidationError as e:
            raise InputError(f"the ONNX model fails the checker: {str(e).strip().splitlines()[0]}",
                             "fix or re-export the model") from None
        obj = ir.from_proto(obj)
        return Loaded("onnx", "<onnx.ModelProto>", obj, onnx_input_specs(obj, input_texts))
    if isinstance(obj, ir.Model):
        return Loaded("onnx", "<onnx_ir.Model>", obj, onnx_input_specs(obj, input_texts))
    import torch

    if isinstance(obj, torch.export.ExportedProgram):
        label = "<torch.export.ExportedProgram>"
        return Loaded("exported_program", label, obj,
                      _specs_from_examples(obj.example_inputs[0] if obj.example_inputs else (), input_texts, label))
    if isinstance(obj, torch.jit.ScriptModule):
        label = f"<TorchScript {type(obj).__name__}>"
        return Loaded("torchscript", label, obj.eval(), _specs_from_texts(input_texts, label))
    if isinstance(obj, torch.nn.Module):
        return _module(obj, f"<nn.Module {type(obj).__name__}>", input_texts)
    raise InputError(f"cannot optimize a {type(obj).__name__}",
                     "pass a path, an onnx.ModelProto, a torch.nn.Module or a torch.export.ExportedProgram")


def _module(module, path: str, input_texts: tuple[str, ...]) -> Loaded:
    examples = getattr(module, "example_inputs", None)
    dtypes = getattr(module, "example_input_dtypes", None) or {}
    if not input_texts and isinstance(examples, dict):
        specs = [InputSpec(str(k), tuple(int(d) for d in v), str(dtypes.get(k, "float32")), {0: "batch"})
                 for k, v in examples.items()]
        for spec in specs:
            if spec.dtype not in _DTYPES:
                raise InputError(f"{path}: example_input_dtypes gives {spec.name} the unknown dtype {spec.dtype!r}",
                                 f"use one of {', '.join(_DTYPES)}")
    else:
        specs = _specs_from_texts(input_texts, path)
    return Loaded("module", path, module.eval(), specs)


def sniff(path: str) -> str:
    """Tell the format from the bytes: a zip is a torch archive, anything else must be ONNX."""
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            raise InputError(f"{path} is a damaged zip archive (truncated?)", "re-save or re-copy the model") from None
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json")
               for n in names):
            return "exported_program"
        if any("/code/" in n for n in names) or any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "module"
        raise InputError(f"{path} is a zip archive but not a torch model", "pass an .onnx, .pt or .pt2 file")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "module"  # legacy (non-zip) torch.save pickle
    return "onnx"


def load_onnx(path: str) -> ir.Model:
    """An ONNX file as an ``onnx_ir.Model``; its external data stays memory-mapped until read.

    The file is checked by path (``onnx.checker.check_model(path)``), which also works past
    the 2 GB protobuf limit; every external data file must exist next to the model.
    """
    try:
        model = ir.load(path)
    except Exception:  # noqa: BLE001 - protobuf raises several types on garbage
        raise InputError(f"{path} is neither an ONNX model nor a torch file (it does not parse)",
                         "pass an .onnx, TorchScript .pt, torch.export .pt2 or torch.save'd nn.Module") from None
    if not len(model.graph) and not model.graph.outputs:
        raise InputError(f"{path} is neither an ONNX model nor a torch file (it parses to an empty model)",
                         "pass an .onnx, TorchScript .pt, torch.export .pt2 or torch.save'd nn.Module")
    base = os.path.dirname(os.path.abspath(path))
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            loc = t.location
            if not os.path.exists(os.path.join(base, loc)):
                raise InputError(f"{path} keeps tensor {v.name} in external file {loc!r}, which is missing",
                                 f"copy {loc} next to the model")
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{path} fails the ONNX checker: {first}", "fix or re-export the model") from None
    except Exception as e:  # noqa: BLE001 - external data that cannot be read, and the like
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{path} cannot be checked ({first})", "re-copy the .onnx with its data file") from None
    return model


def onnx_input_specs(model: ir.Model, input_texts: tuple[str, ...]) -> list[InputSpec]:
    given = {}
    inits = set(model.graph.initializers)
    graph_inputs = [i for i in model.graph.inputs if i.name not in inits]
    for text in input_texts:
        name, shape, dtype = parse_input_spec(text)
        if name is None:
            if len(graph_inputs) != 1:
                raise InputError(f"--input {text!r} names no input and the model has {len(graph_inputs)}",
                                 "write --input NAME:SHAPE")
            name = graph_inputs[0].name
        given[name] = shape
    specs = []
    names = [i.name for i in graph_inputs]
    for name in given:
        if name not in names:
            raise InputError(f"--input names {name!r}, which is not a model input", f"model inputs: {', '.join(names)}")
    for vi in graph_inputs:
        try:
            elem = np.dtype(vi.dtype.numpy()) if vi.dtype is not None else None
        except (TypeError, ValueError):
            elem = None
        dtype = next((k for k, v in _DTYPES.items() if elem is not None and np.dtype(v) == elem), None)
        if dtype is None:
            raise UnsupportedError(f"input {vi.name} has dtype {vi.dtype}", "normdeploy handles float and integer inputs")
        dims = [(d, None) if isinstance(d, int) else (None, getattr(d, "value", None)) for d in (vi.shape or [])]
        dynamic = {i: (p or f"d{i}") for i, (v, p) in enumerate(dims) if v is None}
        if vi.name in given:
            shape = given[vi.name]
            if len(shape) != len(dims):
                raise InputError(f"--input {vi.name} has rank {len(shape)} but the model expects rank {len(dims)}",
                                 f"give {len(dims)} dimensions")
            for i, ((v, _), s) in enumerate(zip(dims, shape)):
                if v is not None and v != s:
                    raise InputError(f"--input {vi.name}: dimension {i} is {s} but the model fixes it to {v}",
                                     f"use {'x'.join(str(d if d is not None else '?') for d, _ in dims)}")
        else:
            missing = [i for i, (v, _) in enumerate(dims) if v is None and i != 0]
            if missing:
                raise InputError(f"input {vi.name} has dynamic dimensions {missing} with no size",
                                 f"give one with --input {vi.name}:" + "x".join(str(v or 1) for v, _ in dims))
            shape = tuple(v if v is not None else 1 for v, _ in dims)
        specs.append(InputSpec(vi.name, tuple(shape), dtype, dynamic))
    return specs


def _specs_from_texts(input_texts: tuple[str, ...], path: str) -> list[InputSpec]:
    if not input_texts:
        raise InputError(f"{path} does not say what input it takes",
                         "give its shape with --input NAME:1x3x224x224 (repeat for several inputs)")
    specs = []
    for i, text in enumerate(input_texts):
        name, shape, dtype = parse_input_spec(text)
        specs.append(InputSpec(name or (f"input_{i}" if len(input_texts) > 1 else "input"), shape, dtype, {0: "batch"}))
    return specs


def _specs_from_examples(examples, input_texts, path) -> list[InputSpec]:
    if input_texts:
        return _specs_from_texts(input_texts, path)
    specs = []
    for i, t in enumerate(examples):
        dtype = str(t.dtype).replace("torch.", "")
        if dtype not in _DTYPES:
            raise UnsupportedError(f"example input {i} of {path} has dtype {dtype}", "pass --input with a float shape")
        specs.append(InputSpec(f"input_{i}" if len(examples) > 1 else "input", tuple(t.shape), dtype, {0: "batch"}))
    if not specs:
        return _specs_from_texts(input_texts, path)
    return specs


# ----------------------------------------------------------------------------- safe pickle loading

def _allowed_global(qualname: str):
    """Resolve ``module.Name`` if it is an ``nn.Module`` class of torch.nn or normdeploy, else None."""
    import torch

    module_name, _, attr = qualname.rpartition(".")
    if not (module_name.startswith("torch.nn.") or module_name.startswith("normdeploy.")):
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and (issubclass(obj, torch.nn.Module) or obj is torch.nn.Parameter):
        return obj
    return None


def load_pickled_module(path: str, trust_pickle: bool):
    import pickle

    import torch

    if trust_pickle:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path} cannot be unpickled ({type(e).__name__}: {e})".split("\n")[0],
                             "check that the file is complete and its classes importable") from e
    else:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle stream
            raise InputError(f"{path} is a damaged torch file ({type(e).__name__})", "re-save or re-copy it") from e
        resolved, refused = [], []
        for n in names:
            obj = _allowed_global(n)
            (resolved.append(obj) if obj is not None else refused.append(n))
        if refused:
            raise InputError(f"{path} references globals outside torch.nn and normdeploy: {', '.join(sorted(refused))}",
                             "unpickling runs code; pass --trust-pickle if you trust this file, or export to .pt2/.onnx")
        try:
            with torch.serialization.safe_globals(resolved):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{path} cannot be loaded weights-only ({str(e).splitlines()[0][:200]})",
                             "re-save it, or pass --trust-pickle if you trust it") from e
    if not isinstance(obj, torch.nn.Module):
        raise InputError(f"{path} holds a {type(obj).__name__}, not an nn.Module (a state_dict has no architecture)",
                         "save the module itself (torch.save(model)) or export it with torch.export")
    return obj
