"""Hypothesis strategy for the differential fuzzer: random small ONNX graphs full of normalizations.

:func:`graphs` draws a :class:`Case`: a random DAG over a few tensors in three layouts,

* ``cf``: channels first, ``[N, C]``, ``[N, C, L]`` or ``[N, C, H, W]`` (channel axis 1),
* ``cl``: channels last, ``[N, T, C]`` or ``[N, H, W, C]`` (channel axis -1),

built from linear layers (Conv with groups / stride / padding, ConvTranspose with groups /
stride, Gemm with transA / transB / alpha / beta / C, MatMul with a constant weight on
either side, MatMul + Add), elementwise ops (Relu, Tanh, Add / Sub / Mul / Div by a
constant, residual Adds, products of two tensors), movers (Reshape, Flatten, Transpose,
Unsqueeze), fan-out (any tensor may be read again later), shared weights (a later layer
may reuse an earlier layer's weight) and graph outputs in the middle, with every
normalization normdeploy knows placed at random:

* ``BatchNormalization`` on rank 2, 3 and 4; ``LayerNormalization`` over the last axis or
  several trailing axes; the canonical ``normdeploy::`` ops UnifiedNorm, PowerNorm,
  GroupScaling, RMSNorm, CRMSNorm, DynamicTanh (channel axis last or 1), ScaleNorm;
* decomposed LayerNorm (ReduceMean, Sub, Pow or Mul, ReduceMean, Add, Sqrt, Div /
  Reciprocal+Mul / Div(1, .)+Mul / Pow(-0.5)+Mul, optional gain and bias, ``x - mean``
  written once or twice; last axis or channels first) and decomposed RMSNorm;
* MPBN: ``BatchNormalization -> Sub(theta) -> Greater(0) -> Cast`` (or the comparison
  written directly, any of > >= < <=, either operand order), optionally followed by the
  LIF state update ``u * (1 - spike)`` that reads the un-normalized potential.

Statistics range from benign to extreme (tiny and huge variances, zero variances, zero /
negative / mixed-sign / tiny / huge gammas, huge means, eps from 1e-12 to 1e-2); about
one graph in ten carries one bad statistic (NaN, +-Inf, or a negative variance / moment),
which normdeploy must refuse as bad input. Models are fp32 or fp16, opset 17, 18 or 20,
with a static or dynamic batch axis.

What the property needs to judge a graph travels inside the model, as JSON in
``metadata_props[META_KEY]`` (so a saved ``.onnx`` regression is self-contained): the
planted normalizations, the data-path tensors, the spike comparisons, the constants that
belong to a normalization, and whether a bad statistic was planted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from normdeploy.core import ops

META_KEY = "normdeploy_fuzz"
ND = ops.DOMAIN


@dataclass
class Tensor:
    """A float tensor of the data path: concrete shape (batch included) and where its channels are."""

    name: str
    shape: tuple[int, ...]
    layout: str  # "cf": channel axis 1; "cl": channel axis -1 (rank-2 tensors are "cf", and both at once)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def last_axis(self) -> bool:
        """Channels (the normalized features) on the last axis: channels last, or [N, F]."""
        return self.layout == "cl" or self.rank == 2

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.layout == "cl" else self.shape[1]


@dataclass
class Case:
    """One generated graph: the model (metadata inside) and a readable summary of how it was built."""

    model: onnx.ModelProto
    meta: dict
    steps: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"Case({self.meta['dtype']}, opset {self.meta['opset']}: " + "; ".join(self.steps) + ")"


def meta_of(model: onnx.ModelProto) -> dict:
    """The fuzzer's metadata stored in ``model`` (see the module docstring)."""
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    raise KeyError(f"model has no {META_KEY} metadata")


# ----------------------------------------------------------------------------- the builder

