"""The zoo re-saved as ``.pt2`` (issue 12): ``torch.export`` traces normdeploy's own modules into their eval
arithmetic, and the canonicalize stage must make of that what the ``.pt`` (exported with canonical nodes) gives.

For every zoo model: the ``.pt`` and its ``.pt2`` (``torch.export.export`` with a dynamic batch, saved in
``tmp_path``), optimized for ort-cpu and for trt-fp16 (``lower_only``), give optimized models with the same
op types (by domain and op type), the same normalization counts before and after, and, on ort-cpu, the same
outputs on the zoo's held-out data.

UnifiedNorm's and PowerNorm's eval arithmetic, ``x * (w / sqrt(r + eps)) + b``, is what such a ``.pt2``
traces; the export stage's constant folder leaves its ``r + eps`` unfolded (normdeploy/export.py,
``_keep_running_statistic``) so that the canonicalize stage still names it (normdeploy/canonicalize/unified_norm.py):
the reports count the same normalizations.
"""
from __future__ import annotations

import collections
import json
import os
import warnings

import numpy as np
import pytest
import torch

import normdeploy
from normdeploy.load import load
from tests.conftest import ort_run
from tests.corpus.harness import max_rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, "models")
with open(os.path.join(MODELS_DIR, "zoo.json")) as f:
    ZOO = json.load(f)

#: each target as the issue runs it
TARGETS = {"ort-cpu": {"bench": False}, "trt-fp16": {"bench": False, "lower_only": True}}
#: ort-cpu optimized .pt vs optimized .pt2 on the held-out data (max |a - b| / max |a|, per output)
RTOL = 1e-5


def _test_inputs(name: str) -> list[np.ndarray]:
    """The held-out inputs of the model's test set, one array per example input, in order."""
    entry = ZOO[name]
    data = np.load(os.path.join(MODELS_DIR, entry["test_set"]))
    return [data[k] for k in entry["example_inputs"]]


def _save_pt2(name: str, inputs: list[np.ndarray], directory) -> str:
    """The checkpoint re-saved with ``torch.export`` (dynamic batch), examples from its own test data."""
    module = load(os.path.join(MODELS_DIR, ZOO[name]["file"])).obj.eval()
    args = tuple(torch.from_numpy(a[:2]) for a in inputs)
    shapes = tuple({0: torch.export.Dim("batch", min=1, max=65536)} for _ in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args, dynamic_shapes=shapes)
    path = str(directory / f"{name}.pt2")
    torch.export.save(ep, path)
    return path


def _ops(model) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in model.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_pt2_gives_the_same_optimized_models_as_the_pt(name, tmp_path):
    inputs = _test_inputs(name)
    pt = os.path.join(MODELS_DIR, ZOO[name]["file"])
    pt2 = _save_pt2(name, inputs, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {(src, tgt): normdeploy.optimize(path, target=tgt, **opts)
                   for src, path in (("pt", pt), ("pt2", pt2)) for tgt, opts in TARGETS.items()}
    for tgt in TARGETS:
        a, b = results["pt", tgt], results["pt2", tgt]
        assert _ops(b.optimized) == _ops(a.optimized), f"{name} {tgt}: optimized op types differ (.pt, then .pt2)"
        assert b.report["norm_nodes"] == a.report["norm_nodes"], \
            f"{name} {tgt}: norm counts {b.report['norm_nodes']} (.pt2) vs {a.report['norm_nodes']} (.pt)"
        kinds = collections.Counter(e["kind"] for e in a.report["normalizations"])
        assert collections.Counter(e["kind"] for e in b.report["normalizations"]) == kinds, name
    got = {src: ort_run(results[src, "ort-cpu"].optimized_model, *inputs) for src in ("pt", "pt2")}
    assert len(got["pt"]) == len(got["pt2"])
    for i, (a, b) in enumerate(zip(got["pt"], got["pt2"])):
        err = max_rel_err(a, b)
        assert err <= RTOL, f"{name}: output {i} of the optimized .pt2 vs .pt: max rel err {err:.3g} > {RTOL:g}"
