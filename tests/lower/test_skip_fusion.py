"""lower.skip_norm: residual Add + LayerNorm / RMSNorm -> com.microsoft Skip*Normalization (ort-cpu), exact."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from normdeploy.core.passes import PassContext
from normdeploy.lower.skip_norm import fuse_residual_add_into_norm
from normdeploy.pipeline import transform
from tests.graph_helpers import assert_same_outputs, op_counts

D = 16
RNG = np.random.default_rng(0)


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _model(nodes, outputs, inits, opset=20, b_shape=("B", "S", D)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b_shape))
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    m = helper.make_model(helper.make_graph(nodes, "g", [x, b], outs, inits),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return onnx.shape_inference.infer_shapes(m)


def _params():
    return [_init("g", RNG.uniform(0.5, 1.5, D)), _init("beta", RNG.standard_normal(D)),
            _init("bias", RNG.standard_normal(D)), _init("W", RNG.standard_normal((D, D)) / 4)]


def _fused(model):
    m = ir.from_proto(model)
    result = fuse_residual_add_into_norm(m, PassContext())
    return ir.to_proto(m), result


def test_preln_add_and_simplified_layernorm_fuse_and_the_sum_feeds_its_other_reader():
    nodes = [helper.make_node("Add", ["x", "b"], ["h"]),
             helper.make_node("SimplifiedLayerNormalization", ["h", "g"], ["y"], axis=-1, epsilon=1e-5, stash_type=1),
             helper.make_node("MatMul", ["y", "W"], ["branch"]),
             helper.make_node("Add", ["h", "branch"], ["out"])]  # h read again: the next residual sum
    model = _model(nodes, ["out"], _params())
    after, result = _fused(model)
    ops = op_counts(after)
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 1 and ops["SimplifiedLayerNormalization"] == 0
    assert ops["Add"] == 1  # only the second residual sum, which no norm reads
    assert len(result.rewrites) == 1 and not result.skipped
    assert_same_outputs(model, after, rtol=1e-5, atol=1e-6)


def test_postln_add_bias_and_layernorm_fuse_with_the_sum_a_graph_output():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["s"]),
             helper.make_node("Add", ["s", "bias"], ["h"]),  # bias after the residual sum: the kernel's order
             helper.make_node("LayerNormalization", ["h", "g", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    model = _model(nodes, ["y", "h"], _params())
    after, result = _fused(model)
    ops = op_counts(after)
    assert ops["com.microsoft::SkipLayerNormalization"] == 1 and ops["LayerNormalization"] == 0
    assert [o.name for o in after.graph.output] == ["y", "h"]
    assert_same_outputs(model, after, rtol=1e-5, atol=1e-6)


def test_opset23_rmsnormalization_fuses():
    nodes = [helper.make_node("Add", ["x", "b"], ["h"]),
             helper.make_node("RMSNormalization", ["h", "g"], ["y"], axis=-1, epsilon=1e-5)]
    model = _model(nodes, ["y"], _params(), opset=23)
    after, _ = _fused(model)
    assert op_counts(after)["com.microsoft::SkipSimplifiedLayerNormalization"] == 1
    assert_same_outputs(model, after, rtol=1e-5, atol=1e-6)


def test_a_broadcasting_add_is_left_alone_with_the_reason():
    nodes = [helper.make_node("Add", ["x", "b"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    model = _model(nodes, ["y"], _params(), b_shape=(1, "S", D))  # a position embedding [1, S, D]
    after, result = _fused(model)
    assert op_counts(after) == op_counts(model)
    assert len(result.skipped) == 1 and "broadcasts" in result.skipped[0].reason


@pytest.mark.parametrize("on", [False, True])
def test_option_switches_the_step(on):
    nodes = [helper.make_node("Add", ["x", "b"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    model = _model(nodes, ["y"], _params())
    out = transform(model, PassContext(ort_fusions=on, ort_version="1.32.0"))
    assert ("fuse_residual_add_into_norm" in [r.name for r in out.results]) is on
    assert (op_counts(out.optimized)["LayerNormalization"] == 0) is on
    if not on:
        assert op_counts(out.optimized) == op_counts(model)
    assert_same_outputs(model, out.optimized, rtol=1e-5, atol=1e-6)


def test_trt_targets_never_get_it():
    nodes = [helper.make_node("Add", ["x", "b"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    out = transform(_model(nodes, ["y"], _params()), PassContext(target="trt-fp32", ort_fusions=True))
    assert "fuse_residual_add_into_norm" not in [r.name for r in out.results]
