"""Graph clean-up at the end of the ort-* lower stage: the general simplifications of onnxslim and onnxoptimizer.

On the project's suite the peers' gains over normdeploy came from graph-level clean-up
that composes with normdeploy's rewrites (counted on the optimized models of the suite,
normdeploy's output -> this step -> ``onnxslim.slim`` of normdeploy's output; 64 tokens,
32x32 / 64x64 images, batch axis dynamic):

| model | nodes: optimized -> cleaned (onnxslim) | what goes |
|---|---|---|
| hf_vit | 173 -> 86 (84) | 53 Constant nodes, shape arithmetic (Shape, Slice, Concat: 25), 11 Reshapes |
| hf_bert | 169 -> 76 (77) | as ViT, plus 12 Adds of all-zero biases |
| hf_gpt2 / hf_llama | 291 / 319 -> 133 / 148 (131 / 148) | Constants, shape arithmetic, Reshape/Unsqueeze chains |
| hf_mobilenetv2 | 262 -> 100 (100) | 52 Pads fused into their Convs, 106 Constants |
| resnet_bn | 28 -> 22 (22) | the Shape/Concat/Reshape of the flatten |

ONNX Runtime folds constants itself when it creates a session, but not shape arithmetic
over a tensor with a dynamic batch axis (``Shape -> Gather(1) -> Concat -> Reshape`` where only
axis 0 is dynamic), nor Pad into Conv, nor an Add of a zero tensor that is not a scalar.

Made of onnxscript's passes rather than by hand (onnxscript is already a dependency; its
rules are pattern + check + rewrite, each exact or refused by its check):

* ``FoldConstantsPass``: folds constant sub-graphs and, through symbolic shapes, the
  static parts of shape arithmetic (``Shape`` of ``[N, 64, 768]`` sliced to ``[64, 768]``).
  Exact: the same ops evaluated once on constants (fp32 rounding of the folded op, as ONNX
  Runtime's own constant folding). Bounded so that no large weight is copied (issue 13:
  ``optimize --no-bench`` peak RSS <= 2x weight bytes): a node reading a constant over
  :data:`FOLD_INPUT_BYTES` is never folded (onnxscript would fold a ``Transpose`` of a
  weight of any size), inputs over 8192 elements and outputs over 512*512 elements are
  left alone (onnxscript's limits), and external data is never read for a fold.
* onnxscript's default rewrite rules except two (:data:`LEFT_OUT`): no-op Add/Mul/Sub/Div by
  scalars, Dropout, Expand, Transpose, Cast to the same type; Reshape-Reshape,
  Unsqueeze-Unsqueeze, Transpose-Transpose, Slice collapsing, Min/Max to Clip, Relu/Clip
  chains, Pad into Conv (zero padding: the same sums), zero optional biases. All exact.
* :class:`_ZeroTensorNoOp` (normdeploy's, in onnxscript's rule form): ``x + Z``, ``x - Z`` for an
  all-zero constant ``Z`` and ``x * U``, ``x / U`` for an all-one ``U`` that broadcasting does
  not widen ``x`` with (every dim of the constant 1 or equal to x's, rank not above x's) and of
  x's dtype: ``x``. onnxscript's no-op rules take scalars only. (Random-weight suite models
  carry zero biases; trained models seldom do: then it finds nothing.)
* then Constant nodes lifted to initializers, equal small initializers merged, common
  sub-expressions eliminated, unused nodes dropped (onnx-ir's passes).

Left alone, and said so in the result: ``CastCast`` (``Cast(Cast(x, float32), float16)`` ->
``Cast(x, float16)`` drops a rounding step: not exact for a float64 or int x) and the
BatchNorm folds (normdeploy's own fold, in float64, decides each BatchNorm; one that is
still there was left for a reason it reported). Canonical normdeploy nodes and
``com.microsoft`` ops are never folded or inlined (functions are not inlined).
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir

from ..core.graph import const_value, shape_of
from ..core.passes import PassContext, PassResult

#: a node reading a constant larger than this is never folded (no copy of a weight)
FOLD_INPUT_BYTES = 1 << 20
#: onnxscript's own limits (elements), kept explicit here
FOLD_INPUT_ELEMENTS = 8192
FOLD_OUTPUT_ELEMENTS = 512 * 512
#: onnxscript default rules that are not run, with the reason
LEFT_OUT = {
    "CastCast": "Cast(Cast(x, float32), float16) -> Cast(x, float16) drops a rounding step (not exact for a "
                "float64 or integer x)",
    "BatchNorm": "BatchNorm folds are normdeploy's (fold_affine_into_linear, in float64); a BatchNorm still "
                 "there was left for the reason that pass gives",
}


def _rules():
    """onnxscript's default rewrite rules, less :data:`LEFT_OUT`, plus :class:`_ZeroTensorNoOp`."""
    from onnxscript import rewriter
    from onnxscript.rewriter import pattern

    flat = []
    for r in rewriter._DEFAULT_REWRITE_RULES:  # the list onnxscript.optimizer.optimize runs
        flat.extend(r.rules if isinstance(r, pattern.RewriteRuleSet) else [r])
    kept = [r for r in flat if not any(key in (r.name or "") for key in LEFT_OUT)]
    return pattern.RewriteRuleSet([*kept, *_zero_tensor_rules()])


