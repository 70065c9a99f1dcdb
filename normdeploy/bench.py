"""Stage ``bench``: latency of several runners measured side by side (DESIGN.md section 6).

After a warm-up, the runners are called in rounds, A B C, B C A, C A B, ... so that
machine drift and the order itself cancel out; every call is timed with
``time.perf_counter_ns``. Reported per runner: p50, p90, p99, mean and throughput
(samples per second at the measured batch). The speedup is the ratio of medians,
``p50(original) / p50(optimized)``; the share of normalization cost left is
``(p50(opt) - p50(floor)) / (p50(orig) - p50(floor))``. The noise allowance of a ratio is
derived from the run's own spread: the half-width of the ratio's 95 % bootstrap interval
over rounds.

:func:`measure` is the whole stage for one model, used by the ``bench`` and ``gate``
commands and by ``benchmarks/run_suite.py``: export the model, build the original,
normdeploy's optimized model (or given candidates), the floor and the peers
(:mod:`normdeploy.peers`), check each against the original for accuracy, then time them
all in one interleaved run with the same thread count. :func:`markdown`,
:func:`variant_rows` and :func:`plot_speedups` render it; every rendering carries
:func:`provenance` (CPU model, thread count, ONNX Runtime version).
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timing:
    name: str
    samples_ms: list[float] = field(default_factory=list)
    batch: int = 1

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q)) if self.samples_ms else float("nan")

    def to_json(self) -> dict:
        s = np.asarray(self.samples_ms)
        return {"p50_ms": self.pct(50), "p90_ms": self.pct(90), "p99_ms": self.pct(99),
                "mean_ms": float(s.mean()) if s.size else float("nan"),
                "throughput_per_s": float(self.batch * 1000.0 / np.median(s)) if s.size else float("nan"),
                "runs": int(s.size), "batch": self.batch}


@dataclass
class BenchResult:
    timings: dict[str, Timing]
    threads: int
    machine: dict

    def p50(self, name: str) -> float:
        return self.timings[name].pct(50)

    def ratio(self, num: str, den: str) -> float:
        return self.p50(num) / self.p50(den)

    def ratio_interval(self, num: str, den: str, seed: int = 0, n_boot: int = 400) -> tuple[float, float]:
        """95 % bootstrap interval of the ratio of medians, resampling paired rounds."""
        a, b = np.asarray(self.timings[num].samples_ms), np.asarray(self.timings[den].samples_ms)
        n = min(len(a), len(b))
        if n < 5:
            return float("nan"), float("nan")
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, (n_boot, n))
        r = np.median(a[:n][idx], axis=1) / np.median(b[:n][idx], axis=1)
        return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))

    def norm_cost_left(self, original="original", optimized="optimized", floor="floor") -> float | None:
        if floor not in self.timings:
            return None
        span = self.p50(original) - self.p50(floor)
        if span <= 0:
            return None
        return (self.p50(optimized) - self.p50(floor)) / span


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import onnxruntime

    return {"cpu": cpu_name(), "machine": platform.machine(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "threads": threads,
            "cores": len(__import__("os").sched_getaffinity(0))}


def interleaved(runners: dict, feed: dict, seconds: float = 3.0, warmup: int = 5, min_rounds: int = 10,
                max_rounds: int = 200_000, progress=None, settle: int = 0) -> BenchResult:
    """Time every runner on ``feed`` in rotating order until ``seconds`` have passed.

    ``settle`` untimed calls precede each timed call of a runner within a round, so that a
    runner is not charged for the caches and thread pools the previous runner (another
    runtime, say torch or OpenVINO) left cold: what is timed is back-to-back, steady-state
    inference, as when one model serves alone.
    """
    names = list(runners)
    batch = next(iter(feed.values())).shape[0] if feed else 1
    for _ in range(warmup):
        for n in names:
            runners[n].run(feed)
    timings = {n: Timing(n, batch=batch) for n in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < seconds):
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for n in order:
            for _ in range(settle):
                runners[n].run(feed)
            t0 = time.perf_counter_ns()
            runners[n].run(feed)
            timings[n].samples_ms.append((time.perf_counter_ns() - t0) / 1e6)
        rounds += 1
        if progress is not None:
            progress(min(1.0, (time.perf_counter() - start) / seconds))
    threads = getattr(next(iter(runners.values())), "threads", 1)
    return BenchResult(timings, threads, machine_info(threads))


def plot(result: BenchResult, path: str, title: str) -> None:
    """Box plot of per-call latency per runner, with the p50 written on each box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.timings)
    data = [result.timings[n].samples_ms for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.2 + 0.3 * len(names)), dpi=110)
    ax.boxplot(data, vert=False, showfliers=False)
    ax.set_yticks(range(1, len(names) + 1), names)
    for i, n in enumerate(names, start=1):
        ax.annotate(f"p50 {result.p50(n):.3f} ms", (result.p50(n), i + 0.3), fontsize=8, ha="center")
    ax.set_xlabel(f"latency per call, ms\n{provenance(result.machine, result.threads)}", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def provenance(machine: dict, threads: int) -> str:
    """Which machine, thread count and runtime produced a figure: printed next to every figure."""
    return (f"{machine.get('cpu', '?')} ({machine.get('machine', '?')}, {machine.get('cores', '?')} cores available), "
            f"{threads} thread{'s' if threads != 1 else ''}, onnxruntime {machine.get('onnxruntime', '?')}")


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
    info: dict = field(default_factory=dict)
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

    def speedup(self, name: str, baseline: str = "original") -> float | None:
        if name not in self.timed or baseline not in self.timed:
            return None
        return self.result.ratio(baseline, name)

    def speedup_ci(self, name: str, baseline: str = "original") -> tuple[float, float] | None:
        if name not in self.timed or baseline not in self.timed or name == baseline:
            return None
        return self.result.ratio_interval(baseline, name)

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
                lat.update({"speedup": self.speedup(name), "speedup_ci95": list(ci) if ci else None})
                entry["latency"] = lat
            worst = self.worst_accuracy(name)
            if worst is not None:
                entry["accuracy"] = {**worst, **{k: a.to_json() for k, a in v.accuracy.items()}}
            variants[name] = entry
        cands = [n for n, v in self.variants.items() if v.role == "candidate" and n in self.timed]
        return {
            "model": self.model, "kind": self.kind, "inputs": self.inputs, "batch": self.batch,
            "threads": self.threads, "machine": self.machine, "versions": self.versions,
            "method": METHOD, "rounds": len(self.result.timings["original"].samples_ms) if self.result else 0,
            "wall_seconds": self.wall_seconds,
            "norm_cost_left": {c: self.result.norm_cost_left("original", c, "floor") for c in cands} if self.result else {},
            "norm_nodes": self.norm_nodes, "variants": variants, "notes": self.notes,
        }


METHOD = ("interleaved: warm-up, then every variant called once per round in rotating order (A B C, B C A, ...), each timed "
          "call preceded by one untimed call of the same variant (steady state, not the previous runtime's cold caches); "
          "p50/p90/p99 over rounds; speedup = p50(original) / p50(variant) with a 95 % bootstrap interval "
          "over paired rounds; accuracy against the original on the same inputs")


def _noop(stage: str, fraction: float | None = None) -> None:
    pass


def measure(path: str, opts, *, candidates: dict | None = None, peers: tuple[str, ...] = (), seconds: float = 3.0,
            warmup: int = 10, settle: int = 1, progress=_noop, hint: str | None = None) -> ModelBench:
    """Load and export ``path``, build every variant, check accuracy, time them all in one interleaved run.

    ``opts`` is a :class:`normdeploy.pipeline.Options` (inputs, data, batch, threads, target, ...).
    ``candidates`` maps a name to an optimized ``onnx.ModelProto`` to measure against the
    original; None means normdeploy's own pipeline output, named ``optimized``. ``peers``
    names entries of :data:`normdeploy.peers.PEERS`. The floor is always measured.
    ``settle`` untimed calls precede every timed call (see :func:`interleaved`).
    """
    import dataclasses

    from . import peers as peers_mod
    from . import survey
    from .build import OrtRunner, default_threads
    from .errors import InputError
    from .export import example_arrays
    from .pipeline import data_feeds, optimize, prepare
    from .verify import compare

    if candidates is None:
        # normdeploy's own pipeline, exactly as `optimize` runs it (its accuracy gate is ours to apply, so no limit)
        limits = {k: float("inf") for k in ("tolerance", "max_error") if hasattr(opts, k)}
        res = optimize(path, dataclasses.replace(opts, bench=False, **limits), progress)
        loaded, original = res.loaded, res.original
        notes = list(res.report.get("notes", []))
        candidates = {"optimized": res.optimized}
        whats = {"optimized": peers_mod.WHAT["optimized"]}
    else:
        loaded, original, notes = prepare(path, opts, progress)
        notes = list(notes) + survey.validate_parameters(original)
        whats = {n: f"{n}: given optimized model, ONNX Runtime ORT_ENABLE_ALL" for n in candidates}
    specs = loaded.inputs
    threads = opts.threads or default_threads()
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    variants: dict[str, Variant] = {}
    run_orig = OrtRunner(original, opts.target, threads)
    variants["original"] = Variant("original", "original", peers_mod.WHAT["original"], run_orig)
    progress("build", None)
    for name, model in candidates.items():
        runner = OrtRunner(model, opts.target, threads)
        if runner.input_names != run_orig.input_names or len(runner.output_names) != len(run_orig.output_names):
            raise InputError(f"optimized model {name} takes inputs {runner.input_names} and gives "
                             f"{len(runner.output_names)} output(s); the original takes {run_orig.input_names} and "
                             f"gives {len(run_orig.output_names)}", "pass the optimized model built from this original")
        variants[name] = Variant(name, "candidate", whats[name], runner)
    canonical = _canonical(original, opts)
    variants["floor"] = Variant("floor", "floor", peers_mod.WHAT["floor"],
                                OrtRunner(survey.floor_model(canonical), opts.target, threads))
    if peers:
        progress("peers", None)
        for p in peers_mod.build(peers, original, loaded, threads, run_orig.input_names, run_orig.output_names,
                                 opts.target, hint if hint is not None else path):
            variants[p.name] = Variant(p.name, "peer", p.what, p.runner, p.status, p.info)

    progress("verify", None)
    batch = opts.batch or specs[0].shape[0]
    feed = example_arrays(specs, seed=0, batch=batch)
    run_orig.check_feed(feed)
    feeds = {"random": ([example_arrays(specs, seed=s, batch=max(batch, 4)) for s in range(4)],
                        "random N(0,1), seeds 0-3")}
    if opts.data:
        chunks = data_feeds(opts.data, specs)
        run_orig.check_feed(chunks[0])
        feeds["data"] = (chunks, f"data file {opts.data}")
    for name, v in variants.items():
        if v.runner is None or v.role in ("original", "floor"):
            continue
        try:
            for key, (fs, label) in feeds.items():
                v.accuracy[key] = compare(run_orig, v.runner, fs, label)
        except Exception as e:  # noqa: BLE001
            if v.role == "candidate":
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise InputError(f"optimized model {name} cannot be compared with the original: {first}",
                                 "pass the optimized model built from this original") from e
            v.runner, v.accuracy, v.status = None, {}, peers_mod._reason(e)

    runners = {n: v.runner for n, v in variants.items() if v.runner is not None}
    progress("bench", 0.0)
    t0 = time.perf_counter()
    try:
        result = interleaved(runners, feed, seconds=seconds, warmup=warmup, progress=lambda f: progress("bench", f),
                             settle=settle)
    finally:
        if torch_threads is not None:  # the torch peer set the process-wide count; give it back
            import torch

            torch.set_num_threads(torch_threads)
    wall = time.perf_counter() - t0
    result.threads = threads
    result.machine = machine_info(threads)
    return ModelBench(path, loaded.kind, [s.to_json() for s in specs], batch, threads, variants, result,
                      {"before": survey.count_by_kind(original), "recognized": survey.count_by_kind(canonical),
                       "after": {n: survey.count_by_kind(m) for n, m in candidates.items()}},
                      notes, wall, peers_mod.versions())


def _canonical(original, opts):
    """The original after the canonicalize stage: decomposed LayerNorms/RMSNorms become single nodes.

    The floor is built from it, so that a normalization the exporter spelled out in
    elementwise ops (Llama's RMSNorm, say) is removed from the floor too; the stage only
    recognizes, it changes no math, and canonical nodes carry their function bodies.
    """
    import onnxruntime

    from .export import infer_shapes
    from .passes import PassContext, run_stage

    try:
        ctx = PassContext(target=opts.target, allow_approx=False, ort_version=onnxruntime.__version__)
        model, _ = run_stage(original, "canonicalize", ctx)
        return infer_shapes(model)
    except Exception:  # noqa: BLE001 - without recognition the floor is the plain one
        return original


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
        row = {"variant": name, "p50_ms": "n/a", "p90_ms": "n/a", "p99_ms": "n/a", "per_s": "n/a",
               "speedup": "n/a", "max_rel_err": "n/a", "top1": "n/a", "status": v.status}
        if name in mb.timed:
            t = mb.result.timings[name]
            tj = t.to_json()
            row.update(p50_ms=fmt_ms(tj["p50_ms"]), p90_ms=fmt_ms(tj["p90_ms"]), p99_ms=fmt_ms(tj["p99_ms"]),
                       per_s=f"{tj['throughput_per_s']:,.0f}")
            s, ci = mb.speedup(name), mb.speedup_ci(name)
            row["speedup"] = f"{s:.3f}x" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] == ci[0] else "")
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
            if v.info.get("fused"):
                row["status"] += "; fused " + ", ".join(f"{k} {n}" for k, n in v.info["fused"].items())
        rows.append(row)
    return rows


