"""Triton Python-backend model written by normdeploy: runs model.onnx beside it with ONNX Runtime.

This file is copied into ``<repo>/<name>/<version>/model.py`` and runs inside Triton's
Python backend stub, in the serving environment (numpy < 2 for tritonserver 2.51, and
onnxruntime); it never imports normdeploy. Everything comes from config.pbtxt: the ONNX
file, the thread count and the graph optimization level from its ``parameters``, the tensors and ``max_batch_size``
from its ``input``/``output`` sections.

Requests the dynamic batcher hands over together are grouped by their non-batch shapes,
concatenated along axis 0, run once, and the outputs split back per request. A request
that cannot be served gets an error response of its own (INVALID_ARG); the others of the
same call are still answered, and ``execute`` never raises.
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _error(message):
    try:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
    except (AttributeError, TypeError):  # stubs before error codes: the message alone
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        self._check_numpy()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_num_threads", "1"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        level = params.get("graph_optimization_level", "all")  # what normdeploy verified and timed model.onnx with
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.max_batch = int(config.get("max_batch_size", 0))
        self.inputs = [(t["name"], np.dtype(pb_utils.triton_string_to_numpy(t["data_type"])), self._dims(t))
                       for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        onnx_inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n, _, _ in self.inputs if n not in onnx_inputs]
        if missing:
            raise pb_utils.TritonModelException(f"config inputs {missing} are not inputs of {path}")
        self.scalars = {n for n, i in onnx_inputs.items() if list(i.shape) == []}
        pb_utils.Logger.log_info(
            f"normdeploy model.py: {path} on onnxruntime {ort.__version__}, numpy {np.__version__}, python "
            f"{sys.version.split()[0]}, intra_op_num_threads {options.intra_op_num_threads}")

    @staticmethod
    def _check_numpy():
        """Refuse to load where the stub mangles numpy arrays (tritonserver 2.51's stub under numpy 2: zeros)."""
        probe = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
        back = pb_utils.Tensor.from_dlpack("probe", pb_utils.Tensor("probe", probe).to_dlpack()).as_numpy()
        if back.shape != probe.shape or not np.array_equal(back, probe):
            raise pb_utils.TritonModelException(
                f"numpy {np.__version__} does not round-trip through this Python backend stub (sent "
                f"{probe.ravel().tolist()}, got {back.ravel().tolist()}): install numpy<2 in the serving environment")

    def _dims(self, tensor):
        dims = [int(d) for d in (tensor["reshape"]["shape"] if "reshape" in tensor else tensor["dims"])]
        return ([-1] if self.max_batch > 0 else []) + dims

    def _read(self, request):
        """The request's inputs as {name: array}, or the message of why it cannot be served."""
        feeds = {}
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return f"missing input '{name}'"
            a = tensor.as_numpy()
            if a.dtype != dtype:
                return f"input '{name}': data type {a.dtype}, expected {dtype}"
            if a.ndim != len(dims) or any(d not in (-1, s) for d, s in zip(dims, a.shape)):
                return f"input '{name}': shape {list(a.shape)}, expected {dims}"
            if self.max_batch > 0 and not 1 <= a.shape[0] <= self.max_batch:
                return f"input '{name}': batch {a.shape[0]} outside 1..{self.max_batch}"
            if self.max_batch == 0 and name in self.scalars:
                a = a.reshape(())  # an ONNX scalar, given as [1] (a non-batching config cannot say [])
            feeds[name] = a
        if self.max_batch > 0 and len({a.shape[0] for a in feeds.values()}) > 1:
            return "inputs disagree on the batch size"
        return feeds

    def _respond(self, outs):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(n, np.ascontiguousarray(outs[n]).reshape(outs[n].shape or (1,))) for n in self.outputs])

    def _run_one(self, feeds):
        try:
            return self._respond(dict(zip(self.outputs, self.session.run(self.outputs, feeds))))
        except Exception as e:  # noqa: BLE001 - onnxruntime refused what the config let through
            return _error(f"onnxruntime: {e}")

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}  # non-batch shapes -> [(index, feeds)]: only same-shaped requests are joined
        for i, request in enumerate(requests):
            feeds = self._read(request)
            if isinstance(feeds, str):
                responses[i] = _error(feeds)
            elif self.max_batch == 0:
                responses[i] = self._run_one(feeds)
            else:
                key = tuple((n, a.shape[1:]) for n, a in sorted(feeds.items()))
                groups.setdefault(key, []).append((i, feeds))
        for members in groups.values():
            if len(members) == 1:
                responses[members[0][0]] = self._run_one(members[0][1])
                continue
            sizes = [next(iter(f.values())).shape[0] for _, f in members]
            joined = {n: np.concatenate([f[n] for _, f in members]) for n in members[0][1]}
            try:
                outs = dict(zip(self.outputs, self.session.run(self.outputs, joined)))
                if any(o.ndim == 0 or o.shape[0] != sum(sizes) for o in outs.values()):
                    raise ValueError("an output has no batch axis to split")
            except Exception:  # noqa: BLE001 - one bad member must not sink the rest: run them alone
                for i, feeds in members:
                    responses[i] = self._run_one(feeds)
                continue
            start = 0
            for (i, _), n in zip(members, sizes):
                responses[i] = self._respond({k: v[start:start + n] for k, v in outs.items()})
                start += n
        return responses

    def finalize(self):
        self.session = None
