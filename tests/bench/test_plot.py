"""The figures (normdeploy.bench.plot), checked through matplotlib's objects, not pixels (issue 16, item 9).

latency.png shows the number of rounds, the speedup with its 95 % interval (or that there were
too few rounds for one), and every outlier; the speedup plot of ``bench --plot`` names each
model's rounds and draws no bar for a variant that is the original itself.
"""
import os

import numpy as np
import pytest

from normdeploy.bench import ModelBench, Variant
from normdeploy.bench.plot import latency_figure, plot, speedups_figure
from normdeploy.bench.timing import BenchResult, Timing, machine_info

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _result(n: int = 400, outliers: tuple[float, ...] = (9.0, 30.0)) -> BenchResult:
    rng = np.random.default_rng(0)
    orig = 2.0 * rng.lognormal(0, 0.02, n)
    opt = 1.0 * rng.lognormal(0, 0.02, n)
    opt[:len(outliers)] = outliers  # slow calls of the optimized model: a background process, say
    floor = 0.8 * rng.lognormal(0, 0.02, n)
    return BenchResult({k: Timing(k, list(map(float, v))) for k, v in
                        (("original", orig), ("optimized", opt), ("floor", floor))}, 1, machine_info(1))


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_latency_figure_shows_rounds_speedup_interval_and_outliers(close_figures):
    res = _result()
    fig = latency_figure(res, "m: original vs optimized vs floor (ort-cpu)")
    (ax,) = fig.axes
    title = ax.get_title()
    s, (lo, hi) = res.ratio("original", "optimized"), res.ratio_interval("original", "optimized")
    assert "400 interleaved rounds" in title
    assert f"speedup {s:.3f}x [95 % CI {lo:.3f}, {hi:.3f}]" in title and lo < s < hi
    assert f"normalization cost left {res.norm_cost_left():.0%}" in title
    # every call beyond the whiskers is drawn, the two slow calls among them, and counted on the label
    fliers = {int(ln.get_ydata()[0]): np.asarray(ln.get_xdata(), float) for ln in ax.lines
              if ln.get_marker() == "." and len(ln.get_xdata())}
    assert {9.0, 30.0} <= set(fliers[2].tolist())  # the optimized model is the second box
    labels = [t.get_text() for t in ax.texts]
    assert any(t.startswith(f"p50 {res.p50('optimized'):.3f} ms; {len(fliers[2])} outliers, slowest 30.000 ms")
               for t in labels), labels
    assert ax.get_xscale() == "log"  # 30 ms next to 0.8 ms: a linear axis would flatten the boxes
    assert "onnxruntime" in ax.get_xlabel() and "1 thread" in ax.get_xlabel()


def test_latency_figure_says_when_there_were_too_few_rounds(close_figures):
    res = _result(n=12, outliers=())
    (ax,) = latency_figure(res, "m").axes
    assert "12 interleaved rounds" in ax.get_title()
    assert "(too few rounds for an interval)" in ax.get_title() and "95 % CI" not in ax.get_title()
    assert ax.get_xscale() == "linear"


def test_plot_writes_a_png(tmp_path):
    plot(_result(), str(tmp_path / "latency.png"), "m")
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speedup_figure_names_rounds_and_draws_no_bar_for_an_identical_variant(close_figures):
    variants = {n: Variant(n, r, n) for n, r in (("original", "original"), ("optimized", "candidate"),
                                                  ("floor", "floor"))}
    mb = ModelBench("models/m.onnx", "onnx", [], 1, 1, variants, _result(), {}, [])
    mb.variants["floor"].info["identical_to_original"] = "identical to the original: no normalization to remove"
    (ax,) = speedups_figure([mb], "bench").axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["m (400 rounds)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["optimized"]
    (bar,) = ax.patches
    assert bar.get_width() == pytest.approx(mb.speedup("optimized"))


def test_readme_says_bench_writes_a_plot_only_with_plot():
    """``bench`` writes no file unasked (it has no output directory); the README says so."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = [ln for ln in f if ln.startswith(".venv/bin/normdeploy bench ")]
    assert lines and all("--plot" in ln for ln in lines if "plot" in ln), lines
