"""The zoo's trained ViTs with their norms written as the papers' and libraries' code writes them
(:mod:`tests.corpus.respell`, ``benchmarks/readme_table.py``'s "respelled" rows): normdeploy must treat them as it treats the zoo's own
``normdeploy.nn`` modules: the same normalizations counted before and left after, the same TensorRT
plugin nodes on ``trt-fp16 --lower-only``, and exact against the re-spelled torch model on the
digits test split.
"""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

import normdeploy
from normdeploy.load import load
from tests.corpus.respell import RESPELLED, respell

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "models", "digits_test.npz")


def _plugins(result) -> dict:
    return dict(collections.Counter(n.op_type for n in result.optimized.graph.node if n.domain))


@pytest.mark.slow
@pytest.mark.parametrize("base", list(RESPELLED))
def test_respelled_zoo_model_is_deployed_as_the_zoo_model(base):
    zoo_model = load(os.path.join(ROOT, "models", f"{base}.pt")).obj.eval()
    module = respell(zoo_model)
    module.example_inputs = dict(zoo_model.example_inputs)
    assert not any(type(m).__module__.startswith("normdeploy.nn") for m in module.modules()), \
        "every normdeploy.nn norm is re-spelled"
    x = np.load(DATA)["input"][:32]
    with torch.no_grad():  # the same trained network
        ref, got = zoo_model(torch.from_numpy(x)).numpy(), module(torch.from_numpy(x)).numpy()
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()

    for target in ("ort-cpu", "trt-fp16"):
        lower_only = target != "ort-cpu"
        want = normdeploy.optimize(os.path.join(ROOT, "models", f"{base}.pt"), target=target, bench=False,
                                   lower_only=lower_only)
        result = normdeploy.optimize(module, target=target, data=DATA, bench=False, lower_only=lower_only)
        assert result.report["norm_nodes"] == want.report["norm_nodes"], target
        assert _plugins(result) == _plugins(want), target
        if target == "ort-cpu":
            assert result.report["accuracy"]["max_rel_err"] <= 1e-5
    if base != "vit_un":  # UN's plugin-free: it folds away on every target
        assert _plugins(result), "trt-fp16 makes the plugin nodes"
