#!/usr/bin/env python
"""How far apart sessions of one byte-identical model run, and what several sessions per variant buy.

Three measurements on each model (an ``.onnx`` file, or anything ``normdeploy optimize`` takes,
whose exported original is written to a file first):

1. **spread**: ``--k`` ONNX Runtime sessions of the same file, created one after the other and
   timed interleaved in one process (:func:`normdeploy.bench.timing.interleaved` with one
   session per name): each session's p50, and the spread ``max / min - 1`` of those p50s.
   Interleaving cancels drift over time, so what is left is a bias each session carries for its
   whole life.
2. **processes** (``--processes P``): measurement 1 again in each of ``P`` fresh processes, one
   after the other; the within-process spread against the spread of the per-process medians
   (those are not interleaved with each other, so drift adds to the latter). Whether a fresh
   process per session would expose more bias than fresh sessions in one process does.
3. **A/A**: the same file as two variants A and B, the ratio p50(A) / p50(B) and its 95 % interval
   from one session each (``--sessions 1``, what normdeploy did before) and from ``--sessions S``,
   ``--reps`` times each: how often the interval excludes 1.0, the true ratio (a false "faster").
4. **handover** (``--handover``, or ``--handover-only`` for this one alone): the order the peers
   benchmark times its variants in, reduced to its bias: ONNX Runtime sessions ``original``,
   ``mid`` and ``copy`` of the same file and OpenVINO (f32) on it, rotated round by round, so
   that ``original`` mostly follows OpenVINO and ``copy`` follows ONNX Runtime. The ratio
   p50(original) / p50(copy) (true ratio 1.0) with no handover and with ``handover="auto"``
   (:mod:`normdeploy.bench.timing`, "Handover"), ``--reps`` times each, with the spill measured.

    .venv/bin/python benchmarks/session_bias.py gpt2-small models/resnet_bn.pt --threads 2
    .venv/bin/python benchmarks/session_bias.py model.onnx --input input_ids:1x64:int64 --k 4 --processes 3
    .venv/bin/python benchmarks/session_bias.py minilm-l6 resnet-50 gpt2-small --batch 8 --threads 2 --handover-only

``gpt2-small`` is built as ``benchmarks/scale.py`` builds it (seeded random weights, exported once
into ``--work``); any other model of ``benchmarks/peers_models.py`` (``minilm-l6``, ``resnet-50``,
...) as that benchmark builds it. ``--batch`` sets the first axis of the inputs. Writes
``benchmarks/results/session_bias.md`` and ``.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def prepare(model: str, inputs: list[str], work: str) -> tuple[str, list[str]]:
    """An ``.onnx`` path for ``model`` and its input specs (``NAME:SHAPE[:DTYPE]``)."""
    if model == "gpt2-small":
        import scale

        path = os.path.join(work, "gpt2-small.onnx")
        if not os.path.exists(path):
            path, _ = scale.build_onnx("gpt2-small", work)
        return path, inputs or ["input_ids:1x64:int64"]
    if model.endswith(".onnx"):
        if not inputs:
            raise SystemExit(f"error: {model} needs --input NAME:SHAPE[:DTYPE]; give the input's shape")
        return model, inputs
    import onnx

    import normdeploy

    source, name = model, os.path.splitext(os.path.basename(model))[0]
    if not os.path.exists(model):
        import peers_models

        from normdeploy import zoo

        models = peers_models._models()
        if model not in models:
            raise SystemExit(f"error: {model} is neither a file nor a model of benchmarks/peers_models.py "
                             f"({', '.join(models)}); give a path or one of those names")
        source, inputs = zoo.third_party(models[model]), [models[model].input_text]
    path = os.path.join(work, name + ".onnx")
    if os.path.exists(path) and source is not model:
        return path, inputs
    res = normdeploy.optimize(source, bench=False, inputs=tuple(inputs), tolerance=float("inf"))
    onnx.save(res.original, path)
    return path, [spec_text(s.name, s.shape, s.dtype) for s in res.specs]


def spec_text(name: str, shape, dtype: str) -> str:
    """``NAME:SHAPE:DTYPE``, as ``--input`` takes it."""
    return f"{name}:{'x'.join(map(str, shape))}:{dtype}"


def with_batch(specs: list[str], batch: int) -> list[str]:
    """``specs`` with every input's first axis set to ``batch``."""
    from normdeploy.core.inputs import parse_input_spec

    return [spec_text(name, (batch, *shape[1:]), dtype) for name, shape, dtype in map(parse_input_spec, specs)]


