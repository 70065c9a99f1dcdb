"""Fold every per-channel affine into a neighbouring linear layer (DESIGN.md 3.1).

Sources: every normalization whose output is ``y = a * core(x) + c`` with constant ``a``,
``c`` varying along one channel axis (:func:`normdeploy.core.affine.affine_of`: BatchNorm,
UnifiedNorm, PowerNorm's affine, the gain and bias of LayerNorm, RMSNorm, CRMSNorm,
ScaleNorm, DynamicTanh).

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
graph outputs keep their names and values. Folded weights are computed in float64 and
stored once in the weight's dtype (fp16 models included); every folded weight is a new
constant, so a weight shared with another node is never edited.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..core.affine_gs import ONNX_DOMAINS, Affine, affine_of, is_affine_source
from ..core.graph_gs import Namer, const_value, constant, is_graph_output, rewire_output
from ..core.layout_gs import MOVERS, SELECTORS, compress, dims, map_backward, map_forward, same_dim, vector_along
from ..core.linear_gs import LINEAR, linear_layer, matmul_weight_slot, padded
from ..core.ops import ATTRIBUTES, DOMAIN
from ..core.passes import PassContext, PassResult


@dataclass
class Plan:
    """What a fold will do, computed before the graph is touched; ``apply`` edits it."""

    apply: Callable[[], None]
    what: str
    notes: list[str] = field(default_factory=list)


def _dtype_of(t: gs.Tensor, fallback) -> np.dtype:
    dt = getattr(t, "dtype", None)
    try:
        return np.dtype(dt) if dt is not None else np.dtype(fallback)
    except TypeError:
        return np.dtype(fallback)


# ----------------------------------------------------------------------------- into the producer

def _producer_plan(graph: gs.Graph, lin: gs.Node, a_arr: np.ndarray, c_arr: np.ndarray, namer: Namer) -> Plan | str:
    """Fold ``a * lin(x) + c`` (arrays on lin's output, or on its bias Add's) into ``lin``'s weight and bias."""
    if lin.op == "MatMul":
        wslot = matmul_weight_slot(lin)
        if wslot is None:
            return f"MatMul {lin.name} has no constant operand"
        if const_value(lin.inputs[wslot]).ndim < 2:
            return f"MatMul {lin.name} weight is a vector"
        layer = linear_layer(graph, lin, 1 - wslot)
    else:
        layer = linear_layer(graph, lin, 0)
    if isinstance(layer, str):
        return layer
    a = vector_along(a_arr, layer.out_axis, layer.out_rank, layer.out_size)
    c = vector_along(c_arr, layer.out_axis, layer.out_rank, layer.out_size)
    if a is None or c is None:
        where = {"Gemm": "along the output columns", "MatMul": "along the output channels"}.get(lin.op, "per output channel")
        return f"the affine is not {where} of {lin.op} {lin.name}"
    layer.scale_outputs(a)
    bias_add = getattr(layer, "bias_add", None)
    if lin.op == "MatMul":
        layer.add_to_output(layer.out_vector(c))
    else:
        layer.add_to_output(c)
    if bias_add is not None:
        what = f"into MatMul {lin.name} + Add {bias_add[0].name}"
    elif lin.op == "MatMul":
        what = f"into MatMul {lin.name}" + ("" if layer.shift is None else " (now a Gemm, the shift its C)"
                                             if layer.becomes_gemm() else " (the shift as an Add)")
    else:
        what = f"into {lin.op} {lin.name}"
    return Plan(lambda: layer.apply(namer), what)


