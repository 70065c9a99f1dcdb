"""Verification holds one feed's outputs at a time (issue 13): the original's recorded outputs go to
memory-mapped files in a temporary directory that is removed after, and each comparison converts
only a block of entries to float64 at a time; the blocked metrics equal the whole-array ones."""
from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest

from normdeploy import build, verify
from normdeploy.build import Recorded
from normdeploy.verify import compare, compare_arrays


class Seeded:
    """A runner whose output for a feed is a seeded random array (same feed, same output)."""

    input_names, output_names = ["seed"], ["y", "small"]

    def __init__(self, shape, noise=0.0):
        self.shape, self.noise, self.calls = shape, noise, 0

    def run(self, feed):
        self.calls += 1
        rng = np.random.default_rng(int(feed["seed"][0]))
        y = rng.standard_normal(self.shape, dtype=np.float32)
        if self.noise:
            y[..., ::3] += np.float32(self.noise)  # in place: the runner itself holds one set
        return [y, np.float32(feed["seed"][0])]


def _feeds(n):
    return [{"seed": np.array([s])} for s in range(n)]


def test_recorded_spills_large_outputs_to_files_removed_on_close():
    feeds = _feeds(3)
    runner = Seeded((4, 1 << 17))  # 2 MB per feed: past RECORD_SPILL_BYTES
    rec = Recorded(runner, feeds)
    assert runner.calls == 3
    assert rec.directory is not None and sorted(os.listdir(rec.directory)) == ["0_0.npy", "1_0.npy", "2_0.npy"]
    for f in feeds:
        y, small = rec.run(f)
        assert isinstance(y, np.memmap) and not y.flags.writeable  # replayed from disk, not held in memory
        np.testing.assert_array_equal(y, runner.run(f)[0])
        assert small == np.float32(f["seed"][0])  # small outputs stay in memory
    assert runner.calls == 6
    directory = rec.directory
    rec.close()
    assert not os.path.exists(directory)
    with pytest.raises(KeyError):
        rec.run(feeds[0])


def test_recorded_directory_goes_with_the_recording():
    rec = Recorded(Seeded((1 << 19,)), _feeds(1))
    directory = rec.directory
    assert os.path.isdir(directory)
    del rec
    assert not os.path.exists(directory)


def test_recorded_small_outputs_make_no_directory():
    rec = Recorded(Seeded((3, 4)), _feeds(2))
    assert rec.directory is None
    np.testing.assert_array_equal(rec.run(rec._feeds[1])[0], Seeded((3, 4)).run({"seed": np.array([1])})[0])
    rec.close()


def test_comparing_many_large_sets_holds_about_one(monkeypatch):
    """Peak traced memory of recording and comparing 8 sets of 16 MB stays under two sets' worth."""
    monkeypatch.setattr(verify, "CHUNK_ENTRIES", 1 << 16)
    shape = (4, 1 << 20)
    set_bytes = 4 * shape[0] * shape[1]
    feeds = _feeds(8)
    tracemalloc.start()
    try:
        rec = Recorded(Seeded(shape), feeds)
        acc = compare(rec, Seeded(shape, noise=1e-3), feeds, "random")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rec.close()
    assert peak < 2 * set_bytes, f"peak {peak / 2**20:.0f} MB for sets of {set_bytes / 2**20:.0f} MB"
    assert acc.samples == 8 and 0 < acc.max_abs_err < 1e-2 and 0.99999 < acc.cosine_min < 1


@pytest.mark.parametrize("chunk", [1, 7, 1 << 10])
def test_blocked_metrics_equal_whole_array_ones(monkeypatch, chunk):
    rng = np.random.default_rng(1)
    cases = [rng.standard_normal((6, 37)).astype(np.float32), rng.standard_normal((3, 5, 11)),
             np.array(2.5, np.float32), np.zeros((0, 4), np.float32), rng.integers(-3, 3, (5, 9))]
    odd = rng.standard_normal((5, 40)).astype(np.float32)
    odd[1, 2], odd[3, 7] = np.nan, np.inf
    cases.append(odd)
    for ref in cases:
        opt = ref + (rng.standard_normal(ref.shape) * 1e-2).astype(ref.dtype) if ref.dtype.kind == "f" else ref[::-1]
        monkeypatch.setattr(verify, "CHUNK_ENTRIES", 1 << 30)
        whole = compare_arrays("y", ref, opt)
        monkeypatch.setattr(verify, "CHUNK_ENTRIES", chunk)
        blocked = compare_arrays("y", ref, opt)
        assert blocked.max_abs_err == whole.max_abs_err and blocked.nonfinite == whole.nonfinite, ref.shape
        assert blocked.top1_agreement == whole.top1_agreement, ref.shape
        np.testing.assert_allclose(blocked.cosine_min, whole.cosine_min, rtol=1e-13)
        if ref.ndim == 2 and ref.shape[0] == 6:  # a real difference, so the test can fail
            assert 0 < whole.max_abs_err and whole.cosine_min < 1
    assert build.RECORD_SPILL_BYTES <= 1 << 21  # the spill tests above outgrow it
