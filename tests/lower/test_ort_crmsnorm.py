"""ort-cpu lowering of normdeploy::CRMSNorm at every opset: each reduction gets its axes in the form its
opset defines (ReduceSum: an input from opset 13; ReduceSumSquare: an input from opset 18), so
ONNX Runtime loads the lowered model and it computes the op's reference.

Regression: tests/fuzz/regressions/crmsnorm_opset17_reducesum_axes.onnx (ReduceSum was given an
``axes`` attribute below opset 18; ONNX Runtime refused the model).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper

from normdeploy.core import ops
from tests.graph_helpers import GraphBuilder, node_of, op_counts, ort_run, run_step

WIDTH = 7  # stored coordinates; d = 8


def _crmsnorm_model(opset: int) -> tuple[onnx.ModelProto, np.ndarray]:
    gain = np.linspace(-1.5, 1.5, WIDTH).astype(np.float32)
    b = GraphBuilder(opset)
    x = b.input("x", ["batch", 3, WIDTH])
    b.nodes.append(helper.make_node("CRMSNorm", [x, b.const(gain)], ["y"], name="crms", domain=ops.DOMAIN,
                                    epsilon=1e-6))
    graph = helper.make_graph(b.nodes, "crmsnorm", b.inputs,
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3, WIDTH])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(ops.DOMAIN, ops.VERSION)])
    model.ir_version = 8 if opset < 21 else (10 if opset < 23 else 11)
    ops.attach_functions(model)
    return model, gain


@pytest.mark.parametrize("opset", [11, 12, 13, 17, 18, 23])
def test_crmsnorm_lowers_to_reductions_onnx_runtime_loads(opset):
    model, gain = _crmsnorm_model(opset)
    lowered, result = run_step(model, "lower_canonical_to_standard_ops")
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, [])
    counts = op_counts(lowered)
    assert counts["ReduceSum"] == 1 and counts["ReduceSumSquare"] == 1
    assert not any(n.domain == ops.DOMAIN for n in lowered.graph.node)
    for op, since in (("ReduceSum", 13), ("ReduceSumSquare", 18)):
        node = node_of(lowered, op)
        has_attr = any(a.name == "axes" for a in node.attribute)
        assert (len(node.input) == 2, has_attr) == ((True, False) if opset >= since else (False, True)), \
            f"{op} at opset {opset}: inputs {list(node.input)}, attributes {[a.name for a in node.attribute]}"
    onnx.checker.check_model(lowered, full_check=True)
    x = np.random.default_rng(opset).normal(0.3, 1.5, (4, 3, WIDTH)).astype(np.float32)
    (got,) = ort_run(lowered, {"x": x}).values()
    want = ops.REFERENCE["CRMSNorm"](x, gain, epsilon=1e-6)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


REGRESSION = os.path.join(os.path.dirname(__file__), "..", "fuzz", "regressions", "crmsnorm_opset17_reducesum_axes.onnx")


@pytest.mark.skipif(not os.path.exists(REGRESSION), reason="the fuzzer's regression file is not in this checkout")
def test_fuzzer_regression_crmsnorm_opset17_optimizes_exactly():
    """The fuzzer's opset-17 CRMSNorm graph: ``optimize --target ort-cpu`` loads on ONNX Runtime and is exact."""
    import normdeploy
    from tests.conftest import ort_run as ort_run_arrays

    model = onnx.load(REGRESSION)
    assert model.opset_import[0].version == 17 or any(o.domain in ("", "ai.onnx") and o.version == 17
                                                      for o in model.opset_import)
    result = normdeploy.optimize(REGRESSION, target="ort-cpu", bench=False)
    assert result.report["norm_nodes"]["before"] == {"CRMSNorm": 1}, result.report["norm_nodes"]
    (node,) = [n for n in model.graph.node if n.op_type == "CRMSNorm"]
    gain = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-6)
    dims = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).normal(0.3, 1.5, dims).astype(np.float32)
    (got,) = ort_run_arrays(result.optimized_model, x)
    want = ops.REFERENCE["CRMSNorm"](x, gain, epsilon=eps)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
