"""The handover before every timed call (normdeploy.bench.timing, module docstring "Handover").

ONNX Runtime's thread pool spins after a call; in rotating rounds each variant mostly follows the same
other variant, so without a handover the variant that follows a quiet runtime reads faster than an
identical copy that follows a spinning one. The fakes here model that on a fake two-core machine: a
call costs ``cost`` ms, plus the time it shares a core with another runner's spin; a runner's own
spin costs it nothing (its pool threads take the work).
"""
import numpy as np
import pytest

from normdeploy.bench.timing import (HANDOVER_MARGIN, MAX_HANDOVER_S, _handover, auto_handover, interleaved,
                                     measure_spill)

FEED = {"x": np.zeros((1, 4), np.float32)}


class Machine:
    """A fake clock (ns) and who spins until when."""

    def __init__(self):
        self.ns = 0
        self.spinner = None
        self.spin_until = 0

    def __call__(self) -> int:
        return self.ns


class SpinFake:
    def __init__(self, machine: Machine, cost_ms: float, spin_ms: float, threads: int = 2):
        self.m, self.cost, self.spin, self.threads = machine, int(cost_ms * 1e6), int(spin_ms * 1e6), threads
        self.calls = 0

    def run(self, feed):
        m = self.m
        overlap = 0 if m.spinner is self else max(0, min(m.spin_until, m.ns + self.cost) - m.ns)
        m.ns += self.cost + overlap  # half a core while the other spins: the overlap again
        m.spinner, m.spin_until = self, m.ns + self.spin
        self.calls += 1
        return []


def bench(handover, cost_ms):
    """original, copy (both spinning 25 ms, the same cost) and a quiet runtime last: the original follows
    the quiet one in almost every round, the copy follows the original."""
    m = Machine()
    runners = {"original": SpinFake(m, cost_ms, 25), "copy": SpinFake(m, cost_ms, 25),
               "quiet": SpinFake(m, cost_ms, 0)}
    return interleaved({n: (lambda r=r: r) for n, r in runners.items()}, FEED, seconds=3.0, warmup=2, min_rounds=20,
                       sessions=1, clock=m, handover=handover)


def test_without_handover_the_copy_after_a_spinning_session_reads_slower():
    r = bench(0.0, 20)
    assert r.ratio("copy", "original") > 1.3  # the bias the handover removes; the two are the same runner
    assert r.handover_ms == 0.0


@pytest.mark.parametrize("cost_ms", [20, 5])
def test_with_a_handover_every_timed_call_is_its_own_cost(cost_ms):
    r = bench(0.03, cost_ms)  # longer than the 25 ms spin
    assert r.ratio("copy", "original") == 1.0
    for t in r.timings.values():
        assert t.samples_ms and all(s == cost_ms for s in t.samples_ms)
    assert r.handover_ms == pytest.approx(30.0)


def test_handover_calls_until_the_time_has_passed_and_at_least_settle():
    m = Machine()
    r = SpinFake(m, 5, 0)
    assert _handover(r, FEED, 0, 0.0, m) == 0
    assert _handover(r, FEED, 2, 0.0, m) == 2
    assert _handover(r, FEED, 0, 0.012, m) == 3  # 5, 10, 15 ms: the third passes 12 ms
    assert _handover(r, FEED, 1, 0.001, m) == 1
    assert _handover(r, FEED, 4, 0.001, m) == 4


class Proc:
    """Fake sleep and process CPU time: a runner's call makes ``threads`` threads spin ``spin_s``."""

    def __init__(self):
        self.t, self.cpu_s, self.spin_end, self.spin_threads = 0.0, 0.0, 0.0, 0
        self.sleeps = []

    def sleep(self, s):
        self.sleeps.append(s)
        self.cpu_s += self.spin_threads * max(0.0, min(self.t + s, self.spin_end) - self.t)
        self.t += s

    def cpu(self):
        return self.cpu_s


