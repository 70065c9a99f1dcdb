"""The default accuracy tolerance follows the float type the model computes in (pipeline.DEFAULT_TOLERANCE).

A float16 model's exact rewrite (a folded gain, a fused RMSNorm) changes rounding by about float16's
precision per layer, so 1e-4 would refuse every deep float16 model; a tolerance the user gives is kept.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

import normdeploy
from normdeploy.core.errors import AccuracyError
from normdeploy.pipeline import DEFAULT_TOLERANCE, compute_dtype


class _Block(nn.Module):
    """RMSNorm (LlamaRMSNorm's arithmetic: fp32 statistic, gain in the model's dtype) -> Linear, residual."""

    def __init__(self, d: int):
        super().__init__()
        self.g = nn.Parameter(torch.rand(d) + 0.5)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.lin(self.g * h.to(x.dtype))


def _model(dtype):
    torch.manual_seed(0)
    m = nn.Sequential(*[_Block(256) for _ in range(12)]).eval().to(dtype)
    m.example_inputs = (torch.randn(2, 16, 256).to(dtype),)
    return m


def test_compute_dtype_reads_the_weight_bytes():
    def model(*dtypes):
        vals = [ir.Value(name=f"w{i}", const_value=ir.tensor(np.ones(10, d), name=f"w{i}")) for i, d in enumerate(dtypes)]
        return ir.Model(ir.Graph(inputs=[], outputs=[], nodes=[], initializers=vals, opset_imports={"": 20}), ir_version=10)

    assert compute_dtype(model(np.float16, np.float16, np.int64)) == "float16"
    assert compute_dtype(model(np.float32, np.float16)) == "float32"  # 40 bytes against 20
    assert compute_dtype(model(np.int64)) == "float32"  # no float weights


@pytest.mark.slow  # exports a 12-block torch model
def test_float16_model_gets_the_float16_tolerance_and_says_so():
    result = normdeploy.optimize(_model(torch.float16), inputs=("x:2x16x256:float16",), bench=False)
    acc = result.report["accuracy"]
    assert acc["tolerance"] == DEFAULT_TOLERANCE["float16"]
    assert acc["max_rel_err"] > DEFAULT_TOLERANCE["float32"], "the model must round differently, or the test shows nothing"
    assert acc["max_rel_err"] <= DEFAULT_TOLERANCE["float16"]
    assert any("computes in float16" in n for n in result.report["notes"])


@pytest.mark.slow  # exports a 12-block torch model
def test_given_tolerance_is_kept_for_float16():
    with pytest.raises(AccuracyError):
        normdeploy.optimize(_model(torch.float16), inputs=("x:2x16x256:float16",), bench=False, tolerance=1e-5)


@pytest.mark.slow  # exports a 12-block torch model
def test_float32_model_keeps_1e_4():
    result = normdeploy.optimize(_model(torch.float32), inputs=("x:2x16x256",), bench=False)
    assert result.report["accuracy"]["tolerance"] == DEFAULT_TOLERANCE["float32"]
    assert not any("computes in" in n for n in result.report["notes"])


def test_cli_reads_tolerance_as_a_number(tmp_path):
    from click.testing import CliRunner

    from normdeploy.cli import main

    m = tmp_path / "m.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 20)]), m)
    r = CliRunner().invoke(main, ["optimize", str(m), "--out", str(tmp_path / "o"), "--no-bench", "--json",
                                  "--tolerance", "0.003"])
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.output)["accuracy"]["tolerance"] == 0.003
