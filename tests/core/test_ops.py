"""Each canonical node, exported from its torch module, evaluates equal to the module (eval).

Three evaluations are compared with torch on the same random inputs: ONNX Runtime running
the node through its ONNX function body, the NumPy reference of normdeploy.core.ops, and the
ort-cpu lowering (standard ops only).
"""
import numpy as np
import onnx
import pytest
import torch

from normdeploy import nn as N
from normdeploy.core import ops
from normdeploy.core.passes import PassContext
from normdeploy.pipeline import run_stage
from tests.conftest import export_module, ort_run, randomize

CASES = [
    ("UnifiedNorm", lambda: N.UnifiedNorm(6), (3, 6, 5, 4)),
    ("UnifiedNorm", lambda: N.UnifiedNorm(6, axis=-1), (2, 7, 6)),
    ("PowerNorm", lambda: N.PowerNorm(8, groups=2), (2, 5, 8)),
    ("GroupScaling", lambda: N.GroupScaling(4), (3, 5, 12)),
    ("RMSNorm", lambda: N.RMSNorm(7), (2, 3, 7)),
    ("CRMSNorm", lambda: N.CRMSNorm(7), (2, 3, 7)),
    ("DynamicTanh", lambda: N.DynamicTanh(6), (2, 3, 6)),
    ("DynamicTanh", lambda: N.DynamicTanh(6, axis=1), (2, 6, 3, 3)),
    ("ScaleNorm", lambda: N.ScaleNorm(7), (2, 3, 7)),
]


def _initializers(model):
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.slow
@pytest.mark.parametrize("op,make,shape", CASES, ids=[f"{c[0]}-{len(c[2])}d" for c in CASES])
@pytest.mark.parametrize("opset", [18, 20, 23])
def test_canonical_node_equals_torch_module(op, make, shape, opset):
    module = randomize(make()).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    expected = module(x).detach().numpy()
    model = export_module(module, shape, opset=opset)
    nodes = [n for n in model.graph.node if n.domain == ops.DOMAIN]
    assert [n.op_type for n in nodes] == [op]
    assert {f.name for f in model.functions} == {op}
    onnx.checker.check_model(model, full_check=True)

    (via_body,) = ort_run(model, x.numpy())
    np.testing.assert_allclose(via_body, expected, rtol=1e-5, atol=1e-5)

    init = _initializers(model)
    args = [x.numpy()] + [init[i] for i in nodes[0].input[1:]]
    np.testing.assert_allclose(ops.REFERENCE[op](*args, **ops.node_attributes(nodes[0])), expected, rtol=1e-5, atol=1e-5)

    lowered, results = run_stage(model, "lower", PassContext(target="ort-cpu"))
    assert not [n for n in lowered.graph.node if n.domain == ops.DOMAIN], results[0].skipped
    (via_lowering,) = ort_run(lowered, x.numpy())
    np.testing.assert_allclose(via_lowering, expected, rtol=1e-5, atol=1e-5)


def test_batch_axis_is_dynamic():
    module = randomize(N.RMSNorm(8)).eval()
    model = export_module(module, (2, 3, 8))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8)
        (y,) = ort_run(model, x.numpy())
        np.testing.assert_allclose(y, module(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_attach_functions_is_idempotent_and_only_for_used_ops():
    model = export_module(randomize(N.DynamicTanh(4)), (2, 4))
    before = model.SerializeToString()
    ops.attach_functions(model)
    assert model.SerializeToString() == before
    assert [f.name for f in model.functions] == ["DynamicTanh"]


@pytest.mark.parametrize("op,shape", [("ScaleNorm", (2, 3, 7)), ("CRMSNorm", (2, 3, 7)), ("RMSNorm", (2, 3, 7)),
                                      ("UnifiedNorm", (2, 6, 3, 3))])
@pytest.mark.parametrize("opset", [13, 17])
def test_function_bodies_run_at_older_opsets_and_use_attribute_defaults(op, shape, opset):
    """Bodies written for opsets 13-17 (axes as attribute or input) run, and a node without attributes
    takes the op's defaults."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    c = shape[1] if op == "UnifiedNorm" else shape[-1]
    params = {"ScaleNorm": [np.array(2.0, np.float32)], "CRMSNorm": [rng.uniform(0.5, 1.5, c).astype(np.float32)],
              "RMSNorm": [rng.uniform(0.5, 1.5, c).astype(np.float32)],
              "UnifiedNorm": [rng.uniform(0.5, 2, c).astype(np.float32), rng.uniform(0.5, 1.5, c).astype(np.float32),
                              rng.standard_normal(c).astype(np.float32)]}[op]
    names = [f"p{i}" for i in range(len(params))]
    node = helper.make_node(op, ["x"] + names, ["y"], domain=ops.DOMAIN)  # no attributes: defaults apply
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(p, n) for p, n in zip(params, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, 1)],
                              ir_version=10)
    ops.attach_functions(model)
    (y,) = ort_run(model, x)
    np.testing.assert_allclose(y, ops.REFERENCE[op](x, *params, **ops.ATTRIBUTES[op]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs", [{"eps_outside": 1}, {"partial": 3}, {"eps_outside": 1, "partial": 5},
                                   {"epsilon": 0.3, "eps_outside": 1, "partial": 2}])
@pytest.mark.parametrize("opset", [13, 17, 18, 23])
def test_rmsnorm_variant_body_computes_eps_outside_and_partial(attrs, opset):
    """bzhangGo/rmsnorm's variants through RMSNorm's function body: g x / (rms(x[..., :k]) + eps) and
    g x / sqrt(mean(x[..., :k]^2) + eps), against a float64 formula and the NumPy reference; a model of plain
    RMSNorms keeps the plain body (the variant attributes cost it nothing)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(opset)
    x = (rng.standard_normal((2, 3, 7)) * 2 + 0.5).astype(np.float32)
    g = rng.uniform(0.5, 1.5, 7).astype(np.float32) * np.where(rng.random(7) < 0.3, -1, 1).astype(np.float32)

    def model(node_attrs):
        node = helper.make_node("RMSNorm", ["x", "g"], ["y"], domain=ops.DOMAIN, **node_attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [onnx.numpy_helper.from_array(g, "g")])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, 1)],
                              ir_version=10)
        return ops.attach_functions(m)

    m = model(attrs)
    (y,) = ort_run(m, x)
    k, eps = attrs.get("partial") or 7, attrs.get("epsilon", ops.ATTRIBUTES["RMSNorm"]["epsilon"])
    rms = np.sqrt(np.mean(x[..., :k].astype(np.float64) ** 2, -1, keepdims=True))
    want = g * x / ((rms + eps) if attrs.get("eps_outside") else np.sqrt(rms ** 2 + eps))
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ops.REFERENCE["RMSNorm"](x, g, **{**ops.ATTRIBUTES["RMSNorm"], **attrs}), want,
                               rtol=2e-6, atol=1e-6)
    plain = model({})
    assert len(plain.functions[0].node) < len(m.functions[0].node)
    assert not {n.op_type for n in plain.functions[0].node} & {"Slice", "Where"}
