"""A folded weight must be stored as well as the unfolded one in the type the model will be stored in.

Regression of ``tests/fuzz/regressions/fp16_folded_weight_flushes_to_zero.onnx``: a BatchNorm with a
tiny scale (gamma ~ 1e-6 over sqrt(var) ~ 360: a ~ 3e-9) folded into a ConvTranspose gave weights of
~ 1e-9, which trt-fp16's conversion flushed to zero (every one of them): the output was all zeros,
100 % off, while the unfolded graph keeps the weight and computes the BatchNorm in fp32.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from normdeploy.core.passes import PassContext
from normdeploy.lower.precision import convert_precision_detailed
from tests.graph_helpers import run_step
from tests.rewrite.test_fold_affine import G, assert_same, feeds_for, kinds, run

PASS = "fold_affine_into_linear"
REGRESSION = os.path.join(os.path.dirname(__file__), "..", "fuzz", "regressions",
                          "fp16_folded_weight_flushes_to_zero.onnx")


def _fold(model, target: str):
    after, result = run_step(model, PASS, PassContext(target=target))
    assert result.matched == len(result.rewrites) + len(result.skipped), result
    return after, result


def _bn_into_conv_transpose(gamma: float, var: float, mean: float = -1e4):
    """x -> BN(gamma * [1, 0.7], beta 0, mean * [1, 0.5], var * [1, 5], eps 1e-12) -> ConvTranspose(k1, 2 -> 3)."""
    g = G(seed=5)
    y = g("BatchNormalization", g.input([1, 2, 3, 3]), g.const([gamma, 0.7 * gamma]), g.const([0.0, 0.0]),
          g.const([mean, 0.5 * mean]), g.const([var, 5 * var]), epsilon=1e-12)
    return g.model(g("ConvTranspose", y, g.rand(2, 3, 1, 1, low=0.2, high=1.0), out="out", kernel_shape=[1, 1]))


def _conv_into_bn(gamma: float, var: float):
    """x -> Conv(k1, 2 -> 2, no pads) -> BN(gamma * [1, 0.7], var * [1, 5]): folds into its producer."""
    g = G(seed=6)
    t = g("Conv", g.input([1, 2, 3, 3]), g.rand(2, 2, 1, 1, low=0.2, high=1.0), kernel_shape=[1, 1])
    return g.model(g("BatchNormalization", t, g.const([gamma, 0.7 * gamma]), g.const([0.5, -0.25]),
                     g.const([0.1, -0.2]), g.const([var, 5 * var]), out="out", epsilon=1e-12))


def test_a_folded_weight_below_float16s_normal_range_is_refused_for_trt_fp16():
    before = _bn_into_conv_transpose(1e-6, 1e5)  # a ~ 3e-9 and 1e-9: W a ~ 1e-9, below 2^-25 (flushes)
    after, result = _fold(before, "trt-fp16")
    assert not result.rewrites
    (skip,) = result.skipped
    reason = skip.reason
    assert "ConvTranspose ConvTranspose_" in reason and "float16" in reason and "the affine stays" in reason, reason
    assert "flush to zero" in reason and "6.104e-05" in reason and "scale 9.9e-10 .. 3.16e-09" in reason, reason
    assert after.SerializeToString() == before.SerializeToString()


def test_the_same_fold_stands_where_the_storage_type_holds_it():
    """float32 (ort-cpu, trt-fp32) and bfloat16 (trt-bf16: float32's exponent range) hold 1e-9 as a normal number."""
    before = _bn_into_conv_transpose(1e-6, 1e5)
    for target in ("ort-cpu", "trt-fp32", "trt-bf16"):
        after, result = _fold(before, target)
        assert result.rewrites and not result.skipped, (target, result.skipped)
        assert kinds(after) == ["Add", "ConvTranspose"], target  # the shift stays before a ConvTranspose
    assert_same(before, after)


def test_the_fold_would_have_zeroed_the_fp16_output():
    """What the check prevents: the folded model converted to fp16 flushes every folded weight, the output is 0."""
    before = _bn_into_conv_transpose(1e-6, 1e5)
    folded, _ = _fold(before, "ort-cpu")
    conv = convert_precision_detailed(folded, "fp16")
    assert conv.underflowed_values == 6
    feeds = feeds_for(before)
    (want,), (got,) = run(before, feeds), run(conv.model, feeds)
    assert np.abs(want).max() > 0 and not np.any(got)


def test_a_scale_that_keeps_the_weight_normal_folds_for_trt_fp16():
    before = _bn_into_conv_transpose(1e-2, 1e2, mean=-10.0)  # a ~ 1e-3: W a ~ 1e-4 >= 6.1e-5
    after, result = _fold(before, "trt-fp16")
    assert result.rewrites, result.skipped
    assert_same(before, after)


def test_one_tiny_channel_beside_normal_ones_folds_for_trt_fp16():
    """Range-relative, as the accuracy checks: a channel whose weights round to zero beside the others' (a channel
    almost switched off by its gamma) costs no more than fp16 rounding of the largest weight."""
    g = G(seed=7)
    y = g("BatchNormalization", g.input([1, 3, 3, 3]), g.const([1.0, 1e-9, 0.5]), g.const([0.1, 0.2, 0.3]),
          g.const([0.0, 0.1, 0.2]), g.const([1.0, 1.0, 2.0]), epsilon=1e-5)
    before = g.model(g("Conv", y, g.rand(4, 3, 1, 1), out="out", kernel_shape=[1, 1]))
    after, result = _fold(before, "trt-fp16")
    assert result.rewrites and not result.skipped, result.skipped
    assert_same(before, after)


def test_a_tiny_scale_into_the_producer_is_refused_for_trt_fp16_only():
    before = _conv_into_bn(1e-6, 1e5)
    after, result = _fold(before, "trt-fp16")
    assert not result.rewrites
    reason = result.skipped[0].reason
    assert reason.startswith("into the producer: Conv Conv_") and "flush to zero" in reason, reason
    after, result = _fold(before, "ort-cpu")
    assert result.rewrites and kinds(after) == ["Conv"]
    assert_same(before, after)


def test_a_folded_weight_beyond_float16s_range_is_refused_for_trt_fp16():
    """A huge scale (gamma 10 over sqrt(var) 1e-5: a ~ 1e6 and 3e5) takes weights of 0.2 .. 1 past 65504."""
    before = _conv_into_bn(10.0, 1e-10)
    after, result = _fold(before, "trt-fp16")
    assert not result.rewrites
    reason = result.skipped[0].reason
    assert "saturate" in reason and "65504" in reason and "float16" in reason, reason
    after, result = _fold(before, "ort-cpu")
    assert result.rewrites
    assert_same(before, after)


def test_fuzz_regression_fp16_folded_weight():
    """The fuzz graph itself: BatchNorm (gamma ~ 1e-6, var ~ 1e5, mean ~ -1e4, eps 1e-12) -> ConvTranspose(k1)."""
    model = onnx.load(REGRESSION)
    after, result = _fold(model, "trt-fp16")
    assert not result.rewrites and "flush to zero" in result.skipped[0].reason, result.skipped
    after, result = _fold(model, "ort-cpu")
    assert result.rewrites
    folded = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer if "weight_folded" in i.name}
    assert folded and all(np.abs(w).max() < 1e-8 for w in folded.values())  # what trt-fp16 would have flushed