class ProcRunner:
    def __init__(self, proc, spin_s, threads=1, per_call=None):
        self.p, self.spin_s, self.threads, self.per_call = proc, spin_s, threads, per_call

    def run(self, feed):
        spin = self.per_call.pop(0) if self.per_call else self.spin_s
        self.p.spin_end, self.p.spin_threads = self.p.t + spin, self.threads


def test_measure_spill_counts_the_cpu_after_one_call():
    p = Proc()
    assert measure_spill(ProcRunner(p, 0.025), FEED, 0.1, p.sleep, p.cpu) == pytest.approx(25.0)
    assert p.sleeps == [0.1, 0.1]  # idle, then the window
    q = Proc()  # a spill that fills the window: measured again in a window twice as long
    assert measure_spill(ProcRunner(q, 0.15), FEED, 0.1, q.sleep, q.cpu) == pytest.approx(150.0)
    assert q.sleeps == [0.1, 0.1, 0.2, 0.2]


def test_auto_handover_takes_the_margin_over_the_largest_spill_capped():
    p = Proc()
    runners = {"a": ProcRunner(p, 0.025), "b": ProcRunner(p, 0.002)}
    s, spill = auto_handover(runners, FEED, 2, window_s=0.1, sleep=p.sleep, cpu=p.cpu)
    assert spill == {"a": pytest.approx(25.0), "b": pytest.approx(2.0)}
    assert s == pytest.approx(HANDOVER_MARGIN * 0.025)
    q = Proc()  # two threads spinning past the doubled window: 400 ms of CPU, capped
    s, _ = auto_handover({"a": ProcRunner(q, 0.5, threads=2)}, FEED, 2, window_s=0.1, sleep=q.sleep, cpu=q.cpu)
    assert s == MAX_HANDOVER_S


def test_auto_at_one_thread_probes_nothing():
    p = Proc()
    assert auto_handover({"a": ProcRunner(p, 0.025)}, FEED, 1, sleep=p.sleep, cpu=p.cpu) == (0.0, {})
    assert p.sleeps == []
    m = Machine()  # and interleaved with 1-thread runners: no handover, the settle call only
    runners = {"a": SpinFake(m, 5, 25, threads=1), "b": SpinFake(m, 5, 25, threads=1)}
    r = interleaved({n: (lambda r=r: r) for n, r in runners.items()}, FEED, seconds=0.5, warmup=0, min_rounds=10,
                    sessions=1, clock=m, settle=1)
    assert r.handover_ms == 0.0 and r.spill_ms == {}
    assert runners["a"].calls == 2 * len(r.timings["a"].samples_ms)


@pytest.mark.parametrize("bad", [-0.1, "fast", None, True, float("nan")])
def test_a_bad_handover_is_refused(bad):
    m = Machine()
    with pytest.raises(ValueError, match="handover must be 'auto' or a number of seconds >= 0"):
        interleaved({"a": lambda: SpinFake(m, 5, 0)}, FEED, seconds=0.1, sessions=1, clock=m, handover=bad)


@pytest.mark.slow
def test_onnxruntime_at_two_threads_spills_and_auto_covers_it():
    """The real thing: an ONNX Runtime session at 2 threads burns CPU after a call; at 1 thread it does not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from normdeploy.build import make_runner

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    feed = {"x": np.ones((64, 256), np.float32)}
    two, one = make_runner(model, "ort-cpu", 2), make_runner(model, "ort-cpu", 1)
    for r in (two, one):
        for _ in range(5):
            r.run(feed)
    spill2 = measure_spill(two, feed)
    assert spill2 > 2.0  # ms: the pool spins after the call
    s, spill = auto_handover({"two": two}, feed, 2)
    assert s == pytest.approx(min(MAX_HANDOVER_S, HANDOVER_MARGIN * spill["two"] / 1000))
    assert measure_spill(one, feed) < spill2 / 2
