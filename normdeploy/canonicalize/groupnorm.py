"""Recognize GroupNorm and timm's EvoNorm B0 / S0, and report each with its kind and what becomes of it.

GroupNorm, per sample n and group g of the ``C / G`` channels ``c`` in g (all positions)::

    y = w_c (x - mean_g) / sqrt(var_g + eps) + b_c

torch's ``F.group_norm`` (``nn.GroupNorm``, timm's ``GroupNorm`` / ``GroupNorm1``, diffusion UNets)
comes out of the TorchScript exporter, and of the dynamo exporter below opset 21, as::

    x -> Reshape([N, G, -1]) -> InstanceNormalization(scale 1, bias 0, eps) -> Reshape(Shape(x))
      -> Mul(w [C, 1, ...]) -> Add(b [C, 1, ...])

(InstanceNormalization over ``[N, G, L]`` normalizes each (n, g) row: the group statistics), and
from dynamo at opset 21+ as one ``GroupNormalization(x, w, b, num_groups, epsilon)``. No canonical
normdeploy op is made for it: the spelling above *is* the fastest exact form ONNX Runtime has
(1.32 has no GroupNormalization kernel and runs that op's function body, ReduceMean and all,
~1.8x slower on a [4, 64, 32, 32] map), so it is recognized, reported (kind, groups, eps,
spelling) and kept; its ``Mul`` / ``Add`` are a per-channel constant affine that
``fold_affine_into_linear`` folds where linear layers read the result (a UNet attention block's
q, k, v) and otherwise reports why not (a SiLU reads it). A ``GroupNormalization`` node is
lowered to this spelling for ONNX Runtime (:mod:`normdeploy.lower.groupnorm`).

EvoNorm (timm/layers/evo_norm.py, Liu et al. 2020), eval::

    B0:  y = x / max(sqrt(running_var + eps), v x + instance_std(x)) * w + b
    S0:  y = x * sigmoid(v x) / group_std(x) * w + b

with ``instance_std`` / ``group_std`` the (biased) std over ``(H, W)`` / over ``[C / G, H, W]`` of
``x.reshape(B, G, C / G, H, W)``, each ``sqrt(var + eps)``. Their cores are not affine (a max of a
running and a per-sample statistic; a sigmoid of the input) and no target here has a kernel for
them: they are recognized, reported and kept as exported; the trailing ``* w + b`` is a constant
affine for ``fold_affine_into_linear``. The variance is matched in the spellings of
:func:`normdeploy.canonicalize.statistics.mean_over` (``ReduceMean``, ``Sub``, ``Mul``, ``ReduceMean``;
dynamo restores dropped axes with Reshape / Expand).

Nothing here edits the graph; every match is one skip of ``recognize_groupnorm`` naming the
node, the kind and the reason it is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..core.affine import constant_of, value_readers
from ..core.graph import DEFAULT_DOMAINS, attr, consumers, shape_of
from ..core.passes import PassContext, PassResult
from ..core.pattern import Match, Var, any_of, match, op, spelling_of
from .statistics import mean_over

X = Var("x")
GROUPED = op("Reshape", X, Var("group_shape"), name="group_reshape")
INSTANCE = op("InstanceNormalization", GROUPED, Var("unit_scale"), Var("zero_bias"), name="inorm")
GROUP_NORM = op("Reshape", INSTANCE, Var("back_shape"), name="back")

ORT_NOTE = ("InstanceNormalization over [N, G, -1] is the fastest exact form ONNX Runtime has (no GroupNormalization "
            "kernel: it runs that op's function body, ~1.8x slower)")


def _variance(src, name: str):
    """The biased variance of ``src`` over some axes (kept): mean((src - mean(src))^2)."""
    diff = op("Sub", src, mean_over(src, f"{name}.mean"), name=f"{name}.diff")
    return mean_over(op("Mul", diff, diff), name)


def _broadcast(p, name: str):
    """``p`` as is, expanded, reshaped, or both (``std.expand(x.shape).reshape(B, C, H, W)``)."""
    expanded = op("Expand", p, Var(f"{name}.expand_to"), name=f"{name}.expand")
    return any_of(p, expanded, op("Reshape", expanded, Var(f"{name}.reshape_to"), name=f"{name}.reshape"),
                  op("Reshape", p, Var(f"{name}.reshape_to"), name=f"{name}.reshape"))


def _std(src, name: str):
    return _broadcast(op("Sqrt", op("Add", _variance(src, f"{name}.var"), Var(f"{name}.eps")), name=name), name)


EVONORM_S0 = op("Div", op("Mul", X, op("Sigmoid", op("Mul", X, Var("v")))),
                _std(op("Reshape", X, Var("group_shape"), name="grouped"), "std"), name="evonorm")
_B0_RIGHT = op("Add", op("Mul", X, Var("v")), _std(X, "std"))
EVONORM_B0 = op("Div", X, any_of(op("Max", Var("left"), _B0_RIGHT, name="max"),
                                 op("Max", _B0_RIGHT, Var("left"), name="max")), name="evonorm")


@dataclass
class GroupNormSpelling:
    """A GroupNorm spelled as InstanceNormalization between Reshapes; ``affine`` its Mul / Add readers."""

    anchor: ir.Node  # the InstanceNormalization
    groups: int
    epsilon: float
    channels: int | None
    spelling: str
    affine: list[ir.Node]


def _per_channel(v: ir.Value, channels: int | None, rank: int | None) -> bool:
    k = constant_of(v)
    if k is None or rank is None or k.ndim > rank:
        return False
    shape = (1,) * (rank - k.ndim) + k.shape
    return all(d == 1 for i, d in enumerate(shape) if i != 1) and shape[1] in (1, channels)


def _affine_after(y: ir.Value, channels: int | None, rank: int | None) -> list[ir.Node]:
    """The ``Mul(w)`` and ``Add(b)`` (either alone) that alone read the normalized ``y``, per channel."""
    out, v = [], y
    for op_type in ("Mul", "Add"):
        readers = value_readers(v)
        if v.is_graph_output() or len(readers) != 1 or readers[0].op_type != op_type or len(readers[0].inputs) != 2:
            continue
        n = readers[0]
        other = n.inputs[1] if n.inputs[0] is v else n.inputs[0]
        if not _per_channel(other, channels, rank):
            break
        out.append(n)
        v = n.outputs[0]
    return out


def group_norm_of(graph: ir.Graph, node: ir.Node) -> GroupNormSpelling | str | None:
    """The GroupNorm that InstanceNormalization ``node`` computes, the reason it is not one, or None when
    ``node`` is not read through a Reshape (a plain InstanceNorm, not this recognizer's business)."""
    readers = consumers(node.outputs[0])
    if len(readers) != 1 or readers[0].op_type != "Reshape":
        return None
    back = readers[0]
    m = next(iter(match(GROUP_NORM, back.outputs[0], Match())), None)
    if m is None:
        return None
    x = m.bound["x"]
    scale, bias = constant_of(m.bound["unit_scale"]), constant_of(m.bound["zero_bias"])
    if scale is None or bias is None:
        return f"InstanceNormalization {node.name} scale or bias is not a constant"
    if np.any(scale != 1) or np.any(bias != 0):
        return (f"InstanceNormalization {node.name} of a reshaped tensor has a non-unit scale or a bias: a per-group "
                "affine, not F.group_norm's spelling")
    groups = int(scale.size)
    grouped, x_shape = shape_of(m.bound["group_reshape"].outputs[0]), shape_of(x)
    target = constant_of(m.bound["group_shape"])
    target = None if target is None else [int(t) for t in np.asarray(target).reshape(-1)]
    batch = x_shape[0] if x_shape else None
    makes_groups = (grouped is not None and len(grouped) == 3 and grouped[1] == groups) or (
        target is not None and len(target) == 3 and target[1:] == [groups, -1]
        and (target[0] == 0 and not attr(m.bound["group_reshape"], "allowzero", 0) or target[0] == batch))
    if not makes_groups:
        return (f"Reshape {m.bound['group_reshape'].name} does not make [N, {groups}, -1] "
                f"(shape {grouped if target is None else target})")
    back_src = m.bound["back_shape"].producer()
    restores = back_src is not None and back_src.op_type == "Shape" and back_src.inputs[0] is x and \
        attr(back_src, "start", 0) == 0 and attr(back_src, "end", None) is None
    out_shape = shape_of(back.outputs[0])
    if not restores and not (x_shape is not None and out_shape == x_shape and None not in x_shape):
        return f"Reshape {back.name} does not put back the shape of {x.name}"
    channels = x_shape[1] if x_shape is not None and len(x_shape) > 1 and isinstance(x_shape[1], int) else None
    if channels is not None and channels % groups:
        return f"{channels} channels do not split into {groups} groups"
    affine = _affine_after(back.outputs[0], channels, len(x_shape) if x_shape is not None else None)
    spelling = spelling_of(Match(nodes=tuple(m.unique_nodes() + affine)), graph)
    return GroupNormSpelling(node, groups, float(attr(node, "epsilon", 1e-5)), channels, spelling, affine)


def _evonorm(graph: ir.Graph, node: ir.Node) -> tuple[str, str, Match] | None:
    """``(kind, spelling, match)`` when the Div ``node`` is an EvoNorm B0 / S0 core."""
    for kind, pattern in (("EvoNorm-S0", EVONORM_S0), ("EvoNorm-B0", EVONORM_B0)):
        for m in match(pattern, node.outputs[0], Match()):
            if m.bound["evonorm"] is node:
                return kind, spelling_of(m, graph), m
    return None


def _evonorm_reason(kind: str, spelling: str, m: Match) -> str:
    groups = ""
    if kind == "EvoNorm-S0":
        gs = shape_of(m.bound["grouped"].outputs[0])
        groups = f", {gs[1]} groups" if gs is not None and len(gs) > 1 and isinstance(gs[1], int) else ""
        core = "x * sigmoid(v x) / group_std(x): a sigmoid of the input over a group std"
    else:
        core = "x / max(sqrt(running_var + eps), v x + instance_std(x)): a max of a running and a per-sample std"
    eps = constant_of(m.bound["std.eps"])
    eps_txt = f", eps {float(np.asarray(eps).reshape(-1)[0]):.3g}" if eps is not None and eps.size == 1 else ""
    return (f"{kind} (timm evo_norm.py{groups}{eps_txt}; spelled {spelling}) recognized: kept as exported: its core "
            f"{core} is not affine and no target here has a kernel for it; its trailing per-channel * weight + bias "
            "is a constant affine (fold_affine_into_linear)")


def recognize_groupnorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Report every GroupNorm spelled with InstanceNormalization, and every EvoNorm B0 / S0 (nothing is rewritten)."""
    graph.sort()
    for node in list(graph):
        if node.domain not in DEFAULT_DOMAINS or not node.outputs:
            continue
        if node.op_type == "InstanceNormalization":
            gn = group_norm_of(graph, node)
            if gn is None:
                continue
            result.matched += 1
            if isinstance(gn, str):
                result.skip(node.name, gn)
                continue
            affine = (f"; its gain and bias ({' '.join(n.op_type for n in gn.affine)}) are a per-channel constant "
                      "affine (fold_affine_into_linear)") if gn.affine else ""
            result.skip(node.name, f"GroupNorm ({gn.groups} groups, eps {gn.epsilon:.3g}; torch F.group_norm spelled "
                                   f"{gn.spelling}) recognized: kept as exported: {ORT_NOTE}{affine}")
        elif node.op_type == "Div":
            evo = _evonorm(graph, node)
            if evo is not None:
                result.matched += 1
                result.skip(node.name, _evonorm_reason(*evo))