def fold_affine_into_producer(graph: gs.Graph, aff: Affine, namer: Namer) -> Plan | str:
    """Plan folding a pure affine into the linear layer that writes its input (through movers)."""
    t, chain = aff.x, []
    while True:
        if not t.inputs:
            return "its input is not written by a node"
        prod = t.inputs[0]
        if is_graph_output(graph, t):
            return f"{prod.name} output {t.name} is also a graph output"
        if len(t.outputs) != 1:
            return (f"{prod.op} {prod.name} output has {len(t.outputs)} readers "
                    "(the un-normalized value is still needed)")
        if prod.op in MOVERS and prod.domain in ONNX_DOMAINS:
            chain.append(prod)
            t = prod.inputs[0]
            continue
        break
    arrs = [aff.scale, aff.shift]
    for mover in chain:
        arrs = map_backward(mover, arrs)
        if isinstance(arrs, str):
            return f"through {mover.op} {mover.name}: {arrs}"
    if prod.op == "Add" and prod.domain in ONNX_DOMAINS and len(prod.inputs) == 2:
        const_slot = next((i for i in (1, 0) if const_value(prod.inputs[i]) is not None), None)
        if const_slot is not None:  # a MatMul + Add pair: the Add is the MatMul's bias
            inner = prod.inputs[1 - const_slot]
            mm = inner.inputs[0] if inner.inputs else None
            if (mm is not None and mm.op == "MatMul" and len(inner.outputs) == 1
                    and not is_graph_output(graph, inner) and matmul_weight_slot(mm) is not None):
                prod = mm
    if prod.op not in LINEAR or prod.domain not in ONNX_DOMAINS:
        return f"producer {prod.name} ({prod.op}) is not linear"
    plan = _producer_plan(graph, prod, arrs[0], arrs[1], namer)
    if isinstance(plan, str):
        return plan
    node = aff.node
    inner_apply = plan.apply

    def apply():
        inner_apply()
        rewire_output(node, aff.x.inputs[0])
    via = "".join(f" through {m.op} {m.name}" for m in reversed(chain))
    return Plan(apply, f"{node.op} {node.name} folded {plan.what}{via}", plan.notes)


# ----------------------------------------------------------------------------- into the consumers

@dataclass
class _Leaf:
    node: gs.Node
    slot: int
    scale: np.ndarray
    shift: np.ndarray


def _constant_operand(t: gs.Tensor, n: gs.Node, slots: list[int]) -> np.ndarray | None:
    """The constant other operand of an elementwise ``n(t, k)`` that keeps ``t``'s shape, else None."""
    if n.op not in ("Add", "Sub", "Mul", "Div") or len(n.inputs) != 2 or len(slots) != 1:
        return None
    if n.op in ("Sub", "Div") and slots != [0]:
        return None
    k = const_value(n.inputs[1 - slots[0]])
    if k is None or not np.issubdtype(k.dtype, np.floating) or (n.op == "Div" and np.any(k == 0)):
        return None
    src, dst = dims(t), dims(n.outputs[0])
    if k.ndim > 0 and (src is None or dst is None or len(src) != len(dst)
                       or not all(same_dim(p, q) for p, q in zip(src, dst))):
        return None
    return np.asarray(k, np.float64)


def _collect_leaves(graph: gs.Graph, t: gs.Tensor, arrs: list[np.ndarray], leaves: list[_Leaf],
                    absorbed: list[gs.Node]) -> str | None:
    """Walk every reader of ``t`` down to linear layers; constant Add/Sub/Mul/Div on the way join the affine."""
    if is_graph_output(graph, t):
        return f"{t.name} is a graph output"
    for n in t.outputs:
        slots = [i for i, inp in enumerate(n.inputs) if inp is t]
        if n.domain not in ONNX_DOMAINS:
            return f"{n.op} {n.name} reads the normalized tensor and is not linear"
        if n.op in LINEAR:
            if len(slots) != 1:
                return f"{n.op} {n.name} reads the normalized tensor twice"
            leaves.append(_Leaf(n, slots[0], arrs[0], arrs[1]))
            continue
        if n.op in MOVERS + SELECTORS and slots == [0]:
            mapped = map_forward(n, arrs)
            if isinstance(mapped, str):
                return f"through {n.op} {n.name}: {mapped}"
            why = _collect_leaves(graph, n.outputs[0], mapped, leaves, absorbed)
            if why:
                return why
            continue
        k = _constant_operand(t, n, slots)
        if k is not None:  # y' = y + k, y - k, y * k or y / k: still an affine of the core
            s, c = arrs
            s, c = {"Add": (s, c + k), "Sub": (s, c - k), "Mul": (s * k, c * k), "Div": (s / k, c / k)}[n.op]
            absorbed.append(n)
            why = _collect_leaves(graph, n.outputs[0], [compress(np.asarray(s)), compress(np.asarray(c))],
                                  leaves, absorbed)
            if why:
                return why
            continue
        if n.op in ("Add", "Sum"):
            return f"{n.op} {n.name} also reads the normalized tensor (a residual stream): the affine stays"
        return f"{n.op} {n.name} reads the normalized tensor and is not linear"
    return None


