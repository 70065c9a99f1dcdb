"""The trt-* lowering end to end on CPU: canonical model -> plugin nodes -> onnx.reference with the plugin
ops emulated by the Triton kernels under the interpreter, compared with the original model run by
ONNX Runtime (function bodies). Tolerances: fp32 1e-5, fp16 1e-2, relative to the output's largest value.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import normdeploy.lower.trt as lower_trt
from normdeploy.core import ops
from normdeploy.core.passes import PassContext
from normdeploy.lower.plugins.emulate import PLUGIN_OPS
from normdeploy.lower.plugins.trt_plugins import NAMESPACE, PLUGINS
from normdeploy.options import TARGETS
from normdeploy.pipeline import pass_table, step
from tests.graph_helpers import run_step

C = 48  # the width of conftest.canonical_model
TOL = {np.float32: 1e-5, np.float16: 1e-2}


def lower(model, target="trt-fp32"):
    return run_step(model, "lower_to_trt_plugins", PassContext(target=target))


def run_original(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def run_lowered(model, feeds):
    return ReferenceEvaluator(model, new_ops=PLUGIN_OPS).run(None, feeds)[0]


def assert_matches(got, ref, dtype, what):
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    scale = float(np.abs(ref.astype(np.float64)).max())
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    assert err <= TOL[dtype] * scale, f"{what}: max |lowered - original| = {err:.3g} > {TOL[dtype]} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_lowered_model_computes_what_the_original_computes(canonical_model, dtype):
    model = canonical_model(dtype)
    target = "trt-fp32" if dtype == np.float32 else "trt-fp16"
    lowered, result = lower(model, target)
    assert result.matched == 7 and len(result.rewrites) == 7 and not result.skipped
    onnx.checker.check_model(lowered, full_check=False)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 5, C)).astype(dtype)}
    assert_matches(run_lowered(lowered, feeds), run_original(model, feeds), dtype, target)
    # the batch axis stays dynamic: another batch size runs through the same lowered graph
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 5, C)).astype(dtype)}
    assert_matches(run_lowered(lowered, feeds), run_original(model, feeds), dtype, f"{target} batch 1")


def test_plugin_node_format(canonical_model):
    lowered, _ = lower(canonical_model())
    kinds = {onnx.AttributeProto.INT: int, onnx.AttributeProto.FLOAT: float}
    plugin_nodes = [n for n in lowered.graph.node if n.domain == NAMESPACE]
    assert [n.op_type for n in plugin_nodes] == ["NormdeployRMSNorm", "NormdeployDynamicTanh", "NormdeployScaleNorm",
                                                 "NormdeployGroupScaling", "NormdeployGroupScaling",
                                                 "NormdeployCRMSNorm"]
    for n in plugin_nodes:
        spec = PLUGINS[n.op_type]
        attrs = {a.name: a for a in n.attribute}
        assert list(attrs) == [*spec.attribute_names, "plugin_namespace", "aot"]
        for name, typ in spec.attributes:  # INT -> INT32 field, FLOAT -> FLOAT32 field in TensorRT's parser
            assert kinds[attrs[name].type] is typ, (n.op_type, name)
        assert attrs["plugin_namespace"].type == onnx.AttributeProto.STRING
        assert helper.get_attribute_value(attrs["plugin_namespace"]) == b"normdeploy"
        assert helper.get_attribute_value(attrs["aot"]) == 1
        assert len(n.input) == len(spec.inputs) and len(n.output) == 1
    # canonical ops are gone, and with them their function bodies; plugin ops have none
    assert not any(n.domain == NAMESPACE and n.op_type in ops.OPS for n in lowered.graph.node)
    assert not any(f.name.startswith("Normdeploy") for f in lowered.functions)
    assert not [f for f in lowered.functions if f.domain == ops.DOMAIN]
    scalenorm = next(n for n in plugin_nodes if n.op_type == "NormdeployScaleNorm")
    scale = helper.get_attribute_value(next(a for a in scalenorm.attribute if a.name == "scale"))
    assert scale == pytest.approx(np.sqrt(C), rel=1e-7)
    # PowerNorm: GroupScaling plugin + Mul by w / sqrt(phi + eps) + Add b, folded in float64, stored once
    inits = {i.name: numpy_helper.to_array(i) for i in lowered.graph.initializer}
    a = next(v for k, v in inits.items() if k.startswith("powernorm") and k.endswith("_a"))
    src = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in canonical_model().graph.initializer}
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, (src["pw"] / np.sqrt(src["phi"] + 1e-5)).astype(np.float32))


def test_dynamic_tanh_variants_follow_the_affine_constants(canonical_model):
    cases = {"NormdeployDynamicTanhPlain": (np.ones(C), np.zeros(C)),
             "NormdeployDynamicTanhGain": (None, np.zeros(C)),
             "NormdeployDynamicTanh": (np.ones(C), None)}
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 5, C)).astype(np.float32)}
    for plugin, (w, b) in cases.items():
        model = canonical_model(dyt_w=w, dyt_b=b)
        lowered, _ = lower(model)
        ops_ = [n.op_type for n in lowered.graph.node]
        assert plugin in ops_, (plugin, ops_)
        assert_matches(run_lowered(lowered, feeds), run_original(model, feeds), np.float32, plugin)


def test_dyt_on_the_channel_axis_of_feature_maps():
    rng = np.random.default_rng(4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 5, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 5, 4])
    inits = [numpy_helper.from_array(np.float32(1.3), "alpha"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "w"),
             numpy_helper.from_array(np.float32(0.25), "b")]  # a scalar bias: expanded to [C]
    node = helper.make_node("DynamicTanh", ["x", "alpha", "w", "b"], ["y"], domain="normdeploy", axis=1, name="dyt")
    model = ops.attach_functions(helper.make_model(
        helper.make_graph([node], "nchw", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("normdeploy", 1)], ir_version=10))
    lowered, result = lower(model)
    assert [n.op_type for n in lowered.graph.node] == ["NormdeployDynamicTanh"], result
    feeds = {"x": rng.standard_normal((2, 6, 5, 4)).astype(np.float32)}
    assert_matches(run_lowered(lowered, feeds), run_original(model, feeds), np.float32, "NCHW DyT")


def test_unlowerable_nodes_are_skipped_with_a_reason_and_still_run(canonical_model):
    model = canonical_model(alpha_input=True, scale_input=True)
    lowered, result = lower(model)
    reasons = {s.node: s.reason for s in result.skipped}
    assert set(reasons) == {"dyt", "scalenorm"}
    assert "alpha is not a constant" in reasons["dyt"] and "g is not a constant" in reasons["scalenorm"]
    # the skipped canonical nodes keep their function bodies; the rest is lowered
    assert {f.name for f in lowered.functions} == {"DynamicTanh", "ScaleNorm"}
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 5, C)).astype(np.float32),
             "alpha": np.array(0.6, np.float32), "s": np.array(3.0, np.float32)}
    assert_matches(run_lowered(lowered, feeds), run_original(model, feeds), np.float32, "partially lowered")


def test_bad_groups_are_skipped():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])
    node = helper.make_node("GroupScaling", ["x"], ["y"], domain="normdeploy", groups=4, name="gs")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("normdeploy", 1)])
    _, result = lower(ops.attach_functions(model))
    assert result.skipped and "not divisible" in result.skipped[0].reason and not result.rewrites


def _rms_variant_model(width, eps_outside: int, partial: int, dtype=np.float32, c: int = 16):
    """One canonical RMSNorm with bzhangGo/rmsnorm's variant attributes; ``width`` None: a dynamic last axis."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shape = ["batch", 5, width if width is not None else "hidden"]
    x, y = (helper.make_tensor_value_info(n, elem, shape) for n in ("x", "y"))
    g = numpy_helper.from_array(np.linspace(-1.5, 2.0, c).astype(dtype), "g")
    attrs = {k: v for k, v in (("eps_outside", eps_outside), ("partial", partial)) if v}
    node = helper.make_node("RMSNorm", ["x", "g"], ["y"], domain="normdeploy", name="rms", epsilon=0.1, **attrs)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [g]), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("normdeploy", 1)])
    return ops.attach_functions(model)


