"""Every graph the fuzzer found failing, kept in ``regressions/``, through the same property.

A regression that fails today is a strict xfail naming its issue: the fix makes it pass,
pytest then reports XPASS as a failure, and whoever fixed it deletes its line in
:data:`FAILING` (and its :data:`tests.fuzz.property.KNOWN_BUGS` entry). What each graph
is and what goes wrong: ``regressions/README.md``.
"""
from __future__ import annotations

import os

import onnx
import pytest

from .property import KNOWN_BUGS, FuzzFailure, check_case

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regressions")

#: regression -> the issue it shows, while it fails
FAILING = {
    "fp16_folded_weight_flushes_to_zero":
        "a tiny BatchNorm scale (gamma 1e-6, var 1e5) folded into a ConvTranspose weight underflows fp16: every "
        "folded weight is 0, the trt-fp16 output is 100% off, and --lower-only returns it",
    "fp16_conversion_fails_checker":
        "UnifiedNorm with a non-constant weight, then Conv + BatchNorm: the fp16 conversion writes a model that "
        "fails onnx.checker (a type without a shape): a valid model refused with 'report this as a bug'",
    "fp16_layernorm_recognized_one_pass_variance":
        "recognize_layernorm turns a two-pass decomposed fp16 LayerNorm into LayerNormalization, whose fp16 kernel "
        "on ONNX Runtime CPU computes E[x^2] - E[x]^2 in fp32: up to 10% off where std << |mean|",
    # being fixed by other engineers (uncommitted edits in the working tree at the time of writing): the
    # fix lands, the regression XPASSes (strict), and its line here and in KNOWN_BUGS is deleted
    "crmsnorm_opset17_reducesum_axes":
        "lower_canonical_to_standard_ops writes ReduceSum with an axes attribute below opset 18 (an input since "
        "opset 13): ONNX Runtime cannot load the optimized model, a valid model is refused",
    "fp16_kept_shift_saturates":
        "a kept shift c / a (~7e5) before a padded Conv exceeds fp16's 65504: the fp16 conversion saturates it and "
        "the trt-fp16 model is 86% off, returned by --lower-only all the same",
    "preln_recentres_branch_output":
        "preln_to_rmsnorm re-centres a branch projection that is also a graph output: the output changes by 30% "
        "and verify refuses the whole model instead of the stream being skipped with a reason",
}

NAMES = sorted(f[:-5] for f in os.listdir(HERE) if f.endswith(".onnx"))


def test_every_failing_regression_is_saved_and_known():
    assert set(FAILING) <= set(NAMES), f"no file for {sorted(set(FAILING) - set(NAMES))}"
    assert {k.regression for k in KNOWN_BUGS} == set(FAILING), "KNOWN_BUGS and FAILING list the same bugs"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=FuzzFailure, reason=FAILING[n])) if n in FAILING
    else n for n in NAMES])
def test_regression(name):
    """The property holds; for a known bug, the failure is that bug's (another one fails this test outright)."""
    try:
        check_case(onnx.load(os.path.join(HERE, f"{name}.onnx")), strict=True)
    except FuzzFailure as f:
        bug = next((k for k in KNOWN_BUGS if k.regression == name), None)
        if bug is None or not bug.matches(f):
            raise RuntimeError(f"{name} fails, but not as its known bug: {f}") from f
        raise
