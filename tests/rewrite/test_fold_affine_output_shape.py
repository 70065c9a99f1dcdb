"""A fold that routes a graph output to another tensor keeps the output's declared type and shape.

Regression of ``tests/fuzz/regressions/fp16_conversion_fails_checker.onnx``: ``UnifiedNorm`` with a weight
that is a graph input (it stays a function node, and shape inference gives its output and the Conv
after it a type without a shape) -> ``Conv`` -> ``BatchNormalization`` (the graph output, shape
[2, 2, 4]). The BatchNorm folded into the Conv, whose output took the graph output's name and place
but not its shape; ``onnx.checker`` requires a shape on every graph output, so trt-fp16's conversion
(which checks its result) refused a valid model with "report this as a bug".
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from normdeploy.core import ops
from normdeploy.core.graph import replace_value
from normdeploy.core.passes import PassContext
from normdeploy.lower.precision import convert_for_target
from tests.graph_helpers import run_step
from tests.rewrite.test_fold_affine import G, assert_same, kinds

PASS = "fold_affine_into_linear"


def _unified_norm_conv_bn() -> onnx.ModelProto:
    g = G(seed=1)
    u = g("UnifiedNorm", g.input([2, 3, 4]), g.const([1.3, 0.7, 0.3]), g.input([3], name="w"),
          g.const([-1.2, -0.6, 0.04]), domain=ops.DOMAIN, axis=1, epsilon=1e-5)
    t = g("Conv", u, g.rand(2, 3, 1), kernel_shape=[1])
    m = g.model(g.bn(t, 2, name="out"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2, 4]))
    return m


def _output_type(model: onnx.ModelProto):
    tt = model.graph.output[0].type.tensor_type
    return tt.elem_type, [d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else None


def test_the_output_keeps_its_shape_when_a_batchnorm_folds_into_a_conv_of_unknown_shape():
    before = _unified_norm_conv_bn()
    assert not any(vi.type.tensor_type.HasField("shape") for vi in before.graph.value_info
                   if vi.name.startswith("conv"))  # inference cannot see through the function node
    onnx.checker.check_model(before, full_check=True)
    after, result = run_step(before, PASS, PassContext(target="trt-fp16"))
    assert result.rewrites and kinds(after) == ["UnifiedNorm", "Conv"], result
    assert _output_type(after) == (TensorProto.FLOAT, [2, 2, 4])
    onnx.checker.check_model(after, full_check=True)
    assert_same(before, after)


def test_the_fp16_conversion_of_the_folded_model_passes_the_checker():
    after, _ = run_step(_unified_norm_conv_bn(), PASS, PassContext(target="trt-fp16"))
    converted, report = convert_for_target(after, "trt-fp16")  # raised UnsupportedError ("report this as a bug")
    assert _output_type(converted) == (TensorProto.FLOAT, [2, 2, 4])
    assert report["precision"]["dtype"] == "fp16"


def test_replace_value_gives_the_new_tensor_what_it_does_not_know_and_keeps_what_it_does():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    relu, neg = ir.node("Relu", [x], name="relu"), ir.node("Neg", [x], name="neg")
    old = relu.outputs[0]
    old.name, old.type, old.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, 3])
    new = neg.outputs[0]  # no type, no shape
    graph = ir.Graph([x], [old], nodes=[relu, neg], opset_imports={"": 18})
    replace_value(old, new)
    assert graph.outputs[0] is new and new.name == "y"
    assert new.dtype == ir.DataType.FLOAT and list(new.shape) == [2, 3]
    assert new.shape is not old.shape  # a copy: editing one does not edit the other
    # a graph input that replaces an output: the Identity carrying the output's name gets its type and shape
    other = ir.node("Relu", [x], name="relu2")
    graph.append(other)
    out2 = other.outputs[0]
    out2.name, out2.type, out2.shape = "z", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, 3])
    graph.outputs.append(out2)
    replace_value(out2, x)
    ident = graph.outputs[1]
    assert ident.producer().op_type == "Identity" and ident.name == "z"
    assert ident.dtype == ir.DataType.FLOAT and list(ident.shape) == [2, 3]
    # what the new tensor knows, it keeps
    keep = ir.node("Neg", [x], name="neg2")
    graph.append(keep)
    k = keep.outputs[0]
    k.type, k.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["N", 3])
    replace_value(new, k)
    assert list(k.shape) == [ir.SymbolicDim("N"), 3] and k.name == "y"
    assert [o.name for o in graph.outputs] == ["y", "z"]
