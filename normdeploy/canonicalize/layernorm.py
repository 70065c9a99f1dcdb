"""Recognize decomposed LayerNorm and rewrite it to one ONNX ``LayerNormalization`` (DESIGN.md 2).

Math: over the normalized axes A of x (per token / per pixel),

    y = g * (x - mean_A(x)) / sqrt(mean_A((x - mean_A(x))^2) + eps) + b

which is ``LayerNormalization(x, scale=g, bias=b, axis, epsilon)`` when A is the
trailing axes ``axis .. rank-1``. Spellings recognized (``d = x - mean``, ``s = var + eps``)::

    x ──> ReduceMean ──> mean                        (axes attribute, opset < 18,
    x, mean ──> Sub ──> d                              or axes input, opset >= 18)
    d ──> Pow(., 2) | Mul(d, d) ──> ReduceMean ──> var
    var ──> Add(eps) ──> s
          s ──> Sqrt ──> Div(d, .) ─────────────┐
          s ──> Sqrt ──> Reciprocal ──> Mul(d, .) ┤
          s ──> Sqrt ──> Div(1, .) ──> Mul(d, .)  ┤   (TorchScript's rsqrt)
          s ──> Pow(., -0.5) ──> Mul(d, .) ──────┤
                                                 └──> [Mul(g)] ──> [Add(b)] ──> y

Each mean (and the variance) may be written in any spelling of
:func:`normdeploy.canonicalize.statistics.mean_over`: ``ReduceMean(keepdims=1)``;
``ReduceMean(keepdims=0)`` put back by ``Unsqueeze`` (``x.mean(-1)[..., None]``) or by a
``Reshape`` [+ ``Expand``] of its symbolic shape (``torch.var`` / ``var_mean`` under the dynamo
exporter and ``torch.export``); ``ReduceSum`` divided by N (``var_mean``'s mean). torch's
exporters may emit ``x - mean`` twice (one Sub for the numerator, one for the variance), even
with two ReduceMeans whose axes read ``[2]`` and ``[-1]``: both are accepted when they reduce
the same axes of the same x. Two more variances are recognized::

    clamp(mean(x^2) - mean(x)^2, 0)          timm ``_layer_norm_cf_sqm`` (Clip, Max or Relu):
                                             the same function (a variance is >= 0); the
                                             canonical node computes it in two passes, which
                                             rounds no worse than the one-pass original
    mean((x - mean)^2) * N / (N - 1)         ``torch.var`` unbiased (the default): with c = N/(N-1),
                                             1 / sqrt(c var + eps) = c^-1/2 / sqrt(var + eps / c),
                                             so epsilon = eps / c and the gain g c^-1/2 (float64) Casts whose source and
target types are equal (``x.to(torch.float32)`` on a float32 x) are looked through. A
mixed-precision spelling keeps its real Casts: ``Cast(x, float32)`` feeds the match as x,
and a Cast between the normalized product and the gain keeps the gain outside
(scale = ones; folding it across the Cast would change the rounding).

Channels-first LayerNorm (ConvNeXt: mean and variance over axis 1 of NCHW, gain and
bias shaped [C, 1, 1]) becomes::

    x ──> Transpose(0, 2, .., r-1, 1) ──> LayerNormalization(axis=-1)
      ──> Transpose(0, r-1, 1, .., r-2) ──> y

Exact: the replacement computes the same expression (up to float rounding: the
statistics are computed by one kernel). On a float16 / bfloat16 x the LayerNormalization
runs on ``Cast(x, float32)`` with float32 parameters and is cast back (ONNX Runtime's
float16 CPU kernel computes the variance in one pass; see :func:`_rewrite_layernorm`).

Conditions (each failure is a skip reason): the model's opset is at least 17; epsilon,
gain and bias are known before run time (constants, constant expressions such as
``Add(Cast(w), 1)``, or shape arithmetic of static dimensions); mean and variance reduce
over the same axes, kept as unit axes (a Reshape / Unsqueeze back puts back exactly those);
a sum is divided by exactly the number of elements it adds; a Bessel factor is a known
positive number; a Clip of the one-pass variance has no finite upper bound; those axes are the trailing ones (or axis 1 of a tensor of rank >= 3); the
gain and bias vary only along the normalized axes, whose sizes are static; no
intermediate tensor (mean, d, variance, ...) is a graph output or is read by a node
outside the match (a ``Shape`` that only computes the match's own Reshape target is not). The output tensor keeps its name.

Patterns are written in the small pattern language of :mod:`normdeploy.core.pattern`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

from ..core.graph import Namer, add_node, constant, opset_of, rank_of
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
    static_shape,
    strip_noop,
    take_over,
)
from .statistics import (
    known_value,
    mean_axes,
    mean_over,
    number_of,
    outside_reader,
    restored,
    scalar_value,
    statistics_label,
)

# ----------------------------------------------------------------------------- LayerNorm

X = Var("x")
#: the mean of the numerator's ``x - mean`` and the one inside the variance may be two nodes (the dynamo
#: exporter writes ``x.mean(-1)`` and ``torch.var``'s own mean with axes [-1] and [2]): bound apart, checked equal
MEAN = mean_over(X, "mean")
CENTRED = op("Sub", X, MEAN)
VAR_CENTRED = op("Sub", X, mean_over(X, "vmean"))
SQUARED = any_of(op("Pow", VAR_CENTRED, Lit(2.0)), op("Mul", VAR_CENTRED, VAR_CENTRED))
#: the one-pass variance of timm's ``_layer_norm_cf_sqm``: ``clamp(E[x^2] - E[x]^2, 0)``
ONE_PASS = op("Sub", mean_over(any_of(op("Pow", X, Lit(2.0)), op("Mul", X, X)), "var"),
              any_of(op("Mul", mean_over(X, "vmean"), mean_over(X, "vmean")), op("Pow", mean_over(X, "vmean"), Lit(2.0))))
#: torch.var's default, the unbiased variance: ``mean * N / (N - 1)`` (N from ``Shape`` at run time)
UNBIASED = op("Div", op("Mul", op("ReduceMean", SQUARED, name="var", extra_inputs=True), Var("bessel_n")),
              Var("bessel_d"), name="bessel")
VARIANCE = any_of(
    mean_over(SQUARED, "var"),
    restored(UNBIASED, "var"),
    op("Clip", ONE_PASS, Lit(0.0), name="clamp", extra_inputs=True),
    op("Max", ONE_PASS, Lit(0.0), name="clamp"),
    op("Relu", ONE_PASS, name="clamp"),
)
VAR_EPS = op("Add", VARIANCE, Var("eps"))
NORMALIZED = divided_by_sqrt(CENTRED, VAR_EPS)
LAYERNORM = any_of(
    op("Add", op("Mul", NORMALIZED, Var("g")), Var("b")),
    op("Mul", NORMALIZED, Var("g")),
    op("Add", NORMALIZED, Var("b")),
    NORMALIZED,
)
#: what counts as a LayerNorm candidate: a mean (or sum) of squares of x - mean(x)
CANDIDATE = any_of(op("ReduceMean", SQUARED, name="var", extra_inputs=True),
                   op("ReduceSum", SQUARED, name="var", extra_inputs=True))


@dataclass
class LayerNormPlan:
    x: ir.Value
    axis: int  # negative: LayerNormalization normalizes axis .. rank-1
    epsilon: float
    scale: np.ndarray
    bias: np.ndarray | None
    channels_first_rank: int | None = None  # set: normalize axis 1 through Transposes


def _trailing_param(v: np.ndarray, norm_shape: list[int], rank: int | None, what: str) -> np.ndarray | str:
    """Gain or bias ``v`` (broadcast against x) as a tensor of the normalized shape."""
    k = len(norm_shape)
    if v.ndim > (rank if rank is not None else k):
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    lead = v.shape[:max(0, v.ndim - k)]
    if any(d != 1 for d in lead):
        return f"{what} of shape {list(v.shape)} varies along an axis that is not normalized"
    tail = v.reshape(v.shape[len(lead):])
    tail = tail.reshape((1,) * (k - tail.ndim) + tail.shape)
    if any(t not in (1, n) for t, n in zip(tail.shape, norm_shape)):
        return f"{what} of shape {list(v.shape)} does not broadcast to the normalized shape {norm_shape}"
    return np.broadcast_to(tail, norm_shape)


def _channel_param(v: np.ndarray, channels: int, rank: int, what: str) -> np.ndarray | str:
    """Gain or bias ``v`` of a channels-first norm as a [C] vector."""
    if v.ndim > rank:
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    padded = (1,) * (rank - v.ndim) + v.shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1) or padded[1] not in (1, channels):
        return f"{what} of shape {list(v.shape)} is not per-channel on axis 1"
    return np.broadcast_to(v.reshape(-1), (channels,))


def _param(m: Match, name: str, what: str) -> np.ndarray | str | None:
    """The value of the gain or bias bound as ``name`` (None if the spelling has none), or why it is not known."""
    if name not in m.bound:
        return None
    v = known_value(m.bound[name])
    if v is None:
        return f"{what} {m.bound[name].name} is not a constant"
    if v.dtype.kind != "f":
        return f"{what} {m.bound[name].name} is not a float tensor"
    return v


def _statistic_axes(m: Match, x: ir.Value) -> list[int] | str:
    """The axes of the mean and of the variance (one list: they must agree), or why they do not."""
    axes = {}
    for name in ("mean", "vmean", "var"):
        a = mean_axes(m, name, x)
        if isinstance(a, str):
            return a
        axes[name] = a
    mean, inner, var = axes.values()
    if mean != var:
        return f"mean and variance reduce over different axes ({mean} vs {var})"
    if inner != mean:
        return f"the variance centres x with a mean over axes {inner}, not the normalized axes {mean}"
    clamp = m.bound.get("clamp")
    if clamp is not None and clamp.op_type == "Clip" and len(clamp.inputs) > 2 and clamp.inputs[2] is not None:
        hi = known_value(clamp.inputs[2])
        if hi is None or hi.size != 1 or not np.isposinf(hi.reshape(-1)[0]):
            return f"Clip {clamp.name} bounds the one-pass variance from above: not a variance"
    return mean


def _plan_layernorm(graph: ir.Graph, m: Match) -> LayerNormPlan | str:
    opset = opset_of(graph)
    if opset is not None and opset < 17:
        return f"model opset {opset} has no LayerNormalization (needs opset 17)"
    eps = scalar_value(m.bound["eps"], "epsilon")
    if isinstance(eps, str):
        return eps
    x = strip_noop(m.bound["x"])  # a no-op Cast (x.float() on float32) is not the norm's input
    rank = rank_of(x)
    axes = _statistic_axes(m, x)
    if isinstance(axes, str):
        return axes
    g, b = _param(m, "g", "gain"), _param(m, "b", "bias")
    for p in (g, b):
        if isinstance(p, str):
            return p
    dtype = dtype_of(x) or (g.dtype if g is not None else np.dtype(np.float32))
    if "bessel" in m.bound:  # var' = c var: 1 / sqrt(c var + eps) = c^-1/2 / sqrt(var + eps / c)
        n, d = number_of(m.bound["bessel_n"]), number_of(m.bound["bessel_d"])
        if n is None or d is None or not n / d > 0:
            return f"variance {m.bound['var'].name} is scaled by a factor that is not a known positive number"
        var_scale = n / d
        eps = float(np.float32(np.float64(eps) / var_scale))
        g = (np.float64(1.0) if g is None else g.astype(np.float64)) / np.sqrt(var_scale)
    k = len(axes)
    shape = static_shape(x)
    if axes == list(range(-k, 0)):
        norm_shape = shape[-k:] if shape is not None else None
        if norm_shape is None or None in norm_shape:
            return f"normalized dimensions of {x.name} are not static (LayerNormalization needs a full scale)"
        scale = np.ones(norm_shape, dtype) if g is None else _trailing_param(g, norm_shape, rank, "gain")
        bias = None if b is None else _trailing_param(b, norm_shape, rank, "bias")
        cf_rank = None
    elif rank is not None and rank >= 3 and axes == [1 - rank]:
        channels = shape[1]
        if channels is None:
            sizes = [v.size for v in (g, b) if v is not None and v.size > 1]
            if not sizes:
                return f"channel dimension of {x.name} is not static"
            channels = sizes[0]
        scale = np.ones(channels, dtype) if g is None else _channel_param(g, channels, rank, "gain")
        bias = None if b is None else _channel_param(b, channels, rank, "bias")
        k, cf_rank = 1, rank
    else:
        return (f"mean and variance reduce over axes {axes}, neither the trailing axes nor axis 1 "
                f"(channels-first) of a rank-{rank} tensor")
    for p in (scale, bias):
        if isinstance(p, str):
            return p
    reason = outside_reader(m)
    if reason:
        return reason
    return LayerNormPlan(x, -k, eps, np.ascontiguousarray(scale, dtype),
                         None if bias is None else np.ascontiguousarray(bias, dtype), cf_rank)


def _label(m: Match, plan: LayerNormPlan) -> str:
    forms = ["channels-first"] if plan.channels_first_rank is not None else []
    if "clamp" in m.bound:
        forms.append("one-pass variance clamp(E[x^2] - E[x]^2, 0)")
    if "bessel" in m.bound:
        forms.append("unbiased variance (x N/(N-1), folded into eps and gain)")
    stats = statistics_label(m, ("mean", "vmean", "var"))
    return ", ".join(forms + ([stats] if stats else []))


#: element types whose LayerNormalization runs on a float32 copy (see :func:`_rewrite_layernorm`)
_HALF = {np.dtype(np.float16): TensorProto.FLOAT16}
try:  # bfloat16 where numpy knows it (ml_dtypes)
    import ml_dtypes

    _HALF[np.dtype(ml_dtypes.bfloat16)] = TensorProto.BFLOAT16
except ImportError:  # pragma: no cover
    pass


def _rewrite_layernorm(graph: ir.Graph, m: Match, plan: LayerNormPlan, namer: Namer) -> tuple[str, str, str]:
    """The canonical LayerNormalization (through Transposes for channels-first).

    On a float16 / bfloat16 x it runs on ``Cast(x, float32)`` with float32 parameters (the half values,
    exactly) and its output is cast back: ONNX Runtime's float16 CPU kernel computes the variance in one
    pass, E[x^2] - E[x]^2, which loses the digits of a small std against a large mean (the fuzzer's
    fp16_layernorm_recognized_one_pass_variance: 0.5 % off, up to 10 %); in float32 it rounds no worse
    than the float16 original.
    """
    root = m.nodes[0]
    base = root.name or "layernorm"
    half = _HALF.get(dtype_of(plan.x))
    scale, bias = plan.scale, plan.bias
    if half is not None:
        scale, bias = scale.astype(np.float32), None if bias is None else bias.astype(np.float32)
    params = [constant(namer, base, "ln_scale", scale)]
    if bias is not None:
        params.append(constant(namer, base, "ln_bias", bias))
    attrs = {"axis": plan.axis, "epsilon": plan.epsilon}
    x = plan.x
    if half is not None:
        x = add_node(namer, "Cast", [x], base=base, suffix="to_float32", attrs={"to": int(TensorProto.FLOAT)}).outputs[0]
    r = plan.channels_first_rank
    if r is not None:
        to_last = [0, *range(2, r), 1]
        x = add_node(namer, "Transpose", [x], base=base, suffix="to_channels_last", attrs={"perm": to_last}).outputs[0]
    ln = add_node(namer, "LayerNormalization", [x, *params], base=base, attrs=attrs)
    y = ln.outputs[0]
    if r is not None:
        to_first = [0, r - 1, *range(1, r - 1)]
        y = add_node(namer, "Transpose", [y], base=base, suffix="to_channels_first", attrs={"perm": to_first}).outputs[0]
    if half is not None:
        y = add_node(namer, "Cast", [y], base=base, suffix="from_float32", attrs={"to": int(half)}).outputs[0]
    take_over(root, y)
    in32 = " on a float32 copy" if half is not None else ""
    if r is None:
        what = f"decomposed LayerNorm ending at {root.name} -> LayerNormalization {ln.name} (axis {plan.axis}){in32}"
    else:
        what = (f"channels-first LayerNorm ending at {root.name} -> Transpose, LayerNormalization {ln.name} "
                f"(axis -1){in32}, Transpose")
    return what, ln.name, _label(m, plan)


LAYERNORM_RECOGNIZER = Recognizer(
    pattern=LAYERNORM,
    anchor="var",
    root_ops=frozenset({"Add", "Mul", "Div"}),
    plan=_plan_layernorm,
    rewrite=_rewrite_layernorm,
    candidate=CANDIDATE,
    candidate_ops=frozenset({"ReduceMean", "ReduceSum"}),
    incomplete="variance of x - mean(x) is not followed by a recognized LayerNorm spelling "
               "(Add eps, Sqrt, Div / Reciprocal+Mul, or Pow -0.5)",
)


def recognize_layernorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite decomposed LayerNorm (trailing axes, or channels-first axis 1) to ONNX LayerNormalization."""
    LAYERNORM_RECOGNIZER.run(graph, result)
