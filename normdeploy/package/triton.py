"""Triton Inference Server model repository entries (DESIGN.md sections 4 and 7).

Layout Triton loads::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx               (backend "onnxruntime")
    <repo>/<name>/1/model.plan               (backend "tensorrt")
    <repo>/<name>/1/model.py + model.onnx    (backend "python": :mod:`.triton_python`)
    <repo>/<name>/1/model.xml + model.bin    (backend "openvino": OpenVINO IR, the ``openvino`` target)

``config.pbtxt`` is text-format ``inference.ModelConfig``. Batching follows what the served
artifact accepts:

* ONNX (ONNX Runtime and Python backends): the model is batchable when every input and
  output has a dynamic first axis; then ``max_batch_size`` > 0, dims exclude the batch axis
  and dynamic batching is on. Otherwise ``max_batch_size: 0`` and dims are the full shape.
  Other dynamic axes are ``-1``.
* TensorRT: the engine accepts what its optimization profile (profile 0, the one Triton
  uses by default) allows. Batching needs a dynamic first axis everywhere and a profile
  whose batch starts at 1 (the dynamic batcher forms any batch from 1 up); then
  ``max_batch_size`` is the profile's MAX batch (Triton's ``tensorrt_backend`` refuses a
  larger one: "configuration specified max-batch X but TensorRT engine only supports
  max-batch Y"). An axis the profile fixes (MIN == MAX) has that size in the dims, one it
  leaves open is ``-1``. A fixed-batch profile (``--input`` batch B without ``--batch``,
  B > 1) gives ``max_batch_size: 0`` and dims ``[B, ...]``.

* OpenVINO (``triton-inference-server/openvino_backend``, read from its source): it reads
  ``<version>/model.xml`` (OpenVINO IR, its default; ``default_model_filename`` may name a
  ``model.onnx`` instead in recent releases; normdeploy writes IR, which every release reads,
  with weights kept f32: ``compress_to_fp16=False``), runs KIND_CPU instances only, and with
  ``max_batch_size`` > 0 fixes the model's batch to ``max_batch_size`` (``ov::set_batch``) and
  refuses any request whose batch differs unless ``ENABLE_BATCH_PADDING`` pads it. So the entry is
  written with ``max_batch_size: 0`` and full dims (``-1`` for a dynamic axis, which OpenVINO keeps
  dynamic): every request runs at its own batch, with no batching across requests. Scalar inputs
  are refused (the backend does not support them). Its parameters are ``PERFORMANCE_HINT``
  (LATENCY), ``INFERENCE_NUM_THREADS`` and ``NUM_STREAMS`` (1); it has none that pins f32
  (only ``HINT_BF16: YES``), so on a CPU with AMX or AVX512-BF16 OpenVINO may compute in bf16
  there, which :data:`OPENVINO_PRECISION_NOTE` says in the report.

Dynamic batching is written only where ``max_batch_size`` > 1, preferred batch sizes only
inside ``1..max_batch_size``. :func:`check_entry` holds every entry to what the server
checks at load (names, types, ranks and sizes against the model or the engine profile,
batching, instance kinds, scalars) and :func:`write_repository` refuses (:class:`EntryError`)
what it would reject, before anything is written.

The I/O signature is read from the ONNX model the artifact was built from (for a plan:
the lowered, precision-converted ONNX, whose names and types the engine keeps).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

import onnx

from ..core.graph import save_model, signature
from . import files

_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL",
}
#: backend -> the file Triton loads from the version directory (the Python backend's model.py
#: loads model.onnx beside it)
MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py", "openvino": "model.xml"}
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")
#: instance kinds each backend can run (TensorRT: "does not support KIND_CPU at all"; normdeploy's
#: model.py runs ONNX Runtime's CPU provider)
BACKEND_KINDS = {"onnxruntime": INSTANCE_KINDS, "tensorrt": ("KIND_GPU",), "python": ("KIND_CPU",),
                 "openvino": ("KIND_CPU",)}  # openvino_backend: "supports only Kind CPU"
#: what the report says of an OpenVINO entry's precision (see the module docstring)
OPENVINO_PRECISION_NOTE = ("Triton's OpenVINO backend has no parameter that pins f32 (only HINT_BF16), so it runs "
                           "OpenVINO's CPU default: f32 on CPUs without bf16 units, possibly bf16 on CPUs with AMX or "
                           "AVX512-BF16; normdeploy verified and timed the model at f32")
DEFAULT_MAX_BATCH = 64
#: ``--ort-graph-optimization`` -> ``optimization { graph { level: N } }`` of the onnxruntime backend. Its
#: src/onnxruntime.cc maps -1 to ORT_ENABLE_BASIC, 1 to ORT_ENABLE_EXTENDED, 2 to ORT_DISABLE_ALL and
#: anything else (or no ``graph`` block) to ORT_ENABLE_ALL; None: the block is left out (the default, all)
TRITON_GRAPH_LEVEL = {"disable": 2, "basic": -1, "extended": 1, "all": None}


class EntryError(ValueError):
    """An entry Triton Inference Server would refuse to load; the message says why."""


def model_name(text: str) -> str:
    """A Triton-safe model name: letters, digits, '_' and '-' only."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return name or "model"


