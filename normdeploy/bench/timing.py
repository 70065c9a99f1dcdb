"""Latency of several variants measured side by side, in several sessions each (DESIGN.md section 6).

**Sessions.** An ONNX Runtime session carries a bias for its whole life (where its weights
and arenas landed in memory): four sessions of one byte-identical GPT-2 small file, timed
interleaved, read 184-215 ms, and interleaving does not cancel that. So every variant is
timed in ``sessions`` sessions (default :data:`DEFAULT_SESSIONS`), made by factories
(variant name -> a callable returning a fresh runner). Session ``b`` (0-based) is a block:
one new session of every variant, created in the order of the variants rotated by ``b``
(A1 B1 C1, then B2 C2 A2, then C3 A3 B3, ...; :func:`creation_order`), so no variant is
always the first or the last made; then timed, then closed before the next block is made.
At most one session per variant is alive at a time, as with a single session (a session of a
2 GB model holds GBs). For models too large for that (``alive="one"``, ``--bench-alive``,
:func:`one_session_alive`), one session at all is alive: a block's variants are timed in turn.

**Within a block** the runners are called, after a warm-up, in rounds A B C, B C A, C A B, ...
so that machine drift and the order itself cancel out; every call is timed with the clock
(``time.perf_counter_ns``). The time budget ``seconds`` and the warm-up calls are shared out
evenly over the blocks, and every block runs at least ``ceil(min_rounds / sessions)`` rounds.

**Figures.** A variant's p50 is the median over its sessions of each session's p50,
``p50(v) = median_b(median_t x[v, b, t])``: one session with a bias (any size) among three
moves it not at all, where the median of the pooled calls would move toward it. p90/p99/mean
are over all calls pooled. The speedup is the ratio of those p50s,
``p50(original) / p50(optimized)``; the share of normalization cost left is
``(p50(opt) - p50(floor)) / (p50(orig) - p50(floor))``. The session spread is reported per
variant: the smallest and largest per-session p50.

**Interval.** The 95 % interval of a ratio is a two-stage (cluster) bootstrap: draw ``S``
blocks with replacement out of the ``S`` blocks, then within each drawn block draw its
paired rounds with replacement (the same rounds for both variants: a round's two calls
share the machine's state), take each drawn session's p50, their median per variant, and the
ratio; the 2.5 and 97.5 percentiles of 400 such ratios. Resampling blocks carries the
session-to-session spread into the interval (with one session it is the round bootstrap).
Its limit: the median of ``S`` drawn sessions never leaves the range of the ``S`` sessions, so
the session part of the interval reaches at most the sessions' range, which holds the median
session with probability ``1 - 2^(1-S)`` (75 % at 3 sessions, 94 % at 5): more sessions
(``--sessions``) buy a more honest interval on a machine whose sessions differ. An interval
is given only from :data:`MIN_ROUNDS_FOR_INTERVAL` paired rounds on (all blocks together);
the share of normalization cost is given only where it is a measurement in [0, 1]
(:meth:`BenchResult.norm_cost_share`). Every figure carries :func:`provenance` (CPU model,
thread count, ONNX Runtime version).

**Handover.** ONNX Runtime's intra-op thread pool keeps its threads spinning for a while after
every call (22-50 ms of CPU on this 2-core machine at 2 threads; at 1 thread there is no
pool, and OpenVINO's threads go quiet within 1 ms). In rotating rounds every variant is almost
always called right after the same other variant (its predecessor in the list), so a variant
that follows a spinning session shares a core with the spin during its timed call and one that
follows a quiet runtime does not: in the peers' order (original, normdeploy, ..., OpenVINO) the
original follows OpenVINO and every ONNX Runtime variant follows another ONNX Runtime session,
and ONNX Runtime on the original itself read 0.78-0.95x of the original (MiniLM, ResNet-50,
GPT-2 small at batch 8, 2 threads; ``benchmarks/results/session_bias_handover_b8.md``). So before each timed
call a variant is called, untimed, for at least the handover time (``handover``; and at least
``settle`` times): the previous variant's threads go quiet while the variant's own threads do
work, and the timed call finds the machine as a model serving alone does. ``handover="auto"``
measures each variant's spill once, after the first block's warm-up (:func:`measure_spill`: CPU
time the process burns in an idle window after one call) and takes
:data:`HANDOVER_MARGIN` times the largest, at most :data:`MAX_HANDOVER_S`; at 1 thread it is 0
without probing, and with one session alive at a time (``alive="one"``) too: the previous
session is closed, its threads joined, before the next is made. With the handover the same
A/B read 0.98-1.02, every interval covering 1.0.

**Fresh processes.** Sessions are made in this process, and no fresh process per session is
offered: ``benchmarks/session_bias.py --processes`` found sessions within one process already
as far apart as sessions in fresh processes (GPT-2 small: 7 % within this process, 14 % within
a fresh one; resnet_bn: 3.1 % here, 1.3-1.5 % in fresh ones; loaded 2-core machine,
benchmarks/results/session_bias*.md), so new sessions sample the bias without the cost of a
process (and a second copy of the model) each.
"""
from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: the fewest paired rounds (all sessions together) a 95 % interval of a ratio of medians is given
#: from. The bootstrap resamples rounds, so its bounds are order statistics of the rounds; the
#: distribution-free 95 % interval of a median of n rounds is [x(k), x(n+1-k)] with
#: P(Binomial(n, 1/2) < k) <= 2.5 %. Below 6 rounds no such k exists (even [min, max] covers the
#: median with probability 1 - 2^(1-n) < 95 %); from 20 rounds on k >= 6, so each bound leaves out
#: at least the 5 most extreme rounds at its end, and no handful of disturbed rounds (a background
#: process, a clock change) sets a bound by itself. Fewer rounds give a point estimate and "too few rounds".
MIN_ROUNDS_FOR_INTERVAL = 20

