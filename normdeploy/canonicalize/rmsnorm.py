"""Recognize RMSNorm spellings and rewrite them to the canonical ``normdeploy::RMSNorm`` (DESIGN.md 2).

Math, over the last axis of x:  ``y = g * x / sqrt(mean(x^2) + eps)``  =  ``RMSNorm(X=x, G=g, epsilon=eps)``.

Decomposed spellings recognized (``s = mean(x^2) + eps``)::

    x ──> Pow(., 2) | Mul(x, x) ──> ReduceMean(last axis) ──> Add(eps) ──> s
          s ──> Sqrt ──> Div(x, .) ────────────────┐
          s ──> Sqrt ──> Reciprocal ──> Mul(x, .) ──┤  torch.rsqrt, nn.RMSNorm (dynamo, opset < 23)
          s ──> Sqrt ──> Div(1, .) ──> Mul(x, .) ───┤  torch.rsqrt (TorchScript exporter)
          s ──> Pow(., -0.5) ──> Mul(x, .) ─────────┤
                                                    └──> [Mul(g)] ──> y

where the mean of squares is any spelling of :func:`normdeploy.canonicalize.statistics.mean_over`
(``keepdims=0`` and an ``Unsqueeze`` back: bzhangGo/rmsnorm's Theano ``rln``,
``(x * x).mean(1)[:, None]``; a ``Reshape`` back; ``ReduceSum / N``), over the last axis or over
axis 1 of a rank >= 3 tensor (channels-first: timm's ``RmsNorm2d`` / ``rms_norm2d``, the
``convnext_*_rms`` models), which becomes::

    x ──> Transpose(0, 2, .., r-1, 1) ──> RMSNorm ──> Transpose(0, r-1, 1, .., r-2) ──> y

The gain is a constant or a constant expression (Gemma's ``1 + w`` before the exporter
folds it: ``Add(Cast(w), 1)``), either after the product (``Mul(Mul(x, r), g)``, either
operand order) or before it (``Mul(Mul(x, g), r)``, ``Div(Mul(g, x), sqrt)``). ONNX Runtime fuses none of
these Pow/Sqrt/Reciprocal chains; the canonical node is what lowering turns into
RMSNormalization, SimplifiedLayerNormalization or a plugin.

Casts: a Cast whose source and target types are equal is looked through. In a
mixed-precision export (HF Llama on float16: ``Cast(x, float32)`` feeds the statistics
and the product, ``Cast(., float16)`` follows) x is the float32 Cast output, so the
statistics stay in float32; a real Cast between the product and the gain keeps the gain
outside the canonical node (G = ones), since folding it across the Cast changes rounding.

Opset-23 ``RMSNormalization(X, scale, axis=-1, epsilon, stash_type=1)`` becomes
``RMSNorm(X, scale)`` on a float32 X; on a float16 / bfloat16 X (onnxscript's optimizer
fuses the float16 Llama spelling into it) the ONNX definition is kept to the letter::

    X ──> Cast(float32) ──> RMSNorm(G = ones) ──> Cast(X's type) ──> Mul(scale) ──> Y

Exact (up to float rounding of the reordered products; the Transposes move data only).
Conditions (each failure is a skip reason): epsilon and the gain are known before run
time, the gain varies only along the normalized axis; the mean of squares reduces the last
axis only or axis 1 of a rank >= 3 tensor, kept as a unit axis; without a gain the
normalized dimension is static (G = ones of it); no intermediate tensor is a graph output
or read outside the match (a Shape computing the match's own Reshape target excepted); the
output keeps its name. A mean of squares of ``x - mean(x)`` is a LayerNorm and is left to
:mod:`.layernorm`.

bzhangGo/rmsnorm's variants become the canonical node with its variant attributes
(:mod:`normdeploy.core.ops`), exact as above; every consumer reads them (the ONNX Runtime and
TensorRT lowerings write them out as standard ops, the gain folds as any RMSNorm gain)::

    x / (||x_s||_2 k^-1/2 + eps) [* g]   (ReduceL2, Mul(k^-1/2) or Div(sqrt k), Add eps, Div or Reciprocal+Mul)
    x / (sqrt(mean(x_s^2)) + eps) [* g]  -> RMSNorm(x, g, eps_outside=1, partial=k or 0)
    x * rsqrt(mean(x_s^2) + eps) [* g]   -> RMSNorm(x, g, partial=k)

* eps outside the root (rmsnorm_torch.py): ``1 / (r + eps)``, a different function from
  ``1 / sqrt(r^2 + eps')`` for every eps, eps' > 0, hence its own attribute; the 2-norm's scale
  must be k^-1/2 (or a division by sqrt k) to float32 rounding, k the channels of the statistic;
* partial RMSNorm (the same file's ``p``, and rmsnorm_tensorflow.py): ``x_s`` is the first k
  channels of x, taken by ``Split`` (output 0, last axis) or ``Slice`` (start 0, step 1, last
  axis); k = d (p = 1) is the plain statistic; k = 0 (p = 0, the mean of nothing: NaN in the
  module) is refused. Both over the last axis only (no library writes them channels-first).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from ..core.graph import DEFAULT_DOMAINS, Namer, add_node, attr, constant, rank_of, remove_nodes
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult
from ..core.pattern import (
    Lit,
    Match,
    Recognizer,
    Var,
    any_of,
    divided_by_sqrt,
    dtype_of,
    fold,
    match,
    op,
    reduce_axes,
    same_value,
    static_shape,
    strip_noop,
    take_over,
)
from .statistics import known_value, mean_axes, mean_over, outside_reader, scalar_value, statistics_label

X = Var("x")
SQUARES = any_of(op("Pow", X, Lit(2.0)), op("Mul", X, X))
MEAN_SQUARE = mean_over(SQUARES, "ms")
MS_EPS = op("Add", MEAN_SQUARE, Var("eps"))
NUMERATOR = any_of(op("Mul", X, Var("g_pre")), X)
NORMALIZED = divided_by_sqrt(NUMERATOR, MS_EPS)
RMSNORM = any_of(op("Mul", NORMALIZED, Var("g_post")), NORMALIZED)
#: what counts as an RMSNorm candidate: a mean (or sum) of squares
CANDIDATE = op("ReduceMean", SQUARES, name="ms", extra_inputs=True)

# ---- bzhangGo/rmsnorm's variants: the statistic of ``stat_x`` (x itself, or a leading slice of it)
SX = Var("stat_x")
SQUARES_S = any_of(op("Pow", SX, Lit(2.0)), op("Mul", SX, SX))
#: partial RMSNorm with eps inside the root (rmsnorm_tensorflow.py's ``p``): the mean of squares of a slice of x
PARTIAL_INSIDE = divided_by_sqrt(NUMERATOR, op("Add", mean_over(SQUARES_S, "ms"), Var("eps")))
#: eps outside the root (rmsnorm_torch.py): ``x / (||x_s||_2 k^-1/2 + eps)`` or ``x / (sqrt(mean(x_s^2)) + eps)``
_L2 = op("ReduceL2", SX, name="ms", extra_inputs=True)
_RMS = any_of(op("Mul", _L2, Var("k"), name="rms_scale"), op("Div", _L2, Var("k"), name="rms_scale"),
              op("Sqrt", mean_over(SQUARES_S, "ms"), name="root"))
_OUTSIDE = op("Add", _RMS, Var("eps"), name="outside")
EPS_OUTSIDE = any_of(op("Div", NUMERATOR, _OUTSIDE), op("Mul", NUMERATOR, op("Reciprocal", _OUTSIDE)))
VARIANT = any_of(*(any_of(op("Mul", core, Var("g_post")), core) for core in (EPS_OUTSIDE, PARTIAL_INSIDE)))

_CENTRED = op("Sub", Var("a"), mean_over(Var("a"), "centre"))


def _is_centred(t: ir.Value) -> bool:
    """``t`` is ``a - mean(a)``: its RMS is a LayerNorm's standard deviation."""
    return any(True for _ in match(_CENTRED, t, Match()))


