"""Third-party architectures through the whole pipeline (issue 8, item 2).

transformers' GPT-2, ViT, Llama, BERT, ConvNeXt, ResNet and MobileNetV2 (small configs,
random weights, seeded, every normalization's parameters randomized so that no fold is
trivially the identity) and the trained all-MiniLM-L6-v2 are exported through normdeploy's
export stage to an ``.onnx`` file, which then goes through ``optimize --target ort-cpu``.
Per architecture: only exact rewrites, max relative error at most 1e-4 against the
original, and the normalizations end where the architecture says they must:

| architecture | normalizations              | what happens on ort-cpu                                  |
|--------------|-----------------------------|----------------------------------------------------------|
| GPT-2        | pre-LN LayerNorm x5         | exact Pre-LN -> Pre-RMSNorm, lowered to SimplifiedLN     |
| ViT          | pre-LN LayerNorm x5         | the same; every gain and bias folded into its consumers  |
| Llama        | RMSNorm x5, decomposed      | recognized (canonicalize), gains folded, lowered         |
| BERT, MiniLM | post-LN LayerNorm           | kept: post-LN (residual Add reads the LN output)         |
| ConvNeXt     | LN channels-first and -last | kept as LayerNormalization, affines folded where linear  |
| ResNet       | BatchNorm x6                | all folded into the convolutions                         |
| MobileNetV2  | BatchNorm x52               | all folded into the convolutions (depthwise included)    |

:data:`ARCHS` is also what ``benchmarks/readme_table.py`` measures.

Bugs this file found in normdeploy keep their minimal reproductions at its end, as
regression tests.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from normdeploy import zoo
from normdeploy.core import norms as survey
from normdeploy.core.passes import PassContext
from normdeploy.pipeline import Options, optimize, run_stage
from normdeploy.zoo import MINILM_SENTENCES, minilm_tokens, randomize_norms
from tests.conftest import export_hf, export_module, hf_input, ort_run

pytestmark = pytest.mark.slow  # exports whole models

logging.getLogger("onnxscript").setLevel(logging.ERROR)

TOL = 1e-4


# ----------------------------------------------------------------------------- the architectures

@dataclass(frozen=True)
class Arch:
    """One third-party architecture (:data:`normdeploy.zoo.THIRD_PARTY`: title, build, input) and what must
    happen to its norms."""

    spec: zoo.ThirdParty
    #: norm counts of the exported original after canonicalization (what is really there)
    norms: dict
    #: norm counts of the optimized model
    after: dict
    #: pass name -> number of rewrites it must make
    rewrites: dict = field(default_factory=dict)

    def __getattr__(self, name):  # title, build, input_name, shape, dtype, randomize, trained, input_text
        return getattr(self.spec, name)


def _arch(name: str, norms: dict, after: dict, rewrites: dict) -> Arch:
    return Arch(zoo.THIRD_PARTY[name], norms, after, rewrites)


ARCHS: dict[str, Arch] = {
    "gpt2": _arch("gpt2", {"LayerNorm": 5}, {"RMSNorm": 5}, {"preln_to_rmsnorm": 5, "lower_canonical_to_standard_ops": 5}),
    "vit": _arch("vit", {"LayerNorm": 5}, {"RMSNorm": 5},
                 {"preln_to_rmsnorm": 5, "fold_affine_into_linear": 5, "lower_canonical_to_standard_ops": 5}),
    "llama": _arch("llama", {"RMSNorm": 5}, {"RMSNorm": 5},
                   {"recognize_rmsnorm": 5, "fold_affine_into_linear": 5, "lower_canonical_to_standard_ops": 5}),
    "bert": _arch("bert", {"LayerNorm": 5}, {"LayerNorm": 5}, {"preln_to_rmsnorm": 0, "fold_affine_into_linear": 1}),
    "convnext": _arch("convnext", {"LayerNorm": 5}, {"LayerNorm": 5},
                      {"preln_to_rmsnorm": 0, "fold_affine_into_linear": 2}),
    "resnet": _arch("resnet", {"BatchNorm": 6}, {}, {"fold_affine_into_linear": 6}),
    "mobilenetv2": _arch("mobilenetv2", {"BatchNorm": 52}, {}, {"fold_affine_into_linear": 52}),
    "minilm": _arch("minilm", {"LayerNorm": 13}, {"LayerNorm": 13}, {"preln_to_rmsnorm": 0, "fold_affine_into_linear": 0}),
}


def build_model(name: str):
    """The torch model of ``ARCHS[name]`` (seeded; normalization parameters randomized unless trained)."""
    return zoo.third_party_model(name)


def export_arch(name: str, path: str, model=None) -> str:
    """Export ``ARCHS[name]`` through normdeploy's export stage (dynamic batch) to ``path``."""
    arch = ARCHS[name]
    onnx.save(export_hf(model if model is not None else build_model(name), arch.input_name, arch.shape, arch.dtype),
              path)
    return path


