"""Choices made by measurement: ``optimize --autotune`` (ort-* targets).

Some choices of the ort-* lowering and session have no answer that holds on every machine
and model: which RMSNorm form ONNX Runtime runs fastest, below which row length a GroupScaling
statistic is faster as decomposed ops, and ONNX Runtime's session graph optimization level
(the project's suite found BERT 1.32x faster at ORT_ENABLE_BASIC than at the default ALL). Every
candidate here computes the same function as the default: the lowering choices are the same
formula in other standard ops (:mod:`normdeploy.lower.ort`), the session levels are ONNX
Runtime's own semantics-preserving rewrites. So the choice is a measurement, made on the user's
machine:

1. the model is exported once (:func:`normdeploy.pipeline.prepare`) and transformed once with
   the options as given (the *default* candidate);
2. each axis of :data:`AXES` varies one option from that default (one at a time): a session
   axis reuses the default model with another session setting, a lower axis lowers the same
   rewritten model again (:func:`normdeploy.pipeline.lower_variant`), an earlier-stage axis
   transforms the original again. Candidates that give the same model and session as an
   earlier one are merged with it (said in the report);
3. each candidate is verified against the original on the run's inputs (random seeds, and
   ``--data``): only those within the run's tolerance (the one :func:`normdeploy.optimize`
   gates on) are timed, the others are listed with their error;
4. the exact candidates are timed together, interleaved, for ``--autotune-seconds``
   (:func:`time_candidates`, the one place that calls :func:`normdeploy.bench.timing.interleaved`);
   candidate c's speedup is ``p50(default) / p50(c)`` with its 95 % bootstrap interval over
   rounds. A candidate *wins* only where that interval lies above 1; the fastest winner is
   chosen. Where winners on two or more axes exist, their combination is built and timed in a
   second round (a third of the budget) against the default and the best single winner;
5. no winner (every interval includes 1, or too few rounds for an interval): the default stays,
   and the report says so;
6. :func:`normdeploy.pipeline.optimize` then runs with the chosen options (so model.onnx is the
   one ``optimize`` gives with the flags the report names, without ``--autotune``), and the
   report gains an ``autotune`` section: every candidate, its p50, its speedup against the
   default and interval, what was chosen and by how much, and the flags that reproduce it.

Adding an axis (another switch of :class:`normdeploy.options.Options` that changes the ort-*
model or its session exactly) is one :class:`Axis` entry in :data:`AXES`. All timed sessions are
alive at once during the timing (one copy of the weights each); every figure is for the machine
and load it was measured under.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import onnx_ir as ir

from . import pipeline
from .build import OrtRunner, Recorded
from .core.errors import InputError
from .core.inputs import example_arrays
from .core.passes import ORT_GRAPH_LEVELS, ORT_RMS_OPS, SHORT_ROW
from .options import FLAT, Options
from .verify import compare, input_sets, worst

#: the stages an :class:`Axis` may start from: "session" (same model, another session option), "lower"
#: (the same rewritten model lowered again) or "transform" (the original transformed again)
AXIS_STAGES = ("session", "lower", "transform")

_RMS_OPS = ("RMSNorm", "GroupScaling", "PowerNorm")
_GROUPED = ("GroupScaling", "PowerNorm")


def _has(ops: tuple[str, ...], what: str) -> Callable[[ir.Model], str | None]:
    def reason(canonical: ir.Model) -> str | None:
        from .core.ops import DOMAIN

        if any(n.domain == DOMAIN and n.op_type in ops for n in canonical.graph):
            return None
        return f"no {what} in the model"
    return reason


def _has_standard(standard: tuple[str, ...], canonical_ops: tuple[str, ...], what: str):
    """Like :func:`_has`, also for standard-domain ops (a LayerNormalization stays one)."""
    theirs = _has(canonical_ops, what)

    def reason(canonical: ir.Model) -> str | None:
        if any(n.domain in ("", "ai.onnx") and n.op_type in standard for n in canonical.graph):
            return None
        return theirs(canonical)
    return reason


def _always(canonical: ir.Model) -> str | None:
    return None


@dataclass(frozen=True)
class Axis:
    """One choice autotune measures: the option field it sets, the values it tries, where it acts.

    ``field`` is a flat field of :class:`normdeploy.options.Options` (its flag is the field's);
    ``stage`` one of :data:`AXIS_STAGES`; ``applies(canonical_model)`` gives the reason the axis has
    nothing to choose on this model (no candidate is built), or None.
    """

    name: str
    field: str
    values: tuple
    stage: str
    what: str
    applies: Callable[[ir.Model], str | None] = _always

    def __post_init__(self):
        assert self.field in FLAT, f"autotune axis {self.name}: no option field {self.field}"
        assert self.stage in AXIS_STAGES, f"autotune axis {self.name}: unknown stage {self.stage}"

    @property
    def flag(self) -> str:
        return _flag_of(self.field)


#: the registry: every choice ``--autotune`` measures, in the order candidates are built. ``disable``
#: (no constant folding, no fusion at all) is left out of the levels: it spends a candidate's share of the
#: budget on a level that keeps every Shape/Cast ONNX Runtime would fold; ``--ort-graph-optimization
#: disable`` still sets it by hand.
AXES: tuple[Axis, ...] = (
    Axis("graph_optimization", "graph_optimization", tuple(v for v in ORT_GRAPH_LEVELS if v != "disable"),
         "session", "ONNX Runtime's session graph optimization level"),
    Axis("rms_op", "rms_op", ORT_RMS_OPS, "lower", "the op RMSNorm statistics run as",
         _has(_RMS_OPS, "RMSNorm, GroupScaling or PowerNorm")),
    Axis("short_row", "short_row", (0, SHORT_ROW, 1 << 20), "lower",
         "GroupScaling rows shorter than this stay decomposed ops (0: always fused)",
         _has(_GROUPED, "GroupScaling or PowerNorm")),
    Axis("ort_fusions", "ort_fusions", (False, True), "lower",
         "residual Add + norm fused into ONNX Runtime's Skip(Simplified)LayerNormalization (ort-cpu)",
         _has_standard(("LayerNormalization",), ("RMSNorm",), "LayerNorm or RMSNorm")),
)


def _flag_of(field_name: str) -> str:
    group = FLAT[field_name]
    kind = type(getattr(Options(), group))
    return next(f for f in dataclasses.fields(kind) if f.name == field_name).metadata["cli"]["decls"][0]


def _value_of(options: Options, field_name: str):
    return getattr(getattr(options, FLAT[field_name]), field_name)


def flags(settings: dict) -> str:
    """The command-line flags that give ``settings`` (option field -> value) without ``--autotune``; a boolean
    switch as its on or off spelling (``--ort-fusions`` / ``--no-ort-fusions``)."""
    def one(k, v) -> str:
        decl = _flag_of(k)
        if isinstance(v, bool):
            on, _, off = decl.partition("/")
            return on if v else off
        return f"{decl} {v}"
    return " ".join(one(k, v) for k, v in settings.items())


# ----------------------------------------------------------------------------- candidates

@dataclass
class Candidate:
    """One variant: its settings (option field -> value, deviations from the options as given)."""

    name: str
    settings: dict
    options: Options
    model: ir.Model | None = None
    fingerprint: str | None = None
    same_as: str | None = None  # an earlier candidate with the same model and session
    accuracy: dict | None = None
    exact: bool | None = None
    note: str | None = None
    p50_ms: float | None = None
    speedup: float | None = None  # p50(default) / p50(this), from the round it was last timed in
    ci95: tuple[float, float] | None = None
    rounds: int | None = None

    @property
    def level(self) -> str:
        return self.options.ort.graph_optimization

    @property
    def timed(self) -> bool:
        return self.p50_ms is not None

    def to_json(self) -> dict:
        return {"name": self.name, "settings": dict(self.settings), "flags": flags(self.settings),
                "exact": self.exact, "max_rel_err": (self.accuracy or {}).get("max_rel_err"),
                "same_as": self.same_as, "timed": self.timed, "p50_ms": self.p50_ms,
                "speedup_vs_default": self.speedup, "speedup_ci95": list(self.ci95) if self.ci95 else None,
                "rounds": self.rounds, "note": self.note}


def fingerprint(model: ir.Model) -> str:
    """A digest of ``model``'s nodes (ops, attributes, wiring) and initializer names, shapes and types: two
    lowerings of one rewritten model that give the same digest are the same model (the lowering names
    everything it makes deterministically, and makes every weight it changes anew)."""
    h = hashlib.sha1()
    for node in model.graph:
        attrs = sorted((k, repr(a.value)) for k, a in node.attributes.items())
        h.update(repr((node.domain, node.op_type, [v.name if v else "" for v in node.inputs],
                       [v.name for v in node.outputs], attrs)).encode())
    for name, v in sorted(model.graph.initializers.items()):
        t = v.const_value
        h.update(repr((name, tuple(t.shape) if t is not None else None, str(t.dtype) if t is not None else None))
                 .encode())
    h.update(repr(sorted(model.opset_imports.items())).encode())
    return h.hexdigest()


def build_candidates(prepared: pipeline.Prepared, options: Options, target: str,
                     progress: pipeline.Progress = pipeline._noop) -> tuple[list[Candidate], list[str],
                                                                               pipeline.Transformed]:
    """The default candidate (the options as given) and one per other value of each axis that applies.

    Returns the candidates (merged ones carry ``same_as`` and no model), the notes on axes left out
    (with the reason) and the default's :class:`~normdeploy.pipeline.Transformed`.
    """
    specs = prepared.specs
    base = pipeline.transform(prepared.original, pipeline.context(target, options, specs))
    default = Candidate("default", {}, options, base.optimized_model)
    candidates, notes, rewritten = [default], [], None
    for axis in AXES:
        why = axis.applies(base.canonical_model)
        if why:
            notes.append(f"autotune: {axis.name} ({_flag_of(axis.field)}) not tuned: {why}")
            continue
        given = _value_of(options, axis.field)
        for value in axis.values:
            if value == given:
                continue
            opts = Options.from_flat(options, **{axis.field: value})
            name = f"{axis.name}={value}"
            progress(f"autotune: build {name}", None)
            if axis.stage == "session":
                model = base.optimized_model
            elif axis.stage == "lower":
                if rewritten is None:
                    rewritten = pipeline.transform(prepared.original, pipeline.context(target, options, specs),
                                                   until="rewrite").optimized_model
                model, _ = pipeline.lower_variant(rewritten, pipeline.context(target, opts, specs))
            else:
                model = pipeline.transform(prepared.original, pipeline.context(target, opts, specs)).optimized_model
            candidates.append(Candidate(name, {axis.field: value}, opts, model))
    merge_duplicates(candidates)
    return candidates, notes, base


def merge_duplicates(candidates: list[Candidate]) -> None:
    """Mark each candidate whose model and session equal an earlier one's (``same_as``) and drop its model."""
    seen: dict[tuple[str, str], str] = {}
    for c in candidates:
        if c.model is None:
            continue
        c.fingerprint = c.fingerprint or fingerprint(c.model)
        key = (c.fingerprint, c.level)
        if key in seen:
            c.same_as, c.model = seen[key], None
            c.note = f"the same model and session as {seen[key]}: not timed separately"
        else:
            seen[key] = c.name


# ----------------------------------------------------------------------------- verify and time

def _session(c: Candidate, target: str, threads: int | None, providers) -> OrtRunner:
    return OrtRunner(c.model, target, threads, graph_optimization=c.level, providers=providers)


def verify_candidates(candidates: list[Candidate], prepared: pipeline.Prepared, options: Options, target: str,
                      batch: int, tolerance: float, make_session: Callable[[Candidate], object]) -> None:
    """Each candidate with a model against the original, on the run's input sets; ``exact`` when every gated
    output is finite and within ``tolerance`` (approximate rewrites are judged on real inputs only, as
    :func:`normdeploy.pipeline.verify` does)."""
    original = OrtRunner(prepared.original, target, options.bench.threads, prepack=False)
    sets = input_sets(prepared.specs, batch, options.verify.data)
    reference = Recorded(original, [f for feeds, _ in sets.values() for f in feeds])
    original.close()
    approx = options.rewrite.allow_approx
    for c in candidates:
        if c.model is None:
            continue
        runner = make_session(c)
        try:
            accs = [compare(reference, runner, feeds, what) for key, (feeds, what) in sets.items()
                    if not (approx and key == "random" and len(sets) > 1)]
        finally:
            close = getattr(runner, "close", None)
            if close:
                close()
        c.accuracy = worst(accs)
        nonfinite = sum(o.nonfinite for a in accs for o in a.outputs)
        c.exact = bool(c.accuracy["max_rel_err"] <= tolerance and not nonfinite)
        if not c.exact:
            c.note = (f"not exact: max rel err {c.accuracy['max_rel_err']:.3g} > tolerance {tolerance:g}"
                      if not nonfinite else f"not exact: {nonfinite} non-finite output value(s)") + "; not timed"


#: ``timer(factories, feed, seconds, warmup, progress, sessions=) -> BenchResult``: what times the candidates
Timer = Callable[..., object]


def time_candidates(factories: dict, feed: dict, seconds: float, warmup: int, progress=None, sessions: int = 1):
    """The candidates timed together: :func:`normdeploy.bench.timing.interleaved` (the one call of it here, so
    that its signature can change in one place) on ``factories`` (name -> a callable making a new session), each
    in ``sessions`` sessions (``--sessions``). Returns a :class:`~normdeploy.bench.timing.BenchResult`."""
    from .bench.timing import interleaved

    return interleaved(factories, feed, seconds=seconds, warmup=warmup, settle=1, progress=progress,
                       sessions=sessions)


def _score(bench, names: list[str], by_name: dict[str, Candidate]) -> None:
    """Record each timed candidate's p50, speedup against ``default`` and interval from ``bench``."""
    for n in names:
        c = by_name[n]
        c.p50_ms = bench.p50(n)
        c.rounds = bench.rounds("default", n)
        if n == "default":
            c.speedup, c.ci95 = 1.0, None
            continue
        c.speedup = bench.ratio("default", n)
        lo, hi = bench.ratio_interval("default", n)
        c.ci95 = (lo, hi) if lo == lo else None


def winners(timed: list[Candidate]) -> list[Candidate]:
    """The timed candidates measurably faster than the default (95 % interval of the speedup above 1), fastest
    first."""
    return sorted([c for c in timed if c.name != "default" and c.ci95 is not None and c.ci95[0] > 1.0],
                  key=lambda c: -c.speedup)


# ----------------------------------------------------------------------------- the run

@dataclass
class Tuning:
    """What :func:`tune` found: the chosen options, every candidate, and the report section."""

    options: Options
    chosen: Candidate
    candidates: list[Candidate]
    report: dict
    notes: list[str] = field(default_factory=list)


def tune(prepared: pipeline.Prepared, options: Options, target: str, *, timer: Timer | None = None,
         progress: pipeline.Progress = pipeline._noop) -> Tuning:
    """Build, verify and time the candidates for ``prepared``; choose (module docstring, steps 1-5)."""
    from .build import trt as trt_build

    timer = timer or time_candidates
    started = time.perf_counter()
    seconds = options.tune.autotune_seconds
    batch_range = trt_build.parse_batch(options.batch)
    batch = batch_range[1] if batch_range else prepared.specs[0].shape[0]
    tolerance = pipeline.run_tolerance(options, prepared.original)
    if options.ort.fp16:
        tolerance = max(tolerance, 1e-2)
    candidates, notes, base = build_candidates(prepared, options, target, progress)
    nothing = pipeline.nothing_to_rewrite(base)
    by_name = {c.name: c for c in candidates}
    default = by_name["default"]
    if nothing is not None and not options.ort.fp16:
        for c in candidates[1:]:
            c.note = c.note or "not timed: nothing to rewrite (model.onnx is the original, and is not timed)"
        return _finish(options, default, candidates, notes + [f"autotune: nothing tuned: {nothing}"], seconds,
                       started, "nothing to rewrite: the default is kept", None, tolerance)
    if options.ort.fp16:
        from .lower import precision

        for c in candidates:
            if c.model is not None:
                c.model = precision.convert_precision(c.model, "fp16")
    providers = pipeline.ort_providers(options, target)
    threads = options.bench.threads
    progress("autotune: verify", None)
    verify_candidates(candidates, prepared, options, target, batch, tolerance,
                      lambda c: _session(c, target, threads, providers))
    if not default.exact:  # optimize itself refuses this model: let it say so
        return _finish(options, default, candidates, notes, seconds, started,
                       "the default is not within the tolerance: nothing to tune", None, tolerance)
    feed = example_arrays(prepared.specs, seed=0, batch=batch)
    timed = [c for c in candidates if c.model is not None and c.exact]
    if len(timed) < 2:
        return _finish(options, default, candidates, notes, seconds, started,
                       "no other exact candidate: the default is kept", None, tolerance)
    axes_with = {next(iter(c.settings)) for c in timed if c.settings}
    first = seconds * (2 / 3 if len(axes_with) > 1 else 1.0)
    bench = _timed_round(timed, feed, first, options, target, threads, providers, timer, progress, "round 1")
    _score(bench, [c.name for c in timed], by_name)
    won = winners(timed)
    per_axis = {}
    for c in won:
        per_axis.setdefault(next(iter(c.settings)), c)
    machine = getattr(bench, "machine", None)
    if len(per_axis) > 1:
        settings = {k: v for c in per_axis.values() for k, v in c.settings.items()}
        combo = Candidate("+".join(f"{k}={v}" for k, v in settings.items()), settings,
                          Options.from_flat(options, **settings))
        progress(f"autotune: build {combo.name}", None)
        combo.model = _combined_model(prepared, combo.options, target)
        if options.ort.fp16:
            from .lower import precision

            combo.model = precision.convert_precision(combo.model, "fp16")
        candidates.append(combo)
        by_name[combo.name] = combo
        verify_candidates([combo], prepared, options, target, batch, tolerance,
                          lambda c: _session(c, target, threads, providers))
        if combo.exact:
            second = [default, won[0], combo]
            bench = _timed_round(second, feed, seconds - first, options, target, threads, providers, timer,
                                 progress, "round 2")
            for c in second:
                c.note = "; ".join(x for x in (c.note, "figures from round 2") if x)
            _score(bench, [c.name for c in second], by_name)
            won = winners(second)
    chosen = won[0] if won else default
    why = (f"{chosen.name} is measurably faster than the default: {chosen.speedup:.3f}x "
           f"[{chosen.ci95[0]:.3f}, {chosen.ci95[1]:.3f}]" if won else
           _why_default(timed))
    return _finish(options, chosen, candidates, notes, seconds, started, why, machine, tolerance)


def _why_default(timed: list[Candidate]) -> str:
    others = [c for c in timed if c.name != "default"]
    if others and all(c.ci95 is None for c in others):
        return ("the default is kept: too few rounds for an interval (a longer --autotune-seconds gives one), "
                "so no candidate is measurably faster")
    return "the default is kept: no candidate is measurably faster than it (every speedup's 95 % interval reaches 1)"


def _combined_model(prepared: pipeline.Prepared, options: Options, target: str) -> ir.Model:
    """The model of a combination of settings: the original transformed with all of them (a session setting
    rides on the options)."""
    return pipeline.transform(prepared.original, pipeline.context(target, options, prepared.specs)).optimized_model


def _timed_round(cands: list[Candidate], feed, seconds: float, options: Options, target: str, threads, providers,
                 timer: Timer, progress, label: str):
    """One timing round of ``cands``: each a factory of its sessions, ``options.bench.sessions`` sessions each
    (every session is closed when its block is done: :func:`normdeploy.bench.timing.interleaved`)."""
    progress(f"autotune: time {len(cands)} candidates ({label})", 0.0)
    factories = {c.name: (lambda c=c: _session(c, target, threads, providers)) for c in cands}
    return timer(factories, feed, seconds, options.bench.warmup,
                 lambda f: progress(f"autotune: time {len(cands)} candidates ({label})", f),
                 sessions=options.bench.sessions)


def _finish(options: Options, chosen: Candidate, candidates: list[Candidate], notes: list[str], seconds: float,
            started: float, why: str, machine, tolerance: float) -> Tuning:
    chosen_options = Options.from_flat(chosen.options, autotune=False)
    reproduce = flags(chosen.settings)
    summary = (f"autotune: chose {chosen.name}" + (f" ({reproduce})" if reproduce else "") + f"; {why}")
    report = {
        "axes": [{"name": a.name, "flag": _flag_of(a.field), "values": list(a.values), "stage": a.stage,
                  "given": _value_of(options, a.field), "what": a.what} for a in AXES],
        "candidates": [c.to_json() for c in candidates],
        "chosen": chosen.name,
        "chosen_settings": dict(chosen.settings),
        "kept_default": chosen.name == "default",
        "speedup_vs_default": chosen.speedup if chosen.name != "default" else 1.0,
        "speedup_ci95": list(chosen.ci95) if chosen.ci95 else None,
        "why": why,
        "flags": reproduce,
        "reproduce": "normdeploy optimize MODEL " + (reproduce + " " if reproduce else "") + "(without --autotune)",
        "tolerance": tolerance,
        "budget_s": seconds,
        "wall_s": round(time.perf_counter() - started, 2),
        "method": ("every candidate verified against the original (only those within the tolerance timed); the "
                   "timed ones interleaved in one run after warm-up; speedup = p50(default) / p50(candidate) with "
                   "its 95 % bootstrap interval over rounds; a candidate is chosen only where that interval lies "
                   "above 1"),
        "machine": machine,
        "notes": list(notes),
    }
    return Tuning(chosen_options, chosen, candidates, report, notes + [summary])


def optimize(source, options: Options, progress: pipeline.Progress = pipeline._noop, *,
             timer: Timer | None = None) -> pipeline.Result:
    """``optimize --autotune``: :func:`tune`, then :func:`normdeploy.pipeline.optimize` with the chosen options
    (the model exported once for both); the report gains ``autotune``."""
    target = pipeline.resolve_target(options)
    if not target.startswith("ort-"):
        from .build import runtime_name

        runs_on = "TensorRT" if target.startswith("trt-") else runtime_name(target)
        raise InputError(f"--autotune measures ONNX Runtime sessions; target {target} runs on {runs_on}",
                         "use an ort-* target (--target ort-cpu), or drop --autotune")
    prepared = pipeline.prepare(source, options, progress)
    tuning = tune(prepared, options, target, timer=timer, progress=progress)
    result = pipeline.optimize(source, tuning.options, progress, prepared=prepared)
    result.report["autotune"] = tuning.report
    result.report["notes"].extend(tuning.notes)
    return result


__all__ = ["AXES", "Axis", "Candidate", "Tuning", "tune", "optimize", "time_candidates", "flags", "fingerprint",
           "winners"]
