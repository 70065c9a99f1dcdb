"""A model past the 2 GB protobuf limit through every stage (issue 13): load, canonicalize, rewrite,
lower, verify and save, on ort-cpu and for trt-fp16 --lower-only.

The model is built on the fly with onnx-ir and written with external data (2.7 GB of fp32
weights), then deleted with the test's temporary directory: x [N, 16384] -> a pre-norm
RMSNorm spelled as torch exports it (Pow, ReduceMean, Add, Sqrt, Div, Mul by a gain) ->
MatMul [16384, 12288] -> Relu -> MatMul [12288, 16384] -> Add (residual) -> MatMul
[16384, 16384]. The gain must fold into the first weight, the RMSNorm lower to ONNX
Runtime's kernel, the output be written with external data, and the optimized model
compute what a float64 NumPy reference of the original computes.
"""
from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest

import normdeploy

pytestmark = pytest.mark.slow  # ~2.7 GB written and read twice

D, H, E = 16384, 12288, 16384


def _weights(seed: int):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((D, H), dtype=np.float32) / np.float32(np.sqrt(D))
    w2 = rng.standard_normal((H, D), dtype=np.float32) / np.float32(np.sqrt(H))
    w3 = rng.standard_normal((D, E), dtype=np.float32) / np.float32(np.sqrt(D))
    g = (rng.uniform(0.5, 1.5, D) * np.where(rng.random(D) < 0.2, -1, 1)).astype(np.float32)
    return g, w1, w2, w3


def _build(path: str) -> tuple:
    g, w1, w2, w3 = _weights(0)

    def const(name, arr):
        return ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                        type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))

    x = ir.Value(name="x", shape=ir.Shape(["batch", D]), type=ir.TensorType(ir.DataType.FLOAT))
    inits = [const("g", g), const("w1", w1), const("w2", w2), const("w3", w3), const("two", np.array(2.0, np.float32)),
             const("eps", np.array(1e-6, np.float32)), const("axes", np.array([-1], np.int64))]
    c = {v.name: v for v in inits}
    nodes = []

    def add(op, *inputs, **attrs):
        n = ir.node(op, list(inputs), attributes=attrs, name=f"n{len(nodes)}_{op}")
        nodes.append(n)
        return n.outputs[0]

    ms = add("ReduceMean", add("Pow", x, c["two"]), c["axes"], keepdims=1)
    normed = add("Mul", add("Div", x, add("Sqrt", add("Add", ms, c["eps"]))), c["g"])
    h = add("MatMul", add("Relu", add("MatMul", normed, c["w1"])), c["w2"])
    y = add("MatMul", add("Add", h, x), c["w3"])
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape(["batch", E])
    graph = ir.Graph([x], [y], nodes=nodes, initializers=inits, opset_imports={"": 20}, name="large")
    ir.save(ir.Model(graph, ir_version=10), path, external_data="large.onnx.data")
    return g, w1, w2, w3


def _reference(x: np.ndarray, g, w1, w2, w3) -> np.ndarray:
    x64 = x.astype(np.float64)
    n = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-6) * g
    h = np.maximum(n @ w1.astype(np.float64), 0) @ w2.astype(np.float64)
    return (h + x64) @ w3.astype(np.float64)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    d = tmp_path_factory.mktemp("large")
    path = str(d / "large.onnx")
    weights = _build(path)
    assert os.path.getsize(path + ".data") > 2 * 2**30 and os.path.getsize(path) < 2**20
    return d, path, weights


def test_past_2gb_optimizes_exactly_and_is_written_with_external_data(large):
    d, path, weights = large
    result = normdeploy.optimize(path, target="ort-cpu", inputs=("x:2x16384",), bench=False)
    rep = result.report
    assert rep["norm_nodes"] == {"before": {"RMSNorm": 1}, "after": {"RMSNorm": 1}}
    folded = {p["name"]: len(p["rewrites"]) for p in rep["passes"]}
    assert folded["recognize_rmsnorm"] == 1 and folded["fold_affine_into_linear"] == 1
    assert rep["accuracy"]["max_rel_err"] <= 1e-5
    assert rep["resources"]["weights_mb"] > 2048
    out = result.save(str(d / "out"))
    model_file, data_file = os.path.join(out, "model.onnx"), os.path.join(out, "model.onnx.data")
    assert os.path.getsize(model_file) < 2**20 and os.path.getsize(data_file) > 2 * 2**30
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, D)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    (got,) = ort.InferenceSession(model_file, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = _reference(x, *weights)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_past_2gb_lowers_for_trt_fp16(large):
    d, path, _ = large
    result = normdeploy.optimize(path, target="trt-fp16", lower_only=True, inputs=("x:2x16384",), bench=False)
    out = result.save(str(d / "out_trt"))
    import onnx

    lowered = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in lowered.graph.node]
    assert "NormdeployRMSNorm" in ops
    big = [t for t in lowered.graph.initializer if int(np.prod(t.dims)) >= 1 << 20]
    assert len(big) == 3 and {t.data_type for t in big} == {onnx.TensorProto.FLOAT16}
    assert os.path.exists(os.path.join(out, "model.onnx.data"))
