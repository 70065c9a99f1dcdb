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
from .errors import AccuracyError, InputError
from .export import example_arrays, infer_shapes, name_norms_by_module, to_onnx
from .load import InputSpec, Loaded, load
from .passes import PassContext, run_stage
from .verify import Accuracy, batches, compare

TARGETS = ("ort-cpu", "ort-cuda", "ort-trt", "trt-fp32", "trt-fp16", "trt-bf16")
CLI_TARGETS = TARGETS + ("auto",)


@dataclass
class Options:
    target: str = "ort-cpu"
    inputs: tuple[str, ...] = ()
    data: str | None = None
    trust_pickle: bool = False
    opset: int = 20
    batch: str | int | None = None  # N or MIN:OPT:MAX; latency is measured at OPT
    bench_seconds: float = 3.0
    bench: bool = True
    threads: int | None = None
    tolerance: float = 1e-4
    allow_approx: bool = False
    calib: str | None = None
    max_error: float = 1e-2
    preln_form: str = "rmsnorm"
    ort_rms_op: str = "simplified"
    # TensorRT targets (DESIGN.md section 4)
    lower_only: bool = False
    io_dtype: str = "fp32"
    workspace: str | None = None
    opt_level: int | None = None
    hardware_compat: str = "none"
    timing_cache: str | None = None
    # ONNX Runtime targets
    fp16: bool = False  # ort-*: run the optimized model in fp16 (normalization statistics stay fp32)
    engine_cache: str | None = None  # ort-trt: TensorRT engine and timing cache directory


@dataclass
class Result:
    original: onnx.ModelProto
    optimized: onnx.ModelProto
    floor: onnx.ModelProto
    report: dict
    bench: object = None
    loaded: Loaded | None = None
    specs: list[InputSpec] = field(default_factory=list)
    plan: bytes | None = None  # the serialized TensorRT engine (trt-* targets, not --lower-only)


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


def transform(original: onnx.ModelProto, ctx: PassContext,
              stages: tuple[str, ...] = ("canonicalize", "rewrite", "lower")) -> tuple[onnx.ModelProto, list]:
    """Run ``stages`` (default: canonicalize + rewrite + lower); returns the model and every PassResult."""
    model, results = original, []
    for stage in stages:
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


def resolve_target(opts: Options) -> str:
    """``auto`` -> trt-fp16 where TensorRT and a GPU are present, else ort-cpu; check the target's flags."""
    from . import trt_build

    target = trt_build.auto_target() if opts.target == "auto" else opts.target
    if target not in TARGETS:
        raise InputError(f"unknown target {opts.target!r}", f"choose one of {', '.join(CLI_TARGETS)}")
    if target.startswith("trt-"):
        if not opts.lower_only:
            trt_build.require(target)  # one line naming what is missing, before any work
    elif opts.lower_only:
        raise InputError(f"--lower-only prepares models for TensorRT; target {target} has nothing to lower for",
                         "use --target trt-fp16 (or trt-fp32, trt-bf16), or drop --lower-only")
    if opts.fp16 and not target.startswith("ort-"):
        raise InputError(f"--fp16 is for the ONNX Runtime targets, not {target}",
                         "TensorRT targets take their precision from the target name: --target trt-fp16")
    if opts.io_dtype != "fp32" and target not in ("trt-fp16", "trt-bf16"):
        raise InputError(f"--io-dtype {opts.io_dtype} needs an fp16 or bf16 target, not {target}",
                         "use --target trt-fp16 / trt-bf16, or drop --io-dtype")
    return target


def data_feeds(path: str, specs: list[InputSpec]) -> list[dict[str, np.ndarray]]:
    """``--data`` in batches: of 64 rows, or of the model's fixed batch (an incomplete last one dropped)."""
    data = load_data(path, specs)
    static = any(0 not in s.dynamic for s in specs)
    chunks = batches(data, specs[0].shape[0] if static else 64, drop_last=static)
    if not chunks:
        raise InputError(f"data file {path} has fewer rows than the model's fixed batch {specs[0].shape[0]}",
                         "give at least one full batch")
    return chunks


