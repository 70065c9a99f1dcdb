"""The pipeline: load -> export -> canonicalize -> rewrite -> lower -> build -> verify/bench -> package.

This module holds the order of the stages and the one table of steps per target
(:func:`pass_table`), and runs them in one place, :func:`transform`, which every command
goes through: :func:`optimize` (then verify, build and time), :func:`inspect` (report
what the transform did to each normalization) and :func:`measure` (the ``bench`` and
``gate`` commands). No stage imports this module or a later stage.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import onnx
import onnx_ir as ir

from .bench.floor import floor_model
from .bench.timing import MIN_ROUNDS_FOR_INTERVAL, handover_text
from .build import OrtRunner, Recorded, TorchRunner, make_runner, runtime_cause, runtime_name
from .canonicalize.dyt import recognize_dyt
from .canonicalize.groupnorm import recognize_groupnorm
from .canonicalize.crmsnorm import recognize_crmsnorm
from .canonicalize.layernorm import recognize_layernorm
from .canonicalize.leftovers import describe_normalizations, find_leftovers
from .canonicalize.naming import name_norms_after_modules
from .canonicalize.noop_casts import remove_noop_casts
from .canonicalize.powernorm import recognize_powernorm
from .canonicalize.rmsnorm import recognize_rmsnorm
from .canonicalize.scalenorm import recognize_scalenorm
from .canonicalize.unified_norm import recognize_unified_norm
from .core import norms
from .core.errors import InputError, NormdeployError
from .core.graph import LARGE_MODEL_BYTES, infer_shapes, signature, to_proto, weight_bytes
from .core.inputs import InputSpec, example_arrays
from .core.passes import ModelStep, Pass, PassContext, PassResult, Step, run_steps
from .core import store
from .core.profile import StageProfile, peak_rss_bytes
from .core.store import TensorStore, release_mappings, spilling
from .core.version import __version__
from .export import to_onnx
from .load import Loaded, load
from .lower.cleanup import clean_up_graph
from .lower.groupnorm import lower_groupnorm_to_instance_norm
from .lower.openvino import inline_canonical_functions
from .lower.ort import ORT_TARGETS, lower_canonical_to_standard_ops, raise_opset_for_rmsnormalization
from .lower.skip_norm import fuse_residual_add_into_norm
from .lower.trt import lower_to_trt_plugins
from .options import CLI_TARGETS, TARGETS, Options
from .rewrite.fold_affine import fold_affine_into_linear
from .rewrite.fold_mpbn import fold_mpbn_into_threshold
from .rewrite.ln_free import calibrate_layernorm_std, ln_free
from .rewrite.preln_to_crmsnorm import preln_to_crmsnorm
from .rewrite.preln_to_rmsnorm import preln_to_rmsnorm
from .verify import Accuracy, batches, check_tolerance, compare, input_sets, load_data, worst

__all__ = ["STAGES", "pass_table", "transform", "optimize", "inspect", "measure", "Result", "Transformed",
           "TARGETS", "CLI_TARGETS"]

# ----------------------------------------------------------------------------- the pass tables

STAGES = ("canonicalize", "rewrite", "lower")

CANONICALIZE: tuple[Step, ...] = (
    Pass("recognize_layernorm", recognize_layernorm),
    Pass("recognize_scalenorm", recognize_scalenorm),  # before RMSNorm: sqrt(mean(x^2)) clamped is ScaleNorm's
    Pass("recognize_unified_norm", recognize_unified_norm),  # before PowerNorm, which joins its running-phi affine
    Pass("recognize_powernorm", recognize_powernorm),  # before RMSNorm: the group mean of squares is GroupScaling's
    Pass("recognize_rmsnorm", recognize_rmsnorm),
    Pass("recognize_crmsnorm", recognize_crmsnorm),
    Pass("recognize_dyt", recognize_dyt),
    Pass("recognize_groupnorm", recognize_groupnorm),  # reports GroupNorm / EvoNorm; rewrites nothing
    ModelStep("remove_noop_casts", remove_noop_casts),  # before the rewrites: a no-op Cast on a Pre-LN stream
    ModelStep("name_norms_after_modules", name_norms_after_modules),
)
REWRITE: tuple[Step, ...] = (
    ModelStep("calibrate_layernorm_std", calibrate_layernorm_std, exact=False,
              when=lambda ctx: ctx.calib_feeds is not None),
    Pass("ln_free", ln_free, exact=False),
    Pass("preln_to_crmsnorm", preln_to_crmsnorm, when=lambda ctx: ctx.preln_form == "crmsnorm"),
    Pass("preln_to_rmsnorm", preln_to_rmsnorm),
    Pass("fold_mpbn_into_threshold", fold_mpbn_into_threshold),
    Pass("fold_affine_into_linear", fold_affine_into_linear),
)
LOWER_ORT: tuple[Step, ...] = (
    ModelStep("raise_opset_for_rmsnormalization", raise_opset_for_rmsnormalization,
              when=lambda ctx: ctx.ort_rms_op == "standard"),
    Pass("lower_groupnorm_to_instance_norm", lower_groupnorm_to_instance_norm),
    Pass("lower_canonical_to_standard_ops", lower_canonical_to_standard_ops),
    ModelStep("clean_up_graph", clean_up_graph, when=lambda ctx: ctx.cleanup and ctx.target in ORT_TARGETS),
    ModelStep("fuse_residual_add_into_norm", fuse_residual_add_into_norm,  # after the clean-up: it reads shapes
              when=lambda ctx: ctx.ort_fusions and ctx.target == "ort-cpu"),
)
#: the lower-stage steps the floor gets too, so that optimized and floor are cleaned alike and the share of
#: normalization cost left stays comparable (a floor left uncleaned could be slower than the optimized model)
FLOOR_STEPS: tuple[Step, ...] = tuple(s for s in LOWER_ORT if s.name == "clean_up_graph")
LOWER_TRT: tuple[Step, ...] = (
    Pass("lower_to_trt_plugins", lower_to_trt_plugins),
)
#: openvino: ONNX Runtime's lowering with RMSNorm decomposed (lower.ort.rms_form), then no local function left
LOWER_OPENVINO: tuple[Step, ...] = (
    Pass("lower_groupnorm_to_instance_norm", lower_groupnorm_to_instance_norm),
    Pass("lower_canonical_to_standard_ops", lower_canonical_to_standard_ops),
    ModelStep("inline_canonical_functions", inline_canonical_functions),
)


def pass_table(target: str) -> dict[str, tuple[Step, ...]]:
    """Every step of every stage for ``target``, in run order."""
    lower = LOWER_TRT if target.startswith("trt-") else LOWER_OPENVINO if target == "openvino" else LOWER_ORT
    return {"canonicalize": CANONICALIZE, "rewrite": REWRITE, "lower": lower}


def step(name: str) -> Step:
    """The step called ``name`` in any table."""
    for s in CANONICALIZE + REWRITE + LOWER_ORT + LOWER_TRT + LOWER_OPENVINO:
        if s.name == name:
            return s
    raise KeyError(name)


def run_stage(model: onnx.ModelProto, stage: str, ctx: PassContext) -> tuple[onnx.ModelProto, list[PassResult]]:
    """One stage of ``ctx.target``'s table on a ModelProto (tests, benchmarks); :func:`transform` runs them all."""
    m = ir.from_proto(model)
    results = run_steps(m, pass_table(ctx.target)[stage], ctx)
    return ir.to_proto(m), results


