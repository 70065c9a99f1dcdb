"""The pass framework: steps, their results, the context they read, and the runner.

A stage of the pipeline is an explicit tuple of steps (the tables are in
:mod:`normdeploy.pipeline`); nothing registers itself by being imported. Two kinds:

* :class:`Pass` edits the graph of the one in-memory ``onnx_ir.Model`` in place:
  ``fn(graph, ctx, result)`` matches, rewrites and records in ``result`` what it changed and
  why each candidate it left alone was left alone. Only when something changed does the
  runner clean up (unused nodes and initializers, topological order, function bodies) and
  re-infer shapes, since later passes read ranks and widths; a failed inference is a note.
* :class:`ModelStep` works on the whole model (raise the opset, calibrate statistics on
  real inputs, rename nodes): ``fn(model, ctx) -> PassResult | None``, in place.

Skip reasons have one form: ``result.skip(node, reason)``. A helper that finds a
condition failing returns the reason as a string (or raises :class:`Refuse` from deep
inside a global analysis); the pass turns it into a skip.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from .graph import cleanup, infer_shapes


@dataclass
class Skip:
    node: str
    reason: str


@dataclass
class Rewrite:
    """One change. ``spelling`` (recognizers): the ops of the subgraph that was matched, in graph
    order, e.g. ``"ReduceMean Sub Pow ReduceMean Add Sqrt Div Mul Add"``, optionally with a label
    naming its source (``"torch.var_mean: ..."``)."""

    node: str | None
    what: str
    spelling: str | None = None


@dataclass
class PassResult:
    """What one step did: candidates looked at, changes made, candidates left alone with the reason."""

    name: str
    exact: bool
    matched: int = 0
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rewrote(self, what: str, node: str | None = None, spelling: str | None = None) -> None:
        """Record one change; ``node`` names the normalization node it concerns, if any; ``spelling``
        says what was matched (recognizers)."""
        self.rewrites.append(Rewrite(node, what, spelling))

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append(Skip(node, reason))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rewrites_count"] = len(self.rewrites)
        return d


class Refuse(Exception):
    """A global analysis cannot go on; the message names the node that breaks its conditions."""


PRELN_FORMS = ("rmsnorm", "crmsnorm")
ORT_RMS_OPS = ("simplified", "standard", "decomposed")
#: ONNX Runtime session graph optimization levels (``SessionOptions.graph_optimization_level``), weakest first
ORT_GRAPH_LEVELS = ("disable", "basic", "extended", "all")
#: the default of ``PassContext.ort_short_row`` (:mod:`normdeploy.lower.ort`, GroupScaling rows)
SHORT_ROW = 64


@dataclass
class PassContext:
    """Everything a step may read besides the model.

    ``target`` and the option fields come from the user; ``ln_stds`` is written by the
    calibration step for the approximate LN-free pass that follows it.
    """

    target: str = "ort-cpu"
    allow_approx: bool = False
    ort_version: str | None = None
    preln_form: str = "rmsnorm"  # what pre-LN LayerNorms become: "rmsnorm" | "crmsnorm"
    ort_rms_op: str = "simplified"  # ort-* RMSNorm: "simplified" (ORT's op) | "standard" (opset 23) | "decomposed"
    ort_short_row: int = SHORT_ROW  # ort-* GroupScaling rows shorter than this stay decomposed ops
    cleanup: bool = True  # ort-*: graph clean-up at the end of the lower stage (lower.cleanup)
    ort_fusions: bool = False  # ort-cpu: residual Add + norm -> com.microsoft Skip*Normalization (lower.skip_norm)
    calib_feeds: list[dict[str, np.ndarray]] | None = None  # real inputs for approximate rewrites
    ln_stds: dict[str, float] | None = None  # LayerNorm name -> calibrated std (set by calibration)


def always(ctx: PassContext) -> bool:
    return True


def settle(model: ir.Model, result: PassResult | None = None) -> None:
    """After a graph edit: drop what nothing reads, sort, attach function bodies, re-infer shapes."""
    from .ops import attach_functions

    cleanup(model)
    attach_functions(model)
    failure = infer_shapes(model)
    if failure and result is not None:
        result.notes.append(f"after {result.name}: {failure}; later passes see the shapes known before")


@dataclass(frozen=True)
class Pass:
    """A graph pass: ``fn(graph, ctx, result)`` edits the graph in place."""

    name: str
    fn: Callable[[ir.Graph, PassContext, PassResult], None]
    exact: bool = True
    when: Callable[[PassContext], bool] = always

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        result = PassResult(self.name, self.exact)
        self.fn(model.graph, ctx, result)
        if result.rewrites:
            settle(model, result)  # later passes read ranks and widths
        return result


@dataclass(frozen=True)
class ModelStep:
    """A step over the whole model: ``fn(model, ctx) -> PassResult | None``, in place."""

    name: str
    fn: Callable[[ir.Model, PassContext], PassResult | None]
    exact: bool = True
    when: Callable[[PassContext], bool] = always

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult | None:
        return self.fn(model, ctx)


Step = Pass | ModelStep


def run_steps(model: ir.Model, steps: tuple[Step, ...], ctx: PassContext,
              after_step: Callable[[], None] | None = None) -> list[PassResult]:
    """Run every step whose ``when`` holds, in order, on ``model`` in place; approximate steps only with
    ``ctx.allow_approx``; ``after_step`` is called after each step that ran (``pipeline.transform``
    closes the memory maps of the weights it read there, for large models)."""
    results = []
    for step in steps:
        if not step.when(ctx) or not (step.exact or ctx.allow_approx):
            continue
        result = step.run(model, ctx)
        if result is not None:
            results.append(result)
        if after_step is not None:
            after_step()
    return results
