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
from onnx import numpy_helper

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


def kind_of(node: onnx.NodeProto) -> str | None:
    dom = "" if node.domain in ("", "ai.onnx") else node.domain
    kind = KINDS.get((dom, node.op_type))
    if kind is None and node.op_type.startswith(PLUGIN_PREFIX):
        kind = node.op_type[len(PLUGIN_PREFIX):]
    return kind


def find_norms(model: onnx.ModelProto) -> list[NormNode]:
    out = []
    for i, n in enumerate(model.graph.node):
        kind = kind_of(n)
        if kind:
            out.append(NormNode(n.name or f"{n.op_type}_{i}", kind, n.op_type, n.domain, n.input[0], n.output[0]))
    return out


def count_by_kind(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.kind for n in find_norms(model)).items()))


def validate_parameters(model: onnx.ModelProto) -> list[str]:
    """Raise on NaN/Inf or negative statistics in any normalization; return notes (zero gains)."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    notes = []

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            for a in consts[name].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    for i, n in enumerate(model.graph.node):
        kind = kind_of(n)
        if not kind:
            continue
        label = f"{kind} node {n.name or i}"
        for j, name in enumerate(n.input[1:], start=1):
            v = value(name) if name else None
            if v is None or not np.issubdtype(v.dtype, np.floating):
                continue
            if not np.all(np.isfinite(v)):
                raise InputError(f"{label}: parameter {name} holds NaN or Inf",
                                 "the checkpoint is corrupt or diverged; retrain or restore it")
            stat = _STAT_INPUTS.get(kind, {}).get(j)
            if stat and np.any(v < 0):
                raise InputError(f"{label}: {stat} {name} has negative entries (min {v.min():.3g})",
                                 "running statistics of a square cannot be negative; the checkpoint is corrupt")
        if kind == "BatchNorm" and len(n.input) > 1:
            g = value(n.input[1])
            if g is not None and np.any(g == 0):
                notes.append(f"{label}: gamma is zero in {int(np.sum(g == 0))} channel(s); those outputs are constant")
    return notes