Progress = Callable[[str, float | None], None]


def _noop(stage: str, fraction: float | None = None) -> None:
    pass


# ----------------------------------------------------------------------------- load + export

class Prepared(NamedTuple):
    """The original model as an in-memory ONNX model (canonical nodes, function bodies), with what it takes."""

    loaded: Loaded
    original: ir.Model
    notes: list[str]

    @property
    def specs(self) -> list[InputSpec]:
        return self.loaded.inputs


def prepare(source, options: Options, progress: Progress = _noop) -> Prepared:
    """load + export; then the exported graph says what the inputs are called and which axes are dynamic."""
    progress("load", None)
    loaded = load(source, options.export.inputs, options.export.trust_pickle)
    progress("export", None)
    original, notes = to_onnx(loaded, options.export.opset)
    if loaded.kind != "onnx":
        loaded.inputs = _specs_after_export(original, loaded.inputs, notes)
    return Prepared(loaded, original, notes)


def _specs_after_export(model: ir.Model, specs: list[InputSpec], notes: list[str]) -> list[InputSpec]:
    """The exported graph is the truth: its input names, and which axes it kept dynamic.

    The exporter may rename inputs (kept in order) and may fix an axis the user wanted
    dynamic (an ExportedProgram saved without dynamic shapes, say); then the exported size wins.
    """
    graph_inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    out = []
    for v, spec in zip(graph_inputs, specs):
        dims = [d if isinstance(d, int) else None for d in (v.shape or [])]
        names = [None if isinstance(d, int) else getattr(d, "value", None) for d in (v.shape or [])]
        shape = tuple(s if d is None else d for s, d in zip(spec.shape, dims)) if len(dims) == len(spec.shape) else spec.shape
        if shape != spec.shape:
            notes.append(f"input {v.name}: the exported model fixes its shape to {list(shape)}")
        dynamic = {i: (names[i] or f"d{i}") for i, d in enumerate(dims) if d is None}
        out.append(InputSpec(v.name, shape, spec.dtype, dynamic))
    return out


# ----------------------------------------------------------------------------- canonicalize + rewrite + lower

def context(target: str, options: Options, specs: list[InputSpec]) -> PassContext:
    """The typed context every step reads; calibration inputs are loaded here (``--calib``)."""
    import onnxruntime

    rw = options.rewrite
    calib = None
    if rw.allow_approx and rw.calib:
        calib = batches(load_data(rw.calib, specs), 16)
    return PassContext(target=target, allow_approx=rw.allow_approx, ort_version=onnxruntime.__version__,
                       preln_form=rw.preln_form, ort_rms_op=options.ort.rms_op, cleanup=options.ort.cleanup,
                       ort_fusions=options.ort.ort_fusions, ort_short_row=options.ort.short_row, calib_feeds=calib)


def _as_proto(model):
    return to_proto(model)


@dataclass
class Transformed:
    """What :func:`transform` made of an original: in-memory models that share unchanged weights.

    ``canonical_model``: after canonicalize, what normalizations are there (counted, floored);
    ``optimized_model``: after rewrite and lower for the target; ``floor_model``: the canonical
    model with every normalization replaced by Identity, then (ort-* targets, ``--cleanup``) given the same
    graph clean-up as the optimized model (:data:`FLOOR_STEPS`). ``.canonical``, ``.optimized`` and
    ``.floor`` are ``onnx.ModelProto`` copies, for models under 2 GB.
    """

    canonical_model: ir.Model
    optimized_model: ir.Model
    floor_model: ir.Model
    results: list[PassResult]

    @functools.cached_property
    def canonical(self) -> onnx.ModelProto:
        return to_proto(self.canonical_model)

    @functools.cached_property
    def optimized(self) -> onnx.ModelProto:
        return to_proto(self.optimized_model)

    @functools.cached_property
    def floor(self) -> onnx.ModelProto:
        return to_proto(self.floor_model)


def transform(original, ctx: PassContext, until: str = "lower", progress: Progress = _noop) -> Transformed:
    """Run the stages of :func:`pass_table` up to and including ``until`` on a copy of ``original``.

    ``original`` (an ``onnx_ir.Model`` or an ``onnx.ModelProto``) is left as it is; the copy
    shares its weight tensors, and a rewrite makes new tensors for what it changes (for a
    large model they are spilled to a file as they are made, and the memory maps of the
    weights each step read are closed after it: :mod:`normdeploy.core.store`). Shapes are
    re-inferred after each stage; a failed inference is a note of the stage's last step.
    """
    table = pass_table(ctx.target)
    model = ir.from_proto(original) if isinstance(original, onnx.ModelProto) else original.clone()
    results, canonical = [], None
    spill = new_store(model)

    def release() -> None:  # every model that may share a tensor the step read
        for m in (original, canonical, model):
            if isinstance(m, ir.Model):
                release_mappings(m)

    with spilling(spill):
        for stage in STAGES:
            progress(stage, None)
            stage_results = run_steps(model, table[stage], ctx, release if spill is not None else None)
            results.extend(stage_results)
            failure = infer_shapes(model)
            if failure and stage_results:
                stage_results[-1].notes.append(f"after the {stage} stage: {failure}")
            if stage == "canonicalize":
                canonical = model.clone()
            if stage == until:
                break
    floor = floor_model(canonical)
    if table["lower"] is LOWER_ORT:  # also for until="canonicalize": `bench --optimized` times this floor
        run_steps(floor, FLOOR_STEPS, ctx)  # cleaned as the optimized model is; its notes are not reported
    release()
    return Transformed(canonical, model, floor, results)


