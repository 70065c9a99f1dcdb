"""openvino lowering: RMSNorm/GroupScaling decomposed into standard ops OpenVINO fuses, no local function left."""
import numpy as np
import onnx
import pytest
import torch

from normdeploy import nn as ndnn
from normdeploy.core.ops import DOMAIN
from normdeploy.core.passes import PassContext
from normdeploy.pipeline import transform
from tests.conftest import export_module, ort_run, randomize

pytest.importorskip("openvino")
from normdeploy.build.openvino import OpenVinoRunner  # noqa: E402


class Block(torch.nn.Module):
    """RMSNorm and PowerNorm (GroupScaling, groups of 16) with randomized gains and statistics, between linears."""

    def __init__(self, d=64):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(d, d), torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.rms = ndnn.RMSNorm(d)
        self.pn = ndnn.PowerNorm(d, groups=4)

    def forward(self, x):
        return self.c(self.pn(self.b(self.rms(self.a(x)))))


def _model():
    m = randomize(Block().eval(), seed=3)
    return export_module(m, (2, 5, 64))


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_openvino_lowering_is_standard_ops_and_exact():
    original = _model()
    assert any(n.domain == DOMAIN for n in original.graph.node)
    out = transform(original, PassContext(target="openvino")).optimized
    ops = _ops(out)
    assert not any(n.domain == DOMAIN for n in out.graph.node) and not out.functions
    assert not ops & {"SimplifiedLayerNormalization", "RMSNormalization"}  # decomposed, at the model's opset
    assert {"ReduceMean", "Sqrt", "Div"} <= ops
    assert next(o.version for o in out.opset_import if o.domain == "") == 20
    onnx.checker.check_model(out)
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    (ref,) = ort_run(original, x)
    ov = OpenVinoRunner(out, 1)
    (got,) = ov.run({ov.input_names[0]: x})
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5
    assert ov.precision == "f32"
    assert ov.layers.get("RMS", 0) >= 1  # OpenVINO fused the decomposed RMSNorm into its RMS layer


def test_ort_lowering_is_unchanged():
    out = transform(_model(), PassContext(target="ort-cpu")).optimized
    assert "SimplifiedLayerNormalization" in _ops(out)


def test_leftover_canonical_node_is_inlined():
    """A canonical node the lowering leaves (gain computed at run time) is inlined from its function body."""
    from normdeploy.core.passes import PassResult  # noqa: F401
    from normdeploy.lower.openvino import inline_canonical_functions
    import onnx_ir as ir

    g = onnx.helper
    node = g.make_node("RMSNorm", ["x", "gain"], ["y"], domain=DOMAIN, epsilon=1e-5)
    graph = g.make_graph([g.make_node("Abs", ["s"], ["gain"]), node], "g",
                         [g.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8]),
                          g.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [8])],
                         [g.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])])
    model = g.make_model(graph, opset_imports=[g.make_opsetid("", 20), g.make_opsetid(DOMAIN, 1)])
    from normdeploy.core.ops import attach_functions

    attach_functions(model)
    m = ir.from_proto(model)
    res = inline_canonical_functions(m, PassContext(target="openvino"))
    out = ir.to_proto(m)
    assert res.matched == 1 and len(res.rewrites) == 1 and "inlined" in res.rewrites[0].what
    assert not out.functions and not any(n.domain == DOMAIN for n in out.graph.node)
    rng = np.random.default_rng(1)
    x, s = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    (ref,) = ort_run(model, x, s)
    ov = OpenVinoRunner(out, 1)
    (got,) = ov.run({"x": x, "s": s})
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert inline_canonical_functions(m, PassContext(target="openvino")) is None  # nothing left: no result
