"""Fold every per-channel affine into a neighbouring linear layer (DESIGN.md 3.1).

Sources: every normalization whose output is ``y = a * core(x) + c`` with constant ``a``,
``c`` varying along one channel axis (:func:`normdeploy.core.affine.affine_of`: BatchNorm,
UnifiedNorm, PowerNorm's affine, the gain and bias of LayerNorm, GroupNormalization, RMSNorm,
CRMSNorm, ScaleNorm, DynamicTanh), and every per-channel constant affine written as a chain of
Mul / Div / Add / Sub by constants (:func:`normdeploy.core.affine.constant_affine`: a decomposed
or frozen BatchNorm, a layer scale, GroupNorm's and EvoNorm's trailing ``* w + b``).

Directions. With ``t = W x + b`` a linear layer (Conv with any groups, stride and
dilation, ConvTranspose with any groups, Gemm with transA, transB, alpha, beta, with
or without C, MatMul with a constant weight of any rank on either side):

* into the producer (identity-core sources only)::

      X -> [linear] -> t -> (Reshape | Flatten | Transpose | Squeeze | Unsqueeze)* -> BN -> Y
      X -> [linear, W' = diag(a) W, b' = a*b + c] -> (the same movers) -------------> Y

  exact: ``a * (W x + b) + c = (diag(a) W) x + (a b + c)``. A MatMul without bias gets
  the shift as an ``Add`` (or folds it into the ``Add`` of a MatMul + Add pair; a 2-D
  ``X @ W`` becomes a Gemm whose C is the shift).
* into the consumers (every source)::

      X -> BN -> y -> (movers, Gather, Slice)* -> [linear]    (every reader of y, at any depth)
      X ---------> (the same) ------------------> [linear, W' = W diag(a), b' = b + W c]

  exact: ``W (a x + c) + b = (W diag(a)) x + (W c + b)``, *except* for ``W c`` under a
  Conv that pads (padding inserts zeros the original never shifted) or a ConvTranspose
  (border pixels receive fewer taps): there the scale folds and the shift stays as an
  ``Add(c / a)`` before the layer, exact in real arithmetic because
  ``W (a x + c) = (W diag(a)) (x + c / a)``, refused where ``a = 0`` and ``c != 0``. The
  report says which layer kept a shift. Sources with a non-trivial core keep it with a
  unit gain (LayerNorm with scale 1 and no bias, DynamicTanh with w = 1 and b = 0, ...;
  PowerNorm becomes its GroupScaling).

Movers map the channel axis (:mod:`normdeploy.core.layout`); the weight algebra of each
linear op type is :mod:`normdeploy.core.linear`.

Rules (each failure is the skip reason): parameters are constant and finite with
``var + eps > 0``; a producer's output is read by the affine only (through movers whose
outputs also have one reader) and is not a graph output; every reader of a folded
normalized tensor is linear in it (a residual Add of a post-norm block keeps the affine);
graph outputs keep their names and values; a LayerNormalization that stays one keeps a non-zero bias
when a MatMul reading it has no non-zero bias Add to take it (its kernel adds the bias for free; the
fold would add an Add node, :func:`_free_bias_source`). Folded weights are computed in float64 and
stored once in the weight's dtype (fp16 models included); every folded weight is a new
constant, so a weight shared with another node is never edited.

Storage. What the fold computes must survive being stored in the narrowest float type the
model will hold (:func:`storage_dtype`: the model's own, or float16 for trt-fp16, bfloat16
for trt-bf16). A kept shift ``c / a`` must stay within half that type's range
(:func:`_kept_shift`); a folded weight ``W diag(a)`` or ``diag(a) W`` must neither saturate
nor lose more than the type's unit roundoff relative to its largest entry where the unfolded
weight does not (:func:`_weight_loss`): a tiny scale (BatchNorm gamma 1e-6 over
sqrt(var) ~ 360) makes every folded entry subnormal or zero in float16, while the unfolded
graph keeps the weight and computes the normalization in fp32. Else the affine stays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from ..core.affine import (
    ONNX_DOMAINS,
    Affine,
    affine_of,
    constant_affine,
    is_affine_source,
    value_readers,
    value_uses,
)
from ..core.graph import (
    Namer,
    add_node,
    attr,
    const_value,
    constant,
    consumers,
    dtype_of,
    rank_of,
    remove_nodes,
    replace_value,
    set_input,
    value,
)
from ..core.layout import MOVERS, SELECTORS, compress, dims, map_backward, map_forward, same_dim, vector_along
from ..core.linear import LINEAR, linear_layer, matmul_weight_slot, padded, weight_value
from ..core.ops import ATTRIBUTES, DOMAIN
from ..core.passes import PassContext, PassResult


@dataclass
class Plan:
    """What a fold will do, computed before the graph is touched; ``apply`` edits it."""

    apply: Callable[[], None]
    what: str
    notes: list[str] = field(default_factory=list)


def _dtype_of(v: ir.Value, fallback) -> np.dtype:
    dt = dtype_of(v)
    return dt if dt is not None else np.dtype(fallback)


# ----------------------------------------------------------------------------- into the producer

def _producer_plan(graph: ir.Graph, lin: ir.Node, a_arr: np.ndarray, c_arr: np.ndarray, namer: Namer,
                   ctx: PassContext | None = None) -> Plan | str:
    """Fold ``a * lin(x) + c`` (arrays on lin's output, or on its bias Add's) into ``lin``'s weight and bias."""
    if lin.op_type == "MatMul":
        wslot = matmul_weight_slot(lin)
        if wslot is None:
            return f"MatMul {lin.name} has no constant operand"
        if weight_value(lin.inputs[wslot]).ndim < 2:
            return f"MatMul {lin.name} weight is a vector"
        layer = linear_layer(graph, lin, 1 - wslot)
    else:
        layer = linear_layer(graph, lin, 0)
    if isinstance(layer, str):
        return layer
    shared = _shared_copy(layer)
    if shared is not None:
        return shared
    a = vector_along(a_arr, layer.out_axis, layer.out_rank, layer.out_size)
    c = vector_along(c_arr, layer.out_axis, layer.out_rank, layer.out_size)
    if a is None or c is None:
        where = {"Gemm": "along the output columns", "MatMul": "along the output channels"}.get(lin.op_type,
                                                                                                "per output channel")
        return f"the affine is not {where} of {lin.op_type} {lin.name}"
    layer.scale_outputs(a)
    loss = _weight_loss(layer, a, storage_dtype(ctx, layer.w.dtype))
    if loss is not None:
        return loss
    bias_add = getattr(layer, "bias_add", None)
    if lin.op_type == "MatMul":
        layer.add_to_output(layer.out_vector(c))
    else:
        layer.add_to_output(c)
    if bias_add is not None:
        what = f"into MatMul {lin.name} + Add {bias_add[0].name}"
    elif lin.op_type == "MatMul":
        what = f"into MatMul {lin.name}" + ("" if layer.shift is None else " (now a Gemm, the shift its C)"
                                             if layer.becomes_gemm() else " (the shift as an Add)")
    else:
        what = f"into {lin.op_type} {lin.name}"
    return Plan(lambda: layer.apply(namer), what)