def new_store(model: ir.Model) -> TensorStore | None:
    """A tensor store for the new weights of ``model``'s rewrites when it is large (:mod:`normdeploy.core.store`)."""
    return TensorStore() if weight_bytes(model) > store.SPILL_MODEL_BYTES else None


# ----------------------------------------------------------------------------- optimize

@dataclass
class Result:
    """The outcome of :func:`optimize`: the models, the report, and how to write them out.

    ``original_model`` / ``optimized_model`` / ``floor_model`` are the in-memory
    ``onnx_ir.Model`` s (sharing unchanged weights); ``.original`` / ``.optimized`` /
    ``.floor`` give ``onnx.ModelProto`` copies, for models under 2 GB (use :meth:`save`
    for larger ones).
    """

    original_model: ir.Model
    optimized_model: ir.Model
    floor_model: ir.Model
    report: dict
    bench: object = None
    loaded: Loaded | None = None
    specs: list[InputSpec] = field(default_factory=list)
    plan: bytes | None = None  # the serialized TensorRT engine (trt-* targets, not --lower-only)

    @functools.cached_property
    def original(self) -> onnx.ModelProto:
        return _as_proto(self.original_model)

    @functools.cached_property
    def optimized(self) -> onnx.ModelProto:
        return _as_proto(self.optimized_model)

    @functools.cached_property
    def floor(self) -> onnx.ModelProto:
        return _as_proto(self.floor_model)

    def save(self, out: str, force: bool = False, triton_repo: str | None = None,
             triton_backend: str = "default") -> str:
        """Write the output directory (DESIGN.md section 7), all or nothing; returns its path.

        ``triton_backend="python"`` writes the Triton entry for the Python backend (ONNX Runtime
        inside Triton, what PyPI's tritonserver serves) instead of ONNX Runtime's or TensorRT's.
        """
        from .package import write

        return write(out, self, force=force, triton_repo=triton_repo, triton_backend=triton_backend)


def resolve_target(options: Options) -> str:
    """``auto`` -> trt-fp16 where TensorRT and a GPU are present, else ort-cpu; check the target's flags."""
    from .build import trt as trt_build

    target = trt_build.auto_target() if options.target == "auto" else options.target
    if target not in TARGETS:
        raise InputError(f"unknown target {options.target!r}", f"choose one of {', '.join(CLI_TARGETS)}")
    if target.startswith("trt-"):
        if not options.trt.lower_only:
            trt_build.require(target)  # one line naming what is missing, before any work
    elif options.trt.lower_only:
        raise InputError(f"--lower-only prepares models for TensorRT; target {target} has nothing to lower for",
                         "use --target trt-fp16 (or trt-fp32, trt-bf16), or drop --lower-only")
    if target == "openvino":
        from .build import openvino as ov_build

        if options.ort.fp16:
            raise InputError("--fp16 is for the ONNX Runtime targets, not openvino",
                             "target openvino runs at f32 (exact); use --target ort-cpu --fp16 or --target trt-fp16")
        if options.ort.rms_op != "simplified":
            raise InputError(f"--ort-rms-op {options.ort.rms_op} is for the ONNX Runtime targets, not openvino",
                             "drop --ort-rms-op: target openvino writes RMSNorm as standard ops OpenVINO fuses")
        ov_build.require()
    if options.ort.fp16 and not target.startswith("ort-"):
        raise InputError(f"--fp16 is for the ONNX Runtime targets, not {target}",
                         "TensorRT targets take their precision from the target name: --target trt-fp16")
    if options.trt.io_dtype != "fp32" and target not in ("trt-fp16", "trt-bf16"):
        raise InputError(f"--io-dtype {options.trt.io_dtype} needs an fp16 or bf16 target, not {target}",
                         "use --target trt-fp16 / trt-bf16, or drop --io-dtype")
    return target


@dataclass
class _Run:
    """One optimize run, as its stages hand it on."""

    source: object
    options: Options
    target: str
    batch: int
    batch_range: tuple[int, int, int] | None
    prepared: Prepared
    transformed: Transformed
    ctx: PassContext
    tolerance: float
    notes: list[str]
    worst: dict = field(default_factory=dict)  # the worst accuracy figures over the gated input sets
    nothing: str | None = None  # why no step changed anything (:func:`nothing_to_rewrite`), or None


#: the default accuracy tolerance (max relative error) by the float type a model computes in: an
#: exact rewrite changes only rounding, and rounding grows with the type's unit roundoff (float16
#: 2^-11, bfloat16 2^-8; measured: a 22-layer float16 Llama's optimized logits differ from the
#: original's by 8.2e-4, and both are equally far, 1.0e-3, from the float32 model's)
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 8e-2}


def compute_dtype(model: ir.Model) -> str:
    """The float type most of ``model``'s float weight bytes are in (float32 when it has none)."""
    counts = {"float32": 0, "float16": 0, "bfloat16": 0}
    names = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None and t.dtype in names:
            counts[names[t.dtype]] += int(t.nbytes)
    return max(counts, key=lambda k: (counts[k], k == "float32"))


#: the graph optimization level of verify-only sessions of a half-precision model on ort-cpu (see below)
HALF_VERIFY_LEVEL = "disable"
HALF_VERIFY_NOTE = ("the model computes in half precision and no latency run was asked for: the verification sessions "
                    "ran at ONNX Runtime graph optimization level '{level}', so that they keep the half-precision weights "
                    "instead of constant-folded float32 copies (about 3x the weights per session at the default level), "
                    "without ONNX Runtime's memory arena; both models ran so")


ONE_ALIVE_NOTE = ("latency run with one session alive at a time ({gb:.2f} GB of weights; --bench-alive): original, "
                  "optimized and floor were timed in turn in each session block, not interleaved call by call, so "
                  "that only one copy of the weights is in a session at a time; --bench-alive all interleaves them")


