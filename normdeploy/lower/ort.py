"""Lower canonical normalization nodes to standard ops for ONNX Runtime (DESIGN.md section 4).

Per op, what ONNX Runtime runs fastest while computing the same function:

* RMSNorm      -> ``RMSNormalization`` (opset >= 23) or ONNX Runtime's
                  ``SimplifiedLayerNormalization`` (default domain, any opset) when the
                  model's opset is older. Both compute ``g x / sqrt(mean(x^2) + eps)`` with
                  fp32 statistics (``stash_type`` 1).
* GroupScaling -> Reshape ``[..., G, C/G]`` -> the RMSNorm op above with unit gain -> Reshape back.
* PowerNorm    -> GroupScaling as above, then ``Mul(w / sqrt(phi + eps))``, ``Add(b)``
                  (constants computed in float64, stored once in the model's dtype).
* UnifiedNorm  -> ``Mul(w / sqrt(r + eps))``, ``Add(b)`` shaped for its channel axis.
* DynamicTanh  -> ``Mul(alpha)``, ``Tanh``, then ``Mul(w)``, ``Add(b)`` (each dropped when it
                  is the identity, e.g. once the rewrite stage folded w and b away).
* ScaleNorm    -> ``ReduceL2``, ``Max(eps)``, ``Div``, ``Mul(g)``.
* CRMSNorm     -> ``ReduceSumSquare``, ``ReduceSum``, the formula of :mod:`normdeploy.core.ops`.

All of these are exact: the same formula evaluated by standard kernels. A canonical node
whose parameters are not constant is left to its ONNX function body (ONNX Runtime
inlines it) and reported as skipped.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..core.affine_gs import affine_of
from ..core.graph_gs import Namer, const_value, constant
from ..core.ops import ATTRIBUTES, DOMAIN
from ..core.passes import PassContext, PassResult

ORT_TARGETS = ("ort-cpu", "ort-cuda", "ort-trt")


class _Emitter:
    """Appends standard nodes to a graph with deterministic names derived from one base."""

    def __init__(self, graph: gs.Graph, namer: Namer, base: str, dtype):
        self.graph, self.namer, self.base, self.dtype = graph, namer, base, dtype

    def __call__(self, op: str, inputs: list, out: gs.Variable | None = None, dtype=None, **attrs) -> gs.Variable:
        out = out or gs.Variable(self.namer(self.base, op.lower()), dtype=dtype or self.dtype)
        self.graph.nodes.append(gs.Node(op, self.namer(self.base, op), attrs, inputs, [out]))
        return out

    def const(self, suffix: str, value, dtype=None) -> gs.Constant:
        return constant(self.namer, self.base, suffix, np.asarray(value, dtype or self.dtype))


def _rms(e: _Emitter, x, gain, eps: float, out, opset: int):
    if opset >= 23:
        return e("RMSNormalization", [x, gain], out, axis=-1, epsilon=float(eps), stash_type=1)
    return e("SimplifiedLayerNormalization", [x, gain], out, axis=-1, epsilon=float(eps), stash_type=1)


#: Below this row length ONNX Runtime 1.31's CPU SimplifiedLayerNormalization kernel was slower than the
#: decomposed ops (PowerNorm with groups of 48 in a ViT-Tiny-sized model: 225.6 ms against 219.4 ms at
#: batch 16, interleaved); such rows stay decomposed.
SHORT_ROW = 64


def _rms_decomposed(e: _Emitter, x, eps: float, opset: int):
    """x / sqrt(mean(x^2) + eps) over the last axis as Mul, ReduceMean, Add, Sqrt, Div."""
    sq = e("Mul", [x, x])
    ms = e("ReduceMean", [sq, e.const("axes", [-1], np.int64)], keepdims=1) if opset >= 18 else \
        e("ReduceMean", [sq], keepdims=1, axes=[-1])
    return e("Div", [x, e("Sqrt", [e("Add", [ms, e.const("eps", eps)])])])


def _group_scaling(e: _Emitter, x, groups: int, eps: float, out, opset: int, channels: int | None):
    if groups == 1:
        if channels is None:
            return None
        return _rms(e, x, e.const("unit_gain", np.ones(channels)), eps, out, opset)
    if channels is None or channels % groups:
        return None
    size = channels // groups
    rank = len(x.shape) if x.shape is not None else None
    if rank is not None:  # static shapes with 0 = "copy this dimension": no shape arithmetic at run time
        grouped = e("Reshape", [x, e.const("gshape", [0] * (rank - 1) + [groups, size], np.int64)])
        if size < SHORT_ROW:
            normed = _rms_decomposed(e, grouped, eps, opset)
        else:
            normed = _rms(e, grouped, e.const("unit_gain", np.ones(size)), eps, None, opset)
        return e("Reshape", [normed, e.const("shape", [0] * (rank - 1) + [channels], np.int64)], out)
    shape = e("Shape", [x], dtype=np.int64)
    lead = e("Slice", [shape, e.const("s0", [0], np.int64), e.const("s1", [-1], np.int64)], dtype=np.int64)
    grouped_shape = e("Concat", [lead, e.const("gshape", [groups, size], np.int64)], dtype=np.int64, axis=0)
    grouped = e("Reshape", [x, grouped_shape])
    normed = _rms(e, grouped, e.const("unit_gain", np.ones(size)), eps, None, opset)
    return e("Reshape", [normed, shape], out)


def _why_not_lowerable(node: gs.Node) -> str | None:
    """Check everything lowering needs before any node is emitted."""
    x = node.inputs[0]
    if any(const_value(t) is None for t in node.inputs[1:]):
        return "a parameter is not a constant; left to the op's function body"
    attrs = {**ATTRIBUTES[node.op], **node.attrs}
    rank = len(x.shape) if x.shape is not None else None
    channels = x.shape[-1] if rank and isinstance(x.shape[-1], int) else None
    if node.op in ("UnifiedNorm", "DynamicTanh") and int(attrs["axis"]) not in (-1,) and rank is None:
        return "rank of the input is unknown"
    if node.op in ("GroupScaling", "PowerNorm", "CRMSNorm") and channels is None:
        return "the width of the last axis is unknown"
    if node.op in ("GroupScaling", "PowerNorm") and channels % int(attrs["groups"]):
        return f"{channels} channels are not divisible into {attrs['groups']} groups"
    if node.op in ("PowerNorm", "UnifiedNorm", "DynamicTanh"):
        aff = affine_of(node)
        if isinstance(aff, str):
            return aff
    return None


def _lower_node(graph: gs.Graph, node: gs.Node, namer: Namer, opset: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    dtype = x.dtype if x.dtype is not None else np.float32
    params = [np.asarray(const_value(t), np.float64) for t in node.inputs[1:]]
    aff = affine_of(node) if node.op in ("PowerNorm", "UnifiedNorm", "DynamicTanh") else None
    attrs = {**ATTRIBUTES[node.op], **node.attrs}
    rank = len(x.shape) if x.shape is not None else None
    channels = x.shape[-1] if rank and isinstance(x.shape[-1], int) else None
    e = _Emitter(graph, namer, node.name or node.op, dtype)
    node.outputs.clear()
    node.inputs.clear()

    def affine(t, out):
        """``t * a + c`` with the node's affine (:func:`normdeploy.core.affine.affine_of`); unit parts left out."""
        has_shift = np.any(aff.shift != 0)
        if np.any(aff.scale != 1) or not has_shift:
            t = e("Mul", [t, e.const("scale", aff.scale)], None if has_shift else out)
        if has_shift:
            e("Add", [t, e.const("shift", aff.shift)], out)

    op = node.op
    if op == "RMSNorm":
        _rms(e, x, e.const("gain", params[0]), attrs["epsilon"], y, opset)
    elif op == "GroupScaling":
        _group_scaling(e, x, int(attrs["groups"]), attrs["epsilon"], y, opset, channels)
    elif op == "PowerNorm":
        xs = _group_scaling(e, x, int(attrs["groups"]), attrs["epsilon"], None, opset, channels)
        affine(xs, y)
    elif op == "UnifiedNorm":
        affine(x, y)
    elif op == "DynamicTanh":
        t = e("Tanh", [e("Mul", [x, e.const("alpha", params[0])])])
        affine(t, y)
    elif op == "ScaleNorm":
        norm = e("ReduceL2", [x, e.const("axes", [-1], np.int64)] if opset >= 18 else [x], keepdims=1,
                 **({} if opset >= 18 else {"axes": [-1]}))
        clamped = e("Max", [norm, e.const("eps", attrs["epsilon"])])
        e("Mul", [e("Div", [x, clamped]), e.const("gain", params[0])], y)
    elif op == "CRMSNorm":
        axes = ([e.const("axes", [-1], np.int64)], {}) if opset >= 18 else ([], {"axes": [-1]})
        ss = e("ReduceSumSquare", [x, *axes[0]], keepdims=1, **axes[1])
        s = e("ReduceSum", [x, *axes[0]], keepdims=1, **axes[1])
        ms = e("Div", [e("Add", [ss, e("Mul", [s, s])]), e.const("d", channels + 1)])
        inv = e("Reciprocal", [e("Sqrt", [e("Add", [ms, e.const("eps", attrs["epsilon"])])])])
        e("Mul", [e("Mul", [x, inv]), e.const("gain", params[0])], y)


