"""Stage ``package``: write the output directory of DESIGN.md section 7, all or nothing.

Everything is written into a fresh temporary directory beside the destination, which is
renamed into place only when complete; an existing destination is replaced only with
``force`` (and then only after the new one is complete). The input file is never touched.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

from ..core.errors import InputError, UnsupportedError
from ..core.graph import save_model, signature
from . import files
from .triton import TRITON_GRAPH_LEVEL, EntryError, check_entry, model_name, plan_entry, write_repository

#: ``--triton-backend``: "default" is ONNX Runtime for ort-* targets and TensorRT where an engine was
#: built; "python" serves the ONNX model with ONNX Runtime from Triton's Python backend (PyPI's tritonserver)
TRITON_BACKENDS = ("default", "python")


def default_name(model_path: str) -> str:
    """The Triton entry name of a model file: its stem, made Triton-safe."""
    return model_name(os.path.splitext(os.path.basename(model_path))[0])


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_destination(path: str, what: str, inputs=()) -> None:
    """Refuse a destination whose replacement would delete what normdeploy did not write or cannot
    replace: one containing an input file, the current directory or one above it, the home directory."""
    real = os.path.realpath(path)
    here = os.path.realpath(os.getcwd())
    if _is_within(here, real):
        which = "the current directory" if real == here else "a directory above the current one"
        raise InputError(f"{what} {path} is {which}; normdeploy writes a directory of its own and would replace it",
                         f"give a new directory, e.g. {what} {os.path.join(path, 'out')}")
    home = os.path.realpath(os.path.expanduser("~"))
    if real == home:
        raise InputError(f"{what} {path} is the home directory; normdeploy writes a directory of its own and would "
                         "replace it", f"give a new directory, e.g. {what} {os.path.join(path, 'out')}")
    for p in inputs:
        if p and isinstance(p, str) and _is_within(os.path.realpath(p), real):
            raise InputError(f"{what} {path} contains the input {p}; normdeploy would replace it",
                             "give another output directory, or move the input out of it")


def check_writable(out: str, force: bool, inputs=()) -> None:
    """Fail early, before any work, when ``out`` cannot be written, or when writing it would replace
    anything normdeploy did not write (:func:`check_destination`, :func:`.files.check_replaceable`).

    ``inputs``: the model file(s), never inside ``out``. Without ``force`` only an absent or empty
    ``out`` is written; with it, also a directory normdeploy wrote (it carries ``.files.MARKER``).
    Scratch directories of ``out`` left by a writer that was killed are cleaned first
    (:func:`.files.clean_stale`), and a previous output it had moved aside is put back.
    """
    parent = os.path.dirname(os.path.abspath(out)) or "."
    check_destination(out, "--out", inputs)
    files.clean_stale(parent, os.path.basename(os.path.abspath(out)))  # a killed writer's scratch; its previous output back
    if os.path.islink(out) or (os.path.exists(out) and not os.path.isdir(out)):
        files.check_replaceable(out, "output directory")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise InputError(f"output directory {out} exists and is not empty",
                             "pass --force to replace it, or another --out")
        files.check_replaceable(out, "output directory")
    if not os.path.isdir(parent):
        raise InputError(f"the parent directory of {out} does not exist", f"create {parent} first")
    _probe(parent, f"output directory {out}", "--out")


def _probe(parent: str, what: str, flag: str) -> None:
    try:  # a real probe: os.access says yes to root even on read-only file systems; unnamed, so nothing is left
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise InputError(f"{what} is not writable ({e.strerror or e} in {parent})",
                         f"choose a {flag} you can write to") from None


def check_repository(repo: str, name: str | None = None, inputs=()) -> None:
    """Fail early when the Triton repository ``repo`` cannot take the entry ``name``: ``repo`` is a file,
    or its entry ``name`` exists and was not written by normdeploy, or would contain an input."""
    if os.path.exists(repo) and not os.path.isdir(repo):
        raise InputError(f"--triton-repo {repo} exists and is a file", "choose another --triton-repo")
    parent = repo if os.path.isdir(repo) else os.path.dirname(os.path.abspath(repo))
    if not os.path.isdir(parent):
        raise InputError(f"the parent directory of {repo} does not exist", f"create {parent} first")
    if name:
        entry = os.path.join(repo, name)
        check_destination(entry, "Triton entry", inputs)
        files.check_replaceable(entry, "Triton entry")
    _probe(parent, f"--triton-repo {repo}", "--triton-repo")


def _input_paths(result) -> tuple[str, ...]:
    path = (result.report.get("input") or {}).get("path")
    return (path,) if isinstance(path, str) and os.path.exists(path) else ()


def write(out: str, result, force: bool = False, name: str | None = None, triton_repo: str | None = None,
          triton_backend: str = "default") -> str:
    """Write the output directory; with ``triton_repo``, also the model's entry in that repository.

    The Triton entry is planned and checked (:func:`normdeploy.package.triton.check_entry`) before
    anything is written; its summary goes into ``report.json`` as ``triton``.

    All or nothing, and nothing lost: everything is written into a marked scratch directory
    ``.<out>.tmp-<pid>-*`` beside ``out`` (:data:`.files.MARKER`, naming this process), which then
    takes the place of ``out``, swapped atomically where the platform can
    (:func:`.files.replace_dir`). ``out`` is replaced only when it is absent, empty or written by
    normdeploy, never when it holds the input or is the current or home directory. Scratch left by
    a writer that was killed is removed first (:func:`.files.clean_stale`).
    """
    inputs = _input_paths(result)
    check_writable(out, force, inputs)
    name = name or default_name(result.report["input"]["path"])
    entry = triton_entry_args(result, triton_backend)
    if triton_repo and entry is None:
        raise InputError("--triton-repo: a trt-* model written with --lower-only has plugin nodes that no Triton "
                         "backend serves", "build the engine on a GPU host (drop --lower-only), pass "
                         "--triton-backend python, or use --target ort-cpu")
    if triton_repo:
        check_repository(triton_repo, name, inputs)
    if entry is not None:
        result.report["triton"] = _checked_summary(name, entry)
    out = os.path.abspath(out)
    parent, base = os.path.dirname(out), os.path.basename(out)
    files.clean_stale(parent, base)
    made: list[str] = []  # the scratch directory, known as soon as it exists
    try:
        tmp = files.make_scratch(base, "tmp", parent, role="output", record=made)
        _write_all(tmp, result, name, entry)
        files.replace_dir(tmp, out, "output directory")
    except OSError as e:
        for d in made:
            files.remove_scratch(d)
        raise InputError(f"cannot write output directory {out}: {e.strerror or e}", "check free space and permissions") from e
    except BaseException:
        for d in made:
            files.remove_scratch(d)
        raise
    if triton_repo:
        os.makedirs(triton_repo, exist_ok=True)
        write_repository(triton_repo, name, **entry)
    return out


def triton_entry_args(result, backend: str = "default") -> dict | None:
    """How Triton serves this result (``write_repository``'s arguments), or None where no backend can.

    default: a TensorRT plan with the optimization profile it was built with (``max_batch_size``
    and dims from that profile, the TensorRT version it needs as a parameter), ONNX Runtime for
    ort-* targets, OpenVINO IR for Triton's OpenVINO backend on ``openvino`` (``max_batch_size`` 0:
    :mod:`.triton` says why), nothing for ``--lower-only`` trt-* models (their plugin nodes run nowhere but
    in an engine). python: the ONNX model (trt-*: plugin ops as function bodies) on ONNX Runtime
    in Triton's Python backend, for every target.
    """
    if backend not in TRITON_BACKENDS:
        raise InputError(f"--triton-backend {backend!r} is unknown", f"use one of {', '.join(TRITON_BACKENDS)}")
    report = result.report
    target = report["target"]
    batch_range = report.get("batch_range")
    args = {"preferred_batch_sizes": [batch_range[1]] if batch_range else None}
    level = (report.get("ort_session") or {}).get("graph_optimization", "all")
    if backend == "python":
        from .triton_python import served_onnx

        python = {**args, "model": served_onnx(result.optimized_model, target), "backend": "python",
                  "max_batch_size": batch_range[2] if batch_range else None}
        if level != "all":  # model.py reads it (the Python backend has no optimization block of its own)
            python["parameters"] = {"graph_optimization_level": level}
        return python
    if result.plan is not None:
        engine = report.get("engine") or {}
        profiles = engine.get("profiles") or []
        params = {"tensorrt_version": engine["tensorrt_version"]} if engine.get("tensorrt_version") else {}
        return {**args, "model": result.optimized_model, "artifact": result.plan, "backend": "tensorrt",
                "profile": profiles[0] if profiles else [], "parameters": params}
    if target.startswith("trt-"):
        return None
    if target == "openvino":
        threads = (report.get("runtime") or {}).get("threads") or 1
        return {**args, "model": result.optimized_model, "backend": "openvino", "max_batch_size": 0,
                "preferred_batch_sizes": None, "instance_kind": "KIND_CPU",
                "parameters": {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads),
                               "NUM_STREAMS": "1"}}
    return {**args, "model": result.optimized_model, "backend": "onnxruntime",
            "max_batch_size": batch_range[2] if batch_range else None,
            "instance_kind": "KIND_CPU" if target == "ort-cpu" else "KIND_GPU",
            "graph_level": TRITON_GRAPH_LEVEL[level]}


def _checked_summary(name: str, entry: dict) -> dict:
    """The entry as report.json shows it; raises the one-line error for an entry Triton would refuse."""
    keys = ("max_batch_size", "instance_kind", "profile", "preferred_batch_sizes", "parameters", "graph_level")
    plan_args = {k: entry[k] for k in keys if k in entry}
    if entry["backend"] == "python":
        from .triton_python import entry_parameters

        plan_args["parameters"] = {**entry_parameters(), **(entry.get("parameters") or {})}
    try:
        sig = signature(entry["model"])
        planned = plan_entry(sig, name, entry["backend"], **plan_args)
        check_entry(planned, sig, entry.get("profile"))
    except EntryError as e:
        hint = ("serve it with --triton-backend default, or pass --io-dtype fp32" if "bfloat16" in str(e)
                else "report it with the model; --triton-backend python serves the ONNX model instead")
        raise UnsupportedError(f"cannot write a Triton entry the server would load: {e}", hint) from None
    summary = planned.to_json()
    if entry["backend"] == "tensorrt":
        summary["tensorrt_version"] = entry["parameters"].get("tensorrt_version")
        summary["engine_profile"] = entry.get("profile")
    if entry["backend"] == "openvino":
        from .triton import OPENVINO_PRECISION_NOTE

        summary["files"] = ["model.xml", "model.bin"]
        summary["precision_note"] = OPENVINO_PRECISION_NOTE
    return summary


def _write_all(d: str, result, name: str, entry: dict | None) -> None:
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
    if entry is not None:
        os.makedirs(os.path.join(d, "triton"))
        write_repository(os.path.join(d, "triton"), name, **entry)


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


def _cell(text: str) -> str:
    """``text`` fit for a markdown table cell (no pipes, no line breaks)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _runtime_lines(rt: dict | None) -> list[str]:
    """The report's runtime line: what verified (and timed) the model, and at which precision."""
    if not rt:
        return []
    threads = f", {rt['threads']} threads" if rt.get("threads") else ""
    return [f"runtime **{rt['name']} {rt.get('version') or ''}**".rstrip() + f"{' ' + rt['device'] if rt.get('device') else ''}"
            f", inference precision **{rt.get('inference_precision') or 'n/a'}**{threads}", ""]