def bench_alive(options: Options, original: ir.Model, target: str) -> str:
    """``--bench-alive`` resolved: ``auto`` is ``one`` for models too large to hold three sessions of
    (:func:`normdeploy.bench.timing.one_session_alive`; half precision counts as such on ``ort-cpu``)."""
    if options.bench.alive != "auto":
        return options.bench.alive
    from .bench.timing import one_session_alive

    half = target == "ort-cpu" and compute_dtype(original) != "float32"
    return "one" if one_session_alive(weight_bytes(original), half) else "all"


def verify_optimization_level(original: ir.Model, target: str, timed: bool) -> str:
    """The ONNX Runtime graph optimization level of the verification sessions: ``all`` (the default) but for
    verify-only sessions of a float16/bfloat16 model on ``ort-cpu``, which get :data:`HALF_VERIFY_LEVEL`.

    Why: the CPU provider has no half-precision kernels for most ops; its InsertCastTransformer puts
    a Cast to float32 in front of them, and constant folding (part of every level but
    ``disable``) then stores a float32 copy of every weight it reaches, twice the half-precision
    bytes, next to them: a session of a 2.2 GB fp16 Llama held 6.5 GB. Without folding the Cast
    runs per call (slower, the same values: a half-to-float cast is exact). The comparison stays
    like with like (original and optimized at the same level); what differs from the default is
    only which ONNX Runtime fusions run, which is no part of normdeploy's rewrite. These sessions
    are also lean (:class:`normdeploy.build.OrtRunner`: no arena, priority order, so the per-call
    float32 casts are not all alive at once). Measured on a 2.2 GB fp16 Llama, one session's peak
    RSS: 6.4 GB at the defaults, 4.1 GB so. Timed sessions (a latency run) keep ONNX Runtime's
    defaults, and verify on them.
    """
    if timed or target != "ort-cpu" or compute_dtype(original) == "float32":
        return "all"
    return HALF_VERIFY_LEVEL


def optimize(source, options: Options | None = None, progress: Progress = _noop,
             prepared: Prepared | None = None) -> Result:
    """Every stage for ``source`` (a path, an ``nn.Module``, an ``ExportedProgram`` or an ``onnx.ModelProto``).

    The report's ``resources`` says where time and memory went: wall seconds, resident
    memory at the end and at the peak of each stage, the resident memory the process had
    before the run (``start_rss_mb``: interpreter and libraries) and the model's weight bytes.
    ``prepared``: :func:`prepare`'s result for ``source`` with these options, when the caller has it
    (:mod:`normdeploy.autotune` exports once for its candidates and the final run).
    """
    profile = StageProfile(progress)
    try:
        result = _optimize(source, options or Options(), profile, prepared)
    finally:
        stages = profile.finish()
    result.report["resources"] = {"stages": stages, "peak_rss_mb": round(peak_rss_bytes() / (1 << 20), 1),
                                  "start_rss_mb": round(profile.start_rss / (1 << 20), 1),
                                  "weights_mb": round(weight_bytes(result.original_model) / (1 << 20), 1)}
    return result


def run_tolerance(options: Options, original: ir.Model, notes: list[str] | None = None) -> float:
    """The run's accuracy limit (max relative error): ``--tolerance``, else by the model's compute dtype
    (:data:`DEFAULT_TOLERANCE`, said in ``notes``); ``--max-error`` with ``--allow-approx``."""
    tolerance = options.verify.tolerance
    if tolerance is None:
        dtype = compute_dtype(original)
        tolerance = DEFAULT_TOLERANCE[dtype]
        if dtype != "float32" and notes is not None:
            notes.append(f"the model computes in {dtype}: accuracy tolerance {tolerance:g} (a reordered sum or a "
                         f"folded weight rounds differently by about {dtype}'s precision per layer); "
                         "pass --tolerance to set another")
    if options.rewrite.allow_approx:
        if not options.rewrite.calib:
            raise InputError("--allow-approx needs calibration inputs", "pass --calib FILE.npz with one array per model input")
        tolerance = options.rewrite.max_error
    return tolerance


def _optimize(source, options: Options, progress: Progress, prepared: Prepared | None = None) -> Result:
    from .build import trt as trt_build

    target = resolve_target(options)
    batch_range = trt_build.parse_batch(options.batch)
    prepared = prepared or prepare(source, options, progress)
    specs = prepared.specs
    notes = list(prepared.notes) + norms.validate_parameters(prepared.original)
    release_mappings(prepared.original)  # the statistics it read
    tolerance = run_tolerance(options, prepared.original, notes)
    ctx = context(target, options, specs)
    transformed = transform(prepared.original, ctx, progress=progress)
    batch = batch_range[1] if batch_range else specs[0].shape[0]
    run = _Run(source, options, target, batch, batch_range, prepared, transformed, ctx, tolerance, notes,
               nothing=nothing_to_rewrite(transformed))
    if run.nothing:
        notes.append(run.nothing)
    return _optimize_trt(run, progress) if target.startswith("trt-") else _optimize_ort(run, progress)  # ort-*, openvino


def ort_providers(options: Options, target: str) -> list | None:
    """The execution providers (with their options) of ``target``'s sessions; None: :class:`OrtRunner`'s default."""
    if target not in ("ort-cuda", "ort-trt"):
        return None
    from .build import trt as trt_build

    return trt_build.ort_providers(target, cache_dir=options.ort.engine_cache,
                                   workspace_bytes=trt_build.parse_size(options.trt.workspace),
                                   opt_level=options.trt.opt_level, hardware_compat=options.trt.hardware_compat)


def lower_variant(rewritten: ir.Model, ctx: PassContext) -> tuple[ir.Model, list[PassResult]]:
    """The lower stage of ``ctx.target`` on a copy of ``rewritten`` (a :func:`transform` ``until="rewrite"``
    result's ``optimized_model``, left as it is; the copy shares its weights): one lowering of several
    from the same rewritten model (:mod:`normdeploy.autotune`)."""
    model = rewritten.clone()
    results = run_steps(model, pass_table(ctx.target)["lower"], ctx)
    failure = infer_shapes(model)
    if failure and results:
        results[-1].notes.append(f"after the lower stage: {failure}")
    return model, results