def optimize(path: str, opts: Options, progress: Progress = _noop) -> Result:
    from . import trt_build

    target = resolve_target(opts)
    batch_range = trt_build.parse_batch(opts.batch)
    loaded, original, export_notes = prepare(path, opts, progress)
    specs = loaded.inputs
    notes = list(export_notes) + survey.validate_parameters(original)

    ctx = PassContext(target=target, allow_approx=opts.allow_approx, ort_version=_ort_version(),
                      options={"preln_form": opts.preln_form, "ort_rms_op": opts.ort_rms_op})
    tolerance = opts.tolerance
    if opts.allow_approx:
        if not opts.calib:
            raise InputError("--allow-approx needs calibration inputs", "pass --calib FILE.npz with one array per model input")
        calib = load_data(opts.calib, specs)
        ctx.options["calib_feeds"] = batches(calib, 16)
        tolerance = opts.max_error
    progress("canonicalize", None)
    canonical, results = transform(original, ctx, ("canonicalize",))
    progress("rewrite", None)
    optimized, more = transform(canonical, ctx, ("rewrite", "lower"))
    results += more
    # counted and floored after canonicalization, so that decomposed normalizations count too
    floor = survey.floor_model(canonical)

    batch = batch_range[1] if batch_range else specs[0].shape[0]
    if target.startswith("trt-"):
        return _optimize_trt(path, opts, target, batch, batch_range, loaded, original, canonical, optimized, floor,
                             results, notes, ctx, tolerance, progress)

    providers = None
    if target in ("ort-cuda", "ort-trt"):
        providers = trt_build.ort_providers(target, cache_dir=opts.engine_cache, workspace_bytes=trt_build.parse_size(
            opts.workspace), opt_level=opts.opt_level, hardware_compat=opts.hardware_compat)
    if opts.fp16:
        from . import precision

        optimized = precision.convert_precision(optimized, "fp16")
        tolerance = max(tolerance, 1e-2)
        notes.append("--fp16: the optimized model runs in fp16 with normalization statistics in fp32; the original "
                     f"stays fp32, so the speedup includes the precision change; accuracy tolerance {tolerance:g}")

    progress("build", None)
    run_orig = OrtRunner(original, target, opts.threads, providers=providers)
    run_opt = OrtRunner(optimized, target, opts.threads, providers=providers)
    progress("verify", None)
    accuracies, worst, fidelity = verify(run_orig, run_opt, loaded, opts, ctx, batch, tolerance)

    bench = None
    if opts.bench:
        from .bench import interleaved

        progress("bench", 0.0)
        runners = {"original": run_orig, "optimized": run_opt,
                   "floor": OrtRunner(floor, target, opts.threads, providers=providers)}
        feed = example_arrays(loaded.inputs, seed=0, batch=batch)
        bench = interleaved(runners, feed, seconds=opts.bench_seconds, progress=lambda f: progress("bench", f))

    report = build_report(path, loaded, target, canonical, optimized, results, notes, accuracies, worst,
                          fidelity, bench_latency(bench, batch), tolerance, ctx.options.get("notes", []))
    report["batch_range"] = list(batch_range) if batch_range else None
    return Result(original, optimized, floor, report, bench, loaded, loaded.inputs)


def verify(run_orig, run_opt, loaded: Loaded, opts: Options, ctx: PassContext, batch: int, tolerance: float,
           label: str = "") -> tuple[dict[str, Accuracy], dict, Accuracy | None]:
    """Compare two runners on random inputs, calibration inputs and ``--data``; refuse above ``tolerance``.

    Also measures export fidelity (torch eager against the exported ONNX) for torch inputs.
    Approximate rewrites are judged on real inputs (calibration, data), not on random ones.
    """
    specs = loaded.inputs
    run_orig.check_feed(example_arrays(specs, seed=0, batch=batch))
    random_feeds = [example_arrays(specs, seed=s, batch=max(batch, 4)) for s in range(4)]
    accuracies = {"random": compare(run_orig, run_opt, random_feeds, f"random N(0,1), seeds 0-3{label}")}
    if opts.allow_approx:
        accuracies["calib"] = compare(run_orig, run_opt, ctx.options["calib_feeds"], f"calibration file {opts.calib}")
    if opts.data:
        chunks = data_feeds(opts.data, specs)
        run_orig.check_feed(chunks[0])
        accuracies["data"] = compare(run_orig, run_opt, chunks, f"data file {opts.data}{label}")
    fidelity = None
    if loaded.kind in ("module", "torchscript", "exported_program"):
        module = loaded.obj.module() if loaded.kind == "exported_program" else loaded.obj
        torch_runner = TorchRunner(module, run_orig.input_names, run_orig.output_names)
        fidelity = compare(torch_runner, run_orig, random_feeds[:1], "torch eager vs exported ONNX, random")
    gated = {k: a for k, a in accuracies.items() if not (opts.allow_approx and k == "random")}
    worst = _worst(gated)
    if worst["max_rel_err"] > tolerance:
        bad = max((o for a in gated.values() for o in a.outputs), key=lambda o: o.max_rel_err)
        raise AccuracyError(f"optimized model differs from the original: output {bad.name} max relative error "
                            f"{bad.max_rel_err:.3g} > tolerance {tolerance:g}",
                            "approximate rewrites: raise --max-error or drop --allow-approx" if opts.allow_approx
                            else "report this with the model; pass --tolerance to accept it")
    return accuracies, worst, fidelity


