"""static_values: values known before run time through the exporters' shape arithmetic; per-channel layouts."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from normdeploy.canonicalize.static_values import evaluate, per_channel
from tests.graph_helpers import GraphBuilder


def _values(model) -> dict[str, ir.Value]:
    m = ir.from_proto(model)
    out = {v.name: v for n in m.graph for v in n.outputs}
    out.update({v.name: v for v in m.graph.inputs})
    return out, m  # the model keeps the graph alive


def test_parameter_reshaped_to_a_concat_of_constants():
    """dynamo without its optimizer: ``Reshape(w, Concat(1, C, 1, 1))``."""
    b = GraphBuilder(18)
    w = np.arange(4, dtype=np.float32)
    shape = b("Concat", *(b.const([d], np.int64) for d in (1, 4, 1, 1)), axis=0)
    b("Reshape", b.const(w), shape, out="w4")
    b.input("x", [2, 4])
    v, _m = _values(b.model("w4"))
    np.testing.assert_array_equal(evaluate(v["w4"]), w.reshape(1, 4, 1, 1))


def test_static_dimension_of_a_dynamic_shape():
    """TorchScript with a dynamic batch: ``Concat(1, Unsqueeze(Gather(Shape(x), 1)), 1, 1)``; the 0-d Gather of a
    partly known shape gives the known dimension itself."""
    b = GraphBuilder(18)
    x = b.input("x", ["batch", 6, 5])
    dim = b("Gather", b("Shape", x), b.const(1, np.int64), axis=0, out="dim")
    shape = b("Concat", b.const([1], np.int64), b("Unsqueeze", dim, b.const([0], np.int64)),
              b.const([1, 1], np.int64), axis=0, out="shape")
    batch = b("Gather", b("Shape", x), b.const(0, np.int64), axis=0, out="batch")
    v, _m = _values(b.model(shape, batch))
    assert evaluate(v["dim"]).tolist() == 6
    assert evaluate(v["shape"]).tolist() == [1, 6, 1, 1]
    assert evaluate(v["batch"]) is None  # dynamic: not known before run time
    assert evaluate(v["x"]) is None


def test_integer_division_truncates_and_onehot_repeats():
    """TorchScript's repeat_interleave repeats: ``OneHot`` of ``Shape(x)[2] / G`` (integer Div)."""
    b = GraphBuilder(18)
    x = b.input("x", ["t", 2, 16])
    cg = b("Div", b("Gather", b("Shape", x), b.const([2], np.int64), axis=0), b.const([5], np.int64), out="cg")
    depth = b.const([5], np.int64)
    hot = b("OneHot", b.const([3], np.int64), depth, b("Concat", b.const([1], np.int64), cg, axis=0), out="hot")
    v, _m = _values(b.model(cg, hot))
    assert evaluate(v["cg"]).tolist() == [3]  # 16 / 5 truncated
    assert evaluate(v["hot"]).tolist() == [[1, 1, 1, 3, 1]]


def test_castlike_takes_the_type_of_its_second_operand():
    """dynamo's eps: ``CastLike(1e-05 as double, x)``."""
    b = GraphBuilder(18)
    x = b.input("x", [2, 4])
    b("CastLike", b.const(1e-5, np.float64), x, out="eps")
    v, _m = _values(b.model("eps"))
    e = evaluate(v["eps"])
    assert e.dtype == np.float32 and e == np.float32(1e-5)


def test_float_arithmetic_in_the_tensor_type():
    b = GraphBuilder(18)
    b.input("x", [2])
    b("Add", b.const(np.float32(1.0)), b.const(np.float32(1e-8)), out="s")
    b("Add", b.const(np.float32(1.0)), b.const(1e-8, np.float64), out="mixed")
    v, _m = _values(b.model("s", "mixed"))
    assert evaluate(v["s"]).dtype == np.float32 and evaluate(v["s"]) == np.float32(1.0)
    assert evaluate(v["mixed"]) is None  # ONNX has no implicit promotion: not evaluated


@pytest.mark.parametrize("shape, axis", [((4,), -1), ((4, 1, 1), -3), ((1, 4, 1, 1), -3)])
def test_per_channel_finds_the_one_axis(shape, axis):
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 3, 4])
    v, _m = _values(b.model(b("Identity", x)))
    got = per_channel({"w": np.arange(4, dtype=np.float32).reshape(shape), "b": np.float32(2.0)}, v[x])
    assert got[0] == axis and got[1] == 4
    np.testing.assert_array_equal(got[2]["w"], np.arange(4))
    np.testing.assert_array_equal(got[2]["b"], np.full(4, 2.0))


def test_per_channel_reasons():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 3])
    v, _m = _values(b.model(b("Identity", x)))
    assert "more than one axis" in per_channel({"w": np.ones((4, 3), np.float32)}, v[x])
    assert "the input's axis -1 has 3" in per_channel({"w": np.ones(4, np.float32)}, v[x])
    assert "higher rank than the input" in per_channel({"w": np.ones((2, 1, 1, 3), np.float32)}, v[x])
    assert "not along the axis of the other parameters" in per_channel(
        {"w": np.ones((4, 1), np.float32), "b": np.ones(3, np.float32)}, v[x])
