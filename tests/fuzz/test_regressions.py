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
FAILING: dict[str, str] = {}

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