def _runtime_text(r: dict, machine: dict) -> str:
    rt = r.get("runtime") or {}
    if rt.get("name") and rt["name"] != "ONNX Runtime":
        return f"{rt['name']} {rt.get('version')} {rt.get('inference_precision') or ''}".rstrip()
    return f"onnxruntime {machine['onnxruntime']}"


def render_autotune(t: dict) -> list[str]:
    """report.md's autotune section: every candidate, its p50 and speedup against the default, the choice."""
    m = t.get("machine") or {}
    where = (f" on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), {m.get('threads', '?')} threads, onnxruntime "
             f"{m.get('onnxruntime', '?')}" if m else "")
    lines = ["", "## Autotune", "", f"{t['method']}; budget {t['budget_s']:g} s{where}.", "",
             "| candidate | flags | exact (max rel err) | p50 ms | speedup vs default [95 % CI] | note |",
             "|---|---|---|---|---|---|"]
    for c in t["candidates"]:
        err = c.get("max_rel_err")
        exact = "n/a" if c["exact"] is None else ("yes" if c["exact"] else "no") + (f" ({err:.2g})" if err is not None
                                                                                  else "")
        ci = c.get("speedup_ci95")
        speed = ("" if c.get("speedup_vs_default") is None else f"{c['speedup_vs_default']:.3f}x"
                 + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        lines.append(f"| {c['name']} | `{c['flags'] or '(as given)'}` | {exact} | "
                     f"{'' if c['p50_ms'] is None else format(c['p50_ms'], '.4f')} | {speed} | {_cell(c['note'] or '')} |")
    lines += ["", f"chosen: **{t['chosen']}**: {t['why']}" + (f"; the same model without --autotune: `{t['flags']}`"
                                                              if t["flags"] else "")]
    lines += [f"- {n}" for n in t.get("notes") or []]
    return lines


def render_markdown(r: dict) -> str:
    acc, lat = r["accuracy"], r.get("latency")
    lines = [f"# normdeploy report: `{r['input']['path']}`", "",
             f"target **{r['target']}**, input kind {r['input']['kind']}, inputs "
             + ", ".join(f"`{i['name']}` {'x'.join(map(str, i['shape']))} {i['dtype']}" for i in r["input"]["inputs"]), "",
             *_runtime_lines(r.get("runtime")),
             "## Normalization nodes", "", "| kind | before | after |", "|---|---|---|"]
    kinds = sorted(set(r["norm_nodes"]["before"]) | set(r["norm_nodes"]["after"]))
    lines += [f"| {k} | {r['norm_nodes']['before'].get(k, 0)} | {r['norm_nodes']['after'].get(k, 0)} |" for k in kinds]
    if r.get("normalizations"):
        lines += ["", "| node | kind | spelling matched | what happens |", "|---|---|---|---|"]
        for e in r["normalizations"]:
            fate = "; ".join(e["rewrites"]) if e["rewrites"] else "kept: " + "; ".join(e["kept_because"])
            lines.append(f"| `{e['node']}` | {e['kind']} | {e['spelling']} | {_cell(fate)} |")
    if r.get("left_alone"):
        lines += ["", "## Normalization-like subgraphs left alone", "",
                  "| node | what | ops | condition that failed | then |", "|---|---|---|---|---|"]
        lines += [f"| `{x['node']}` | {x['what']} | {x['spelling']} | {_cell(x['reason'])} | "
                  f"{_cell('; '.join(x['fate']) or '-')} |" for x in r["left_alone"]]
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
                  f"{m['machine']} ({m['cpu']}), {lat['threads']} threads, {_runtime_text(r, m)}, batch {lat['batch']}; "
                  f"{lat['method']}", "", "| model | p50 ms | p50 per session, min..max (n) | p90 ms | p99 ms | throughput /s | runs |",
                  "|---|---|---|---|---|---|---|"]
        for k in ("original", "optimized", "floor"):
            if k in lat:
                t = lat[k]
                spread = t.get("session_spread_ms")
                per = (f"{spread[0]:.4f}..{spread[1]:.4f} ({t.get('sessions', 1)})" if spread else "n/a")
                lines.append(f"| {k} | {t['p50_ms']:.4f} | {per} | {t['p90_ms']:.4f} | {t['p99_ms']:.4f} | "
                             f"{t['throughput_per_s']:.1f} | {t['runs']} |")
        lo, hi = lat["speedup_ci95"]
        interval = (f"95 % interval {_fmt(lo, '.3f')} to {_fmt(hi, '.3f')}" if lo is not None and lo == lo
                    else lat.get("speedup_note") or "no interval")
        left = lat["norm_cost_left"]
        left = _fmt(left, ".1%") if left is not None else f"n/a ({lat.get('norm_cost_left_note') or 'not measured'})"
        per = lat.get("speedup_sessions") or []
        if len(per) > 1:
            interval += f"; per session {min(per):.3f}x to {max(per):.3f}x over {len(per)} sessions"
        lines += ["", f"speedup **{lat['speedup']:.3f}x** ({interval}); share of normalization cost left {left}", "",
                  "![latency](latency.png)"]
    elif lat:
        lines += ["", "## Latency", "", f"TensorRT engine, batch {lat['batch']}: {json.dumps(lat['optimized'])}; "
                  f"{lat['method']}. {lat.get('note', '')}"]
    else:
        lines += ["", "## Latency", "", "not measured (see notes)"]
    if r.get("autotune"):
        lines += render_autotune(r["autotune"])
    if r.get("ort_session") and r["ort_session"].get("graph_optimization") != "all":
        o = r["ort_session"]
        lines += ["", f"ONNX Runtime session: graph optimization level {o['graph_optimization_level']} "
                  f"(`{o['flag']}`), written into the Triton entry"]
    if r.get("precision"):
        pa = r["precision"].get("accuracy") or {}
        lines += ["", "## Precision", "", f"`{json.dumps(r['precision'].get('precision', {}))[:400]}`"]
        if pa:
            lines.append(f"against the fp32 lowering: max abs {_fmt(pa.get('max_abs_err'))}, max rel "
                         f"{_fmt(pa.get('max_rel_err'))}; largest error arises at `{(pa.get('origin') or {}).get('node')}`")
    if r.get("triton"):
        t = r["triton"]
        lines += ["", "## Triton Inference Server entry", "",
                  f"`triton/{t['name']}`: backend {t['backend']}, max_batch_size {t['max_batch_size']}, dynamic "
                  f"batching {'on' if t['dynamic_batching'] else 'off'}"
                  + (f" (preferred {t['preferred_batch_sizes']})" if t["preferred_batch_sizes"] else "")
                  + ", inputs " + ", ".join(f"`{k}` {v}" for k, v in t["inputs"].items())
                  + (f"; the engine needs TensorRT {t['tensorrt_version']}" if t.get("tensorrt_version") else "")]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"