def feed_for(specs: list[str]) -> dict:
    from normdeploy.core.inputs import InputSpec, example_arrays, parse_input_spec

    parsed = []
    for text in specs:
        name, shape, dtype = parse_input_spec(text)
        parsed.append(InputSpec(name, tuple(shape), dtype))
    return example_arrays(parsed, seed=0)


def factory(path: str, threads: int):
    from normdeploy.build import OrtRunner

    return lambda: OrtRunner(path, "ort-cpu", threads)


def spread(path: str, specs: list[str], k: int, threads: int, seconds: float, rounds: int = 20) -> dict:
    """Measurement 1: k sessions of ``path``, interleaved, in this process."""
    from normdeploy.bench.timing import interleaved

    feed = feed_for(specs)
    res = interleaved({f"s{i + 1}": factory(path, threads) for i in range(k)}, feed, seconds=seconds, warmup=3,
                      min_rounds=rounds, sessions=1)
    p50 = {n: res.p50(n) for n in res.timings}
    lo, hi = min(p50.values()), max(p50.values())
    slow, fast = max(p50, key=p50.get), min(p50, key=p50.get)
    ci = res.ratio_interval(slow, fast)
    return {"p50_ms": p50, "spread": hi / lo - 1, "rounds": res.rounds(), "slowest_over_fastest": hi / lo,
            "slowest_over_fastest_ci95": list(ci)}


def aa(path: str, specs: list[str], sessions: int, threads: int, seconds: float, reps: int) -> list[dict]:
    """Measurement 3: A/A ratios with their intervals."""
    from normdeploy.bench.timing import interleaved

    feed = feed_for(specs)
    out = []
    for _ in range(reps):
        res = interleaved({"A": factory(path, threads), "B": factory(path, threads)}, feed, seconds=seconds,
                          warmup=3, min_rounds=24, sessions=sessions)
        lo, hi = res.ratio_interval("A", "B")
        out.append({"ratio": res.ratio("A", "B"), "ci95": [lo, hi], "rounds": res.rounds(),
                    "session_ratios": res.session_ratios("A", "B"),
                    "excludes_1": bool(lo == lo and (lo > 1 or hi < 1))})
    return out


def handover(path: str, specs: list[str], threads: int, seconds: float, reps: int, sessions: int) -> dict:
    """Measurement 4: p50(original) / p50(copy) in the peers' order, without and with the handover."""
    import onnx

    from normdeploy.bench.timing import interleaved
    from normdeploy.build.openvino import OpenVinoRunner

    feed = feed_for(specs)
    proto = onnx.load(path)
    factories = {"original": factory(path, threads), "mid": factory(path, threads), "copy": factory(path, threads),
                 "openvino": lambda: OpenVinoRunner(proto, threads)}
    out = {}
    for label, value in (("none", 0.0), ("auto", "auto")):
        out[label] = []
        for _ in range(reps):
            res = interleaved(factories, feed, seconds=seconds, warmup=3, min_rounds=24, sessions=sessions,
                              handover=value)
            lo, hi = res.ratio_interval("original", "copy")
            out[label].append({"ratio": res.ratio("original", "copy"), "ci95": [lo, hi], "rounds": res.rounds(),
                               "p50_ms": {n: res.p50(n) for n in res.timings}, "handover_ms": res.handover_ms,
                               "spill_ms": res.spill_ms, "excludes_1": bool(lo == lo and (lo > 1 or hi < 1))})
    return out


