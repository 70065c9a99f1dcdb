"""The pipeline: load -> export -> canonicalize -> rewrite -> lower -> build -> verify/bench.

:func:`optimize` runs every stage and returns a :class:`Result` holding the models and
the report; :mod:`normdeploy.package` writes them out. No stage reaches back into an
earlier one; each pass's :class:`~normdeploy.passes.PassResult` goes into the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from . import __version__, survey
from .build import OrtRunner, TorchRunner
from .errors import AccuracyError, InputError, UnsupportedError
from .export import example_arrays, infer_shapes, name_norms_by_module, to_onnx
from .load import InputSpec, Loaded, load
from .passes import PassContext, run_stage
from .verify import Accuracy, batches, compare

TARGETS = ("ort-cpu", "ort-cuda", "ort-trt", "trt-fp32", "trt-fp16", "trt-bf16")


@dataclass
class Options:
    target: str = "ort-cpu"
    inputs: tuple[str, ...] = ()
    data: str | None = None
    trust_pickle: bool = False
    opset: int = 20
    batch: int | None = None
    bench_seconds: float = 3.0
    bench: bool = True
    threads: int | None = None
    tolerance: float = 1e-4
    allow_approx: bool = False
    calib: str | None = None
    max_error: float = 1e-2
    preln_form: str = "rmsnorm"
    ort_rms_op: str = "simplified"


@dataclass
class Result:
    original: onnx.ModelProto
    optimized: onnx.ModelProto
    floor: onnx.ModelProto
    report: dict
    bench: object = None
    loaded: Loaded | None = None
    specs: list[InputSpec] = field(default_factory=list)


Progress = Callable[[str, float | None], None]


def _noop(stage: str, fraction: float | None = None) -> None:
    pass


def prepare(path: str, opts: Options, progress: Progress = _noop) -> tuple[Loaded, onnx.ModelProto, list[str]]:
    """load + export: the original model as ONNX with canonical nodes and function bodies."""
    progress("load", None)
    loaded = load(path, opts.inputs, opts.trust_pickle)
    progress("export", None)
    original, notes = to_onnx(loaded, opts.opset)
    if loaded.kind != "onnx":
        loaded.inputs = _specs_after_export(original, loaded.inputs, notes)
    return loaded, original, notes


def _specs_after_export(model: onnx.ModelProto, specs: list[InputSpec], notes: list[str]) -> list[InputSpec]:
    """The exported graph is the truth: its input names, and which axes it kept dynamic.

    The exporter may rename inputs (kept in order) and may fix an axis the user wanted
    dynamic (an ExportedProgram saved without dynamic shapes, say); then the exported size wins.
    """
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    out = []
    for vi, spec in zip(graph_inputs, specs):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shape = tuple(s if d is None else d for s, d in zip(spec.shape, dims)) if len(dims) == len(spec.shape) else spec.shape
        if shape != spec.shape:
            notes.append(f"input {vi.name}: the exported model fixes its shape to {list(shape)}")
        dynamic = {i: (vi.type.tensor_type.shape.dim[i].dim_param or f"d{i}") for i, d in enumerate(dims) if d is None}
        out.append(InputSpec(vi.name, shape, spec.dtype, dynamic))
    return out


def transform(original: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, list]:
    """canonicalize + rewrite + lower; returns the lowered model and every PassResult."""
    model, results = original, []
    for stage in ("canonicalize", "rewrite", "lower"):
        if stage == "lower":
            from .lower.ort_cpu import raise_opset_for_rmsnormalization

            model, note = raise_opset_for_rmsnormalization(model, ctx)
            if note:
                ctx.options.setdefault("notes", []).append(note)
        if stage == "rewrite" and ctx.allow_approx and "calib_feeds" in ctx.options:
            from .passes.ln_free import calibrate_stds

            ctx.options["ln_stds"] = calibrate_stds(model, ctx.options["calib_feeds"])
        model, stage_results = run_stage(model, stage, ctx)
        results.extend(stage_results)
        model = infer_shapes(model)
        if stage == "canonicalize":
            model = name_norms_by_module(model)
    return model, results


def load_data(path: str, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path)
    except FileNotFoundError:
        raise InputError(f"data file {path} does not exist", "check the --data path") from None
    except Exception as e:  # noqa: BLE001
        raise InputError(f"data file {path} is not a readable .npz ({type(e).__name__})",
                         "save inputs with numpy.savez(path, input_name=array)") from None
    arrays = {k: npz[k] for k in npz.files if k not in ("label", "labels")}
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InputError(f"data file {path} has no array for input(s) {', '.join(missing)}",
                         f"its arrays are {', '.join(npz.files)}; name them after the model inputs")
    out = {}
    for s in specs:
        a = arrays[s.name]
        if a.ndim != len(s.shape) or tuple(a.shape[1:]) != tuple(s.shape[1:]):
            raise InputError(f"data for input {s.name} has shape {a.shape}, the model takes "
                             f"[N, {', '.join(map(str, s.shape[1:]))}]", "fix the data file or --input")
        out[s.name] = a.astype(np.dtype(a.dtype) if s.dtype not in ("float32",) else np.float32)
    return out


def optimize(path: str, opts: Options, progress: Progress = _noop) -> Result:
    if opts.target not in TARGETS:
        raise InputError(f"unknown target {opts.target!r}", f"choose one of {', '.join(TARGETS)}")
    if opts.target.startswith("trt-"):
        raise UnsupportedError(f"target {opts.target} is not available in this build yet",
                               "use --target ort-cpu")
    loaded, original, export_notes = prepare(path, opts, progress)
    specs = loaded.inputs
    notes = list(export_notes) + survey.validate_parameters(original)

    ctx = PassContext(target=opts.target, allow_approx=opts.allow_approx, ort_version=_ort_version(),
                      options={"preln_form": opts.preln_form, "ort_rms_op": opts.ort_rms_op})
    tolerance = opts.tolerance
    if opts.allow_approx:
        if not opts.calib:
            raise InputError("--allow-approx needs calibration inputs", "pass --calib FILE.npz with one array per model input")
        calib = load_data(opts.calib, specs)
        ctx.options["calib_feeds"] = batches(calib, 16)
        tolerance = opts.max_error
    progress("rewrite", None)
    optimized, results = transform(original, ctx)
    floor = survey.floor_model(original)

    progress("build", None)
    run_orig = OrtRunner(original, opts.target, opts.threads)
    run_opt = OrtRunner(optimized, opts.target, opts.threads)

    progress("verify", None)
    batch = opts.batch or specs[0].shape[0]
    feed = example_arrays(specs, seed=0, batch=batch)
    run_orig.check_feed(feed)
    random_feeds = [example_arrays(specs, seed=s, batch=max(batch, 4)) for s in range(4)]
    accuracies = {"random": compare(run_orig, run_opt, random_feeds, "random N(0,1), seeds 0-3")}
    if opts.allow_approx:
        accuracies["calib"] = compare(run_orig, run_opt, ctx.options["calib_feeds"], f"calibration file {opts.calib}")
    if opts.data:
        data = load_data(opts.data, specs)
        static = any(0 not in s.dynamic for s in specs)
        chunks = batches(data, specs[0].shape[0] if static else 64, drop_last=static)
        if not chunks:
            raise InputError(f"data file {opts.data} has fewer rows than the model's fixed batch {specs[0].shape[0]}",
                             "give at least one full batch")
        run_orig.check_feed(chunks[0])
        accuracies["data"] = compare(run_orig, run_opt, chunks, f"data file {opts.data}")
    fidelity = None
    if loaded.kind in ("module", "torchscript", "exported_program"):
        module = loaded.obj.module() if loaded.kind == "exported_program" else loaded.obj
        torch_runner = TorchRunner(module, run_orig.input_names, run_orig.output_names)
        fidelity = compare(torch_runner, run_orig, random_feeds[:1], "torch eager vs exported ONNX, random")
    # Approximate rewrites are judged on real inputs (calibration and --data), not on random ones.
    gated = {k: a for k, a in accuracies.items() if not (opts.allow_approx and k == "random")}
    worst = _worst(gated)
    if worst["max_rel_err"] > tolerance:
        bad = max((o for a in gated.values() for o in a.outputs), key=lambda o: o.max_rel_err)
        raise AccuracyError(f"optimized model differs from the original: output {bad.name} max relative error "
                            f"{bad.max_rel_err:.3g} > tolerance {tolerance:g}",
                            "approximate rewrites: raise --max-error or drop --allow-approx" if opts.allow_approx
                            else "report this with the model; pass --tolerance to accept it")

    bench = None
    if opts.bench:
        from .bench import interleaved

        progress("bench", 0.0)
        runners = {"original": run_orig, "optimized": run_opt, "floor": OrtRunner(floor, opts.target, opts.threads)}
        bench = interleaved(runners, feed, seconds=opts.bench_seconds, progress=lambda f: progress("bench", f))

    report = build_report(path, loaded, specs, opts, original, optimized, results, notes, accuracies, worst,
                          fidelity, bench, batch, tolerance, ctx.options.get("notes", []))
    return Result(original, optimized, floor, report, bench, loaded, specs)


def _worst(accuracies: dict[str, Accuracy]) -> dict:
    accs = list(accuracies.values())
    top1 = [a.top1_agreement for a in accs if a.top1_agreement is not None]
    return {"max_abs_err": max(a.max_abs_err for a in accs), "max_rel_err": max(a.max_rel_err for a in accs),
            "cosine_min": min(a.cosine_min for a in accs), "top1_agreement": min(top1) if top1 else None}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def build_report(path, loaded, specs, opts, original, optimized, results, notes, accuracies, worst, fidelity,
                 bench, batch, tolerance, ctx_notes=()) -> dict:
    latency = None
    if bench is not None:
        lo, hi = bench.ratio_interval("original", "optimized")
        latency = {name: t.to_json() for name, t in bench.timings.items()}
        latency.update({
            "speedup": bench.ratio("original", "optimized"),
            "speedup_ci95": [lo, hi],
            "norm_cost_left": bench.norm_cost_left(),
            "method": "interleaved rounds after warm-up; speedup = p50(original) / p50(optimized)",
            "batch": batch, "threads": bench.threads, "machine": bench.machine,
        })
    for r in results:
        notes.extend(r.notes)
    notes.extend(ctx_notes)
    return {
        "normdeploy_version": __version__,
        "target": opts.target,
        "input": {"path": path, "kind": loaded.kind, "inputs": [s.to_json() for s in specs]},
        "passes": [r.to_json() for r in results],
        "norm_nodes": {"before": survey.count_by_kind(original), "after": survey.count_by_kind(optimized)},
        "accuracy": {**worst, "tolerance": tolerance, "exact_only": all(r.exact for r in results if r.rewrites),
                     **{k: a.to_json() for k, a in accuracies.items()}},
        "export_fidelity": fidelity.to_json() if fidelity else None,
        "latency": latency,
        "notes": notes,
    }


def inspect_model(path: str, opts: Options, progress: Progress = _noop) -> dict:
    """Every normalization in the model (after canonicalization), its kind, and its fate.

    The fate is read from a dry run of the rewrite and lower stages for ``opts.target``:
    the pass that rewrote the node, or the reasons every pass gave for leaving it.
    """
    loaded, original, notes = prepare(path, opts, progress)
    ctx = PassContext(target=opts.target, allow_approx=opts.allow_approx, ort_version=_ort_version(),
                      options={"preln_form": opts.preln_form, "ort_rms_op": opts.ort_rms_op})
    progress("canonicalize", None)
    canonical, canon_results = run_stage(original, "canonicalize", ctx)
    canonical = name_norms_by_module(infer_shapes(canonical))
    progress("rewrite", None)
    rewritten, rewrite_results = run_stage(canonical, "rewrite", ctx)
    _, lower_results = run_stage(infer_shapes(rewritten), "lower", ctx)
    entries = []
    for n in survey.find_norms(canonical):
        applied, reasons = [], []
        for r in rewrite_results + lower_results:
            applied += [f"{r.name}: {w.what}" for w in r.rewrites if w.node == n.name]
            reasons += [f"{r.name}: {s.reason}" for s in r.skipped if s.node == n.name]
        recognized = [f"{r.name}: {w.what}" for r in canon_results for w in r.rewrites
                      if w.node in (n.name,) or (w.node or "").split("/", 1)[0] == n.name]
        entries.append({"node": n.name, "kind": n.kind, "op": f"{n.domain + '::' if n.domain else ''}{n.op_type}",
                        "recognized": recognized, "rewrites": applied,
                        "kept_because": [] if applied else (reasons or ["no pass applies to this kind on this target"])})
    return {"model": path, "kind": loaded.kind, "target": opts.target,
            "inputs": [s.to_json() for s in loaded.inputs], "normalizations": entries,
            "counts": survey.count_by_kind(canonical), "notes": notes}
