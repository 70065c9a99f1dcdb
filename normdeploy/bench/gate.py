"""CI gates: is the optimized model still faster and still right? (DESIGN.md section 6)

A gate never compares against a time stored from another run or another machine. It
measures the original and each candidate (and the floor) in *one* interleaved run
(:func:`normdeploy.bench.measure`) and judges ratios and errors from that run alone.

Checks, each giving one verdict line ``PASS``, ``FAIL`` or ``SKIP``:

``latency``
    r = p50(candidate) / p50(original), from the same interleaved rounds. Passes when
    ``r <= 1 + limit``. With ``max_slowdown`` stated, ``limit = max_slowdown`` (a
    fraction: 0.05 allows 5 % slower, -0.10 demands 10 % faster). Otherwise
    ``limit = max(allowance, noise)``, where ``noise`` is the half-width of the 95 %
    bootstrap interval of r over sessions and the paired rounds within them
    (:meth:`BenchResult.ratio_interval`): the run's own spread, session-to-session spread
    included (each variant is timed in ``sessions`` sessions, default 3; a session carries a
    bias for its whole life that interleaving does not cancel), so a noisy machine widens
    the allowance and a quiet one narrows it,
    and ``allowance`` (default 0.05) is the smallest slowdown worth failing a build for
    (from fewer than ``timing.MIN_ROUNDS_FOR_INTERVAL`` rounds there is no interval, and the
    limit is the allowance). SKIP (and ``speedup`` too) where the candidate is the original
    itself, normdeploy having rewritten nothing: a ratio of identical models is noise.
``speedup`` (only when ``min_speedup`` is set)
    s = p50(original) / p50(candidate) from the same run; passes when ``s >= min_speedup``
    (the point estimate; its 95 % interval is printed beside it).
``max_abs_err``, ``max_rel_err``, ``cosine_min``, ``top1_agreement``
    Accuracy of the candidate against the original on the same inputs (seeded random
    inputs, plus ``--data`` when given; :mod:`normdeploy.verify`), worst over input sets
    and outputs. Passes when ``max_abs_err <= max_abs_err``, ``max_rel_err <=
    max_rel_err`` (relative to each output's range), ``cosine_min >= min_cosine``, and
    ``top1_agreement >= min_top1`` (SKIP when no output is a classifier). A failing line
    names the output and the input set that failed. Defaults: ``max_rel_err`` 1e-4 (as
    ``optimize --tolerance``), ``min_cosine`` 0.9999, ``min_top1`` 1.0 (rewrites are
    exact), ``max_abs_err`` off. Any check is switched off with ``false`` (file) /
    ``none`` (flag).

The run's floor gives an informational figure, the share of normalization cost left,
``(p50(candidate) - p50(floor)) / (p50(original) - p50(floor))``; it is not a check.

Thresholds come from defaults, then a file, then flags (a flag wins). The file is TOML
(``.toml``; ``tomllib`` on Python 3.11+, ``tomli`` before) or JSON (``.json``); keys are the
threshold names below, at the top level or under a ``[gate]`` table, plus the run
settings ``seconds``, ``warmup``, ``threads`` and ``sessions``::

    [gate]
    allowance = 0.05        # or max_slowdown = 0.10 to state the threshold outright
    min_speedup = 1.0
    max_rel_err = 1e-4
    min_cosine = 0.9999
    min_top1 = 1.0
    max_abs_err = false     # off
    seconds = 5

Exit status of ``normdeploy gate``: 0 when every check of every candidate passes, 1 when
any fails, 2-4 for errors (bad input, unsupported model; :mod:`normdeploy.core.errors`).
Every latency figure printed carries the CPU model, thread count and ONNX Runtime version.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from ..core.errors import InputError

THRESHOLD_KEYS = ("max_slowdown", "allowance", "min_speedup", "max_abs_err", "max_rel_err", "min_cosine", "min_top1")
RUN_KEYS = ("seconds", "warmup", "threads", "sessions")


@dataclass
class Thresholds:
    max_slowdown: float | None = None
    allowance: float = 0.05
    min_speedup: float | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = 1e-4
    min_cosine: float | None = 0.9999
    min_top1: float | None = 1.0

    def updated(self, values: dict, validate: bool = True) -> "Thresholds":
        """A copy with ``values`` applied; a value of None/False switches that check off."""
        d = asdict(self)
        for k, v in values.items():
            if k not in d:
                raise InputError(f"unknown threshold {k!r}", f"use {', '.join(THRESHOLD_KEYS)}")
            if k == "allowance":
                if v is None or v is False:
                    v = 0.0
            elif v is False:
                v = None
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise InputError(f"threshold {k} = {v!r} is not a number", "give a finite number (or false to switch it off)")
                v = float(v)
            d[k] = v
        th = Thresholds(**d)
        if validate:
            th.validate()
        return th

    def validate(self) -> None:
        if self.allowance < 0:
            raise InputError(f"allowance {self.allowance} is negative", "give a fraction >= 0, e.g. 0.05 for 5 %")
        if self.max_slowdown is not None and self.max_slowdown <= -1:
            raise InputError(f"max_slowdown {self.max_slowdown} is <= -1",
                             "it is a fraction of the original's p50: 0.05 = 5 % slower allowed, -0.1 = 10 % faster required")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise InputError(f"min_speedup {self.min_speedup} is not positive", "give a ratio such as 1.0 or 1.2")
        for k in ("max_abs_err", "max_rel_err"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise InputError(f"{k} {v} is negative", "give a tolerance >= 0")
        for k in ("min_cosine", "min_top1"):
            v = getattr(self, k)
            if v is not None and not -1 <= v <= 1:
                raise InputError(f"{k} {v} is outside [-1, 1]", "cosine and agreement are at most 1")


def read_file(path: str) -> tuple[dict, dict]:
    """Read a thresholds file: returns (thresholds, run settings). TOML by ``.toml``, JSON by ``.json``."""
    if not os.path.isfile(path):
        raise InputError(f"thresholds file {path} does not exist", "check the --thresholds path")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ModuleNotFoundError:
                    raise InputError(f"cannot read TOML file {path} on this Python (no tomllib or tomli)",
                                     "pip install tomli, or write the thresholds as .json") from None
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif ext == ".json":
            with open(path) as f:
                data = json.load(f)
        else:
            raise InputError(f"thresholds file {path} is neither .toml nor .json", "name it gate.toml or gate.json")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - both parsers raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"thresholds file {path} does not parse: {first}", "fix its syntax") from None
    if not isinstance(data, dict):
        raise InputError(f"thresholds file {path} holds no table of thresholds", "write key = value pairs")
    if isinstance(data.get("gate"), dict):
        data = {**{k: v for k, v in data.items() if k != "gate"}, **data["gate"]}
    unknown = [k for k in data if k not in THRESHOLD_KEYS + RUN_KEYS]
    if unknown:
        raise InputError(f"thresholds file {path}: unknown key {unknown[0]!r}",
                         f"use {', '.join(THRESHOLD_KEYS + RUN_KEYS)}")
    return ({k: data[k] for k in data if k in THRESHOLD_KEYS},
            {k: data[k] for k in data if k in RUN_KEYS})


@dataclass
class Check:
    name: str
    verdict: str  # "PASS" | "FAIL" | "SKIP"
    value: float | None
    limit: float | None
    text: str
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict != "FAIL"

    def line(self, candidate: str | None = None) -> str:
        who = f"{candidate}: " if candidate else ""
        return f"{self.verdict:<4}  {who}{self.name:<14} {self.text}"

    def to_json(self) -> dict:
        return {"name": self.name, "verdict": self.verdict, "value": self.value, "limit": self.limit,
                "text": self.text, **self.details}


def _g(v: float) -> str:
    return f"{v:.3g}"


def latency_checks(mb, candidate: str, th: Thresholds, baseline: str = "original") -> list[Check]:
    from .timing import provenance

    res = mb.result
    where = f"[{provenance(mb.machine, mb.threads)}]"
    if mb.identical(candidate):  # a ratio of two identical models is the machine's noise
        return [Check(name, "SKIP", None, None, f"{mb.identical(candidate)}: no latency to compare {where}")
                for name in ("latency",) + (("speedup",) if th.min_speedup is not None else ())]
    r = res.ratio(candidate, baseline)
    lo, hi = res.ratio_interval(candidate, baseline)
    noise = (hi - lo) / 2 if lo == lo and hi == hi else float("nan")
    if th.max_slowdown is not None:
        limit, how = th.max_slowdown, f"stated max slowdown {th.max_slowdown:+.3f}"
    else:
        n = noise if noise == noise else 0.0
        limit = max(th.allowance, n)
        how = f"1 + max(allowance {th.allowance:.3f}, noise {n:.3f})"
    ok = r <= 1 + limit
    rounds = res.rounds(candidate, baseline)
    per_session = res.session_ratios(candidate, baseline)
    ci = f"95% CI {lo:.3f}..{hi:.3f}" if lo == lo else "too few rounds for an interval"
    spread = (f", per session {min(per_session):.3f}..{max(per_session):.3f}" if len(per_session) > 1 else "")
    checks = [Check("latency", "PASS" if ok else "FAIL", r, 1 + limit,
                    f"p50 {candidate}/{baseline} = {r:.3f} ({ci}{spread}; p50 "
                    f"{res.p50(candidate):.4f} vs {res.p50(baseline):.4f} ms, {rounds} rounds in "
                    f"{res.sessions} session{'s' if res.sessions != 1 else ''}) "
                    f"{'<=' if ok else '>'} {1 + limit:.3f} = {how} {where}",
                    {"ratio": r, "ratio_ci95": [lo, hi], "noise": noise, "allowance": th.allowance,
                     "max_slowdown": th.max_slowdown, "p50_ms": {candidate: res.p50(candidate), baseline: res.p50(baseline)},
                     "rounds": rounds, "sessions": res.sessions, "session_ratios": per_session})]
    if th.min_speedup is not None:
        s = res.ratio(baseline, candidate)
        slo, shi = res.ratio_interval(baseline, candidate)
        ok = s >= th.min_speedup
        checks.append(Check("speedup", "PASS" if ok else "FAIL", s, th.min_speedup,
                            f"p50 {baseline}/{candidate} = {s:.3f}x ("
                            + (f"95% CI {slo:.3f}..{shi:.3f}" if slo == slo else "too few rounds for an interval") + ") "
                            f"{'>=' if ok else '<'} {th.min_speedup:.3f} {where}",
                            {"speedup": s, "speedup_ci95": [slo, shi]}))
    return checks


def _worst_output(variant, metric: str, largest: bool):
    """(output comparison, accuracy) with the worst ``metric`` over every input set."""
    best = None
    for acc in variant.accuracy.values():
        for o in acc.outputs:
            v = getattr(o, metric)
            if v is None:
                continue
            if best is None or (v > getattr(best[0], metric) if largest else v < getattr(best[0], metric)):
                best = (o, acc)
    return best


def accuracy_checks(mb, candidate: str, th: Thresholds) -> list[Check]:
    variant = mb.variants[candidate]
    specs = (("max_abs_err", "max_abs_err", th.max_abs_err, True),
             ("max_rel_err", "max_rel_err", th.max_rel_err, True),
             ("cosine_min", "cosine_min", th.min_cosine, False),
             ("top1_agreement", "top1_agreement", th.min_top1, False))
    checks = []
    for name, metric, limit, upper in specs:
        worst = _worst_output(variant, metric, largest=upper)
        if worst is None:
            checks.append(Check(name, "SKIP", None, limit, "no classification output ([N, K], K > 1) to compare"
                                if metric == "top1_agreement" else "nothing measured"))
            continue
        out, acc = worst
        value = getattr(out, metric)
        fmt = (lambda v: f"{v:.2%}") if metric == "top1_agreement" else (
            (lambda v: f"{v:.9f}") if metric == "cosine_min" else _g)
        where = f"(worst: output {out.name}, {acc.inputs}, {acc.samples} samples)"
        if limit is None:
            checks.append(Check(name, "SKIP", value, None, f"{fmt(value)}, no threshold {where}",
                                {"output": out.name, "inputs": acc.inputs}))
            continue
        ok = value <= limit if upper else value >= limit
        if value != value:  # NaN never passes
            ok = False
        op = ("<=" if ok else ">") if upper else (">=" if ok else "<")
        checks.append(Check(name, "PASS" if ok else "FAIL", value, limit, f"{fmt(value)} {op} {fmt(limit)} {where}",
                            {"output": out.name, "inputs": acc.inputs}))
    return checks


def evaluate(mb, candidate: str, th: Thresholds, baseline: str = "original") -> list[Check]:
    """Every check of ``candidate`` against ``baseline`` from one :class:`~normdeploy.bench.ModelBench`."""
    return latency_checks(mb, candidate, th, baseline) + accuracy_checks(mb, candidate, th)


def report(mb, th: Thresholds) -> dict:
    """The gate's verdicts for every candidate of ``mb``, JSON-ready."""
    from .timing import provenance

    cands = [n for n, v in mb.variants.items() if v.role == "candidate"]
    out = {}
    for c in cands:
        checks = evaluate(mb, c, th)
        left, why = mb.cost_left(c)
        out[c] = {"verdict": "PASS" if all(ch.passed for ch in checks) else "FAIL",
                  "checks": [ch.to_json() for ch in checks],
                  "lines": [ch.line(c if len(cands) > 1 else None) for ch in checks],
                  "norm_cost_left": left,
                  "norm_cost_left_note": why,
                  "p50_ms": mb.result.p50(c)}
    failed = [c for c, r in out.items() if r["verdict"] == "FAIL"]
    return {
        "verdict": "FAIL" if failed else "PASS",
        "failed": failed,
        "model": mb.model,
        "thresholds": asdict(th),
        "machine": mb.machine, "threads": mb.threads, "versions": mb.versions,
        "provenance": provenance(mb.machine, mb.threads),
        "batch": mb.batch,
        "rounds": len(mb.result.timings["original"].samples_ms),
        "sessions": mb.result.sessions,
        "session_spread_ms": {n: t.to_json()["session_spread_ms"] for n, t in mb.result.timings.items()},
        "wall_seconds": mb.wall_seconds,
        "p50_ms": {"original": mb.result.p50("original"), "floor": mb.result.p50("floor")},
        "method": ("one run of original, candidate(s) and floor, each in several sessions created in rotating order and "
                   "timed interleaved; ratios of medians over sessions from that run only"),
        "candidates": out,
    }


def threshold_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Thresholds))
