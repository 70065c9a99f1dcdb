"""lower.cleanup: the graph clean-up at the end of the ort-* lower stage (exact, no large weight copied)."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from normdeploy.core.passes import PassContext
from normdeploy.lower.cleanup import FOLD_INPUT_BYTES, clean_up
from normdeploy.pipeline import transform
from tests.graph_helpers import assert_same_outputs, op_counts

RNG = np.random.default_rng(0)


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _model(nodes, inputs, outputs, inits, opset=20, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 10
    return onnx.shape_inference.infer_shapes(m)


def _cleaned(model, ctx=None):
    m = ir.from_proto(model)
    result = clean_up(m, ctx or PassContext())
    return ir.to_proto(m), result


def shape_arithmetic_model():
    """x [N, 4, 8] -> Reshape to [N, 32] by Shape/Gather/Concat -> MatMul W -> Add of a zero bias -> Mul by ones."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i12"], ["tail"], axis=0),
        helper.make_node("ReduceProd", ["tail"], ["prod"], keepdims=1),
        helper.make_node("Constant", [], ["minus1"], value=_init("m1", np.array([-1], np.int64))),
        helper.make_node("Concat", ["minus1", "prod"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "zero_bias"], ["biased"]),
        helper.make_node("Mul", ["biased", "ones"], ["y"]),
    ]
    inits = [_init("i12", np.array([1, 2], np.int64)), _init("W", RNG.standard_normal((32, 16)).astype(np.float32)),
             _init("zero_bias", np.zeros(16, np.float32)), _init("ones", np.ones((1, 16), np.float32))]
    return _model(nodes, [x], [y], inits)


def test_shape_arithmetic_constants_and_neutral_tensors_go_exactly():
    model = shape_arithmetic_model()
    after, result = _cleaned(model)
    before_ops, after_ops = op_counts(model), op_counts(after)
    assert after_ops["Shape"] == 0 and after_ops["Concat"] == 0 and after_ops["Constant"] == 0
    assert after_ops["Add"] == 0 and after_ops["Mul"] == 0  # x + zeros[16], x * ones[1, 16]: no-ops
    assert sum(after_ops.values()) < sum(before_ops.values())
    assert result.rewrites and "nodes" in result.rewrites[0].what
    assert_same_outputs(model, after, rtol=0, atol=0)


def test_a_neutral_tensor_that_widens_x_stays():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([helper.make_node("Add", ["x", "z"], ["y"])], [x], [y], [_init("z", np.zeros((1, 5), np.float32))])
    after, _ = _cleaned(model)
    assert op_counts(after)["Add"] == 1  # [N, 1] + [1, 5] is [N, 5]: not x
    assert_same_outputs(model, after, rtol=0, atol=0)


def test_pad_fuses_into_conv_exactly():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
             helper.make_node("Conv", ["p", "w", "b"], ["y"], kernel_shape=[3, 3])]
    inits = [_init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             _init("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             _init("b", RNG.standard_normal(4).astype(np.float32))]
    model = _model(nodes, [x], [y], inits)
    after, _ = _cleaned(model)
    assert op_counts(after) == {"Conv": 1}
    assert_same_outputs(model, after, rtol=1e-6, atol=1e-6)


def test_large_weight_is_not_copied_by_a_fold():
    big = RNG.standard_normal((1024, 512)).astype(np.float32)  # 2 MiB
    assert big.nbytes > FOLD_INPUT_BYTES
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),  # onnxscript folds Transpose at any size
             helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])], [y], [_init("W", big)])
    m = ir.from_proto(model)
    tensor = m.graph.initializers["W"].const_value
    result = clean_up(m, PassContext())
    assert [n.op_type for n in m.graph] == ["Transpose", "MatMul"]
    assert list(m.graph.initializers) == ["W"] and m.graph.initializers["W"].const_value is tensor  # not copied
    assert any("not folded" in n for n in result.notes)


def test_microsoft_and_rmsnorm_ops_survive_and_cast_chains_are_kept():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 4, 8])
    d = helper.make_tensor_value_info("d", TensorProto.DOUBLE, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT16, None)
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["t"], domain="com.microsoft",
                              epsilon=1e-5),
             helper.make_node("SimplifiedLayerNormalization", ["t", "g"], ["y"], axis=-1, epsilon=1e-5, stash_type=1),
             helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["df"], ["h"], to=TensorProto.FLOAT16)]
    model = _model(nodes, [x, s, d], [y, h], [_init("g", RNG.standard_normal(8).astype(np.float32))],
                   extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    after, result = _cleaned(model)
    assert op_counts(after) == op_counts(model)
    assert any(sk.node == "Cast" for sk in result.skipped)


def _with_layernorm():
    """Shape arithmetic around a LayerNormalization (canonical): both the optimized model and the floor get cleaned."""
    base = shape_arithmetic_model()
    g = base.graph
    ln = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["xn"], axis=-1, epsilon=1e-5)
    g.node.insert(0, ln)
    for n in g.node:
        if n.op_type == "Reshape":
            n.input[0] = "xn"
    g.initializer.extend([_init("gamma", RNG.uniform(0.5, 1.5, 8).astype(np.float32)),
                          _init("beta", RNG.standard_normal(8).astype(np.float32))])
    return onnx.shape_inference.infer_shapes(base)


@pytest.mark.parametrize("on", [True, False])
def test_option_switches_the_step_and_the_floor_is_cleaned_alike(on):
    model = _with_layernorm()
    out = transform(model, PassContext(cleanup=on, ort_version="1.32.0"))
    names = [r.name for r in out.results]
    assert ("clean_up_graph" in names) is on
    optimized, floor = op_counts(out.optimized), op_counts(out.floor)
    assert (optimized["Shape"] == 0) is on and (floor["Shape"] == 0) is on
    if not on:  # the lower stage changed nothing of the graph around the LayerNorm
        assert optimized == op_counts(model)
    assert_same_outputs(model, out.optimized, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_third_party_models_stay_exact_with_cleanup_and_fusion(arch):
    import normdeploy
    from normdeploy import zoo

    spec = zoo.THIRD_PARTY[arch]
    module = zoo.third_party(arch)  # LayerNorm gains, biases randomized
    res = normdeploy.optimize(module, inputs=(f"{spec.input_name}:1x16:int64",), bench=False, ort_fusions=True)
    ops = op_counts(res.optimized)
    fused = "com.microsoft::" + ("SkipLayerNormalization" if arch == "bert" else "SkipSimplifiedLayerNormalization")
    assert ops[fused] >= 3
    before = op_counts(res.original)
    assert ops["Constant"] == 0 and ops["Shape"] < before["Shape"] and sum(ops.values()) < sum(before.values()) / 2
    assert res.report["accuracy"]["max_rel_err"] < 1e-5
    feeds = {spec.input_name: np.random.default_rng(1).integers(0, 100, (2, 16)).astype(np.int64)}
    from tests.graph_helpers import ort_run

    want, got = ort_run(res.original, feeds), ort_run(res.optimized, feeds)
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-4, atol=1e-5)