def _rms_variant_numpy(x, g, eps, eps_outside, partial):
    x64 = x.astype(np.float64)
    s = x64[..., :partial] if partial else x64
    ms = np.mean(s * s, axis=-1, keepdims=True)
    return g.astype(np.float64) * x64 / (np.sqrt(ms) + eps if eps_outside else np.sqrt(ms + eps))


@pytest.mark.parametrize("width", [16, None], ids=["static", "dynamic-width"])
@pytest.mark.parametrize("eps_outside,partial", [(1, 0), (0, 7), (1, 7), (1, 16)],
                         ids=["eps_outside", "partial", "both", "partial-all"])
def test_rmsnorm_variants_lower_to_the_plugin_with_their_fields_and_match(width, eps_outside, partial):
    """bzhangGo/rmsnorm's variants become NormdeployRMSNorm with eps_outside / partial (an unknown width is fine:
    the kernel gets n_cols at run time); the kernel emulation and plugins_as_functions equal the canonical
    node's function body (ONNX Runtime) and a float64 reference."""
    from normdeploy.verify.precision import plugins_as_functions

    model = _rms_variant_model(width, eps_outside, partial)
    lowered, result = lower(model)
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, []), result
    (node,) = lowered.graph.node
    assert node.op_type == "NormdeployRMSNorm" and node.domain == NAMESPACE
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["eps_outside"], attrs["partial"]) == (eps_outside, partial)
    assert abs(attrs["epsilon"] - 0.1) < 1e-7 and not lowered.functions
    onnx.checker.check_model(lowered, full_check=False)
    feeds = {"x": (np.random.default_rng(9).standard_normal((3, 5, 16)) * 0.5).astype(np.float32)}
    original = run_original(model, feeds)
    g = numpy_helper.to_array(model.graph.initializer[0])
    ref = _rms_variant_numpy(feeds["x"], g, float(np.float32(0.1)), eps_outside, partial)
    assert np.abs(original - ref).max() <= 1e-5 * np.abs(ref).max()  # the function body, the reference
    assert_matches(run_lowered(lowered, feeds), original, np.float32, "kernel emulation")
    sess = ort.InferenceSession(plugins_as_functions(lowered).SerializeToString(), providers=["CPUExecutionProvider"])
    assert_matches(sess.run(None, feeds)[0], original, np.float32, "plugins_as_functions")