_RMS_LIKE = ("RMSNorm", "GroupScaling", "PowerNorm")


def raise_opset_for_rmsnormalization(model, ctx: PassContext):
    """With ``--ort-rms-op standard`` (the step's ``when``): move a model below opset 23 to opset 23 before lowering.

    Then RMSNorm lowers to the standard ``RMSNormalization`` and the file passes
    onnx.checker. The default (``simplified``) keeps the opset and lowers to ONNX Runtime's
    ``SimplifiedLayerNormalization``, which measured about 5 % faster per model on ONNX
    Runtime 1.31 CPU (zoo ViTs, d=64, batch 1, interleaved). Needs ONNX Runtime 1.23 or
    newer; if the version converter fails, the model is left as it is.
    Returns the model and a result carrying the note (or None when nothing was done).
    """
    import onnx
    from onnx import version_converter

    from ..core.ops import model_opset

    if ctx.target not in ORT_TARGETS or model_opset(model) >= 23:
        return model, None
    if not any(n.domain == DOMAIN and n.op_type in _RMS_LIKE for n in model.graph.node):
        return model, None
    if ctx.ort_version and tuple(int(p) for p in ctx.ort_version.split(".")[:2]) < (1, 23):
        return model, None
    try:
        converted = version_converter.convert_version(model, 23)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter lacks adapters for some ops
        return model, _note(f"opset {model_opset(model)} kept (version converter: {str(e).splitlines()[0][:120]}); "
                            "RMSNorm runs as ONNX Runtime's SimplifiedLayerNormalization")
    return converted, _note(f"opset raised from {model_opset(model)} to 23 so that RMSNorm lowers to RMSNormalization")


