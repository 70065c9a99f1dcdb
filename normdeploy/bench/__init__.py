"""Stage ``bench``: every variant of one model measured in one interleaved run.

:func:`compare_variants` takes the original, normdeploy's optimized model (or given
candidates), the floor (:mod:`.floor`) and the peers (:mod:`.peers`), checks each against
the original for accuracy, then times them all with the same thread count
(:mod:`.timing`); :class:`ModelBench` holds what it measured and :func:`markdown` and
:func:`variant_rows` render it (:mod:`.plot` draws it). :func:`normdeploy.pipeline.measure`
is the whole benchmark of one model file, used by the ``bench`` and ``gate`` commands.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from ..core.graph import to_proto
from .timing import (DEFAULT_SESSIONS, HANDOVER_MARGIN, MAX_HANDOVER_S, MIN_ROUNDS_FOR_INTERVAL, BenchResult,
                     interleaved, machine_info, provenance)

# ----------------------------------------------------------------------------- one model, many variants

ROLES = ("original", "candidate", "floor", "peer")


@dataclass
class Variant:
    """One column of a benchmark: normdeploy's original/optimized/floor, a gate candidate, or a peer."""

    name: str
    role: str
    what: str
    runner: object | None = None
    status: str = "ok"  # "ok" or "n/a: <reason>"
    info: dict = field(default_factory=dict)  # "identical_to_original": why, where the variant is the original itself
    factory: object | None = None  # makes a fresh runner like ``runner``: the variant's further timed sessions
    accuracy: dict = field(default_factory=dict)  # input set ("random", "data") -> verify.Accuracy


@dataclass
class ModelBench:
    """Everything ``bench`` and ``gate`` measured on one model, in one interleaved run."""

    model: str
    kind: str
    inputs: list
    batch: int
    threads: int
    variants: dict[str, Variant]
    result: BenchResult | None
    norm_nodes: dict
    notes: list[str]
    wall_seconds: float = 0.0
    versions: dict = field(default_factory=dict)

    @property
    def machine(self) -> dict:
        return self.result.machine if self.result else machine_info(self.threads)

    @property
    def timed(self) -> list[str]:
        return list(self.result.timings) if self.result else []

    def identical(self, name: str) -> str | None:
        """Why variant ``name`` is the original itself (nothing to rewrite, nothing to floor), or None."""
        return self.variants[name].info.get("identical_to_original") if name in self.variants else None

    def speedup(self, name: str, baseline: str = "original") -> float | None:
        """p50(baseline) / p50(name); None where not timed, or where ``name`` is the original itself
        (a ratio of two identical models measures only noise)."""
        if name not in self.timed or baseline not in self.timed or (name != baseline and self.identical(name)):
            return None
        return self.result.ratio(baseline, name)

    def speedup_ci(self, name: str, baseline: str = "original") -> tuple[float, float] | None:
        """95 % interval of :meth:`speedup`: NaNs from too few rounds (:meth:`speedup_note` says why)."""
        if self.speedup(name, baseline) is None or name == baseline:
            return None
        return self.result.ratio_interval(baseline, name)

    def speedup_note(self, name: str, baseline: str = "original") -> str | None:
        """Why ``name`` has no speedup or no interval, or None where it has both."""
        if name == baseline or name not in self.timed:
            return None
        return self.identical(name) or self.result.interval_note(baseline, name)

    def cost_left(self, candidate: str) -> tuple[float | None, str | None]:
        """The share of normalization cost ``candidate`` leaves, or why it is no measurement
        (:meth:`.timing.BenchResult.norm_cost_share`)."""
        if self.identical(candidate):
            return None, self.identical(candidate)
        if self.identical("floor"):
            return None, f"the floor is {self.identical('floor')}"
        return self.result.norm_cost_share("original", candidate, "floor")

    def worst_accuracy(self, name: str) -> dict | None:
        accs = list(self.variants[name].accuracy.values())
        if not accs:
            return None
        top1 = [a.top1_agreement for a in accs if a.top1_agreement is not None]
        return {"max_abs_err": max(a.max_abs_err for a in accs), "max_rel_err": max(a.max_rel_err for a in accs),
                "cosine_min": min(a.cosine_min for a in accs), "top1_agreement": min(top1) if top1 else None}

    def to_json(self) -> dict:
        variants = {}
        for name, v in self.variants.items():
            entry = {"role": v.role, "what": v.what, "status": v.status, "info": v.info, "latency": None,
                     "accuracy": None}
            if name in self.timed:
                lat = self.result.timings[name].to_json()
                ci = self.speedup_ci(name)
                lat.update({"speedup": self.speedup(name), "speedup_ci95": list(ci) if ci else None,
                            "speedup_note": self.speedup_note(name)})
                entry["latency"] = lat
            worst = self.worst_accuracy(name)
            if worst is not None:
                entry["accuracy"] = {**worst, **{k: a.to_json() for k, a in v.accuracy.items()}}
            variants[name] = entry
        cands = [n for n, v in self.variants.items() if v.role == "candidate" and n in self.timed]
        left = {c: self.cost_left(c) for c in cands} if self.result else {}
        return {
            "model": self.model, "kind": self.kind, "inputs": self.inputs, "batch": self.batch,
            "threads": self.threads, "machine": self.machine, "versions": self.versions,
            "method": METHOD, "rounds": len(self.result.timings["original"].samples_ms) if self.result else 0,
            "sessions": self.result.sessions if self.result else 0,
            "handover_ms": self.result.handover_ms if self.result else 0.0,
            "spill_ms": self.result.spill_ms if self.result else {},
            "wall_seconds": self.wall_seconds,
            "norm_cost_left": {c: v for c, (v, _) in left.items()},
            "norm_cost_left_notes": {c: why for c, (_, why) in left.items() if why},
            "norm_nodes": self.norm_nodes, "variants": variants, "notes": self.notes,
        }


