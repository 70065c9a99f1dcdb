"""ort-cpu lowering: which RMSNorm op, and the opset raise of --ort-rms-op standard."""
import os

import numpy as np
import onnx
import pytest

from normdeploy.core.passes import PassContext
from normdeploy.pipeline import Options, prepare, transform
from tests.conftest import MODELS, ort_run


@pytest.mark.parametrize("rms_op,expected,opset", [("simplified", "SimplifiedLayerNormalization", 20),
                                                   ("standard", "RMSNormalization", 23)])
@pytest.mark.slow
def test_rmsnorm_lowering_choice(rms_op, expected, opset):
    _, original, _ = prepare(os.path.join(MODELS, "vit_rmsnorm.pt"), Options.from_flat())
    out = transform(original, PassContext(ort_rms_op=rms_op, ort_version="1.31.1")).optimized
    norms = {n.op_type for n in out.graph.node if "Norm" in n.op_type}
    assert norms == {expected}
    assert next(o.version for o in out.opset_import if o.domain == "") == opset
    if rms_op == "standard":
        onnx.checker.check_model(out, full_check=True)
    x = np.load(os.path.join(MODELS, "digits_test.npz"))["input"][:8]
    (ref,), (got,) = ort_run(original, x), ort_run(out, x)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.slow
def test_old_runtime_keeps_the_opset():
    _, original, _ = prepare(os.path.join(MODELS, "vit_rmsnorm.pt"), Options.from_flat())
    out = transform(original, PassContext(ort_rms_op="standard", ort_version="1.22.0")).optimized
    assert {n.op_type for n in out.graph.node if "Norm" in n.op_type} == {"SimplifiedLayerNormalization"}
