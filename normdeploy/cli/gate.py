"""``normdeploy gate``: the CI check of :mod:`normdeploy.bench.gate`; one line per check, exit
status 1 when any check fails."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from .bench import MEASURE_GROUPS, MEASURE_ONLY, check_target
from .common import Progress, SectionedCommand, common_flags, errors, given, group_options, options_from, plain

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

#: threshold flag -> what it checks; the defaults shown are those of bench.gate.Thresholds
THRESHOLD_HELP = {
    "max_slowdown": "Stated latency threshold: fail when p50(opt)/p50(orig) > 1 + this (0.05 = 5 % slower). "
                    "Without it: 1 + max(allowance, the run's noise).",
    "allowance": "Smallest slowdown that fails when no --max-slowdown is given.",
    "min_speedup": "Also fail when p50(orig)/p50(opt) < this.",
    "max_abs_err": "Largest max absolute error.",
    "max_rel_err": "Largest max relative error (vs each output's range).",
    "min_cosine": "Smallest per-sample cosine.",
    "min_top1": "Smallest top-1 agreement of classifier outputs.",
}


def _threshold_options(fn):
    from ..bench.gate import Thresholds

    defaults = Thresholds()
    for name in reversed(list(THRESHOLD_HELP)):
        d = getattr(defaults, name)
        fn = plain(f"--{name.replace('_', '-')}", name, type=FLOAT_OR_NONE, default=None, section="gate",
                   help=f"{THRESHOLD_HELP[name]}  [default: {'none' if d is None else f'{d:g}'}]")(fn)
    return fn


@click.command("gate", cls=SectionedCommand, epilog=GATE_EXAMPLE)
@click.argument("model", type=click.Path(dir_okay=False))
@group_options(*MEASURE_GROUPS, only=MEASURE_ONLY)
@plain("--optimized", "optimized", multiple=True, type=click.Path(dir_okay=False), section="gate",
       help="Optimized .onnx to judge against MODEL; repeatable (all are measured in the same run). "
            "Default: normdeploy's pipeline output, built in memory.")
@plain("--thresholds", "thresholds_file", type=click.Path(dir_okay=False), default=None, section="gate",
       help="TOML (.toml) or JSON (.json) file of thresholds and run settings (seconds, warmup, threads, sessions); "
            "flags override it.")
@_threshold_options
@common_flags
def gate(model, optimized, thresholds_file, as_json, debug, **values):
    """Fail (exit 1) when the optimized model is slower than MODEL or less accurate, from one interleaved run.

    Latency passes when p50(optimized)/p50(original) <= 1 + max(allowance, noise), noise
    being the half-width of the ratio's 95 % bootstrap interval in this run, or
    <= 1 + --max-slowdown when stated. Accuracy passes when every metric is within its
    tolerance. One line per check; see normdeploy.bench.gate for the thresholds file.
    """
    from .. import api
    from ..bench import gate as gate_mod
    from ..core.errors import InputError
    from ..load import load_onnx
    from ..package import jsonable

    with errors(debug):
        flags = {k: values.pop(k) for k in THRESHOLD_HELP}
        opts = options_from(values)
        check_target(opts.target)
        th, run = gate_mod.Thresholds(), {}
        if thresholds_file:
            file_th, run = gate_mod.read_file(thresholds_file)
            th = th.updated(file_th, validate=False)  # validated once flags are applied
        th = th.updated({k: v for k, v in flags.items() if v is not None})
        settings = {k: run[k] for k in gate_mod.RUN_KEYS if k in run and not given(k)}
        numbers = {**{k: getattr(opts.bench, k) for k in gate_mod.RUN_KEYS}, **settings}
        for name, v, lo in [(k, v, -1 if k == "warmup" else 0) for k, v in numbers.items()]:
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= lo):
                raise InputError(f"{name} {v!r} is out of range", f"give a number > {lo}")
        opts = dataclasses.replace(opts, bench=dataclasses.replace(opts.bench, **settings))
        candidates = None
        if optimized:
            candidates = {}
            for i, p in enumerate(optimized):
                stem = os.path.splitext(os.path.basename(p))[0] or f"candidate{i}"
                name = stem if stem not in candidates and stem not in ("original", "floor") else f"{stem}_{i}"
                if not os.path.exists(p):
                    raise InputError(f"optimized model {p} does not exist", "check the --optimized path")
                candidates[name] = load_onnx(p)
        with Progress(not as_json) as progress:
            mb = api.benchmark(model, options=opts, candidates=candidates, progress=progress)
        rep = gate_mod.report(mb, th)
        if as_json:
            click.echo(json.dumps(jsonable(rep), indent=2))
        else:
            _print_gate(rep)
    if rep["verdict"] == "FAIL":
        sys.exit(1)

def _print_gate(rep: dict) -> None:
    click.echo(f"gate: {rep['model']}, batch {rep['batch']}, {rep['rounds']} interleaved rounds ({rep['sessions']} "
               f"session{'s' if rep['sessions'] != 1 else ''} per variant) in "
               f"{rep['wall_seconds']:.1f} s on {rep['provenance']}")
    click.echo(f"      original p50 {rep['p50_ms']['original']:.4f} ms, floor p50 {rep['p50_ms']['floor']:.4f} ms")
    n_checks = n_failed = 0
    for name, c in rep["candidates"].items():
        for line in c["lines"]:
            click.echo(line)
        left = c["norm_cost_left"]
        click.echo(f"info  {name}: normalization cost left "
                   + (f"n/a ({c.get('norm_cost_left_note')})" if left is None else f"{left:.0%}")
                   + f" [{rep['provenance']}]")
        n_checks += len(c["checks"])
        n_failed += sum(ch["verdict"] == "FAIL" for ch in c["checks"])
    click.echo(f"gate: {rep['verdict']} ({n_checks} checks, {n_failed} failed"
               + (f": {', '.join(rep['failed'])}" if rep["failed"] else "") + ")")
