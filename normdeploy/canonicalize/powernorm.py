"""Recognize PowerNorm's GroupScaling (``normdeploy::GroupScaling``) and join it with the running-phi affine
after it into ``normdeploy::PowerNorm`` (DESIGN.md 2).

Math (Shen et al., "PowerNorm", ICML 2020; sIncerass/powernorm
``fairseq/modules/norms/mask_powernorm.py``), on time-first tokens ``[T, B, C]``, G groups of
``Cg = C / G`` contiguous channels:

    GroupScaling1D:   x' = x / sqrt(m + eps),   m_c = mean over c's group of x^2
    MaskPowerNorm (eval):   y = w_c x' / sqrt(phi_c + eps') + b_c

``GroupScaling1D.forward`` writes ``m`` with ``torch.repeat_interleave`` *between* the
statistic and the eps::

    gn = x.reshape(T, B, G, Cg)
    m  = repeat_interleave(mean(gn * gn, dim=3, keepdim=True), Cg, dim=-1).reshape(T, B, C)
    x' = x / sqrt(m + eps)

which every exporter writes as::

    x ──> Reshape(., [T, B, G, Cg]) ──> Mul(., .) | Pow(., 2) ──> ReduceMean(-1)
      ──> Unsqueeze(-1) ──> Expand(., [1, .., 1, Cg]) | Tile(., [1, .., 1, Cg])     (repeat_interleave)
      ──> Reshape(., [T, B, G, -1]) ──> [Reshape(., [T, B, C])] ──> Add(eps) ──> Sqrt ──> Div(x, .)

(dynamo: Expand with a constant shape; TorchScript: Tile whose repeats it computes with
``OneHot`` from ``Shape(x)[2] / G``, read here by :mod:`.static_values`) and is rewritten to
``GroupScaling(x, groups=G, epsilon=eps)``. Exact: the replacement computes the same
per-group mean of squares and the same division (ONNX Runtime: in float32 for float16
inputs). Candidates: a mean of squares of a grouping Reshape that an Unsqueeze reads (where
repeat_interleave starts). Conditions (each failure is a skip reason naming the mean, as
the rest of the stage names a statistic): eps is a constant
scalar; the grouping Reshape keeps x's leading dimensions and splits its static last
dimension C into G groups (G static, C divisible by G); the mean reduces the group's
channels only, with keepdims; the Unsqueeze adds a new last axis; the Expand or Tile
repeats only the two trailing axes, Cg times in all (so each group's mean repeats over its
own Cg channels: ``repeat_interleave``, not ``repeat``); the Reshapes after it end in
x's own shape; no intermediate tensor is read outside the match.

Without ``repeat_interleave``, on the grouped tensor itself (:class:`normdeploy.nn.GroupScaling`,
and so every ``.pt2`` of a normdeploy PowerNorm, which ``torch.export`` traces; any G >= 1,
G = 1 included)::

    g = x.reshape(*x.shape[:-1], G, Cg);  x' = (g / sqrt(mean(g^2, -1, keepdim) + eps)).reshape(x.shape)

    x ──> Reshape(., [.., G, Cg]) = g ──> Pow(g, 2) | Mul(g, g) ──> ReduceMean(-1, keepdims)
      ──> Add(eps) ──> Sqrt ──> Div(g, .) ──> Reshape(., x's shape)

(the division in any spelling of :func:`normdeploy.core.pattern.divided_by_sqrt`) is rewritten
to the same ``GroupScaling(x, groups=G, epsilon=eps)``. Exact: the kept unit axis broadcasts each
group's mean over its own Cg channels, so this is the same per-group mean of squares and the
same division, element for element; the Reshapes move no data. Without its grouping Reshape
(``Div(x, Sqrt(mean(x^2) + eps))`` of x itself) the chain is an RMSNorm and is not matched.
Conditions, all of which make the match no GroupScaling when they fail (the match is then
left, without a skip, to :mod:`.rmsnorm`, which runs after this pass and reads the grouped
tensor's own RMSNorm, as it reads attention heads'): the grouping Reshape keeps x's leading
dimensions and splits its static last dimension C into G groups (G static, C divisible by G);
the mean reduces the last (the group's) axis only, with keepdims; the last Reshape gives x's
shape back (its target is ``Shape(x)``, or its output has x's dimensions, static or named).
Then (skip reasons naming the mean): eps is a constant scalar; no intermediate tensor is read
outside the match.

The running-phi affine is recognized apart, by :mod:`.unified_norm`, as the pure
per-channel affine ``UnifiedNorm(R = phi, W = w, B = b)`` on MaskPowerNorm's ``[B, C, T,
1]`` layout (the arithmetic is UN's). Where a GroupScaling's output reaches such a node
through layout ops only (Transpose, Reshape, Unsqueeze, ..., each value read once), the
two are joined into one ``PowerNorm(x, Phi, W, B, groups, epsilon)`` on x's last axis, the
affine's vectors mapped back through the layout ops (:func:`normdeploy.core.layout.map_backward`)
and the layout ops kept after it: the report then names a PowerNorm, and the representation
is the one the rest of the pipeline already handles: ``fold_affine_into_linear`` folds
``w / sqrt(phi + eps)`` and ``b`` into the linear layer that reads it (through the layout
ops) and leaves its GroupScaling, which ``lower`` turns into its kernel (TensorRT plugin)
or a grouped RMSNormalization (ONNX Runtime). The two epsilons may differ (the reference
passes its eps to MaskPowerNorm, not to GroupScaling1D): Phi = phi + eps' - eps, computed in
float64 and stored once, exact to that rounding; a join that would make Phi negative is
not made and the parts stay as they are (a note says why).

The running-phi affine may also arrive as a per-channel constant affine
(:func:`normdeploy.core.affine.constant_affine`: ``Mul(., a) -> Add(., b)`` by constants, or
the same with ``a = w / sqrt(phi + eps)`` still computed from parameters): a ``.pt2`` of
:class:`normdeploy.nn.PowerNorm` writes ``x' * (w / sqrt(phi + eps)) + b``, and the export
stage's constant folder makes the scale one constant. Reached from a GroupScaling the same way
(layout ops only, each value read once), it joins into ``PowerNorm(x, Phi, W = a, B = b)`` with
``Phi = 1 - eps`` (stored in the model's type): ``sqrt(Phi + eps) = 1`` to the rounding of Phi
(the exact ``Phi + eps`` is within half a unit in the last place of 1 in that type; float32 with
eps 1e-5: 1.4e-8 from 1 in float64, exactly 1 in float32), so ``W / sqrt(Phi + eps) = a`` to
that rounding, and the affine's Mul and Add go. This is honest where the UnifiedNorm case is
not (:mod:`.unified_norm`): the GroupScaling before the affine is what makes the pair a
PowerNorm; a constant affine after anything else stays what it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..core.affine import AFFINE_OPS, Affine, constant_affine
from ..core.graph import DEFAULT_DOMAINS, Namer, add_node, attr, constant, consumers, remove_nodes, replace_value, value
from ..core.layout import MOVERS, map_backward, same_dim, vector_along
from ..core.ops import ATTRIBUTES, DOMAIN
from ..core.passes import PassContext, PassResult
from ..core.pattern import (
    Lit,
    Match,
    Recognizer,
    Var,
    any_of,
    divided_by_sqrt,
    dtype_of,
    op,
    reduce_axes,
    scalar,
    static_shape,
    take_over,
)
from .static_values import evaluate

X = Var("x")
GROUPED = op("Reshape", X, Var("group_shape"), name="group")
GROUP_MEAN_SQUARE = op("ReduceMean", any_of(op("Mul", GROUPED, GROUPED), op("Pow", GROUPED, Lit(2.0))),
                       name="ms", extra_inputs=True)
REPEAT_START = op("Unsqueeze", GROUP_MEAN_SQUARE, Var("unsqueeze_axes"), name="unsqueeze")
REPEATED = any_of(op("Expand", REPEAT_START, Var("repeats"), name="expand"),
                  op("Tile", REPEAT_START, Var("repeats"), name="tile"))
SPREAD = any_of(
    op("Reshape", op("Reshape", REPEATED, Var("s1"), name="r1"), Var("s2"), name="r2"),
    op("Reshape", REPEATED, Var("s1"), name="r1"),
)
GROUP_SCALING = divided_by_sqrt(X, op("Add", SPREAD, Var("eps")))
#: the grouped tensor divided by the root of its own group's mean of squares (keepdims broadcasts it), reshaped back
GROUP_SCALING_RESHAPED = op("Reshape", divided_by_sqrt(GROUPED, op("Add", GROUP_MEAN_SQUARE, Var("eps"))),
                            Var("back_shape"), name="back")


def _spread_by_unsqueeze(ms: ir.Node) -> bool:
    """``ms`` (a per-group mean of squares) is read by an Unsqueeze: the start of repeat_interleave."""
    return any(c.op_type == "Unsqueeze" and c.inputs[0] is ms.outputs[0] for c in consumers(ms.outputs[0]))


@dataclass
class GroupScalingPlan:
    x: ir.Value
    groups: int
    epsilon: float


def _dims(v: ir.Value) -> list | None:
    s = v.shape
    if s is None:
        return None
    return [d if isinstance(d, int) else (getattr(d, "value", None)) for d in s]


def _same_dims(a: list | None, b: list | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(map(same_dim, a, b))


def _group_layout(m: Match) -> tuple[int, int] | str:
    """``(G, Cg)`` of the grouping Reshape, or why it does not split x's last axis into groups."""
    x, group = m.bound["x"], m.bound["group"]
    xs, gs = _dims(x), _dims(group.outputs[0])
    if xs is None:
        return f"rank of {x.name} is unknown"
    c = xs[-1]
    if not isinstance(c, int):
        return f"the last dimension of {x.name} is not static"
    if gs is None:
        target = evaluate(group.inputs[1])
        if target is None:
            return f"the shape Reshape {group.name} groups into is unknown"
        gs = [int(t) for t in target]
        if gs[-1] == -1 and len(gs) >= 2 and gs[-2] > 0:
            gs[-1] = c // gs[-2]
    if len(gs) != len(xs) + 1 or not _same_dims(xs[:-1], gs[:-2]):
        return (f"Reshape {group.name} to {gs} does not keep the leading dimensions of {x.name} {xs} and split "
                "its last axis into groups")
    g = gs[-2]
    if not isinstance(g, int) or g < 1 or c % g:
        return f"Reshape {group.name} splits {c} channels into {g} groups"
    if isinstance(gs[-1], int) and gs[-1] != c // g:
        return f"Reshape {group.name} splits {c} channels into {g} groups of {gs[-1]}"
    return g, c // g


