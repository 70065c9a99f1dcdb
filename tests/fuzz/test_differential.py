"""The differential fuzzer of issue 16: random small graphs through ``optimize``, compared with the original.

Each example is one graph from :func:`tests.fuzz.graphs.graphs`, run through
``normdeploy.optimize`` for ``ort-cpu`` and for ``trt-fp16`` with ``lower_only=True``
(plugins emulated); :func:`tests.fuzz.property.check_case` states and checks the property.

Budget: ``NORMDEPLOY_FUZZ_EXAMPLES`` graphs (default 300, what CI runs: about 75 s of CPU,
0.24 s a graph), with a fixed seed (``derandomize=True``) so that every CI run sees the
same graphs. A longer run with fresh graphs, as in README.md::

    NORMDEPLOY_FUZZ_EXAMPLES=5000 NORMDEPLOY_FUZZ_SEED=1 NORMDEPLOY_FUZZ_STATS=fuzz.json \\
        .venv/bin/python -m pytest -q tests/fuzz/test_differential.py

``NORMDEPLOY_FUZZ_SEED`` (any integer) draws other graphs than CI's; ``NORMDEPLOY_FUZZ_SAVE=DIR``
saves each failing graph, shrunk, as ``DIR/<category>-<target>-<hash>.onnx`` (with a ``.txt``
holding the failure): how ``regressions/`` was filled. ``NORMDEPLOY_FUZZ_STATS`` writes the figures (graphs, refusals and their reasons, excuses, rewrites exercised,
failures) as JSON; ``NORMDEPLOY_FUZZ_STRICT=1`` fails on the known, not yet fixed bugs too
(:data:`tests.fuzz.property.KNOWN_BUGS`, each kept in ``regressions/``).
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from .graphs import graphs
from .property import FIGURES, FuzzFailure, _normalize, check_case

EXAMPLES = int(os.environ.get("NORMDEPLOY_FUZZ_EXAMPLES", "300"))
SEED = os.environ.get("NORMDEPLOY_FUZZ_SEED")


@pytest.fixture(scope="module", autouse=True)
def figures():
    """Write the run's figures where NORMDEPLOY_FUZZ_STATS says, once the fuzzer is done."""
    yield FIGURES
    path = os.environ.get("NORMDEPLOY_FUZZ_STATS")
    if path:
        with open(path, "w") as f:
            json.dump({"examples": EXAMPLES, "seed": SEED, **FIGURES.to_json()}, f, indent=1, sort_keys=False)


def _fuzz(test):
    test = settings(max_examples=EXAMPLES, derandomize=SEED is None, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])(test)
    return seed(int(SEED))(test) if SEED is not None else test


@_fuzz
@given(case=graphs())
def test_optimize_equals_original_or_refuses(case):
    """ort-cpu and trt-fp16 (lower-only): the original's outputs within tolerance, or a one-line refusal."""
    try:
        check_case(case.model)
    except FuzzFailure as f:
        save = os.environ.get("NORMDEPLOY_FUZZ_SAVE")
        if save:  # hypothesis replays the shrunk example last: the file ends up holding the minimal graph
            import onnx

            os.makedirs(save, exist_ok=True)
            key = hashlib.sha1(_normalize(f.detail).encode()).hexdigest()[:8]
            base = os.path.join(save, f"{f.category}-{f.target}-{key}")
            onnx.save(case.model, base + ".onnx")
            with open(base + ".txt", "w") as out:
                out.write(f"{f}\n{case!r}\n")
        raise
