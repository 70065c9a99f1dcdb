"""``normdeploy bench``: original, normdeploy's optimized model, the floor and the peers
(:mod:`normdeploy.bench.peers`) timed in one interleaved run per model, with accuracy against
the original; a terminal table, ``--json``, ``--plot`` PNG, ``--markdown``."""
from __future__ import annotations

import json

import click

from .common import Progress, SectionedCommand, common_flags, errors, group_options, options_from, plain

BENCH_EXAMPLE = """
\b
Examples:
  normdeploy bench models/digits_cnn_bn_un.pt --data models/digits_test.npz --threads 1 --plot bench.png
  normdeploy bench model.onnx --input input_ids:1x128:int64 --peers onnxslim,ort-transformers --json
"""

#: what bench and gate take of the option groups (no accuracy gate of its own, no TensorRT build)
MEASURE_GROUPS = ("target", "export", "rewrite", "verify", "bench", "ort")
MEASURE_ONLY = {"verify": ("data",), "bench": ("seconds", "warmup", "threads", "sessions"), "ort": ("rms_op",)}


def check_target(target: str) -> None:
    from ..core.errors import UnsupportedError

    if target.startswith("trt-"):
        raise UnsupportedError(f"target {target} is not available in this build yet", "use --target ort-cpu")


@click.command("bench", cls=SectionedCommand, epilog=BENCH_EXAMPLE)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@group_options(*MEASURE_GROUPS, only=MEASURE_ONLY)
@plain("--peers", "peer_list", default="all", show_default=True, metavar="LIST", section="bench_cmd",
       help="Comma-separated peers to time alongside: torch, ort-disable, ort-basic, ort-extended, ort-transformers, "
            "onnxslim, onnxoptimizer, openvino; or 'all' / 'none'.")
@plain("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, section="bench_cmd",
       help="Write a PNG: speedup of every variant vs the original, with 95 % intervals.")
@plain("--markdown", "md_path", type=click.Path(dir_okay=False), default=None, section="bench_cmd",
       help="Write the tables as Markdown.")
@common_flags
def bench(models, peer_list, plot_path, md_path, as_json, debug, **values):
    """Time the original, optimized and floor models of each MODEL and the peer tools, interleaved.

    Latency is p50/p90/p99 and throughput over interleaved rounds after a warm-up; speedups
    are ratios of medians from the same run with 95 % bootstrap intervals; accuracy is
    measured against the original on the same inputs. Every figure names the CPU, thread
    count and ONNX Runtime version that produced it.
    """
    from .. import api
    from ..bench import markdown
    from ..bench import peers as peers_mod
    from ..bench.plot import plot_speedups
    from ..core.errors import InputError
    from ..package import jsonable

    with errors(debug):
        opts = options_from(values)
        check_target(opts.target)
        if opts.bench.seconds <= 0:
            raise InputError(f"--seconds {opts.bench.seconds} is not positive", "give a time budget such as 3")
        if opts.bench.threads is not None and opts.bench.threads < 1:
            raise InputError(f"--threads {opts.bench.threads} is not positive", "give 1 or more")
        names = peers_mod.parse_peers(peer_list)
        results = []
        for m in models:
            with Progress(not as_json) as progress:
                results.append(api.benchmark(m, options=opts, peers=names, progress=progress))
        if plot_path:
            plot_speedups(results, plot_path, "normdeploy bench: speedup vs original (ONNX Runtime, ENABLE_ALL)")
        if md_path:
            with open(md_path, "w") as f:
                f.write("\n".join(markdown(r) for r in results))
        if as_json:
            click.echo(json.dumps(jsonable({"models": [r.to_json() for r in results], "plot": plot_path,
                                            "markdown": md_path}), indent=2))
            return
        _print_bench(results)
        for p in (plot_path, md_path):
            if p:
                click.echo(f"wrote {p}")


def _print_bench(results) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..bench import COLUMNS, cost_left_texts, provenance, variant_rows

    c = Console(width=max(Console().width, 160))
    for r in results:
        rounds = len(r.result.timings["original"].samples_ms)
        t = Table(title=f"{r.model}: batch {r.batch}, {rounds} interleaved rounds in {r.result.sessions} session(s) "
                        f"per variant, {r.wall_seconds:.1f} s",
                  caption=provenance(r.machine, r.threads), title_justify="left", caption_justify="left")
        columns = [(k, h) for k, h in COLUMNS if k != "sessions"]  # the spread is a line below: the table stays narrow
        for key, head in columns:
            t.add_column(head, justify="left" if key in ("variant", "status") else "right",
                         overflow="fold", max_width=60 if key == "status" else None)
        rows = variant_rows(r)
        for row in rows:
            t.add_row(*(str(row[k]) for k, _ in columns))
        c.print(t)
        spread = {row["variant"]: row["sessions"] for row in rows if row["sessions"] != "n/a"}
        if spread:
            c.print(f"p50 per session, min..max ({r.result.sessions} session(s) per variant, created in rotating order): "
                    + ", ".join(f"{k} {v.rsplit(' (', 1)[0]}" for k, v in spread.items()))
        for k, v in cost_left_texts(r).items():
            c.print(f"normalization cost left ({k}): {v}  [{provenance(r.machine, r.threads)}]")
        for n in r.notes:
            c.print(f"note: {n}")
