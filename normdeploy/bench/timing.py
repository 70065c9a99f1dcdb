"""Latency of several runners measured side by side (DESIGN.md section 6).

After a warm-up, the runners are called in rounds, A B C, B C A, C A B, ... so that
machine drift and the order itself cancel out; every call is timed with
``time.perf_counter_ns``. Reported per runner: p50, p90, p99, mean and throughput
(samples per second at the measured batch). The speedup is the ratio of medians,
``p50(original) / p50(optimized)``; the share of normalization cost left is
``(p50(opt) - p50(floor)) / (p50(orig) - p50(floor))``. The noise allowance of a ratio is
derived from the run's own spread: the half-width of the ratio's 95 % bootstrap interval
over rounds, given only from :data:`MIN_ROUNDS_FOR_INTERVAL` rounds on; the share of
normalization cost is given only where it is a measurement in [0, 1]
(:meth:`BenchResult.norm_cost_share`). Every figure carries :func:`provenance` (CPU model,
thread count, ONNX Runtime version).
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

#: the fewest paired rounds a 95 % interval of a ratio of medians is given from. The bootstrap
#: resamples rounds, so its bounds are order statistics of the rounds; the distribution-free 95 %
#: interval of a median of n rounds is [x(k), x(n+1-k)] with P(Binomial(n, 1/2) < k) <= 2.5 %.
#: Below 6 rounds no such k exists (even [min, max] covers the median with probability
#: 1 - 2^(1-n) < 95 %); from 20 rounds on k >= 6, so each bound leaves out at least the 5 most
#: extreme rounds at its end, and no handful of disturbed rounds (a background process, a clock
#: change) sets a bound by itself. Fewer rounds give a point estimate and "too few rounds".
MIN_ROUNDS_FOR_INTERVAL = 20


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

    def rounds(self, *names: str) -> int:
        """The paired rounds of ``names`` (every runner of the run when none is named)."""
        return min(len(self.timings[n].samples_ms) for n in (names or self.timings))

    def ratio_interval(self, num: str, den: str, seed: int = 0, n_boot: int = 400) -> tuple[float, float]:
        """95 % bootstrap interval of the ratio of medians, resampling paired rounds; NaNs from fewer
        than :data:`MIN_ROUNDS_FOR_INTERVAL` rounds (:meth:`interval_note` says so)."""
        a, b = np.asarray(self.timings[num].samples_ms), np.asarray(self.timings[den].samples_ms)
        n = min(len(a), len(b))
        if n < MIN_ROUNDS_FOR_INTERVAL:
            return float("nan"), float("nan")
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, (n_boot, n))
        r = np.median(a[:n][idx], axis=1) / np.median(b[:n][idx], axis=1)
        return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))

    def interval_note(self, num: str, den: str) -> str | None:
        """Why :meth:`ratio_interval` gives no interval (too few rounds), or None when it gives one."""
        n = self.rounds(num, den)
        if n >= MIN_ROUNDS_FOR_INTERVAL:
            return None
        return (f"too few rounds for an interval ({n} < {MIN_ROUNDS_FOR_INTERVAL}; a longer run gives one): "
                "the ratio is a point estimate")

    def norm_cost_left(self, original="original", optimized="optimized", floor="floor") -> float | None:
        """The share of normalization cost left where it is a measurement, else None (:meth:`norm_cost_share`)."""
        return self.norm_cost_share(original, optimized, floor)[0]

    def norm_cost_share(self, original="original", optimized="optimized", floor="floor"
                        ) -> tuple[float | None, str | None]:
        """``(share, None)`` where the share of normalization cost left is a measurement, else ``(None, why)``.

        share = (p50(optimized) - p50(floor)) / (p50(original) - p50(floor)). It is a figure only
        where the floor is measurably faster than the original (the 95 % interval of
        p50(original) / p50(floor) lies above 1; otherwise the span is noise and so is any share of
        it), and only in [0, 1] (DESIGN.md section 6). A share outside [0, 1] by no more than the
        run's noise (the optimized model not measurably faster than the floor, or not measurably
        slower than the original) is clamped to 0 or 1; one measurably outside is no share: the
        floor bounds nothing there (DyT and spiking models run slower without their norms), or the
        optimized model is slower than the original.
        """
        if floor not in self.timings:
            return None, "no floor was timed"
        lo, _ = self.ratio_interval(original, floor)
        if lo != lo:
            return None, self.interval_note(original, floor)
        if lo <= 1.0:
            return None, (f"the floor is not measurably faster than the original (95 % interval of p50(original) / "
                          f"p50(floor) reaches {lo:.3f}): no normalization cost to share out at this noise")
        share = (self.p50(optimized) - self.p50(floor)) / (self.p50(original) - self.p50(floor))
        if share < 0:
            if self.ratio_interval(optimized, floor)[1] < 1.0:
                return None, ("outside [0, 1]: the optimized model is measurably faster than the floor, which is "
                              "then no bound (removing the normalizations does not leave the arithmetic as cheap)")
            share = 0.0
        elif share > 1:
            if self.ratio_interval(optimized, original)[0] > 1.0:
                return None, "outside [0, 1]: the optimized model is measurably slower than the original"
            share = 1.0
        return share, None


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
