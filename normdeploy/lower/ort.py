"""Lower canonical normalization nodes to standard ops for ONNX Runtime (DESIGN.md section 4), and for
OpenVINO (the ``openvino`` target, which reads the same ONNX: :mod:`normdeploy.lower.openvino`).

Per op, what ONNX Runtime runs fastest while computing the same function:

* RMSNorm      -> ``RMSNormalization`` (opset >= 23) or ONNX Runtime's
                  ``SimplifiedLayerNormalization`` (default domain, any opset) when the
                  model's opset is older. Both compute ``g x / sqrt(mean(x^2) + eps)`` with
                  fp32 statistics (``stash_type`` 1). Decomposed (:func:`rms_form`: for
                  ``openvino``, which fuses these ops into its RMS kernel, and with
                  ``--ort-rms-op decomposed``, an autotune candidate): ``Mul(x, x)``,
                  ``ReduceMean``, ``Add(eps)``, ``Sqrt``, ``Div``, ``Mul(g)``, standard ops at any
                  opset, the same formula with statistics in the model's dtype (exact for float32
                  models, where the fused kernels' fp32 statistics are that dtype; verification
                  judges the others).
  ... with ``eps_outside`` or ``partial`` (bzhangGo/rmsnorm's variants) -> standard ops
                  (:func:`rms_variant_ops`): neither fused op can add eps outside the root or
                  take the statistic of the first k channels only, so the formula is written out:
                  ``Slice(x, 0, k)`` (partial), ``ReduceL2 * k^-1/2`` (eps outside: the RMS, as
                  the reference module computes it) or ``ReduceMean(s * s)``, ``Sqrt``, ``Add(eps)``,
                  ``Div(x, .)``, ``Mul(g)`` (left out where g is all ones).
* GroupScaling -> Reshape ``[..., G, C/G]`` -> the RMSNorm op above with unit gain -> Reshape back;
                  rows shorter than ``ctx.ort_short_row`` (default :data:`SHORT_ROW`) as the
                  decomposed ops.
* PowerNorm    -> GroupScaling as above, then ``Mul(w / sqrt(phi + eps))``, ``Add(b)``
                  (constants computed in float64, stored once in the model's dtype).
* UnifiedNorm  -> ``Mul(w / sqrt(r + eps))``, ``Add(b)`` shaped for its channel axis.
* DynamicTanh  -> ``Mul(alpha)``, ``Tanh``, then ``Mul(w)``, ``Add(b)`` (each dropped when it
                  is the identity, e.g. once the rewrite stage folded w and b away).
* ScaleNorm    -> ``ReduceL2``, ``Max(eps)``, ``Div``, ``Mul(g)``.
* CRMSNorm     -> ``ReduceSumSquare``, ``ReduceSum``, the formula of :mod:`normdeploy.core.ops`.

Each reduction gets its axes in the form its opset defines (:func:`_reduce_inputs`): ReduceSum
takes them as an input from opset 13, ReduceMean, ReduceSumSquare and ReduceL2 from opset 18,
an attribute before.

All of these are exact: the same formula evaluated by standard kernels. A canonical node
whose parameters are not constant is left to its ONNX function body (ONNX Runtime
inlines it) and reported as skipped.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..core.affine import affine_of
from ..core.graph import (
    Namer,
    add_node,
    attr,
    const_value,
    constant,
    dtype_of,
    infer_shapes,
    opset_of,
    rank_of,
    replace_value,
    shape_of,
    value,
)
from ..core.ops import ATTRIBUTES, DOMAIN, rms_variant
from ..core.passes import SHORT_ROW, PassContext, PassResult

ORT_TARGETS = ("ort-cpu", "ort-cuda", "ort-trt")


class _Emitter:
    """Appends standard nodes to a graph with deterministic names derived from one base."""

    def __init__(self, namer: Namer, base: str, dtype, rms_op: str = "simplified", short_row: int = SHORT_ROW):
        self.namer, self.base, self.dtype = namer, base, dtype
        self.rms_op, self.short_row = rms_op, short_row
        self.short_rows = 0  # GroupScaling statistics emitted as decomposed ops for their short rows

    def __call__(self, op: str, inputs: list, dtype=None, **attrs) -> ir.Value:
        out = value(self.namer, self.base, op.lower(), dtype=self.dtype if dtype is None else dtype)
        add_node(self.namer, op, inputs, [out], base=self.base, suffix=op, attrs=attrs)
        return out

    def const(self, suffix: str, value, dtype=None) -> ir.Value:
        return constant(self.namer, self.base, suffix, np.asarray(value, self.dtype if dtype is None else dtype))


def _reduce_inputs(e: _Emitter, x, axes: list[int], opset: int, since: int) -> tuple[list, dict]:
    """A reduction's inputs and attributes: ``axes`` as an input from opset ``since`` on, else as an attribute.

    (ReduceSum moved its axes to an input at opset 13; ReduceSumSquare, ReduceMean, ReduceL2 at 18.)
    """
    if opset >= since:
        return [x, e.const("axes", axes, np.int64)], {}
    return [x], {"axes": axes}


def rms_form(ctx: PassContext) -> str:
    """The RMSNorm form for ``ctx.target`` (one of ``core.passes.ORT_RMS_OPS``): "decomposed" for openvino
    (:mod:`normdeploy.lower.openvino` says why), else ``--ort-rms-op`` ("simplified": the op the opset allows)."""
    return "decomposed" if ctx.target == "openvino" else ctx.ort_rms_op


def _rms(e: _Emitter, x, gain, eps: float, opset: int) -> ir.Value:
    if e.rms_op == "decomposed":
        normed = _rms_decomposed(e, x, eps, opset)
        unit = gain.const_value is not None and np.all(gain.const_value.numpy() == 1)
        return normed if unit else e("Mul", [normed, gain])
    if opset >= 23:
        return e("RMSNormalization", [x, gain], axis=-1, epsilon=float(eps), stash_type=1)
    return e("SimplifiedLayerNormalization", [x, gain], axis=-1, epsilon=float(eps), stash_type=1)


#: SHORT_ROW (:mod:`normdeploy.core.passes`, 64), the default of ``ctx.ort_short_row``: below this row
#: length ONNX Runtime 1.31's CPU SimplifiedLayerNormalization kernel was slower than the decomposed ops
#: (PowerNorm with groups of 48 in a ViT-Tiny-sized model: 225.6 ms against 219.4 ms at batch 16,
#: interleaved); such rows stay decomposed. ``--ort-short-row`` sets it, ``--autotune`` measures it.


def _rms_decomposed(e: _Emitter, x, eps: float, opset: int) -> ir.Value:
    """x / sqrt(mean(x^2) + eps) over the last axis as Mul, ReduceMean, Add, Sqrt, Div."""
    sq = e("Mul", [x, x])
    inputs, axes = _reduce_inputs(e, sq, [-1], opset, since=18)
    ms = e("ReduceMean", inputs, keepdims=1, **axes)
    return e("Div", [x, e("Sqrt", [e("Add", [ms, e.const("eps", eps)])])])


def variant_width(node: ir.Node) -> int | None:
    """The channels an RMSNorm variant's statistic covers (``partial``, else the static width of the last axis,
    else the gain's length), or None when unknown."""
    attrs = {**ATTRIBUTES["RMSNorm"], **{k: attr(node, k) for k in node.attributes}}
    if int(attrs["partial"]):
        return int(attrs["partial"])
    c = _last_dim(node.inputs[0])
    g = const_value(node.inputs[1])
    return c if c is not None else (int(g.size) if g is not None and g.size > 1 else None)