def _optimize_ort(run: _Run, progress: Progress) -> Result:
    """ort-* and openvino: verify against the original on the same runtime, then time original, optimized
    and floor on it (openvino: OpenVINO's CPU plugin at f32, :mod:`normdeploy.build.openvino`)."""
    options, target = run.options, run.target
    optimized = run.transformed.optimized_model
    providers = ort_providers(options, target)
    if options.ort.fp16:
        from .lower import precision

        with spilling(new_store(optimized)):
            optimized = precision.convert_precision(optimized, "fp16")
        release_mappings(optimized)
        run.tolerance = max(run.tolerance, 1e-2)
        run.notes.append("--fp16: the optimized model runs in fp16 with normalization statistics in fp32; the original "
                         f"stays fp32, so the speedup includes the precision change; accuracy tolerance {run.tolerance:g}")
    threads = options.bench.threads
    timed = options.bench.bench and not identical_to_original(run.nothing, options)
    if options.bench.bench and not timed:
        run.notes.append(NOT_TIMED)

    verify_level = verify_optimization_level(run.prepared.original, target, timed)
    if verify_level != "all":
        run.notes.append(HALF_VERIFY_NOTE.format(level=verify_level))
    # --ort-graph-optimization: the optimized model's and the floor's level; the original keeps ONNX Runtime's default
    level = options.ort.graph_optimization if verify_level == "all" else verify_level

    def session(model: ir.Model, graph_optimization: str = verify_level):
        if target == "openvino":
            return make_runner(model, target, threads)
        return OrtRunner(model, target, threads, providers=providers, prepack=timed,
                         graph_optimization=graph_optimization, lean=verify_level != "all")

    alive = bench_alive(options, run.prepared.original, target) if timed else "one"
    if timed and alive == "one":
        run.notes.append(ONE_ALIVE_NOTE.format(gb=weight_bytes(run.prepared.original) / 1e9))
    progress("build", None)
    run_orig = session(run.prepared.original)
    progress("verify", None)
    # one session alive at a time (no latency run, or --bench-alive one): the original's outputs are recorded,
    # then it is freed
    accuracies, fidelity, run_opt = verify(run_orig, lambda: session(optimized, level), run,
                                           keep_original=alive == "all")
    bench = None
    if timed:
        from .bench.timing import interleaved

        progress("bench", 0.0)
        floor = run.transformed.floor_model
        factories = {"original": lambda: session(run.prepared.original), "optimized": lambda: session(optimized, level),
                     "floor": lambda: session(floor, level)}
        # one alive: the original's session is closed by now, the optimized one is the first timed
        first = {"original": run_orig, "optimized": run_opt} if alive == "all" else {"optimized": run_opt}
        feed = example_arrays(run.prepared.specs, seed=0, batch=run.batch)
        # the verified sessions are the first block's; each block's sessions are closed before the next is made
        # at least the rounds an interval needs, past the time budget if need be: at more than one thread the
        # handover (~60 ms per timed call) leaves a small model's 3 s budget with fewer
        bench = interleaved(factories, feed, seconds=options.bench.seconds, warmup=options.bench.warmup, settle=1,
                            sessions=options.bench.sessions, first=first, progress=lambda f: progress("bench", f),
                            alive=alive, min_rounds=MIN_ROUNDS_FOR_INTERVAL)
    else:
        run_opt.close()
    latency = bench_latency(bench, run.batch)
    if latency is not None and level != "all" and target != "openvino":
        latency["method"] += (f"; the optimized model and the floor run at ONNX Runtime graph optimization level "
                              f"{level} (--ort-graph-optimization), the original at ONNX Runtime's default (all)")
    report = build_report(run, optimized, accuracies, fidelity, latency)
    report["runtime"] = runtime_report(target, run_opt, threads, options.ort.fp16)
    if target != "openvino":
        report["ort_session"] = ort_session(level)
    if target == "openvino":
        report["norm_nodes"]["openvino_layers"] = {"original": run_orig.layers, "optimized": run_opt.layers}
        report["notes"].append(
            "openvino: norm_nodes.after counts normalization ops in model.onnx (a decomposed RMSNorm is none); the "
            f"normalization layers OpenVINO compiled (norm_nodes.openvino_layers): original {_layers(run_orig.layers)}, "
            f"optimized {_layers(run_opt.layers)}")
    if bench is not None and target == "openvino":
        report["latency"]["method"] = ("OpenVINO CPU plugin (f32, LATENCY hint, one compiled model per input shape); "
                                       + report["latency"]["method"])
    return Result(run.prepared.original, optimized, run.transformed.floor_model, report, bench, run.prepared.loaded,
                  run.prepared.specs)


#: ``--ort-graph-optimization`` -> ONNX Runtime's ``GraphOptimizationLevel`` name
ORT_LEVEL_NAMES = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                   "all": "ORT_ENABLE_ALL"}


def ort_session(level: str) -> dict:
    """report.json's ``ort_session``: the session settings model.onnx was verified and timed with, which a
    server must set too (the Triton entry carries the level: :data:`normdeploy.package.triton.TRITON_GRAPH_LEVEL`)."""
    from .package.triton import TRITON_GRAPH_LEVEL

    return {"graph_optimization": level, "graph_optimization_level": ORT_LEVEL_NAMES[level],
            "triton_graph_level": TRITON_GRAPH_LEVEL[level],
            "flag": f"--ort-graph-optimization {level}"}