def canonical_counts(model: onnx.ModelProto) -> dict:
    """Norm counts after the canonicalize stage: decomposed normalizations counted as what they are."""
    canonical, _ = run_stage(model, "canonicalize", PassContext(target="ort-cpu"))
    return survey.count_by_kind(canonical)


# ----------------------------------------------------------------------------- one pipeline run per architecture

@dataclass
class Run:
    name: str
    path: str
    result: object
    torch_out: np.ndarray  # HF eager output on ``x``
    x: np.ndarray
    data: str | None = None

    @property
    def report(self) -> dict:
        return self.result.report

    def passes(self) -> dict:
        return {p["name"]: p for p in self.report["passes"]}


_RUNS: dict[str, Run] = {}


@pytest.fixture(scope="session")
def tp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("third_party")


@pytest.fixture
def run(request, tp_dir) -> Run:
    """``optimize --target ort-cpu`` (no latency run) on the exported ``.onnx`` of one architecture, cached."""
    import torch

    name = request.param
    if name not in _RUNS:
        arch = ARCHS[name]
        model = build_model(name)
        path = export_arch(name, str(tp_dir / f"{name}.onnx"), model)
        data = None
        if name == "minilm":
            data = str(tp_dir / "minilm_sentences.npz")
            np.savez(data, input_ids=minilm_tokens(arch.shape[1]))
        result = optimize(path, Options.from_flat(target="ort-cpu", inputs=(arch.input_text,), data=data, bench=False))
        x = hf_input(arch.input_name, (2,) + tuple(arch.shape[1:]), arch.dtype, seed=1)
        with torch.no_grad():
            out = model(**{arch.input_name: torch.from_numpy(x)})
        torch_out = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).numpy()
        _RUNS[name] = Run(name, path, result, torch_out, x, data)
    return _RUNS[name]


def _params(names):
    return pytest.mark.parametrize("run", names, indirect=True, ids=names)


ALL = list(ARCHS)


# ----------------------------------------------------------------------------- every architecture

@_params(ALL)
def test_exact_rewrites_only_and_within_tolerance(run):
    rep = run.report
    assert rep["target"] == "ort-cpu"
    for p in rep["passes"]:
        if p["rewrites"]:
            assert p["exact"], f"{run.name}: pass {p['name']} rewrote {len(p['rewrites'])} node(s) and is not exact"
    assert rep["accuracy"]["exact_only"] is True
    acc = rep["accuracy"]
    assert acc["max_rel_err"] <= TOL, f"{run.name}: max rel err {acc['max_rel_err']:.3g} > {TOL:g}"
    assert acc["random"]["max_rel_err"] <= TOL and acc["cosine_min"] > 1 - 1e-6
    assert acc["random"]["samples"] >= 4


@_params(ALL)
def test_report_matches_a_recomputation(run):
    """The optimized model, run here on other inputs, agrees with the original as the report says."""
    (ref,) = ort_run(run.result.original, run.x)
    (opt,) = ort_run(run.result.optimized, run.x)
    rel = float(np.abs(opt.astype(np.float64) - ref).max() / np.abs(ref).max())
    assert rel <= TOL, f"{run.name}: max rel err {rel:.3g}"