def rms_variant_ops(e: _Emitter, x, gain: np.ndarray, eps: float, eps_outside: int, partial: int, channels: int,
                    opset: int) -> ir.Value:
    """RMSNorm's variants as standard ops (every opset from 13), exact: the function of :mod:`normdeploy.core.ops`.

    ``s = x[..., :partial]`` (all of x when ``partial`` is 0); eps outside the root:
    ``g x / (ReduceL2(s) k^-1/2 + eps)`` with k = ``channels``, the channels of s (the RMS as bzhangGo/rmsnorm's
    torch module computes it); eps inside: ``g x / sqrt(mean(s^2) + eps)``. (The TensorRT lowering
    gives the variants to the NormdeployRMSNorm plugin instead, whose kernel computes both.)
    """
    s = x
    if partial:
        s = e("Slice", [x, e.const("start", [0], np.int64), e.const("end", [int(partial)], np.int64),
                        e.const("axis", [-1], np.int64)])
    if eps_outside:
        inputs, axes = _reduce_inputs(e, s, [-1], opset, since=18)
        rms = e("Mul", [e("ReduceL2", inputs, keepdims=1, **axes), e.const("inv_sqrt_k", channels ** -0.5)])
        den = e("Add", [rms, e.const("eps", eps)])
    else:
        inputs, axes = _reduce_inputs(e, e("Mul", [s, s]), [-1], opset, since=18)
        den = e("Sqrt", [e("Add", [e("ReduceMean", inputs, keepdims=1, **axes), e.const("eps", eps)])])
    out = e("Div", [x, den])
    if np.any(np.asarray(gain) != 1):
        out = e("Mul", [out, e.const("gain", gain)])
    return out