def _remove_source(graph: ir.Graph, aff: Affine) -> None:
    """Drop a pure source whose readers now read x: a constant affine's intermediate values that a ``Shape`` or
    a ``CastLike`` still reads for their shape or type read x instead (the same shape and type)."""
    inside = set(aff.all_nodes)
    for n in aff.all_nodes:
        if n is aff.node:
            continue
        for user, idx in list(n.outputs[0].uses()):
            if user not in inside:
                user.replace_input_with(idx, aff.x)
    remove_nodes(graph, aff.all_nodes)


def _concat_inputs(node: ir.Node, arrs: list[np.ndarray]) -> list[ir.Value] | str:
    """A Concat's inputs when the affine arrays are constant along its axis (each part gets the same arrays)."""
    axis = int(attr(node, "axis", 0))
    rank = rank_of(node.outputs[0])
    if rank is None:
        return f"rank of Concat {node.name} output is unknown"
    axis = axis % rank - rank  # negative: the arrays are right-aligned
    for a in arrs:
        if a.ndim >= -axis and a.shape[a.ndim + axis] != 1:
            return f"the affine varies along the concatenated axis {axis + rank} of Concat {node.name}"
    if any(i is None for i in node.inputs) or len({id(i) for i in node.inputs}) != len(node.inputs):
        return f"Concat {node.name} reads one tensor twice"
    return list(node.inputs)