@_params(ALL)
def test_export_is_faithful_to_transformers(run):
    """The original ONNX (the reference of every comparison) computes what the HF model computes."""
    (ref,) = ort_run(run.result.original, run.x)
    rel = float(np.abs(ref.astype(np.float64) - run.torch_out).max() / np.abs(run.torch_out).max())
    assert rel <= 1e-4, f"{run.name}: exported ONNX differs from eager transformers by {rel:.3g}"


@_params(ALL)
def test_normalizations_found_and_where_they_end(run):
    arch = ARCHS[run.name]
    assert canonical_counts(run.result.original) == arch.norms
    assert run.report["norm_nodes"]["after"] == arch.after
    assert survey.count_by_kind(run.result.optimized) == arch.after


@_params(ALL)
def test_rewrite_counts(run):
    passes = run.passes()
    for name, n in ARCHS[run.name].rewrites.items():
        got = len(passes[name]["rewrites"]) if name in passes else 0
        assert got == n, f"{run.name}: {name} made {got} rewrite(s), expected {n}: {passes.get(name)}"


@_params([n for n in ALL if n != "llama"])
def test_report_counts_the_exported_normalizations(run):
    """norm_nodes.before = what is in the model (for the architectures that export canonical nodes)."""
    assert run.report["norm_nodes"]["before"] == ARCHS[run.name].norms


# ----------------------------------------------------------------------------- per architecture

def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


@_params(["gpt2", "vit"])
def test_pre_ln_transformers_become_pre_rmsnorm(run):
    """Every LayerNorm of the residual stream became RMSNorm (exact re-centring), none is left."""
    opt = run.result.optimized
    assert "LayerNormalization" not in _ops(opt)
    rms = [n for n in opt.graph.node if n.op_type in ("SimplifiedLayerNormalization", "RMSNormalization")]
    assert len(rms) == 5
    p = run.passes()["preln_to_rmsnorm"]
    assert not p["skipped"], p["skipped"]
    assert any("residual stream of width 64" in n for n in p["notes"])


@_params(["vit"])
def test_vit_every_gain_and_bias_folded(run):
    """ViT's pre-LN readers are all linear: after the fold every RMSNorm has unit gain and no bias is left."""
    opt = run.result.optimized
    for n in opt.graph.node:
        if n.op_type in ("SimplifiedLayerNormalization", "RMSNormalization"):
            np.testing.assert_array_equal(_init(opt, n.input[1]), 1.0, err_msg=n.name)
    assert not run.passes()["fold_affine_into_linear"]["skipped"]


@_params(["gpt2"])
def test_gpt2_token_embedding_recentred(run):
    """The token table written into the stream is re-centred over d (a new constant, the original untouched)."""
    orig, opt = run.result.original, run.result.optimized
    (g0,) = [n for n in orig.graph.node if n.op_type == "Gather" and n.name.endswith("wte/node_embedding")]
    (g1,) = [n for n in opt.graph.node if n.op_type == "Gather" and n.name.endswith("wte/node_embedding")]
    w, table = _init(orig, g0.input[0]).astype(np.float64), _init(opt, g1.input[0])
    assert g1.input[0] != g0.input[0]
    np.testing.assert_allclose(table, w - w.mean(axis=-1, keepdims=True), atol=1e-6)
    assert np.abs(table.astype(np.float64).mean(-1)).max() < 1e-6


@_params(["llama"])
def test_llama_rmsnorms_recognized_and_lowered(run):
    """HF's LlamaRMSNorm exports decomposed (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul): recognized, gains folded."""
    orig, opt = run.result.original, run.result.optimized
    assert survey.count_by_kind(orig) == {}  # decomposed in the export
    assert {"Pow", "ReduceMean", "Sqrt"} <= set(_ops(orig))
    rec = run.passes()["recognize_rmsnorm"]
    assert len(rec["rewrites"]) == 5 and not rec["skipped"]
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal"} & set(_ops(opt))
    rms = [n for n in opt.graph.node if n.op_type in ("SimplifiedLayerNormalization", "RMSNormalization")]
    assert len(rms) == 5
    for n in rms:  # every reader of an RMSNorm is linear (q/k/v, gate/up, lm_head): the gains folded
        np.testing.assert_array_equal(_init(opt, n.input[1]), 1.0, err_msg=n.name)
        assert abs(dict((a.name, a.f) for a in n.attribute)["epsilon"] - 1e-6) < 1e-12


