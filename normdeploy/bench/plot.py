"""Plots a person would rather look at than read: latency distributions and speedups with intervals."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .timing import BenchResult, provenance

if TYPE_CHECKING:
    from . import ModelBench


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
