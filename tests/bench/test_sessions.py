"""Several sessions per variant (normdeploy.bench.timing): a per-session bias widens the interval, not the ratio.

The runners here are fakes on a fake clock: a call advances the clock by the variant's cost times its
session's bias (times a little seeded noise), so every figure has a known true value.
"""
import numpy as np
import pytest

from normdeploy.bench import ModelBench, Variant
from normdeploy.bench import gate as gate_mod
from normdeploy.bench.timing import BenchResult, Timing, creation_order, interleaved, machine_info
from normdeploy.core.errors import InputError
from normdeploy.options import BenchOptions, Options

FEED = {"x": np.zeros((1, 4), np.float32)}


class Clock:
    def __init__(self):
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class Fake:
    """A runner whose every call costs ``cost_ms * bias`` (times 1 + noise) on ``clock``."""

    def __init__(self, clock, cost_ms, bias, rng, noise, alive):
        self.clock, self.cost, self.bias, self.rng, self.noise, self.alive = clock, cost_ms, bias, rng, noise, alive
        self.closed = False
        alive.add(id(self))
        self.threads = 1

    def run(self, feed):
        assert not self.closed, "a closed runner was called"
        self.clock.ns += int(1e6 * self.cost * self.bias * (1 + self.noise * self.rng.standard_normal()))
        return []

    def close(self):
        self.closed = True
        self.alive.discard(id(self))


def fakes(costs: dict[str, float], biases: dict[str, list[float]], noise=0.002, seed=0):
    """(clock, factories, log): the k-th session made of variant v has bias biases[v][k]."""
    clock, rng, alive = Clock(), np.random.default_rng(seed), set()
    made = {n: 0 for n in costs}
    log = {"created": [], "max_alive": 0}

    def factory(name):
        def make():
            k = made[name]
            made[name] += 1
            r = Fake(clock, costs[name], biases.get(name, [1.0] * 99)[k], rng, noise, alive)
            log["created"].append(name)
            log["max_alive"] = max(log["max_alive"], len(alive))
            return r
        return make

    return clock, {n: factory(n) for n in costs}, log


def run(costs, biases, sessions, seconds=0.3, noise=0.002, seed=0, **kw):
    clock, factories, log = fakes(costs, biases, noise, seed)
    res = interleaved(factories, FEED, seconds=seconds, warmup=2, sessions=sessions, clock=clock, **kw)
    return res, log


def flattened(res: BenchResult) -> BenchResult:
    """The same calls as one session: what the interval was before sessions (rounds only)."""
    return BenchResult({n: Timing(n, list(t.samples_ms)) for n, t in res.timings.items()}, 1, {})


def test_creation_order_rotates_as_documented():
    assert [creation_order(list("ABC"), b) for b in range(4)] == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]
    seen = []
    _, log = run({"A": 1.0, "B": 1.0, "C": 1.0}, {}, sessions=3, on_create=lambda b, n: seen.append((b, n)))
    assert seen == [(0, "A"), (0, "B"), (0, "C"), (1, "B"), (1, "C"), (1, "A"), (2, "C"), (2, "A"), (2, "B")]
    assert log["created"] == [n for _, n in seen]


def test_session_count_is_respected_and_at_most_one_session_per_variant_is_alive():
    res, log = run({"A": 1.0, "B": 2.0}, {}, sessions=4)
    assert res.sessions == 4 and log["created"].count("A") == 4 and log["created"].count("B") == 4
    for t in res.timings.values():
        assert len(t.session_ms) == 4 and all(len(s) >= 3 for s in t.session_ms)  # ceil(10 / 4) rounds at least
        assert sum(len(s) for s in t.session_ms) == len(t.samples_ms)
        assert t.to_json()["sessions"] == 4
    assert log["max_alive"] == 2  # the block's sessions are closed before the next block's are made
    one, _ = run({"A": 1.0, "B": 2.0}, {}, sessions=1)
    assert one.sessions == 1


def test_first_runners_are_the_first_block_and_are_closed():
    clock, factories, log = fakes({"A": 1.0, "B": 1.0}, {})
    alive = set()
    given = Fake(clock, 1.0, 1.0, np.random.default_rng(1), 0.0, alive)
    res = interleaved(factories, FEED, seconds=0.1, warmup=1, sessions=2, first={"A": given}, clock=clock)
    assert log["created"] == ["B", "B", "A"]  # block 0 makes only B (A was given); block 1 makes B then A
    assert given.closed and res.sessions == 2


def test_a_runner_instead_of_a_factory_is_refused():
    clock = Clock()
    with pytest.raises(TypeError, match="not a callable"):
        interleaved({"A": Fake(clock, 1.0, 1.0, np.random.default_rng(0), 0.0, set())}, FEED, sessions=1, clock=clock)
    with pytest.raises(ValueError):
        interleaved({"A": lambda: None}, FEED, sessions=0)