def _group_scaling(e: _Emitter, x, groups: int, eps: float, opset: int, channels: int | None) -> ir.Value | None:
    if groups == 1:
        if channels is None:
            return None
        return _rms(e, x, e.const("unit_gain", np.ones(channels)), eps, opset)
    if channels is None or channels % groups:
        return None
    size = channels // groups
    rank = rank_of(x)
    if rank is not None:  # static shapes with 0 = "copy this dimension": no shape arithmetic at run time
        grouped = e("Reshape", [x, e.const("gshape", [0] * (rank - 1) + [groups, size], np.int64)])
        if size < e.short_row or e.rms_op == "decomposed":
            e.short_rows += 1
            normed = _rms_decomposed(e, grouped, eps, opset)
        else:
            normed = _rms(e, grouped, e.const("unit_gain", np.ones(size)), eps, opset)
        return e("Reshape", [normed, e.const("shape", [0] * (rank - 1) + [channels], np.int64)])
    shape = e("Shape", [x], dtype=np.int64)
    lead = e("Slice", [shape, e.const("s0", [0], np.int64), e.const("s1", [-1], np.int64)], dtype=np.int64)
    grouped_shape = e("Concat", [lead, e.const("gshape", [groups, size], np.int64)], dtype=np.int64, axis=0)
    grouped = e("Reshape", [x, grouped_shape])
    normed = _rms(e, grouped, e.const("unit_gain", np.ones(size)), eps, opset)
    return e("Reshape", [normed, shape])


def _attrs(node: ir.Node) -> dict:
    return {**ATTRIBUTES[node.op_type], **{k: attr(node, k) for k in node.attributes}}


def _last_dim(x: ir.Value) -> int | None:
    shape = shape_of(x)
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _why_not_lowerable(node: ir.Node) -> str | None:
    """Check everything lowering needs before any node is emitted."""
    x = node.inputs[0]
    if any(const_value(t) is None for t in node.inputs[1:]):
        return "a parameter is not a constant; left to the op's function body"
    attrs = _attrs(node)
    op = node.op_type
    rank = rank_of(x)
    channels = _last_dim(x)
    if op in ("UnifiedNorm", "DynamicTanh") and int(attrs["axis"]) not in (-1,) and rank is None:
        return "rank of the input is unknown"
    if op in ("GroupScaling", "PowerNorm", "CRMSNorm") and channels is None:
        return "the width of the last axis is unknown"
    if op == "RMSNorm" and int(attrs["eps_outside"]) and variant_width(node) is None:
        return ("the width of the last axis is unknown (eps outside the root: the 2-norm is scaled by "
                "width^-1/2)")
    if op in ("GroupScaling", "PowerNorm") and channels % int(attrs["groups"]):
        return f"{channels} channels are not divisible into {attrs['groups']} groups"
    if op in ("PowerNorm", "UnifiedNorm", "DynamicTanh"):
        aff = affine_of(node)
        if isinstance(aff, str):
            return aff
    return None


