"""ViT-Tiny-sized models with each token normalization: original vs optimized vs floor vs peers.

    .venv/bin/python benchmarks/vit_norms.py                # writes benchmarks/results/vit_norms.md/.json/.png
    .venv/bin/python benchmarks/vit_norms.py --seconds 2    # quicker, noisier

The model is ``normdeploy.zoo.vit_tiny_224(norm)`` (3x224x224, patch 16: 197 tokens, d 192,
12 pre-norm blocks, 3 heads), random weights with non-trivial normalization parameters
(seeded). For each norm and batch size (1 and 16) four ONNX Runtime sessions are timed in
one interleaved run (DESIGN.md section 6): the exported original, normdeploy's optimized
model, the floor (every normalization replaced by Identity) and ONNX Runtime's
transformers optimizer applied to the same export (where it accepts it). Reported: p50 per
session, the speedup p50(original)/p50(optimized) with its 95 % bootstrap interval, the
share of normalization cost left ``(opt - floor) / (orig - floor)``, and whether the
optimized model is at least as fast as the transformers optimizer's.

Targets (issue 4, batch 1): normalization cost left at most 10 % for UN, 40 % for
PowerNorm, 50 % for DyT and 60 % for LN; optimized no slower than the transformers optimizer.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NORMS = ("ln", "un", "powernorm", "dyt", "rmsnorm")
TARGET_LEFT = {"un": 0.10, "powernorm": 0.40, "dyt": 0.50, "ln": 0.60}


def build_model(norm: str, seed: int = 0):
    import torch

    from normdeploy.zoo import vit_tiny_224

    torch.manual_seed(seed)
    model = vit_tiny_224(norm).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("norm", "alpha")) and p.dim() <= 1:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g) if "bias" not in name
                        else torch.empty_like(p).uniform_(-0.2, 0.2, generator=g))
        for name, b in model.named_buffers():
            if b.dtype.is_floating_point and ("moment" in name or "phi" in name):
                b.copy_(torch.empty_like(b).uniform_(0.5, 2.0, generator=g))
    return model


def run(norms, batches, seconds, threads):
    import normdeploy
    from normdeploy.bench.peers import versions

    rows = []
    for norm in norms:
        t0 = time.time()
        res = normdeploy.optimize(build_model(norm), inputs=("input:1x3x224x224",), bench=False)
        passes = {p["name"]: len(p["rewrites"]) for p in res.report["passes"] if p["rewrites"]}
        for batch in batches:
            mb = normdeploy.benchmark(res.original, candidates={"optimized": res.optimized}, peers=("ort-transformers",),
                                      batch=str(batch), threads=threads, seconds=seconds * (1 if batch == 1 else 2),
                                      warmup=3, hint="vit")
            r = mb.result
            peer = mb.variants["ort-transformers"]
            peer_acc = mb.worst_accuracy("ort-transformers")
            lo, hi = r.ratio_interval("original", "optimized")
            row = {"norm": norm, "batch": batch, "p50_ms": {k: r.p50(k) for k in r.timings},
                   "runs": len(r.timings["original"].samples_ms),
                   "speedup": r.ratio("original", "optimized"), "speedup_ci95": [lo, hi],
                   "norm_cost_left": r.norm_cost_left(),
                   "norm_share_of_original": (r.p50("original") - r.p50("floor")) / r.p50("original"),
                   "max_rel_err": mb.worst_accuracy("optimized")["max_rel_err"], "peer": peer.status,
                   "peer_max_rel_err": peer_acc["max_rel_err"] if peer_acc else None,
                   "passes": passes, "norm_nodes": res.report["norm_nodes"],
                   "machine": mb.machine, "versions": versions()}
            if "ort-transformers" in r.timings:
                row["vs_transformers_optimizer"] = r.ratio("ort-transformers", "optimized")
            rows.append(row)
            print(f"{norm:10s} batch {batch:2d}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["p50_ms"].items())
                  + f" | speedup {row['speedup']:.3f} | cost left "
                  + (f"{row['norm_cost_left']:.0%}" if row["norm_cost_left"] is not None else "n/a"), flush=True)
        print(f"  ({norm}: {time.time() - t0:.0f} s)", flush=True)
    return rows


def verdict(row) -> str:
    parts = []
    target = TARGET_LEFT.get(row["norm"])
    left = row["norm_cost_left"]
    if row["batch"] == 1 and target is not None:
        if left is None:
            parts.append("cost left n/a")
        else:
            parts.append(f"{'met' if left <= target else 'MISSED'} (<= {target:.0%})")
    vs = row.get("vs_transformers_optimizer")
    if vs is not None:
        parts.append(f"{'not slower' if vs >= 1 else 'SLOWER'} than ORT transformers optimizer ({vs:.3f}x)")
    return "; ".join(parts)


def markdown(rows, cmd: str) -> str:
    m = rows[0]["machine"]
    lines = ["# ViT-Tiny-sized models, one normalization each, on ONNX Runtime CPU", "",
             f"Machine: {m['cpu']} ({m['machine']}, {m['cores']} cores), {m['threads']} threads, "
             f"onnxruntime {m['onnxruntime']}, torch {rows[0]['versions'].get('torch', '?')}. "
             f"Command: `{cmd}`.", "",
             "Timings are medians (p50) of interleaved runs in one process; the floor replaces every normalization "
             "by Identity (wrong output, the bound). cost left = (optimized - floor) / (original - floor). "
             "vs ORT-T = p50(ORT transformers optimizer) / p50(optimized): above 1 means normdeploy is faster.", "",
             "| norm | batch | original ms | optimized ms | floor ms | ORT-T ms | speedup (95 % CI) | norm share of original | cost left | vs ORT-T | max rel err | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["p50_ms"]
        lo, hi = r["speedup_ci95"]
        left = r["norm_cost_left"]
        lines.append(
            f"| {r['norm']} | {r['batch']} | {p['original']:.2f} | {p['optimized']:.2f} | {p['floor']:.2f} | "
            f"{p.get('ort-transformers', float('nan')):.2f} | {r['speedup']:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{r['norm_share_of_original']:.1%} | {'n/a' if left is None else f'{left:.0%}'} | "
            f"{r.get('vs_transformers_optimizer', float('nan')):.3f} | {r['max_rel_err']:.1e} | {verdict(r)} |")
    lines += ["", "Passes applied per norm: " + "; ".join(
        f"{r['norm']}: " + ", ".join(f"{k} x{v}" for k, v in r["passes"].items()) for r in rows if r["batch"] == rows[0]["batch"])]
    peer_notes = {r["norm"]: r["peer"] for r in rows if r["peer"] != "ok"}
    if peer_notes:
        lines += ["", "ORT transformers optimizer: " + "; ".join(f"{k}: {v}" for k, v in peer_notes.items())]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b1 = [r for r in rows if r["batch"] == 1]
    names = [r["norm"] for r in b1]
    keys = ["original", "optimized", "floor", "ort-transformers"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    width = 0.2
    for i, k in enumerate(keys):
        vals = [r["p50_ms"].get(k, np.nan) for r in b1]
        ax.bar(np.arange(len(names)) + (i - 1.5) * width, vals, width, label=k)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("p50 latency, ms (batch 1)")
    m = b1[0]["machine"]
    ax.set_title(f"ViT-Tiny-sized, per normalization ({m['threads']} threads, onnxruntime {m['onnxruntime']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--norms", default=",".join(NORMS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--seconds", type=float, default=6.0, help="time budget per interleaved run at batch 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "vit_norms"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    rows = run(args.norms.split(","), [int(b) for b in args.batches.split(",")], args.seconds, args.threads)
    cmd = "benchmarks/vit_norms.py " + " ".join(sys.argv[1:])
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, cmd.strip()))
    plot(rows, args.out + ".png")
    print(open(args.out + ".md").read())


if __name__ == "__main__":
    main()