def _producer_plans(graph: ir.Graph, t: ir.Value, arrs: list[np.ndarray], namer: Namer, depth: int = 0,
                    ctx: PassContext | None = None) -> list[tuple[Plan, list[ir.Node]]] | str:
    """Plans folding the arrays on ``t`` into the linear layer(s) that write it, through movers and through a
    Concat along an axis the affine does not vary on (per-step convs stacked over time): (plan, movers)."""
    chain: list[ir.Node] = []
    while True:
        prod = t.producer()
        if prod is None:
            return "its input is not written by a node"
        if t.is_graph_output():
            return f"{prod.name} output {t.name} is also a graph output"
        if value_uses(t) != 1:
            return (f"{prod.op_type} {prod.name} output has {value_uses(t)} readers "
                    "(the un-normalized value is still needed)")
        if prod.op_type in MOVERS and prod.domain in ONNX_DOMAINS:
            mapped = map_backward(prod, arrs)
            if isinstance(mapped, str):
                return f"through {prod.op_type} {prod.name}: {mapped}"
            chain.append(prod)
            arrs, t = mapped, prod.inputs[0]
            continue
        break
    if prod.op_type == "Concat" and prod.domain in ONNX_DOMAINS and depth < 4:
        parts = _concat_inputs(prod, arrs)
        if isinstance(parts, str):
            return parts
        plans = []
        for part in parts:
            sub = _producer_plans(graph, part, arrs, namer, depth + 1, ctx)
            if isinstance(sub, str):
                return f"through Concat {prod.name}: {sub}"
            plans += [(plan, chain + [prod] + movers) for plan, movers in sub]
        return plans
    if prod.op_type == "Add" and prod.domain in ONNX_DOMAINS and len(prod.inputs) == 2:
        const_slot = next((i for i in (1, 0) if const_value(prod.inputs[i]) is not None), None)
        if const_slot is not None:  # a MatMul + Add pair: the Add is the MatMul's bias
            inner = prod.inputs[1 - const_slot]
            mm = inner.producer() if inner is not None else None
            if (mm is not None and mm.op_type == "MatMul" and value_uses(inner) == 1
                    and not inner.is_graph_output() and matmul_weight_slot(mm) is not None):
                prod = mm
    if prod.op_type not in LINEAR or prod.domain not in ONNX_DOMAINS:
        return f"producer {prod.name} ({prod.op_type}) is not linear"
    plan = _producer_plan(graph, prod, arrs[0], arrs[1], namer, ctx)
    return plan if isinstance(plan, str) else [(plan, chain)]


def fold_affine_into_producer(graph: ir.Graph, aff: Affine, namer: Namer, ctx: PassContext | None = None
                              ) -> Plan | str:
    """Plan folding a pure affine into the linear layer(s) that write its input (through movers and Concats)."""
    plans = _producer_plans(graph, aff.x, [aff.scale, aff.shift], namer, ctx=ctx)
    if isinstance(plans, str):
        return plans

    def apply():
        for plan, _ in plans:
            plan.apply()
        replace_value(aff.y, aff.x)  # y's readers (and graph-output slot) take x
        _remove_source(graph, aff)
    whats = []
    for plan, movers in plans:
        via = "".join(f" through {m.op_type} {m.name}" for m in reversed(movers))
        whats.append(f"{plan.what}{via}")
    return Plan(apply, f"{aff.describe()} folded {', '.join(whats)}", [n for p, _ in plans for n in p.notes])


# ----------------------------------------------------------------------------- into the consumers

@dataclass
class _Leaf:
    node: ir.Node
    slot: int
    scale: np.ndarray
    shift: np.ndarray