def test_rmsnorm_variant_fp16_keeps_fp32_statistics():
    model = _rms_variant_model(16, 1, 5, np.float16)
    lowered, result = lower(model, "trt-fp16")
    assert [n.op_type for n in lowered.graph.node] == ["NormdeployRMSNorm"] and not result.skipped
    feeds = {"x": (np.random.default_rng(10).standard_normal((2, 5, 16)) * 300).astype(np.float16)}  # x^2 > fp16
    assert_matches(run_lowered(lowered, feeds), run_original(model, feeds), np.float16, "fp16 variant")


@pytest.mark.parametrize("partial,eps_outside,why", [(17, 0, "exceeds the 16 channels"), (-2, 0, "negative"),
                                                      (0, 2, "neither 0 nor 1")])
def test_rmsnorm_variant_the_plugin_cannot_express_is_skipped_with_a_reason_and_still_runs(partial, eps_outside, why):
    model = _rms_variant_model(16, eps_outside, partial)
    lowered, result = lower(model)
    assert not result.rewrites and len(result.skipped) == 1 and why in result.skipped[0].reason, result.skipped
    assert [n.op_type for n in lowered.graph.node] == ["RMSNorm"]
    if partial >= 0 and eps_outside in (0, 1):  # the function body still computes it
        feeds = {"x": np.random.default_rng(11).standard_normal((2, 5, 16)).astype(np.float32)}
        assert np.isfinite(run_original(lowered, feeds)).all()


