"""canonicalize.statistics: the spellings of a per-token mean, and the values recognizers read off a graph."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from normdeploy.canonicalize.statistics import (
    known_value,
    mean_axes,
    mean_over,
    number_of,
    outside_reader,
    statistics_label,
)
from normdeploy.core.pattern import Match, Var, match
from tests.graph_helpers import GraphBuilder

SHAPE = [2, 3, 8]


def _graph(b: GraphBuilder, *outputs: str) -> ir.Graph:
    return ir.from_proto(b.model(*outputs)).graph


def _value(graph: ir.Graph, name: str) -> ir.Value:
    for n in graph:
        for o in n.outputs:
            if o.name == name:
                return o
    raise KeyError(name)


def _mean_of_x(graph: ir.Graph, name: str):
    """The one match of ``mean_over(x)`` at tensor ``name``, and its checked axes."""
    ms = [m for m in match(mean_over(Var("x"), "m"), _value(graph, name), Match())]
    assert ms, f"no mean spelling matched at {name}"
    m = ms[0]
    return m, mean_axes(m, "m", m.bound["x"])


def _int64(v):
    return np.asarray(v, np.int64)


def test_keepdims_off_then_unsqueeze_is_a_mean_over_the_axis():
    b = GraphBuilder(18)
    x = b.input("x", SHAPE)
    r = b("ReduceMean", x, b.const(_int64([-1]), np.int64), keepdims=0)
    b("Unsqueeze", r, b.const(_int64([-1]), np.int64), out="m")
    m, axes = _mean_of_x(_graph(b, "m"), "m")
    assert axes == [-1]
    assert statistics_label(m, ("m",)) == "keepdims=0 + Unsqueeze"


def test_unsqueeze_putting_back_another_axis_is_refused():
    b = GraphBuilder(18)
    x = b.input("x", SHAPE)
    r = b("ReduceMean", x, b.const(_int64([-1]), np.int64), keepdims=0)
    b("Unsqueeze", r, b.const(_int64([1]), np.int64), out="m")
    _, why = _mean_of_x(_graph(b, "m"), "m")
    assert isinstance(why, str) and "not the reduced axes" in why


def _dynamo_restore(b: GraphBuilder, stat: str, second: int) -> str:
    """The dynamo exporter's ``Reshape(stat, Concat(Shape(stat)[0:1], Shape(stat)[1:2], [second]))``."""
    parts = [b("Shape", stat, start=0, end=1), b("Shape", stat, start=1, end=2), b.const(_int64([second]), np.int64)]
    return b("Reshape", stat, b("Concat", *parts, axis=0), out="m")


def test_keepdims_off_then_reshape_of_the_symbolic_shape_is_a_mean():
    b = GraphBuilder(18)
    x = b.input("x", ["batch", 3, 8])
    r = b("ReduceMean", x, b.const(_int64([2]), np.int64), keepdims=0)
    _dynamo_restore(b, r, 1)
    graph = _graph(b, "m")
    m, axes = _mean_of_x(graph, "m")
    assert axes == [-1]
    assert outside_reader(Match(m.bound, m.values, (_value(graph, "m").producer(),) + m.nodes)) is None


def test_reshape_to_another_shape_is_refused():
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, 8])
    r = b("ReduceMean", x, b.const(_int64([2]), np.int64), keepdims=0)
    b("Reshape", r, b.const(_int64([3, 2, 1]), np.int64), out="m")
    _, why = _mean_of_x(_graph(b, "m"), "m")
    assert isinstance(why, str) and "does not put back exactly the reduced axes" in why


@pytest.mark.parametrize("count, ok", [(8.0, True), (7.0, False)])
def test_sum_divided_by_the_count_is_a_mean_and_nothing_else(count, ok):
    b = GraphBuilder(18)
    x = b.input("x", SHAPE)
    s = b("ReduceSum", x, b.const(_int64([-1]), np.int64), keepdims=1)
    b("Div", s, b.const(count), out="m")
    m, axes = _mean_of_x(_graph(b, "m"), "m")
    if ok:
        assert axes == [-1] and statistics_label(m, ("m",)) == "sum / N"
    else:
        assert isinstance(axes, str) and "not 1/8: not a mean" in axes


def test_outside_reader_names_a_real_second_reader():
    b = GraphBuilder(18)
    x = b.input("x", SHAPE)
    r = b("ReduceMean", x, b.const(_int64([-1]), np.int64), keepdims=0, out="r")
    b("Unsqueeze", r, b.const(_int64([-1]), np.int64), out="m")
    b("Neg", r, out="side")
    graph = _graph(b, "m", "side")
    m, _ = _mean_of_x(graph, "m")
    why = outside_reader(m)
    assert why is not None and "intermediate tensor r has another consumer (Neg" in why


def test_number_of_counts_elements_as_torch_var_does():
    """torch.var's Bessel factor: N = CastLike(ReduceProd(Gather(Shape(x), axes))), then N - 1."""
    b = GraphBuilder(18)
    x = b.input("x", ["batch", 3, 8])
    n = b("CastLike", b("ReduceProd", b("Gather", b("Shape", x), b.const(_int64([2]), np.int64), axis=0),
                        keepdims=0), x, out="n")
    b("Sub", n, b.const(1.0), out="n1")
    graph = _graph(b, "n", "n1")
    assert number_of(_value(graph, "n")) == 8.0 and number_of(_value(graph, "n1")) == 7.0


def test_known_value_folds_gemmas_one_plus_w():
    b = GraphBuilder(17)
    w = b.const(np.array([0.5, -2.0], np.float32))
    b("Add", b("Cast", w, to=1), b.const(1.0), out="g")
    graph = _graph(b, "g")
    np.testing.assert_array_equal(known_value(_value(graph, "g")), np.array([1.5, -1.0], np.float32))


def test_known_value_of_a_runtime_tensor_is_none():
    b = GraphBuilder(17)
    x = b.input("x", [2])
    b("Add", x, b.const(1.0), out="g")
    assert known_value(_value(_graph(b, "g"), "g")) is None


def test_restored_mean_pattern_binds_its_restoring_op():
    b = GraphBuilder(18)
    x = b.input("x", SHAPE)
    r = b("ReduceMean", x, b.const(_int64([-1]), np.int64), keepdims=0)
    b("Unsqueeze", r, b.const(_int64([-1]), np.int64), out="m")
    m, _ = _mean_of_x(_graph(b, "m"), "m")
    assert m.bound["m.unsqueeze"].op_type == "Unsqueeze" and m.bound["m"].op_type == "ReduceMean"