def _constant_operand(t: ir.Value, n: ir.Node, slots: list[int]) -> np.ndarray | None:
    """The constant other operand of an elementwise ``n(t, k)`` that keeps ``t``'s shape, else None."""
    if n.op_type not in ("Add", "Sub", "Mul", "Div") or len(n.inputs) != 2 or len(slots) != 1:
        return None
    if n.op_type in ("Sub", "Div") and slots != [0]:
        return None
    k = const_value(n.inputs[1 - slots[0]])
    if k is None or not np.issubdtype(k.dtype, np.floating) or (n.op_type == "Div" and np.any(k == 0)):
        return None
    src, dst = dims(t), dims(n.outputs[0])
    if k.ndim > 0 and (src is None or dst is None or len(src) != len(dst)
                       or not all(same_dim(p, q) for p, q in zip(src, dst))):
        return None
    return np.asarray(k, np.float64)


def _collect_leaves(graph: ir.Graph, t: ir.Value, arrs: list[np.ndarray], leaves: list[_Leaf],
                    absorbed: list[ir.Node]) -> str | None:
    """Walk every reader of ``t`` down to linear layers; constant Add/Sub/Mul/Div on the way join the affine."""
    if t.is_graph_output():
        return f"{t.name} is a graph output"
    for n in value_readers(t):
        slots = [i for i, inp in enumerate(n.inputs) if inp is t]
        if n.domain not in ONNX_DOMAINS:
            return f"{n.op_type} {n.name} reads the normalized tensor and is not linear"
        if n.op_type in LINEAR:
            if len(slots) != 1:
                return f"{n.op_type} {n.name} reads the normalized tensor twice"
            leaves.append(_Leaf(n, slots[0], arrs[0], arrs[1]))
            continue
        if n.op_type in MOVERS + SELECTORS and slots == [0]:
            mapped = map_forward(n, arrs)
            if isinstance(mapped, str):
                return f"through {n.op_type} {n.name}: {mapped}"
            why = _collect_leaves(graph, n.outputs[0], mapped, leaves, absorbed)
            if why:
                return why
            continue
        k = _constant_operand(t, n, slots)
        if k is not None:  # y' = y + k, y - k, y * k or y / k: still an affine of the core
            s, c = arrs
            s, c = {"Add": (s, c + k), "Sub": (s, c - k), "Mul": (s * k, c * k), "Div": (s / k, c / k)}[n.op_type]
            absorbed.append(n)
            why = _collect_leaves(graph, n.outputs[0], [compress(np.asarray(s)), compress(np.asarray(c))],
                                  leaves, absorbed)
            if why:
                return why
            continue
        if n.op_type in ("Add", "Sum"):
            return f"{n.op_type} {n.name} also reads the normalized tensor (a residual stream): the affine stays"
        return f"{n.op_type} {n.name} reads the normalized tensor and is not linear"
    return None


def _largest(dtype: np.dtype) -> float:
    """The largest finite value of a float type, bfloat16 included (``np.finfo`` does not know it)."""
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).max)


def storage_dtype(ctx: PassContext | None, dtype) -> np.dtype:
    """The narrowest float type the folded model's tensors will be stored in: the model's own, or the
    target's when the target converts it (trt-fp16: float16, trt-bf16: bfloat16)."""
    dtype = np.dtype(dtype)
    target = ctx.target if ctx is not None else ""
    if target == "trt-fp16" and _largest(dtype) > _largest(np.dtype(np.float16)):
        return np.dtype(np.float16)
    if target == "trt-bf16" and dtype.itemsize > 2:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return dtype