def _repeats_interleave(m: Match, rank: int, g: int, size: int) -> str | None:
    """None if the Expand or Tile repeats each group's mean over the two trailing axes, ``size`` times in all."""
    node = m.bound.get("expand") or m.bound["tile"]
    reps = evaluate(m.bound["repeats"])
    u_dims = _dims(m.bound["unsqueeze"].outputs[0])  # [lead.., G, 1, 1]
    if reps is not None:
        reps = [int(r) for r in reps.reshape(-1)]
        if node.op_type == "Tile":
            if len(reps) != rank or any(r != 1 for r in reps[:-2]) or reps[-1] * reps[-2] != size:
                return f"Tile {node.name} repeats {reps}: not {size} copies over the two trailing axes"
            return None
        if len(reps) > rank or any(r < 1 for r in reps):
            return f"Expand {node.name} to {reps} changes the rank or has empty axes"
        full = [1] * (rank - len(reps)) + reps
        lead_ok = all(r == 1 or (u_dims is not None and same_dim(r, d)) for r, d in zip(full[:-3], u_dims or []))
        if not lead_ok or full[-3] not in (1, g) or full[-1] * full[-2] != size:
            return f"Expand {node.name} to {reps}: not {size} copies over the two trailing axes"
        return None
    out = _dims(node.outputs[0])
    if (out is None or u_dims is None or len(out) != rank or not _same_dims(out[:-2], u_dims[:-2])
            or not all(isinstance(d, int) for d in out[-2:]) or out[-1] * out[-2] != size):
        return f"{node.op_type} {node.name}: its repeats are not known before run time"
    return None


