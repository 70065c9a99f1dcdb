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

    def __init__(self, g: float, beta: float, m: float, var: float, eps: float, theta: float):
        self.g, self.m = Fraction(g), Fraction(m)
        self.b = Fraction(theta) - Fraction(beta)
        self.v = Fraction(var) + Fraction(eps)
        self.approx = m + (theta - beta) * np.sqrt(float(var) + float(eps)) / g

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


def fold_thresholds(rel: str, theta: np.ndarray, g, b, m, v, eps: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per element of ``theta`` (broadcast with the per-channel parameters): (sign, sign * t).

    ``[g (u - m) / sqrt(v + eps) + b  rel  theta]`` equals ``[sign * u  rel  sign * t]`` for every u
    of ``dtype``; sign is +1, -1, or 0 (then sign * t is -1 or +1 to give the constant).
    """
    g, b, m, v, theta = np.broadcast_arrays(g, b, m, v, theta)
    sign = np.sign(g).astype(dtype)
    thr = np.empty(g.shape, dtype)
    for i in np.ndindex(g.shape):
        gi, bi, ti = float(g[i]), float(b[i]), float(theta[i])
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


def fold_mpbn_into_threshold(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Fold membrane-potential BatchNorm (MPBN) into the spiking threshold of the comparison after it."""
    namer = Namer(graph)
    for node in list(graph):
        if node.graph is not graph or not node.outputs or not (
                (node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS)
                or (node.op_type == "UnifiedNorm" and node.domain == DOMAIN)):
            continue
        y = node.outputs[0]
        readers = consumers(y)
        if not readers or not all(r.op_type in REL or r.op_type == "Sub" for r in readers):
            continue  # not a spiking threshold: fold_affine_into_linear's business
        result.matched += 1
        why = _fold_one(graph, node, readers, namer, result)
        if why:
            result.skip(node.name, why)


def _fold_one(graph: ir.Graph, node: ir.Node, readers: list[ir.Node], namer: Namer, result: PassResult) -> str | None:
    params = _norm_params(node)
    if isinstance(params, str):
        return params
    g, b, m, v, eps, axis = params
    if not all(np.all(np.isfinite(p)) for p in (g, b, m, v)):
        return "parameters are not finite"
    if np.any(v.astype(np.float64) + eps <= 0):
        return "var + eps is not positive"
    y, u = node.outputs[0], node.inputs[0]
    if y.is_graph_output():
        return f"the normalized potential {y.name} is a graph output"
    comparisons = []
    for r in readers:
        c = _comparison(graph, y, r)
        if isinstance(c, str):
            return c
        comparisons.append(c)
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
        sign, thr = fold_thresholds(rel, np.asarray(theta, np.float64), *per_ch, eps, dtype)
        plans.append((rel, _compress(thr), spike, old))
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
    remove_nodes(graph, [node])
    form = "u > theta'" if positive else "u < theta'" if negative else "sign(gamma) u vs sign(gamma) theta'"
    result.rewrote(f"{node.op_type} {node.name} folded into the firing threshold ({form}, "
                   f"{len(plans)} comparison{'s' if len(plans) > 1 else ''})", node.name)
    return None