def _dims(vi: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def _signature(model: onnx.ModelProto) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits], list(model.graph.output)


def is_batchable(model: onnx.ModelProto) -> bool:
    """Every input and output has a dynamic first axis (the batch)."""
    inputs, outputs = _signature(model)
    return all(_dims(v) and _dims(v)[0] == -1 for v in inputs + outputs)


def profile_shapes(profile) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """``{input: (min, opt, max)}`` of an engine profile: a :class:`normdeploy.build.trt.Profile`, its
    JSON form (``BuildInfo.profiles[0]``, ``{input: {"min", "opt", "max"}}``), a list of those (the
    first counts), or None / [] (no profile, a static engine: {})."""
    if isinstance(profile, (list, tuple)):  # all the engine's profiles: Triton uses profile 0 unless told otherwise
        profile = profile[0] if profile else None
    if not profile:
        return {}
    shapes = getattr(profile, "shapes", profile)
    out = {}
    for name, s in shapes.items():
        lo, opt, hi = (s["min"], s["opt"], s["max"]) if isinstance(s, dict) else s
        out[name] = (list(lo), list(opt), list(hi))
    return out


# ----------------------------------------------------------------------------- the entry

@dataclass
class Tensor:
    """One ``input``/``output`` of config.pbtxt."""

    name: str
    data_type: str
    dims: list[int]
    reshape: list[int] | None = None  # [] for a scalar per request of a batching model

    def to_pbtxt(self) -> str:
        reshape = "" if self.reshape is None else f"\n    reshape: {{ shape: [ {', '.join(map(str, self.reshape))} ] }}"
        return (f'  {{\n    name: "{self.name}"\n    data_type: {self.data_type}\n'
                f'    dims: [ {", ".join(map(str, self.dims))} ]{reshape}\n  }}')


@dataclass
class Entry:
    """What ``config.pbtxt`` says; :meth:`to_pbtxt` is its text, :meth:`to_json` its summary in report.json."""

    name: str
    backend: str
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    dynamic_batching: bool = False
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_delay_us: int | None = None
    instance_kind: str = "KIND_CPU"
    instances: int = 1
    gpus: list[int] | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    graph_level: int | None = None  # onnxruntime backend: optimization { graph { level } } (TRITON_GRAPH_LEVEL)

    def to_pbtxt(self) -> str:
        lines = [f'name: "{self.name}"', f'backend: "{self.backend}"', f"max_batch_size: {self.max_batch_size}",
                 "input [\n" + ",\n".join(t.to_pbtxt() for t in self.inputs) + "\n]",
                 "output [\n" + ",\n".join(t.to_pbtxt() for t in self.outputs) + "\n]"]
        if self.dynamic_batching:
            body = []
            if self.preferred_batch_sizes:
                body.append(f"  preferred_batch_size: [ {', '.join(map(str, self.preferred_batch_sizes))} ]")
            if self.max_queue_delay_us is not None:
                body.append(f"  max_queue_delay_microseconds: {int(self.max_queue_delay_us)}")
            lines.append("dynamic_batching {\n" + "\n".join(body) + "\n}" if body else "dynamic_batching { }")
        group = [f"    count: {self.instances}", f"    kind: {self.instance_kind}"]
        if self.gpus and self.instance_kind == "KIND_GPU":
            group.append(f"    gpus: [ {', '.join(map(str, self.gpus))} ]")
        lines.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
        if self.graph_level is not None:
            lines.append(f"optimization {{\n  graph {{ level: {int(self.graph_level)} }}\n}}")
        lines += [f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}'
                  for k, v in self.parameters.items()]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"name": self.name, "backend": self.backend, "max_batch_size": self.max_batch_size,
                "dynamic_batching": self.dynamic_batching, "preferred_batch_sizes": list(self.preferred_batch_sizes),
                "inputs": {t.name: t.dims for t in self.inputs}, "outputs": {t.name: t.dims for t in self.outputs},
                "instance_kind": self.instance_kind, "instances": self.instances, "parameters": dict(self.parameters),
                "graph_level": self.graph_level}


