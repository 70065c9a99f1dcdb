"""Stage ``export``: the TorchScript fallback where the dynamo exporter fails, the exporter's one-line cause,
and ``.pt2`` files of Hugging Face models (their pytree output types), loaded without a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from normdeploy import export
from normdeploy.core.errors import InputError, UnsupportedError
from normdeploy.core.inputs import InputSpec
from normdeploy.load import Loaded, load, pytree_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DYNAMO_ERROR = """Failed to decompose the FX graph for ONNX compatibility. \x1b[96mThis is step 2/3\x1b[0m of exporting the model to ONNX. Next steps:
- Create an issue in the PyTorch GitHub repository against the \x1b[96m*torch.export*\x1b[0m component.

## Exception summary

<class 'ValueError'>: Cannot view a tensor with shape torch.Size([s72, 8, 4, 8]) and strides (256, 8, 64, 1) as a tensor with shape (s72, 8, 32)!

(Refer to the full stack trace above for more information.)"""


def test_exporter_cause_is_the_exception_summary_and_the_step():
    cause = export.exporter_cause(RuntimeError(DYNAMO_ERROR))
    assert cause == ("ValueError: Cannot view a tensor with shape torch.Size([s72, 8, 4, 8]) and strides "
                     "(256, 8, 64, 1) as a tensor with shape (s72, 8, 32)! (in torch's decomposition)")
    assert export.exporter_cause(KeyError("plain")) == "KeyError: 'plain'"


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.ln = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.ln(self.lin(x)).relu()


def _loaded(dynamic=None) -> Loaded:
    return Loaded("module", "<test>", _Net().eval(), [InputSpec("x", (1, 4, 8), "float32", dynamic or {0: "batch"})])


def test_dynamo_failure_falls_back_to_torchscript_with_the_same_names_and_axes(monkeypatch):
    def fail(loaded, args, opset):
        raise export._DynamoFailed("ValueError: Cannot view a tensor (in torch's decomposition)", "hint")

    monkeypatch.setattr(export, "_export_dynamo", fail)
    model, notes = export.to_onnx(_loaded({0: "batch", 1: "tokens"}))
    assert any(n.startswith("the dynamo exporter failed (ValueError: Cannot view a tensor (in torch's "
                            "decomposition)); exported with the TorchScript exporter") for n in notes), notes
    (x,) = model.graph.inputs
    assert x.name == "x" and [getattr(d, "value", d) for d in x.shape] == ["batch", "tokens", 8]
    (y,) = model.graph.outputs
    assert y.name == "output" and getattr(y.shape[0], "value", None) == "batch"
    assert any(n.op_type == "LayerNormalization" for n in model.graph)  # TorchScript's own spelling, at opset 20
    from tests.conftest import ort_run

    xs = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    with torch.no_grad():
        ref = _loaded().obj(torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(ort_run(model, xs)[0], ref, rtol=1e-5, atol=1e-6)


def test_both_exporters_failing_names_both_causes(monkeypatch):
    monkeypatch.setattr(export, "_export_dynamo", lambda *a: (_ for _ in ()).throw(
        export._DynamoFailed("ValueError: dynamo cause", "hint")))
    monkeypatch.setattr(export, "_export_torchscript", lambda *a: (_ for _ in ()).throw(
        UnsupportedError("TorchScript export failed: RuntimeError: ts cause", "x")))
    with pytest.raises(UnsupportedError) as e:
        export.to_onnx(_loaded())
    assert "dynamo: ValueError: dynamo cause" in e.value.message and "ts cause" in e.value.message
    assert "\n" not in e.value.message


def _t5_encoder():
    import transformers as T

    torch.manual_seed(0)
    model = T.T5EncoderModel(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100,
                                        use_cache=False)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "T5LayerNorm":
                m.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.slow
def test_hf_t5_fails_in_dynamo_decomposition_and_optimizes_through_torchscript():
    """Hugging Face T5: the dynamo exporter fails in torch's decomposition (a view of a transposed tensor); the
    TorchScript export carries on, its RMSNorms (T5LayerNorm, fp32 upcast) are recognized and stay exact."""
    import normdeploy

    res = normdeploy.optimize(_t5_encoder(), inputs=("input_ids:1x8:int64",), bench=False)
    rep = res.report
    fallback = [n for n in rep["notes"] if n.startswith("the dynamo exporter failed")]
    assert fallback and "in torch's decomposition" in fallback[0], rep["notes"]
    assert rep["norm_nodes"]["before"] == {"RMSNorm": 5}, rep["norm_nodes"]  # 2 per block + the final norm
    assert rep["accuracy"]["max_rel_err"] <= 1e-5 and rep["export_fidelity"]["max_rel_err"] <= 1e-5
    names = sorted(e["node"] for e in rep["normalizations"])
    assert names == ["encoder.block.0.layer.0.layer_norm", "encoder.block.0.layer.1.layer_norm",
                     "encoder.block.1.layer.0.layer_norm", "encoder.block.1.layer.1.layer_norm",
                     "encoder.final_layer_norm"], names  # TorchScript's "/encoder/block.0/..." names, as modules
    assert all(e["recognized_by"] == "recognize_rmsnorm" and "Pow ReduceMean" in e["spelling"]
               for e in rep["normalizations"]), rep["normalizations"]
    assert [o.name for o in res.optimized.graph.output] == ["last_hidden_state"]


# ----------------------------------------------------------------------------- .pt2 of Hugging Face models

_SAVE_BERT_PT2 = """
import sys, torch, transformers as T
torch.manual_seed(0)
m = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             vocab_size=100, max_position_embeddings=64)).eval()
torch.export.save(torch.export.export(m, (torch.randint(0, 100, (2, 8)),)), sys.argv[1])
"""

_SAVE_CUSTOM_PT2 = """
import dataclasses, sys, torch
from torch.utils import _pytree as pytree

@dataclasses.dataclass
class Out:
    y: torch.Tensor

pytree.register_dataclass(Out, serialized_type_name="mylib.Out")

class M(torch.nn.Module):
    def forward(self, x):
        return Out(x * 2)

torch.export.save(torch.export.export(M(), (torch.randn(2, 3),)), sys.argv[1])
"""


def _python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.slow
def test_pt2_of_a_hugging_face_model_loads_in_a_fresh_process(tmp_path):
    """torch.export.load refuses an unregistered pytree type; normdeploy imports transformers' output types first
    (in a fresh process, where nothing imported transformers yet)."""
    path = tmp_path / "bert.pt2"
    assert _python(_SAVE_BERT_PT2, path).returncode == 0
    assert "transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions" in pytree_types(str(path))
    r = _python("import sys; from normdeploy.cli import main; main()", "inspect", path, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    info = json.loads(r.stdout)
    assert [e["kind"] for e in info["normalizations"]] == ["LayerNorm"] * 3, info["normalizations"]


@pytest.mark.slow
def test_pt2_with_an_unregistered_output_type_is_one_line(tmp_path, cli):
    path = tmp_path / "custom.pt2"
    assert _python(_SAVE_CUSTOM_PT2, path).returncode == 0
    with pytest.raises(InputError) as e:
        load(str(path))
    assert e.value.message.startswith(f"{path} returns mylib.Out, a type torch's pytree does not know here")
    r = cli("inspect", path)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_pt2_of_hf_t5_falls_back_with_the_shapes_it_was_saved_with(tmp_path):
    """A .pt2 keeps the guards of its export: saved with static shapes, the TorchScript fallback exports it static."""
    import normdeploy

    path = tmp_path / "t5.pt2"
    torch.export.save(torch.export.export(_t5_encoder(), (torch.randint(0, 100, (2, 8)),)), path)
    rep = normdeploy.optimize(str(path), bench=False).report
    assert any(n.startswith("the dynamo exporter failed") for n in rep["notes"]), rep["notes"]
    assert "batch axis exported static: the .pt2 was saved with static shapes" in rep["notes"]
    assert rep["norm_nodes"]["before"] == {"RMSNorm": 5}
    assert rep["accuracy"]["max_rel_err"] <= 1e-5 and rep["export_fidelity"]["max_rel_err"] <= 1e-5
