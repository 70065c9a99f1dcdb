"""Fold Membrane-Potential BatchNorm into the LIF firing threshold (DESIGN.md sections 2 and 3.2).

What ``torch.onnx.export`` emits for :class:`normdeploy.nn.LIFNeuron`, per time step::

    u_t -> BatchNormalization -> Sub(theta) -> Greater(., 0) -> Cast -> o_t
      \\-> (the state update tau * u_t * (1 - o_t) reads the un-normalized u_t)

becomes, with ``s_c = sqrt(var_c + eps)`` and ``theta'_c = mean_c + (theta - beta_c) s_c / gamma_c``::

    u_t -> Greater(u_t, theta')               every gamma_c > 0
    u_t -> Less(u_t, theta')                  every gamma_c < 0
    u_t -> Mul(sign) -> Greater(., sign*theta')  mixed signs or some gamma_c = 0

because ``gamma (u - mean) / s + beta > theta`` is ``u > theta'`` for gamma > 0, ``u < theta'``
for gamma < 0, and the constant ``beta > theta`` for gamma = 0. The mixed form is exact
too: ``-u > -t`` is ``u < t`` in floating point (negation is exact), and a channel with
gamma = 0 multiplies u by 0 and compares with -1 or +1 to get its constant (a NaN or
infinite u gives no spike there, as the original's ``0 * inf`` does). The state between
steps is the un-normalized u, so nothing else changes. Also matched: the comparison
written directly (``Greater(BN(u), theta)``), either operand order, ``>=`` / ``<`` / ``<=``,
``Sub(theta, BN(u))``, theta as a scalar, per-channel or per-element constant (any shape
that broadcasts against u), BatchNormalization on any rank (per-element MPBN on
flattened ``[N, features]`` included) and UnifiedNorm (mean 0, r for var).

The spike as yfguo91/MPBN writes it (``models/spike_layer.py``: ``mem_update`` and
``spike_activation``) is also matched: ``spike_activation(bn(mem) / V_th)`` compares *after* a Div
(or Mul) by a constant, ``[BN(u) / V rel t]``, which is ``[BN(u) rel t V]`` for V > 0 and
``[BN(u) MIRROR[rel] t V]`` for V < 0, the product ``t V`` taken exactly (as a fraction) into
theta'; and its straight-through output ``(s.float() - bp) + bp`` (``bp`` the surrogate: clamp, tanh,
sigmoid and affine maps of the compared value) is replaced by the spike ``s`` itself once it is
proven equal in floating point: where s = 1, bp lies in [0.5, 2] (then ``1 - bp`` is exact by
Sterbenz's lemma and adding bp back gives exactly 1); where s = 0, bp is finite (``-bp + bp = 0``);
both bounded by interval arithmetic over the values on each side of the threshold
(:func:`_straight_through`). The reset ``mem * (1 - spike)`` then reads s.

What is guaranteed. theta' is stored in u's dtype, rounded *directionally*: for
``u > t`` the largest representable t <= theta', for ``u >= t`` the smallest t >= theta'
(and mirrored for < and <=), each choice checked in exact rational arithmetic (the
square root is compared by squaring). So for every representable u the folded spike
equals the spike of the MPBN formula evaluated in *exact real arithmetic* on the stored
parameters. The unfolded graph rounds ``BN(u)`` (and ``BN(u) - theta``) in floating point,
so it can differ from that exact spike, and hence from the folded one, only when
``BN(u)`` lies within a few ulps of theta; ``fl(y - theta) > 0`` itself is exactly
``y > theta`` under gradual underflow. Random and real inputs (tests) give equal spikes.

Refused, with the reason: training mode, non-constant or non-finite parameters,
``var + eps <= 0``, a normalized value read by anything but such a comparison, a
comparison with a non-zero constant after Sub, unknown rank of u.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx_ir as ir

from ..core.affine import constant_of
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
    value,
)
from ..core.layout import compress as _compress
from ..core.ops import ATTRIBUTES, DOMAIN
from ..core.passes import PassContext, PassResult

ONNX_DOMAINS = ("", "ai.onnx")
REL = {"Greater": "gt", "GreaterOrEqual": "ge", "Less": "lt", "LessOrEqual": "le"}
OP = {v: k for k, v in REL.items()}
MIRROR = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}  # a rel b  <=>  b MIRROR[rel] a



# ----------------------------------------------------------------------------- matching

def _norm_params(node: ir.Node) -> tuple | str:
    """(gamma, beta, mean, var, eps, axis) of a BatchNormalization or UnifiedNorm, or a reason."""
    if node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS:
        if attr(node, "training_mode", 0):
            return "BatchNormalization in training mode uses batch statistics"
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return "BatchNormalization running-statistics outputs are used"
        vals = [const_value(t) for t in node.inputs[1:5]]
        for name, v in zip(("scale", "bias", "mean", "var"), vals):
            if v is None:
                return f"BatchNormalization {name} is not a constant"
        g, b, m, v = (np.asarray(x) for x in vals)
        return g, b, m, v, float(attr(node, "epsilon", 1e-5)), 1
    if node.op_type == "UnifiedNorm" and node.domain == DOMAIN:
        vals = [const_value(t) for t in node.inputs[1:4]]
        for name, v in zip(("running moment", "weight", "bias"), vals):
            if v is None:
                return f"UnifiedNorm {name} is not a constant"
        r, w, b = (np.asarray(x) for x in vals)
        attrs = {**ATTRIBUTES["UnifiedNorm"], **{k: attr(node, k) for k in node.attributes}}
        return w, b, np.zeros_like(r), r, float(attrs["epsilon"]), int(attrs["axis"])
    return f"{node.op_type} is not a membrane-potential normalization"


def _comparison(graph: ir.Graph, y: ir.Value, reader: ir.Node) -> tuple[str, np.ndarray, ir.Value, list] | str:
    """``reader`` of the normalized ``y`` as ``[y rel T]``: (rel, T, spike value, nodes it replaces)."""
    if reader.domain in ONNX_DOMAINS and reader.op_type in REL and len(reader.inputs) == 2:
        slot = 0 if reader.inputs[0] is y else 1
        other = reader.inputs[1 - slot]
        t = const_value(other)
        if t is None or reader.inputs[1 - slot] is y:
            return f"{reader.op_type} {reader.name} compares with a non-constant threshold"
        rel = REL[reader.op_type] if slot == 0 else MIRROR[REL[reader.op_type]]
        return rel, np.asarray(t), reader.outputs[0], [reader]
    if reader.domain in ONNX_DOMAINS and reader.op_type == "Sub" and len(reader.inputs) == 2:
        slot = 0 if reader.inputs[0] is y else 1
        t = const_value(reader.inputs[1 - slot])
        if t is None or reader.inputs[1 - slot] is y:
            return f"Sub {reader.name} subtracts a non-constant threshold"
        d = reader.outputs[0]
        if d.is_graph_output() or len(d.uses()) != 1:
            return f"Sub {reader.name} output has other readers than one comparison"
        (cmp,) = consumers(d)
        if not (cmp.domain in ONNX_DOMAINS and cmp.op_type in REL and len(cmp.inputs) == 2):
            return f"{cmp.op_type} {cmp.name} after Sub {reader.name} is not a comparison"
        dslot = 0 if cmp.inputs[0] is d else 1
        z = const_value(cmp.inputs[1 - dslot])
        if z is None or np.any(np.asarray(z) != 0):
            return f"{cmp.op_type} {cmp.name} compares with a non-zero or non-constant value"
        rel = REL[cmp.op_type] if dslot == 0 else MIRROR[REL[cmp.op_type]]  # [d rel 0]
        if slot == 1:  # d = T - y: [T - y rel 0] = [T rel y] = [y MIRROR[rel] T]
            rel = MIRROR[rel]
        t = np.asarray(t)
        # Z may broadcast the result to a larger shape: keep it in the threshold's shape
        t = t + np.zeros(np.shape(z), t.dtype) if np.ndim(z) > 0 else t
        return rel, t, cmp.outputs[0], [reader, cmp]
    return f"{reader.op_type} {reader.name} reads the normalized potential and is not a threshold comparison"


# ----------------------------------------------------------------------------- exact thresholds

class _Threshold:
    """Exact comparisons of a float ``f`` with ``theta' = m + (theta - beta) sqrt(v) / g``, g != 0."""

    def __init__(self, g: float, beta: float, m: float, var: float, eps: float, theta: float | Fraction):
        self.g, self.m = Fraction(g), Fraction(m)
        self.b = Fraction(theta) - Fraction(beta)
        self.v = Fraction(var) + Fraction(eps)
        self.approx = m + (float(theta) - beta) * np.sqrt(float(var) + float(eps)) / g

    def _sign(self, f) -> int:
        """sign(g (f - m) - (theta - beta) sqrt(v))."""
        a, b = self.g * (Fraction(float(f)) - self.m), self.b
        if a >= 0 and b <= 0:
            return 0 if a == 0 and (b == 0 or self.v == 0) else 1
        if a <= 0 and b >= 0:
            return 0 if a == 0 and (b == 0 or self.v == 0) else -1
        d = a * a - b * b * self.v  # both same sign
        s = (d > 0) - (d < 0)
        return s if a > 0 else -s

    def le(self, f) -> bool:  # f <= theta'
        if np.isinf(f):
            return f < 0
        s = self._sign(f)
        return s <= 0 if self.g > 0 else s >= 0

    def ge(self, f) -> bool:  # f >= theta'
        if np.isinf(f):
            return f > 0
        s = self._sign(f)
        return s >= 0 if self.g > 0 else s <= 0

    def floor(self, dtype) -> np.generic:
        """The largest value of ``dtype`` that is <= theta'."""
        with np.errstate(over="ignore", invalid="ignore"):
            f = dtype.type(self.approx) if np.isfinite(self.approx) else dtype.type(np.inf)
        up, down = dtype.type(np.inf), dtype.type(-np.inf)
        while not self.le(f):
            f = np.nextafter(f, down)
        while f != up and self.le(np.nextafter(f, up)):
            f = np.nextafter(f, up)
        return f

    def ceil(self, dtype) -> np.generic:
        """The smallest value of ``dtype`` that is >= theta'."""
        with np.errstate(over="ignore", invalid="ignore"):
            f = dtype.type(self.approx) if np.isfinite(self.approx) else dtype.type(-np.inf)
        up, down = dtype.type(np.inf), dtype.type(-np.inf)
        while not self.ge(f):
            f = np.nextafter(f, up)
        while f != down and self.ge(np.nextafter(f, down)):
            f = np.nextafter(f, down)
        return f