def child(args) -> int:
    print(json.dumps(spread(args.child, args.input, args.k, args.threads, args.seconds, args.rounds)))
    return 0


def in_fresh_processes(path: str, specs: list[str], args) -> list[dict]:
    out = []
    for _ in range(args.processes):
        cmd = [sys.executable, __file__, "--child", path, "--k", str(args.k), "--threads", str(args.threads),
               "--seconds", str(args.seconds), "--rounds", str(args.rounds)] + [a for s in specs for a in ("--input", s)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        if p.returncode != 0:
            out.append({"error": (p.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# Sessions of one byte-identical model: how far apart they run", "",
             f"Produced by `{meta['command']}` on {meta['started']}; {meta['provenance']}. {meta['load']}"]
    if any("spread" in r for r in rows):
        lines += ["", "## 1. Sessions of one file, interleaved in one process", "",
                  "| model | sessions | rounds | p50 per session, ms | spread (max / min - 1) | slowest / fastest, "
                  "95 % CI |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if "spread" in r):
        s = r["spread"]
        lines.append(f"| {r['model']} | {len(s['p50_ms'])} | {s['rounds']} | "
                     + ", ".join(f"{v:.4g}" for v in s["p50_ms"].values())
                     + f" | {s['spread']:.1%} | {s['slowest_over_fastest_ci95'][0]:.3f}..{s['slowest_over_fastest_ci95'][1]:.3f} |")
    if any(r.get("processes") for r in rows):
        lines += ["", "## 2. The same in fresh processes", "",
                  "| model | process | p50 per session, ms | spread within the process |", "|---|---|---|---|"]
        for r in rows:
            meds = []
            for i, p in enumerate(r.get("processes") or []):
                if "error" in p:
                    lines.append(f"| {r['model']} | {i + 1} | error: {p['error'][:80]} | |")
                    continue
                meds.append(float(np.median(list(p["p50_ms"].values()))))
                lines.append(f"| {r['model']} | {i + 1} | " + ", ".join(f"{v:.4g}" for v in p["p50_ms"].values())
                             + f" | {p['spread']:.1%} |")
            if len(meds) > 1:
                lines.append(f"| {r['model']} | across processes | medians " + ", ".join(f"{m:.4g}" for m in meds)
                             + f" | {max(meds) / min(meds) - 1:.1%} (not interleaved: drift included) |")
    if any("aa" in r for r in rows):
        lines += ["", "## 3. A/A: the same file as both variants (true ratio 1.0)", "",
                  "| model | sessions per variant | rep | ratio | 95 % CI | per-session ratios | CI excludes 1.0 |",
                  "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if "aa" in r):
        for key, reps in r["aa"].items():
            for i, a in enumerate(reps):
                ci = a["ci95"]
                lines.append(f"| {r['model']} | {key} | {i + 1} | {a['ratio']:.3f} | "
                             + (f"{ci[0]:.3f}..{ci[1]:.3f}" if ci[0] == ci[0] else "too few rounds")
                             + " | " + ", ".join(f"{x:.3f}" for x in a["session_ratios"])
                             + f" | {'**yes**' if a['excludes_1'] else 'no'} |")
    if any("handover" in r for r in rows):
        lines += ["", "## 4. Handover: ONNX Runtime after OpenVINO against ONNX Runtime after ONNX Runtime", "",
                  "Variants `original`, `mid`, `copy` (ONNX Runtime sessions of one file) and `openvino` (OpenVINO "
                  "f32 on the same file), rotated round by round: `original` mostly follows `openvino`, `copy` "
                  "follows `mid`. True ratio 1.0.", "",
                  "| model | handover | rep | handover ms (spill per variant, ms) | p50 original / copy / openvino, "
                  "ms | original / copy | 95 % CI | CI excludes 1.0 |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if "handover" in r):
        for label, reps in r["handover"].items():
            for i, a in enumerate(reps):
                ci, p = a["ci95"], a["p50_ms"]
                spill = ", ".join(f"{n} {v:.1f}" for n, v in a["spill_ms"].items())
                lines.append(f"| {r['model']} | {label} | {i + 1} | {a['handover_ms']:.0f}"
                             + (f" ({spill})" if spill else "") + f" | {p['original']:.4g} / {p['copy']:.4g} / "
                             f"{p['openvino']:.4g} | {a['ratio']:.3f} | "
                             + (f"{ci[0]:.3f}..{ci[1]:.3f}" if ci[0] == ci[0] else "too few rounds")
                             + f" | {'**yes**' if a['excludes_1'] else 'no'} |")
    lines += ["", meta.get("note", ""), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=["gpt2-small"])
    ap.add_argument("--input", action="append", default=[], help="NAME:SHAPE[:DTYPE] (for .onnx files); repeatable")
    ap.add_argument("--k", type=int, default=4, help="sessions of one file in measurement 1 (default 4)")
    ap.add_argument("--rounds", type=int, default=20, help="fewest interleaved rounds of measurement 1 (default 20)")
    ap.add_argument("--processes", type=int, default=0, help="repeat measurement 1 in this many fresh processes")
    ap.add_argument("--sessions", type=int, default=3, help="sessions per variant in the A/A run (default 3)")
    ap.add_argument("--reps", type=int, default=2, help="A/A runs per setting (default 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=6.0, help="time budget per interleaved run (default 6)")
    ap.add_argument("--work", default=None, help="directory for exported models (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "session_bias.md"))
    ap.add_argument("--note", default="", help="a line appended to the results (e.g. the machine's load)")
    ap.add_argument("--handover", action="store_true", help="also measurement 4 (the handover)")
    ap.add_argument("--handover-only", action="store_true", help="measurement 4 alone")
    ap.add_argument("--batch", type=int, default=None, help="first axis of every input (default: as exported)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    from normdeploy.bench.timing import machine_info, provenance

    work = args.work or tempfile.mkdtemp(prefix="normdeploy-session-bias-")
    os.makedirs(work, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    loads = [os.getloadavg()[0]]
    rows = []
    for model in args.models:
        t0 = time.perf_counter()
        path, specs = prepare(model, args.input if len(args.models) == 1 else [], work)
        if args.batch:
            specs = with_batch(specs, args.batch)
        print(f"{model}: {path} {specs}", flush=True)
        row = {"model": model, "inputs": specs}
        if not args.handover_only:
            row["spread"] = spread(path, specs, args.k, args.threads, args.seconds, args.rounds)
            print(f"  spread {row['spread']['spread']:.1%}: {row['spread']['p50_ms']}", flush=True)
            if args.processes:
                row["processes"] = in_fresh_processes(path, specs, args)
                print(f"  processes: {[p.get('spread') for p in row['processes']]}", flush=True)
            row["aa"] = {}
            for s in sorted({1, args.sessions}):
                row["aa"][str(s)] = aa(path, specs, s, args.threads, args.seconds, args.reps)
                print(f"  A/A sessions {s}: "
                      f"{[(round(a['ratio'], 3), [round(c, 3) for c in a['ci95']]) for a in row['aa'][str(s)]]}",
                      flush=True)
        if args.handover or args.handover_only:
            row["handover"] = handover(path, specs, args.threads, args.seconds, args.reps, args.sessions)
            print("  handover: " + "; ".join(f"{k} {[round(a['ratio'], 3) for a in v]}"
                                             for k, v in row["handover"].items()), flush=True)
        row["wall_s"] = time.perf_counter() - t0
        loads.append(os.getloadavg()[0])
        rows.append(row)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given:  # the note is printed below the tables, not in the command
        i = given.index("--note")
        del given[i:i + 2]
    command = "python benchmarks/session_bias.py " + " ".join(given)
    meta = {"started": started, "command": command.strip(), "provenance": provenance(machine_info(args.threads), args.threads),
            "load": f"1-minute load average {min(loads):.1f} to {max(loads):.1f} while measuring.", "note": args.note}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(render(rows, meta))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