METHOD = ("sessions: every variant timed in several sessions, one of each variant per block, created in rotating order "
          "(A1 B1 C1, B2 C2 A2, ...) and closed after their block; interleaved within a block: warm-up, then every variant "
          "called once per round in rotating order (A B C, B C A, ...), each timed "
          "call preceded by one untimed call of the same variant (steady state, not the previous runtime's cold caches) "
          "and, at more than one thread, by untimed calls for the handover time (the previous variant's spinning thread "
          f"pool goes quiet first; {HANDOVER_MARGIN:g} x the largest spill measured after a call, at most "
          f"{MAX_HANDOVER_S * 1000:.0f} ms); "
          "p50 = median over sessions of each session's p50, p90/p99 over all calls; speedup = p50(original) / "
          "p50(variant) with a 95 % bootstrap interval over sessions, then paired rounds within them (the session-to-session "
          "spread included); accuracy against the original on the same inputs")



# ----------------------------------------------------------------------------- rendering

def fmt_ms(v: float | None) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def fmt_err(v: float | None) -> str:
    return "n/a" if v is None else "0" if v == 0 else f"{v:.2g}"


def variant_rows(mb: ModelBench) -> list[dict]:
    """One row per variant, formatted: the body of the terminal and Markdown tables."""
    rows = []
    for name, v in mb.variants.items():
        row = {"variant": name, "p50_ms": "n/a", "sessions": "n/a", "p90_ms": "n/a", "p99_ms": "n/a", "per_s": "n/a",
               "speedup": "n/a", "max_rel_err": "n/a", "top1": "n/a", "status": v.status}
        if name in mb.timed:
            t = mb.result.timings[name]
            tj = t.to_json()
            row.update(p50_ms=fmt_ms(tj["p50_ms"]), p90_ms=fmt_ms(tj["p90_ms"]), p99_ms=fmt_ms(tj["p99_ms"]),
                       per_s=f"{tj['throughput_per_s']:,.0f}", sessions=session_text(tj))
            s, ci = mb.speedup(name), mb.speedup_ci(name)
            if s is None:
                row["speedup"] = "n/a: identical to the original"
            else:
                row["speedup"] = f"{s:.3f}x" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] == ci[0]
                                                else " [too few rounds for an interval]" if ci else "")
        w = mb.worst_accuracy(name)
        if w is not None:
            row["max_rel_err"] = fmt_err(w["max_rel_err"])
            row["top1"] = "n/a" if w["top1_agreement"] is None else f"{w['top1_agreement']:.2%}"
        elif v.role == "original":
            row["max_rel_err"], row["top1"] = "ref", "ref"
        elif v.role == "floor":
            row["max_rel_err"], row["top1"] = "(wrong by design)", ""
        if v.status == "ok":
            row["status"] = v.what
            if mb.identical(name):
                row["status"] += "; " + mb.identical(name)
            if v.info.get("fused"):
                row["status"] += "; fused " + ", ".join(f"{k} {n}" for k, n in v.info["fused"].items())
        rows.append(row)
    return rows