def test_the_median_across_sessions_removes_one_biased_session():
    # A and B cost the same; one of A's three sessions runs 30 % slow (what one session of a large model can)
    res, _ = run({"A": 1.0, "B": 1.0}, {"A": [1.0, 1.3, 1.0], "B": [1.0, 1.0, 1.0]}, sessions=3)
    assert res.ratio("A", "B") == pytest.approx(1.0, abs=0.005)
    lo, hi = res.timings["A"].to_json()["session_spread_ms"]
    assert lo == pytest.approx(1.0, rel=0.01) and hi == pytest.approx(1.3, rel=0.01)  # the spread is reported
    # one session alone carries the bias straight into the ratio, with an interval that excludes the truth
    single, _ = run({"A": 1.0, "B": 1.0}, {"A": [1.3], "B": [1.0]}, sessions=1)
    slo, shi = single.ratio_interval("A", "B")
    assert single.ratio("A", "B") == pytest.approx(1.3, rel=0.01) and slo > 1.2


def test_the_interval_widens_with_session_bias_and_covers_the_true_ratio():
    costs = {"A": 1.2, "B": 1.0}  # true ratio 1.2
    quiet, _ = run(costs, {}, sessions=3)
    biased, _ = run(costs, {"A": [1.0, 1.08, 0.95], "B": [1.04, 0.97, 1.0]}, sessions=3)
    qlo, qhi = quiet.ratio_interval("A", "B")
    blo, bhi = biased.ratio_interval("A", "B")
    assert qlo <= 1.2 <= qhi and blo <= 1.2 <= bhi
    assert bhi - blo > 5 * (qhi - qlo)
    # the session spread is inside the interval: every session's own ratio lies within it
    per = biased.session_ratios("A", "B")
    assert len(per) == 3 and blo <= min(per) + 1e-9 and max(per) - 1e-9 <= bhi
    # the rounds-only bootstrap of the same calls is far narrower: it ignores the session spread
    flo, fhi = flattened(biased).ratio_interval("A", "B")
    assert fhi - flo < (bhi - blo) / 3


def test_coverage_with_random_session_biases():
    """Over many runs with lognormal session biases (sigma 5 %), the 5-session interval covers the true
    ratio far more often than the rounds-only interval of the same calls."""
    rng = np.random.default_rng(7)
    covered = covered_flat = 0
    trials = 30
    for t in range(trials):
        biases = {v: list(np.exp(0.05 * rng.standard_normal(5))) for v in ("A", "B")}
        res, _ = run({"A": 1.2, "B": 1.0}, biases, sessions=5, seconds=0.2, seed=t)
        lo, hi = res.ratio_interval("A", "B")
        flo, fhi = flattened(res).ratio_interval("A", "B")
        covered += lo <= 1.2 <= hi
        covered_flat += flo <= 1.2 <= fhi
    assert covered >= 0.8 * trials
    assert covered_flat <= 0.5 * trials


def _bench(res: BenchResult) -> ModelBench:
    variants = {n: Variant(n, "original" if n == "original" else "floor" if n == "floor" else "candidate", n)
                for n in res.timings}
    res.machine = machine_info(1)
    return ModelBench("m.onnx", "onnx", [], 1, 1, variants, res, {}, [])


def test_gate_noise_includes_the_session_spread():
    costs = {"original": 1.0, "cand": 1.06, "floor": 0.5}
    biases = {"original": [1.0, 1.1, 0.93], "cand": [0.95, 1.0, 1.09], "floor": [1.0, 1.0, 1.0]}
    res, _ = run(costs, biases, sessions=3, seconds=0.5)
    (lat,) = gate_mod.latency_checks(_bench(res), "cand", gate_mod.Thresholds())
    lo, hi = res.ratio_interval("cand", "original")
    assert lat.details["noise"] == pytest.approx((hi - lo) / 2) and lat.details["noise"] > 0.05
    assert lat.details["sessions"] == 3 and len(lat.details["session_ratios"]) == 3
    assert lat.verdict == "PASS" and "3 sessions" in lat.text  # 6 % slower is within this machine's session noise
    # the same calls judged by rounds alone: the noise is tiny, and the 6 % slowdown fails the 5 % allowance
    (flat,) = gate_mod.latency_checks(_bench(flattened(res)), "cand", gate_mod.Thresholds())
    assert flat.details["noise"] < 0.01 and flat.verdict == "FAIL"


def test_sessions_option():
    assert BenchOptions().sessions == 3 and Options.from_flat(sessions=5).bench.sessions == 5
    with pytest.raises(InputError, match="--sessions"):
        BenchOptions(sessions=0)
    with pytest.raises(InputError, match="--sessions"):
        BenchOptions(sessions=1.5)


def test_gate_file_takes_sessions(tmp_path):
    f = tmp_path / "gate.toml"
    f.write_text("[gate]\nsessions = 5\n")
    assert gate_mod.read_file(str(f)) == ({}, {"sessions": 5})