def _holds(p: Fraction, rel: str, q: Fraction) -> bool:
    return {"gt": p > q, "ge": p >= q, "lt": p < q, "le": p <= q}[rel]


def fold_thresholds(rel: str, theta: np.ndarray, g, b, m, v, eps: float, dtype,
                    scale: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per element of ``theta`` (broadcast with the per-channel parameters): (sign, sign * t).

    ``[g (u - m) / sqrt(v + eps) + b  rel  theta]`` equals ``[sign * u  rel  sign * t]`` for every u
    of ``dtype``; sign is +1, -1, or 0 (then sign * t is -1 or +1 to give the constant). With
    ``scale = (num, den)`` the threshold on BN(u) is ``theta * num / den``, taken exactly (as a
    fraction): a spike compared after ``Div(BN(u), V_th)`` has the threshold ``theta * V_th``.
    """
    num, den = (np.ones(()), np.ones(())) if scale is None else (np.asarray(a, np.float64) for a in scale)
    g, b, m, v, theta, num, den = np.broadcast_arrays(g, b, m, v, theta, num, den)
    sign = np.sign(g).astype(dtype)
    thr = np.empty(g.shape, dtype)
    for i in np.ndindex(g.shape):
        gi, bi = float(g[i]), float(b[i])
        ti = Fraction(float(theta[i])) * Fraction(float(num[i])) / Fraction(float(den[i]))
        if gi == 0:
            const = _holds(Fraction(bi), rel, Fraction(ti))
            thr[i] = -1 if const == (rel in ("gt", "ge")) else 1
            continue
        th = _Threshold(gi, bi, float(m[i]), float(v[i]), eps, ti)
        r = rel if gi > 0 else MIRROR[rel]
        t = th.floor(dtype) if r in ("gt", "le") else th.ceil(dtype)
        thr[i] = t if gi > 0 else -t
    return sign, thr


# ----------------------------------------------------------------------------- the pass

def _rank(*tensors) -> int | None:
    for t in tensors:
        r = rank_of(t)
        if r is not None:
            return r
    return None


# ----------------------------------------------------------------------------- the spike as exported

def _scaling(y: ir.Value) -> tuple[ir.Node, ir.Value, tuple[np.ndarray, np.ndarray]] | None:
    """``BN(u) / V_th`` (MPBN's ``spike_activation(mem2 / V_th)``) or ``BN(u) * k``, the only reader of y:
    (that node, its output d, (num, den)) with ``BN(u) = d * num / den``."""
    readers = consumers(y)
    if len(readers) != 1 or y.is_graph_output() or len(y.uses()) != 1:
        return None
    n = readers[0]
    if n.domain not in ONNX_DOMAINS or n.op_type not in ("Div", "Mul") or len(n.inputs) != 2:
        return None
    slot = 0 if n.inputs[0] is y else 1
    if n.op_type == "Div" and slot != 0:
        return None
    k = constant_of(n.inputs[1 - slot])
    if k is None or not np.issubdtype(k.dtype, np.floating) or np.any(k == 0) or not np.all(np.isfinite(k)):
        return None
    k = np.asarray(k, np.float64)
    return n, n.outputs[0], ((k, np.ones_like(k)) if n.op_type == "Div" else (np.ones_like(k), k))


#: ops a surrogate-gradient branch is made of: monotone in its one non-constant input
_SURROGATE_OPS = ("Identity", "Cast", "Max", "Min", "Clip", "Add", "Sub", "Mul", "Div", "Tanh", "Sigmoid", "Neg")


def _region(rel: str, theta: np.ndarray, dtype, spiking: bool) -> tuple[np.ndarray, np.ndarray]:
    """The values of d (in ``dtype``) where ``[d rel theta]`` is ``spiking``, as [lo, hi]."""
    t = np.asarray(theta, dtype)
    up, down = np.asarray(np.inf, dtype), np.asarray(-np.inf, dtype)
    if not spiking:
        rel = {"gt": "le", "ge": "lt", "lt": "ge", "le": "gt"}[rel]
    lo = {"gt": np.nextafter(t, up), "ge": t}.get(rel, np.full_like(t, -np.inf))
    hi = {"lt": np.nextafter(t, down), "le": t}.get(rel, np.full_like(t, np.inf))
    return lo, hi


def _round_out(lo64: np.ndarray, hi64: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.asarray(lo64, dtype), np.asarray(hi64, dtype)
    lo = np.where(lo.astype(np.float64) > lo64, np.nextafter(lo, np.asarray(-np.inf, dtype)), lo)
    hi = np.where(hi.astype(np.float64) < hi64, np.nextafter(hi, np.asarray(np.inf, dtype)), hi)
    return lo, hi


def _through(node: ir.Node, slot: int, lo: np.ndarray, hi: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray] | str:
    """Bounds of ``node``'s output when its input ``slot`` lies in [lo, hi], every op rounded as the runtime
    rounds it: basic arithmetic is correctly rounded, hence monotone, so evaluating the ends bounds the
    rest; Tanh and Sigmoid get a margin of 2^-20 (relative) and keep their exact sign and range."""
    op = node.op_type
    ks = [None if i is None else constant_of(i) for i in node.inputs]
    ks = [None if k is None else np.asarray(k, dtype) for k in ks]
    if any(k is None for j, k in enumerate(ks) if j != slot and node.inputs[j] is not None):
        return f"{op} {node.name} has a second non-constant input"
    k = ks[1 - slot] if len(ks) == 2 else None
    with np.errstate(all="ignore"):
        if op in ("Identity", "Cast"):
            if op == "Cast" and np.dtype(ir.DataType(attr(node, "to")).numpy()) != np.dtype(dtype):
                return f"Cast {node.name} changes the type"
            return lo, hi
        if op == "Neg":
            return -hi, -lo
        if op in ("Max", "Min"):
            f = np.maximum if op == "Max" else np.minimum
            for j, c in enumerate(ks):
                if j != slot and c is not None:
                    lo, hi = f(lo, c), f(hi, c)
            return lo, hi
        if op == "Clip":
            mn = ks[1] if len(ks) > 1 else None
            mx = ks[2] if len(ks) > 2 else None
            if mn is not None:
                lo, hi = np.maximum(lo, mn), np.maximum(hi, mn)
            if mx is not None:
                lo, hi = np.minimum(lo, mx), np.minimum(hi, mx)
            return lo, hi
        if op == "Add":
            return lo + k, hi + k
        if op == "Sub":
            return (lo - k, hi - k) if slot == 0 else (k - hi, k - lo)
        if op in ("Mul", "Div"):
            if op == "Div" and slot != 0:
                return f"Div {node.name} divides by the potential"
            a, b = (lo * k, hi * k) if op == "Mul" else (lo / k, hi / k)
            return np.minimum(a, b), np.maximum(a, b)
        if op in ("Tanh", "Sigmoid"):
            f = np.tanh if op == "Tanh" else (lambda t: 1.0 / (1.0 + np.exp(-t)))
            a, b = f(lo.astype(np.float64)), f(hi.astype(np.float64))
            margin = 2.0 ** -20
            a, b = a - margin * np.abs(a) - 1e-30, b + margin * np.abs(b) + 1e-30
            floor_, ceil_ = (-1.0, 1.0) if op == "Tanh" else (0.0, 1.0)
            if op == "Tanh":  # tanh keeps the sign of its argument (it is odd) in any implementation
                a = np.where(lo >= 0, np.maximum(a, 0.0), a)
                b = np.where(hi <= 0, np.minimum(b, 0.0), b)
            return _round_out(np.clip(a, floor_, ceil_), np.clip(b, floor_, ceil_), dtype)
    return f"{op} {node.name} is not part of a surrogate gradient"


def _data_slot(node: ir.Node) -> int | None:
    slots = [j for j, i in enumerate(node.inputs) if i is not None and constant_of(i) is None]
    return slots[0] if len(slots) == 1 else None


def _straight_through(graph: ir.Graph, d: ir.Value, comparisons: list) -> tuple[list, list[ir.Node]] | str:
    """Straight-through spikes ``o = (s - bp) + bp`` built on the comparisons of d, each proven to equal s.

    MPBN's ``spike_activation`` (and most surrogate-gradient code in eval) returns
    ``(out_s.float() - out_bp).detach() + out_bp`` with ``out_bp = g(d)`` a monotone function of d
    (clamp, tanh, sigmoid, affine maps). In floating point ``o == s`` exactly when, wherever s = 1,
    ``bp`` lies in [0.5, 2] (then ``1 - bp`` is exact by Sterbenz's lemma and adding bp back gives 1)
    and, wherever s = 0, bp is finite (``-bp + bp = 0``). Both are checked by bounding ``g`` over
    the values of d on each side of the threshold. Returns the (o, s) replacements and the nodes
    that become dead, or the reason.
    """
    dtype = dtype_of(d)
    if dtype is None:
        return "element type of the compared potential is unknown"
    spikes = {}
    for rel, theta, spike, _ in comparisons:
        for c in consumers(spike):
            if c.op_type == "Cast" and c.domain in ONNX_DOMAINS and np.issubdtype(
                    np.dtype(ir.DataType(attr(c, "to")).numpy()), np.floating):
                spikes[c.outputs[0]] = (rel, theta)
    replace, dead, starts = [], [], set()
    for s_val, (rel, theta) in spikes.items():
        for sub in consumers(s_val):
            if not (sub.op_type == "Sub" and sub.domain in ONNX_DOMAINS and len(sub.inputs) == 2
                    and sub.inputs[0] is s_val):
                continue
            bp = sub.inputs[1]
            t, chain = sub.outputs[0], [sub]
            while len(consumers(t)) == 1 and consumers(t)[0].op_type == "Identity" and not t.is_graph_output():
                chain.append(consumers(t)[0])
                t = chain[-1].outputs[0]
            adds = [a for a in consumers(t) if a.op_type == "Add" and a.domain in ONNX_DOMAINS
                    and len(a.inputs) == 2 and {id(a.inputs[0]), id(a.inputs[1])} == {id(t), id(bp)}]
            if len(adds) != 1 or len(consumers(t)) != 1 or t.is_graph_output():
                return f"Sub {sub.name} (spike - surrogate) is not added back to the surrogate"
            path, v = [], bp
            while v is not d:
                n = v.producer()
                if n is None or n.domain not in ONNX_DOMAINS or n.op_type not in _SURROGATE_OPS:
                    return (f"{n.op_type if n else 'input'} {n.name if n else v.name} in the surrogate of Sub "
                            f"{sub.name} is not a monotone op of the potential")
                slot = _data_slot(n)
                if slot is None:
                    return f"{n.op_type} {n.name} in the surrogate of Sub {sub.name} reads two non-constant tensors"
                path.append((n, slot))
                v = n.inputs[slot]
            path.reverse()
            for n, _ in path[:-1]:
                if n.outputs[0].is_graph_output() or len(n.outputs[0].uses()) != 1:
                    return f"{n.op_type} {n.name} of the surrogate has another reader"
            for spiking in (True, False):
                lo, hi = _region(rel, theta, dtype, spiking)
                for n, slot in path:
                    b = _through(n, slot, lo, hi, dtype)
                    if isinstance(b, str):
                        return b
                    lo, hi = (np.asarray(x, dtype) for x in b)
                if np.any(np.isnan(lo)) or np.any(np.isnan(hi)):
                    return f"the surrogate {bp.name} is not bounded"
                if spiking and not (np.all(lo >= 0.5) and np.all(hi <= 2)):
                    return (f"the surrogate {bp.name} spans [{float(np.min(lo)):.3g}, {float(np.max(hi)):.3g}] "
                            f"where the spike is 1, not within [0.5, 2]: (s - bp) + bp may differ from s")
                if not spiking and not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
                    return f"the surrogate {bp.name} is not finite where the spike is 0"
            replace.append((adds[0].outputs[0], s_val))
            dead += [adds[0], *chain[::-1], *(n for n, _ in reversed(path))]
            starts.add(path[0][0])
    return replace, dead, starts


def _candidate(y: ir.Value):
    """(scaling, d, readers of d) when y feeds a threshold comparison (after an optional Div by V_th), else None."""
    sc = _scaling(y)
    d = sc[1] if sc else y
    readers = consumers(d)
    if not readers or not any(r.op_type in REL or r.op_type == "Sub" for r in readers):
        return None
    if sc is None and not all(r.op_type in REL or r.op_type == "Sub" for r in readers) and not any(
            r.op_type in REL for r in readers):
        return None
    return sc, d, readers


def fold_mpbn_into_threshold(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Fold membrane-potential BatchNorm (MPBN) into the spiking threshold of the comparison after it."""
    namer = Namer(graph)
    for node in list(graph):
        if node.graph is not graph or not node.outputs or not (
                (node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS)
                or (node.op_type == "UnifiedNorm" and node.domain == DOMAIN)):
            continue
        cand = _candidate(node.outputs[0])
        if cand is None:
            continue  # not a spiking threshold: fold_affine_into_linear's business
        result.matched += 1
        why = _fold_one(graph, node, cand, namer, result)
        if why:
            result.skip(node.name, why)


def _fold_one(graph: ir.Graph, node: ir.Node, cand, namer: Namer, result: PassResult) -> str | None:
    params = _norm_params(node)
    if isinstance(params, str):
        return params
    g, b, m, v, eps, axis = params
    if not all(np.all(np.isfinite(p)) for p in (g, b, m, v)):
        return "parameters are not finite"
    if np.any(v.astype(np.float64) + eps <= 0):
        return "var + eps is not positive"
    y, u = node.outputs[0], node.inputs[0]
    scaling, d, readers = cand
    if y.is_graph_output():
        return f"the normalized potential {y.name} is a graph output"
    if d.is_graph_output():
        return f"the scaled potential {d.name} is a graph output"
    comparisons, others = [], []
    for r in readers:
        c = _comparison(graph, d, r)
        if isinstance(c, str):
            if r.op_type in REL or r.op_type == "Sub":
                return c
            others.append((r, c))
            continue
        comparisons.append(c)
    ste = ([], [], set())
    if others:
        ste = _straight_through(graph, d, comparisons)
        if isinstance(ste, str):
            return ste
        stray = [(r, c) for r, c in others if r not in ste[2]]
        if stray:
            return stray[0][1].replace("and is not a threshold comparison",
                                       "and is neither a threshold comparison nor its surrogate gradient")
    num_den = scaling[2] if scaling else None
    if num_den is not None:
        ratio = num_den[0] / num_den[1]
        if not (np.all(ratio > 0) or np.all(ratio < 0)):
            return f"{scaling[0].op_type} {scaling[0].name} scales by constants of both signs"
        if np.all(ratio < 0):  # [d rel t] with d = y / f, f < 0: [y MIRROR[rel] t f]
            comparisons = [(MIRROR[rel], theta, spike, old) for rel, theta, spike, old in comparisons]
    rank = _rank(u, y)
    if rank is None:
        return "rank of the membrane potential is unknown (run shape inference)"
    pos = axis % rank
    chan = (-1,) + (1,) * (rank - pos - 1)
    dtype = dtype_of(u)
    dtype = dtype if dtype is not None else g.dtype
    per_ch = [np.asarray(p, np.float64).reshape(chan) for p in (g, b, m, v)]
    plans = []
    for rel, theta, spike, old in comparisons:
        sign, thr = fold_thresholds(rel, np.asarray(theta, np.float64), *per_ch, eps, dtype, num_den)
        plans.append((rel, _compress(thr), spike, old))
    for o, s_val in ste[0]:  # the straight-through spikes are the spikes
        replace_value(o, s_val)
    remove_nodes(graph, ste[1])
    sign = _compress(np.sign(per_ch[0]).astype(dtype))
    base = node.name or "mpbn"
    positive, negative = bool(np.all(sign > 0)), bool(np.all(sign < 0))
    signed = None
    if not (positive or negative):
        signed = value(namer, u.name, "signed", dtype=u.dtype, shape=u.shape)
        name = namer(base, "sign")
        add_node(namer, "Mul", [u, constant(namer, base, "sign", sign)], [signed], base=base, name=name)
    for rel, thr, spike, old in plans:
        if positive:
            op, x, t = OP[rel], u, thr
        elif negative:
            op, x, t = OP[MIRROR[rel]], u, -thr  # thresholds were stored as sign * t
        else:
            op, x, t = OP[rel], signed, thr
        name = namer(base, "threshold")  # drawn before its constant's name, as before the port
        out = value(namer, base, "spike", dtype=spike.dtype, shape=spike.shape)
        add_node(namer, op, [x, constant(namer, base, "threshold", t.astype(dtype))], [out], base=base, name=name)
        replace_value(spike, out)  # the spike's readers (and its graph-output slot and name) take the new comparison
        remove_nodes(graph, old)
    remove_nodes(graph, ([scaling[0]] if scaling else []) + [node])
    form = "u > theta'" if positive else "u < theta'" if negative else "sign(gamma) u vs sign(gamma) theta'"
    extra = []
    if scaling:
        extra.append(f"the {scaling[0].op_type} by the threshold folded in")
    if ste[0]:
        extra.append(f"{len(ste[0])} straight-through surrogate{'s' if len(ste[0]) > 1 else ''} (s - bp) + bp "
                     "proven equal to the spike and dropped")
    spelled = " ".join(([scaling[0].op_type] if scaling else []) + sorted({OP[p[0]] for p in plans}))
    result.rewrote(f"{node.op_type} {node.name} folded into the firing threshold ({form}, "
                   f"{len(plans)} comparison{'s' if len(plans) > 1 else ''}"
                   + "".join(f"; {e}" for e in extra) + ")", node.name,
                   f"{node.op_type} {spelled}" + (" + straight-through surrogate" if ste[0] else ""))
    return None
