"""The shift kept before a padded Conv (``Add(c / a)``) must fit the type the model is stored in.

Regression of ``tests/fuzz/regressions/fp16_kept_shift_saturates.onnx``: a UnifiedNorm with a tiny
scale (a ~ 3e-3) and a large shift (c ~ -2300) before a padded Conv kept ``c / a ~ 7e5``, beyond
float16's 65504; trt-fp16's conversion saturated it and the model came out 86 % off.
"""
from __future__ import annotations

import numpy as np
import pytest

from normdeploy.core.passes import PassContext
from tests.graph_helpers import run_step
from tests.rewrite.test_fold_affine import G, assert_same, kinds

PASS = "fold_affine_into_linear"


def _bn_before_padded_conv(scale: float, shift: float, dtype=np.float32):
    """BN with a = gamma / sqrt(var + eps) = ``scale`` * [1, -0.75], beta = ``shift`` * [1, 0.5] (2 channels)
    -> Conv(3x3, pads 1)."""
    g = G(dtype=dtype, seed=3)
    y = g("BatchNormalization", g.input([1, 2, 5, 5]), g.const([scale, -1.5 * scale]), g.const([shift, 0.5 * shift]),
          g.const([0.25, -0.5]), g.const([1.0, 4.0]), epsilon=1e-12)
    return g.model(g("Conv", y, g.rand(3, 2, 3, 3), out="out", pads=[1, 1, 1, 1]))


def _fold(model, target: str):
    after, result = run_step(model, PASS, PassContext(target=target))
    assert result.matched == len(result.rewrites) + len(result.skipped), result
    return after, result


def test_kept_shift_beyond_float16_is_refused_for_trt_fp16_and_folded_for_fp32():
    before = _bn_before_padded_conv(3e-3, -2300.0)  # c / a ~ -7.7e5
    after, result = _fold(before, "trt-fp16")
    assert not result.rewrites
    (skip,) = result.skipped
    assert "Conv" in skip.reason and "float16" in skip.reason and "the affine stays" in skip.reason, skip.reason
    assert after.SerializeToString() == before.SerializeToString()
    # fp32 holds 7.7e5 (and x + c / a rounds exactly as a x + c): the fold stands there
    after, result = _fold(before, "ort-cpu")
    assert result.rewrites and result.notes and "shift stays as an Add" in result.notes[0]
    assert kinds(after) == ["Add", "Conv"]
    assert_same(before, after)


def test_kept_shift_within_float16_folds_for_trt_fp16():
    before = _bn_before_padded_conv(0.5, 3.0)  # c / a ~ 6 .. 12
    after, result = _fold(before, "trt-fp16")
    assert result.rewrites, result.skipped
    assert kinds(after) == ["Add", "Conv"]
    assert_same(before, after)


def test_kept_shift_beyond_the_model_dtype_is_refused_on_every_target():
    """A float16 model: c / a must fit float16 whatever the target (it would be stored as inf)."""
    before = _bn_before_padded_conv(2e-3, -300.0, np.float16)  # c / a ~ 1.5e5 > 65504
    for target in ("ort-cpu", "trt-fp32"):
        after, result = _fold(before, target)
        assert not result.rewrites and "float16" in result.skipped[0].reason, result.skipped


@pytest.mark.parametrize("target", ["ort-cpu", "trt-fp16"])
def test_fuzz_regression_fp16_kept_shift(target):
    """The fuzz graph itself: UnifiedNorm (r ~ 1.3e5, eps 1e-12) -> Conv(pads 1)."""
    import os

    import onnx

    path = os.path.join(os.path.dirname(__file__), "..", "fuzz", "regressions", "fp16_kept_shift_saturates.onnx")
    model = onnx.load(path)
    after, result = _fold(model, target)
    if target == "trt-fp16":
        assert not result.rewrites and "float16" in result.skipped[0].reason
    else:
        assert result.rewrites
        assert_same(model, after)


def test_kept_shift_is_checked_against_bfloat16_for_trt_bf16():
    """trt-bf16 stores bfloat16 (range ~3.4e38, like float32): a shift of 7.7e5 fits and the fold stands; the
    range check must not trip over numpy's finfo, which does not know bfloat16."""
    before = _bn_before_padded_conv(3e-3, -2300.0)
    after, result = _fold(before, "trt-bf16")
    assert result.rewrites and not result.skipped, result.skipped
    assert kinds(after) == ["Add", "Conv"]
    assert_same(before, after)
