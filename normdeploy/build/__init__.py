"""Stage ``build``: a lowered ONNX model becomes something that runs.

Every runner has the same face: ``input_names``, ``output_names`` and
``run(feed) -> list[np.ndarray]``, so verify and bench never care what is behind it.

* :class:`OrtRunner`: an ONNX Runtime session (``ort-cpu`` here; ``ort-cuda``/``ort-trt``
  pick those execution providers), sequential execution, a fixed thread count.
* :class:`TorchRunner`: the original torch module in eval mode (export fidelity).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx

from ..core.errors import InputError, UnsupportedError
from ..core.graph import LARGE_MODEL_BYTES, to_proto, weight_bytes

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def default_threads() -> int:
    import os

    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


class OrtRunner:
    def __init__(self, model, target: str = "ort-cpu", threads: int | None = None,
                 graph_optimization: str = "all", providers: list | None = None):
        """``model``: an ``onnx_ir.Model``, an ``onnx.ModelProto``, serialized bytes, or a path to an .onnx file.

        An in-memory model larger than :data:`normdeploy.core.graph.LARGE_MODEL_BYTES` is written to a temporary
        directory with external data and the session is created from the file (a protobuf
        cannot hold it); smaller ones are serialized in memory.
        """
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        so.log_severity_level = 3
        missing = [p for p in PROVIDERS[target][:-1] if p not in ort.get_available_providers()]
        if missing:
            raise UnsupportedError(f"target {target} needs ONNX Runtime's {missing[0]}, which this install lacks",
                                   "install onnxruntime-gpu on a CUDA host, or use --target ort-cpu")
        self._tmp = None
        data = self._session_source(model)
        try:
            self.session = ort.InferenceSession(data, so, providers=providers or PROVIDERS[target])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedError(f"ONNX Runtime cannot load the model: {first[:300]}",
                                   "an op or type may be unsupported by this runtime; run inspect to see which") from None
        self.threads = so.intra_op_num_threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_meta = {i.name: i for i in self.session.get_inputs()}

    def _session_source(self, model):
        import onnx_ir as ir

        if isinstance(model, (bytes, str)):
            return model
        if isinstance(model, onnx.ModelProto):
            return model.SerializeToString()
        if isinstance(model, ir.Model):
            if weight_bytes(model) <= LARGE_MODEL_BYTES:
                return to_proto(model).SerializeToString()
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="normdeploy-session-")
            path = f"{self._tmp.name}/model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return path
        raise TypeError(f"cannot build an ONNX Runtime session from a {type(model).__name__}")

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        for name, meta in self._input_meta.items():
            if name not in feed:
                raise InputError(f"no data for model input {name}", f"the model takes {', '.join(self.input_names)}")
            shape = feed[name].shape
            if len(shape) != len(meta.shape):
                raise InputError(f"input {name} has rank {len(shape)}, the model expects {len(meta.shape)} "
                                 f"({meta.shape})", "fix --input or the data file")
            for i, (s, m) in enumerate(zip(shape, meta.shape)):
                if isinstance(m, int) and m != s:
                    raise InputError(f"input {name} dimension {i} is {s}, the model fixes it to {m} ({meta.shape})",
                                     "fix --input or the data file")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: v for k, v in feed.items() if k in self._input_meta})


class TorchRunner:
    def __init__(self, module, input_names: list[str], output_names: list[str]):
        self.module, self.input_names, self.output_names = module, input_names, output_names

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names))
        outs = out if isinstance(out, (tuple, list)) else [out]
        flat = []
        for o in outs:
            if isinstance(o, dict):
                flat.extend(v for v in o.values())
            else:
                flat.append(o)
        return [o.detach().numpy() for o in flat if hasattr(o, "detach")]