def _kept_shift(leaf: _Leaf, a_full: np.ndarray, storage: np.dtype) -> np.ndarray | str:
    """The Add constant ``c / a`` that stays before the layer when ``W c`` cannot fold.

    ``x + c / a`` loses exactly the precision ``a x + c`` loses (the cancellation is scale
    invariant), but not the range: with a small ``a``, ``c / a`` can exceed what ``storage`` (the
    model's float type, or the target's: trt-fp16 converts to float16) holds although ``c`` and
    ``a x`` fit. The kept shift must therefore stay within half of ``storage``'s largest finite
    value, so that ``x + c / a`` is finite for every ``|x|`` up to the other half; else the fold
    is refused.
    """
    c = leaf.shift
    a_b, c_b = np.broadcast_arrays(a_full, c)
    if np.any((a_b == 0) & (c_b != 0)):
        return (f"scale is zero where the shift is not, before {leaf.node.op_type} {leaf.node.name}: "
                "the shift cannot stay")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        kept = compress(np.where(c_b == 0, 0.0, c_b / np.where(a_b == 0, 1.0, a_b)))
    limit = _largest(storage) / 2
    peak = float(np.max(np.abs(kept))) if kept.size else 0.0
    if not np.isfinite(peak) or peak > limit:
        return (f"{_kept_note(leaf.node).split(':')[0]}: the shift would stay as an Add of c / a, which reaches "
                f"{peak:.3g} (scale down to {float(np.min(np.abs(a_b[c_b != 0]))):.3g}), beyond half the range of "
                f"{storage.name} ({limit:.4g}) the model is stored in: the affine stays")
    return kept


def _weight_loss(layer, a: np.ndarray, storage: np.dtype) -> str | None:
    """Why ``layer``'s folded weight (pending in float64, ``layer.w64``) cannot be stored in ``storage`` as
    well as its unfolded weight ``layer.w`` is, or None.

    Stored once in ``storage`` (the model's float type, or the target's: trt-fp16 converts to
    float16), a tensor whose largest entry is a normal number keeps ``storage``'s unit roundoff
    ``u`` relative to that entry (an entry below the smallest normal errs by at most half the
    smallest subnormal, ``u`` times the smallest normal). Scaling the weight by ``a`` can push
    it out of that range where the unfolded weight is inside: past the largest finite value
    (it saturates), or wholly below the smallest normal, where every entry is subnormal or
    flushes to zero and the range-relative error exceeds ``u`` (BatchNorm gamma 1e-6 over
    sqrt(var) ~ 360: ``W a ~ 1e-9``, all zero in float16). The unfolded graph keeps the weight
    as it is and computes the normalization in fp32 (:mod:`normdeploy.lower.precision`), so the
    fold is refused. Compared range-relative, as the accuracy checks compare outputs: entries
    that are negligible beside the largest one may round to zero in either graph.
    """
    import ml_dtypes

    if not layer.w_changed or not layer.w64.size:
        return None
    try:
        info = ml_dtypes.finfo(storage)
    except ValueError:  # not a float type: nothing rounds
        return None
    big, normal, u = float(info.max), float(info.smallest_normal), float(info.eps) / 2

    def peak_of(w: np.ndarray) -> float:  # max |w| without a temporary the size of a weight
        return max(float(w.max()), -float(w.min()))
    peak, old_peak = peak_of(layer.w64), peak_of(layer.w)
    where = f"{layer.node.op_type} {layer.node.name}"
    nz = np.abs(a[a != 0]) if np.any(a != 0) else np.zeros(1)
    scale = f"scale {float(nz.min()):.3g} .. {float(nz.max()):.3g}"
    if peak > big >= old_peak:
        over = int((np.abs(layer.w64) > big).sum())
        return (f"{where}: its folded weight ({scale} times a weight of peak {old_peak:.3g}) reaches {peak:.3g}, "
                f"beyond the largest {storage.name} ({big:.6g}) the model is stored in: {over} of {layer.w64.size} entries "
                f"would saturate: the affine stays")
    if peak == 0 or peak >= normal:
        return None  # within u of its largest entry (or exactly zero): stored as well as the unfolded weight

    def loss(w: np.ndarray) -> float:  # max |stored - w| / max |w|
        w = np.asarray(w, np.float64)
        top = peak_of(w)
        with np.errstate(over="ignore"):  # an unfolded weight beyond the range: inf, its loss is not the fold's
            return float(np.abs(w.astype(storage).astype(np.float64) - w).max()) / top if top else 0.0

    err = loss(layer.w64)
    if err <= u or err <= loss(layer.w):
        return None
    new = np.abs(layer.w64)
    flushed = int(((new > 0) & (new < float(info.smallest_subnormal) / 2)).sum())
    lost = (f"all {new.size} entries would flush to zero" if flushed == new.size else
            f"{flushed} of {new.size} entries would flush to zero and the rest be subnormal" if flushed else
            f"all {new.size} entries would be subnormal")
    return (f"{where}: its folded weight ({scale} times a weight of peak {old_peak:.3g}) peaks at {peak:.3g}, below "
            f"the smallest normal {storage.name} ({normal:.4g}) the model is stored in: {lost}, a range-relative "
            f"rounding error of {err:.2g} against {storage.name}'s unit roundoff {u:.2g}: the affine stays")