def _zero_tensor_rules():
    from onnxscript.rewriter import pattern

    class _ZeroTensorNoOp(pattern.RewriteRuleClassBase):
        """``x op C`` -> ``x`` for ``op`` in Add/Sub (C all zeros) or Mul/Div (C all ones), C not widening x."""

        def __init__(self, op_type: str, neutral: float, const_first: bool):
            super().__init__(f"{op_type}Neutral{'Tensor' if not const_first else 'TensorFirst'}")
            self.op_type, self.neutral, self.const_first = op_type, neutral, const_first

        def pattern(self, op, x, c):
            args = (c, x) if self.const_first else (x, c)
            return getattr(op, self.op_type)(*args)

        def check(self, context, x, c, **_):
            result = pattern.MatchResult()
            value = const_value(c)
            if value is None:
                return result.fail("not a constant")
            if value.size > FOLD_INPUT_ELEMENTS or not np.all(value == self.neutral):
                return result.fail(f"not all {self.neutral:g}")
            if x.dtype is None or c.dtype != x.dtype:
                return result.fail("dtypes differ or are unknown")
            xs = shape_of(x)
            if xs is None or value.ndim > len(xs):
                return result.fail("the constant may widen x")
            for dc, dx in zip(value.shape[::-1], xs[::-1]):
                if dc != 1 and dc != dx:
                    return result.fail("the constant may widen x")
            return result

        def rewrite(self, op, x, c, **_):
            return op.Identity(x)

    out = []
    for op_type, neutral, commutes in (("Add", 0.0, True), ("Sub", 0.0, False), ("Mul", 1.0, True),
                                       ("Div", 1.0, False)):
        out.append(_ZeroTensorNoOp.rule(op_type, neutral, False))
        if commutes:
            out.append(_ZeroTensorNoOp.rule(op_type, neutral, True))
    return out


def _large_input(node: ir.Node) -> bool:
    for v in node.inputs:
        t = v.const_value if v is not None else None
        if t is not None and t.nbytes > FOLD_INPUT_BYTES:
            return True
    return False


def _op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.all_nodes())


def clean_up(model: ir.Model, ctx: PassContext, name: str = "clean_up_graph") -> PassResult:
    """Run the clean-up (module docstring) on ``model`` in place; the result lists what went, by op type."""
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    from ..core.graph import infer_shapes
    from ..core.ops import attach_functions

    result = PassResult(name, exact=True)
    before = _op_counts(model)
    refused = []

    def should_fold(node: ir.Node):
        if _large_input(node):
            refused.append(node.name)
            return False
        return None  # onnxscript's own rules (and size limits)

    passes = ir.passes.Sequential(
        ir.passes.PassManager([
            _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=FOLD_INPUT_ELEMENTS,
                                                output_size_limit=FOLD_OUTPUT_ELEMENTS, should_fold=should_fold),
            rewriter.RewritePass(_rules()),
            common.RemoveUnusedNodesPass(),
        ], steps=2, early_stop=True),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),  # compares initializers of at most 1024 elements
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
    )
    log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = log.level
    log.setLevel(logging.ERROR)  # the folder warns about every op it cannot evaluate
    try:
        passes(model)
    finally:
        log.setLevel(level)
    model.graph.sort()
    attach_functions(model)
    after = _op_counts(model)
    result.matched = sum(before.values())
    removed = {op: before[op] - after.get(op, 0) for op in before if before[op] > after.get(op, 0)}
    added = {op: after[op] - before.get(op, 0) for op in after if after[op] > before.get(op, 0)}
    if removed or added:
        failure = infer_shapes(model)
        if failure:
            result.notes.append(f"after {name}: {failure}")
        what = ", ".join(f"{op} -{k}" for op, k in sorted(removed.items(), key=lambda kv: -kv[1]))
        if added:
            what += "; added " + ", ".join(f"{op} +{k}" for op, k in sorted(added.items()))
        result.rewrote(f"graph clean-up: {sum(before.values())} -> {sum(after.values())} nodes ({what})")
    else:
        result.notes.append("graph clean-up: nothing to simplify (no constant sub-graph, foldable shape "
                            "arithmetic, no-op or redundant node)")
    if refused:
        result.notes.append(f"{len(set(refused))} node(s) reading a constant over {FOLD_INPUT_BYTES >> 20} MiB not "
                            "folded (a fold would copy the weight)")
    nodes = list(model.graph.all_nodes())
    if any(n.op_type == "Cast" and n.inputs[0] is not None and n.inputs[0].producer() is not None
           and n.inputs[0].producer().op_type == "Cast" for n in nodes):
        result.skip("Cast", "Cast chains kept: " + LEFT_OUT["CastCast"])
    if any(n.op_type == "BatchNormalization" for n in nodes):
        result.skip("BatchNormalization", "kept: " + LEFT_OUT["BatchNorm"])
    return result


def clean_up_graph(model: ir.Model, ctx: PassContext) -> PassResult:
    """The lower stage's clean-up step (``--cleanup``, on by default for ort-* targets); see the module docstring."""
    return clean_up(model, ctx)