#: sessions per variant by default (``--sessions``); see the module docstring for what more buy
DEFAULT_SESSIONS = 3

#: the idle window after a call in which :func:`measure_spill` counts the CPU time a runtime's threads burn
SPILL_WINDOW_S = 0.1
#: ``handover="auto"`` waits this many times the largest spill measured (:func:`auto_handover`) ...
HANDOVER_MARGIN = 1.25
#: ... and at most this long before every timed call
MAX_HANDOVER_S = 0.4

#: how many sessions :func:`interleaved` holds at once: every variant's (``all``, calls interleaved
#: round by round) or one (``one``: variants timed in turn, for models too large to hold side by side)
ALIVE_MODES = ("all", "one")
#: ``--bench-alive auto`` times one session at a time from this many weight bytes (:func:`one_session_alive`)
ONE_ALIVE_BYTES = 1 << 30
#: the same for a half-precision model on the CPU (its sessions hold float32 copies of the weights)
ONE_ALIVE_HALF_BYTES = 256 << 20


@dataclass
class Timing:
    """One variant's calls: ``samples_ms`` all of them, ``session_ms`` the same split by session (block).

    A Timing made from a flat list alone is one session.
    """

    name: str
    samples_ms: list[float] = field(default_factory=list)
    batch: int = 1
    session_ms: list[list[float]] = field(default_factory=list)

    def per_session(self) -> list[list[float]]:
        return [s for s in self.session_ms if s] if self.session_ms else ([self.samples_ms] if self.samples_ms else [])

    def session_p50s(self) -> list[float]:
        return [float(np.median(s)) for s in self.per_session()]

    def p50(self) -> float:
        """Median over sessions of each session's p50 (the plain median with one session)."""
        p = self.session_p50s()
        return float(np.median(p)) if p else float("nan")

    def pct(self, q: float) -> float:
        """Percentile ``q`` of all calls pooled, except q = 50: :meth:`p50`."""
        if q == 50:
            return self.p50()
        return float(np.percentile(self.samples_ms, q)) if self.samples_ms else float("nan")

    def to_json(self) -> dict:
        s = np.asarray(self.samples_ms)
        p50s = self.session_p50s()
        return {"p50_ms": self.pct(50), "p90_ms": self.pct(90), "p99_ms": self.pct(99),
                "mean_ms": float(s.mean()) if s.size else float("nan"),
                "throughput_per_s": float(self.batch * 1000.0 / self.p50()) if s.size else float("nan"),
                "runs": int(s.size), "batch": self.batch, "sessions": len(p50s), "session_p50_ms": p50s,
                "session_spread_ms": [min(p50s), max(p50s)] if p50s else None}


