"""The ``bench`` and ``gate`` commands (plain click commands; :mod:`normdeploy.cli` adds them to ``main``).

``bench``: original, normdeploy's optimized model, the floor and the peers
(:mod:`normdeploy.peers`) timed in one interleaved run per model, with accuracy against
the original; a terminal table, ``--json``, ``--plot`` PNG, ``--markdown``.

``gate``: the CI check of :mod:`normdeploy.gate`; one line per check, exit status 1 when
any check fails.
"""
from __future__ import annotations

import json
import os
import sys

import click

from .cli_common import _common, _errors, _Progress

BENCH_EXAMPLE = """
\b
Examples:
  normdeploy bench models/digits_cnn_bn_un.pt --data models/digits_test.npz --threads 1 --plot bench.png
  normdeploy bench model.onnx --input input_ids:1x128:int64 --peers onnxslim,ort-transformers --json
"""

GATE_EXAMPLE = """
\b
Examples:
  normdeploy gate models/digits_cnn_bn_un.pt                       # pipeline's output, default thresholds
  normdeploy gate model.pt --optimized out/model.onnx --thresholds gate.toml --json
  normdeploy gate model.pt --max-slowdown 0.10 --min-speedup 1.0 --max-rel-err 1e-5
"""


class _FloatOrNone(click.ParamType):
    name = "FLOAT|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).strip().lower() in ("none", "off", "false"):
            return False  # "switched off", distinct from "not given"
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)


FLOAT_OR_NONE = _FloatOrNone()


def _opts(common: dict, **extra):
    """pipeline.Options from the shared options of ``cli._common`` (whatever they are today) and ``extra``."""
    import dataclasses

    from .pipeline import Options

    names = {f.name for f in dataclasses.fields(Options)}
    values = {k: v for k, v in {**common, **extra}.items() if k in names and v is not None}
    return Options(**{**values, "bench": False})


def _check_target(target: str) -> None:
    from .errors import UnsupportedError

    if target.startswith("trt-"):
        raise UnsupportedError(f"target {target} is not available in this build yet", "use --target ort-cpu")


def _jsonable(x):
    from .package import _jsonable as j

    return j(x)


# ----------------------------------------------------------------------------- bench

@click.command("bench", epilog=BENCH_EXAMPLE)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_common
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Real inputs for the accuracy columns: an .npz with one array per model input.")
@click.option("--batch", type=int, default=None, help="Batch size for latency (default: the input shape's).")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="Time budget of each model's interleaved run.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed calls of every variant first.")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads of every variant (default: available cores, at most 8); always reported.")
@click.option("--peers", "peer_list", default="all", show_default=True, metavar="LIST",
              help="Comma-separated peers to time alongside: torch, ort-disable, ort-basic, ort-transformers, "
                   "onnxslim, onnxoptimizer, openvino; or 'all' / 'none'.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: speedup of every variant vs the original, with 95 % intervals.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), default=None,
              help="Write the tables as Markdown.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration inputs (.npz) for --allow-approx.")
def bench(models, as_json, debug, data, batch, seconds, warmup, threads, peer_list, plot_path, md_path, calib,
          **common):
    """Time the original, optimized and floor models of each MODEL and the peer tools, interleaved.

    Latency is p50/p90/p99 and throughput over interleaved rounds after a warm-up; speedups
    are ratios of medians from the same run with 95 % bootstrap intervals; accuracy is
    measured against the original on the same inputs. Every figure names the CPU, thread
    count and ONNX Runtime version that produced it.
    """
    from . import bench as bench_mod
    from . import peers
    from .errors import InputError

    with _errors(debug):
        _check_target(common.get("target", "ort-cpu"))
        if seconds <= 0:
            raise InputError(f"--seconds {seconds} is not positive", "give a time budget such as 3")
        if threads is not None and threads < 1:
            raise InputError(f"--threads {threads} is not positive", "give 1 or more")
        names = peers.parse_peers(peer_list)
        opts = _opts(common, data=data, batch=batch, threads=threads, calib=calib)
        results = []
        for m in models:
            with _Progress(not as_json) as progress:
                results.append(bench_mod.measure(m, opts, peers=names, seconds=seconds, warmup=warmup,
                                                 progress=progress))
        if plot_path:
            bench_mod.plot_speedups(results, plot_path, "normdeploy bench: speedup vs original (ONNX Runtime, ENABLE_ALL)")
        if md_path:
            with open(md_path, "w") as f:
                f.write("\n".join(bench_mod.markdown(r) for r in results))
        if as_json:
            click.echo(json.dumps(_jsonable({"models": [r.to_json() for r in results], "plot": plot_path,
                                             "markdown": md_path}), indent=2))
            return
        _print_bench(results)
        for p in (plot_path, md_path):
            if p:
                click.echo(f"wrote {p}")