@_params(["bert", "minilm"])
def test_post_ln_encoders_keep_their_layernorms_and_say_why(run):
    n_layers = {"bert": 2, "minilm": 6}[run.name]
    pre = run.passes()["preln_to_rmsnorm"]
    reasons = {s["node"]: s["reason"] for s in pre["skipped"]}
    assert len(reasons) == 1 + 2 * n_layers
    post = [k for k, r in reasons.items() if r.startswith("post-LN block")]
    assert len(post) == 2 * n_layers, reasons
    emb = [k for k in reasons if k.endswith("embeddings.LayerNorm")]
    assert len(emb) == 1 and "not on a pre-LN residual stream" in reasons[emb[0]]
    fold = run.passes()["fold_affine_into_linear"]
    residual = [s for s in fold["skipped"] if "also reads the normalized tensor (a residual stream)" in s["reason"]]
    assert len(residual) == 2 * n_layers  # every LN but the last feeds a residual Add
    lns = [n for n in run.result.optimized.graph.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 1 + 2 * n_layers


@_params(["bert"])
def test_bert_last_layernorm_folds_into_the_pooler(run):
    """The last LN feeds only the pooler (through the CLS-token selection): its affine folds."""
    fold = run.passes()["fold_affine_into_linear"]
    (w,) = fold["rewrites"]
    assert w["node"].endswith("encoder.layer.1.output.LayerNorm")
    last = next(n for n in run.result.optimized.graph.node if n.name.endswith("encoder.layer.1.output.LayerNorm"))
    np.testing.assert_array_equal(_init(run.result.optimized, last.input[1]), 1.0)


@_params(["minilm"])
def test_minilm_on_real_sentences(run):
    """The trained MiniLM on tokenized sentences (the shipped tokenizer): the data check ran and is exact."""
    data = run.report["accuracy"]["data"]
    assert data["samples"] == len(MINILM_SENTENCES)
    assert data["max_rel_err"] <= TOL
    ids = np.load(run.data)["input_ids"]
    assert ids.max() > 1000  # real vocabulary ids, not the random [0, 16) of the random check
    (ref,) = ort_run(run.result.original, ids)
    (opt,) = ort_run(run.result.optimized, ids)
    assert float(np.abs(opt - ref).max() / np.abs(ref).max()) <= TOL


@_params(["convnext"])
def test_convnext_layernorms(run):
    """transformers 5 writes ConvNeXt's channels-first LN as permute + layer_norm + permute: exported as
    Transpose -> LayerNormalization(axis=-1) -> Transpose, so no recognizer is needed. The LN affines fold
    into what reads them linearly and adds its bias in its kernel (the stride-2 downsampling Conv through
    the Transpose, the classifier Gemm); the stem LN also feeds the first block's residual Add, so its
    affine stays; the blocks' LNs keep their bias, pwconv1 (a MatMul whose bias is zero, as transformers
    initialises it) having no bias Add to take it."""
    orig, opt = run.result.original, run.result.optimized
    lns = {n.name: n for n in orig.graph.node if n.op_type == "LayerNormalization"}
    assert len(lns) == 5 and all(dict((a.name, a.i) for a in n.attribute if a.name == "axis").get("axis", -1) == -1
                                 for n in lns.values())
    channels_first = [k for k in lns if k.endswith("embeddings.layernorm") or k.endswith("downsampling_layer.0")]
    assert len(channels_first) == 2
    fold = run.passes()["fold_affine_into_linear"]
    skips = {s["node"]: s["reason"] for s in fold["skipped"]}
    (stem,) = [k for k in skips if k.endswith("embeddings.layernorm")]
    assert "residual" in skips[stem]
    blocks = [k for k in skips if k != stem]
    assert len(blocks) == 2 and all(k.endswith("layers.0.layernorm") and "pwconv1" in skips[k]
                                    and "no bias Add to take it" in skips[k] for k in blocks), skips
    folded = {w["node"] for w in fold["rewrites"]}
    assert any(k.endswith("downsampling_layer.0") for k in folded) and any(k.endswith("convnext.layernorm")
                                                                          for k in folded), folded
    for n in opt.graph.node:
        if n.op_type == "LayerNormalization" and n.name in folded:
            np.testing.assert_array_equal(_init(opt, n.input[1]), 1.0, err_msg=n.name)
            assert len(n.input) < 3 or not n.input[2] or not np.any(_init(opt, n.input[2])), n.name


def _layernorm_transformers4(self, x):
    """ConvNextLayerNorm.forward as transformers 4.x wrote it: channels-first statistics spelled out over axis 1."""
    import torch
    import torch.nn.functional as F

    if self.data_format == "channels_last":
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    input_dtype = x.dtype
    x = x.float()
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + self.eps)
    x = x.to(dtype=input_dtype)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