@dataclass
class RMSNormPlan:
    x: ir.Value
    gain: np.ndarray | ir.Value
    epsilon: float
    channels_first_rank: int | None = None  # set: normalize axis 1 through Transposes


def _gain_vector(v: np.ndarray, rank: int | None, what: str) -> np.ndarray | str:
    if v.ndim > (rank if rank is not None else 1):
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    if any(d != 1 for d in v.shape[:-1]):
        return f"{what} of shape {list(v.shape)} varies along an axis other than the last"
    return v.reshape(-1)


def _channel_vector(v: np.ndarray, rank: int, what: str) -> np.ndarray | str:
    """A channels-first gain (``[C, 1, 1]``, ``[1, C, 1, 1]`` or a scalar) as a [C] vector."""
    if v.ndim > rank:
        return f"{what} of shape {list(v.shape)} has a higher rank than the input"
    padded = (1,) * (rank - v.ndim) + tuple(v.shape)
    if any(d != 1 for i, d in enumerate(padded) if i != 1):
        return f"{what} of shape {list(v.shape)} is not per-channel on axis 1"
    return v.reshape(-1)


def _gains(m: Match) -> list[np.ndarray] | str:
    out = []
    for name in ("g_pre", "g_post"):
        if name not in m.bound:
            continue
        v = known_value(m.bound[name])
        if v is None:
            return f"gain {m.bound[name].name} is not a constant"
        if v.dtype.kind != "f":
            return f"gain {m.bound[name].name} is not a float tensor"
        out.append(v)
    return out


