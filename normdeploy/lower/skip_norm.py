"""Residual Add + normalization -> ONNX Runtime's fused Skip*Normalization (ort-cpu).

::

    a ──┐                                  a ──┐
        Add ── h ── LayerNormalization ── y    SkipLayerNormalization ── y       (post-LN: BERT)
    b ──┘      └── (other readers of h)    b ──┘       └── output 3 = a + b ── (other readers)

    a, b ── Add ── h ── SimplifiedLayerNormalization (or RMSNormalization) ── y
        ->  SkipSimplifiedLayerNormalization(a, b, g) -> y, output 3 = h            (pre-LN after RMSNorm)

Math: with h = a + b (+ bias, added after the residual sum), ``SkipLayerNormalization``
computes LayerNorm(h) with gain g and shift beta, and ``SkipSimplifiedLayerNormalization``
``g h / sqrt(mean(h^2) + eps)``, both over the last axis with fp32 statistics, and return h
itself as their 4th output (``input_skip_bias_sum``), which takes over every other reader of
the Add. Exact to fp32 rounding: the kernel sums a + b (then + bias) in the order the graph
did and evaluates the same normalization (statistics may be accumulated in another order).
Conditions (onnxscript's checks): a and b both ``[B, S, D]`` with the same dims (the fused op
does not broadcast), g (and beta, bias) ``[D]``, axis -1, ``stash_type`` 1. The variant
where the bias is added to one operand before the residual sum (``(a + bias) + b``) is not
run: the kernel adds in another order.

Uses onnxscript's ``rewriter/ort_fusions/skip_normalization.py`` rules (they match the ops
normdeploy emits: ``SimplifiedLayerNormalization`` in the default domain, ONNX
``LayerNormalization``); the opset-23 ``RMSNormalization`` of ``--ort-rms-op standard`` gets the
same rule with that op in the pattern. ONNX Runtime's own session optimizer already fuses
Add + LayerNormalization (SkipLayerNormFusion at ORT_ENABLE_EXTENDED) but not Add +
SimplifiedLayerNormalization: the pre-LN case is where this step changes what runs.
"""
from __future__ import annotations

import onnx_ir as ir

from ..core.graph import shape_of
from ..core.passes import PassContext, PassResult

MS_DOMAIN = "com.microsoft"
NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


def _ruleset():
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions import skip_normalization as sn

    class SkipRmsNormalizationFusion(sn.SkipRmsNormFusion):
        """onnxscript's SkipRmsNormFusion with the opset-23 ``RMSNormalization`` in its pattern."""

        def pattern(self, op, input, skip, gamma, bias, epsilon, stash_type):
            skip_sum = pattern.OrValue([op.Add(skip, input), op.Add(input, skip)], name="skip_sum")
            if self._has_bias:
                skip_sum = op.Add(skip_sum, bias)
            normalized = op.RMSNormalization(skip_sum, gamma, axis=-1, _allow_other_attributes=True,
                                             _outputs=["simplified_layer_norm"])
            return normalized, skip_sum

    return pattern.RewriteRuleSet([
        sn.SkipLayerNormFusion.rule("SkipLayerNormBias", has_bias=True, bias_pre_add=False),
        sn.SkipLayerNormFusion.rule("SkipLayerNorm", has_bias=False),
        sn.SkipRmsNormFusion.rule("SkipRmsNormBias", has_bias=True, bias_pre_add=False),
        sn.SkipRmsNormFusion.rule("SkipRmsNorm", has_bias=False),
        SkipRmsNormalizationFusion.rule("SkipRMSNormalizationBias", has_bias=True, bias_pre_add=False),
        SkipRmsNormalizationFusion.rule("SkipRMSNormalization", has_bias=False),
    ])


def _why_not(node: ir.Node) -> str:
    """Why a normalization node stayed unfused (the first of onnxscript's conditions that fails)."""
    x = node.inputs[0]
    add = x.producer() if x is not None else None
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return "its input is not computed by an Add (no residual sum to fuse)"
    if node.attributes.get("axis") is not None and node.attributes["axis"].as_int() != -1:
        return "it does not normalize over axis -1"
    if node.attributes.get("stash_type") is not None and node.attributes["stash_type"].as_int() != 1:
        return "its stash_type is not 1 (fp32 statistics)"
    shapes = [shape_of(v) for v in add.inputs]
    if any(s is None or len(s) != 3 for s in shapes):
        return f"the Add's operands are not both of rank 3 [B, S, D] (shapes {shapes})"
    if shapes[0] != shapes[1]:
        return f"the Add broadcasts ({shapes[0]} + {shapes[1]}); the fused op takes two equal shapes"
    if node.op_type == "LayerNormalization" and (len(node.inputs) < 3 or node.inputs[2] is None):
        return "the LayerNormalization has no bias input (onnxscript's rule needs one)"
    return "the parameters are not of shape [D] (onnxscript's skip-normalization check)"


def fuse_residual_add_into_norm(model: ir.Model, ctx: PassContext) -> PassResult:
    """``--ort-fusions`` (ort-cpu): Add + LayerNormalization / SimplifiedLayerNormalization -> Skip*Normalization."""
    from ..core.graph import infer_shapes
    from ..core.ops import attach_functions

    result = PassResult("fuse_residual_add_into_norm", exact=True)
    norms = [n for n in model.graph if n.op_type in NORM_OPS and n.domain in ("", "ai.onnx")]
    result.matched = len(norms)
    if not norms:
        result.notes.append("no LayerNormalization / SimplifiedLayerNormalization / RMSNormalization to fuse")
        return result
    names = {id(n): n.name for n in norms}
    count = _ruleset().apply_to_model(model)
    if count:
        model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        model.graph.sort()
        attach_functions(model)
        failure = infer_shapes(model)
        if failure:
            result.notes.append(f"after fuse_residual_add_into_norm: {failure}")
    left = {id(n) for n in model.graph if n.op_type in NORM_OPS}
    for n in norms:
        if id(n) in left:
            result.skip(names[id(n)], _why_not(n))
        else:
            fused = ("SkipLayerNormalization" if n.op_type == "LayerNormalization"
                     else "SkipSimplifiedLayerNormalization")
            result.rewrote(f"residual Add + {n.op_type} {names[id(n)]} fused into com.microsoft {fused}", names[id(n)])
    return result
