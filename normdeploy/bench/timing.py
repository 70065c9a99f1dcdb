"""Latency of several runners measured side by side (DESIGN.md section 6).

After a warm-up, the runners are called in rounds, A B C, B C A, C A B, ... so that
machine drift and the order itself cancel out; every call is timed with
``time.perf_counter_ns``. Reported per runner: p50, p90, p99, mean and throughput
(samples per second at the measured batch). The speedup is the ratio of medians,
``p50(original) / p50(optimized)``; the share of normalization cost left is
``(p50(opt) - p50(floor)) / (p50(orig) - p50(floor))``. The noise allowance of a ratio is
derived from the run's own spread: the half-width of the ratio's 95 % bootstrap interval
over rounds. Every figure carries :func:`provenance` (CPU model, thread count, ONNX
Runtime version).
"""
from __future__ import annotations

import os
import platform
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
            "cores": len(os.sched_getaffinity(0))}


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


def provenance(machine: dict, threads: int) -> str:
    """Which machine, thread count and runtime produced a figure: printed next to every figure."""
    return (f"{machine.get('cpu', '?')} ({machine.get('machine', '?')}, {machine.get('cores', '?')} cores available), "
            f"{threads} thread{'s' if threads != 1 else ''}, onnxruntime {machine.get('onnxruntime', '?')}")