def _plan_rmsnorm(graph: ir.Graph, m: Match) -> RMSNormPlan | str | None:
    x = strip_noop(m.bound["x"])  # a no-op Cast (x.float() on float32) is not the norm's input
    if _is_centred(x):
        return None  # a LayerNorm: recognize_layernorm's business
    eps = scalar_value(m.bound["eps"], "epsilon")
    if isinstance(eps, str):
        return eps
    rank = rank_of(x)
    axes = mean_axes(m, "ms", x)
    if isinstance(axes, str):
        return axes
    raw = _gains(m)
    if isinstance(raw, str):
        return raw
    shape = static_shape(x)
    if axes == [-1]:
        gains = [_gain_vector(g, rank, "gain") for g in raw]
        width, cf_rank = (shape[-1] if shape else None), None
    elif rank is not None and rank >= 3 and axes == [1 - rank]:
        gains = [_channel_vector(g, rank, "gain") for g in raw]
        width, cf_rank = shape[1], rank
    else:
        return (f"mean of squares reduces over axes {axes}, neither the last axis only nor axis 1 (channels-first) "
                f"of a rank-{rank} tensor (the canonical RMSNorm normalizes one axis)")
    for g in gains:
        if isinstance(g, str):
            return g
    if width is None:
        sizes = [g.size for g in gains if g.size > 1]
        if not sizes:
            return f"normalized dimension of {x.name} is not static (needed for the unit gain G)"
        width = sizes[0]
    if any(g.size not in (1, width) for g in gains):
        return f"gain of size {[g.size for g in gains]} does not match the normalized dimension {width}"
    dtype = dtype_of(x) or (gains[0].dtype if gains else np.dtype(np.float32))
    if not gains:
        gain = np.ones(width, dtype)
    elif len(gains) == 1:
        gain = np.broadcast_to(gains[0], (width,)).astype(dtype)
    else:  # gains before and after the product: multiply once, in float64
        gain = (gains[0].astype(np.float64) * gains[1].astype(np.float64) * np.ones(width)).astype(dtype)
    reason = outside_reader(m)
    if reason:
        return reason
    return RMSNormPlan(x, np.ascontiguousarray(gain), eps, cf_rank)


def _canonical_node(namer: Namer, base: str, plan: RMSNormPlan) -> ir.Node:
    g = plan.gain if isinstance(plan.gain, ir.Value) else constant(namer, base, "rms_gain", plan.gain)
    return add_node(namer, "RMSNorm", [plan.x, g], base=base, domain=DOMAIN, attrs={"epsilon": float(plan.epsilon)})


def _rewrite_rmsnorm(graph: ir.Graph, m: Match, plan: RMSNormPlan, namer: Namer) -> tuple[str, str, str]:
    root = m.nodes[0]
    base = root.name or "rmsnorm"
    gain = "with gain" if ("g_pre" in m.bound or "g_post" in m.bound) else "without gain (G = ones)"
    label = statistics_label(m, ("ms",))
    if plan.channels_first_rank is None:
        node = _canonical_node(namer, base, plan)
        take_over(root, node.outputs[0])
        return (f"decomposed RMSNorm ending at {root.name} ({gain}) -> {DOMAIN}::RMSNorm {node.name}", node.name,
                label)
    r = plan.channels_first_rank
    to_last, to_first = [0, *range(2, r), 1], [0, r - 1, *range(1, r - 1)]
    t_in = add_node(namer, "Transpose", [plan.x], base=base, suffix="to_channels_last", attrs={"perm": to_last})
    node = _canonical_node(namer, base, RMSNormPlan(t_in.outputs[0], plan.gain, plan.epsilon))
    t_out = add_node(namer, "Transpose", [node.outputs[0]], base=base, suffix="to_channels_first",
                     attrs={"perm": to_first})
    take_over(root, t_out.outputs[0])
    return (f"channels-first RMSNorm ending at {root.name} ({gain}) -> Transpose, {DOMAIN}::RMSNorm {node.name}, "
            f"Transpose"), node.name, ", ".join(["channels-first"] + ([label] if label else []))


