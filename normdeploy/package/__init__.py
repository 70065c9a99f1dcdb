"""Stage ``package``: write the output directory of DESIGN.md section 7, all or nothing.

Everything is written into a fresh temporary directory beside the destination, which is
renamed into place only when complete; an existing destination is replaced only with
``force`` (and then only after the new one is complete). The input file is never touched.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from ..core.errors import InputError
from ..core.graph import save_model
from .triton import model_name, write_repository


def check_writable(out: str, force: bool) -> None:
    """Fail early, before any work, when ``out`` cannot be written."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"output path {out} exists and is a file", "choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise InputError(f"output directory {out} exists and is not empty", "pass --force to replace it, or another --out")
    if not os.path.isdir(parent):
        raise InputError(f"the parent directory of {out} does not exist", f"create {parent} first")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        os.rmdir(tempfile.mkdtemp(prefix=".normdeploy-probe-", dir=parent))
    except OSError as e:
        raise InputError(f"output directory {out} is not writable ({e.strerror or e} in {parent})",
                         "choose a --out you can write to") from None


def write(out: str, result, force: bool = False, name: str | None = None, triton_repo: str | None = None) -> str:
    """Write the output directory; with ``triton_repo``, also the model's entry in that repository."""
    check_writable(out, force)
    name = name or model_name(os.path.splitext(os.path.basename(result.report["input"]["path"]))[0])
    if triton_repo and _triton_entry_args(result) is None:
        raise InputError("--triton-repo: a trt-* model written with --lower-only has plugin nodes that no Triton "
                         "backend serves", "build the engine on a GPU host (drop --lower-only), or use --target ort-cpu")
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        _write_all(tmp, result, name)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"cannot write output directory {out}: {e.strerror or e}", "check free space and permissions") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if triton_repo:
        os.makedirs(triton_repo, exist_ok=True)
        write_repository(triton_repo, name, result.optimized, **_triton_entry_args(result))
    return out


def _triton_entry_args(result) -> dict | None:
    """How Triton serves this result: a TensorRT plan, ONNX Runtime, or (lower-only trt models) not at all."""
    target = result.report["target"]
    batch_range = result.report.get("batch_range")
    args = {"max_batch_size": batch_range[2] if batch_range else 64}
    if batch_range:
        args["preferred_batch_sizes"] = [batch_range[1]]
    if result.plan is not None:
        return {**args, "artifact": result.plan}
    if target.startswith("trt-"):
        return None
    return {**args, "instance_kind": "KIND_CPU" if target == "ort-cpu" else "KIND_GPU"}


def _write_all(d: str, result, name: str) -> None:
    save_model(result.original_model, os.path.join(d, "original.onnx"))
    save_model(result.optimized_model, os.path.join(d, "model.onnx"))
    if result.plan is not None:
        with open(os.path.join(d, "model.plan"), "wb") as f:
            f.write(result.plan)
    report = result.report
    with open(os.path.join(d, "report.json"), "w") as f:
        json.dump(jsonable(report), f, indent=2, sort_keys=False)
        f.write("\n")
    with open(os.path.join(d, "report.md"), "w") as f:
        f.write(render_markdown(report))
    if result.bench is not None:
        from ..bench.plot import plot

        plot(result.bench, os.path.join(d, "latency.png"), f"{name}: original vs optimized vs floor ({report['target']})")
    entry = _triton_entry_args(result)
    if entry is not None:
        os.makedirs(os.path.join(d, "triton"))
        write_repository(os.path.join(d, "triton"), name, result.optimized, **entry)


def jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def _fmt(v, spec=".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def render_markdown(r: dict) -> str:
    acc, lat = r["accuracy"], r.get("latency")
    lines = [f"# normdeploy report: `{r['input']['path']}`", "",
             f"target **{r['target']}**, input kind {r['input']['kind']}, inputs "
             + ", ".join(f"`{i['name']}` {'x'.join(map(str, i['shape']))} {i['dtype']}" for i in r["input"]["inputs"]), "",
             "## Normalization nodes", "", "| kind | before | after |", "|---|---|---|"]
    kinds = sorted(set(r["norm_nodes"]["before"]) | set(r["norm_nodes"]["after"]))
    lines += [f"| {k} | {r['norm_nodes']['before'].get(k, 0)} | {r['norm_nodes']['after'].get(k, 0)} |" for k in kinds]
    lines += ["", "## Passes", "", "| pass | exact | matched | rewrites | skipped |", "|---|---|---|---|---|"]
    for p in r["passes"]:
        lines.append(f"| {p['name']} | {'yes' if p['exact'] else 'no'} | {p['matched']} | {len(p['rewrites'])} | {len(p['skipped'])} |")
    skipped = [(p["name"], s) for p in r["passes"] for s in p["skipped"]]
    if skipped:
        lines += ["", "Skipped, with reasons:", ""] + [f"- `{s['node']}` ({n}): {s['reason']}" for n, s in skipped]
    lines += ["", "## Accuracy (original.onnx vs model.onnx, same inputs)", "",
              f"max abs err {_fmt(acc['max_abs_err'])}, max rel err {_fmt(acc['max_rel_err'])} "
              f"(tolerance {acc['tolerance']:g}), min cosine {_fmt(acc['cosine_min'], '.9f')}, "
              f"top-1 agreement {_fmt(acc['top1_agreement'], '.2%')}", ""]
    for key in ("random", "data"):
        if key in acc:
            a = acc[key]
            lines.append(f"- {a['inputs']} ({a['samples']} samples): max abs {_fmt(a['max_abs_err'])}, "
                         f"max rel {_fmt(a['max_rel_err'])}, top-1 {_fmt(a['top1_agreement'], '.2%')}")
    if r.get("export_fidelity"):
        f = r["export_fidelity"]
        lines.append(f"- export fidelity ({f['inputs']}): max abs {_fmt(f['max_abs_err'])}")
    if lat and lat.get("speedup") is not None:
        m = lat["machine"]
        lines += ["", "## Latency", "",
                  f"{m['machine']} ({m['cpu']}), {lat['threads']} threads, onnxruntime {m['onnxruntime']}, batch {lat['batch']}; "
                  f"{lat['method']}", "", "| model | p50 ms | p90 ms | p99 ms | throughput /s | runs |", "|---|---|---|---|---|---|"]
        for k in ("original", "optimized", "floor"):
            if k in lat:
                t = lat[k]
                lines.append(f"| {k} | {t['p50_ms']:.4f} | {t['p90_ms']:.4f} | {t['p99_ms']:.4f} | {t['throughput_per_s']:.1f} | {t['runs']} |")
        lo, hi = lat["speedup_ci95"]
        lines += ["", f"speedup **{lat['speedup']:.3f}x** (95 % interval {_fmt(lo, '.3f')} to {_fmt(hi, '.3f')}); "
                  f"share of normalization cost left {_fmt(lat['norm_cost_left'], '.1%')}", "", "![latency](latency.png)"]
    elif lat:
        lines += ["", "## Latency", "", f"TensorRT engine, batch {lat['batch']}: {json.dumps(lat['optimized'])}; "
                  f"{lat['method']}. {lat.get('note', '')}"]
    else:
        lines += ["", "## Latency", "", "not measured (see notes)"]
    if r.get("precision"):
        pa = r["precision"].get("accuracy") or {}
        lines += ["", "## Precision", "", f"`{json.dumps(r['precision'].get('precision', {}))[:400]}`"]
        if pa:
            lines.append(f"against the fp32 lowering: max abs {_fmt(pa.get('max_abs_err'))}, max rel "
                         f"{_fmt(pa.get('max_rel_err'))}; largest error arises at `{(pa.get('origin') or {}).get('node')}`")
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"