def _epsilon(m: Match) -> float | str:
    """The eps added to the mean of squares (a constant scalar, also where the exporter computes it), or why not."""
    eps = scalar(m.bound["eps"], "epsilon")
    if isinstance(eps, str):
        v = evaluate(m.bound["eps"])
        if v is None or v.size != 1:
            return eps
        eps = float(v.reshape(-1)[0])
    return eps


def _plan_group_scaling(graph: ir.Graph, m: Match) -> GroupScalingPlan | str:
    where = f"ReduceMean {m.bound['ms'].name}"
    eps = _epsilon(m)
    if isinstance(eps, str):
        return f"{where}: {eps}"
    layout = _group_layout(m)
    if isinstance(layout, str):
        return f"{where}: {layout}"
    g, size = layout
    rank = len(_dims(m.bound["x"])) + 1  # of the grouped tensor
    axes = reduce_axes(m.bound["ms"], rank)
    if isinstance(axes, str):
        return f"{where}: {axes}"
    if axes != [-1]:
        return f"{where}: the mean reduces axes {axes}, not the group's channels (the last axis) only"
    uax = evaluate(m.bound["unsqueeze_axes"])
    if uax is None or [int(a) % (rank + 1) for a in uax.reshape(-1)] != [rank]:
        return f"{where}: it does not add one new last axis (axes {None if uax is None else uax.tolist()})"
    why = _repeats_interleave(m, rank + 1, g, size)
    if why:
        return f"{where}: {why}"
    last = (m.bound.get("r2") or m.bound["r1"]).outputs[0]
    if not _same_dims(_dims(last), _dims(m.bound["x"])):
        return (f"{where}: the repeated statistic is reshaped to {_dims(last)}, not the shape of "
                f"{m.bound['x'].name} {_dims(m.bound['x'])}")
    reason = _outside_reader(m)
    if reason:
        return f"{where}: {reason}"
    return GroupScalingPlan(m.bound["x"], g, eps)


