"""The pass framework: one registry, one result type, one runner.

A pass is a function ``(graph, ctx) -> PassResult`` over an onnx-graphsurgeon graph,
registered with :func:`register` under a stage (``canonicalize``, ``rewrite`` or
``lower``). It edits the graph in place; the runner cleans up, sorts and re-exports
after each pass. A :class:`PassResult` says how many candidates the pass looked at,
what it changed, whether the change is exact, and why each candidate it left alone was
left alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from ..graph import export_model, import_graph

STAGES = ("canonicalize", "rewrite", "lower")


@dataclass
class Skip:
    node: str
    reason: str


@dataclass
class Rewrite:
    node: str | None
    what: str


@dataclass
class PassResult:
    name: str
    exact: bool
    matched: int = 0
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rewrote(self, what: str, node: str | None = None) -> None:
        """Record one change; ``node`` names the normalization node it concerns, if any."""
        self.rewrites.append(Rewrite(node, what))

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append(Skip(node, reason))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rewrites_count"] = len(self.rewrites)
        return d


@dataclass
class PassContext:
    """What a pass may read besides the graph: the target and the user's options."""

    target: str = "ort-cpu"
    allow_approx: bool = False
    ort_version: str | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    name: str
    stage: str
    exact: bool
    fn: Callable[[gs.Graph, PassContext], PassResult]
    targets: tuple[str, ...] | None = None  # None: every target
    doc: str = ""


REGISTRY: dict[str, PassSpec] = {}


def register(name: str, stage: str, exact: bool = True, targets: tuple[str, ...] | None = None):
    """Register a pass; :data:`ORDER` (then registration order) is run order within a stage."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")

    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        REGISTRY[name] = PassSpec(name, stage, exact, fn, targets, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


#: Run order within a stage; passes not listed run after these, in registration order.
ORDER = ("recognize_layernorm", "recognize_rmsnorm",
         "ln_free", "preln_to_crmsnorm", "preln_to_rmsnorm", "fold_mpbn_into_threshold", "fold_affine_into_linear")


def passes_for(stage: str, ctx: PassContext) -> list[PassSpec]:
    _load_all()
    rank = {name: i for i, name in enumerate(ORDER)}
    chosen = [p for p in REGISTRY.values() if p.stage == stage and (p.targets is None or ctx.target in p.targets)
              and (p.exact or ctx.allow_approx)]
    return sorted(chosen, key=lambda p: rank.get(p.name, len(ORDER)))


def run_stage(model: onnx.ModelProto, stage: str, ctx: PassContext) -> tuple[onnx.ModelProto, list[PassResult]]:
    results = []
    for spec in passes_for(stage, ctx):
        model, result = run_pass(model, spec, ctx)
        results.append(result)
    return model, results


def run_pass(model: onnx.ModelProto, spec: PassSpec, ctx: PassContext) -> tuple[onnx.ModelProto, PassResult]:
    graph = import_graph(model)
    result = spec.fn(graph, ctx)
    if result.rewrites:
        from ..export import infer_shapes  # later passes read ranks and widths

        model = infer_shapes(export_model(graph, model))
    return model, result


def _load_all() -> None:
    """Import every pass module so that its ``@register`` lines run."""
    from . import canonicalize_layernorm, canonicalize_rmsnorm  # noqa: F401
    from . import fold_affine, fold_mpbn, ln_free, preln_to_crmsnorm, preln_to_rmsnorm  # noqa: F401
    from ..lower import ort_cpu, trt  # noqa: F401
