"""The trt-lowered graphs of the zoo's transformers run through the plugin emulation and match the original.

Each model goes through the whole pipeline for a trt target (canonicalize, rewrite, lower to
plugin nodes); the lowered graph runs in onnx.reference with every plugin op computed by its
Triton kernel under the interpreter, and is compared with the original ONNX model on ONNX
Runtime, on the real held-out inputs. fp32 within 1e-5 relative to the output's range.
"""
import os

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from normdeploy.core.passes import PassContext
from normdeploy.lower.plugins.emulate import PLUGIN_OPS
from normdeploy.pipeline import Options, prepare, transform
from tests.conftest import MODELS, ort_run

pytestmark = pytest.mark.slow  # exports whole models

TRANSFORMERS = ["vit_ln", "vit_un", "vit_powernorm", "vit_dyt", "vit_rmsnorm", "vit_scalenorm", "llama_rmsnorm"]


def _inputs(name):
    if name.startswith("llama"):
        return np.load(os.path.join(MODELS, "seq_test.npz"))["input_ids"][:3]
    return np.load(os.path.join(MODELS, "digits_test.npz"))["input"][:3]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_trt_fp32_lowering_of_zoo_transformer_matches_original(name):
    loaded, original, _ = prepare(os.path.join(MODELS, f"{name}.pt"), Options.from_flat())
    lowered = transform(original, PassContext(target="trt-fp32")).optimized
    plugin_ops = [n.op_type for n in lowered.graph.node if n.op_type.startswith("Normdeploy")]
    leftover = [n.op_type for n in lowered.graph.node if n.domain == "normdeploy" and not n.op_type.startswith("Normdeploy")]
    assert not leftover, leftover
    if name not in ("vit_un",):  # UnifiedNorm folds away entirely: no kernel needed
        assert plugin_ops, "expected plugin nodes"
    onnx.checker.check_model(lowered)
    x = _inputs(name)
    (ref,) = ort_run(original, x)
    got = ReferenceEvaluator(lowered, new_ops=PLUGIN_OPS).run(None, {lowered.graph.input[0].name: x})[0]
    rel = np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, f"{name}: max rel err {rel:.3g}; plugins {sorted(set(plugin_ops))}"