#: the largest weight a fold may copy when another node reads it too (a tied LM head's W, which the embedding's
#: Gather reads): a larger copy costs more memory and model size than the one elementwise Mul it saves
SHARED_COPY_MAX_BYTES = 1 << 20


def _shared_copy(layer) -> str | None:
    """Why folding into ``layer``'s weight would copy a large weight another node reads too, or None.

    A fold never edits a shared weight: it writes a new one (:mod:`normdeploy.core.linear`). Where
    the weight is ``Transpose(W)`` of a W that the embedding's Gather also reads (a tied LM head:
    GPT-2's 154 MB, Qwen2-0.5B's 545 MB), the fold would untie the head, growing the model and
    the pipeline's memory by W's size, to save one elementwise Mul on ``[..., d]``; past
    :data:`SHARED_COPY_MAX_BYTES` the affine stays.
    """
    v = layer.node.inputs[layer.slot]
    p = v.producer() if v is not None else None
    src = p.inputs[0] if p is not None and p.op_type == "Transpose" and p.inputs else v
    if src is None or layer.w.nbytes <= SHARED_COPY_MAX_BYTES:
        return None
    others = [n for n in consumers(src) if n is not layer.node and n is not p]
    if p is not None and src is not v:
        others += [n for n in consumers(v) if n is not layer.node]
    if not others:
        return None
    o = others[0]
    return (f"{layer.node.op_type} {layer.node.name}: its weight {src.name} ({layer.w.nbytes / 2**20:.0f} MiB) is also "
            f"read by {o.op_type} {o.name} (a tied weight): folding would add a copy of it to save one elementwise "
            "Mul: the affine stays")


def _consumer_plan(graph: ir.Graph, leaf: _Leaf, namer: Namer, dtype, storage: np.dtype,
                   free_bias: ir.Node | None = None) -> tuple[Plan, np.ndarray | None] | str:
    """Fold the affine at ``leaf``'s input slot into its weights; returns the plan and any kept Add constant.

    ``free_bias``: a source that stays a fused kernel adding its own bias at no cost (a LayerNormalization);
    its shift is not moved into a MatMul that has no non-zero bias Add (see :func:`_free_bias_source`).
    """
    n, s, c = leaf.node, leaf.scale, leaf.shift
    layer = linear_layer(graph, n, leaf.slot, dtype)
    if isinstance(layer, str):
        return layer
    shared = _shared_copy(layer)
    if shared is not None:
        return shared
    if free_bias is not None and n.op_type == "MatMul" and np.any(c != 0) and not layer.has_bias():
        return (f"{free_bias.op_type} {free_bias.name} stays a fused kernel that adds its bias at no cost, and "
                f"MatMul {n.name} has no bias Add to take it (folding would add an Add node, and block ONNX "
                "Runtime's MatMul + activation fusions): the affine stays")
    a = vector_along(s, layer.in_axis, layer.in_rank, layer.in_size)
    if a is None:
        where = "per input channel" if n.op_type in ("Conv", "ConvTranspose") else "along the contraction axis"
        return f"the scale is not {where} of {n.op_type} {n.name}"
    layer.scale_inputs(a)
    loss = _weight_loss(layer, a, storage)
    if loss is not None:
        return loss
    kept = None
    if np.any(c != 0):
        c_vec = vector_along(c, layer.in_axis, layer.in_rank, layer.in_size)
        shift = layer.input_shift(c_vec) if c_vec is not None else None
        if shift is None or isinstance(shift, str):  # W c is not one value per output: the shift stays
            kept = _kept_shift(leaf, s, storage)
            if isinstance(kept, str):
                return kept
        else:
            layer.add_to_output(shift)
    return Plan(lambda: layer.apply(namer), f"{n.op_type} {n.name}", [] if kept is None else [_kept_note(n)]), kept