def _print_bench(results) -> None:
    from rich.console import Console
    from rich.table import Table

    from .bench import COLUMNS, provenance, variant_rows

    c = Console(width=max(Console().width, 160))
    for r in results:
        rounds = len(r.result.timings["original"].samples_ms)
        t = Table(title=f"{r.model}: batch {r.batch}, {rounds} interleaved rounds in {r.wall_seconds:.1f} s",
                  caption=provenance(r.machine, r.threads), title_justify="left", caption_justify="left")
        for key, head in COLUMNS:
            t.add_column(head, justify="left" if key in ("variant", "status") else "right",
                         overflow="fold", max_width=60 if key == "status" else None)
        for row in variant_rows(r):
            t.add_row(*(str(row[k]) for k, _ in COLUMNS))
        c.print(t)
        left = r.to_json()["norm_cost_left"]
        for k, v in left.items():
            c.print(f"normalization cost left ({k}): " + ("n/a (the floor is not faster than the original)"
                                                         if v is None else f"{v:.0%}")
                    + f"  [{provenance(r.machine, r.threads)}]")
        for n in r.notes:
            c.print(f"note: {n}")


# ----------------------------------------------------------------------------- gate

@click.command("gate", epilog=GATE_EXAMPLE)
@click.argument("model", type=click.Path(dir_okay=False))
@_common
@click.option("--optimized", "optimized", multiple=True, type=click.Path(dir_okay=False),
              help="Optimized .onnx to judge against MODEL; repeatable (all are measured in the same run). "
                   "Default: normdeploy's pipeline output, built in memory.")
@click.option("--thresholds", "thresholds_file", type=click.Path(dir_okay=False), default=None,
              help="TOML (.toml) or JSON (.json) file of thresholds; flags override it.")
@click.option("--max-slowdown", type=FLOAT_OR_NONE, default=None,
              help="Stated latency threshold: fail when p50(opt)/p50(orig) > 1 + this (0.05 = 5 % slower). "
                   "Default: 1 + max(allowance, the run's noise).")
@click.option("--allowance", type=FLOAT_OR_NONE, default=None,
              help="Smallest slowdown that fails when no --max-slowdown is given  [default: 0.05]")
@click.option("--min-speedup", type=FLOAT_OR_NONE, default=None,
              help="Also fail when p50(orig)/p50(opt) < this  [default: none]")
@click.option("--max-abs-err", type=FLOAT_OR_NONE, default=None, help="Largest max absolute error  [default: none]")
@click.option("--max-rel-err", type=FLOAT_OR_NONE, default=None,
              help="Largest max relative error (vs each output's range)  [default: 1e-4]")
@click.option("--min-cosine", type=FLOAT_OR_NONE, default=None, help="Smallest per-sample cosine  [default: 0.9999]")
@click.option("--min-top1", type=FLOAT_OR_NONE, default=None,
              help="Smallest top-1 agreement of classifier outputs  [default: 1.0]")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Real inputs for the accuracy checks: an .npz with one array per model input.")