def session_text(timing_json: dict) -> str:
    """The session spread of one variant as printed: ``min..max (k)`` of its per-session p50s."""
    spread, k = timing_json.get("session_spread_ms"), timing_json.get("sessions", 1)
    if not spread:
        return "n/a"
    return f"{fmt_ms(spread[0])}..{fmt_ms(spread[1])} ({k})" if k > 1 else f"{fmt_ms(spread[0])} (1)"


COLUMNS = (("variant", "variant"), ("p50_ms", "p50 ms"), ("sessions", "p50 per session (n)"),
           ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
           ("per_s", "samples/s"), ("speedup", "speedup vs original [95% CI]"), ("max_rel_err", "max rel err"),
           ("top1", "top-1 agr."), ("status", "what / status"))


def cost_left_texts(mb: ModelBench) -> dict[str, str]:
    """Candidate -> its share of normalization cost left as printed: a percentage, or n/a and why."""
    out = {}
    for c in (n for n, v in mb.variants.items() if v.role == "candidate" and n in mb.timed):
        v, why = mb.cost_left(c)
        out[c] = f"n/a ({why})" if v is None else f"{v:.0%}"
    return out


def markdown(mb: ModelBench, title: str | None = None) -> str:
    """A Markdown section for one model: provenance line, variant table, normalization cost left."""
    lines = [f"### {title or mb.model}", "",
             f"batch {mb.batch}, {len(mb.result.timings['original'].samples_ms) if mb.result else 0} interleaved rounds "
             f"in {mb.result.sessions if mb.result else 0} session(s) per variant, {mb.wall_seconds:.1f} s; "
             f"{provenance(mb.machine, mb.threads)}"
             + (f"; {mb.result.handover_ms:.0f} ms handover before every timed call" if mb.result and
                mb.result.handover_ms else ""), "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in variant_rows(mb):
        lines.append("| " + " | ".join(str(r[k]).replace("|", "/") for k, _ in COLUMNS) + " |")
    left = cost_left_texts(mb)
    if left:
        lines += ["", "normalization cost left, (p50(opt) - p50(floor)) / (p50(orig) - p50(floor)): "
                  + ", ".join(f"{k} {v}" for k, v in left.items())]
    for n in mb.notes:
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"


def _noop(stage: str, fraction: float | None = None) -> None:
    pass


def compare_variants(model: str, loaded, original, candidates: dict, floor, *, target: str, threads: int | None,
                     batch: int, data: str | None = None, peers: tuple[str, ...] = (), hint: str | None = None,
                     seconds: float = 3.0, warmup: int = 10, settle: int = 1, sessions: int = DEFAULT_SESSIONS,
                     notes: list[str] | None = None,
                     norm_nodes: dict | None = None, progress=_noop, prepared_peers: list | None = None,
                     verify: bool = True, min_rounds: int = MIN_ROUNDS_FOR_INTERVAL) -> ModelBench:
    """Build every variant of one model, check each against the original, time them all in one interleaved run.

    ``candidates`` maps a name to ``(model, what it is)``: normdeploy's optimized model, or
    models given to ``gate --optimized``; ``model`` is an ``onnx.ModelProto`` run on the
    target's runtime, or a callable that makes a new runner of it per call (a candidate another
    runtime runs; an object with ``run``). ``floor`` is the floor model; ``peers`` names
    entries of :data:`.peers.PEERS`, built from ``original``, or ``prepared_peers`` gives them
    already prepared (:func:`.peers.prepare`: a benchmark over several thread counts rewrites
    each model once). ``settle`` untimed calls precede every timed call and at least
    ``min_rounds`` rounds are timed (by default the rounds an interval needs, past ``seconds`` if need be:
    at more than one thread the handover leaves a short budget fewer); every variant is timed in
    ``sessions`` sessions, the runners built here being the first of each, closed when it is done (see
    :func:`.timing.interleaved`). Original, candidates and floor run on the target's runtime
    (``openvino``: OpenVINO's CPU plugin at f32, where the ``openvino`` peer is the original column
    itself); the ONNX Runtime peers on ONNX Runtime. ``verify=False`` skips the accuracy
    check (a caller that checked the same variants at another batch or thread count); each
    variant is still called once on the timed input, and a peer that fails there is ``n/a``.
    """
    from ..build import default_threads, make_runner, runtime_name
    from ..core.errors import InputError
    from ..core.inputs import example_arrays
    from ..verify import compare, input_sets
    from . import peers as peers_mod

    specs = loaded.inputs
    threads = threads or default_threads()
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    variants: dict[str, Variant] = {}
    runtime = runtime_name(target)

    def on_target(text: str) -> str:  # what each of original/optimized/floor runs on
        if runtime == "ONNX Runtime":
            return text
        return text.replace(" (= ONNX Runtime's default optimizations)", "").replace(
            "ONNX Runtime ORT_ENABLE_ALL", f"{runtime} CPU plugin, f32")

    def on(model):  # a new session of the target's runtime per call
        return lambda: make_runner(model, target, threads)

    run_orig = make_runner(original, target, threads)
    variants["original"] = Variant("original", "original", on_target(peers_mod.WHAT["original"]), run_orig,
                                   factory=on(original))
    progress("build", None)
    for name, (cand, what) in candidates.items():
        what = on_target(what)
        factory = cand if callable(cand) else on(cand)  # a model, or a factory of another runtime's runners
        runner = factory()
        if runner.input_names != run_orig.input_names or len(runner.output_names) != len(run_orig.output_names):
            raise InputError(f"optimized model {name} takes inputs {runner.input_names} and gives "
                             f"{len(runner.output_names)} output(s); the original takes {run_orig.input_names} and "
                             f"gives {len(run_orig.output_names)}", "pass the optimized model built from this original")
        variants[name] = Variant(name, "candidate", what, runner, factory=factory)
    variants["floor"] = Variant("floor", "floor", peers_mod.WHAT["floor"], make_runner(floor, target, threads),
                                factory=on(floor))
    same = {"openvino"} if target == "openvino" else set()  # a peer that is the target's runtime on the original
    if peers or prepared_peers:
        progress("peers", None)
        if prepared_peers is not None:
            built = [peers_mod.instantiate(p, threads, target) for p in prepared_peers if p.name not in same]
        else:
            built = peers_mod.build(tuple(p for p in peers if p not in same), to_proto(original), loaded, threads,
                                    run_orig.input_names, run_orig.output_names, target,  # the peers read protos
                                    hint if hint is not None else model)
        for p in built:
            variants[p.name] = Variant(p.name, "peer", p.what, p.runner, p.status, p.info, factory=p.factory)
        asked = list(peers) if peers else [q.name for q in prepared_peers]
        for name in (n for n in asked if n in same):
            variants[name] = Variant(name, "peer", peers_mod.WHAT[name], None,
                                     f"n/a: target {target} runs the original on {runtime}: the original column")

    progress("verify", None)
    feed = example_arrays(specs, seed=0, batch=batch)
    run_orig.check_feed(feed)
    sets = input_sets(specs, batch, data)
    if "data" in sets:
        run_orig.check_feed(sets["data"][0][0])
    for name, v in variants.items():
        if v.runner is None or v.role in ("original", "floor"):
            continue
        try:
            if not verify:
                v.runner.run(feed)
            for key, (fs, label) in (sets.items() if verify else ()):
                v.accuracy[key] = compare(run_orig, v.runner, fs, label)
        except Exception as e:  # noqa: BLE001
            if v.role == "candidate":
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise InputError(f"optimized model {name} cannot be compared with the original: {first}",
                                 "pass the optimized model built from this original") from e
            close = getattr(v.runner, "close", None)
            if callable(close):
                close()
            v.runner, v.factory, v.accuracy, v.status = None, None, {}, peers_mod._reason(e)

    timed = [n for n, v in variants.items() if v.runner is not None]
    progress("bench", 0.0)
    t0 = time.perf_counter()
    try:
        # the runners built above are the first session of each variant; the factories make the others
        result = interleaved({n: variants[n].factory for n in timed}, feed, seconds=seconds, warmup=warmup,
                             progress=lambda f: progress("bench", f), settle=settle, sessions=sessions,
                             first={n: variants[n].runner for n in timed}, min_rounds=min_rounds)
    finally:
        if torch_threads is not None:  # the torch peer set the process-wide count; give it back
            import torch

            torch.set_num_threads(torch_threads)
    wall = time.perf_counter() - t0
    result.threads = threads
    result.machine = machine_info(threads)
    return ModelBench(model, loaded.kind, [s.to_json() for s in specs], batch, threads, variants, result,
                      norm_nodes or {}, list(notes or []), wall, peers_mod.versions())
