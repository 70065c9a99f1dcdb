#!/usr/bin/env python
"""Which ort-cpu defaults are measured best most often: ``--autotune`` on every suite model, winners tabulated.

The defaults normdeploy uses without ``--autotune`` (``--ort-graph-optimization all``, ``--ort-rms-op
simplified``, ``--ort-short-row 64``) should be the values :mod:`normdeploy.autotune` picks most
often. This runs its candidates (every axis of :data:`normdeploy.autotune.AXES` that applies) on the
models of ``benchmarks/run_suite.py`` (the zoo, and the third-party architectures with randomized
norms) and writes, per model, every candidate's speedup against the default with its 95 % interval,
and per axis value how often it was measurably faster and measurably slower than the default.
A default is worth changing only where another value wins on most models (of at least 3) and loses on none.

    .venv/bin/python benchmarks/autotune_defaults.py                       # all models, 6 s each
    .venv/bin/python benchmarks/autotune_defaults.py --only vit_ln,hf_bert --seconds 10 --out /tmp/r.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

from normdeploy import autotune, pipeline  # noqa: E402
from normdeploy.bench.timing import machine_info, provenance  # noqa: E402
from normdeploy.options import Options  # noqa: E402
from run_suite import hf_models, zoo_models  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "autotune_defaults.md")


def tune_one(entry: dict, seconds: float, threads: int):
    options = Options.from_flat(inputs=entry["inputs"], data=entry.get("data"), trust_pickle=entry["trust_pickle"],
                                threads=threads, autotune=True, autotune_seconds=seconds)
    prepared = pipeline.prepare(entry.get("module") or entry["path"], options)
    return autotune.tune(prepared, options, "ort-cpu")


def _fmt(c: dict) -> str:
    if not c["timed"]:
        return "same as " + c["same_as"] if c.get("same_as") else ("inexact" if c["exact"] is False else "-")
    ci = c["speedup_ci95"]
    return f"{c['speedup_vs_default']:.3f}x" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " (no CI)")


def render(rows: list[tuple[str, dict | str]], meta: dict) -> str:
    columns = [f"{a.name}={v}" for a in autotune.AXES for v in a.values
               if v != getattr(getattr(Options(), autotune.FLAT[a.field]), a.field)]
    lines = ["# Autotune winners per model (ort-cpu)", "",
             f"Measured on **{meta['provenance']}**; {meta['seconds']:g} s of interleaved timing per model "
             f"(all candidates together), batch as in the suite; {meta['date']}, {meta['minutes']:.1f} min in all. "
             f"Produced by `{meta['command']}`.", ""]
    if meta.get("loaded"):
        lines += [f"**The machine was loaded by other jobs while this ran** (load average {meta['load']}): the "
                  "figures show direction only; rerun on a quiet machine before changing a default.", ""]
    lines += ["Each cell: p50(default) / p50(candidate) with its 95 % interval; a candidate wins only where the "
              "interval lies above 1. *same as X*: that candidate gives the same model and session as X "
              "(an axis with nothing to choose on the model, e.g. no GroupScaling).", "",
              "| model | chosen | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    wins = {c: [0, 0, 0] for c in columns}  # measurably faster, measurably slower, timed
    for name, rep in rows:
        if isinstance(rep, str):
            lines.append(f"| {name} | error: {rep} |" + " |" * len(columns))
            continue
        by = {c["name"]: c for c in rep["candidates"]}
        cells = []
        for col in columns:
            c = by.get(col)
            cells.append(_fmt(c) if c else "n/a")
            if c and c["timed"] and c["speedup_ci95"]:
                wins[col][2] += 1
                wins[col][0] += c["speedup_ci95"][0] > 1.0
                wins[col][1] += c["speedup_ci95"][1] < 1.0
        chosen = rep["chosen"] + (f" ({rep['speedup_vs_default']:.3f}x)" if not rep["kept_default"] else "")
        lines.append(f"| {name} | {chosen} | " + " | ".join(cells) + " |")
    lines += ["", "## Per candidate: measurably faster / measurably slower than the default, of the models it was "
              "timed on", "", "| candidate | faster | slower | timed on | verdict |", "|---|---|---|---|---|"]
    for col, (fast, slow, n) in wins.items():
        verdict = ("wins clearly: worth making the default" if n >= 3 and fast > n / 2 and slow == 0
                   else f"no clear win{' (timed on fewer than 3 models)' if n < 3 else ''}: the default stays")
        lines.append(f"| {col} | {fast} | {slow} | {n} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model names (zoo names, hf_gpt2, hf_bert, ...)")
    ap.add_argument("--seconds", type=float, default=6.0, help="autotune timing budget per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    entries = [e for e in zoo_models() if not only or e["name"] in only] + hf_models(only)
    entries = [e for e in entries if e["name"] != "minilm_l6" or (only and "minilm_l6" in only)]  # nothing to rewrite
    t0, rows = time.time(), []
    for i, e in enumerate(entries, 1):
        print(f"[{i}/{len(entries)}] {e['name']}: ", end="", flush=True)
        if "error" in e:
            rows.append((e["name"], e["error"]))
            print(e["error"])
            continue
        try:
            rep = tune_one(e, args.seconds, args.threads).report
        except Exception as ex:  # noqa: BLE001 - one model's failure is a row
            msg = (str(ex).strip().splitlines() or [""])[0]
            rows.append((e["name"], f"{type(ex).__name__}: {msg}"[:200]))
            print("error:", rows[-1][1])
            continue
        rows.append((e["name"], rep))
        print(rep["chosen"], rep["why"], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {"provenance": provenance(machine_info(args.threads), args.threads), "seconds": args.seconds,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "minutes": (time.time() - t0) / 60, "load": f"{load:.1f} on {cores} cores", "loaded": load > 0.8 * cores,
            "command": "python benchmarks/autotune_defaults.py" + (" " + " ".join(argv or sys.argv[1:]) if
                                                                    (argv or sys.argv[1:]) else "")}
    with open(args.out, "w") as f:
        f.write(render(rows, meta))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