def _optimize_trt(run: _Run, progress: Progress) -> Result:
    """trt-*: verify the lowering exactly in fp32, convert precision, then build, verify and time engines on a GPU.

    The fp32 lowering is checked on ONNX Runtime with each plugin op run as its fp32 function
    body (:func:`normdeploy.verify.precision.plugins_as_functions`); the fp16/bf16 conversion is
    measured against that fp32 graph and reported with the node where its error arises
    (:func:`normdeploy.verify.precision.precision_error_report`). ``--lower-only`` stops there and
    writes the converted ONNX for a GPU host. Otherwise the engine is compared with the original
    on every input set the lowering was (random seeds, calibration, ``--data``), fed in batches its
    profile accepts, and refused above :func:`normdeploy.build.trt.engine_tolerance`; then the
    original and the floor, exported, given the same precision conversion and the same profiles,
    are built as TensorRT engines too, and all three are timed interleaved on the GPU.
    """
    import tempfile

    from .bench.timing import BenchResult, Timing, machine_info
    from .build import trt as trt_build
    from .core import errors
    from .lower import precision
    from .verify.precision import plugins_as_functions, precision_error_report

    options, target, specs = run.options, run.target, run.prepared.specs
    lowered = run.transformed.optimized_model
    progress("verify", None)
    run_orig = OrtRunner(run.prepared.original, "ort-cpu", options.bench.threads, prepack=False)
    accuracies, fidelity, emulated = verify(
        run_orig, lambda: OrtRunner(plugins_as_functions(lowered), "ort-cpu", options.bench.threads, prepack=False),
        run,
        label=" (fp32 trt lowering, plugins as function bodies)", keep_original=not options.trt.lower_only)
    emulated.close()
    progress("precision", None)
    with spilling(new_store(lowered)):
        converted, prec = precision.convert_for_target(lowered, target, options.trt.io_dtype)
    release_mappings(converted)
    if converted is not lowered:
        if weight_bytes(lowered) <= LARGE_MODEL_BYTES:
            prec["accuracy"] = precision_error_report(lowered, converted, example_arrays(specs, seed=0, batch=run.batch))
        else:
            run.notes.append(f"{target}: the precision error report runs every tensor of the model on CPU; skipped "
                             f"for {weight_bytes(lowered) / 2**30:.1f} GiB of weights")
    plan, latency, build_info, bench = None, None, None, None
    if options.trt.lower_only:
        run.notes.append(f"--lower-only: model.onnx is the {target} input of TensorRT's ONNX parser (plugin nodes, "
                         f"{prec['precision'].get('dtype', 'fp32')}); no engine was built and no latency measured here")
    else:
        progress("build", None)
        profiles = trt_build.make_profiles(signature(converted), run.batch_range, {s.name: s.shape for s in specs})
        build_args = (profiles, trt_build.parse_size(options.trt.workspace), options.trt.timing_cache,
                      trt_build.check_opt_level(options.trt.opt_level), options.trt.hardware_compat)

        def build(model: ir.Model, d: str, name: str):
            onnx_path = trt_build.save_onnx(model, f"{d}/{name}.onnx")  # external data past 2 GB, read by path
            info = trt_build.build_engine(onnx_path, f"{d}/{name}.plan", *build_args)
            with open(f"{d}/{name}.plan", "rb") as f:
                return f.read(), info

        with tempfile.TemporaryDirectory(prefix="normdeploy-trt-") as d:
            plan, build_info = build(converted, d, "model")
            engine = trt_build.EngineRunner(plan)
            progress("verify", None)
            limit = trt_build.engine_tolerance(target, run.tolerance)
            sets = input_sets(specs, run.batch, options.verify.data,
                              (options.rewrite.calib, run.ctx.calib_feeds) if run.ctx.calib_feeds is not None else None,
                              f" (TensorRT {target} engine)")
            in_profile = trt_build.in_profile(engine)
            engine_acc = {("engine" if k == "random" else f"engine_{k}"): compare(run_orig, in_profile, feeds, what)
                          for k, (feeds, what) in sets.items()}
            accuracies.update(engine_acc)
            check_tolerance([a for k, a in engine_acc.items() if not (options.rewrite.allow_approx and k == "engine")],
                            limit, f"the {target} engine differs from the ONNX it was built from, which matched: a "
                            "plugin kernel or TensorRT's conversion is wrong on this GPU; report it with the model, "
                            "or use --target ort-cpu")
            if options.bench.bench and identical_to_original(run.nothing, options):
                run.notes.append(NOT_TIMED)
            elif options.bench.bench:
                progress("bench", None)
                runners = {"optimized": engine}
                baselines = {
                    "original": "the exported original (its normalizations as ONNX ops)",
                    "floor": "the floor (every normalization replaced by Identity)"}
                for name, model in (("original", run.prepared.original), ("floor", run.transformed.floor_model)):
                    try:
                        # canonical nodes keep their function bodies: TensorRT's parser imports local functions
                        with spilling(new_store(model)):
                            low, _ = precision.convert_for_target(model, target, options.trt.io_dtype)
                        runners[name] = trt_build.EngineRunner(build(low, d, name)[0])
                    except errors.NormdeployError as e:
                        run.notes.append(f"no TensorRT engine of {baselines[name]}: {e}")
                feed = example_arrays(specs, seed=0, batch=run.batch)
                samples = trt_build.measure_interleaved(
                    {k: runners[k] for k in ("original", "optimized", "floor") if k in runners}, feed,
                    duration_s=options.bench.seconds, warmup_calls=options.bench.warmup,
                    progress=lambda f: progress("bench", f))
                bench = BenchResult({k: Timing(k, v, run.batch) for k, v in samples.items()}, 1,
                                    {**machine_info(1), **trt_build.gpu_info()})
                latency = bench_latency(bench, run.batch) if "original" in samples else {
                    "speedup": None, "batch": run.batch, "machine": bench.machine}
                for k, v in samples.items():
                    latency[k] = trt_build.percentiles(v, run.batch)
                latency["method"] = (f"TensorRT {build_info.tensorrt_version} engines of the original, the optimized "
                                     "model and the floor (same precision conversion, same profiles) on "
                                     f"{bench.machine.get('gpu', 'the GPU')}: GPU compute time from CUDA events around "
                                     "each execute_async_v3, interleaved after trtexec's 200 ms warm-up; percentiles "
                                     "as trtexec reports them; speedup = p50(original) / p50(optimized)")
    report = build_report(run, converted, accuracies, fidelity, latency)
    report["precision"] = prec
    report["engine"] = build_info.to_json() if build_info else None
    if build_info:
        report["accuracy"]["engine_tolerance"] = trt_build.engine_tolerance(target, run.tolerance)
    return Result(run.prepared.original, converted, run.transformed.floor_model, report, bench, run.prepared.loaded, specs,
                  plan)