@click.option("--batch", type=int, default=None, help="Batch size for latency (default: the input shape's).")
@click.option("--seconds", type=float, default=None, help="Time budget of the interleaved run  [default: 3]")
@click.option("--warmup", type=int, default=None, help="Untimed calls of every variant first  [default: 10]")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads (default: available cores, at most 8); always reported.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration inputs (.npz) for --allow-approx.")
def gate(model, as_json, debug, optimized, thresholds_file, max_slowdown, allowance, min_speedup, max_abs_err,
         max_rel_err, min_cosine, min_top1, data, batch, seconds, warmup, threads, calib, **common):
    """Fail (exit 1) when the optimized model is slower than MODEL or less accurate, from one interleaved run.

    Latency passes when p50(optimized)/p50(original) <= 1 + max(allowance, noise), noise
    being the half-width of the ratio's 95 % bootstrap interval in this run, or
    <= 1 + --max-slowdown when stated. Accuracy passes when every metric is within its
    tolerance. One line per check; see normdeploy.gate for the thresholds file.
    """
    from . import gate as gate_mod
    from .bench import measure
    from .errors import InputError
    from .load import load_onnx

    with _errors(debug):
        _check_target(common.get("target", "ort-cpu"))
        th, run = gate_mod.Thresholds(), {}
        if thresholds_file:
            file_th, run = gate_mod.read_file(thresholds_file)
            th = th.updated(file_th, validate=False)  # validated once flags are applied
        flags = {"max_slowdown": max_slowdown, "allowance": allowance, "min_speedup": min_speedup,
                 "max_abs_err": max_abs_err, "max_rel_err": max_rel_err, "min_cosine": min_cosine, "min_top1": min_top1}
        th = th.updated({k: v for k, v in flags.items() if v is not None})
        seconds = seconds if seconds is not None else run.get("seconds", 3.0)
        warmup = warmup if warmup is not None else run.get("warmup", 10)
        threads = threads if threads is not None else run.get("threads")
        for name, v, lo in (("seconds", seconds, 0), ("warmup", warmup, -1), ("threads", threads, 0)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= lo):
                raise InputError(f"{name} {v!r} is out of range", f"give a number > {lo}")
        candidates = None
        if optimized:
            candidates = {}
            for i, p in enumerate(optimized):
                stem = os.path.splitext(os.path.basename(p))[0] or f"candidate{i}"
                name = stem if stem not in candidates and stem not in ("original", "floor") else f"{stem}_{i}"
                if not os.path.exists(p):
                    raise InputError(f"optimized model {p} does not exist", "check the --optimized path")
                candidates[name] = load_onnx(p)
        opts = _opts(common, data=data, batch=batch, threads=int(threads) if threads else None, calib=calib)
        with _Progress(not as_json) as progress:
            mb = measure(model, opts, candidates=candidates, seconds=float(seconds), warmup=int(warmup),
                         progress=progress)
        rep = gate_mod.report(mb, th)
        if as_json:
            click.echo(json.dumps(_jsonable(rep), indent=2))
        else:
            _print_gate(rep)
    if rep["verdict"] == "FAIL":
        sys.exit(1)


def _print_gate(rep: dict) -> None:
    click.echo(f"gate: {rep['model']}, batch {rep['batch']}, {rep['rounds']} interleaved rounds in "
               f"{rep['wall_seconds']:.1f} s on {rep['provenance']}")
    click.echo(f"      original p50 {rep['p50_ms']['original']:.4f} ms, floor p50 {rep['p50_ms']['floor']:.4f} ms")
    n_checks = n_failed = 0
    for name, c in rep["candidates"].items():
        for line in c["lines"]:
            click.echo(line)
        left = c["norm_cost_left"]
        click.echo(f"info  {name}: normalization cost left "
                   + ("n/a (the floor is not faster than the original)" if left is None else f"{left:.0%}")
                   + f" [{rep['provenance']}]")
        n_checks += len(c["checks"])
        n_failed += sum(ch["verdict"] == "FAIL" for ch in c["checks"])
    click.echo(f"gate: {rep['verdict']} ({n_checks} checks, {n_failed} failed"
               + (f": {', '.join(rep['failed'])}" if rep["failed"] else "") + ")")