def _feeds_only(node: ir.Node, inside: set, depth: int = 8) -> bool:
    """Every output of ``node`` is read only by ``inside`` nodes or by nodes that in turn feed only them."""
    if depth == 0:
        return False
    for o in node.outputs:
        if o.is_graph_output():
            return False
        for c in consumers(o):
            if c not in inside and not _feeds_only(c, inside, depth - 1):
                return False
    return True


def _outside_reader(m: Match) -> str | None:
    """:func:`outside_consumer`, except that a reader whose result only feeds the match back is no reader.

    The dynamo exporter writes ``repeat_interleave``'s Expand shape from ``Shape(mean)``: the
    Shape reads an intermediate tensor, but only to compute the match's own Expand operand, so
    it goes once the match is replaced.
    """
    inside = set(m.unique_nodes())
    for n in m.unique_nodes()[1:]:
        for o in n.outputs:
            if o.is_graph_output():
                return f"intermediate tensor {o.name} is a graph output"
            for c in consumers(o):
                if c not in inside and not _feeds_only(c, inside):
                    return f"intermediate tensor {o.name} has another consumer ({c.op_type} {c.name})"
    return None


def _rewrite_group_scaling(graph: ir.Graph, m: Match, plan: GroupScalingPlan, namer: Namer) -> tuple[str, str, str]:
    root = m.nodes[0]
    base = root.name or "group_scaling"
    node = add_node(namer, "GroupScaling", [plan.x], base=base, domain=DOMAIN,
                    attrs={"groups": int(plan.groups), "epsilon": float(plan.epsilon)})
    take_over(root, node.outputs[0])
    how = "Tile" if "tile" in m.bound else "Expand"
    return (f"GroupScaling (repeat_interleave as Unsqueeze {how} Reshape) ending at {root.name} -> "
            f"{DOMAIN}::GroupScaling {node.name} ({plan.groups} groups, eps {plan.epsilon:g})", node.name,
            "sIncerass/powernorm GroupScaling1D")