def _lower_node(node: ir.Node, namer: Namer, opset: int, ctx: PassContext | None = None) -> int:
    """Emit the standard ops computing ``node``; they take over its output (the runner drops ``node``).

    Returns how many GroupScaling statistics were emitted as decomposed ops for their short rows."""
    x, y = node.inputs[0], node.outputs[0]
    op = node.op_type
    dtype = dtype_of(x)
    if dtype is None:
        dtype = np.dtype(np.float32)
    params = [np.asarray(const_value(t), np.float64) for t in node.inputs[1:]]
    aff = affine_of(node) if op in ("PowerNorm", "UnifiedNorm", "DynamicTanh") else None
    attrs = _attrs(node)
    channels = _last_dim(x)
    ctx = ctx or PassContext()
    e = _Emitter(namer, node.name or op, dtype, rms_form(ctx), ctx.ort_short_row)

    def affine(t) -> ir.Value:
        """``t * a + c`` with the node's affine (:func:`normdeploy.core.affine.affine_of`); unit parts left out."""
        has_shift = np.any(aff.shift != 0)
        if np.any(aff.scale != 1) or not has_shift:
            t = e("Mul", [t, e.const("scale", aff.scale)])
        if has_shift:
            t = e("Add", [t, e.const("shift", aff.shift)])
        return t

    if op == "RMSNorm" and rms_variant(attrs):
        out = rms_variant_ops(e, x, params[0].reshape(-1), attrs["epsilon"], int(attrs["eps_outside"]),
                              int(attrs["partial"]), variant_width(node), opset)
    elif op == "RMSNorm":
        out = _rms(e, x, e.const("gain", params[0]), attrs["epsilon"], opset)
    elif op == "GroupScaling":
        out = _group_scaling(e, x, int(attrs["groups"]), attrs["epsilon"], opset, channels)
    elif op == "PowerNorm":
        out = affine(_group_scaling(e, x, int(attrs["groups"]), attrs["epsilon"], opset, channels))
    elif op == "UnifiedNorm":
        out = affine(x)
    elif op == "DynamicTanh":
        out = affine(e("Tanh", [e("Mul", [x, e.const("alpha", params[0])])]))
    elif op == "ScaleNorm":
        inputs, axes = _reduce_inputs(e, x, [-1], opset, since=18)
        norm = e("ReduceL2", inputs, keepdims=1, **axes)
        clamped = e("Max", [norm, e.const("eps", attrs["epsilon"])])
        out = e("Mul", [e("Div", [x, clamped]), e.const("gain", params[0])])
    else:  # CRMSNorm
        # ReduceSum takes its axes as an input from opset 13 on, ReduceSumSquare only from opset 18
        inputs, axes = _reduce_inputs(e, x, [-1], opset, since=18)
        ss = e("ReduceSumSquare", inputs, keepdims=1, **axes)
        inputs, axes = _reduce_inputs(e, x, [-1], opset, since=13)
        s = e("ReduceSum", inputs, keepdims=1, **axes)
        ms = e("Div", [e("Add", [ss, e("Mul", [s, s])]), e.const("d", channels + 1)])
        inv = e("Reciprocal", [e("Sqrt", [e("Add", [ms, e.const("eps", attrs["epsilon"])])])])
        out = e("Mul", [e("Mul", [x, inv]), e.const("gain", params[0])])
    if out.shape is None and y.shape is not None:
        out.shape = y.shape
    if y.dtype is not None:
        out.dtype = y.dtype
    replace_value(y, out)
    return e.short_rows


_RMS_LIKE = ("RMSNorm", "GroupScaling", "PowerNorm")
#: onnxscript's version converter starts at this opset; older models go through ONNX's C++ converter
_ONNXSCRIPT_CONVERTER_MIN_OPSET = 18


def raise_opset_for_rmsnormalization(model: ir.Model, ctx: PassContext) -> PassResult | None:
    """With ``--ort-rms-op standard`` (the step's ``when``): move a model below opset 23 to opset 23 before lowering.

    Then RMSNorm lowers to the standard ``RMSNormalization`` and the file passes
    onnx.checker. The default (``simplified``) keeps the opset and lowers to ONNX Runtime's
    ``SimplifiedLayerNormalization``, which measured about 5 % faster per model on ONNX
    Runtime 1.31 CPU (zoo ViTs, d=64, batch 1, interleaved). Needs ONNX Runtime 1.23 or
    newer; if the version converter fails, the model is left as it is.
    In place; returns a result carrying the note (or None when nothing was done).
    """
    from ..core.ops import model_opset

    if ctx.target not in ORT_TARGETS or model_opset(model) >= 23:
        return None
    if not any(n.domain == DOMAIN and n.op_type in _RMS_LIKE for n in model.graph):
        return None
    if ctx.ort_version and tuple(int(p) for p in ctx.ort_version.split(".")[:2]) < (1, 23):
        return None
    before = model_opset(model)
    try:
        converted = _converted_to_opset(model, 23)
    except Exception as e:  # noqa: BLE001 - the converters lack adapters for some ops
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return _note(f"opset {before} kept (version converter: {first[:120]}); "
                     "RMSNorm runs as ONNX Runtime's SimplifiedLayerNormalization")
    model.graph = converted.graph
    model.functions.clear()
    model.functions.update(converted.functions)
    return _note(f"opset raised from {before} to 23 so that RMSNorm lowers to RMSNormalization")


