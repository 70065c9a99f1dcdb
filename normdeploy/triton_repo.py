"""Triton Inference Server model repository entries (DESIGN.md sections 4 and 7).

Layout Triton loads::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx      (backend "onnxruntime")
    <repo>/<name>/1/model.plan      (backend "tensorrt")

``config.pbtxt`` is text-format ``inference.ModelConfig``. With a dynamic first axis the
model is batchable: ``max_batch_size`` > 0, dims exclude the batch axis, and dynamic
batching is on. Otherwise ``max_batch_size: 0`` and dims are the full shape.
"""
from __future__ import annotations

import re

import onnx

_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def model_name(text: str) -> str:
    """A Triton-safe model name: letters, digits, '_' and '-' only."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return name or "model"


def _dims(vi: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def config_pbtxt(model: onnx.ModelProto, name: str, backend: str = "onnxruntime", max_batch_size: int = 64,
                 instance_kind: str = "KIND_CPU", instances: int = 1) -> str:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    batchable = all(_dims(v) and _dims(v)[0] == -1 for v in list(inputs) + list(model.graph.output))
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch_size if batchable else 0}"]

    def tensor(vi: onnx.ValueInfoProto) -> str:
        dims = _dims(vi)[1:] if batchable else _dims(vi)
        dtype = _TYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise ValueError(f"tensor {vi.name} has a type Triton cannot serve")
        return f'  {{\n    name: "{vi.name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'

    lines.append("input [\n" + ",\n".join(tensor(v) for v in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(tensor(v) for v in model.graph.output) + "\n]")
    if batchable:
        lines.append("dynamic_batching { }")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {instance_kind}\n  }}\n]")
    return "\n".join(lines) + "\n"