def test_convnext_decomposed_channels_first_layernorm_recognized(tp_dir, monkeypatch):
    """ConvNeXt as transformers 4.x (and timm) spell the channels-first LN: mean and variance over axis 1.

    The recognizer turns each into Transpose -> LayerNormalization(axis=-1) -> Transpose; then the
    pipeline treats the model as the transformers-5 spelling: exact, same norm counts at the end.
    """
    from transformers.models.convnext import modeling_convnext

    monkeypatch.setattr(modeling_convnext.ConvNextLayerNorm, "forward", _layernorm_transformers4)
    path = export_arch("convnext", str(tp_dir / "convnext_v4ln.onnx"))
    result = optimize(path, Options.from_flat(inputs=(ARCHS["convnext"].input_text,), bench=False))
    rep = result.report
    passes = {p["name"]: p for p in rep["passes"]}
    rec = passes["recognize_layernorm"]
    assert len(rec["rewrites"]) == 2 and not rec["skipped"], rec
    modules = [w["node"].split("/", 1)[0] for w in rec["rewrites"]]  # named <module>/<matched node>
    assert sorted(m.split(".")[-1] for m in modules) == ["0", "layernorm"], modules
    assert all(m.endswith(("convnext.embeddings.layernorm", "stages.1.downsampling_layer.0")) for m in modules), modules
    assert canonical_counts(result.original) == {"LayerNorm": 5}
    assert rep["norm_nodes"]["after"] == {"LayerNorm": 5}
    assert rep["accuracy"]["exact_only"] and rep["accuracy"]["max_rel_err"] <= TOL
    assert len(passes["fold_affine_into_linear"]["rewrites"]) == 2  # the blocks keep theirs (test_convnext_layernorms)
    ops = _ops(result.optimized)
    assert not {"Pow", "Sqrt", "Div"} & set(ops) and ops.count("ReduceMean") == 1  # left: the global average pool


