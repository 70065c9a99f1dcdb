"""Shared by the plugin tests: a small model that goes through every canonical normalization op."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normdeploy.core import ops

C = 48


def _np_type(dtype):
    return TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16


def build_canonical_model(dtype=np.float32, *, dyt_w=None, dyt_b=None, alpha_input=False, scale_input=False,
                          seed=0) -> onnx.ModelProto:
    """x [batch, 5, C] through every canonical op, with a MatMul in between (channels last)."""
    rng = np.random.default_rng(seed)

    def init(name, a):
        return numpy_helper.from_array(np.asarray(a).astype(dtype), name)

    w = rng.standard_normal(C) if dyt_w is None else dyt_w
    b = rng.standard_normal(C) if dyt_b is None else dyt_b
    inits = [init("g", rng.standard_normal(C)), init("mm", rng.standard_normal((C, C)) / np.sqrt(C)),
             init("w", np.broadcast_to(w, (C,))), init("b", np.broadcast_to(b, (C,))),
             init("phi", rng.uniform(0.5, 2, C)), init("pw", rng.standard_normal(C)),
             init("pb", rng.standard_normal(C)),
             init("cg", rng.standard_normal(C)), init("r", rng.uniform(0.5, 2, C)), init("uw", rng.standard_normal(C)),
             init("ub", rng.standard_normal(C))]
    inputs = [helper.make_tensor_value_info("x", _np_type(dtype), ["batch", 5, C])]
    if alpha_input:
        inputs.append(helper.make_tensor_value_info("alpha", _np_type(dtype), []))
    else:
        inits.append(init("alpha", np.array(0.7)))
    if scale_input:
        inputs.append(helper.make_tensor_value_info("s", _np_type(dtype), []))
    else:
        inits.append(init("s", np.array(np.sqrt(C))))
    nd = "normdeploy"
    nodes = [
        helper.make_node("RMSNorm", ["x", "g"], ["t1"], domain=nd, epsilon=1e-6, name="rms"),
        helper.make_node("MatMul", ["t1", "mm"], ["t1m"], name="proj"),
        helper.make_node("DynamicTanh", ["t1m", "alpha", "w", "b"], ["t2"], domain=nd, axis=-1, name="dyt"),
        helper.make_node("ScaleNorm", ["t2", "s"], ["t3"], domain=nd, epsilon=1e-5, name="scalenorm"),
        helper.make_node("PowerNorm", ["t3", "phi", "pw", "pb"], ["t4"], domain=nd, groups=4, epsilon=1e-5,
                         name="powernorm"),
        helper.make_node("GroupScaling", ["t4"], ["t5"], domain=nd, groups=3, epsilon=1e-5, name="groupscaling"),
        helper.make_node("CRMSNorm", ["t5", "cg"], ["t6"], domain=nd, epsilon=1e-6, name="crms"),
        helper.make_node("UnifiedNorm", ["t6", "r", "uw", "ub"], ["y"], domain=nd, epsilon=1e-5, axis=-1,
                         name="unified"),
    ]
    graph = helper.make_graph(nodes, "canonical", inputs,
                              [helper.make_tensor_value_info("y", _np_type(dtype), ["batch", 5, C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(nd, 1)],
                              ir_version=10)
    return ops.attach_functions(model)



@pytest.fixture
def canonical_model():
    """``build_canonical_model``: x [batch, 5, 48] through every canonical op (keyword options as documented)."""
    return build_canonical_model