GROUP_SCALING_RECOGNIZER = Recognizer(
    pattern=GROUP_SCALING,
    anchor="ms",
    root_ops=frozenset({"Div", "Mul"}),
    plan=_plan_group_scaling,
    rewrite=_rewrite_group_scaling,
    candidate=GROUP_MEAN_SQUARE,
    candidate_ops=frozenset({"ReduceMean"}),
    accept_candidate=lambda m: _spread_by_unsqueeze(m.bound["ms"]),
    incomplete="a per-group mean of squares spread by repeat_interleave (Unsqueeze, Expand/Tile, Reshape) is not "
               "followed by Add eps, Sqrt and a division of the same x (GroupScaling1D)",
)

# ----------------------------------------------------------------------------- GroupScaling on the grouped tensor


def _restores_shape(back: ir.Node, x: ir.Value) -> bool:
    """The Reshape ``back`` gives ``x``'s own shape back: its target is ``Shape(x)``, or its output has x's
    dimensions (shape inference: static sizes and named dynamic ones), or its target is x's static shape."""
    target = back.inputs[1]
    src = target.producer() if target is not None else None
    if (src is not None and src.op_type == "Shape" and src.domain in DEFAULT_DOMAINS and src.inputs[0] is x
            and not attr(src, "start", 0) and attr(src, "end", None) is None):
        return True
    xs = _dims(x)
    if _same_dims(_dims(back.outputs[0]), xs):
        return True
    t = evaluate(target)
    return (t is not None and xs is not None and all(isinstance(d, int) for d in xs)
            and [int(d) for d in t.reshape(-1)] == xs)


def _plan_group_scaling_reshaped(graph: ir.Graph, m: Match) -> GroupScalingPlan | str | None:
    """None where the match is no GroupScaling: the Reshape does not split x's last axis into groups, the mean is
    not over the group's channels only, or the result is not reshaped back to x's shape. That is a mean of squares
    of some reshaped tensor, and an RMSNorm of it (and so :mod:`.rmsnorm`'s, which runs after this pass)."""
    x = m.bound["x"]
    layout = _group_layout(m)
    if isinstance(layout, str):
        return None
    if reduce_axes(m.bound["ms"], len(_dims(x)) + 1) != [-1] or not _restores_shape(m.bound["back"], x):
        return None
    where = f"ReduceMean {m.bound['ms'].name}"
    eps = _epsilon(m)
    if isinstance(eps, str):
        return f"{where}: {eps}"
    reason = _outside_reader(m)
    if reason:
        return f"{where}: {reason}"
    return GroupScalingPlan(x, layout[0], eps)


def _rewrite_group_scaling_reshaped(graph: ir.Graph, m: Match, plan: GroupScalingPlan,
                                    namer: Namer) -> tuple[str, str, str]:
    root = m.nodes[0]
    node = add_node(namer, "GroupScaling", [plan.x], base=root.name or "group_scaling", domain=DOMAIN,
                    attrs={"groups": int(plan.groups), "epsilon": float(plan.epsilon)})
    take_over(root, node.outputs[0])
    return (f"GroupScaling (grouping Reshape, per-group mean of squares, Reshape back) ending at {root.name} -> "
            f"{DOMAIN}::GroupScaling {node.name} ({plan.groups} groups, eps {plan.epsilon:g})", node.name,
            "GroupScaling on the grouped tensor")


GROUP_SCALING_RESHAPED_RECOGNIZER = Recognizer(
    pattern=GROUP_SCALING_RESHAPED,
    anchor="ms",
    root_ops=frozenset({"Reshape"}),
    plan=_plan_group_scaling_reshaped,
    rewrite=_rewrite_group_scaling_reshaped,
    candidate=GROUP_MEAN_SQUARE,
    candidate_ops=frozenset({"ReduceMean"}),
    # a mean of squares of a reshaped tensor that is not this whole spelling is no candidate of this recognizer:
    # it is an RMSNorm over the reshaped tensor, which recognize_rmsnorm takes or reports
    accept_candidate=lambda m: False,
    incomplete="",
)

# ----------------------------------------------------------------------------- GroupScaling + running-phi affine