def _kept_note(n: ir.Node) -> str:
    if n.op_type in ("Conv", "ConvTranspose"):
        why = "pads" if n.op_type == "Conv" and padded(n) else \
            "is a ConvTranspose" if n.op_type == "ConvTranspose" else "sees a shift that varies per position"
        return f"{n.op_type} {n.name} {why}: its scale folded, the shift stays as an Add before it"
    if n.op_type == "Gemm":
        return f"Gemm {n.name} sees a shift that varies per row: it stays as an Add"
    return f"MatMul {n.name} sees a shift that varies off the contraction axis: it stays as an Add"


def _neutralize(graph: ir.Graph, node: ir.Node, namer: Namer) -> None:
    """Give a non-pure source unit gain and zero bias (its core stays)."""
    base = node.name or node.op_type.lower()

    def ones_like(i):
        v = const_value(node.inputs[i])
        return constant(namer, base, "unit_gain", np.ones_like(v))

    def zeros_like(i):
        v = const_value(node.inputs[i])
        return constant(namer, base, "zero_bias", np.zeros_like(v))

    op = node.op_type
    if op == "LayerNormalization":
        node.replace_input_with(1, ones_like(1))
        node.resize_inputs(2)
    elif op in ("RMSNorm", "CRMSNorm", "ScaleNorm"):
        node.replace_input_with(1, ones_like(1))
    elif op == "GroupNormalization":
        node.replace_input_with(1, ones_like(1))
        node.replace_input_with(2, zeros_like(2))
    elif op == "DynamicTanh":
        gain, bias = ones_like(2), zeros_like(3)
        node.replace_input_with(2, gain)
        node.replace_input_with(3, bias)
    elif op == "PowerNorm":  # its core alone: GroupScaling(x) computes what y's readers read
        attrs = {**ATTRIBUTES["PowerNorm"], **{k: attr(node, k) for k in node.attributes}}
        x, y = node.inputs[0], node.outputs[0]
        out = value(namer, base, "group_scaled", dtype=y.dtype, shape=y.shape)
        add_node(namer, "GroupScaling", [x], [out], base=base, suffix="group_scaling", domain=DOMAIN,
                 attrs={"groups": int(attrs["groups"]), "epsilon": float(attrs["epsilon"])})
        replace_value(y, out)
        remove_nodes(graph, [node])


def _free_bias_source(aff: Affine, absorbed: list[ir.Node]) -> ir.Node | None:
    """``aff``'s node where it is a LayerNormalization that stays one and has a non-zero bias, else None.

    ONNX LayerNormalization (and what it lowers to: ONNX Runtime's kernel, SkipLayerNormalization,
    TensorRT's normalization layer, OpenVINO's MVN + affine) applies its scale and bias inside the
    kernel, so folding them into the next linear layer saves nothing. Its bias ``c`` becomes that
    layer's bias ``b + W c``; where the layer is a MatMul without a bias Add (or with a zero one, as
    every Linear of a Hugging Face model initialised from its config, which the clean-up removes),
    the fold adds an Add node that was not there, and ``MatMul + Add + Gelu`` runs slower than the
    ``MatMul + Gelu`` the model had (measured on Hugging Face ConvNeXt-T,
    benchmarks/peers_models.py). A Conv's or Gemm's bias is added inside its kernel: those fold.
    The rewrites that remove the LayerNorm (Pre-RMSNorm, LN-free) run before this pass and move
    the bias themselves. With ``absorbed``
    constant affines after the norm, folding still saves their nodes: the rule does not apply.
    """
    node = aff.node
    if aff.pure or absorbed or node.op_type != "LayerNormalization" or len(node.inputs) < 3:
        return None
    b = const_value(node.inputs[2])
    return node if b is not None and np.any(b != 0) else None