def _kept_shift(leaf: _Leaf, a_full: np.ndarray) -> np.ndarray | str:
    """The Add constant ``c / a`` that stays before the layer when ``W c`` cannot fold."""
    c = leaf.shift
    a_b, c_b = np.broadcast_arrays(a_full, c)
    if np.any((a_b == 0) & (c_b != 0)):
        return f"scale is zero where the shift is not, before {leaf.node.op} {leaf.node.name}: the shift cannot stay"
    with np.errstate(divide="ignore", invalid="ignore"):
        return compress(np.where(c_b == 0, 0.0, c_b / np.where(a_b == 0, 1.0, a_b)))


def _consumer_plan(graph: gs.Graph, leaf: _Leaf, namer: Namer, dtype) -> tuple[Plan, np.ndarray | None] | str:
    """Fold the affine at ``leaf``'s input slot into its weights; returns the plan and any kept Add constant."""
    n, s, c = leaf.node, leaf.scale, leaf.shift
    layer = linear_layer(graph, n, leaf.slot, dtype)
    if isinstance(layer, str):
        return layer
    a = vector_along(s, layer.in_axis, layer.in_rank, layer.in_size)
    if a is None:
        where = "per input channel" if n.op in ("Conv", "ConvTranspose") else "along the contraction axis"
        return f"the scale is not {where} of {n.op} {n.name}"
    layer.scale_inputs(a)
    kept = None
    if np.any(c != 0):
        c_vec = vector_along(c, layer.in_axis, layer.in_rank, layer.in_size)
        shift = layer.input_shift(c_vec) if c_vec is not None else None
        if shift is None or isinstance(shift, str):  # W c is not one value per output: the shift stays
            kept = _kept_shift(leaf, s)
            if isinstance(kept, str):
                return kept
        else:
            layer.add_to_output(shift)
    return Plan(lambda: layer.apply(namer), f"{n.op} {n.name}", [] if kept is None else [_kept_note(n)]), kept


def _kept_note(n: gs.Node) -> str:
    if n.op in ("Conv", "ConvTranspose"):
        why = "pads" if n.op == "Conv" and padded(n) else \
            "is a ConvTranspose" if n.op == "ConvTranspose" else "sees a shift that varies per position"
        return f"{n.op} {n.name} {why}: its scale folded, the shift stays as an Add before it"
    if n.op == "Gemm":
        return f"Gemm {n.name} sees a shift that varies per row: it stays as an Add"
    return f"MatMul {n.name} sees a shift that varies off the contraction axis: it stays as an Add"


def _neutralize(graph: gs.Graph, node: gs.Node, namer: Namer) -> None:
    """Give a non-pure source unit gain and zero bias (its core stays)."""
    base = node.name or node.op.lower()

    def ones_like(i):
        v = const_value(node.inputs[i])
        return constant(namer, base, "unit_gain", np.ones_like(v))

    def zeros_like(i):
        v = const_value(node.inputs[i])
        return constant(namer, base, "zero_bias", np.zeros_like(v))

    op = node.op
    if op == "LayerNormalization":
        node.inputs[1] = ones_like(1)
        while len(node.inputs) > 2:
            node.inputs.pop()
    elif op in ("RMSNorm", "CRMSNorm", "ScaleNorm"):
        node.inputs[1] = ones_like(1)
    elif op == "DynamicTanh":
        node.inputs[2], node.inputs[3] = ones_like(2), zeros_like(3)
    elif op == "PowerNorm":
        attrs = {**ATTRIBUTES["PowerNorm"], **node.attrs}
        x, y = node.inputs[0], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.append(gs.Node("GroupScaling", namer(base, "group_scaling"),
                                   {"groups": int(attrs["groups"]), "epsilon": float(attrs["epsilon"])},
                                   [x], [y], domain=DOMAIN))