@pytest.mark.slow  # exports the digits model and times it
def test_optimize_reports_sessions_and_their_spread(tmp_path):
    import os

    import normdeploy
    from normdeploy.package import render_markdown
    from tests.conftest import MODELS

    res = normdeploy.optimize(os.path.join(MODELS, "digits_cnn_bn_un.pt"), seconds=0.6, warmup=2, threads=1, sessions=2)
    lat = res.report["latency"]
    assert lat["sessions"] == 2 and len(lat["speedup_sessions"]) == 2
    for name in ("original", "optimized", "floor"):
        lo, hi = lat["session_spread_ms"][name]
        assert lat[name]["sessions"] == 2 and lo <= lat[name]["p50_ms"] <= hi
        assert [len(s) for s in res.bench.timings[name].session_ms] == [len(s) for s in res.bench.timings["original"].session_ms]
    assert "2 session(s) per variant" in lat["method"]
    md = render_markdown(res.report)
    assert "p50 per session, min..max (n)" in md and "over 2 sessions" in md


def test_one_alive_holds_one_session_at_a_time_and_keeps_the_figures():
    # alive="one" (--bench-alive one, models too large for three sessions side by side): each variant's
    # session alone, in the block's rotating creation order, and the ratio still the true one (1.5)
    seen = []
    res, log = run({"A": 1.5, "B": 1.0, "C": 0.5}, {}, sessions=3, alive="one",
                   on_create=lambda b, n: seen.append((b, n)))
    assert log["max_alive"] == 1
    assert seen == [(0, "A"), (0, "B"), (0, "C"), (1, "B"), (1, "C"), (1, "A"), (2, "C"), (2, "A"), (2, "B")]
    assert res.alive == "one" and res.sessions == 3
    for t in res.timings.values():
        assert len(t.session_ms) == 3 and all(len(s) >= 4 for s in t.session_ms)  # ceil(10 / 3) calls at least
    assert res.ratio("A", "B") == pytest.approx(1.5, rel=0.01)
    lo, hi = res.ratio_interval("A", "B")
    assert lo <= 1.5 <= hi and hi - lo < 0.05
    # the session bias still lands in the interval, not the ratio
    biased, _ = run({"A": 1.0, "B": 1.0}, {"A": [1.0, 1.3, 1.0]}, sessions=3, alive="one")
    assert biased.ratio("A", "B") == pytest.approx(1.0, abs=0.005)


def test_one_alive_uses_a_first_runner_only_as_its_blocks_first_session():
    clock, factories, log = fakes({"A": 1.0, "B": 1.0}, {})
    alive = set()
    given_a = Fake(clock, 1.0, 1.0, np.random.default_rng(1), 0.0, alive)
    given_b = Fake(clock, 1.0, 1.0, np.random.default_rng(2), 0.0, alive)
    res = interleaved(factories, FEED, seconds=0.1, warmup=1, sessions=2, first={"A": given_a, "B": given_b},
                      clock=clock, alive="one")
    # block 0 runs A (given) alone; B's given runner was closed before A ran, and B is made anew
    assert given_b.closed and given_a.closed and log["created"] == ["B", "B", "A"]
    assert log["max_alive"] == 1 and res.sessions == 2
    with pytest.raises(ValueError, match="alive"):
        interleaved(factories, FEED, sessions=1, alive="some")


def test_bench_alive_option_and_auto_threshold():
    from normdeploy.bench.timing import ONE_ALIVE_BYTES, ONE_ALIVE_HALF_BYTES, one_session_alive

    assert BenchOptions().alive == "auto" and Options.from_flat(alive="one").bench.alive == "one"
    assert not one_session_alive(ONE_ALIVE_BYTES - 1) and one_session_alive(ONE_ALIVE_BYTES)
    assert one_session_alive(ONE_ALIVE_HALF_BYTES, half_on_cpu=True)
    assert not one_session_alive(ONE_ALIVE_HALF_BYTES - 1, half_on_cpu=True)
    with pytest.raises(InputError, match="--bench-alive"):
        BenchOptions(alive="some")


@pytest.mark.slow  # exports the digits model and times it
def test_optimize_times_one_session_at_a_time_when_asked(tmp_path):
    import os

    import normdeploy
    from tests.conftest import MODELS

    res = normdeploy.optimize(os.path.join(MODELS, "digits_cnn_bn_un.pt"), seconds=0.6, warmup=2, threads=1,
                              sessions=2, alive="one")
    lat = res.report["latency"]
    assert lat["alive"] == "one" and "alone in turn" in lat["method"] and res.bench.alive == "one"
    assert any("one session alive at a time" in n for n in res.report["notes"])
    for name in ("original", "optimized", "floor"):
        assert lat[name]["sessions"] == 2 and lat[name]["runs"] >= 10
    assert lat["speedup"] == pytest.approx(lat["original"]["p50_ms"] / lat["optimized"]["p50_ms"])
    # the digits model is far below the threshold: auto interleaves
    auto = normdeploy.optimize(os.path.join(MODELS, "digits_cnn_bn_un.pt"), seconds=0.3, warmup=1, threads=1,
                               sessions=1)
    assert auto.report["latency"]["alive"] == "all"