def plan_entry(model: onnx.ModelProto, name: str, backend: str = "onnxruntime", max_batch_size: int | None = None,
               instance_kind: str | None = None, instances: int = 1, *, profile=None, dynamic_batching: bool = True,
               preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int | None = None,
               gpus: list[int] | None = None, parameters: dict[str, str] | None = None,
               graph_level: int | None = None) -> Entry:
    """The entry serving ``model`` (or the engine built from it with ``profile``) with ``backend``.

    ``graph_level`` (onnxruntime backend): the session graph optimization level as Triton spells it
    (:data:`TRITON_GRAPH_LEVEL`); None leaves ONNX Runtime's default (all).

    ``max_batch_size`` None: 64 for ONNX, the profile's MAX batch for an engine; a model
    that cannot batch gets 0 whatever is asked. Not checked here: see :func:`check_entry`.
    """
    if backend not in MODEL_FILES:
        raise ValueError(f"unknown Triton backend {backend!r}; use one of {', '.join(MODEL_FILES)}")
    kind = instance_kind or ("KIND_GPU" if backend == "tensorrt" else "KIND_CPU")
    if kind not in INSTANCE_KINDS:
        raise ValueError(f"unknown instance kind {kind!r}; use one of {', '.join(INSTANCE_KINDS)}")
    inputs, outputs = _signature(model)
    shapes = profile_shapes(profile) if backend == "tensorrt" else {}
    batchable = is_batchable(model) and backend != "openvino"  # it would fix the batch: module docstring
    if shapes:
        batchable = batchable and all(n.name in shapes and shapes[n.name][0][:1] == [1] for n in inputs)
        default_max = min(shapes[n.name][2][0] for n in inputs) if batchable else 0
    else:
        default_max = DEFAULT_MAX_BATCH
    mbs = (default_max if max_batch_size is None else int(max_batch_size)) if batchable else 0
    batching = mbs > 0

    def tensor(vi: onnx.ValueInfoProto, is_input: bool) -> Tensor:
        dims = _dims(vi)
        if is_input and vi.name in shapes and len(shapes[vi.name][0]) == len(dims):
            lo, _, hi = shapes[vi.name]
            dims = [a if a == b else -1 for a, b in zip(lo, hi)]  # what the profile fixes, else open
        dims = dims[1:] if batching else dims
        dtype = _TYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise EntryError(f"tensor {vi.name} has ONNX type {vi.type.tensor_type.elem_type}, which Triton "
                             "cannot serve")
        if not dims:  # Triton wants at least one dim
            # batching: a scalar per request is [1] reshaped to []; not batching: Triton's core refuses an
            # empty reshape ("scalar tensors are not supported"), and the ONNX backends take [1] for a scalar
            return Tensor(vi.name, dtype, [1], [] if batching else None)
        return Tensor(vi.name, dtype, dims)

    dyn = bool(dynamic_batching and mbs > 1)
    preferred = sorted({int(b) for b in (preferred_batch_sizes or []) if 0 < int(b) <= mbs}) if dyn else []
    return Entry(name, backend, mbs, [tensor(v, True) for v in inputs], [tensor(v, False) for v in outputs],
                 dyn, preferred, max_queue_delay_us if dyn else None, kind, int(instances), gpus,
                 dict(parameters or {}), graph_level)


