"""Plots a person would rather look at than read: latency distributions and speedups with intervals."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .timing import BenchResult, provenance

if TYPE_CHECKING:
    from . import ModelBench


def latency_figure(result: BenchResult, title: str):
    """Box plot of per-call latency per runner, outliers drawn, with what the numbers rest on.

    Each box is one runner's calls (whiskers at 1.5 IQR, every call beyond them a point, counted
    on its label with its slowest time), and, with several sessions, each session's p50 as a red
    diamond; the subtitle gives the number of interleaved rounds and sessions and
    the speedup p50(original) / p50(optimized) with its 95 % bootstrap interval (or "too few
    rounds for an interval", :data:`.timing.MIN_ROUNDS_FOR_INTERVAL`) and, where it is a
    measurement, the share of normalization cost left. Latencies spanning more than 20x are
    drawn on a log axis, so that a few slow calls do not flatten the boxes. Returns the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.timings)
    data = [result.timings[n].samples_ms for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.6 + 0.3 * len(names)), dpi=110)
    boxes = ax.boxplot(data, vert=False, showfliers=True, flierprops={"marker": ".", "markersize": 3, "alpha": 0.5})
    ax.set_yticks(range(1, len(names) + 1), names)
    for i, (n, d, fliers) in enumerate(zip(names, data, boxes["fliers"]), start=1):
        out = len(fliers.get_xdata())
        ax.annotate(f"p50 {result.p50(n):.3f} ms; {out} outlier{'s' if out != 1 else ''}, slowest {max(d):.3f} ms",
                    (0.01, i + 0.3), xycoords=("axes fraction", "data"), fontsize=8, ha="left")
        per = result.timings[n].session_p50s()
        if len(per) > 1:  # each session's p50: the session-to-session spread the interval includes
            ax.plot(per, [i] * len(per), linestyle="none", marker="D", markersize=4, color="tab:red", alpha=0.8,
                    label="p50 of one session" if i == 1 else None)
    if result.sessions > 1:
        ax.legend(fontsize=7, loc="lower right")
    lo_ms, hi_ms = min(min(d) for d in data), max(max(d) for d in data)
    if lo_ms > 0 and hi_ms / lo_ms > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"latency per call, ms\n{provenance(result.machine, result.threads)}", fontsize=8)
    ax.set_title(f"{title}\n" + summary(result).replace("; normalization", "\nnormalization"), fontsize=9)
    fig.tight_layout()
    return fig


def summary(result: BenchResult) -> str:
    """Rounds, speedup with its 95 % interval, and the share of normalization cost left, in one line."""
    parts = [f"{result.rounds()} interleaved rounds in {result.sessions} session{'s' if result.sessions != 1 else ''}"]
    if "original" in result.timings and "optimized" in result.timings:
        s = result.ratio("original", "optimized")
        lo, hi = result.ratio_interval("original", "optimized")
        parts.append(f"speedup {s:.3f}x " + (f"[95 % CI {lo:.3f}, {hi:.3f}]" if lo == lo
                                              else "(too few rounds for an interval)"))
        left = result.norm_cost_left()
        if left is not None:
            parts.append(f"normalization cost left {left:.0%}")
    return "; ".join(parts)


def plot(result: BenchResult, path: str, title: str) -> None:
    """:func:`latency_figure` written to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = latency_figure(result, title)
    fig.savefig(path)
    plt.close(fig)


def plot_speedups(benches: list[ModelBench], path: str, title: str, variants: list[str] | None = None) -> None:
    """:func:`speedups_figure` written to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = speedups_figure(benches, title, variants)
    fig.savefig(path)
    plt.close(fig)


def speedups_figure(benches: list[ModelBench], title: str, variants: list[str] | None = None):
    """Horizontal bars: p50(original) / p50(variant) per model and variant, with 95 % bootstrap intervals
    (none from too few rounds); each model's label gives its rounds. A variant that is the original
    itself (:meth:`.ModelBench.identical`) has no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in benches if b.result is not None]
    if variants is None:
        variants = []
        for b in benches:
            variants += [n for n in b.timed if n != "original" and n not in variants]
    palette = 10 if len(variants) <= 10 else 20  # no two variants of one plot share a colour
    colors = plt.get_cmap(f"tab{palette}")
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
            ax.barh(ys, xs, height=height * 0.9, xerr=[lo, hi], color=colors(j % palette), label=var,
                    error_kw={"elinewidth": 0.8, "capsize": 1.5})
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + height * (len(variants) - 1) / 2 for i in range(len(benches))],
                  [f"{os.path.splitext(os.path.basename(b.model))[0]} ({b.result.rounds()} rounds"
                   + (f", {b.result.sessions} sessions)" if b.result.sessions > 1 else ")") for b in benches],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup vs original = p50(original) / p50(variant), 95 % bootstrap interval (sessions, rounds)\n"
                  + (provenance(benches[0].machine, benches[0].threads) if benches else ""), fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
