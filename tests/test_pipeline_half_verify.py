"""Verify-only sessions of a half-precision model on ort-cpu run at ``pipeline.HALF_VERIFY_LEVEL``
(issue 13: at the default level ONNX Runtime's CPU provider keeps constant-folded float32 copies of
fp16 weights, about 3x the weights per session); timed sessions and float32 models keep the default."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import normdeploy
from normdeploy.build import OrtRunner
from normdeploy.pipeline import DEFAULT_TOLERANCE, HALF_VERIFY_LEVEL, verify_optimization_level
from normdeploy.verify import compare
from tests.test_tolerance import _model


def _weights_model(dtype):
    w = ir.Value(name="w", const_value=ir.tensor(np.ones(10, dtype), name="w"))
    return ir.Model(ir.Graph(inputs=[], outputs=[], nodes=[], initializers=[w], opset_imports={"": 20}), ir_version=10)


def test_level_only_for_untimed_half_models_on_cpu():
    half, full = _weights_model(np.float16), _weights_model(np.float32)
    assert HALF_VERIFY_LEVEL != "all"
    assert verify_optimization_level(half, "ort-cpu", timed=False) == HALF_VERIFY_LEVEL
    assert verify_optimization_level(half, "ort-cpu", timed=True) == "all"  # timed sessions keep the defaults
    assert verify_optimization_level(half, "ort-cuda", timed=False) == "all"  # GPU providers have fp16 kernels
    assert verify_optimization_level(full, "ort-cpu", timed=False) == "all"


@pytest.fixture
def levels(monkeypatch):
    seen = []
    real = OrtRunner.__init__

    def recording(self, model, *a, graph_optimization="all", **k):
        seen.append((graph_optimization, k.get("lean", False)))
        real(self, model, *a, graph_optimization=graph_optimization, **k)

    monkeypatch.setattr(OrtRunner, "__init__", recording)
    return seen


def test_half_model_verifies_at_the_half_level_and_says_so(levels):
    result = normdeploy.optimize(_model(torch.float16), inputs=("x:2x16x256:float16",), bench=False)
    assert levels and set(levels) == {(HALF_VERIFY_LEVEL, True)}, levels  # lean too: no arena, priority order
    assert any(f"graph optimization level '{HALF_VERIFY_LEVEL}'" in n for n in result.report["notes"])
    acc = result.report["accuracy"]
    assert 0 < acc["max_rel_err"] <= DEFAULT_TOLERANCE["float16"]  # a real rewrite, measured


def test_float32_model_keeps_the_default_level(levels):
    normdeploy.optimize(_model(torch.float32), inputs=("x:2x16x256",), bench=False)
    assert levels and set(levels) == {("all", False)}, levels


def test_half_level_computes_what_the_default_level_computes():
    """The level changes only which ONNX Runtime fusions run, and fp16 kernels against cast-to-fp32 ones:
    the original's outputs at both levels agree to fp16 rounding, and so does the verdict on the rewrite."""
    result = normdeploy.optimize(_model(torch.float16), inputs=("x:2x16x256:float16",), bench=False)
    feeds = [{"x": np.random.default_rng(s).standard_normal((4, 16, 256)).astype(np.float16)} for s in range(2)]
    orig_half = OrtRunner(result.original_model, graph_optimization=HALF_VERIFY_LEVEL, lean=True)
    opt_half = OrtRunner(result.optimized_model, graph_optimization=HALF_VERIFY_LEVEL, lean=True)
    orig_all, opt_all = OrtRunner(result.original_model), OrtRunner(result.optimized_model)
    same_model = compare(orig_all, orig_half, feeds, "levels")
    assert same_model.max_rel_err <= 2e-3 and same_model.cosine_min > 0.99999  # a few fp16 ulps
    at_half, at_all = compare(orig_half, opt_half, feeds, "half"), compare(orig_all, opt_all, feeds, "all")
    assert at_half.max_rel_err <= DEFAULT_TOLERANCE["float16"] and at_all.max_rel_err <= DEFAULT_TOLERANCE["float16"]
    assert at_half.max_rel_err <= 4 * at_all.max_rel_err + 2e-3


def test_lean_session_gives_the_same_outputs():
    """Lean (no arena, no memory pattern, priority order) changes where buffers live and the order, not values."""
    result = normdeploy.optimize(_model(torch.float16), inputs=("x:2x16x256:float16",), bench=False)
    x = {"x": np.random.default_rng(3).standard_normal((4, 16, 256)).astype(np.float16)}
    plain = OrtRunner(result.optimized_model, graph_optimization=HALF_VERIFY_LEVEL).run(x)[0]
    lean = OrtRunner(result.optimized_model, graph_optimization=HALF_VERIFY_LEVEL, lean=True).run(x)[0]
    assert np.abs(plain.astype(np.float32)).max() > 0
    np.testing.assert_array_equal(lean, plain)