@_params(["resnet", "mobilenetv2"])
def test_cnn_batchnorms_all_folded(run):
    opt = run.result.optimized
    assert "BatchNormalization" not in _ops(opt)
    fold = run.passes()["fold_affine_into_linear"]
    assert not fold["skipped"]
    n_conv = sum(op == "Conv" for op in _ops(run.result.original))
    assert sum(op == "Conv" for op in _ops(opt)) == n_conv  # folded into the convs, none added
    if run.name == "mobilenetv2":  # depthwise convolutions took their BatchNorm too
        dw = [n for n in opt.graph.node
              if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        assert len(dw) == 17


# ----------------------------------------------------------------------------- the CLI, once

@_params(["gpt2"])
def test_cli_optimize_on_an_exported_third_party_model(cli, tp_dir, run):
    """``normdeploy optimize gpt2.onnx --input ... --json`` with a short latency run: exit 0, a full report."""
    out = tp_dir / "gpt2_cli.out"
    r = cli("optimize", run.path, "--input", ARCHS["gpt2"].input_text, "--target", "ort-cpu", "--out", out, "--json",
            "--bench-seconds", "0.3", "--threads", "1")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep == json.loads((out / "report.json").read_text()) | {"out": rep["out"]}
    assert rep["accuracy"]["exact_only"] and rep["accuracy"]["max_rel_err"] <= TOL
    assert rep["norm_nodes"] == {"before": {"LayerNorm": 5}, "after": {"RMSNorm": 5}}
    lat = rep["latency"]
    assert lat["batch"] == 1 and lat["threads"] == 1 and lat["speedup"] > 0
    assert lat["original"]["runs"] == lat["optimized"]["runs"] >= 10
    for f in ("model.onnx", "original.onnx", "report.md"):
        assert (out / f).is_file()
    assert rep["passes"] == run.report["passes"]  # the CLI ran the same pipeline


# ----------------------------------------------------------------------------- regressions: bugs found here, fixed

class _Conv1DAfterLN:
    """GPT-2's Conv1D reading a LayerNorm: ``addmm(b, h.view(-1, d), W).view(..., n)``."""

    def __new__(cls, d: int = 8, n: int = 12):
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ln = torch.nn.LayerNorm(d)
                self.w = torch.nn.Parameter(torch.randn(d, n))
                self.b = torch.nn.Parameter(torch.randn(n))

            def forward(self, x):
                h = self.ln(x)
                y = torch.addmm(self.b, h.view(-1, h.size(-1)), self.w)
                return y.view(x.size()[:-1] + (self.w.shape[1],))

        torch.manual_seed(0)
        return randomize_norms(M()).eval()


def test_fold_affine_through_reshape_merging_symbolic_leading_axes(tmp_path):
    path = str(tmp_path / "conv1d_after_ln.onnx")
    onnx.save(export_module(_Conv1DAfterLN(), (2, 5, 8)), path)
    result = optimize(path, Options.from_flat(inputs=("input:2x5x8",), bench=False))
    fold = {p["name"]: p for p in result.report["passes"]}["fold_affine_into_linear"]
    assert result.report["accuracy"]["max_rel_err"] <= TOL
    assert not fold["skipped"], fold["skipped"]
    assert [w["node"] for w in fold["rewrites"]] == ["ln"]


@_params(["gpt2"])
def test_gpt2_every_gain_and_bias_folded(run):
    opt = run.result.optimized
    assert not run.passes()["fold_affine_into_linear"]["skipped"]
    for n in opt.graph.node:
        if n.op_type in ("SimplifiedLayerNormalization", "RMSNormalization"):
            np.testing.assert_array_equal(_init(opt, n.input[1]), 1.0, err_msg=n.name)


class _DecomposedRMSNormLinear:
    """``Linear(w * x / sqrt(mean(x^2) + eps))`` written out, as transformers' LlamaRMSNorm does."""

    def __new__(cls, d: int = 8):
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)
                self.proj = torch.nn.Linear(d, d)

            def forward(self, x):
                h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
                return self.proj(self.weight * h)

        torch.manual_seed(0)
        return M().eval()


def test_before_counts_and_floor_see_decomposed_normalizations(tmp_path):
    module = _DecomposedRMSNormLinear()
    path = str(tmp_path / "rms_linear.onnx")
    onnx.save(export_module(module, (2, 8)), path)
    result = optimize(path, Options.from_flat(inputs=("input:2x8",), bench=False))
    assert canonical_counts(result.original) == {"RMSNorm": 1}
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    (floor,) = ort_run(result.floor, x)
    w, b = module.proj.weight.detach().numpy(), module.proj.bias.detach().numpy()
    np.testing.assert_allclose(floor, x @ w.T + b, rtol=1e-5, atol=1e-5)  # the norm replaced by identity
    assert result.report["norm_nodes"]["before"] == {"RMSNorm": 1}


@_params(["llama"])
def test_llama_report_counts_its_rmsnorms(run):
    assert run.report["norm_nodes"]["before"] == {"RMSNorm": 5}
