#!/usr/bin/env python
"""The README table: every zoo model and every third-party architecture through ``optimize --target ort-cpu``.

    .venv/bin/python benchmarks/readme_table.py                    # writes benchmarks/results/readme_table.md
    .venv/bin/python benchmarks/readme_table.py --update-readme    # ... and splices it into README.md
    .venv/bin/python benchmarks/readme_table.py --only vit_ln,gpt2 --seconds 1 --out /tmp/t.md
    .venv/bin/python benchmarks/readme_table.py --only respelled --out /tmp/t.md   # the respelled rows only

Models: each entry of ``models/zoo.json`` (its test split as ``--data``); the zoo's trained
ViTs with their norms written as the papers' and libraries' code writes them
(:mod:`tests.corpus.respell`: DyT, UN, PowerNorm, ScaleNorm, timm RmsNorm, a ``torch.var``
LayerNorm; given as ``nn.Module`` s, their own test split as ``--data``); and the
transformers architectures of :data:`normdeploy.zoo.THIRD_PARTY` (GPT-2, ViT, Llama, BERT,
ConvNeXt, ResNet, MobileNetV2 with small configs, random weights and randomized
normalization parameters; the trained all-MiniLM-L6-v2 with real tokenized sentences as
``--data``), each given to normdeploy as an ``nn.Module``.

Each model runs :func:`normdeploy.optimize` (what ``normdeploy optimize MODEL
--target ort-cpu --batch 1 --seconds S --threads T`` runs): exact rewrites only,
accuracy against the original, then original, optimized and floor timed interleaved at
batch 1. Columns:

* normalizations: counts by kind in the original after canonicalization (decomposed
  normalizations counted as what they are), then in the optimized model;
* rewrites applied: passes with the number of rewrites each made;
* max rel error: worst over random inputs and the model's real inputs, max |opt - ref| /
  max |ref|; with the top-1 agreement on real inputs where the output is a classifier;
* speedup: p50(original) / p50(optimized), with the 95 % bootstrap interval over sessions and rounds;
* norm cost left: (p50(optimized) - p50(floor)) / (p50(original) - p50(floor)), the floor
  being the original with every normalization replaced by Identity; n/a when the floor is
  not measurably faster than the original (the 95 % interval of p50(original) / p50(floor)
  reaches 1.02: structurally identical graphs differ by about 1 % in latency).

``--update-readme`` replaces what lies between ``<!-- readme-table:start -->`` and
``<!-- readme-table:end -->`` in README.md (and fails, changing nothing, without them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
logging.getLogger("onnxscript").setLevel(logging.ERROR)

import numpy as np  # noqa: E402

import normdeploy  # noqa: E402
from normdeploy import zoo  # noqa: E402
from normdeploy.bench.timing import cpu_name  # noqa: E402

MODELS_DIR = os.path.join(ROOT, "models")
README = os.path.join(ROOT, "README.md")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "readme_table.md")
START, END = "<!-- readme-table:start -->", "<!-- readme-table:end -->"
#: the floor counts as faster than the original when the 95 % interval of p50(original) / p50(floor)
#: lies above 1 + FLOOR_MARGIN: graphs that ONNX Runtime optimizes to the same kernels differ by
#: about 1 % here (node order, memory layout), which would make the share of a tiny span meaningless
FLOOR_MARGIN = 0.02


# ----------------------------------------------------------------------------- the models

def zoo_entries() -> list[dict]:
    with open(os.path.join(MODELS_DIR, "zoo.json")) as f:
        zoo = json.load(f)
    out = []
    for name, e in zoo.items():
        out.append({"name": name, "group": "zoo", "what": f"{e['architecture']}, trained ({e['task']})",
                    "path": os.path.join(MODELS_DIR, e["file"]), "inputs": (),
                    "data": os.path.join(MODELS_DIR, e["test_set"]), "data_label": e["test_set"]})
    return out


def third_party_entries(only: set | None) -> list[dict]:
    """Each architecture of :data:`normdeploy.zoo.THIRD_PARTY`, given to normdeploy as an ``nn.Module``."""
    out = []
    for name, spec in zoo.THIRD_PARTY.items():
        if only and name not in only:
            continue
        entry = {"name": name, "group": "third-party", "what": spec.title, "path": None,
                 "inputs": (spec.input_text,), "data": None, "data_label": None}
        try:
            entry["module"] = zoo.third_party(name)
            if name == "minilm":
                entry["data"] = os.path.join(tempfile.mkdtemp(prefix="normdeploy-readme-table-"), "minilm.npz")
                np.savez(entry["data"], input_ids=zoo.minilm_tokens(spec.shape[1]))
                entry["data_label"] = "8 tokenized sentences"
        except Exception as e:  # noqa: BLE001 - a model that cannot be built is a row, not a crash
            entry["error"] = f"could not build: {type(e).__name__}: {_first_line(e)}"
        out.append(entry)
    return out


def respelled_entries(only: set | None) -> list[dict]:
    """The trained ViTs of the zoo with their norms written as the papers' and libraries' code writes them."""
    from normdeploy.load import load
    from tests.corpus.respell import RESPELLED, respell

    with open(os.path.join(MODELS_DIR, "zoo.json")) as f:
        entries = json.load(f)
    out = []
    for base, (short, source) in RESPELLED.items():
        name = f"{base} ({short})"
        if only and name not in only and "respelled" not in only:  # --only respelled: all of them
            continue
        e = entries[base]
        entry = {"name": name, "group": "respelled", "path": None, "inputs": (),
                 "what": f"the trained {base} with its norms written as {source}",
                 "data": os.path.join(MODELS_DIR, e["test_set"]), "data_label": e["test_set"]}
        try:
            original = load(os.path.join(MODELS_DIR, e["file"])).obj
            module = respell(original)
            module.example_inputs = dict(original.example_inputs)
            entry["module"] = module
        except Exception as ex:  # noqa: BLE001 - a model that cannot be built is a row, not a crash
            entry["error"] = f"could not build: {type(ex).__name__}: {_first_line(ex)}"
        out.append(entry)
    return out


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else ""


# ----------------------------------------------------------------------------- one row

def measure(entry: dict, seconds: float, threads: int) -> dict:
    result = normdeploy.optimize(entry.get("module") or entry["path"], target="ort-cpu", inputs=entry["inputs"],
                                 data=entry["data"], batch="1", seconds=seconds, threads=threads)
    rep = result.report
    if result.bench is None:  # nothing to rewrite: the optimized model is the original, not timed
        return {"report": rep, "norms": rep["norm_nodes"]["before"], "floor_faster": False}
    floor_lo, _ = result.bench.ratio_interval("original", "floor")  # p50(original) / p50(floor), 95 % interval
    return {"report": rep, "norms": rep["norm_nodes"]["before"], "floor_faster": floor_lo > 1.0 + FLOOR_MARGIN}


def _counts(d: dict) -> str:
    return ", ".join(f"{k} ×{n}" for k, n in d.items()) or "none"


def _rewrites(rep: dict) -> str:
    parts = [f"{p['name']} ×{len(p['rewrites'])}" for p in rep["passes"] if p["rewrites"]]
    return ", ".join(parts) or "none"


def _error(rep: dict) -> str:
    acc = rep["accuracy"]
    cell = f"{acc['max_rel_err']:.1e}"
    top1 = (acc.get("data") or {}).get("top1_agreement")
    if top1 is not None:
        cell += f" (top-1 {top1:.0%})"
    return cell


_NODE = re.compile(r"\S*[/.:]\S*[/.]\S*|\S+\.\S+")


def kept_reasons(rep: dict) -> list[str]:
    """Why normalizations were kept or only partly rewritten: distinct skip reasons, node names elided."""
    seen: dict[str, int] = {}
    for p in rep["passes"]:
        for s in p["skipped"]:
            reason = _NODE.sub("…", s["reason"]).replace("… …", "…")
            key = f"{p['name']}: {reason}"
            seen[key] = seen.get(key, 0) + 1
    return [f"{k} (×{n})" for k, n in seen.items()]


def row(entry: dict, m: dict | None) -> list[str]:
    if m is None:
        return [entry["name"], f"error: {entry['error'][:160]}", "", "", "", ""]
    rep, lat = m["report"], m["report"]["latency"]
    before = m["norms"]
    if lat is None:
        return [entry["name"], f"{_counts(before)} → {_counts(rep['norm_nodes']['after'])}", _rewrites(rep),
                _error(rep), "nothing to rewrite (identical, not timed)", "n/a"]
    lo, hi = lat["speedup_ci95"]
    left = lat.get("norm_cost_left")
    left_cell = "n/a¹" if left is None or not m["floor_faster"] else f"{left:.0%}"
    return [entry["name"], f"{_counts(before)} → {_counts(rep['norm_nodes']['after'])}", _rewrites(rep), _error(rep),
            f"{lat['speedup']:.2f}× [{lo:.2f}, {hi:.2f}]", left_cell]


COLUMNS = ["model", "normalizations (before → after)", "rewrites applied", "max rel error",
           "speedup at batch 1 [95 % CI]", "norm cost left"]


def render(rows: list[tuple[dict, dict | None]], meta: dict) -> str:
    """The table with its provenance line and notes (what goes between the README markers)."""
    machine = next((m["report"]["latency"]["machine"] for _, m in rows if m is not None and m["report"]["latency"]),
                   {})
    lines = [
        f"Measured on **{machine.get('cpu') or cpu_name()}** ({machine.get('machine', '?')}, "
        f"{machine.get('cores', '?')} cores available), **{meta['threads']} intra-op thread"
        f"{'s' if meta['threads'] != 1 else ''}**, **onnxruntime {machine.get('onnxruntime', '?')}**; batch 1, "
        f"{meta['seconds']:g} s of interleaved original/optimized/floor rounds per model; {meta['started']}, "
        f"{meta['duration_s'] / 60:.1f} min in all. Produced by `{meta['command']}`.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for entry, m in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row(entry, m)) + " |")
    lines += [
        "",
        "Every rewrite applied is exact; max rel error = max |optimized - original| / max |original| over seeded "
        "random inputs and the model's real inputs (digits test split, copy-task test split, tokenized sentences), "
        "top-1 agreement on those real inputs. Speedup = p50(original) / p50(optimized), both on ONNX Runtime at "
        "ORT_ENABLE_ALL. Norm cost left = (p50(optimized) - p50(floor)) / (p50(original) - p50(floor)), floor = the "
        "original with every normalization replaced by Identity.",
        "",
        f"¹ the floor was not measurably faster than the original (the 95 % interval of p50(original) / p50(floor) "
        f"reaches {1 + FLOOR_MARGIN:.2f}): ONNX Runtime already fuses what normalization there is (Conv + "
        "BatchNorm), or normdeploy rewrote nothing, and the share of a span that small is noise.",
        "",
        "Models: " + "; ".join(f"**{e['name']}**: {e['what']}" + (f", real inputs {e['data_label']}"
                                                               if e.get("data_label") else "")
                               for e, _ in rows) + ".",
    ]
    kept = [(e["name"], kept_reasons(m["report"])) for e, m in rows if m is not None]
    kept = [(n, r) for n, r in kept if r]
    if kept:
        lines += ["", "Normalizations a pass left alone, and why:", ""]
        for name, reasons in kept:
            lines.append(f"- {name}: " + "; ".join(reasons))
    return "\n".join(lines).rstrip() + "\n"


def splice(readme: str, body: str, start: str = START, end: str = END) -> str:
    """``readme`` with what lies between the markers ``start`` and ``end`` replaced by ``body``."""
    if readme.count(start) != 1 or readme.count(end) != 1 or readme.index(start) > readme.index(end):
        raise SystemExit(f"error: README.md must hold the markers {start} and {end}, once each and in that order; "
                         "add them where the table goes")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"


def update_readme(body: str, start: str = START, end: str = END, path: str = README) -> str:
    """The one writer of README.md's generated tables: ``body`` spliced between ``start`` and ``end``
    (this script's table, and ``benchmarks/peers_models.py --readme``'s). Returns the path."""
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(splice(text, body, start, end))
    return path


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="interleaved latency budget per model (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every session (default 1)")
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="markdown file to write (default benchmarks/results/readme_table.md)")
    ap.add_argument("--update-readme", action="store_true", help="also splice the table into README.md between markers")
    args = ap.parse_args(argv)
    if args.update_readme:
        with open(README) as f:
            splice(f.read(), "")  # fail before any work when the markers are missing
    only = set(args.only.split(",")) if args.only else None

    t_start = time.time()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entries = ([e for e in zoo_entries() if not only or e["name"] in only] + respelled_entries(only)
               + third_party_entries(only))
    rows = []
    for i, e in enumerate(entries, 1):
        t0 = time.time()
        print(f"[{i}/{len(entries)}] {e['name']}: ", end="", flush=True)
        m = None
        if "error" not in e:
            try:
                m = measure(e, args.seconds, args.threads)
            except Exception as ex:  # noqa: BLE001 - one model's failure is a row of the table
                e["error"] = f"{type(ex).__name__}: {_first_line(ex)}"
        if m is None:
            print(e["error"], flush=True)
        else:
            lat = m["report"]["latency"]
            speed = f"{lat['speedup']:.2f}x" if lat else "nothing to rewrite, not timed"
            print(f"{speed}, max rel err {m['report']['accuracy']['max_rel_err']:.1e}, "
                  f"{time.time() - t0:.0f} s", flush=True)
        rows.append((e, m))

    argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"started": started, "duration_s": time.time() - t_start, "threads": args.threads, "seconds": args.seconds,
            "command": f".venv/bin/python benchmarks/readme_table.py {argv_text}".strip()}
    body = render(rows, meta)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("# normdeploy on ort-cpu at batch 1\n\n" + body)
    print(f"wrote {args.out} in {meta['duration_s'] / 60:.1f} min")
    if args.update_readme:
        print(f"updated {update_readme(body)}")
    return 0 if all(m is not None for _, m in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