def _layers(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"


def runtime_report(target: str, runner, threads: int | None, fp16: bool = False) -> dict:
    """report.json's ``runtime``: the runtime the optimized model was verified (and timed) on, and its precision
    (openvino: as the compiled model reports it)."""
    if target == "openvino":
        from .build import openvino as ov_build

        return ov_build.runtime_info(runner)
    import onnxruntime

    from .build import PROVIDERS

    return {"name": runtime_name(target), "version": onnxruntime.__version__, "providers": PROVIDERS.get(target),
            "threads": getattr(runner, "threads", threads),
            "inference_precision": "f16 (normalization statistics f32)" if fp16 else "f32"}


def verify(run_orig, run_opt, run: _Run, label: str = "", keep_original: bool = True):
    """Compare two runners on random inputs, calibration inputs and ``--data``; refuse above the tolerance.

    ``run_opt`` is a runner or a function making one: it is made only after the original's
    outputs on every input set are recorded, and with ``keep_original=False`` the original's
    session is closed first, so that only one copy of the weights is in a session at a time.
    Also measures export fidelity (torch eager against the exported ONNX) for torch inputs.
    Approximate rewrites are judged on real inputs (calibration, data), not on random ones.
    Returns the accuracies per input set, the export fidelity and the optimized runner.
    """
    specs, options = run.prepared.specs, run.options
    approx = options.rewrite.allow_approx
    run_orig.check_feed(example_arrays(specs, seed=0, batch=run.batch))
    calib = (options.rewrite.calib, run.ctx.calib_feeds) if run.ctx.calib_feeds is not None else None
    sets = input_sets(specs, run.batch, options.verify.data, calib, label)
    if "data" in sets:
        run_orig.check_feed(sets["data"][0][0])
    fidelity = None
    loaded = run.prepared.loaded
    if loaded.kind in ("module", "torchscript", "exported_program"):
        module = loaded.obj.module() if loaded.kind == "exported_program" else loaded.obj
        torch_runner = TorchRunner(module, run_orig.input_names, run_orig.output_names)
        fidelity = compare(torch_runner, run_orig, sets["random"][0][:1], "torch eager vs exported ONNX, random")
    try:
        reference = Recorded(run_orig, [f for feeds, _ in sets.values() for f in feeds])
    except NormdeployError:
        raise
    except Exception as e:  # noqa: BLE001 - each runtime raises its own types
        what = "the input model" if loaded.kind == "onnx" else "the exported model"
        raise InputError(f"{what} itself fails on {runtime_name(run.target)} before any rewrite: "
                         f"{runtime_cause(e)}",
                         "the file computes nothing to compare with: check it with onnxruntime; a torch export "
                         "that writes a wrong literal shape (torch.onnx.export(dynamo=False) of a module that "
                         "reads its own sizes) is fixed by exporting with dynamo=True") from None
    if not keep_original:
        run_orig.close()
    try:
        run_opt = run_opt() if callable(run_opt) else run_opt
        accuracies = {key: compare(reference, run_opt, feeds, what) for key, (feeds, what) in sets.items()}
    finally:
        reference.close()  # its spilled outputs
    gated = {k: a for k, a in accuracies.items() if not (approx and k == "random")}
    check_tolerance(gated.values(), run.tolerance,
                    "approximate rewrites: raise --max-error or drop --allow-approx" if approx
                    else "report this with the model; pass --tolerance to accept it")
    run.worst = worst(gated.values())
    return accuracies, fidelity, run_opt


def nothing_to_rewrite(transformed: Transformed) -> str | None:
    """Why no step changed the model (the optimized model computes what the original does), or None.

    Either there is no normalization (the usual torchvision CNN exported to ONNX: the exporter
    already folded its BatchNorms into the convolutions), or every one found was left alone, for
    the reasons the passes gave (the first few distinct ones; the report lists each node's).
    """
    results = transformed.results
    if any(r.rewrites for r in results):
        return None
    canon = {s.name for s in CANONICALIZE}
    found = describe_normalizations(transformed.canonical_model, results, canon)
    left = find_leftovers(transformed.canonical_model, results, canon)
    if not found and not left:
        return ("nothing to rewrite: no normalization in the model (an exporter that folds BatchNorm into the "
                "convolutions leaves none)")
    reasons = list(dict.fromkeys([r for e in found for r in e["kept_because"]] + [x.reason for x in left]))
    counts = norms.count_by_kind(transformed.canonical_model)
    what = ", ".join(f"{n} {k}" for k, n in counts.items())
    if left:
        what += (", " if what else "") + f"{len(left)} normalization-like subgraph(s) no recognizer matched"
    more = f"; and {len(reasons) - 3} more reason(s), per node in the report" if len(reasons) > 3 else ""
    return f"nothing to rewrite: every normalization found ({what}) is left alone: " + "; ".join(reasons[:3]) + more


#: the note of a run that times nothing because the optimized model is the original
NOT_TIMED = ("latency not measured: nothing was rewritten, so model.onnx is the original, and a ratio of two "
             "identical models measures only the machine's noise (normdeploy bench still times the original next to "
             "the peers)")


def identical_to_original(nothing: str | None, options: Options) -> bool:
    """True where nothing was rewritten and no precision change (``--fp16``) makes the optimized model differ."""
    return nothing is not None and not options.ort.fp16


def bench_latency(bench, batch: int) -> dict | None:
    """The ``latency`` block of report.json from an interleaved run (None when not measured).

    ``speedup_ci95`` is NaNs and ``speedup_note`` says why where the run had too few rounds for
    an interval; ``norm_cost_left`` is None and ``norm_cost_left_note`` says why where the share
    is no measurement (:meth:`normdeploy.bench.timing.BenchResult.norm_cost_share`).
    """
    if bench is None:
        return None
    lo, hi = bench.ratio_interval("original", "optimized")
    left, why = bench.norm_cost_share()
    latency = {name: t.to_json() for name, t in bench.timings.items()}
    latency.update({
        "speedup": bench.ratio("original", "optimized"),
        "speedup_ci95": [lo, hi],
        "speedup_note": bench.interval_note("original", "optimized"),
        "norm_cost_left": left,
        "norm_cost_left_note": why,
        "sessions": bench.sessions,
        "session_spread_ms": {name: t.to_json()["session_spread_ms"] for name, t in bench.timings.items()},
        "speedup_sessions": bench.session_ratios("original", "optimized"),
        "alive": bench.alive,
        "method": (f"{bench.sessions} session(s) per variant, created in rotating order, each timed "
                   + ("in interleaved rounds" if bench.alive == "all" else
                      "alone in turn (one session alive at a time, --bench-alive one)")
                   + " after warm-up; p50 = median over sessions of each session's p50; speedup = "
                   "p50(original) / p50(optimized), 95 % interval by a bootstrap over sessions, then rounds within them"
                   + handover_text(bench)),
        "handover_ms": bench.handover_ms,
        "spill_ms": bench.spill_ms,
        "batch": batch, "threads": bench.threads, "machine": bench.machine,
    })
    return latency


def build_report(run: _Run, optimized: onnx.ModelProto, accuracies: dict[str, Accuracy], fidelity: Accuracy | None,
                 latency: dict | None) -> dict:
    """report.json (DESIGN.md section 7)."""
    results = run.transformed.results
    notes = list(run.notes)
    for r in results:
        notes.extend(r.notes)
    loaded = run.prepared.loaded
    return {
        "normdeploy_version": __version__,
        "target": run.target,
        "input": {"path": loaded.path, "kind": loaded.kind, "inputs": [s.to_json() for s in loaded.inputs]},
        "passes": [r.to_json() for r in results],
        "norm_nodes": {"before": norms.count_by_kind(run.transformed.canonical_model),
                       "after": norms.count_by_kind(optimized)},
        "normalizations": describe_normalizations(run.transformed.canonical_model, results,
                                                  {s.name for s in CANONICALIZE}),
        "left_alone": [x.to_json() for x in find_leftovers(run.transformed.canonical_model, results,
                                                           {s.name for s in CANONICALIZE})],
        "accuracy": {**run.worst, "tolerance": run.tolerance,
                     "exact_only": all(r.exact for r in results if r.rewrites),
                     **{k: a.to_json() for k, a in accuracies.items()}},
        "export_fidelity": fidelity.to_json() if fidelity else None,
        "latency": latency,
        "nothing_to_rewrite": run.nothing,
        "notes": notes,
        "batch_range": list(run.batch_range) if run.batch_range else None,
    }


# ----------------------------------------------------------------------------- inspect

def inspect(source, options: Options | None = None, progress: Progress = _noop) -> dict:
    """Every normalization in the model (after canonicalization), its kind, and its fate.

    The fate is what :func:`transform` (the same one :func:`optimize` runs, calibration
    included) did for the target: the step that rewrote the node, or the reasons every
    step gave for leaving it.
    """
    options = options or Options()
    prepared = prepare(source, options, progress)
    target = options.target if options.target != "auto" else resolve_target(options)
    ctx = context(target, options, prepared.specs)
    transformed = transform(prepared.original, ctx, progress=progress)
    canon_names = {s.name for s in CANONICALIZE}
    entries = describe_normalizations(transformed.canonical_model, transformed.results, canon_names)
    left = [x.to_json() for x in find_leftovers(transformed.canonical_model, transformed.results, canon_names)]
    loaded = prepared.loaded
    return {"model": loaded.path, "kind": loaded.kind, "target": options.target,
            "inputs": [s.to_json() for s in loaded.inputs], "normalizations": entries, "left_alone": left,
            "counts": norms.count_by_kind(transformed.canonical_model), "notes": prepared.notes}


# ----------------------------------------------------------------------------- bench and gate

WHAT_GIVEN = "{name}: given optimized model, ONNX Runtime ORT_ENABLE_ALL"


def measure(source, options: Options | None = None, *, candidates: dict[str, onnx.ModelProto] | None = None,
            peers: tuple[str, ...] = (), progress: Progress = _noop, hint: str | None = None):
    """The whole benchmark of one model: every variant built, checked and timed in one interleaved run.

    ``candidates`` maps a name to an optimized ``onnx.ModelProto`` to judge against the
    original; None means normdeploy's own output (:func:`optimize`, named ``optimized``).
    ``peers`` names entries of :data:`normdeploy.bench.peers.PEERS`. The floor is always measured.
    Where normdeploy rewrote nothing its optimized model, and where the model has no normalization
    the floor, is the original itself: still timed (a reference for the run's noise), but marked
    ``identical_to_original`` and given no speedup.
    Returns a :class:`normdeploy.bench.ModelBench`.
    """
    from .bench import compare_variants
    from .bench.peers import WHAT

    options = options or Options()
    identical = {}
    if candidates is None:
        # normdeploy's own pipeline, exactly as `optimize` runs it (its accuracy gate is ours to apply, so no limit)
        own = Options.from_flat(options, bench=False, tolerance=float("inf"), max_error=float("inf"))
        res = optimize(source, own, progress)
        loaded, original, floor = res.loaded, res.original_model, res.floor_model
        canonical_counts = res.report["norm_nodes"]["before"]
        notes = list(res.report.get("notes", []))
        given = {"optimized": (res.optimized_model, WHAT["optimized"])}
        if identical_to_original(res.report.get("nothing_to_rewrite"), options):
            identical["optimized"] = "identical to the original: nothing to rewrite"
    else:
        prepared = prepare(source, options, progress)
        loaded, original = prepared.loaded, prepared.original
        notes = list(prepared.notes) + norms.validate_parameters(original)
        canon = transform(original, context(options.target, options, prepared.specs), until="canonicalize")
        floor, canonical_counts = canon.floor_model, norms.count_by_kind(canon.canonical_model)
        given = {n: (m, WHAT_GIVEN.format(name=n)) for n, m in candidates.items()}
    from .build import trt as trt_build

    batch_range = trt_build.parse_batch(options.batch)
    batch = batch_range[1] if batch_range else loaded.inputs[0].shape[0]
    norm_nodes = {"before": norms.count_by_kind(original), "recognized": canonical_counts,
                  "after": {n: norms.count_by_kind(m) for n, (m, _) in given.items()}}
    if not canonical_counts:
        identical["floor"] = "identical to the original: no normalization to remove"
    mb = compare_variants(loaded.path, loaded, original, given, floor, target=options.target,
                          threads=options.bench.threads, batch=batch, data=options.verify.data, peers=peers,
                          hint=hint, seconds=options.bench.seconds, warmup=options.bench.warmup,
                          sessions=options.bench.sessions, notes=notes,
                          norm_nodes=norm_nodes, progress=progress)
    for name, why in identical.items():
        mb.variants[name].info["identical_to_original"] = why
    return mb
