"""find_leftovers / describe_normalizations: every normalization-like subgraph the recognizers left alone is
listed with its node and the condition that failed; every recognized normalization with its spelling and fate."""
from __future__ import annotations

import numpy as np
import pytest

from normdeploy.canonicalize.leftovers import AFFINE, L2, MEAN_SQUARES, SUM_SQUARES, TANH, find_leftovers
from normdeploy.core.passes import PassContext
from normdeploy.pipeline import CANONICALIZE, transform
from tests.graph_helpers import GraphBuilder

CANON = {s.name for s in CANONICALIZE}


def _run(model):
    t = transform(model, PassContext(target="ort-cpu"))
    return t, find_leftovers(t.canonical_model, t.results, CANON)


def _one(left, what):
    hits = [x for x in left if x.what == what]
    assert len(hits) == 1, left
    return hits[0]


def test_mean_of_squares_read_by_something_else_names_the_reader():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    ms = b.reduce_mean(b("Pow", x, b.const(2.0)), [-1])
    y = b("Softmax", ms, axis=-1)
    _, left = _run(b.model(y))
    lo = _one(left, MEAN_SQUARES)
    assert lo.node == f"n_{ms}" and lo.spelling == "Pow ReduceMean"
    assert lo.reason.startswith(f"Softmax n_{y} reads ReduceMean n_{ms} (mean of squares)"), lo.reason
    assert "adds a constant eps" in lo.reason
    assert any(r.startswith("recognize_rmsnorm: ") for r in lo.recognizers), lo.recognizers


def test_mean_of_squares_dividing_another_tensor_names_the_div():
    b = GraphBuilder(18)
    x, z = b.input("x", [2, 4, 8]), b.input("z", [2, 4, 8])
    root = b("Sqrt", b("Add", b.reduce_mean(b("Mul", x, x), [-1]), b.const(1e-6)))
    y = b("Div", z, root)
    _, left = _run(b.model(y))
    lo = _one(left, MEAN_SQUARES)
    assert lo.spelling == "Mul ReduceMean"
    assert lo.reason == f"Div n_{y} divides z, not the squared tensor x", lo.reason


def test_mean_of_squares_with_eps_outside_the_root_says_what_comes_instead_of_the_root():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    ms = b.reduce_mean(b("Mul", x, x), [-1])
    e = b("Add", ms, b.const(1e-6))
    ex = b("Exp", e)
    y = b("Div", x, ex)
    _, left = _run(b.model(y))
    lo = _one(left, MEAN_SQUARES)
    assert lo.reason == (f"Exp n_{ex} reads the mean of squares (ReduceMean n_{ms}) plus eps, where a "
                         "normalization takes its square root"), lo.reason


def test_recognized_rmsnorm_is_no_leftover_and_reports_its_spelling():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    root = b("Sqrt", b("Add", b.reduce_mean(b("Pow", x, b.const(2.0)), [-1]), b.const(1e-6)))
    y = b("Mul", b("Div", x, root), b.const(np.linspace(0.5, 1.5, 8)))
    t, left = _run(b.model(y))
    assert left == []
    from normdeploy.canonicalize.leftovers import describe_normalizations

    (e,) = describe_normalizations(t.canonical_model, t.results, CANON)
    assert e["kind"] == "RMSNorm" and e["recognized_by"] == "recognize_rmsnorm"
    assert e["spelling"].split(": ")[-1] == "Pow ReduceMean Add Sqrt Div Mul", e["spelling"]
    assert e["rewrites"] and e["rewrites"][0].startswith("lower_canonical_to_standard_ops: ")


def test_exported_norm_node_spelling_says_as_exported():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    y = b("LayerNormalization", x, b.const(np.linspace(0.5, 1.5, 8)), b.const(np.zeros(8)), axis=-1)
    t, left = _run(b.model(y))
    from normdeploy.canonicalize.leftovers import describe_normalizations

    (e,) = describe_normalizations(t.canonical_model, t.results, CANON)
    assert e["spelling"] == "as exported: LayerNormalization" and e["recognized_by"] is None
    assert e["kept_because"] or e["rewrites"]