def _converted_to_opset(model: ir.Model, target: int) -> ir.Model:
    """A converted copy of ``model`` (weights shared, never serialized), checked with onnx.checker; raises on failure.

    The canonical ops' function bodies are detached first (onnxscript's converter would
    inline them, and the canonical nodes are what the lowering needs) and regenerated for
    the new opset afterwards; other model-local functions are kept as they are.
    """
    import onnx
    from onnx_ir.passes.common import _c_api_utils
    from onnxscript import version_converter

    from ..core.ops import attach_functions, model_opset

    clone = model.clone()
    others = [f for key, f in clone.functions.items() if key[0] != DOMAIN]
    clone.functions.clear()
    if model_opset(clone) >= _ONNXSCRIPT_CONVERTER_MIN_OPSET:
        version_converter.convert_version(clone, target_version=target)
    else:
        clone.graph = _c_api_converted_graph(clone, target)
    if model_opset(clone) != target:
        raise RuntimeError(f"the model is still at opset {model_opset(clone)}")
    for f in others:
        clone.functions[f.identifier()] = f
    attach_functions(clone)
    infer_shapes(clone)  # best effort, as ONNX's converter does: the lowering reads the element types
    _c_api_utils.call_onnx_api(onnx.checker.check_model, clone)  # large initializers left out
    return clone


def _c_api_converted_graph(model: ir.Model, target: int) -> ir.Graph:
    """``model``'s graph converted by ONNX's C++ version converter, called without the large initializers."""
    import onnx
    from onnx_ir.passes.common import _c_api_utils

    proto = _c_api_utils.call_onnx_api(lambda p: onnx.version_converter.convert_version(p, target), model)
    graph = ir.from_proto(proto).graph
    for v in graph.inputs:  # the initializers travelled as graph inputs without their values
        if v.name in model.graph.initializers:
            v.const_value = model.graph.initializers[v.name].const_value
            graph.register_initializer(v)
    user_inputs = graph.inputs[:len(model.graph.inputs)]
    graph.inputs.clear()
    graph.inputs.extend(user_inputs)
    return graph


def _note(text: str) -> PassResult:
    return PassResult("raise_opset_for_rmsnormalization", exact=True, notes=[text])


def lower_canonical_to_standard_ops(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Replace each canonical normdeploy node by the standard ops the target's runtime runs fastest
    (ONNX Runtime; OpenVINO with :func:`rms_form` "decomposed")."""
    namer = Namer(graph)
    opset = opset_of(graph) or 11  # (onnx-graphsurgeon's default, which this pass had before)
    form = rms_form(ctx)
    short = 0
    for node in list(graph):
        if node.domain != DOMAIN or node.op_type not in ATTRIBUTES:
            continue
        result.matched += 1
        reason = _why_not_lowerable(node)
        if reason:
            result.skip(node.name, reason)
            continue
        short += _lower_node(node, namer, opset, ctx)
        variant = rms_variant(_attrs(node)) if node.op_type == "RMSNorm" else {}
        if variant:
            result.rewrote(f"RMSNorm {node.name} ({', '.join(f'{k}={v}' for k, v in variant.items())}) lowered to "
                           "standard ops (Slice, ReduceL2 or ReduceMean, Sqrt, Add, Div, Mul): neither "
                           "SimplifiedLayerNormalization nor RMSNormalization adds eps outside the root or takes the "
                           "statistic of part of the channels", node.name)
        else:
            result.rewrote(f"{node.op_type} {node.name} lowered to standard ops", node.name)
    if short and form != "decomposed":
        result.notes.append(f"{short} GroupScaling statistic(s) over rows shorter than {ctx.ort_short_row} kept as "
                            "Mul, ReduceMean, Add, Sqrt, Div (faster there than ONNX Runtime's fused kernel)")
    if form == "decomposed" and result.rewrites:
        result.notes.append("RMSNorm and GroupScaling written as Mul, ReduceMean, Add, Sqrt, Div (standard ops at the "
                            "model's opset)" + (", which OpenVINO fuses into its RMS kernel" if ctx.target == "openvino"
                                                else " (--ort-rms-op decomposed)"))
    if any(n.op_type == "SimplifiedLayerNormalization" for n in graph):
        result.notes.append("model opset < 23: RMSNorm runs as ONNX Runtime's SimplifiedLayerNormalization")