def fold_affine_into_consumers(graph: gs.Graph, aff: Affine, namer: Namer) -> Plan | str:
    """Plan folding ``aff`` into every linear layer that reads its output (through movers)."""
    node = aff.node
    leaves: list[_Leaf] = []
    absorbed: list[gs.Node] = []
    why = _collect_leaves(graph, aff.y, [aff.scale, aff.shift], leaves, absorbed)
    if not aff.pure and not np.any(aff.scale != 1) and not np.any(aff.shift != 0) and not absorbed:
        return "its gain is 1 and its bias 0: nothing to fold"
    if why:
        return why
    if not leaves:
        return "its output has no reader"
    param = next((const_value(t) for t in node.inputs[1:] if const_value(t) is not None), None)
    dtype = _dtype_of(aff.y, param.dtype if param is not None else np.float32)
    plans = []
    for leaf in leaves:
        p = _consumer_plan(graph, leaf, namer, dtype)
        if isinstance(p, str):
            return p
        plans.append((leaf, *p))

    def apply():
        for _, plan, _ in plans:
            plan.apply()
        for n in absorbed:  # their constants are in the weights now: bypass them
            src, out = next(i for i in n.inputs if const_value(i) is None), n.outputs[0]
            for reader in list(out.outputs):
                for i, inp in enumerate(reader.inputs):
                    if inp is out:
                        reader.inputs[i] = src
            n.inputs.clear()
            n.outputs.clear()
        if aff.pure:  # every reader now reads x
            y, x = aff.y, aff.x
            for reader in list(y.outputs):
                for i, inp in enumerate(reader.inputs):
                    if inp is y:
                        reader.inputs[i] = x
            node.inputs.clear()
            node.outputs.clear()
        else:
            _neutralize(graph, node, namer)
        shifted: dict[str, gs.Variable] = {}
        for leaf, _, kept in plans:
            if kept is None:
                continue
            src = leaf.node.inputs[leaf.slot]
            key = f"{src.name}/{kept.tobytes().hex()}/{kept.shape}"
            if key not in shifted:
                out = gs.Variable(namer(src.name, "shifted"), dtype=src.dtype, shape=src.shape)
                c = constant(namer, node.name or node.op.lower(), "kept_shift", kept.astype(dtype))
                graph.nodes.append(gs.Node("Add", namer(node.name or node.op.lower(), "kept_shift_add"),
                                           inputs=[src, c], outputs=[out]))
                shifted[key] = out
            leaf.node.inputs[leaf.slot] = shifted[key]
    targets = ", ".join(plan.what for _, plan, _ in plans)
    if absorbed:
        targets += " (with " + ", ".join(f"{n.op} {n.name}" for n in absorbed) + ")"
    what = (f"{node.op} {node.name} folded into {targets}" if aff.pure else
            f"{node.op} {node.name} gain/bias folded into {targets}"
            + (" (PowerNorm became GroupScaling)" if node.op == "PowerNorm" else ""))
    return Plan(apply, what, [note for _, plan, _ in plans for note in plan.notes])


# ----------------------------------------------------------------------------- the pass

def fold_affine_into_linear(graph: gs.Graph, ctx: PassContext, result: PassResult) -> None:
    """Fold BatchNorm, UnifiedNorm, PowerNorm's affine and LN/RMS/DyT/ScaleNorm gains into linear neighbours."""
    namer = Namer(graph)
    for node in list(graph.nodes):
        if not is_affine_source(node) or not node.outputs:
            continue
        result.matched += 1
        aff = affine_of(node)
        if isinstance(aff, str):
            result.skip(node.name, aff)
            continue
        reasons = []
        plan: Plan | str = "no direction applies"
        if aff.pure:
            plan = fold_affine_into_producer(graph, aff, namer)
            if isinstance(plan, str):
                reasons.append(f"into the producer: {plan}")
        if isinstance(plan, str):
            plan = fold_affine_into_consumers(graph, aff, namer)
            if isinstance(plan, str):
                reasons.append(f"into the consumers: {plan}" if aff.pure else plan)
        if isinstance(plan, str):
            result.skip(node.name, "; ".join(reasons))
            continue
        plan.apply()
        result.rewrote(plan.what, node.name)
        result.notes.extend(plan.notes)