def check_entry(entry: Entry, model: onnx.ModelProto, profile=None) -> None:
    """Raise :class:`EntryError` for what Triton Inference Server would refuse in ``entry``.

    Mirrors the load-time checks of Triton's core (``model_config_utils.cc``: names,
    dims, reshape, dynamic batching), its ONNX Runtime backend (exact inputs, types,
    dims against the model, a dynamic first axis for batching) and its TensorRT backend
    (KIND_GPU, ``max_batch_size`` within the profile's MAX batch, dims within the profile),
    plus what normdeploy's Python-backend model.py needs (KIND_CPU, numpy types: no BF16).
    """
    def fail(why: str):
        raise EntryError(f"Triton entry {entry.name!r} ({entry.backend}): {why}")

    if entry.name != model_name(entry.name):
        fail(f"the name is not Triton-safe; use {model_name(entry.name)!r}")
    if entry.backend not in MODEL_FILES:
        fail(f"unknown backend; use one of {', '.join(MODEL_FILES)}")
    if entry.instance_kind not in BACKEND_KINDS[entry.backend]:
        kinds = ", ".join(BACKEND_KINDS[entry.backend])
        fail(f"instance kind {entry.instance_kind} is not one the backend runs ({kinds})")
    if entry.instances < 1:
        fail("an instance group needs count >= 1")
    if entry.graph_level is not None:
        if entry.backend != "onnxruntime":
            fail("optimization { graph { level } } is read by the onnxruntime backend only")
        if entry.graph_level not in (-1, 1, 2):
            fail(f"graph optimization level {entry.graph_level} is none the onnxruntime backend knows (-1, 1, 2)")
    mbs = entry.max_batch_size
    if mbs < 0:
        fail(f"max_batch_size {mbs} is negative")
    inputs, outputs = _signature(model)
    if entry.backend == "openvino":
        if mbs > 0:
            fail(f"max_batch_size {mbs}: the OpenVINO backend would fix the model's batch to {mbs} and refuse "
                 "requests of any other batch (unless ENABLE_BATCH_PADDING pads them); write max_batch_size 0")
        scalars = [v.name for v in inputs if not _dims(v)]
        if scalars:
            fail(f"input {scalars[0]} is a scalar, which the OpenVINO backend does not support")
    if [t.name for t in entry.inputs] != [v.name for v in inputs]:
        fail(f"inputs {[t.name for t in entry.inputs]} are not the model's inputs {[v.name for v in inputs]}")
    model_outputs = {v.name: v for v in outputs}
    unknown = [t.name for t in entry.outputs if t.name not in model_outputs]
    if unknown or not entry.outputs:
        fail(f"outputs {unknown or '[]'} are not outputs of the model ({', '.join(model_outputs)})")
    shapes = profile_shapes(profile) if entry.backend == "tensorrt" else {}
    by_name = {v.name: v for v in inputs + outputs}
    for t in entry.inputs + entry.outputs:
        vi = by_name[t.name]
        want = _TYPES.get(vi.type.tensor_type.elem_type)
        if t.data_type != want:
            fail(f"tensor {t.name} is {t.data_type} in the config but {want} in the model")
        if entry.backend == "python" and t.data_type == "TYPE_BF16":
            fail(f"tensor {t.name} is bfloat16, which the Python backend's numpy cannot hold")
        if not t.dims or any(d == 0 or d < -1 for d in t.dims):
            fail(f"tensor {t.name} has dims {t.dims}: each dim must be positive or -1, and there must be one")
        model_dims = _dims(vi)
        if mbs > 0:
            if not model_dims or model_dims[0] != -1:
                fail(f"max_batch_size {mbs} but the first axis of {t.name} ({model_dims}) is not a dynamic batch axis")
            model_dims = model_dims[1:]
        if t.reshape is not None:
            if mbs == 0 and not t.reshape:
                fail(f"tensor {t.name}: an empty reshape on a model that does not batch (Triton: scalar tensors "
                     "are not supported)")
            shown = t.reshape
        elif not model_dims and t.dims == [1] and entry.backend != "tensorrt":
            continue  # an ONNX scalar, given as [1] (ONNX Runtime backend, model.py)
        else:
            shown = t.dims
        if len(shown) != len(model_dims) or any(m != -1 and d != -1 and m != d for m, d in zip(model_dims, shown)):
            fail(f"tensor {t.name} has dims {t.dims} in the config but the model expects "
                 f"{model_dims} {'after the batch axis' if mbs > 0 else ''}".rstrip())
        if t.name in shapes and t in entry.inputs:
            lo, _, hi = shapes[t.name]
            off = 1 if mbs > 0 else 0
            if len(lo) != len(shown) + off:
                fail(f"input {t.name}: the engine profile has rank {len(lo)}, the config {len(shown) + off}")
            for axis, d in enumerate(shown):
                if d != -1 and not lo[axis + off] <= d <= hi[axis + off]:
                    fail(f"input {t.name}: dim {d} lies outside the engine profile's "
                         f"{lo[axis + off]}..{hi[axis + off]} on axis {axis + off}")
    if entry.backend == "tensorrt" and shapes:
        missing = [v.name for v in inputs if v.name not in shapes]
        if missing:
            fail(f"the engine profile has no shapes for {', '.join(missing)}")
        engine_max = min(shapes[v.name][2][0] for v in inputs)
        if mbs > engine_max:
            fail(f"configuration specified max-batch {mbs} but TensorRT engine only supports max-batch {engine_max} "
                 "(its profile's MAX batch)")
        if mbs > 0 and any(shapes[v.name][0][0] != 1 for v in inputs):
            fail(f"the engine profile starts at batch {min(shapes[v.name][0][0] for v in inputs)}, but with "
                 f"max_batch_size {mbs} Triton sends batches from 1")
    elif entry.backend == "tensorrt" and mbs > 0 and profile is not None:
        fail(f"max_batch_size {mbs} but the engine has fixed shapes (no optimization profile)")
    if entry.dynamic_batching and mbs < 1:
        fail("dynamic batching on a model that does not batch (max_batch_size 0)")
    bad = [b for b in entry.preferred_batch_sizes if not 0 < b <= mbs]
    if bad:
        fail(f"preferred batch sizes {bad} lie outside 1..max_batch_size {mbs}")


