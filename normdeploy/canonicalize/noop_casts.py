"""Remove Casts to the type their input already has (``Cast(x: float, to=FLOAT)``), before the rewrite stage.

Math: ``Cast(x, to=T)`` with x of type T is the identity, so removing it is exact (bit for bit).

Why here: the TorchScript exporter keeps the no-op ``x.float()`` of a LayerNorm module written by
hand (ZixuanJiang/pre-rmsnorm-transformer's ``CustomizedLayerNorm``) as a Cast ON the residual
stream (``Add -> Cast(float -> float) -> Add``); the recognizers look through such Casts, but the
Pre-LN stream analysis of :mod:`normdeploy.rewrite.preln_to_rmsnorm` reads the graph as it is and
would see a non-affine write. Removing them once here keeps every later stage simple.

How: onnxscript's own rule decides and rewrites (``onnxscript.rewriter.rules.common.no_op_cast_rule``:
a Cast whose input's declared type equals ``to`` becomes an Identity); the Identities it made are
then bypassed (their readers read the Cast's input), except where the Identity writes a graph output,
whose name must stay: that Identity is kept. Casts of unknown input type are left as they are (the
rule cannot prove them no-ops). Pre-existing Identity nodes are not touched. The step records what
it removed as a note, not as a rewrite: it changes no normalization, and a model whose only change
is this one still counts as having nothing to rewrite.
"""
from __future__ import annotations

import onnx_ir as ir

from ..core.graph import DEFAULT_DOMAINS
from ..core.passes import PassContext, PassResult, settle

NAME = "remove_noop_casts"


def remove_noop_casts(model: ir.Model, ctx: PassContext) -> PassResult | None:
    """Drop every Cast to its input's own type (exact); returns a result with a note, or None if there was none."""
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.rules.common import no_op_cast_rule

    graph = model.graph
    casts = [n.name for n in graph if n.op_type == "Cast" and n.domain in DEFAULT_DOMAINS]
    if not casts:
        return None
    before = {id(n) for n in graph if n.op_type == "Identity"}
    if not RewriteRuleSet([no_op_cast_rule]).apply_to_model(model):
        return None
    removed = kept = 0
    for node in list(graph):
        if node.op_type != "Identity" or id(node) in before or node.domain not in DEFAULT_DOMAINS:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            kept += 1
            continue
        out.replace_all_uses_with(node.inputs[0])  # the input keeps its own name
        graph.remove(node, safe=True)
        removed += 1
    settle(model)
    left = [n.name for n in graph if n.op_type == "Cast" and n.domain in DEFAULT_DOMAINS]
    gone = [c for c in casts if c not in set(left)]
    shown = ", ".join(gone[:4]) + (f" and {len(gone) - 4} more" if len(gone) > 4 else "")
    note = (f"{removed + kept} Cast(s) to the type their input already has removed (exact: the identity): {shown}"
            + (f"; {kept} of them write a graph output and became an Identity" if kept else ""))
    return PassResult(NAME, exact=True, notes=[note])