COLUMNS = (("variant", "variant"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
           ("per_s", "samples/s"), ("speedup", "speedup vs original [95% CI]"), ("max_rel_err", "max rel err"),
           ("top1", "top-1 agr."), ("status", "what / status"))


def markdown(mb: ModelBench, title: str | None = None) -> str:
    """A Markdown section for one model: provenance line, variant table, normalization cost left."""
    lines = [f"### {title or mb.model}", "",
             f"batch {mb.batch}, {len(mb.result.timings['original'].samples_ms) if mb.result else 0} interleaved rounds "
             f"in {mb.wall_seconds:.1f} s; {provenance(mb.machine, mb.threads)}", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in variant_rows(mb):
        lines.append("| " + " | ".join(str(r[k]).replace("|", "/") for k, _ in COLUMNS) + " |")
    left = mb.to_json()["norm_cost_left"]
    if left:
        lines += ["", "normalization cost left, (p50(opt) - p50(floor)) / (p50(orig) - p50(floor)): "
                  + ", ".join(f"{k} {'n/a (floor not faster than original)' if v is None else f'{v:.0%}'}"
                              for k, v in left.items())]
    for n in mb.notes:
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"


def plot_speedups(benches: list[ModelBench], path: str, title: str, variants: list[str] | None = None) -> None:
    """Horizontal bars: p50(original) / p50(variant) per model and variant, with 95 % bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in benches if b.result is not None]
    if variants is None:
        variants = []
        for b in benches:
            variants += [n for n in b.timed if n != "original" and n not in variants]
    colors = plt.get_cmap("tab10")
    n_models = max(1, len(benches))
    height = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(8.0, 1.8 + max(0.35, 0.12 * max(1, len(variants))) * n_models), dpi=110)
    for j, var in enumerate(variants):
        ys, xs, lo, hi = [], [], [], []
        for i, b in enumerate(benches):
            s = b.speedup(var)
            if s is None:
                continue
            ci = b.speedup_ci(var) or (s, s)
            ys.append(i + j * height)
            xs.append(s)
            lo.append(max(0.0, s - ci[0]) if ci[0] == ci[0] else 0.0)
            hi.append(max(0.0, ci[1] - s) if ci[1] == ci[1] else 0.0)
        if xs:
            ax.barh(ys, xs, height=height * 0.9, xerr=[lo, hi], color=colors(j % 10), label=var,
                    error_kw={"elinewidth": 0.8, "capsize": 1.5})
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + height * (len(variants) - 1) / 2 for i in range(len(benches))],
                  [os.path.splitext(os.path.basename(b.model))[0] for b in benches], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup vs original = p50(original) / p50(variant), 95 % bootstrap interval\n"
                  + (provenance(benches[0].machine, benches[0].threads) if benches else ""), fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