class Builder:
    """Emits ONNX nodes and initializers for one graph; tracks the metadata the property needs."""

    def __init__(self, dtype, opset: int, seed: int):
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.n = 0
        self.pool: list[Tensor] = []
        self.weights: dict[tuple, list[str]] = {}  # shape -> weight initializers, for sharing
        self.readers: dict[str, int] = {}
        self.steps: list[str] = []
        self.want_bad = False  # plant one bad statistic in this graph (the first normalization that has one)
        self.meta = {"dtype": self.dtype.name, "opset": opset, "norms": [], "spikes": [], "bad": None,
                     "data": [], "norm_consts": [], "outputs_middle": []}

    # -- names, constants, nodes
    def fresh(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, value, dtype=None, base: str = "c", norm: bool = False) -> str:
        arr = np.asarray(value, dtype if dtype is not None else self.dtype)
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(arr, name))
        if norm:
            self.meta["norm_consts"].append(name)
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64), np.int64, "i")

    def node(self, op: str, inputs: list[str], domain: str = "", base: str | None = None, **attrs) -> str:
        out = self.fresh(base or op.lower())
        for i in inputs:
            if i:
                self.readers[i] = self.readers.get(i, 0) + 1
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", domain=domain, **attrs))
        return out

    def add(self, name: str, shape, layout: str) -> Tensor:
        t = Tensor(name, tuple(int(d) for d in shape), layout)
        self.pool.append(t)
        self.meta["data"].append(name)
        return t

    def reduce_mean(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.ints(axes)], keepdims=1)
        return self.node("ReduceMean", [x], axes=list(axes), keepdims=1)

    def weight(self, draw, shape, scale: float, share: bool = True) -> str:
        """A weight initializer; sometimes an earlier weight of the same shape (shared weights)."""
        shape = tuple(shape)
        if share and self.weights.get(shape) and draw(st.integers(0, 3)) == 0:
            name = draw(st.sampled_from(self.weights[shape]))
            self.steps.append(f"shared weight {name}")
            return name
        name = self.const(self.rng.standard_normal(shape) * scale, base="w")
        self.weights.setdefault(shape, []).append(name)
        return name

    # -- parameters of normalizations
    def stats(self, draw, what: str, n: int, extreme: bool) -> np.ndarray:
        """One parameter vector: ``what`` in var (non-negative statistic), gain, mean, bias."""
        r, fp16 = self.rng, self.dtype == np.float16
        huge_var, huge_mean, huge_gain = (3e4, 1e2, 1e2) if fp16 else (1e6, 1e4, 1e3)
        if not extreme:
            return {"var": lambda: r.uniform(0.2, 2.0, n),
                    "gain": lambda: r.uniform(0.5, 1.5, n) * r.choice([-1.0, 1.0], n, p=[0.3, 0.7]),
                    "mean": lambda: r.standard_normal(n),
                    "bias": lambda: r.standard_normal(n)}[what]()
        kind = draw(st.sampled_from({
            "var": ["zero", "tiny", "huge", "mixed", "benign"],
            "gain": ["zero", "some_zero", "negative", "tiny", "huge", "benign"],
            "mean": ["huge", "benign"],
            "bias": ["huge", "zero", "benign"]}[what]))
        if what == "var":
            v = {"zero": np.zeros(n), "tiny": r.uniform(0, 1e-10, n), "huge": r.uniform(0.1, 1, n) * huge_var,
                 "mixed": r.choice([0.0, 1e-9, 1.0, huge_var], n), "benign": r.uniform(0.2, 2.0, n)}[kind]
        elif what == "gain":
            base = r.uniform(0.5, 1.5, n)
            v = {"zero": np.zeros(n), "some_zero": base * (r.uniform(size=n) < 0.5), "negative": -base,
                 "tiny": base * 1e-6 * (1e3 if fp16 else 1), "huge": base * huge_gain,
                 "benign": base * r.choice([-1.0, 1.0], n)}[kind]
        elif what == "mean":
            v = r.standard_normal(n) * (huge_mean if kind == "huge" else 1.0)
        else:
            v = {"huge": r.standard_normal(n) * huge_mean / 10, "zero": np.zeros(n), "benign": r.standard_normal(n)}[kind]
        return v

    def param_input(self, value: np.ndarray) -> str:
        """A normalization parameter fed as a graph input (not a constant): its shape, any values."""
        name = f"p{len(self.inputs)}"
        self.inputs.append(helper.make_tensor_value_info(name, self.elem, list(np.shape(value))))
        self.steps.append(f"parameter {name} is a graph input")
        return name

    def eps(self, draw, extreme: bool, in_graph: bool = False) -> float:
        """Epsilon: an attribute (any value) or, for decomposed norms, a constant in the model's dtype."""
        if not extreme:
            return 1e-5
        choices = [1e-12, 1e-8, 1e-5, 1e-3, 1e-2]
        if in_graph and self.dtype == np.float16:
            choices = [1e-5, 1e-3, 1e-2]  # fp16 flushes anything below ~6e-8 to zero
        return draw(st.sampled_from(choices))

    def plant_bad(self, draw, params: dict[str, np.ndarray], statistic: str | None, node_kind: str,
                  exclude: str | None = None) -> None:
        """With the graph's bad-input budget left, put one NaN / Inf / negative statistic into ``params``.

        ``exclude`` names a parameter fed as a graph input (its stored value is only its shape).
        """
        if self.meta["bad"] is not None or not self.want_bad:
            return
        names = [k for k in params if k != exclude]
        if not names:
            return
        if statistic == exclude:
            statistic = None
        which = draw(st.sampled_from(names))
        kinds = ["nan", "inf", "-inf"] + (["negative"] * 2 if statistic else [])
        bad = draw(st.sampled_from(kinds))
        if bad == "negative":
            which = statistic
        v = np.array(params[which], np.float64, copy=True).reshape(-1)
        i = draw(st.integers(0, v.size - 1))
        v[i] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "negative": -0.5}[bad]
        params[which] = v.reshape(np.shape(params[which]))
        self.meta["bad"] = f"{bad} in {node_kind} {which}"
        self.steps.append(f"BAD {bad} in {which}")