def test_plugin_node_without_the_rmsnorm_variant_fields_is_the_plain_rmsnorm():
    """A NormdeployRMSNorm node lowered before eps_outside / partial existed (epsilon only) still runs in both
    emulations, as the plain RMSNorm."""
    from normdeploy.verify.precision import plugins_as_functions

    model = _rms_variant_model(16, 0, 0)
    lowered, _ = lower(model)
    (node,) = lowered.graph.node
    keep = [a for a in node.attribute if a.name not in ("eps_outside", "partial")]
    del node.attribute[:]
    node.attribute.extend(keep)
    feeds = {"x": np.random.default_rng(12).standard_normal((2, 5, 16)).astype(np.float32)}
    original = run_original(model, feeds)
    assert_matches(run_lowered(lowered, feeds), original, np.float32, "old node, kernel emulation")
    sess = ort.InferenceSession(plugins_as_functions(lowered).SerializeToString(), providers=["CPUExecutionProvider"])
    assert_matches(sess.run(None, feeds)[0], original, np.float32, "old node, plugins_as_functions")


def test_pass_is_in_the_tensorrt_tables_only():
    spec = step("lower_to_trt_plugins")
    assert spec.exact and {t for t in TARGETS if spec in pass_table(t)["lower"]} == {"trt-fp32", "trt-fp16", "trt-bf16"}
    assert spec.fn is lower_trt.lower_to_trt_plugins
    assert spec in pass_table("trt-bf16")["lower"]
    assert spec not in pass_table("ort-cpu")["lower"]


@pytest.mark.slow
def test_modules_exported_by_torch_lower_and_match():
    """normdeploy.nn modules through torch.onnx.export (canonical nodes), lowered, emulated, compared with torch."""
    import torch

    from normdeploy import nn as N

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = torch.nn.ModuleList([N.RMSNorm(32), N.DynamicTanh(32, 0.6), N.ScaleNorm(32),
                                              N.PowerNorm(32, groups=2), N.CRMSNorm(32), N.UnifiedNorm(32, axis=-1)])
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x):
            for i, m in enumerate(self.norms):
                x = m(x)
                if i == 1:
                    x = self.proj(x)
            return x

    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        for m in block.modules():
            for name in ("running_phi", "running_moment"):
                if hasattr(m, name):
                    getattr(m, name).uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 32)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.onnx.export(block, (x,), dynamo=True, optimize=False, opset_version=20, verbose=False).model_proto
    ops.attach_functions(model)
    assert sorted(n.op_type for n in model.graph.node if n.domain == "normdeploy") == sorted(
        ["RMSNorm", "DynamicTanh", "ScaleNorm", "PowerNorm", "CRMSNorm", "UnifiedNorm"])
    lowered, result = lower(model)
    assert not result.skipped and len(result.rewrites) == 6
    got = run_lowered(lowered, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        ref = block(x).numpy()
    assert_matches(got, ref, np.float32, "exported block")


def test_bf16_powernorm_constants_are_folded_in_float64_and_rounded_once():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(6)

    def bf16(name, a):
        return numpy_helper.from_array(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16), name)

    inits = [bf16("phi", rng.uniform(0.5, 2, 8)), bf16("w", rng.standard_normal(8)), bf16("b", rng.standard_normal(8))]
    node = helper.make_node("PowerNorm", ["x", "phi", "w", "b"], ["y"], domain="normdeploy", groups=2, name="pn")
    graph = helper.make_graph([node], "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 8])], inits)
    model = ops.attach_functions(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("normdeploy", 1)], ir_version=10))
    lowered, result = lower(model, "trt-bf16")
    assert [n.op_type for n in lowered.graph.node] == ["NormdeployGroupScaling", "Mul", "Add"], result
    onnx.checker.check_model(lowered, full_check=False)
    src = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in inits}
    out = {i.name: i for i in lowered.graph.initializer}
    assert out["pn_a"].data_type == TensorProto.BFLOAT16
    a = numpy_helper.to_array(out["pn_a"]).astype(np.float64)
    np.testing.assert_array_equal(a, (src["w"] / np.sqrt(src["phi"] + 1e-5)).astype(ml_dtypes.bfloat16))
