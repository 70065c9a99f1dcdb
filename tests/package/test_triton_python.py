"""normdeploy.package.triton_python and its model.py (triton_python_model.py), in process.

model.py runs inside Triton's Python backend stub; here it runs against a stand-in for
``triton_python_backend_utils`` that keeps the stub's face (Tensor, InferenceResponse,
TritonError, get_input_tensor_by_name, triton_string_to_numpy), fed the JSON model config
Triton hands to ``initialize``. Each response is compared with ONNX Runtime in-process on
the same inputs; tests/serve runs the same file in a real tritonserver.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from normdeploy.package.triton import parse_config, write_repository
from normdeploy.package.triton_python import MODEL_PY, served_onnx
from tests.conftest import MODELS, ort_run

pytest.importorskip("tritonclient.grpc.model_config_pb2")


class _Error:
    INVALID_ARG, INTERNAL = 3, 13

    def __init__(self, message, code=13):
        self.msg, self.code = message, code

    def message(self):
        return self.msg


class _Tensor:
    def __init__(self, name, array):
        self._name, self._a = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._a

    def to_dlpack(self):
        return self._a.__dlpack__()

    @classmethod
    def from_dlpack(cls, name, capsule):
        return cls(name, np.from_dlpack(types.SimpleNamespace(__dlpack__=lambda **_: capsule,
                                                              __dlpack_device__=lambda: (1, 0))))


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.outputs, self.error = output_tensors or [], error

    def output(self, name):
        return next(t.as_numpy() for t in self.outputs if t.name() == name)


class _Request:
    def __init__(self, **arrays):
        self.tensors = {k: _Tensor(k, v) for k, v in arrays.items()}


def _pb_utils():
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.InferenceResponse, mod.TritonError = _Tensor, _Response, _Error
    mod.TritonModelException = type("TritonModelException", (Exception,), {})
    mod.Logger = types.SimpleNamespace(log_info=lambda msg: None)
    mod.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    mod.triton_string_to_numpy = lambda t: {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_FP16": np.float16}[t]
    return mod


def _load(entry: str, monkeypatch):
    """model.py of ``entry`` initialized as the stub does: model_config as JSON, repository and version."""
    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
    spec = importlib.util.spec_from_file_location("normdeploy_model_py", os.path.join(entry, "1", "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = parse_config(open(os.path.join(entry, "config.pbtxt")).read())
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True),
                      "model_repository": entry, "model_version": "1"})
    return model


@pytest.fixture(scope="module")
def digits():
    from normdeploy import pipeline

    return pipeline.optimize(os.path.join(MODELS, "digits_cnn_bn_un.pt"), pipeline.Options.from_flat(bench=False))


def test_model_py_batches_and_splits_like_onnxruntime(tmp_path, monkeypatch, digits):
    entry = write_repository(str(tmp_path / "repo"), "digits", digits.optimized, backend="python", max_batch_size=16)
    model = _load(entry, monkeypatch)
    x = np.load(os.path.join(MODELS, "digits_test.npz"))["input"]
    sizes = [1, 3, 16, 2]
    chunks = np.split(x[:sum(sizes)], np.cumsum(sizes)[:-1])
    bad = [_Request(input=np.zeros((2, 1, 8, 9), np.float32)),       # wrong shape
           _Request(input=np.zeros((2, 1, 8, 8), np.float64)),       # wrong dtype
           _Request(inp=x[:1]),                                      # wrong name
           _Request(input=np.zeros((17, 1, 8, 8), np.float32))]      # batch above max_batch_size
    requests = [_Request(input=c) for c in chunks]
    responses = model.execute(requests[:2] + bad + requests[2:])
    assert len(responses) == len(requests) + len(bad)
    errors = [r.error for r in responses[2:6]]
    assert [e.message() for e in errors] == ["input 'input': shape [2, 1, 8, 9], expected [-1, 1, 8, 8]",
                                             "input 'input': data type float64, expected float32",
                                             "missing input 'input'",
                                             "input 'input': batch 17 outside 1..16"]
    assert all(e.code == _Error.INVALID_ARG for e in errors)
    good = responses[:2] + responses[6:]
    for chunk, response in zip(chunks, good):
        assert response.error is None
        (want,) = ort_run(digits.optimized, chunk)
        np.testing.assert_allclose(response.output("linear"), want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_model_py_non_batching_scalar(tmp_path, monkeypatch):
    from onnx import TensorProto, helper

    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "s",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [two])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    entry = write_repository(str(tmp_path / "repo"), "scalar", m, backend="python")
    model = _load(entry, monkeypatch)
    (r,) = model.execute([_Request(x=np.array([1.25], np.float32))])
    assert r.error is None and r.output("y").shape == (1,) and r.output("y")[0] == 2.5


@pytest.mark.slow
def test_python_variant_of_a_trt_lowering_runs_on_onnxruntime(tmp_path, monkeypatch):
    """trt-* --lower-only + --triton-backend python: the plugin ops become function bodies ONNX Runtime runs."""
    from click.testing import CliRunner

    from normdeploy.cli import main

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["optimize", os.path.join(MODELS, "vit_dyt.pt"), "--target", "trt-fp16",
                                  "--lower-only", "--out", str(out), "--no-bench", "--triton-backend", "python",
                                  "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["triton"]["backend"] == "python" and report["triton"]["max_batch_size"] == 64
    import onnx

    lowered = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type.startswith("Normdeploy") for n in lowered.graph.node)  # plugin nodes in model.onnx
    entry = str(out / "triton" / report["triton"]["name"])
    served = onnx.load(os.path.join(entry, "1", "model.onnx"))
    assert served.graph == served_onnx(lowered, "trt-fp16").graph
    model = _load(entry, monkeypatch)
    x = np.load(os.path.join(MODELS, "digits_test.npz"))["input"][:5]
    x16 = x.astype(np.float16) if lowered.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else x
    (resp,) = model.execute([_Request(input=x16)])
    assert resp.error is None
    (orig,) = ort_run(onnx.load(str(out / "original.onnx")), x)
    got = resp.output(lowered.graph.output[0].name).astype(np.float32)
    assert np.abs(got - orig).max() <= 2e-2 * np.abs(orig).max()


def test_model_py_is_the_file_entries_get():
    text = open(MODEL_PY).read()
    assert "import normdeploy" not in text and "from normdeploy" not in text  # runs in the server's environment