@dataclass
class BenchResult:
    timings: dict[str, Timing]
    threads: int
    machine: dict
    #: ``all``: every variant's session alive in a block, calls interleaved round by round; ``one``: in turn
    alive: str = "all"
    #: the handover before every timed call, ms (module docstring), and the spill measured per variant for it
    handover_ms: float = 0.0
    spill_ms: dict[str, float] = field(default_factory=dict)

    def p50(self, name: str) -> float:
        return self.timings[name].p50()

    def ratio(self, num: str, den: str) -> float:
        return self.p50(num) / self.p50(den)

    @property
    def sessions(self) -> int:
        """Sessions per variant (blocks) of the run."""
        return max((len(t.per_session()) for t in self.timings.values()), default=0)

    def _blocks(self, num: str, den: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per block, the paired rounds of ``num`` and ``den`` (blocks with no round left out)."""
        a, b = self.timings[num].per_session(), self.timings[den].per_session()
        out = []
        for x, y in zip(a, b):
            n = min(len(x), len(y))
            if n:
                out.append((np.asarray(x[:n], dtype=float), np.asarray(y[:n], dtype=float)))
        return out

    def rounds(self, *names: str) -> int:
        """The paired rounds of ``names`` over all sessions (every runner of the run when none is named)."""
        names = names or tuple(self.timings)
        per = [t.per_session() for t in (self.timings[n] for n in names)]
        if not per or not per[0]:
            return 0
        return sum(min(len(p[b]) if b < len(p) else 0 for p in per) for b in range(max(len(p) for p in per)))

    def session_ratios(self, num: str, den: str) -> list[float]:
        """p50(num) / p50(den) within each session (block): the session-to-session spread of a ratio."""
        return [float(np.median(x) / np.median(y)) for x, y in self._blocks(num, den)]

    def ratio_interval(self, num: str, den: str, seed: int = 0, n_boot: int = 400) -> tuple[float, float]:
        """95 % two-stage bootstrap interval of the ratio (blocks, then paired rounds within them; module
        docstring); NaNs from fewer than :data:`MIN_ROUNDS_FOR_INTERVAL` rounds (:meth:`interval_note`)."""
        blocks = self._blocks(num, den)
        if sum(len(x) for x, _ in blocks) < MIN_ROUNDS_FOR_INTERVAL:
            return float("nan"), float("nan")
        rng = np.random.default_rng(seed)
        s = len(blocks)
        pick = rng.integers(0, s, (n_boot, s)) if s > 1 else np.zeros((n_boot, 1), dtype=int)
        med_a, med_b = np.empty((n_boot, s)), np.empty((n_boot, s))
        for j in range(s):  # draw slot j of every replicate: an independent resample of the block it drew
            for k, (x, y) in enumerate(blocks):
                rows = np.flatnonzero(pick[:, j] == k)
                if rows.size:
                    idx = rng.integers(0, len(x), (rows.size, len(x)))
                    med_a[rows, j], med_b[rows, j] = np.median(x[idx], axis=1), np.median(y[idx], axis=1)
        r = np.median(med_a, axis=1) / np.median(med_b, axis=1)
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


def creation_order(names: list[str], block: int) -> list[str]:
    """The order the sessions of block ``block`` (0-based) are created in: ``names`` rotated by ``block``
    (A B C, then B C A, then C A B, ...), so every variant is made first, and last, equally often."""
    k = block % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def _close(runner) -> None:
    close = getattr(runner, "close", None)
    if callable(close):
        close()


def measure_spill(runner, feed: dict, window_s: float = SPILL_WINDOW_S, sleep=time.sleep,
                  cpu=time.process_time) -> float:
    """The CPU time (ms) this process burns in the ``window_s`` after one call of ``runner``, nothing else running.

    An idle window first lets whatever ran before go quiet; then one call, then the window, with the
    process's CPU time (all its threads) read before and after. A window busy for more than 80 % of
    its length may have cut the spill short, so it is measured once more with a window twice as
    long. Several spinning threads count several times: the handover taken from it errs long.
    ``sleep`` and ``cpu`` are injectable for tests."""
    busy = 0.0
    for w in (window_s, 2 * window_s):
        sleep(w)
        runner.run(feed)
        c0 = cpu()
        sleep(w)
        busy = cpu() - c0
        if busy <= 0.8 * w:
            break
    return max(0.0, busy) * 1000.0


def runner_threads(runners) -> int:
    """The largest thread count the runners declare (``threads``; 1 where a runner declares none)."""
    return max((int(getattr(r, "threads", 1) or 1) for r in runners), default=1)


def auto_handover(runners: dict, feed: dict, threads: int, **probe) -> tuple[float, dict[str, float]]:
    """``handover="auto"``: ``(seconds, {variant: spill ms})``, seconds = :data:`HANDOVER_MARGIN` x the largest
    :func:`measure_spill` of the runners, at most :data:`MAX_HANDOVER_S`; ``(0, {})`` at 1 thread, probing
    nothing (no pool to spin). ``probe`` goes to :func:`measure_spill` (tests)."""
    if threads <= 1:
        return 0.0, {}
    spill = {n: measure_spill(r, feed, **probe) for n, r in runners.items()}
    return min(MAX_HANDOVER_S, HANDOVER_MARGIN * max(spill.values(), default=0.0) / 1000.0), spill


def _handover(runner, feed: dict, settle: int, handover_s: float, clock) -> int:
    """Untimed calls of ``runner`` before a timed one: at least ``settle``, and (handover > 0) at least one and
    until ``handover_s`` has passed since the first (module docstring). Returns how many were made."""
    calls = 0
    start = clock()
    while calls < settle or (handover_s > 0 and (calls == 0 or (clock() - start) / 1e9 < handover_s)):
        runner.run(feed)
        calls += 1
    return calls


def _handover_seconds(handover) -> float | None:
    """``handover`` checked: None for ``"auto"``, else its seconds (a number >= 0)."""
    if handover == "auto":
        return None
    if isinstance(handover, bool) or not isinstance(handover, (int, float)) or not handover >= 0:
        raise ValueError(f"handover must be 'auto' or a number of seconds >= 0, not {handover!r}")
    return float(handover)


def interleaved(factories: dict[str, Callable[[], object]], feed: dict, seconds: float = 3.0, warmup: int = 5,
                min_rounds: int = 10, max_rounds: int = 200_000, progress=None, settle: int = 0,
                sessions: int = DEFAULT_SESSIONS, first: dict | None = None, clock=time.perf_counter_ns,
                on_create=None, alive: str = "all", handover="auto") -> BenchResult:
    """Time every variant on ``feed`` in ``sessions`` sessions each, interleaved (module docstring).

    ``factories`` maps a variant's name to a callable that makes a new runner of it (an object with
    ``run(feed)``, and ``close()`` where it holds memory). ``first`` may give already-built runners
    for the first block (those verification made), so they are not built twice; every runner is
    closed when its block is done, ``first`` ones included. ``seconds`` is the budget of all the
    timed rounds together, shared out evenly over the blocks; every block runs at least
    ``ceil(min_rounds / sessions)`` rounds and at most ``max_rounds / sessions``. The ``warmup`` untimed
    calls of every variant are shared out the same way, ``ceil(warmup / sessions)`` per session (each
    session is new and warms up on its own; on GPT-2 small at 1 thread, 10 warm-up calls in each of 3
    sessions took 50 s of a 130 s bench stage, the rounds being few anyway). ``settle`` untimed calls
    precede each timed call of a runner within a round, so that a runner is not charged for the caches
    and thread pools the previous runner (another runtime, say torch or OpenVINO) left cold: what is
    timed is back-to-back, steady-state inference, as when one model serves alone. ``handover`` (seconds, or
    ``"auto"``: :func:`auto_handover`, measured on the first block's runners after their warm-up) extends
    those untimed calls until that long has passed, so that the previous variant's spinning thread pool
    has gone quiet (module docstring, "Handover"); the result carries it (``handover_ms``, ``spill_ms``).
    ``clock`` returns
    nanoseconds (tests inject a fake one); ``on_create(block, name)`` is called as each session is made.

    ``alive="one"`` (:data:`ALIVE_MODES`): one session alive at a time, for models whose sessions do not
    fit in memory side by side (:func:`one_session_alive`). Within a block each variant's session is
    made, warmed up, timed alone for its share of the block's budget and closed before the next
    variant's is made, in the block's creation order, rotated to start at the first variant ``first``
    gives (its runner is block 0's first session; other given runners are closed at once). The calls
    of two variants are then not interleaved round by round: drift within a block is not cancelled
    there, only across blocks by the rotating order, and the bootstrap pairs calls by index
    (independent calls: the same distribution as resampling each variant alone).
    """
    if isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 1:
        raise ValueError(f"sessions must be an integer >= 1, not {sessions!r}")
    if alive not in ALIVE_MODES:
        raise ValueError(f"alive must be one of {', '.join(ALIVE_MODES)}, not {alive!r}")
    handover_s = _handover_seconds(handover)
    for n, f in factories.items():
        if not callable(f):
            raise TypeError(f"interleaved: the factory of {n!r} is a {type(f).__name__}, not a callable that "
                            "returns a runner (wrap it: lambda: runner)")
    names = list(factories)
    first = dict(first or {})
    batch = next(iter(feed.values())).shape[0] if feed else 1
    timings = {n: Timing(n, batch=batch) for n in names}
    per_block_s = seconds / sessions
    block_min = max(1, math.ceil(min_rounds / sessions))
    block_max = max(1, max_rounds // sessions)
    block_warmup = math.ceil(warmup / sessions) if warmup > 0 else 0
    threads = 1
    if alive == "one":
        return _one_alive(factories, feed, timings, first, sessions=sessions, per_block_s=per_block_s,
                          block_min=block_min, block_max=block_max, block_warmup=block_warmup, settle=settle,
                          progress=progress, clock=clock, on_create=on_create, handover_s=handover_s or 0.0)
    spill: dict[str, float] = {}
    for block in range(sessions):
        runners = {}
        try:
            for n in creation_order(names, block):
                runners[n] = first.pop(n) if block == 0 and n in first else factories[n]()
                if on_create is not None:
                    on_create(block, n)
            if block == 0:
                threads = getattr(next(iter(runners.values())), "threads", 1) if runners else 1
            for _ in range(block_warmup):
                for n in names:
                    runners[n].run(feed)
            if handover_s is None:  # auto: measured once, on the first block's warm runners
                handover_s, spill = auto_handover({n: runners[n] for n in names}, feed,
                                                  runner_threads(runners.values()))
            samples = {n: [] for n in names}
            start = clock()
            rounds = 0
            while rounds < block_max and (rounds < block_min or (clock() - start) / 1e9 < per_block_s):
                order = names[rounds % len(names):] + names[:rounds % len(names)]
                for n in order:
                    _handover(runners[n], feed, settle, handover_s, clock)
                    t0 = clock()
                    runners[n].run(feed)
                    samples[n].append((clock() - t0) / 1e6)
                rounds += 1
                if progress is not None:
                    done = min(1.0, (clock() - start) / 1e9 / per_block_s) if per_block_s > 0 else 1.0
                    progress(min(1.0, (block + done) / sessions))
        finally:
            for r in runners.values():
                _close(r)
            if block == 0:
                for r in first.values():  # given but not asked for: closed all the same
                    _close(r)
                first = {}
        for n in names:
            timings[n].session_ms.append(samples[n])
            timings[n].samples_ms.extend(samples[n])
    return BenchResult(timings, threads, machine_info(threads), handover_ms=1000.0 * (handover_s or 0.0),
                       spill_ms=spill)


def _one_alive(factories, feed, timings, first, *, sessions, per_block_s, block_min, block_max, block_warmup,
               settle, progress, clock, on_create, handover_s) -> BenchResult:
    """:func:`interleaved` with ``alive="one"``: in every block, each variant's session alone, in turn.

    The rotation starts at the first variant ``first`` gives a runner of, which is block 0's first session;
    the other given runners are closed before anything runs (two alive sessions is what this mode avoids).
    A given ``handover_s`` precedes each session's first timed call (``"auto"`` is 0 here: the session
    before was closed, its threads joined)."""
    names = list(factories)
    offset = next((names.index(n) for n in first if n in names), 0)
    given = first.pop(names[offset], None) if names else None
    for r in first.values():
        _close(r)
    threads = 1
    share_s = per_block_s / len(names) if names else 0.0
    steps = sessions * len(names)
    for block in range(sessions):
        samples = {n: [] for n in names}
        for i, n in enumerate(creation_order(names, block + offset)):
            runner = given if given is not None else factories[n]()
            given = None
            try:
                if on_create is not None:
                    on_create(block, n)
                if block == 0 and i == 0:
                    threads = getattr(runner, "threads", 1)
                for _ in range(block_warmup):
                    runner.run(feed)
                _handover(runner, feed, settle, handover_s, clock)
                start = clock()
                while len(samples[n]) < block_max and (len(samples[n]) < block_min
                                                       or (clock() - start) / 1e9 < share_s):
                    t0 = clock()
                    runner.run(feed)
                    samples[n].append((clock() - t0) / 1e6)
                    if progress is not None:
                        done = min(1.0, (clock() - start) / 1e9 / share_s) if share_s > 0 else 1.0
                        progress(min(1.0, (block * len(names) + i + done) / steps))
            finally:
                _close(runner)
        for n in names:
            timings[n].session_ms.append(samples[n])
            timings[n].samples_ms.extend(samples[n])
    return BenchResult(timings, threads, machine_info(threads), alive="one", handover_ms=1000.0 * handover_s)


def one_session_alive(weight_bytes: int, half_on_cpu: bool = False) -> bool:
    """Whether ``--bench-alive auto`` times one session at a time: from :data:`ONE_ALIVE_BYTES` of weights
    (:data:`ONE_ALIVE_HALF_BYTES` for a half-precision model on the CPU, whose sessions hold float32
    copies, about 3x its weight bytes each).

    Why a threshold and not a memory probe: three sessions side by side (original, optimized, floor)
    hold three copies of the weights, 3-9x their bytes with the pipeline's own copy, which is what
    issue 13's bound (peak RSS at most 4x the weights for a full run) forbids; below the threshold
    that is a few hundred MB, and round-by-round interleaving (drift cancelled within every block)
    is the better measurement.
    """
    return weight_bytes >= (ONE_ALIVE_HALF_BYTES if half_on_cpu else ONE_ALIVE_BYTES)


def handover_text(result: BenchResult) -> str:
    """The handover of a run, for a report's method line ("" where there was none)."""
    if not result.handover_ms:
        return ""
    spill = f", {HANDOVER_MARGIN:g} x the largest spill measured, {max(result.spill_ms.values()):.1f} ms" \
        if result.spill_ms else ""
    return (f"; each timed call preceded by untimed calls of the same variant for {result.handover_ms:.0f} ms "
            f"(the handover{spill}: the previous variant's spinning thread pool goes quiet first)")


def provenance(machine: dict, threads: int) -> str:
    """Which machine, thread count and runtime produced a figure: printed next to every figure."""
    return (f"{machine.get('cpu', '?')} ({machine.get('machine', '?')}, {machine.get('cores', '?')} cores available), "
            f"{threads} thread{'s' if threads != 1 else ''}, onnxruntime {machine.get('onnxruntime', '?')}")
