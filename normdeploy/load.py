"""Stage ``load``: a path becomes an ONNX ModelProto or a torch object, plus its input specs.

Formats, told apart by content, not by extension:

* ONNX protobuf (``.onnx``), external data resolved next to the file;
* ``torch.export`` archives (``.pt2``) -> ``ExportedProgram``;
* TorchScript archives -> ``ScriptModule``;
* ``torch.save``'d ``nn.Module`` pickles. Unpickling runs code, so these load
  weights-only, with an allow-list of ``torch.nn`` module classes and normdeploy's own;
  anything else is refused with the list of offending globals unless ``trust_pickle``;
* a Hugging Face model folder (``save_pretrained``: ``config.json`` and safetensors), as
  Optimum's ``optimum-cli export onnx --model ./folder`` takes it (:func:`load_hf_folder`).

A ``.pt2`` of a Hugging Face model carries its output type (``BaseModelOutput...``) in its
pytree spec; torch refuses to deserialize a type that is not registered, so the model
library the archive names (transformers, diffusers, timm: nothing else is imported) is
imported first, which registers its output types.

Input specs come from ``--input name:1x3x224x224[:dtype]`` (repeatable), else from the
model: ONNX graph inputs, an ExportedProgram's example inputs, or an ``example_inputs``
attribute (``{"name": shape}``, dtypes other than float32 in ``example_input_dtypes``) on a
pickled module.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from .core.errors import InputError, UnsupportedError
from .core.inputs import DTYPES as _DTYPES
from .core.inputs import InputSpec, parse_input_spec


@dataclass
class Loaded:
    """A loaded model and what it takes.

    ``outputs``: the output names and their dynamic axes (``[(name, {axis: axis name})]``) where
    the source fixes them (a Hugging Face folder: Optimum's names), else None (the exporter names
    them). ``dim_max``: the largest size of a named dynamic axis (``sequence_length``: the
    model's ``max_position_embeddings``). ``notes``: what loading decided that the report says.
    """

    kind: str  # "onnx" | "exported_program" | "torchscript" | "module"
    path: str
    obj: object
    inputs: list[InputSpec]
    outputs: list[tuple[str, dict[int, str]]] | None = None
    dim_max: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load(source, input_texts: tuple[str, ...] = (), trust_pickle: bool = False) -> Loaded:
    """A path, or an object a Python caller already holds: ``onnx.ModelProto``, ``nn.Module``, ``ExportedProgram``."""
    if not isinstance(source, (str, os.PathLike)):
        return load_object(source, input_texts)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise InputError(f"model file {path} does not exist", "check the path")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return load_hf_folder(path, input_texts)
        raise InputError(f"{path} is a directory, but not a Hugging Face model folder (no config.json)",
                         "pass an .onnx, .pt or .pt2 file, or a folder written by save_pretrained")
    if os.path.getsize(path) == 0:
        raise InputError(f"model file {path} is empty", "re-export or re-copy the model")
    kind = sniff(path)
    if kind == "onnx":
        model = load_onnx(path)
        return Loaded("onnx", path, model, onnx_input_specs(model, input_texts))
    if kind == "exported_program":
        import torch

        ep = load_exported_program(path)
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


#: libraries whose pytree output types a .pt2 may name; importing one registers its types
PYTREE_LIBRARIES = ("transformers", "diffusers", "timm")
_SPEC_TYPE = re.compile(r'"type": "([\w.]+)"')


def pytree_types(path: str) -> list[str]:
    """The serialized type names in a ``.pt2``'s pytree specs (``in_spec`` / ``out_spec``: ``builtins.tuple``,
    ``transformers.modeling_outputs.BaseModelOutput``...)."""
    import json

    names: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("in_spec", "out_spec") and isinstance(v, str):
                    names.update(_SPEC_TYPE.findall(v))
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            if n.endswith(".json") and "/models/" in n:
                try:
                    walk(json.loads(z.read(n)))
                except ValueError:
                    continue
    return sorted(names)


def load_exported_program(path: str):
    """``torch.export.load(path)``, with the model libraries its pytree specs name imported first.

    A Hugging Face model's ``.pt2`` returns a ``ModelOutput``; transformers registers those
    types with torch's pytree when its ``modeling_outputs`` module is imported, and only
    modules of :data:`PYTREE_LIBRARIES` are imported. A type that is still not registered
    (a user's own dataclass) is a one-line error naming it, before torch's load (which would
    log a traceback).
    """
    import logging

    import torch
    from torch.utils import _pytree as pytree

    types = pytree_types(path)
    for qualname in types:
        module = qualname.rpartition(".")[0]
        if module.split(".", 1)[0] in PYTREE_LIBRARIES:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - a missing or broken library: the check below names the type
                pass
    unregistered = [t for t in types if t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE]
    if unregistered:
        lib = unregistered[0].split(".", 1)[0]
        raise InputError(f"{path} returns {', '.join(unregistered)}, a type torch's pytree does not know here",
                         f"install {lib}" if lib in PYTREE_LIBRARIES else
                         "register it (torch.utils._pytree.register_dataclass) and pass torch.export.load(path) to "
                         "the Python API, or save the program with plain tensor outputs")
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - any failure to deserialize is a bad file
        raise InputError(f"{path} is a torch.export archive that cannot be loaded ({type(e).__name__})",
                         "re-save it with torch.export.save from the same torch version") from None
    finally:
        log.setLevel(level)


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
    given, given_dtypes = {}, {}
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
        parts = text.split(":")  # a dtype written out (not parse_input_spec's float32 default) must match the model's
        if len(parts) == 3 or (len(parts) == 2 and not ("x" in parts[1] or parts[1].isdigit())):
            given_dtypes[name] = dtype
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
        if given_dtypes.get(vi.name, dtype) != dtype:
            raise InputError(f"--input {vi.name} gives dtype {given_dtypes[vi.name]}, but the model declares {vi.name} "
                             f"as {dtype}", f"drop the dtype (an ONNX model's own is used) or write :{dtype}")
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


# ----------------------------------------------------------------------------- Hugging Face model folders

#: the task of a Hugging Face architecture, by the end of its class name, as Optimum's TasksManager infers it
#: from the model class (huggingface/optimum, optimum/exporters/tasks.py); first match wins
HF_TASKS = (("ForSequenceClassification", "text-classification"), ("ForTokenClassification", "token-classification"),
            ("ForQuestionAnswering", "question-answering"), ("ForMaskedLM", "fill-mask"),
            ("ForCausalLM", "text-generation"), ("LMHeadModel", "text-generation"),
            ("ForImageClassification", "image-classification"), ("Model", "feature-extraction"))
#: Optimum's output names and dynamic axes per task (optimum/exporters/onnx/base.py, ``_TASK_TO_COMMON_OUTPUTS``)
HF_OUTPUTS = {
    "feature-extraction": {"last_hidden_state": {0: "batch_size", 1: "sequence_length"}},
    "text-classification": {"logits": {0: "batch_size"}},
    "token-classification": {"logits": {0: "batch_size", 1: "sequence_length"}},
    "question-answering": {"start_logits": {0: "batch_size", 1: "sequence_length"},
                           "end_logits": {0: "batch_size", 1: "sequence_length"}},
    "fill-mask": {"logits": {0: "batch_size", 1: "sequence_length"}},
    "text-generation": {"logits": {0: "batch_size", 1: "sequence_length"}},
    "image-classification": {"logits": {0: "batch_size"}},
}
#: Optimum's dummy input shapes (optimum/utils/input_generators.py, ``DEFAULT_DUMMY_SHAPES``), batch 1 here
HF_SEQUENCE_LENGTH = 16
HF_IMAGE_SIZE = 224


def hf_task(architecture: str) -> str | None:
    return next((task for suffix, task in HF_TASKS if architecture.endswith(suffix)), None)


def load_hf_folder(path: str, input_texts: tuple[str, ...] = ()) -> Loaded:
    """A ``save_pretrained`` folder: the model built from ``config.json`` and its weights, with Optimum's I/O.

    The class is ``config.architectures[0]`` from transformers (no remote code is run); the
    task follows from its name (:data:`HF_TASKS`). Inputs are those Optimum's ONNX export
    gives the task (huggingface/optimum, ``TextEncoderOnnxConfig`` / ``VisionOnnxConfig``):

    * text: ``input_ids`` and ``attention_mask``, ``token_type_ids`` where the model takes
      them and has more than one token type (BERT, not RoBERTa or GPT-2), and ``position_ids``
      for a decoder's text generation (``TextDecoderWithPositionIdsOnnxConfig``); int64, shape
      ``[1, 16]``, axes ``batch_size`` and ``sequence_length`` (at most ``max_position_embeddings``);
    * vision: ``pixel_values``, float32 ``[1, num_channels, image_size, image_size]``, axis
      ``batch_size`` (height and width stay as the checkpoint's patch and position embeddings
      were trained);

    ``--input name:SHAPE[:dtype]`` changes a shape. Outputs take Optimum's names
    (:data:`HF_OUTPUTS`: ``last_hidden_state``, ``logits``, ...); other outputs of the model
    (a pooler output, hidden states) are not exported, as Optimum exports none.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise UnsupportedError(f"{path} is a Hugging Face model folder, and transformers is not installed",
                               "pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot read
        raise InputError(f"{path}/config.json is not a Hugging Face config transformers can read "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})",
                         "re-save the model with save_pretrained") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise InputError(f"{path}/config.json names no architecture", "re-save the model with save_pretrained")
    arch = archs[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise UnsupportedError(f"{path}: architecture {arch} is not part of transformers {transformers.__version__} "
                               "(remote code is never run)", "export the model to ONNX yourself and pass the .onnx")
    task = hf_task(arch)
    if task is None:
        raise UnsupportedError(f"{path}: {arch} has no single-graph ONNX export (Optimum splits encoder-decoder "
                               "models into several files)", "export it with optimum-cli export onnx and pass one .onnx")
    notes = []
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        notes.append(f"{path}: weights from a PyTorch pickle (no safetensors file); transformers loads it weights-only")
    transformers.utils.logging.disable_progress_bar()  # one line per stage is what normdeploy prints
    try:
        model = cls.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - missing or mismatched weights
        raise InputError(f"{path}: {arch} cannot be built from the folder ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})",
                         "check that the weights file belongs to config.json (save_pretrained writes both)") from None
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    main = getattr(model, "main_input_name", "input_ids")
    params = inspect.signature(cls.forward).parameters
    if main == "input_ids":
        axes = {0: "batch_size", 1: "sequence_length"}
        length = min(HF_SEQUENCE_LENGTH, getattr(config, "max_position_embeddings", None) or HF_SEQUENCE_LENGTH)
        names = ["input_ids"] + [n for n in ("attention_mask",) if n in params]
        if "token_type_ids" in params and (getattr(config, "type_vocab_size", 0) or 0) > 1:
            names.append("token_type_ids")
        if task == "text-generation" and "position_ids" in params:
            names.append("position_ids")  # Optimum's TextDecoderWithPositionIdsOnnxConfig (GPT-2, Llama, ...)
        specs = [InputSpec(n, (1, length), "int64", dict(axes)) for n in names]
        dim_max = {"batch_size": 65536}
        if getattr(config, "max_position_embeddings", None):
            dim_max["sequence_length"] = int(config.max_position_embeddings)
        outputs = HF_OUTPUTS[task]
    elif main == "pixel_values":
        size = getattr(config, "image_size", HF_IMAGE_SIZE) or HF_IMAGE_SIZE
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        specs = [InputSpec("pixel_values", (1, int(getattr(config, "num_channels", 3) or 3), int(h), int(w)),
                           "float32", {0: "batch_size"})]
        dim_max = {"batch_size": 65536}
        outputs = {k: {a: n for a, n in v.items() if n == "batch_size"} for k, v in HF_OUTPUTS[task].items()}
    else:
        raise UnsupportedError(f"{path}: {arch} takes {main!r}; normdeploy builds text (input_ids) and vision "
                               "(pixel_values) models from a folder", "export the model to ONNX yourself and pass it")
    specs = _override_shapes(specs, input_texts, path)
    if os.path.isfile(os.path.join(path, "modules.json")):
        notes.append(f"{path} is also a sentence-transformers model (modules.json): exported as the transformers "
                     f"{arch} without the pooling modules, as optimum-cli export onnx --library transformers does")
    output_names = list(outputs)
    notes.append(f"Hugging Face folder: {arch} from config.json and its weights, task {task}; inputs "
                 f"{', '.join(s.name for s in specs)} and outputs {', '.join(output_names)} named as Optimum's "
                 "ONNX export names them")
    _export_as_tuple(model, [s.name for s in specs], output_names)
    return Loaded("module", path, model, specs, [(n, dict(outputs[n])) for n in output_names], dim_max, notes)


def _override_shapes(specs: list[InputSpec], input_texts: tuple[str, ...], path: str) -> list[InputSpec]:
    """``--input name:SHAPE[:dtype]`` replaces the shape (and dtype) of the named input of a folder's model; the
    inputs not named that share its dynamic axes (``attention_mask`` with ``input_ids``) take the same shape."""
    by_name = {s.name: s for s in specs}
    given = []
    for text in input_texts:
        name, shape, dtype = parse_input_spec(text)
        if name is None and len(specs) == 1:
            name = specs[0].name
        if name not in by_name:
            raise InputError(f"--input {text!r} names no input of {path}", f"model inputs: {', '.join(by_name)}")
        old = by_name[name]
        if len(shape) != len(old.shape):
            raise InputError(f"--input {name} has rank {len(shape)} but the model takes rank {len(old.shape)}",
                             f"give {len(old.shape)} dimensions")
        parts = text.split(":")
        dtype_given = len(parts) == 3 or (len(parts) == 2 and not ("x" in parts[1] or parts[1].isdigit()))
        by_name[name] = InputSpec(name, shape, dtype if dtype_given else old.dtype, old.dynamic)
        given.append(name)
    for name in given:
        src = by_name[name]
        for s in specs:
            if s.name not in given and s.dynamic == src.dynamic and len(s.shape) == len(src.shape):
                by_name[s.name] = InputSpec(s.name, src.shape, by_name[s.name].dtype, s.dynamic)
    return [by_name[s.name] for s in specs]


def _export_as_tuple(model, input_names: list[str], output_names: list[str]) -> None:
    """Make ``model(*tensors)`` call the Hugging Face forward with keywords and return the named outputs, in order.

    The class is swapped for a subclass with that ``forward`` (no wrapper module, so the
    exporter's module paths, hence node names, stay the model's own: ``encoder.layer.0...``).
    """
    cls = type(model)
    hf_forward = cls.forward

    def forward(self, *tensors, **named):
        out = hf_forward(self, **dict(zip(input_names, tensors)), **named, return_dict=True)
        return tuple(out[n] for n in output_names)

    # one named parameter per input (torch.export binds dynamic shapes to the signature's names)
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in input_names])
    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