def config_pbtxt(model: onnx.ModelProto, name: str, backend: str = "onnxruntime", max_batch_size: int | None = None,
                 instance_kind: str = "KIND_CPU", instances: int = 1, *, profile=None, dynamic_batching: bool = True,
                 preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int | None = None,
                 gpus: list[int] | None = None, parameters: dict[str, str] | None = None,
                 graph_level: int | None = None) -> str:
    """The text of ``config.pbtxt`` for ``model`` served by ``backend`` (see :func:`plan_entry`)."""
    return plan_entry(model, name, backend, max_batch_size, instance_kind, instances, profile=profile,
                      dynamic_batching=dynamic_batching, preferred_batch_sizes=preferred_batch_sizes,
                      max_queue_delay_us=max_queue_delay_us, gpus=gpus, parameters=parameters,
                      graph_level=graph_level).to_pbtxt()


def parse_config(text: str):
    """``text`` parsed as ``inference.ModelConfig`` (needs tritonclient[grpc]); raises on unknown fields."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _check_schema(text: str) -> None:
    try:  # validate against Triton's schema when tritonclient is installed
        parse_config(text)
    except ImportError:
        pass


# ----------------------------------------------------------------------------- writing

def write_repository(repo_dir: str, name: str, model, artifact: bytes | str | None = None,
                     backend: str | None = None, *, max_batch_size: int | None = None, profile=None,
                     instance_kind: str | None = None, instances: int = 1, version: int = 1,
                     dynamic_batching: bool = True, preferred_batch_sizes: list[int] | None = None,
                     max_queue_delay_us: int | None = None, gpus: list[int] | None = None,
                     parameters: dict[str, str] | None = None, intra_op_threads: int = 1,
                     graph_level: int | None = None, replace: bool = True) -> str:
    """Write ``<repo_dir>/<name>/config.pbtxt`` and ``<repo_dir>/<name>/<version>/model.*``.

    ``model`` (an ``onnx.ModelProto`` or ``onnx_ir.Model``) gives the I/O signature and is itself the served
    file for the "onnxruntime"
    and "python" backends (the Python backend runs it with ONNX Runtime: :mod:`.triton_python`,
    ``intra_op_threads`` per instance); for "tensorrt", ``artifact`` is the serialized
    engine (bytes or a path to ``model.plan``) and ``profile`` the optimization profile it
    was built with. ``backend`` defaults to "tensorrt" when an artifact is given.

    The entry is checked (:func:`check_entry`) before anything is written; an entry the
    server would refuse raises :class:`EntryError`. All or nothing: the entry is assembled
    in a temporary directory beside ``repo_dir`` and renamed into place; an existing entry
    of that name is replaced only when ``replace``. Directories get the umask's mode.
    Returns the entry's path.
    """
    backend = backend or ("tensorrt" if artifact is not None else "onnxruntime")
    if backend not in MODEL_FILES:
        raise ValueError(f"unknown Triton backend {backend!r}; use one of {', '.join(MODEL_FILES)}")
    if backend == "tensorrt" and artifact is None:
        raise ValueError("the tensorrt backend serves a plan: pass the engine as artifact")
    if name != model_name(name):
        raise ValueError(f"model name {name!r} is not Triton-safe; use {model_name(name)!r}")
    if version < 1:
        raise ValueError("Triton model versions start at 1")
    params = dict(parameters or {})
    if backend == "python":
        from .triton_python import entry_parameters

        params = {**entry_parameters(intra_op_threads), **params}
    sig = signature(model)  # inputs and outputs only, weights left out
    entry = plan_entry(sig, name, backend, max_batch_size, instance_kind, instances, profile=profile,
                       dynamic_batching=dynamic_batching, preferred_batch_sizes=preferred_batch_sizes,
                       max_queue_delay_us=max_queue_delay_us, gpus=gpus, parameters=params, graph_level=graph_level)
    check_entry(entry, sig, profile)
    text = entry.to_pbtxt()
    _check_schema(text)

    def fill(vdir: str) -> None:
        if backend == "tensorrt":
            target = os.path.join(vdir, MODEL_FILES[backend])
            if isinstance(artifact, (bytes, bytearray, memoryview)):
                with open(target, "wb") as f:
                    f.write(bytes(artifact))
            else:
                shutil.copyfile(artifact, target)
            return
        if backend == "openvino":
            from ..build.openvino import save_ir

            save_ir(model, os.path.join(vdir, MODEL_FILES[backend]))  # model.xml + model.bin, weights f32
            return
        save_model(model, os.path.join(vdir, "model.onnx"))  # external data for large models
        if backend == "python":
            from .triton_python import write_model_py

            write_model_py(vdir)

    return _write_entry(repo_dir, name, version, text, fill, replace)


def _write_entry(repo_dir: str, name: str, version: int, text: str, fill, replace: bool) -> str:
    """Assemble the entry in a marked scratch directory and put it in place (:func:`.files.replace_dir`).

    An existing entry is replaced only when ``replace`` and when normdeploy wrote it (it carries
    :data:`.files.MARKER`; a hand-written entry of the same name is refused, never deleted).
    Scratch left beside the repository by a writer that was killed is removed first.
    """
    repo_dir = os.path.abspath(repo_dir)
    os.makedirs(repo_dir, exist_ok=True)
    final = os.path.join(repo_dir, name)
    if os.path.lexists(final) and not replace:
        raise FileExistsError(f"{final} exists")
    files.check_replaceable(final, "Triton entry")
    # beside the repository, so Triton's repository poller never sees a half-written entry;
    # where that parent is not writable, a hidden directory inside the repository
    made: list[str] = []  # the scratch directory, known as soon as it exists
    for scratch, base in ((os.path.dirname(repo_dir), f"{os.path.basename(repo_dir)}.{name}"), (repo_dir, name)):
        files.clean_stale(scratch, base, dest=final)
        try:
            tmp = files.make_scratch(base, "tmp", scratch, role="entry", record=made)
            break
        except OSError:
            for d in made:
                files.remove_scratch(d)
            made.clear()
            if scratch == repo_dir:
                raise
        except BaseException:
            for d in made:
                files.remove_scratch(d)
            raise
    try:
        vdir = os.path.join(tmp, str(version))
        os.makedirs(vdir)
        fill(vdir)
        with open(os.path.join(tmp, "config.pbtxt"), "w") as f:
            f.write(text)
        files.replace_dir(tmp, final, "Triton entry", scratch=scratch, base=base)
    except BaseException:
        files.remove_scratch(tmp)
        raise
    return final
