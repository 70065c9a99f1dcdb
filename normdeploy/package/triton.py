"""Triton Inference Server model repository entries (DESIGN.md sections 4 and 7).

Layout Triton loads::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx      (backend "onnxruntime")
    <repo>/<name>/1/model.plan      (backend "tensorrt")

``config.pbtxt`` is text-format ``inference.ModelConfig``. With a dynamic first axis the
model is batchable: ``max_batch_size`` > 0, dims exclude the batch axis, and dynamic
batching is on. Otherwise ``max_batch_size: 0`` and dims are the full shape. Other
dynamic axes are ``-1``. A TensorRT engine's ``max_batch_size`` must not exceed the MAX of
its optimization profile (``--batch MIN:OPT:MAX``); :func:`write_repository` takes it
from there.

The I/O signature is read from the ONNX model the artifact was built from (for a plan:
the lowered, precision-converted ONNX, whose names and types the engine keeps).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

import onnx

_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL",
}
#: backend -> default model file name in the version directory
MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")


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


def config_pbtxt(model: onnx.ModelProto, name: str, backend: str = "onnxruntime", max_batch_size: int = 64,
                 instance_kind: str = "KIND_CPU", instances: int = 1, *, dynamic_batching: bool = True,
                 preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int | None = None,
                 gpus: list[int] | None = None) -> str:
    """The text of ``config.pbtxt`` for ``model`` served by ``backend`` ("onnxruntime" | "tensorrt")."""
    if backend not in MODEL_FILES:
        raise ValueError(f"unknown Triton backend {backend!r}; use one of {', '.join(MODEL_FILES)}")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"unknown instance kind {instance_kind!r}; use one of {', '.join(INSTANCE_KINDS)}")
    inputs, outputs = _signature(model)
    batchable = is_batchable(model) and max_batch_size > 0
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch_size if batchable else 0}"]

    def tensor(vi: onnx.ValueInfoProto) -> str:
        dims = _dims(vi)[1:] if batchable else _dims(vi)
        dtype = _TYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise ValueError(f"tensor {vi.name} has a type Triton cannot serve")
        if not dims:  # a scalar per request: Triton wants at least one dim
            dims = [1]
            reshape = "\n    reshape: { shape: [ ] }"
        else:
            reshape = ""
        shown = ", ".join(map(str, dims))
        return f'  {{\n    name: "{vi.name}"\n    data_type: {dtype}\n    dims: [ {shown} ]{reshape}\n  }}'

    lines.append("input [\n" + ",\n".join(tensor(v) for v in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(tensor(v) for v in outputs) + "\n]")
    if batchable and dynamic_batching:
        body = []
        preferred = [b for b in (preferred_batch_sizes or []) if 0 < b <= max_batch_size]
        if preferred:
            body.append(f"  preferred_batch_size: [ {', '.join(map(str, sorted(set(preferred))))} ]")
        if max_queue_delay_us is not None:
            body.append(f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}")
        lines.append("dynamic_batching {\n" + "\n".join(body) + ("\n" if body else "") + "}" if body
                     else "dynamic_batching { }")
    group = [f"    count: {instances}", f"    kind: {instance_kind}"]
    if gpus and instance_kind == "KIND_GPU":
        group.append(f"    gpus: [ {', '.join(map(str, gpus))} ]")
    lines.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """``text`` parsed as ``inference.ModelConfig`` (needs tritonclient[grpc]); raises on unknown fields."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def write_repository(repo_dir: str, name: str, model: onnx.ModelProto, artifact: bytes | str | None = None,
                     backend: str | None = None, *, max_batch_size: int = 64, instance_kind: str | None = None,
                     instances: int = 1, version: int = 1, dynamic_batching: bool = True,
                     preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int | None = None,
                     gpus: list[int] | None = None, replace: bool = True) -> str:
    """Write ``<repo_dir>/<name>/config.pbtxt`` and ``<repo_dir>/<name>/<version>/model.(onnx|plan)``.

    ``model`` gives the I/O signature and is itself the served file for the "onnxruntime"
    backend; for "tensorrt", ``artifact`` is the serialized engine (bytes or a path to
    ``model.plan``). ``backend`` defaults to "tensorrt" when an artifact is given.
    Instances default to KIND_GPU for TensorRT and KIND_CPU for ONNX Runtime.

    All or nothing: the entry is assembled in a temporary directory beside ``repo_dir`` and
    renamed into place; an existing entry of that name is replaced only when ``replace``.
    Returns the entry's path.
    """
    backend = backend or ("tensorrt" if artifact is not None else "onnxruntime")
    if backend == "tensorrt" and artifact is None:
        raise ValueError("the tensorrt backend serves a plan: pass the engine as artifact")
    if name != model_name(name):
        raise ValueError(f"model name {name!r} is not Triton-safe; use {model_name(name)!r}")
    if version < 1:
        raise ValueError("Triton model versions start at 1")
    kind = instance_kind or ("KIND_GPU" if backend == "tensorrt" else "KIND_CPU")
    text = config_pbtxt(model, name, backend, max_batch_size, kind, instances, dynamic_batching=dynamic_batching,
                        preferred_batch_sizes=preferred_batch_sizes, max_queue_delay_us=max_queue_delay_us, gpus=gpus)
    try:  # validate against Triton's schema when tritonclient is installed
        parse_config(text)
    except ImportError:
        pass

    repo_dir = os.path.abspath(repo_dir)
    os.makedirs(repo_dir, exist_ok=True)
    final = os.path.join(repo_dir, name)
    if os.path.exists(final) and not replace:
        raise FileExistsError(f"{final} exists")
    try:  # beside the repository, so Triton's repository poller never sees a half-written entry
        scratch = os.path.dirname(repo_dir)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=scratch)
    except OSError:  # parent not writable: a hidden directory inside the repository
        scratch = repo_dir
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=scratch)
    try:
        vdir = os.path.join(tmp, str(version))
        os.makedirs(vdir)
        target = os.path.join(vdir, MODEL_FILES[backend])
        if backend == "onnxruntime":
            if model.ByteSize() > 1_800_000_000:
                onnx.save(model, target, save_as_external_data=True, location="model.onnx.data")
            else:
                onnx.save(model, target)
        elif isinstance(artifact, (bytes, bytearray, memoryview)):
            with open(target, "wb") as f:
                f.write(bytes(artifact))
        else:
            shutil.copyfile(artifact, target)
        with open(os.path.join(tmp, "config.pbtxt"), "w") as f:
            f.write(text)
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=scratch)
            os.rename(final, os.path.join(old, name))
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