def _note(text: str) -> PassResult:
    return PassResult("raise_opset_for_rmsnormalization", exact=True, notes=[text])


def lower_canonical_to_standard_ops(graph: gs.Graph, ctx: PassContext, result: PassResult) -> None:
    """Replace each canonical normdeploy node by the standard ops ONNX Runtime runs fastest."""
    namer = Namer(graph)
    opset = graph.opset
    for node in list(graph.nodes):
        if node.domain != DOMAIN or node.op not in ATTRIBUTES:
            continue
        result.matched += 1
        reason = _why_not_lowerable(node)
        if reason:
            result.skip(node.name, reason)
            continue
        _lower_node(graph, node, namer, opset)
        result.rewrote(f"{node.op} {node.name} lowered to standard ops", node.name)
    short = [n.name for n in graph.nodes if n.op == "ReduceMean" and n.name.endswith("_ReduceMean")
             and any(r.node and n.name.startswith(r.node) for r in result.rewrites)]
    if short:
        result.notes.append(f"{len(short)} GroupScaling statistic(s) over rows shorter than {SHORT_ROW} kept as "
                            "Mul, ReduceMean, Add, Sqrt, Div (faster there than ONNX Runtime's fused kernel)")
    if any(n.op == "SimplifiedLayerNormalization" for n in graph.nodes):
        result.notes.append("model opset < 23: RMSNorm runs as ONNX Runtime's SimplifiedLayerNormalization")
