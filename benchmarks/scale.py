#!/usr/bin/env python
"""How normdeploy's cost grows with the model: wall time and resident memory per stage, at real sizes.

Models are built from ``transformers`` configs with seeded random weights (normalization
parameters randomized, so every fold does real work), exported once to ``.onnx`` with
external data (``torch.onnx.export(dynamo=True)``, then ``ONNXProgram.save``), and each
goes through ``normdeploy optimize --target ort-cpu`` in a fresh process, twice: with
``--no-bench`` (load, export, canonicalize, rewrite, lower, verify, write) and with the
latency run; one also through ``--target trt-fp16 --lower-only``. Each row reads the
process's ``report.json`` (``resources``: seconds and resident memory per stage, the
process peak) and the peak resident set size of the process as the operating system
counted it (``ru_maxrss`` of the child). The ratios peak RSS / weight bytes are what the
issue bounds: at most 2 with ``--no-bench``, at most 4 with the latency run.

    .venv/bin/python benchmarks/scale.py                       # every size (about 40 min here)
    .venv/bin/python benchmarks/scale.py --only tiny,gpt2-small --out /tmp/scale.md
    .venv/bin/python benchmarks/scale.py --only llama-1b-fp16 --update   # re-measure one row

Writes ``benchmarks/results/scale.md`` and ``scale.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MIB = 1 << 20
GNU_TIME = "/usr/bin/time"  # Debian's `time` package


def _gpt2(n_embd, n_layer, n_head, vocab=50257):
    import transformers as T

    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab,
                                          n_positions=1024, use_cache=False))


def _qwen2(tied: bool):
    import transformers as T

    return T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                            max_position_embeddings=512, tie_word_embeddings=tied, use_cache=False))


def _llama_1b():
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                            num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                            max_position_embeddings=512, use_cache=False))


#: name -> (what, builder, dtype, sequence length)
MODELS = {
    "tiny": ("GPT-2 shape, d 256, 4 layers, vocab 8000 (~10 M parameters)", lambda: _gpt2(256, 4, 4, 8000),
             "float32", 64),
    "gpt2-small": ("GPT-2 small (12 layers, d 768, vocab 50257; 124 M parameters)", lambda: _gpt2(768, 12, 12),
                   "float32", 64),
    "qwen2-0.5b-tied": ("Qwen2-0.5B shape, tied head (494 M parameters)", lambda: _qwen2(True), "float32", 32),
    "qwen2-0.5b": ("Qwen2-0.5B shape, untied head (630 M parameters, past 2 GB in fp32)", lambda: _qwen2(False),
                   "float32", 32),
    "llama-1b-fp16": ("Llama 1.1 B shape (TinyLlama) in float16 (past 2 GB)", _llama_1b, "float16", 32),
}
LOWER_ONLY = ("qwen2-0.5b",)


def build_onnx(name: str, directory: str) -> tuple[str, int]:
    """Export ``MODELS[name]`` to ``directory/<name>.onnx`` (external data); returns the path and weight bytes."""
    import torch

    from normdeploy.zoo import OneTensor, randomize_norms

    what, build, dtype, seq = MODELS[name]
    torch.manual_seed(0)
    model = randomize_norms(build().eval())
    if dtype == "float16":
        model = model.half()
    wrapped = OneTensor(model, "input_ids").eval()  # the wrapper too: no training-mode export warning
    ids = torch.randint(0, 1000, (2, seq))  # batch 2: torch.export specializes a dimension of size 1 to a constant
    path = os.path.join(directory, f"{name}.onnx")
    with torch.no_grad():
        prog = torch.onnx.export(wrapped, (ids,), dynamo=True, optimize=False, opset_version=20,
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
                                 input_names=["input_ids"], verbose=False)
    prog.save(path, external_data=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    del prog, wrapped, model
    return path, weights


def run_optimize(path: str, args: list[str], out: str, seq: int) -> dict:
    """``normdeploy optimize`` in a fresh process; its report's resources and that process's own peak RSS.

    The peak is taken by GNU time (``/usr/bin/time -f %M``) around the child: a child forked
    straight from this process would inherit its high-water mark (Linux keeps the larger of
    the forked image's and the new program's peak across ``exec``), and this process holds
    torch and the model it exported.
    """
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "normdeploy.cli", "optimize", path, "--input", f"input_ids:1x{seq}:int64", "--out", out,
           "--force", "--json", "--threads", "1", *args]
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as maxrss:
        p = subprocess.run([GNU_TIME, "-f", "%M", "-o", maxrss.name, *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_kb = int(maxrss.read().strip().splitlines()[-1])
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": wall}
    report = json.loads(p.stdout)
    return {"wall_s": wall, "resources": report.get("resources", {}), "load_before": load,
            "child_peak_rss_mb": peak_kb / 1024,
            "accuracy": report["accuracy"]["max_rel_err"], "norm_nodes": report["norm_nodes"]}


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# normdeploy at real sizes: time and memory per stage", "",
             f"Produced by `{meta['command']}` on {meta['started']} ({meta['machine']}); every run in a fresh process, "
             "1 intra-op thread. Peak RSS is the operating system's count for that process (`ru_maxrss`, which "
             "also counts the file-backed pages of memory-mapped weights it read); *start* is what the process "
             "held when the run began (interpreter, torch, ONNX Runtime: a fixed cost that dominates small "
             "models), so *(peak - start) / weights* is what the pipeline itself adds per weight byte. Pipeline s "
             "is the sum of the stages other than bench (the latency run). Stage figures are normdeploy's own "
             "samples (report.json `resources`).", "",
             "| model | weights | run | wall s | pipeline s | peak RSS | start | peak / weights "
             "| (peak - start) / weights | max rel err | stages (s / peak GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["weights_bytes"]
        for run_name, res in r["runs"].items():
            if "error" in res:
                lines.append(f"| {r['name']} | {w / 1e9:.2f} GB | {run_name} | {res['wall_s']:.0f} | | | | | | | "
                             f"error: {res['error']} |")
                continue
            stages = res["resources"].get("stages", [])
            peak = res["child_peak_rss_mb"]
            start = res["resources"].get("start_rss_mb", 0.0)
            pipeline_s = sum(s["seconds"] for s in stages if s["stage"] != "bench")
            cells = ", ".join(f"{s['stage']} {s['seconds']:.1f} / {s['rss_mb_peak'] / 1024:.2f}" for s in stages)
            lines.append(f"| {r['name']} | {w / 1e9:.2f} GB | {run_name} | {res['wall_s']:.0f} | {pipeline_s:.0f} | "
                         f"{peak / 1024:.2f} GB | {start / 1024:.2f} GB | {peak * MIB / w:.2f} | "
                         f"{(peak - start) * MIB / w:.2f} | {res['accuracy']:.1e} | {cells} |")
    lines += ["", "Models: " + "; ".join(f"**{r['name']}**: {r['what']}" for r in rows) + ".", ""]
    if meta.get("load"):
        lines += [f"Machine load while measuring: {meta['load']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated model names: " + ", ".join(MODELS))
    ap.add_argument("--seconds", type=float, default=3.0, help="latency budget of the full run (default 3)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scale.md"))
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of the models run in the existing results (with --only)")
    ap.add_argument("--keep", default=None, help="directory to keep the exported models in (default: a temp dir)")
    args = ap.parse_args(argv)
    if not os.access(GNU_TIME, os.X_OK):
        ap.error(f"{GNU_TIME} (GNU time) is needed to read each run's peak memory: apt-get install time")
    names = args.only.split(",") if args.only else list(MODELS)
    work = args.keep or tempfile.mkdtemp(prefix="normdeploy-scale-")
    os.makedirs(work, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for name in names:
        print(f"{name}: export ...", flush=True)
        path = os.path.join(work, f"{name}.onnx")
        weights_file = path + ".weights.json"
        if os.path.exists(path) and os.path.exists(weights_file):
            weights = json.load(open(weights_file))["bytes"]
        else:
            path, weights = build_onnx(name, work)
            json.dump({"bytes": weights}, open(weights_file, "w"))
        runs = {}
        out = os.path.join(work, f"{name}.out")
        seq = MODELS[name][3]
        runs["--no-bench"] = run_optimize(path, ["--no-bench"], out, seq)
        runs["full"] = run_optimize(path, ["--seconds", str(args.seconds)], out, seq)
        if name in LOWER_ONLY:
            runs["trt-fp16 --lower-only"] = run_optimize(path, ["--target", "trt-fp16", "--lower-only", "--no-bench"],
                                                         out, seq)
        shutil.rmtree(out, ignore_errors=True)
        for k, v in runs.items():
            print(f"  {k}: " + (v["error"] if "error" in v else
                                f"{v['wall_s']:.0f} s, peak {v['child_peak_rss_mb'] or 0:.0f} MB"), flush=True)
        rows.append({"name": name, "what": MODELS[name][0], "weights_bytes": weights, "runs": runs})
    import platform

    command = "python benchmarks/scale.py" + ("" if argv is None and len(sys.argv) == 1 else
                                             " " + " ".join(argv if argv is not None else sys.argv[1:]))
    for r in rows:
        r["measured"], r["command"] = started, command
    json_out = os.path.splitext(args.out)[0] + ".json"
    if args.update and os.path.exists(json_out):  # keep the other models' rows of an earlier run
        new = {r["name"]: r for r in rows}
        old = {r["name"]: r for r in json.load(open(json_out))["rows"]}
        rows = [new.get(n) or old[n] for n in MODELS if n in new or n in old]
    loads = [v["load_before"] for r in rows for v in r["runs"].values() if "load_before" in v]
    meta = {"started": ", ".join(sorted({r.get("measured", started) for r in rows})),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load": f"1-minute load average before each run {min(loads):.1f} to {max(loads):.1f}" if loads else "",
            "command": "`, then `".join(dict.fromkeys(r.get("command", command) for r in rows))}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(render(rows, meta))
    with open(json_out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