def bench_latency(bench, batch: int) -> dict | None:
    """The ``latency`` block of report.json from an interleaved run (None when not measured)."""
    if bench is None:
        return None
    lo, hi = bench.ratio_interval("original", "optimized")
    latency = {name: t.to_json() for name, t in bench.timings.items()}
    latency.update({
        "speedup": bench.ratio("original", "optimized"),
        "speedup_ci95": [lo, hi],
        "norm_cost_left": bench.norm_cost_left(),
        "method": "interleaved rounds after warm-up; speedup = p50(original) / p50(optimized)",
        "batch": batch, "threads": bench.threads, "machine": bench.machine,
    })
    return latency


def _optimize_trt(path, opts, target, batch, batch_range, loaded, original, canonical, lowered, floor, results, notes,
                  ctx, tolerance, progress) -> Result:
    """trt-*: verify the lowering exactly in fp32, convert precision, then build and time the engine on a GPU.

    The fp32 lowering is checked on ONNX Runtime with each plugin op run as its fp32 function
    body (:func:`normdeploy.precision.plugins_as_functions`); the fp16/bf16 conversion is
    measured against that fp32 graph and reported with the node where its error arises
    (:func:`normdeploy.precision.precision_error_report`). ``--lower-only`` stops there and
    writes the converted ONNX for a GPU host.
    """
    import tempfile

    from . import precision, trt_build

    specs = loaded.inputs
    progress("verify", None)
    run_orig = OrtRunner(original, "ort-cpu", opts.threads)
    emulated = OrtRunner(precision.plugins_as_functions(lowered), "ort-cpu", opts.threads)
    accuracies, worst, fidelity = verify(run_orig, emulated, loaded, opts, ctx, batch, tolerance,
                                         label=" (fp32 trt lowering, plugins as function bodies)")
    progress("precision", None)
    converted, prec = precision.convert_for_target(lowered, target, opts.io_dtype,
                                                   feeds=example_arrays(specs, seed=0, batch=batch))
    plan, latency, build_info = None, None, None
    if opts.lower_only:
        notes.append(f"--lower-only: model.onnx is the {target} input of TensorRT's ONNX parser (plugin nodes, "
                     f"{prec['precision'].get('dtype', 'fp32')}); no engine was built and no latency measured here")
    else:
        progress("build", None)
        with tempfile.TemporaryDirectory(prefix="normdeploy-trt-") as d:
            onnx_path, plan_path = f"{d}/model.onnx", f"{d}/model.plan"
            onnx.save(converted, onnx_path)
            profiles = trt_build.make_profiles(converted, batch_range, {s.name: s.shape for s in specs})
            build_info = trt_build.build_engine(onnx_path, plan_path, profiles, trt_build.parse_size(opts.workspace),
                                                opts.timing_cache, trt_build.check_opt_level(opts.opt_level),
                                                opts.hardware_compat)
            with open(plan_path, "rb") as f:
                plan = f.read()
        engine = trt_build.EngineRunner(plan)
        progress("verify", None)
        feed = example_arrays(specs, seed=0, batch=batch)
        accuracies["engine"] = compare(run_orig, engine, [feed], f"TensorRT engine ({target}) vs original on ONNX Runtime")
        if opts.bench:
            progress("bench", None)
            latency = {"optimized": engine.measure(feed, seconds=opts.bench_seconds), "batch": batch,
                       "method": "CUDA events around each execute_async_v3 after warm-up",
                       "original": None, "speedup": None,
                       "note": "the original has no TensorRT engine to compare with; compare against --target ort-cuda"}
    report = build_report(path, loaded, target, canonical, converted, results, notes, accuracies, worst, fidelity,
                          latency, tolerance, ctx.options.get("notes", []))
    report["precision"] = prec
    report["engine"] = build_info.to_json() if build_info else None
    report["batch_range"] = list(batch_range) if batch_range else None
    return Result(original, converted, floor, report, None, loaded, specs, plan)


def _worst(accuracies: dict[str, Accuracy]) -> dict:
    accs = list(accuracies.values())
    top1 = [a.top1_agreement for a in accs if a.top1_agreement is not None]
    return {"max_abs_err": max(a.max_abs_err for a in accs), "max_rel_err": max(a.max_rel_err for a in accs),
            "cosine_min": min(a.cosine_min for a in accs), "top1_agreement": min(top1) if top1 else None}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def build_report(path, loaded, target, canonical, optimized, results, notes, accuracies, worst, fidelity,
                 latency, tolerance, ctx_notes=()) -> dict:
    for r in results:
        notes.extend(r.notes)
    notes.extend(ctx_notes)
    return {
        "normdeploy_version": __version__,
        "target": target,
        "input": {"path": path, "kind": loaded.kind, "inputs": [s.to_json() for s in loaded.inputs]},
        "passes": [r.to_json() for r in results],
        "norm_nodes": {"before": survey.count_by_kind(canonical), "after": survey.count_by_kind(optimized)},
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
