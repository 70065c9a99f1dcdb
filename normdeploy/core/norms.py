"""The normalization catalogue: which ``(domain, op_type)`` is which kind, where they are, and
whether their stored statistics are usable.

Used by ``inspect`` (what is there and what will happen to it), by the report
(``norm_nodes.before`` / ``.after``), by the validation of running statistics
(DESIGN.md section 8) and by the benchmark floor (:mod:`normdeploy.bench.floor`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import InputError
from .ops import DOMAIN

#: (domain, op_type) -> kind; domain "" covers ai.onnx and ONNX Runtime's default-domain ops.
KINDS: dict[tuple[str, str], str] = {
    ("", "BatchNormalization"): "BatchNorm",
    ("", "LayerNormalization"): "LayerNorm",
    ("", "RMSNormalization"): "RMSNorm",
    ("", "SimplifiedLayerNormalization"): "RMSNorm",
    ("", "InstanceNormalization"): "InstanceNorm",
    ("", "GroupNormalization"): "GroupNorm",
    ("com.microsoft", "SkipLayerNormalization"): "LayerNorm",
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): "RMSNorm",
    (DOMAIN, "UnifiedNorm"): "UnifiedNorm",
    (DOMAIN, "PowerNorm"): "PowerNorm",
    (DOMAIN, "GroupScaling"): "GroupScaling",
    (DOMAIN, "RMSNorm"): "RMSNorm",
    (DOMAIN, "CRMSNorm"): "CRMSNorm",
    (DOMAIN, "DynamicTanh"): "DynamicTanh",
    (DOMAIN, "ScaleNorm"): "ScaleNorm",
}
#: plugin nodes of the trt targets (op_type prefix) count as the kind they implement.
PLUGIN_PREFIX = "Normdeploy"

# Which inputs hold statistics that must be finite and non-negative, by kind.
_STAT_INPUTS = {"BatchNorm": {4: "running variance"}, "UnifiedNorm": {1: "running moment"},
                "PowerNorm": {1: "running quadratic mean"}}


@dataclass
class NormNode:
    name: str
    kind: str
    op_type: str
    domain: str
    input: str
    output: str


def kind_of(node) -> str | None:
    """The kind of an ``onnx_ir.Node`` or ``onnx.NodeProto``, or None when it is not a normalization."""
    dom = "" if node.domain in ("", "ai.onnx") else node.domain
    kind = KINDS.get((dom, node.op_type))
    if kind is None and node.op_type.startswith(PLUGIN_PREFIX):
        kind = node.op_type[len(PLUGIN_PREFIX):]
    return kind


def _nodes(model):
    """(name, op_type, domain, first input name, first output name) of every main-graph node."""
    if isinstance(model, onnx.ModelProto):
        for n in model.graph.node:
            yield n, n.name, (n.input[0] if n.input else ""), (n.output[0] if n.output else "")
        return
    for n in model.graph:
        x = n.inputs[0] if n.inputs else None
        yield n, n.name, (x.name if x is not None else ""), (n.outputs[0].name if n.outputs else "")


def _grouped_instance_norms(model) -> set[str]:
    """Output names of the InstanceNormalizations that sit between two Reshapes (``Reshape -> InstanceNormalization
    -> Reshape``): torch's spelling of GroupNorm (:mod:`normdeploy.canonicalize.groupnorm` checks it in full)."""
    if isinstance(model, onnx.ModelProto):
        producer = {o: n.op_type for n in model.graph.node for o in n.output}
        readers: dict[str, list[str]] = {}
        for n in model.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n.op_type)
        return {n.output[0] for n in model.graph.node if n.op_type == "InstanceNormalization" and n.input
                and producer.get(n.input[0]) == "Reshape" and readers.get(n.output[0]) == ["Reshape"]}
    out = set()
    for n in model.graph:
        if n.op_type == "InstanceNormalization" and n.inputs and n.inputs[0] is not None:
            src, users = n.inputs[0].producer(), [u.op_type for u, _ in n.outputs[0].uses()]
            if src is not None and src.op_type == "Reshape" and users == ["Reshape"]:
                out.add(n.outputs[0].name)
    return out


def find_norms(model) -> list[NormNode]:
    """Every normalization node of an ``onnx_ir.Model`` (or ``onnx.ModelProto``), in graph order; an
    InstanceNormalization between two Reshapes counts as the GroupNorm it computes."""
    out = []
    grouped = _grouped_instance_norms(model)
    for i, (n, name, x, y) in enumerate(_nodes(model)):
        kind = kind_of(n)
        if kind == "InstanceNorm" and y in grouped:
            kind = "GroupNorm"
        if kind:
            out.append(NormNode(name or f"{n.op_type}_{i}", kind, n.op_type, n.domain, x, y))
    return out


def count_by_kind(model) -> dict[str, int]:
    return dict(sorted(Counter(n.kind for n in find_norms(model)).items()))


def validate_parameters(model) -> list[str]:
    """Raise on NaN/Inf or negative statistics in any normalization; return notes (zero gains).

    ``model`` is an ``onnx_ir.Model`` (or an ``onnx.ModelProto``); only the parameters of
    normalization nodes are read, so a large model's other weights stay on disk.
    """
    if isinstance(model, onnx.ModelProto):
        import onnx_ir as ir

        model = ir.from_proto(model)
    from .graph import const_value

    notes = []
    for i, n in enumerate(model.graph):
        kind = kind_of(n)
        if not kind:
            continue
        label = f"{kind} node {n.name or i}"
        for j, x in enumerate(n.inputs[1:], start=1):
            v = const_value(x)
            if v is None or not np.issubdtype(v.dtype, np.floating):
                continue
            if not np.all(np.isfinite(v)):
                raise InputError(f"{label}: parameter {x.name} holds NaN or Inf",
                                 "the checkpoint is corrupt or diverged; retrain or restore it")
            stat = _STAT_INPUTS.get(kind, {}).get(j)
            if stat and np.any(v < 0):
                raise InputError(f"{label}: {stat} {x.name} has negative entries (min {v.min():.3g})",
                                 "running statistics of a square cannot be negative; the checkpoint is corrupt")
        if kind == "BatchNorm" and len(n.inputs) > 1:
            g = const_value(n.inputs[1])
            if g is not None and np.any(g == 0):
                notes.append(f"{label}: gamma is zero in {int(np.sum(g == 0))} channel(s); those outputs are constant")
    return notes
