"""Every zoo model through ``optimize --target ort-cpu`` (issue 8, item 2).

For each entry of ``models/zoo.json``: only exact rewrites, max relative error at most 1e-4
against the original on random inputs and on the model's own test split, and on that split
the optimized model predicts exactly what the original predicts: top-1 agreement 1.0 on the
digits test split (and so the test accuracy ``zoo.json`` records), per-token agreement on
the Llama decoder's copy-task split, and identical spikes, bit for bit, in the spiking CNN
(MPBN folded into the firing threshold).
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from normdeploy.core import norms as survey
from normdeploy.pipeline import Options, optimize
from tests.conftest import MODELS, ort_run

pytestmark = pytest.mark.slow  # exports whole models

TOL = 1e-4
with open(os.path.join(MODELS, "zoo.json")) as f:
    ZOO = json.load(f)
NAMES = list(ZOO)
DIGITS = [n for n in NAMES if ZOO[n]["test_set"] == "digits_test.npz"]

#: name -> (norm nodes before, norm nodes after, {pass: rewrites it must make})
EXPECTED = {
    "digits_cnn_bn_un": ({"BatchNorm": 1, "UnifiedNorm": 1}, {}, {"fold_affine_into_linear": 2}),
    "resnet_bn": ({"BatchNorm": 9}, {}, {"fold_affine_into_linear": 9}),
    "mobilenet_bn": ({"BatchNorm": 14}, {}, {"fold_affine_into_linear": 14}),
    "vit_ln": ({"LayerNorm": 9}, {"RMSNorm": 9},
               {"preln_to_rmsnorm": 9, "fold_affine_into_linear": 9, "lower_canonical_to_standard_ops": 9}),
    "vit_un": ({"UnifiedNorm": 9}, {}, {"fold_affine_into_linear": 9}),
    # GroupScaling over groups of 16 channels runs as decomposed ops (Mul, ReduceMean, Add, Sqrt, Div):
    # ONNX Runtime's fused kernel is slower on rows that short (normdeploy/lower/ort_cpu.py, SHORT_ROW)
    "vit_powernorm": ({"PowerNorm": 9}, {},
                      {"fold_affine_into_linear": 9, "lower_canonical_to_standard_ops": 9}),
    "vit_dyt": ({"DynamicTanh": 9}, {}, {"fold_affine_into_linear": 9, "lower_canonical_to_standard_ops": 9}),
    "vit_rmsnorm": ({"RMSNorm": 9}, {"RMSNorm": 9},
                    {"fold_affine_into_linear": 9, "lower_canonical_to_standard_ops": 9}),
    "vit_scalenorm": ({"ScaleNorm": 9}, {}, {"fold_affine_into_linear": 9, "lower_canonical_to_standard_ops": 9}),
    "llama_rmsnorm": ({"RMSNorm": 5}, {"RMSNorm": 5},
                      {"fold_affine_into_linear": 5, "lower_canonical_to_standard_ops": 5}),
    "snn_lif_mpbn": ({"BatchNorm": 8}, {}, {"fold_mpbn_into_threshold": 8}),  # 2 LIF layers x T = 4 steps
}

_RUNS: dict = {}


def _run(name: str):
    """``optimize --target ort-cpu --data <test split> --no-bench`` on one zoo checkpoint, cached."""
    if name not in _RUNS:
        e = ZOO[name]
        _RUNS[name] = optimize(os.path.join(MODELS, e["file"]),
                               Options.from_flat(target="ort-cpu", data=os.path.join(MODELS, e["test_set"]), bench=False))
    return _RUNS[name]


def _test_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(os.path.join(MODELS, ZOO[name]["test_set"]))
    key = next(k for k in d.files if k not in ("label", "labels"))
    return d[key], d["label"]


def test_every_zoo_model_has_an_expectation():
    assert set(EXPECTED) == set(ZOO)


@pytest.mark.parametrize("name", NAMES)
def test_exact_rewrites_only_within_tolerance(name):
    rep = _run(name).report
    assert rep["target"] == "ort-cpu"
    for p in rep["passes"]:
        if p["rewrites"]:
            assert p["exact"], f"{name}: pass {p['name']} rewrote {len(p['rewrites'])} node(s) and is not exact"
    acc = rep["accuracy"]
    assert acc["exact_only"] is True
    for label in ("random", "data"):
        assert acc[label]["max_rel_err"] <= TOL, f"{name}, {label} inputs: max rel err {acc[label]['max_rel_err']:.3g}"
    assert acc["data"]["samples"] == len(_test_split(name)[0])
    fidelity = rep["export_fidelity"]  # the reference itself: torch eager vs the exported ONNX
    assert fidelity is not None and fidelity["max_rel_err"] <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_normalizations_and_rewrites(name):
    result = _run(name)
    before, after, rewrites = EXPECTED[name]
    assert result.report["norm_nodes"] == {"before": before, "after": after}
    assert survey.count_by_kind(result.optimized) == after
    passes = {p["name"]: p for p in result.report["passes"]}
    for pname, n in rewrites.items():
        got = len(passes[pname]["rewrites"]) if pname in passes else 0
        assert got == n, f"{name}: {pname} made {got} rewrite(s), expected {n}"
        assert not passes[pname]["skipped"], passes[pname]["skipped"]


@pytest.mark.parametrize("name", DIGITS)
def test_digits_top1_agreement_and_accuracy(name):
    """On the 360 held-out digits: the optimized model predicts what the original predicts, every time."""
    result = _run(name)
    data = result.report["accuracy"]["data"]
    assert data["top1_agreement"] == 1.0 and data["samples"] == 360
    x, label = _test_split(name)
    (ref,) = ort_run(result.original, x)
    (opt,) = ort_run(result.optimized, x)
    assert np.array_equal(ref.argmax(1), opt.argmax(1))
    assert int((opt.argmax(1) == label).sum()) == ZOO[name]["test_correct"]  # the accuracy zoo.json records


def test_llama_decoder_per_token_agreement():
    """Copy task: every next-token prediction on the test split is unchanged, so is the recorded accuracy."""
    result = _run("llama_rmsnorm")
    ids, label = _test_split("llama_rmsnorm")
    (ref,) = ort_run(result.original, ids)
    (opt,) = ort_run(result.optimized, ids)
    assert ref.shape == ids.shape + (ref.shape[-1],)
    assert np.array_equal(ref.argmax(-1), opt.argmax(-1))
    scored = label != -100
    correct = int((opt.argmax(-1)[scored] == label[scored]).sum())
    assert correct == ZOO["llama_rmsnorm"]["test_correct"]
    assert float(np.abs(opt - ref).max() / np.abs(ref).max()) <= TOL


def _with_spikes_as_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model with every spike (output of a Greater/Less comparison) added to its graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [n.output[0] for n in m.graph.node if n.op_type in ("Greater", "Less", "GreaterOrEqual", "LessOrEqual")]
    for name in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
    return m, names


def test_spiking_cnn_spikes_identical():
    """MPBN folded into the threshold: every spike of every step and layer equal, outputs bit-identical."""
    result = _run("snn_lif_mpbn")
    acc = result.report["accuracy"]
    assert acc["random"]["max_abs_err"] == 0.0 and acc["data"]["max_abs_err"] == 0.0
    assert "BatchNormalization" not in [n.op_type for n in result.optimized.graph.node]
    orig, spikes = _with_spikes_as_outputs(result.original)
    opt, opt_spikes = _with_spikes_as_outputs(result.optimized)
    assert sorted(spikes) == sorted(opt_spikes) and len(spikes) == 8  # the spike tensors keep their names
    x, _ = _test_split("snn_lif_mpbn")
    rng = np.random.default_rng(0)
    for feed in (x, rng.standard_normal((64,) + x.shape[1:]).astype(np.float32) * 2):
        ref = dict(zip([o.name for o in orig.graph.output], ort_run(orig, feed)))
        got = dict(zip([o.name for o in opt.graph.output], ort_run(opt, feed)))
        for name in spikes:
            diff = int(np.sum(ref[name] != got[name]))
            assert diff == 0, f"spike {name} differs in {diff} places"
            assert 0 < ref[name].mean() < 1  # spikes do happen, and not everywhere
        out = orig.graph.output[0].name
        assert np.array_equal(ref[out], got[opt.graph.output[0].name])