def fold_affine_into_consumers(graph: ir.Graph, aff: Affine, namer: Namer, ctx: PassContext | None = None
                               ) -> Plan | str:
    """Plan folding ``aff`` into every linear layer that reads its output (through movers)."""
    node = aff.node
    leaves: list[_Leaf] = []
    absorbed: list[ir.Node] = []
    why = _collect_leaves(graph, aff.y, [aff.scale, aff.shift], leaves, absorbed)
    if not aff.pure and not np.any(aff.scale != 1) and not np.any(aff.shift != 0) and not absorbed:
        return "its gain is 1 and its bias 0: nothing to fold"
    if why:
        return why
    if not leaves:
        return "its output has no reader"
    param = next((const_value(t) for t in node.inputs[1:] if const_value(t) is not None), None) \
        if not aff.nodes else None
    dtype = _dtype_of(aff.y, param.dtype if param is not None else np.float32)
    free_bias = _free_bias_source(aff, absorbed)
    plans = []
    for leaf in leaves:
        p = _consumer_plan(graph, leaf, namer, dtype, storage_dtype(ctx, dtype), free_bias)
        if isinstance(p, str):
            return p
        plans.append((leaf, *p))

    def apply():
        for _, plan, _ in plans:
            plan.apply()
        for n in absorbed:  # their constants are in the weights now: bypass them
            src = next(i for i in n.inputs if const_value(i) is None)
            replace_value(n.outputs[0], src)
            remove_nodes(graph, [n])
        if aff.pure:  # every reader now reads x
            replace_value(aff.y, aff.x)
            _remove_source(graph, aff)
        else:
            _neutralize(graph, node, namer)
        base = node.name or node.op_type.lower()
        shifted: dict[tuple, ir.Value] = {}
        for leaf, _, kept in plans:
            if kept is None:
                continue
            src = leaf.node.inputs[leaf.slot]
            key = (id(src), kept.tobytes(), kept.shape)
            if key not in shifted:
                out = value(namer, src.name or base, "shifted", dtype=src.dtype, shape=src.shape)
                c = constant(namer, base, "kept_shift", kept.astype(dtype))
                add_node(namer, "Add", [src, c], [out], base=base, suffix="kept_shift_add")
                shifted[key] = out
            set_input(leaf.node, leaf.slot, shifted[key])
    targets = ", ".join(plan.what for _, plan, _ in plans)
    if absorbed:
        targets += " (with " + ", ".join(f"{n.op_type} {n.name}" for n in absorbed) + ")"
    what = (f"{aff.describe()} folded into {targets}" if aff.pure else
            f"{node.op_type} {node.name} gain/bias folded into {targets}"
            + (" (PowerNorm became GroupScaling)" if node.op_type == "PowerNorm" else ""))
    return Plan(apply, what, [note for _, plan, _ in plans for note in plan.notes])


# ----------------------------------------------------------------------------- the pass

def fold_affine_into_linear(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Fold BatchNorm, UnifiedNorm, PowerNorm's affine and LN/RMS/DyT/ScaleNorm gains into linear neighbours."""
    namer = Namer(graph)
    for node in list(graph):
        if node.graph is not graph or not node.outputs:
            continue
        if is_affine_source(node):
            aff = affine_of(node)
        else:
            aff = constant_affine(node)
            if aff is None:
                continue
        result.matched += 1
        if isinstance(aff, str):
            result.skip(node.name, aff)
            continue
        name = aff.nodes[0].name if aff.nodes else node.name
        reasons = []
        plan: Plan | str = "no direction applies"
        if aff.pure:
            plan = fold_affine_into_producer(graph, aff, namer, ctx)
            if isinstance(plan, str):
                reasons.append(f"into the producer: {plan}")
        if isinstance(plan, str):
            plan = fold_affine_into_consumers(graph, aff, namer, ctx)
            if isinstance(plan, str):
                reasons.append(f"into the consumers: {plan}" if aff.pure else plan)
        if isinstance(plan, str):
            result.skip(name, ("" if not aff.nodes else f"{aff.describe()}: ") + "; ".join(reasons))
            continue
        plan.apply()
        result.rewrote(plan.what, name, f"constant affine: {aff.spelling}" if aff.nodes else None)
        result.notes.extend(plan.notes)