RMSNORM_RECOGNIZER = Recognizer(
    pattern=RMSNORM,
    anchor="ms",
    root_ops=frozenset({"Mul", "Div"}),
    plan=_plan_rmsnorm,
    rewrite=_rewrite_rmsnorm,
    candidate=CANDIDATE,
    incomplete="mean of squares is not followed by a recognized RMSNorm spelling "
               "(Add eps, Sqrt + Div / Reciprocal+Mul, or Pow -0.5, applied to the same x)",
    accept_candidate=lambda m: not _is_centred(m.bound["x"]),
)


def _sliced_from(part: ir.Value, whole: ir.Value) -> ir.Node | None:
    """The Slice / Split that takes ``part`` out of ``whole`` (partial RMSNorm's ``torch.split``), or None."""
    node = part.producer()
    if node is None or node.op_type not in ("Slice", "Split") or not same_value(node.inputs[0], whole):
        return None
    return node


def _leading_channels(node: ir.Node, part: ir.Value, whole: ir.Value) -> int | str:
    """How many leading channels of the last axis of ``whole`` the Slice / Split ``node`` gives as ``part``,
    or why it is not such a slice (another axis, a start other than 0, a step, a later Split output)."""
    rank, d = rank_of(whole), (static_shape(whole) or [None])[-1]
    if rank is None or d is None:
        return f"the width of {whole.name} is not static (needed to check {node.op_type} {node.name})"
    what = f"{node.op_type} {node.name}"
    if node.op_type == "Split":
        if attr(node, "axis", 0) % rank != rank - 1:
            return f"{what} splits axis {attr(node, 'axis', 0)}, not the normalized last axis"
        if part.index() != 0:
            return f"the statistic reads output {part.index()} of {what}, not the leading channels"
        k = (static_shape(part) or [None])[-1]
        if k is None:
            sizes = fold(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            sizes = sizes if sizes is not None else node.attributes.get_ints("split", None)
            k = int(np.asarray(sizes).reshape(-1)[0]) if sizes is not None and len(np.asarray(sizes).reshape(-1)) \
                else None
    else:
        vals = [fold(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
                for i in range(1, 5)]
        starts, ends, axes, steps = vals
        if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None) \
                or (len(node.inputs) > 4 and node.inputs[4] is not None and steps is None):
            return f"{what} bounds are not constants"
        axes = [0] if axes is None else [int(a) for a in axes.reshape(-1)]
        if len(axes) != 1 or axes[0] % rank != rank - 1:
            return f"{what} slices axes {axes}, not the normalized last axis only"
        if int(starts.reshape(-1)[0]) != 0 or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return f"{what} does not take the leading channels (start {int(starts.reshape(-1)[0])}, step 1)"
        end = int(ends.reshape(-1)[0])
        k = min(end if end >= 0 else d + end, d)
    if k is None:
        return f"the channel count of {what} is not known"
    return int(k)


@dataclass
class VariantPlan:
    x: ir.Value
    gain: np.ndarray
    epsilon: float
    eps_outside: int
    partial: int  # leading channels of the statistic; 0: every channel
    width: int
    anchor: str


def _variant_gain(m: Match, x: ir.Value, width: int) -> np.ndarray | str:
    raw = _gains(m)
    if isinstance(raw, str):
        return raw
    gains = [_gain_vector(g, rank_of(x), "gain") for g in raw]
    for g in gains:
        if isinstance(g, str):
            return g
    if any(g.size not in (1, width) for g in gains):
        return f"gain of size {[g.size for g in gains]} does not match the normalized dimension {width}"
    dtype = dtype_of(x) or (gains[0].dtype if gains else np.dtype(np.float32))
    gain = np.ones(width, np.float64)
    for g in gains:  # before and after the product: multiplied once, in float64
        gain = gain * g.astype(np.float64)
    return np.ascontiguousarray(gain.astype(dtype))


def _plan_variant(graph: ir.Graph, m: Match) -> VariantPlan | str | None:
    """Conditions for bzhangGo/rmsnorm's eps-outside and partial RMSNorm -> RMSNorm(eps_outside, partial)."""
    x, sx = strip_noop(m.bound["x"]), strip_noop(m.bound["stat_x"])
    outside = "outside" in m.bound
    what = "eps-outside RMSNorm" if outside else "partial RMSNorm"
    if same_value(sx, x):
        if not outside:
            return None  # the plain RMSNorm: RMSNORM_RECOGNIZER's business
        k = None
    else:
        node = _sliced_from(sx, x)
        if node is None:
            return None  # the statistic of another tensor: not a normalization of x
        k = _leading_channels(node, sx, x)
        if isinstance(k, str):
            return f"{what}: {k}"
    if _is_centred(x):
        return None
    width = (static_shape(x) or [None])[-1]
    if width is None:
        return f"{what}: the normalized dimension of {x.name} is not static"
    if k is not None and k <= 0:
        return (f"{what}: the statistic covers no channel (p = 0): the mean of an empty slice is undefined, "
                "and the module computes NaN")
    partial = 0 if k is None or k >= width else k
    eps = scalar_value(m.bound["eps"], "epsilon")
    if isinstance(eps, str):
        return eps
    stat = m.bound["ms"]
    axes = reduce_axes(stat, rank_of(sx)) if stat.op_type == "ReduceL2" else mean_axes(m, "ms", sx)
    if isinstance(axes, str):
        return axes
    if axes != [-1]:
        return (f"{what}: {stat.op_type} {stat.name} reduces over axes {axes}; the variant RMSNorm is recognized "
                "over the last axis only")
    if stat.op_type == "ReduceL2":  # ||x_s||_2 k^-1/2 (Mul) or ||x_s||_2 / sqrt(k) (Div) is the RMS
        n = partial or width
        c = scalar_value(m.bound["k"], "scale of the 2-norm")
        if isinstance(c, str):
            return c
        scale_op = m.bound["rms_scale"].op_type
        want = n ** -0.5 if scale_op == "Mul" else n ** 0.5
        if not abs(c - want) <= 1e-6 * want:
            how = "multiplied" if scale_op == "Mul" else "divided"
            return (f"{what}: the 2-norm {stat.name} over {n} channels is {how} by {c:g}, not {want:g} "
                    f"({n}^{'-' if scale_op == 'Mul' else ''}1/2): not an RMS")
    gain = _variant_gain(m, x, width)
    if isinstance(gain, str):
        return gain
    reason = outside_reader(m)
    if reason:
        return reason
    return VariantPlan(x, gain, eps, int(outside), partial, width, stat.name)


def _rewrite_variant(graph: ir.Graph, m: Match, plan: VariantPlan, namer: Namer) -> tuple[str, str, str]:
    root = m.nodes[0]
    base = root.name or "rmsnorm"
    attrs = {"epsilon": float(plan.epsilon)}
    forms = []
    if plan.eps_outside:
        attrs["eps_outside"] = 1
        forms.append("eps outside the root")
    if plan.partial:
        attrs["partial"] = int(plan.partial)
        forms.append(f"partial: the statistic of {plan.partial} of {plan.width} channels")
    g = constant(namer, base, "rms_gain", plan.gain)
    node = add_node(namer, "RMSNorm", [plan.x, g], base=base, domain=DOMAIN, attrs=attrs)
    take_over(root, node.outputs[0])
    label = ", ".join(forms + [f for f in [statistics_label(m, ("ms",))] if f])
    shown = ", ".join(f"{k}={v}" for k, v in attrs.items() if k != "epsilon")
    return (f"decomposed RMSNorm ending at {root.name} ({', '.join(forms)}; bzhangGo/rmsnorm's spelling) -> "
            f"{DOMAIN}::RMSNorm {node.name} ({shown})", node.name, label)


def _recognize_variants(graph: ir.Graph, result: PassResult) -> None:
    """bzhangGo/rmsnorm's eps-outside and partial RMSNorm -> RMSNorm(eps_outside, partial); a candidate the
    plain spellings reported as incomplete takes this recognizer's outcome (its rewrite, or its reason)."""
    anchors: list[str] = []

    def rewrite(g, m, plan, namer):
        anchors.append(plan.anchor)
        return _rewrite_variant(g, m, plan, namer)

    found = PassResult(result.name, exact=True)
    Recognizer(pattern=VARIANT, anchor="ms", root_ops=frozenset({"Div", "Mul"}), plan=_plan_variant,
               rewrite=rewrite, candidate=CANDIDATE, incomplete="", candidate_ops=frozenset()).run(graph, found)
    for name in anchors:
        before = len(result.skipped)
        result.skipped = [s for s in result.skipped if s.node != name]
        if len(result.skipped) == before:
            result.matched += 1
    result.rewrites.extend(found.rewrites)
    for skip in found.skipped:
        same = [s for s in result.skipped if s.node == skip.node]
        if same:
            same[0].reason = skip.reason
        else:
            result.matched += 1
            result.skipped.append(skip)


@dataclass
class StashedPlan:
    """RMSNormalization on a non-float32 X: Cast(X, float32), RMSNorm(G = ones), Cast back, Mul(scale)."""

    x: ir.Value
    scale: ir.Value
    width: int
    epsilon: float
    to: int  # ONNX element type of X


def _plan_rms_normalization(graph: ir.Graph, node: ir.Node) -> RMSNormPlan | StashedPlan | str:
    """Conditions for ONNX RMSNormalization (opset 23) -> normdeploy::RMSNorm."""
    x, scale = node.inputs[0], node.inputs[1]
    rank = rank_of(x)
    axis = node.attributes.get_int("axis", -1)
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return f"RMSNormalization over axis {axis} (rank {rank}): the canonical RMSNorm normalizes the last axis only"
    if node.attributes.get_int("stash_type", 1) != 1:
        return f"stash_type {node.attributes.get_int('stash_type')} is not float32"
    epsilon = attr(node, "epsilon", 1e-5)
    dtype = dtype_of(x)
    if dtype is None:
        return f"element type of {x.name} is unknown"
    shape = static_shape(x)
    width = shape[-1] if shape else None
    v = fold(scale)
    if v is not None:
        g = _gain_vector(v, rank, "scale")
        if isinstance(g, str):
            return g
        if width is None and g.size > 1:
            width = g.size
        if width is not None and g.size not in (1, width):
            return f"scale of size {g.size} does not match the last dimension {width}"
    elif rank_of(scale) != 1:
        return "scale is not a constant and not a 1-D tensor"
    if dtype != np.float32:
        # stash_type 1: statistics and the normalized value in float32, cast back, then scaled in X's type
        if width is None:
            return f"last dimension of {x.name} is not static (needed for the unit gain G)"
        return StashedPlan(x, scale, width, epsilon, helper.np_dtype_to_tensor_dtype(dtype))
    if v is None:
        return RMSNormPlan(x, scale, epsilon)
    if width is None:
        return f"last dimension of {x.name} is not static (needed to expand a scalar scale)"
    return RMSNormPlan(x, np.ascontiguousarray(np.broadcast_to(g, (width,)).astype(np.float32)), epsilon)


def _rewrite_rms_normalization(graph: ir.Graph, node: ir.Node, plan, namer: Namer) -> tuple[str, str]:
    base = node.name or "rmsnorm"
    if isinstance(plan, RMSNormPlan):
        new = _canonical_node(namer, base, plan)
        take_over(node, new.outputs[0])
        remove_nodes(graph, [node])
        return f"RMSNormalization {node.name} -> {DOMAIN}::RMSNorm {new.name}", new.name
    to32 = add_node(namer, "Cast", [plan.x], base=base, suffix="to_float32", attrs={"to": int(TensorProto.FLOAT)})
    new = _canonical_node(namer, base, RMSNormPlan(to32.outputs[0], np.ones(plan.width, np.float32), plan.epsilon))
    back = add_node(namer, "Cast", [new.outputs[0]], base=base, suffix="from_float32", attrs={"to": plan.to})
    scaled = add_node(namer, "Mul", [back.outputs[0], plan.scale], base=base, suffix="scale")
    take_over(node, scaled.outputs[0])
    remove_nodes(graph, [node])
    return (f"RMSNormalization {node.name} on {helper.tensor_dtype_to_np_dtype(plan.to)} -> Cast(float32), "
            f"{DOMAIN}::RMSNorm {new.name}, Cast back, Mul(scale) (stash_type 1)"), new.name


def recognize_rmsnorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Rewrite decomposed RMSNorm and ONNX RMSNormalization (last axis) to normdeploy::RMSNorm."""
    RMSNORM_RECOGNIZER.run(graph, result)
    _recognize_variants(graph, result)
    namer = Namer(graph)
    for node in list(graph):
        if node.op_type != "RMSNormalization" or node.domain not in DEFAULT_DOMAINS:
            continue
        result.matched += 1
        plan = _plan_rms_normalization(graph, node)
        if isinstance(plan, str):
            result.skip(node.name, plan)
            continue
        result.rewrote(*_rewrite_rms_normalization(graph, node, plan, namer))