# ----------------------------------------------------------------------------- actions

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def act_conv(b: Builder, draw, t: Tensor) -> Tensor | None:
    if t.layout != "cf" or t.rank not in (3, 4):
        return None
    c, spatial = t.shape[1], t.shape[2:]
    co = draw(st.sampled_from([2, 3, 4]))
    groups = draw(st.sampled_from(_divisors(int(np.gcd(c, co)))))
    k = draw(st.sampled_from([1, 1, 2, 3]))
    pad = draw(st.sampled_from([0, 0, 1]))
    stride = draw(st.sampled_from([1, 1, 2]))
    out = [(s + 2 * pad - k) // stride + 1 for s in spatial]
    if min(out) < 1:
        k, pad, stride, out = 1, 0, 1, list(spatial)
    w = b.weight(draw, (co, c // groups) + (k,) * len(spatial), 1.0 / np.sqrt(c * k))
    inputs = [t.name, w]
    if draw(st.booleans()):
        inputs.append(b.const(b.rng.standard_normal(co) * 0.5, base="bias"))
    y = b.node("Conv", inputs, kernel_shape=[k] * len(spatial), pads=[pad] * (2 * len(spatial)),
               strides=[stride] * len(spatial), group=groups)
    b.steps.append(f"Conv(k{k} p{pad} s{stride} g{groups} {c}->{co})")
    return b.add(y, (t.shape[0], co, *out), "cf")


def act_conv_transpose(b: Builder, draw, t: Tensor) -> Tensor | None:
    if t.layout != "cf" or t.rank not in (3, 4) or max(t.shape[2:]) > 3:
        return None
    c, spatial = t.shape[1], t.shape[2:]
    co = draw(st.sampled_from([2, 3, 4]))
    groups = draw(st.sampled_from(_divisors(int(np.gcd(c, co)))))
    k = draw(st.sampled_from([1, 2]))
    stride = draw(st.sampled_from([1, 2]))
    out = [(s - 1) * stride + k for s in spatial]
    w = b.weight(draw, (c, co // groups) + (k,) * len(spatial), 1.0 / np.sqrt(c))
    inputs = [t.name, w]
    if draw(st.booleans()):
        inputs.append(b.const(b.rng.standard_normal(co) * 0.5, base="bias"))
    y = b.node("ConvTranspose", inputs, kernel_shape=[k] * len(spatial), strides=[stride] * len(spatial), group=groups)
    b.steps.append(f"ConvTranspose(k{k} s{stride} g{groups} {c}->{co})")
    return b.add(y, (t.shape[0], co, *out), "cf")


def act_gemm(b: Builder, draw, t: Tensor) -> Tensor | None:
    if t.rank != 2:
        return None
    n, f = t.shape
    m = draw(st.sampled_from([3, 4, 6]))
    trans_a, trans_b = draw(st.integers(0, 4)) == 0, draw(st.booleans())
    alpha = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0]))
    beta = draw(st.sampled_from([1.0, 0.5]))
    a = t.name
    if trans_a:
        a = b.node("Transpose", [a], perm=[1, 0])
    w = b.weight(draw, (m, f) if trans_b else (f, m), 1.0 / np.sqrt(f))
    inputs = [a, w]
    c_kind = draw(st.sampled_from(["none", "vector", "row"]))
    if c_kind != "none":
        inputs.append(b.const(b.rng.standard_normal((m,) if c_kind == "vector" else (1, m)) * 0.5, base="bias"))
    y = b.node("Gemm", inputs, transA=int(trans_a), transB=int(trans_b), alpha=alpha, beta=beta)
    b.steps.append(f"Gemm(tA{int(trans_a)} tB{int(trans_b)} a{alpha} b{beta} C:{c_kind} {f}->{m})")
    return b.add(y, (n, m), "cf")


def act_matmul(b: Builder, draw, t: Tensor) -> Tensor | None:
    if not t.last_axis:
        return None
    if t.rank == 3 and draw(st.integers(0, 5)) == 0:  # constant on the left: W [T2, T] @ X [N, T, C]
        t2 = draw(st.sampled_from([2, 3]))
        w = b.weight(draw, (t2, t.shape[1]), 1.0 / np.sqrt(t.shape[1]))
        y = b.node("MatMul", [w, t.name])
        b.steps.append(f"MatMul(W[{t2},{t.shape[1]}] @ x)")
        return b.add(y, (t.shape[0], t2, t.shape[2]), "cl")
    c = t.shape[-1]
    d = draw(st.sampled_from([3, 4, 6, 8]))
    wshape = (1, c, d) if t.rank >= 3 and draw(st.integers(0, 5)) == 0 else (c, d)
    w = b.weight(draw, wshape, 1.0 / np.sqrt(c))
    y = b.node("MatMul", [t.name, w])
    bias = draw(st.booleans())
    if bias:
        y = b.node("Add", [y, b.const(b.rng.standard_normal(d) * 0.5, base="bias")])
    b.steps.append(f"MatMul(x @ W{list(wshape)}{' + bias' if bias else ''})")
    return b.add(y, t.shape[:-1] + (d,), t.layout)


def act_unary(b: Builder, draw, t: Tensor) -> Tensor | None:
    op = draw(st.sampled_from(["Relu", "Tanh"]))
    b.steps.append(op)
    return b.add(b.node(op, [t.name]), t.shape, t.layout)


def _channel_shape(t: Tensor) -> tuple[int, ...]:
    """Shape of a per-channel constant that broadcasts on t's channel axis."""
    if t.layout == "cl" or t.rank == 2:
        return (t.channels,)
    return (t.channels,) + (1,) * (t.rank - 2)


def act_const_elementwise(b: Builder, draw, t: Tensor) -> Tensor | None:
    op = draw(st.sampled_from(["Add", "Sub", "Mul", "Div"]))
    kind = draw(st.sampled_from(["scalar", "channel", "full"]))
    shape = {"scalar": (), "channel": _channel_shape(t), "full": t.shape[1:]}[kind]
    if op in ("Mul", "Div"):
        k = b.rng.uniform(0.5, 2.0, shape) * b.rng.choice([-1.0, 1.0], shape)
    else:
        k = b.rng.standard_normal(shape)
    c = b.const(k, base="k")
    flip = op in ("Add", "Mul") and draw(st.booleans())
    y = b.node(op, [c, t.name] if flip else [t.name, c])
    b.steps.append(f"{op}({kind} const)")
    return b.add(y, t.shape, t.layout)


def act_binary(b: Builder, draw, t: Tensor) -> Tensor | None:
    """A residual Add (or a product) with another tensor of the same shape: fan-out and joins."""
    others = [o for o in b.pool if o.shape == t.shape and o.name != t.name]
    op = draw(st.sampled_from(["Add", "Add", "Add", "Mul"]))
    if not others:
        if draw(st.integers(0, 3)):
            return None
        other = t  # Add(x, x): one node reading a tensor twice
    else:
        other = draw(st.sampled_from(others))
    b.steps.append(f"{op}(x, {other.name})")
    return b.add(b.node(op, [t.name, other.name]), t.shape, t.layout)


def act_mover(b: Builder, draw, t: Tensor) -> Tensor | None:
    n = t.shape[0]
    options = []
    if t.layout == "cf" and t.rank == 4:
        options += ["flatten", "reshape_flat", "to_cl4"]
    if t.layout == "cl" and t.rank == 4:
        options += ["cl4_to_cl3", "cl4_to_cf4"]
    if t.rank == 3:
        options += ["swap_last", "flatten"]
    if t.rank == 2:
        options += ["unsqueeze", "to_cl3", "to_cf3"]
    kind = draw(st.sampled_from(options))
    if kind in ("flatten", "reshape_flat"):
        f = int(np.prod(t.shape[1:]))
        y = b.node("Flatten", [t.name], axis=1) if kind == "flatten" else b.node("Reshape", [t.name, b.ints([0, -1])])
        shape, layout = (n, f), "cf"
    elif kind == "to_cl4":
        y = b.node("Transpose", [t.name], perm=[0, 2, 3, 1])
        shape, layout = (n, t.shape[2], t.shape[3], t.shape[1]), "cl"
    elif kind == "cl4_to_cl3":
        shape = (n, t.shape[1] * t.shape[2], t.shape[3])
        y = b.node("Reshape", [t.name, b.ints([0, shape[1], shape[2]])])
        layout = "cl"
    elif kind == "cl4_to_cf4":
        y = b.node("Transpose", [t.name], perm=[0, 3, 1, 2])
        shape, layout = (n, t.shape[3], t.shape[1], t.shape[2]), "cf"
    elif kind == "swap_last":
        y = b.node("Transpose", [t.name], perm=[0, 2, 1])
        shape, layout = (n, t.shape[2], t.shape[1]), "cl" if t.layout == "cf" else "cf"
    elif kind == "unsqueeze":
        if b.opset >= 13:
            y = b.node("Unsqueeze", [t.name, b.ints([2])])
        else:  # pragma: no cover - opsets here are >= 17
            y = b.node("Unsqueeze", [t.name], axes=[2])
        shape, layout = (n, t.shape[1], 1), "cf"
    else:  # to_cl3 / to_cf3: split F into two factors
        f = t.shape[1]
        splits = [(p, f // p) for p in range(2, f) if f % p == 0]
        if not splits:
            return None
        p, q = draw(st.sampled_from(splits))
        y = b.node("Reshape", [t.name, b.ints([0, p, q])])
        shape, layout = (n, p, q), "cl" if kind == "to_cl3" else "cf"
    b.steps.append(f"{kind} -> {list(shape)}")
    return b.add(y, shape, layout)


# -- normalizations

def _register(b: Builder, kind: str, node_out: str, decomposed: bool = False, anchor: str | None = None) -> None:
    b.meta["norms"].append({"kind": kind, "node": f"n_{node_out}", "out": node_out, "decomposed": decomposed,
                            "anchor": anchor})


def act_batchnorm(b: Builder, draw, t: Tensor, extreme: bool) -> Tensor | None:
    if t.layout != "cf":
        return None
    c = t.channels
    p = {"scale": b.stats(draw, "gain", c, extreme), "bias": b.stats(draw, "bias", c, extreme),
         "mean": b.stats(draw, "mean", c, extreme), "var": b.stats(draw, "var", c, extreme)}
    b.plant_bad(draw, p, "var", "BatchNormalization")
    eps = b.eps(draw, extreme)
    names = [b.const(p[k], base=f"bn_{k}", norm=True) for k in ("scale", "bias", "mean", "var")]
    y = b.node("BatchNormalization", [t.name, *names], base="bn", epsilon=eps)
    _register(b, "BatchNorm", y)
    b.steps.append(f"BatchNorm(rank {t.rank}, eps {eps:g}{', extreme' if extreme else ''})")
    return b.add(y, t.shape, t.layout)


def act_layernorm(b: Builder, draw, t: Tensor, extreme: bool) -> Tensor | None:
    axes_choices = [-1] if t.last_axis else []
    if t.rank >= 3:
        axes_choices += [-2] if t.layout == "cl" else [1, -1]
    if t.rank == 4:
        axes_choices += [2]
    if not axes_choices:
        return None
    axis = draw(st.sampled_from(axes_choices))
    norm_shape = t.shape[axis:]
    n = int(np.prod(norm_shape))
    p = {"scale": b.stats(draw, "gain", n, extreme).reshape(norm_shape)}
    with_bias = draw(st.booleans())
    if with_bias:
        p["bias"] = b.stats(draw, "bias", n, extreme).reshape(norm_shape)
    from_input = draw(st.integers(0, 11)) == 0
    b.plant_bad(draw, p, None, "LayerNormalization", exclude="scale" if from_input else None)
    eps = b.eps(draw, extreme)
    inputs = [t.name, b.param_input(p["scale"]) if from_input else b.const(p["scale"], base="ln_scale", norm=True)]
    if with_bias:
        inputs.append(b.const(p["bias"], base="ln_bias", norm=True))
    y = b.node("LayerNormalization", inputs, base="ln", axis=axis, epsilon=eps)
    _register(b, "LayerNorm", y)
    b.steps.append(f"LayerNorm(axis {axis}{', bias' if with_bias else ''}, eps {eps:g}{', extreme' if extreme else ''})")
    return b.add(y, t.shape, t.layout)


CANONICAL_ANY_AXIS = ("UnifiedNorm", "DynamicTanh")  # channel axis 1 or last
CANONICAL_LAST_AXIS = ("PowerNorm", "GroupScaling", "RMSNorm", "CRMSNorm", "ScaleNorm")


def act_canonical(b: Builder, draw, t: Tensor, extreme: bool, op: str) -> Tensor | None:
    """The canonical normdeploy::``op`` on an axis it supports for this layout."""
    if op in CANONICAL_LAST_AXIS and not t.last_axis:
        return None
    c = t.shape[-1] if op not in CANONICAL_ANY_AXIS else None
    attrs: dict = {}
    if op in ("UnifiedNorm", "DynamicTanh"):
        axis = -1 if t.last_axis and (t.layout == "cl" or draw(st.booleans())) else 1
        attrs["axis"] = axis
        c = t.shape[axis]
    if op in ("PowerNorm", "GroupScaling"):
        attrs["groups"] = draw(st.sampled_from(_divisors(c)))
    if op != "DynamicTanh":
        attrs["epsilon"] = b.eps(draw, extreme)
    params: dict[str, np.ndarray]
    statistic = None
    if op == "UnifiedNorm":
        params = {"R": b.stats(draw, "var", c, extreme), "W": b.stats(draw, "gain", c, extreme),
                  "B": b.stats(draw, "bias", c, extreme)}
        statistic = "R"
    elif op == "PowerNorm":
        params = {"Phi": b.stats(draw, "var", c, extreme), "W": b.stats(draw, "gain", c, extreme),
                  "B": b.stats(draw, "bias", c, extreme)}
        statistic = "Phi"
    elif op == "GroupScaling":
        params = {}
    elif op in ("RMSNorm", "CRMSNorm"):
        params = {"G": b.stats(draw, "gain", c, extreme)}
    elif op == "ScaleNorm":
        g = draw(st.sampled_from(["sqrt_c", "sqrt_c", "zero", "negative", "huge"])) if extreme else "sqrt_c"
        val = {"sqrt_c": np.sqrt(c), "zero": 0.0, "negative": -np.sqrt(c), "huge": 1e2 * np.sqrt(c)}[g]
        params = {"G": np.asarray(val).reshape(draw(st.sampled_from([(), (1,)])))}
    else:  # DynamicTanh
        alpha = draw(st.sampled_from([0.5, 0.5, 1.7, 1e-4, 50.0, -0.8, 0.0])) if extreme else 0.5
        params = {"Alpha": np.asarray(alpha), "W": b.stats(draw, "gain", c, extreme),
                  "B": b.stats(draw, "bias", c, extreme)}
        if draw(st.integers(0, 3)) == 0:
            params["W"], params["B"] = np.ones(c), np.zeros(c)  # the plugin's Plain variant
    from_input = draw(st.sampled_from([k for k in params if k not in ("R", "Phi")] or [None])) \
        if params and draw(st.integers(0, 11)) == 0 else None
    if params:
        b.plant_bad(draw, params, statistic, op, exclude=from_input)
    names = [b.param_input(v) if k == from_input else b.const(v, base=f"{op.lower()}_{k.lower()}", norm=True)
             for k, v in params.items()]
    y = b.node(op, [t.name, *names], domain=ND, base=op.lower(), **attrs)
    _register(b, op, y)
    b.steps.append(f"{op}({', '.join(f'{k}={v}' for k, v in attrs.items())}{', extreme' if extreme else ''})")
    return b.add(y, t.shape, t.layout)


def _divided_by_sqrt(b: Builder, draw, num: str, s: str) -> str:
    """num / sqrt(s) in one of the spellings the recognizers accept."""
    form = draw(st.sampled_from(["div", "reciprocal", "one_over", "pow"]))
    if form == "div":
        return b.node("Div", [num, b.node("Sqrt", [s])])
    if form == "reciprocal":
        return b.node("Mul", [num, b.node("Reciprocal", [b.node("Sqrt", [s])])])
    if form == "one_over":
        return b.node("Mul", [num, b.node("Div", [b.const(1.0, norm=True), b.node("Sqrt", [s])])])
    return b.node("Mul", [num, b.node("Pow", [s, b.const(-0.5, norm=True)])])


def _square(b: Builder, draw, x: str) -> str:
    if draw(st.booleans()):
        return b.node("Pow", [x, b.const(2.0, norm=True)])
    return b.node("Mul", [x, x])


def act_decomposed_layernorm(b: Builder, draw, t: Tensor, extreme: bool) -> Tensor | None:
    if t.last_axis:
        axes, pshape = [-1], (t.shape[-1],)
    elif t.rank >= 3:  # channels-first LayerNorm (ConvNeXt): statistics over axis 1
        axes, pshape = [1], (t.channels,) + (1,) * (t.rank - 2)
    else:
        return None
    n = pshape[0]
    mean = b.reduce_mean(t.name, axes)
    d = b.node("Sub", [t.name, mean])
    d2 = b.node("Sub", [t.name, mean]) if draw(st.integers(0, 3)) == 0 else d
    var = b.reduce_mean(_square(b, draw, d2), axes)
    eps = b.eps(draw, extreme, in_graph=True)
    e = b.const(eps, norm=True)
    s = b.node("Add", [var, e] if draw(st.booleans()) else [e, var])
    y = _divided_by_sqrt(b, draw, d, s)
    gain, bias = draw(st.booleans()), draw(st.booleans())
    if gain:
        y = b.node("Mul", [y, b.const(b.stats(draw, "gain", n, extreme).reshape(pshape), base="g", norm=True)])
    if bias:
        y = b.node("Add", [y, b.const(b.stats(draw, "bias", n, extreme).reshape(pshape), base="b", norm=True)])
    _register(b, "LayerNorm", y, decomposed=True, anchor=f"n_{var}")
    b.steps.append(f"decomposed LayerNorm(axes {axes}{', gain' if gain else ''}{', bias' if bias else ''}, eps {eps:g})")
    return b.add(y, t.shape, t.layout)


def act_decomposed_rmsnorm(b: Builder, draw, t: Tensor, extreme: bool) -> Tensor | None:
    if not t.last_axis:
        return None
    c = t.shape[-1]
    ms = b.reduce_mean(_square(b, draw, t.name), [-1])
    eps = b.eps(draw, extreme, in_graph=True)
    s = b.node("Add", [ms, b.const(eps, norm=True)])
    where = draw(st.sampled_from(["none", "pre", "post"]))
    num = t.name
    g = b.stats(draw, "gain", c, extreme)
    if where == "pre":
        num = b.node("Mul", [t.name, b.const(g, base="g", norm=True)])
    y = _divided_by_sqrt(b, draw, num, s)
    if where == "post":
        y = b.node("Mul", [y, b.const(g, base="g", norm=True)])
    _register(b, "RMSNorm", y, decomposed=True, anchor=f"n_{ms}")
    b.steps.append(f"decomposed RMSNorm(gain {where}, eps {eps:g})")
    return b.add(y, t.shape, t.layout)


def act_mpbn(b: Builder, draw, t: Tensor, extreme: bool) -> Tensor | None:
    """Membrane-potential BN and a firing threshold: spike = [BN(u) rel theta], then maybe u * (1 - spike)."""
    if t.layout != "cf":
        return None
    c = t.channels
    gains = draw(st.sampled_from(["positive", "negative", "mixed", "some_zero"]))  # the sign of gamma is the fold's crux
    base = b.rng.uniform(0.5, 1.5, c)
    g = {"positive": base, "negative": -base, "mixed": base * b.rng.choice([-1.0, 1.0], c),
         "some_zero": base * b.rng.choice([-1.0, 0.0, 1.0], c)}[gains]
    p = {"scale": g, "bias": b.stats(draw, "bias", c, False), "mean": b.stats(draw, "mean", c, extreme),
         "var": b.stats(draw, "var", c, extreme)}
    b.plant_bad(draw, p, "var", "BatchNormalization (MPBN)")
    eps = b.eps(draw, extreme)
    names = [b.const(p[k], base=f"bn_{k}", norm=True) for k in ("scale", "bias", "mean", "var")]
    y = b.node("BatchNormalization", [t.name, *names], base="bn", epsilon=eps)
    _register(b, "BatchNorm", y)
    per_channel = draw(st.booleans())
    theta_v = b.rng.standard_normal(_channel_shape(t)) * 0.5 + 0.5 if per_channel else np.asarray(0.5)
    theta = b.const(theta_v, base="theta", norm=True)
    form = draw(st.sampled_from(["sub_greater", "sub_greater", "greater", "ge", "less", "le", "theta_minus"]))
    if form == "sub_greater":
        cmp = b.node("Greater", [b.node("Sub", [y, theta]), b.const(0.0, norm=True)])
    elif form == "theta_minus":
        cmp = b.node("Less", [b.node("Sub", [theta, y]), b.const(0.0, norm=True)])
    else:
        op = {"greater": "Greater", "ge": "GreaterOrEqual", "less": "Less", "le": "LessOrEqual"}[form]
        cmp = b.node(op, [y, theta] if draw(st.booleans()) else [theta, y])
    spike = b.node("Cast", [cmp], to=b.elem)
    b.meta["spikes"].append({"pre": y, "theta": theta, "bn": f"n_{y}"})
    b.steps.append(f"MPBN({form}, gamma {gains}, theta {'per-channel' if per_channel else 'scalar'})")
    out = b.add(spike, t.shape, t.layout)
    if draw(st.booleans()):  # LIF state update: reads the un-normalized potential u
        keep = b.node("Sub", [b.const(1.0), spike])
        b.steps.append("u * (1 - spike)")
        return b.add(b.node("Mul", [t.name, keep]), t.shape, t.layout)
    return out


def act_preln_block(b: Builder, draw, t: Tensor, extreme: bool) -> Tensor | None:
    """A pre-LN residual stream: h = write(x); h = h + proj(LN(h)) once or twice; then maybe a final LN."""
    if t.layout != "cl" or t.rank != 3:
        return None
    d = t.shape[-1]
    h = t.name
    if t.name in {i.name for i in b.inputs} or draw(st.booleans()):  # an embedding-like write into the stream
        h = b.node("MatMul", [h, b.weight(draw, (d, d), 1.0 / np.sqrt(d))])
        if draw(st.booleans()):
            h = b.node("Add", [h, b.const(b.rng.standard_normal(d) * 0.5, base="bias")])
        b.add(h, t.shape, "cl")
    blocks = draw(st.integers(1, 2))
    for _ in range(blocks):
        x = b.node("LayerNormalization", [h, b.const(b.stats(draw, "gain", d, extreme), base="ln_scale", norm=True),
                                          b.const(b.stats(draw, "bias", d, extreme), base="ln_bias", norm=True)],
                   base="ln", axis=-1, epsilon=b.eps(draw, extreme))
        _register(b, "LayerNorm", x)
        b.add(x, t.shape, "cl")
        if draw(st.booleans()):
            y = b.node("MatMul", [x, b.weight(draw, (d, d), 1.0 / np.sqrt(d))])
        else:
            y = b.node("Relu", [b.node("MatMul", [x, b.weight(draw, (d, 2 * d), 1.0 / np.sqrt(d))])])
            y = b.node("MatMul", [y, b.weight(draw, (2 * d, d), 1.0 / np.sqrt(2 * d))])
        if draw(st.booleans()):
            y = b.node("Add", [y, b.const(b.rng.standard_normal(d) * 0.5, base="bias")])
        b.add(y, t.shape, "cl")
        h = b.node("Add", [h, y] if draw(st.booleans()) else [y, h])
        b.add(h, t.shape, "cl")
    final = draw(st.booleans())
    if final:
        h = b.node("LayerNormalization", [h, b.const(b.stats(draw, "gain", d, extreme), base="ln_scale", norm=True)],
                   base="ln", axis=-1, epsilon=b.eps(draw, extreme))
        _register(b, "LayerNorm", h)
    b.steps.append(f"pre-LN stream ({blocks} block{'s' if blocks > 1 else ''}{', final LN' if final else ''}"
                   f"{', extreme' if extreme else ''})")
    return b.add(h, t.shape, "cl") if final else b.pool[-1]


def _canonical(op: str):
    def act(b, draw, t, extreme):
        return act_canonical(b, draw, t, extreme, op)
    act.__name__ = f"act_{op}"
    return act


#: group -> [(applies to tensor t, action)]; an action may still return None (then another is tried)
ACTIONS = {
    "linear": [(lambda t: t.layout == "cf" and t.rank in (3, 4), act_conv),
               (lambda t: t.layout == "cf" and t.rank in (3, 4) and max(t.shape[2:]) <= 3, act_conv_transpose),
               (lambda t: t.rank == 2, act_gemm),
               (lambda t: t.last_axis, act_matmul)],
    "other": [(lambda t: True, act_unary), (lambda t: True, act_const_elementwise), (lambda t: True, act_binary),
              (lambda t: True, act_mover), (lambda t: True, act_mover)],
    "norm": [(lambda t: t.layout == "cf", act_batchnorm),
             (lambda t: t.last_axis or t.rank >= 3, act_layernorm),
             (lambda t: t.last_axis or t.rank >= 3, act_decomposed_layernorm),
             (lambda t: t.last_axis, act_decomposed_rmsnorm),
             (lambda t: t.layout == "cf", act_mpbn),
             (lambda t: t.layout == "cl" and t.rank == 3, act_preln_block)]
    + [(lambda t: True, _canonical(op)) for op in CANONICAL_ANY_AXIS]
    + [(lambda t: t.last_axis, _canonical(op)) for op in CANONICAL_LAST_AXIS],
}


# ----------------------------------------------------------------------------- the strategy

def _input(b: Builder, draw, index: int, dynamic: bool) -> Tensor:
    kind = draw(st.sampled_from(["cf4", "cf4", "cl3", "cl3", "flat", "flat", "cf3"]))
    shape = {"cf4": (2, draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([2, 3])), draw(st.sampled_from([2, 3]))),
             "cl3": (2, draw(st.sampled_from([2, 3])), draw(st.sampled_from([4, 6, 8]))),
             "flat": (2, draw(st.sampled_from([3, 4, 6, 8]))),
             "cf3": (2, draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([2, 3, 4])))}[kind]
    name = f"x{index}"
    dims = (["N"] if dynamic else [shape[0]]) + list(shape[1:])
    b.inputs.append(helper.make_tensor_value_info(name, b.elem, dims))
    b.steps.append(f"input {name} {kind} {list(dims)}")
    t = Tensor(name, shape, "cl" if kind == "cl3" else "cf")
    b.pool.append(t)
    b.meta["data"].append(name)
    return t


@st.composite
def graphs(draw, max_steps: int = 7) -> Case:
    """A random small graph with normalizations (module docstring); ``max_steps`` actions after the inputs."""
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float32, np.float16]))
    opset = draw(st.sampled_from([17, 18, 20]))
    b = Builder(dtype, opset, draw(st.integers(0, 2**16)))
    b.want_bad = draw(st.integers(0, 9)) == 0
    dynamic = draw(st.booleans())
    for i in range(draw(st.integers(1, 2))):
        _input(b, draw, i, dynamic)
    n_steps = draw(st.integers(1, max_steps))
    placed_norm, follow = False, None
    for step in range(n_steps):
        last = step == n_steps - 1
        if follow is not None:  # a linear layer reading the normalization just placed (a fold to try)
            t, group, follow = follow, "linear", None
        else:
            # favour recent tensors (chains), but any earlier tensor may be read again (fan-out)
            t = b.pool[-1] if draw(st.integers(0, 2)) else draw(st.sampled_from(b.pool))
            group = draw(st.sampled_from(["norm", "norm", "linear", "linear", "other"]))
        if last and not placed_norm:
            group = "norm"
        extreme = group == "norm" and draw(st.integers(0, 2)) == 0
        candidates = [act for applies, act in ACTIONS[group] if applies(t)] or [act_unary]
        while candidates:  # draw an action that applies to t's layout; another if it declines
            act = draw(st.sampled_from(candidates))
            out = act(b, draw, t, extreme) if group == "norm" else act(b, draw, t)
            if out is not None:
                if group == "norm":
                    placed_norm = True
                    if not last and draw(st.integers(0, 2)):
                        follow = out
                break
            candidates.remove(act)
    # graph outputs: every tensor nobody reads, plus sometimes one in the middle
    outputs = [t.name for t in b.pool if not b.readers.get(t.name) and t.name not in {i.name for i in b.inputs}]
    middle = [t.name for t in b.pool if b.readers.get(t.name) and t.name not in outputs
              and t.name not in {i.name for i in b.inputs}]
    if middle and draw(st.integers(0, 2)) == 0:
        extra = draw(st.sampled_from(middle))
        outputs.append(extra)
        b.meta["outputs_middle"].append(extra)
        b.steps.append(f"graph output in the middle: {extra}")
    if not outputs:  # only possible when every tensor is read: keep the last one
        outputs = [b.pool[-1].name]
    shapes = {t.name: t.shape for t in b.pool}
    out_vis = [helper.make_tensor_value_info(o, b.elem, (["N"] if dynamic else [shapes[o][0]]) + list(shapes[o][1:]))
               for o in outputs]
    graph = helper.make_graph(b.nodes, "fuzz", b.inputs, out_vis, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="normdeploy-fuzz")
    model.ir_version = 8 if opset < 21 else 10
    ops.attach_functions(model)
    model = onnx.shape_inference.infer_shapes(model)
    b.meta["steps"] = b.steps
    model.metadata_props.add(key=META_KEY, value=json.dumps(b.meta))
    return Case(model, b.meta, b.steps)