_MAX_CHAIN = 8


def _layout_chain(gs: ir.Node) -> tuple[list[ir.Node], ir.Node | Affine] | str | None:
    """The layout ops from ``gs``'s output to the running-phi affine that reads it (a UnifiedNorm node, or a
    per-channel constant affine), or None if none does."""
    v, chain = gs.outputs[0], []
    for _ in range(_MAX_CHAIN + 1):
        readers = consumers(v)
        if len(readers) != 1:
            return None if not chain else f"{v.name} has {len(readers)} readers"
        n = readers[0]
        if n.domain == DOMAIN and n.op_type == "UnifiedNorm" and n.inputs[0] is v:
            return (chain, n) if not v.is_graph_output() else f"{v.name} is a graph output"
        aff = constant_affine(n) if n.domain in DEFAULT_DOMAINS and n.op_type in AFFINE_OPS else None
        if aff is not None and aff.x is v:
            return (chain, aff) if not v.is_graph_output() else f"{v.name} is a graph output"
        if n.op_type not in MOVERS or n.domain not in DEFAULT_DOMAINS or n.inputs[0] is not v:
            return None
        if v.is_graph_output():
            return None
        chain.append(n)
        v = n.outputs[0]
    return None


def _channel_array(vec: np.ndarray, axis: int, rank: int | None) -> np.ndarray | None:
    if axis < 0:
        return vec.reshape((vec.size,) + (1,) * (-axis - 1))
    if rank is None:
        return None
    return vec.reshape((vec.size,) + (1,) * (rank - axis - 1))


def _unified_norm_arrays(un: ir.Node) -> tuple[list[np.ndarray], float, np.dtype] | str:
    """``([r, w, b] as arrays on the UnifiedNorm's input, its eps, the parameters' dtype)``, or why not."""
    from ..core.graph import const_value

    r, w, b = (const_value(t) for t in un.inputs[1:4])
    if r is None or w is None or b is None:
        return f"UnifiedNorm {un.name} has parameters that are not constants"
    axis = int(attr(un, "axis", ATTRIBUTES["UnifiedNorm"]["axis"]))
    rank = len(static_shape(un.inputs[0])) if static_shape(un.inputs[0]) is not None else None
    arrs = [_channel_array(np.asarray(a, np.float64).reshape(-1), axis, rank) for a in (r, w, b)]
    if any(a is None for a in arrs):
        return f"rank of the input of UnifiedNorm {un.name} is unknown"
    return arrs, float(attr(un, "epsilon", ATTRIBUTES["UnifiedNorm"]["epsilon"])), np.asarray(w).dtype


def _drop_affine(graph: ir.Graph, aff: Affine) -> None:
    """Remove a constant affine's nodes, its readers reading its input x (a ``Shape`` or ``CastLike`` that reads an
    intermediate value for its shape or type reads x instead: the same shape and type)."""
    inside = set(aff.all_nodes)
    for n in aff.all_nodes[:-1]:
        for user, idx in list(n.outputs[0].uses()):
            if user not in inside:
                user.replace_input_with(idx, aff.x)
    replace_value(aff.y, aff.x)
    remove_nodes(graph, aff.all_nodes)


