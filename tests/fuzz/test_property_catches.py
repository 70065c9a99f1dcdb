"""The fuzzer's property is not vacuous: a wrong number, a crash, a silent skip or a wrong refusal,
planted into ``normdeploy.optimize``, each fails it, and a failing property fails the hypothesis test.

Each plant runs the property on one saved graph that passes
(``regressions/fp16_report_reference_fallback_crash.onnx``: a UnifiedNorm whose weight is a graph
input, so it stays and is skipped with a reason, then a grouped ConvTranspose).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import normdeploy
from normdeploy.core.errors import InputError

from . import property as prop

GRAPH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regressions",
                     "fp16_report_reference_fallback_crash.onnx")


class _Planted:
    """What property.py reads of a Result (``report``, ``optimized``), with one thing changed."""

    def __init__(self, real, optimized=None, report=None):
        self.report = report if report is not None else real.report
        self.optimized = optimized if optimized is not None else real.optimized


def _scaled_weights(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    big = max((t for t in m.graph.initializer if t.data_type in prop.FLOATS),
              key=lambda t: numpy_helper.to_array(t).size)
    v = numpy_helper.to_array(big)
    big.CopyFrom(numpy_helper.from_array((v * factor).astype(v.dtype), big.name))
    return m


def _plant(monkeypatch, change):
    real = normdeploy.optimize

    def planted(*a, **k):
        return change(real(*a, **k))

    monkeypatch.setattr(normdeploy, "optimize", planted)


@pytest.fixture
def graph():
    return onnx.load(GRAPH)


def test_the_graph_passes_unplanted(graph):
    assert prop.check_case(graph, strict=True) == {"ort-cpu": "ok", "trt-fp16": "ok"}


def test_a_wrong_number_fails(graph, monkeypatch):
    _plant(monkeypatch, lambda r: _Planted(r, optimized=_scaled_weights(r.optimized, 1.01)))
    with pytest.raises(prop.FuzzFailure) as e:
        prop.check_case(graph, strict=True)
    assert e.value.category == "wrong" and e.value.target == "ort-cpu"


def test_a_crash_fails(graph, monkeypatch):
    def crash(*a, **k):
        raise ValueError("planted")

    monkeypatch.setattr(normdeploy, "optimize", crash)
    with pytest.raises(prop.FuzzFailure) as e:
        prop.check_case(graph, strict=True)
    assert e.value.category == "crash" and "planted" in e.value.detail


def test_a_silent_skip_fails(graph, monkeypatch):
    def silent(r):
        report = dict(r.report, passes=[dict(p, skipped=[]) for p in r.report["passes"]])
        return _Planted(r, report=report)

    _plant(monkeypatch, silent)
    with pytest.raises(prop.FuzzFailure) as e:
        prop.check_case(graph, strict=True)
    assert e.value.category == "silent"


def test_a_valid_graph_refused_as_bad_input_fails(graph, monkeypatch):
    def refuse(*a, **k):
        raise InputError("planted refusal", "do something")

    monkeypatch.setattr(normdeploy, "optimize", refuse)
    with pytest.raises(prop.FuzzFailure) as e:
        prop.check_case(graph, strict=True)
    assert e.value.category == "refusal"


def test_a_known_bug_is_counted_only_outside_strict_mode(graph, monkeypatch):
    bug = prop.KnownBug(os.path.basename(GRAPH)[:-5], "wrong", "ort-cpu", r"max rel err")
    monkeypatch.setattr(prop, "KNOWN_BUGS", (bug,))
    _plant(monkeypatch, lambda r: _Planted(r, optimized=_scaled_weights(r.optimized, 1.01)))
    assert prop.check_case(graph, strict=False)["ort-cpu"] == f"known: {bug.regression}"
    with pytest.raises(prop.FuzzFailure):
        prop.check_case(graph, strict=True)


def test_a_failing_property_fails_the_fuzz_test(monkeypatch):
    """The hypothesis test itself raises (after shrinking) when the property fails on a drawn graph."""
    from . import test_differential

    calls = []

    def failing(model, strict=prop.STRICT):
        calls.append(model)
        if len(calls) >= 3:
            raise prop.FuzzFailure("wrong", "ort-cpu", "planted")
        return {}

    monkeypatch.setattr(test_differential, "check_case", failing)
    with pytest.raises(prop.FuzzFailure, match="planted"):
        test_differential.test_optimize_equals_original_or_refuses()
    assert np.all([isinstance(m, onnx.ModelProto) for m in calls])