def test_sum_of_squares_and_reduce_l2_are_listed():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    ss = b("ReduceSum", b("Mul", x, x), b.const([-1], np.int64), keepdims=1)
    l2 = b("ReduceL2", x, b.const([-1], np.int64), keepdims=1)
    r1, r2 = b("Relu", ss), b("Relu", l2)
    _, left = _run(b.model(b("Add", r1, r2)))
    s, n = _one(left, SUM_SQUARES), _one(left, L2)
    assert s.spelling == "Mul ReduceSum"
    assert s.reason == f"Relu n_{r1} reads ReduceSum n_{ss} (sum of squares), where a normalization adds a constant eps"
    assert n.spelling == "ReduceL2"
    assert n.reason == (f"Relu n_{r2} reads ReduceL2 n_{l2} (L2 norm), where a normalization clamps it by or adds "
                        "a constant eps")


def test_l2_normalization_without_eps_says_no_eps():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    l2 = b("ReduceL2", x, b.const([-1], np.int64), keepdims=1)
    _, left = _run(b.model(b("Div", x, l2)))
    lo = _one(left, L2)
    assert lo.reason == f"no eps clamps or is added to ReduceL2 n_{l2} (L2 norm)", lo.reason
    assert any(r.startswith("recognize_scalenorm: ") for r in lo.recognizers), lo.recognizers


def test_tanh_with_a_vector_alpha_names_the_scale_and_takes_its_weight_along():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    t = b("Tanh", b("Mul", x, b.const(np.linspace(0.5, 1.5, 8))))
    y = b("Mul", t, b.const(np.linspace(1.0, 2.0, 8)))
    _, left = _run(b.model(y))
    assert [x.what for x in left] == [TANH], left  # the alpha Mul and the weight Mul are part of it
    lo = left[0]
    assert lo.spelling == "Mul Tanh Mul"
    assert "scales x by a constant of shape [8], not by one scalar alpha" in lo.reason
    assert any(r.startswith("recognize_dyt: ") for r in lo.recognizers), lo.recognizers


def test_tanh_gelu_is_an_activation_not_a_leftover():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    cube = b("Mul", x, b("Mul", x, x))
    inner = b("Add", x, b("Mul", cube, b.const(0.044715)))
    t = b("Tanh", b("Mul", inner, b.const(float(np.sqrt(2 / np.pi)))))
    y = b("Mul", b("Mul", b("Add", t, b.const(1.0)), x), b.const(0.5))
    _, left = _run(b.model(y))
    assert left == []


@pytest.mark.parametrize("shift", [False, True])
def test_per_channel_constant_affine_with_its_fate(shift):
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, 4, 4])
    y = b("Mul", x, b.const(np.linspace(0.5, 1.5, 3).reshape(3, 1, 1)))
    if shift:
        y = b("Add", y, b.const(np.linspace(-1.0, 1.0, 3).reshape(3, 1, 1)))
    y = b("Relu", y)
    _, left = _run(b.model(y))
    lo = _one(left, AFFINE)
    assert lo.spelling == ("Mul Add" if shift else "Mul")
    assert f"y = a * x{' + c' if shift else ''} by constants varying along axis -3" in lo.reason
    assert lo.fate and lo.fate[0].startswith("fold_affine_into_linear: "), lo.fate


def test_unnamed_nodes_are_labelled():
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    y = b("Softmax", b.reduce_mean(b("Pow", x, b.const(2.0)), [-1]), axis=-1)
    model = b.model(y)
    for n in model.graph.node:
        n.name = ""
    _, left = _run(model)
    lo = _one(left, MEAN_SQUARES)
    assert lo.node == "<unnamed ReduceMean #1>", lo.node
    assert lo.reason.startswith("Softmax (unnamed) reads ReduceMean (unnamed) (mean of squares)"), lo.reason