def _join(graph: ir.Graph, gs: ir.Node, chain: list[ir.Node], after: ir.Node | Affine,
          namer: Namer) -> str | tuple[str, str]:
    """Replace ``gs`` -> layout ops -> ``after`` by PowerNorm -> layout ops; the reason where that is not exact."""
    y = gs.outputs[0]
    eps_gs = float(attr(gs, "epsilon", ATTRIBUTES["GroupScaling"]["epsilon"]))
    if isinstance(after, Affine):
        what = after.describe()
        arrs, dtype = [after.scale, after.shift], dtype_of(y) or np.dtype(np.float32)
    else:
        what = f"UnifiedNorm {after.name}"
        found = _unified_norm_arrays(after)
        if isinstance(found, str):
            return found
        arrs, eps_un, dtype = found
    for mover in reversed(chain):
        arrs = map_backward(mover, arrs)
        if isinstance(arrs, str):
            return f"through {mover.op_type} {mover.name}: {arrs}"
    c = static_shape(y)[-1] if static_shape(y) else None
    if c is None:
        return f"the last dimension of {y.name} is not static"
    vecs = [vector_along(a, -1, len(static_shape(y)), c) for a in arrs]
    if any(v is None for v in vecs):
        return f"the affine of {what} is not per channel on the last axis of {y.name}"
    if isinstance(after, Affine):  # the scale as W, with Phi + eps = 1
        phi, (w, b) = np.full(c, 1.0 - eps_gs), vecs
        if np.any(phi < 0):
            return f"1 - {eps_gs:g} (the GroupScaling's eps) is negative: no Phi >= 0 makes sqrt(Phi + eps) = 1"
    else:
        phi, w, b = vecs[0] + eps_un - eps_gs, vecs[1], vecs[2]
        if np.any(phi < 0):
            return (f"phi + {eps_un:g} - {eps_gs:g} (the GroupScaling's eps) is negative for some channels: "
                    "PowerNorm has one eps for both")
    base = gs.name or "powernorm"
    params = [constant(namer, base, "phi", phi.astype(dtype)), constant(namer, base, "weight", w.astype(dtype)),
              constant(namer, base, "bias", b.astype(dtype))]
    out = value(namer, base, "powernorm", dtype=y.dtype, shape=y.shape)
    pn = add_node(namer, "PowerNorm", [gs.inputs[0], *params], [out], base=base, domain=DOMAIN,
                  attrs={"groups": int(attr(gs, "groups", 1)), "epsilon": eps_gs})
    if isinstance(after, Affine):
        _drop_affine(graph, after)  # its readers read the layout chain's end (or y) ...
        replace_value(y, out)  # ... and y's readers the PowerNorm
    else:
        replace_value(y, out)
        replace_value(after.outputs[0], after.inputs[0])
        remove_nodes(graph, [after])
    remove_nodes(graph, [gs])
    via = " ".join(n.op_type for n in chain)
    how = " (W = its scale, Phi = 1 - eps)" if isinstance(after, Affine) else ""
    return (f"GroupScaling {gs.name} and the running-phi affine {what} after {via or 'it'} -> "
            f"{DOMAIN}::PowerNorm {pn.name}{how} (the layout ops kept after it)"), pn.name


def join_powernorm(graph: ir.Graph, result: PassResult) -> None:
    """Join each GroupScaling with the running-phi affine its output reaches through layout ops only (a UnifiedNorm,
    or a per-channel constant affine) into a PowerNorm."""
    namer = Namer(graph)
    for gs in [n for n in graph if n.domain == DOMAIN and n.op_type == "GroupScaling"]:
        found = _layout_chain(gs)
        if found is None:
            continue
        if isinstance(found, str):
            result.notes.append(f"GroupScaling {gs.name} stays apart from the affine after it: {found}")
            continue
        chain, after = found
        spelling = " ".join(n.op_type for n in chain + (list(after.nodes) if isinstance(after, Affine) else [after]))
        name = after.describe() if isinstance(after, Affine) else f"UnifiedNorm {after.name}"
        done = _join(graph, gs, chain, after, namer)
        if isinstance(done, str):
            result.notes.append(f"GroupScaling {gs.name} and {name} stay apart: {done}")
            continue
        result.matched += 1
        label = ("PowerNorm eval, the running-phi affine a UnifiedNorm" if not isinstance(after, Affine)
                 else "PowerNorm eval, the running-phi affine a constant")
        result.rewrote(*done, f"{label}: GroupScaling {spelling}")


def recognize_powernorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite GroupScaling1D (repeat_interleave spelling) and GroupScaling on the grouped tensor (Reshape to groups,
    Reshape back) to normdeploy::GroupScaling, and join it with a running-phi affine after it (a UnifiedNorm
    recognized by recognize_unified_norm, or a per-channel constant affine) into normdeploy::PowerNorm."""
    GROUP_SCALING_RECOGNIZER.run(graph, result)
    GROUP_SCALING_RESHAPED_RECOGNIZER.run(graph, result)
    join_powernorm(graph, result)
