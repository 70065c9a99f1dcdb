"""Canonical normalization ops of the ONNX domain ``normdeploy`` (version 1).

Passes match on ``(domain, op_type)``; every op below also has an ONNX function body
(:func:`function_proto`) so that a file still holding one runs on any ONNX runtime, and
a NumPy reference (:data:`REFERENCE`) that tests and emulators compare against.

| op           | inputs               | attributes                  | eval math |
|--------------|----------------------|-----------------------------|-----------|
| UnifiedNorm  | X, R, W, B           | epsilon=1e-5, axis=1        | W X / sqrt(R + eps) + B, per channel on ``axis`` |
| PowerNorm    | X, Phi, W, B         | groups=1, epsilon=1e-5      | W GroupScaling(X) / sqrt(Phi + eps) + B, channels last |
| GroupScaling | X                    | groups=1, epsilon=1e-5      | X / sqrt(mean_group(X^2) + eps), channels last |
| RMSNorm      | X, G                 | epsilon=1e-6 (eps_outside=0, partial=0) | G X / sqrt(mean(X^2) + eps) |
| CRMSNorm     | X, G                 | epsilon=1e-6                | G X / sqrt((sum X^2 + (sum X)^2) / (d) + eps), d = width + 1 |
| DynamicTanh  | X, Alpha, W, B       | axis=-1                     | W tanh(Alpha X) + B, per channel on ``axis`` |
| ScaleNorm    | X, G                 | epsilon=1e-5                | G X / max(norm2(X), eps), last axis, G scalar |

Per-channel parameters are 1-D of length C; ``axis`` names the channel axis of X.

RMSNorm's variant attributes (bzhangGo/rmsnorm, rmsnorm_torch.py and rmsnorm_tensorflow.py):
``eps_outside=1`` adds eps to the RMS outside the root, ``G X / (sqrt(mean(X_s^2)) + eps)``;
``partial=k`` (0 < k < C) takes the statistic over the first k channels only, ``X_s = X[..., :k]``,
and divides all C of them (partial RMSNorm, the paper's ``p``, k = int(C p)); ``partial=0`` is
every channel. With both at 0 the op is the plain RMSNorm above. The function body of RMSNorm
handles the variant attributes only where a node of the model uses them (:func:`attach_functions`),
so that a model of plain RMSNorms keeps the plain body, which ONNX Runtime fuses as it is.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "normdeploy"
VERSION = 1

#: attribute defaults per op; an attribute missing on a node takes its default.
_EPS5, _EPS6 = float(np.float32(1e-5)), float(np.float32(1e-6))  # what a float attribute holds in a file
ATTRIBUTES: dict[str, dict[str, float | int]] = {
    "UnifiedNorm": {"epsilon": _EPS5, "axis": 1},
    "PowerNorm": {"groups": 1, "epsilon": _EPS5},
    "GroupScaling": {"groups": 1, "epsilon": _EPS5},
    "RMSNorm": {"epsilon": _EPS6, "eps_outside": 0, "partial": 0},
    "CRMSNorm": {"epsilon": _EPS6},
    "DynamicTanh": {"axis": -1},
    "ScaleNorm": {"epsilon": _EPS5},
}
INPUTS: dict[str, tuple[str, ...]] = {
    "UnifiedNorm": ("X", "R", "W", "B"),
    "PowerNorm": ("X", "Phi", "W", "B"),
    "GroupScaling": ("X",),
    "RMSNorm": ("X", "G"),
    "CRMSNorm": ("X", "G"),
    "DynamicTanh": ("X", "Alpha", "W", "B"),
    "ScaleNorm": ("X", "G"),
}
OPS = tuple(ATTRIBUTES)


def node_attributes(node: onnx.NodeProto) -> dict[str, float | int]:
    """The node's attributes with the op's defaults filled in."""
    attrs = dict(ATTRIBUTES[node.op_type])
    for a in node.attribute:
        attrs[a.name] = helper.get_attribute_value(a)
    return attrs


# ----------------------------------------------------------------------------- numpy references

def _bcast(v: np.ndarray, rank: int, axis: int) -> np.ndarray:
    pos = axis % rank
    return v.reshape([-1] + [1] * (rank - pos - 1))


def _ref_unified(x, r, w, b, epsilon=1e-5, axis=1):
    scale = w / np.sqrt(r + np.asarray(epsilon, r.dtype))
    return x * _bcast(scale, x.ndim, axis) + _bcast(b, x.ndim, axis)


def _ref_group_scaling(x, groups=1, epsilon=1e-5):
    c = x.shape[-1]
    g = x.reshape(*x.shape[:-1], groups, c // groups).astype(np.float32)
    g = g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + np.float32(epsilon))
    return g.reshape(x.shape).astype(x.dtype)


def _ref_power(x, phi, w, b, groups=1, epsilon=1e-5):
    xs = _ref_group_scaling(x, groups, epsilon)
    return xs * (w / np.sqrt(phi + np.asarray(epsilon, phi.dtype))) + b


def _ref_rms(x, g, epsilon=1e-6, eps_outside=0, partial=0):
    xf = x.astype(np.float32)
    xs = xf[..., :partial] if partial else xf
    ms = np.mean(xs * xs, axis=-1, keepdims=True)
    if eps_outside:
        return (g * (xf / (np.sqrt(ms) + np.float32(epsilon)))).astype(x.dtype)
    return (g * (xf / np.sqrt(ms + np.float32(epsilon)))).astype(x.dtype)


def _ref_crms(x, g, epsilon=1e-6):
    xf = x.astype(np.float32)
    d = x.shape[-1] + 1
    ms = (np.sum(xf * xf, -1, keepdims=True) + np.sum(xf, -1, keepdims=True) ** 2) / np.float32(d)
    return (g * (xf / np.sqrt(ms + np.float32(epsilon)))).astype(x.dtype)


def _ref_dyt(x, alpha, w, b, axis=-1):
    return _bcast(w, x.ndim, axis) * np.tanh(alpha * x) + _bcast(b, x.ndim, axis)


def _ref_scale(x, g, epsilon=1e-5):
    xf = x.astype(np.float32)
    n = np.sqrt(np.sum(xf * xf, axis=-1, keepdims=True))
    return (g * xf / np.maximum(n, np.float32(epsilon))).astype(x.dtype)


REFERENCE = {
    "UnifiedNorm": _ref_unified,
    "PowerNorm": _ref_power,
    "GroupScaling": _ref_group_scaling,
    "RMSNorm": _ref_rms,
    "CRMSNorm": _ref_crms,
    "DynamicTanh": _ref_dyt,
    "ScaleNorm": _ref_scale,
}


# ----------------------------------------------------------------------------- function bodies

class _Body:
    """Collects the nodes of one function body; names are local to the function.

    ``variant``: write the body that also reads RMSNorm's ``eps_outside`` and ``partial``."""

    def __init__(self, opset: int, variant: bool = False):
        self.opset, self.nodes, self._n, self.variant = opset, [], 0, variant

    def __call__(self, op: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"t{self._n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def attr_const(self, name: str, kind: int) -> str:
        """A Constant whose value is the function attribute ``name`` (float or int)."""
        self._n += 1
        out = f"t{self._n}"
        field = {onnx.AttributeProto.FLOAT: "value_float", onnx.AttributeProto.INT: "value_int"}[kind]
        attr = onnx.AttributeProto(name=field, ref_attr_name=name, type=kind)
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(attr)
        self.nodes.append(node)
        return out

    def ints(self, *values: int) -> str:
        return self("Constant", value=helper.make_tensor("v", TensorProto.INT64, [len(values)], list(values)))

    def reduce(self, op: str, x: str, axes: list[int]) -> str:
        # ReduceSum takes its axes as an input from opset 13, the other reductions from opset 18.
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self(op, x, self.ints(*axes), keepdims=1)
        return self(op, x, axes=axes, keepdims=1)

    def cast_like(self, x: str, like: str) -> str:
        if self.opset < 15:  # no CastLike before opset 15: such bodies compute in float32 only
            return self("Cast", x, to=TensorProto.FLOAT)
        return self("CastLike", x, like)

    def bcast(self, v: str, x: str) -> str:
        """Reshape per-channel ``v`` [C] to broadcast on the channel axis of ``x`` (attribute ``axis``)."""
        rank = self("Size", self("Shape", x))
        pos = self("Mod", self("Add", self.attr_const("axis", onnx.AttributeProto.INT), rank), rank)
        trailing = self("Sub", self("Sub", rank, pos), self("Constant", value=helper.make_tensor("one", TensorProto.INT64, [], [1])))
        ones = self("ConstantOfShape", self("Reshape", trailing, self.ints(1)),
                    value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
        return self("Reshape", v, self("Concat", self("Shape", v), ones, axis=0))


def _body_unified(f: _Body) -> list[str]:
    eps = f.cast_like(f.attr_const("epsilon", onnx.AttributeProto.FLOAT), "R")
    scale = f("Div", "W", f("Sqrt", f("Add", "R", eps)))
    return [f("Add", f("Mul", "X", f.bcast(scale, "X")), f.bcast("B", "X"))]


def _group_scaling(f: _Body, x: str) -> str:
    eps = f.cast_like(f.attr_const("epsilon", onnx.AttributeProto.FLOAT), x)
    groups = f("Reshape", f.attr_const("groups", onnx.AttributeProto.INT), f.ints(1))
    shape = f("Shape", x)
    grouped_shape = f("Concat", f("Slice", shape, f.ints(0), f.ints(-1)), groups, f.ints(-1), axis=0)
    g = f("Reshape", x, grouped_shape)
    ms = f.reduce("ReduceMean", f("Mul", g, g), [-1])
    return f("Reshape", f("Div", g, f("Sqrt", f("Add", ms, eps))), shape)


def _body_group_scaling(f: _Body) -> list[str]:
    return [_group_scaling(f, "X")]


def _body_power(f: _Body) -> list[str]:
    xs = _group_scaling(f, "X")
    eps = f.cast_like(f.attr_const("epsilon", onnx.AttributeProto.FLOAT), "Phi")
    scale = f("Div", "W", f("Sqrt", f("Add", "Phi", eps)))
    return [f("Add", f("Mul", xs, scale), "B")]


def _body_rms(f: _Body) -> list[str]:
    eps = f.cast_like(f.attr_const("epsilon", onnx.AttributeProto.FLOAT), "X")
    if not f.variant:
        ms = f.reduce("ReduceMean", f("Mul", "X", "X"), [-1])
        return [f("Mul", "G", f("Div", "X", f("Sqrt", f("Add", ms, eps))))]
    # the variant body: s = X[..., :end] with end = partial, or every channel where partial is 0;
    # den = sqrt(mean(s^2) + eps * (1 - o)) + eps * o with o = eps_outside in {0, 1}: each of the two eps
    # terms is eps or exactly 0, and adding 0 changes nothing, so either form is computed exactly
    k = f.attr_const("partial", onnx.AttributeProto.INT)
    zero = f("Constant", value=helper.make_tensor("zero", TensorProto.INT64, [], [0]))
    every = f("Constant", value=helper.make_tensor("every", TensorProto.INT64, [], [2**62]))
    end = f("Reshape", f("Where", f("Equal", k, zero), every, k), f.ints(1))
    s = f("Slice", "X", f.ints(0), end, f.ints(-1))
    ms = f.reduce("ReduceMean", f("Mul", s, s), [-1])
    o = f.cast_like(f.attr_const("eps_outside", onnx.AttributeProto.INT), "X")
    one = f.cast_like(f("Constant", value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])), "X")
    inside, outside = f("Mul", eps, f("Sub", one, o)), f("Mul", eps, o)
    return [f("Mul", "G", f("Div", "X", f("Add", f("Sqrt", f("Add", ms, inside)), outside)))]


#: RMSNorm attributes whose non-default values need the variant body
RMS_VARIANT_ATTRIBUTES = ("eps_outside", "partial")


def rms_variant(attrs) -> dict[str, int]:
    """The variant attributes of an RMSNorm node (``onnx_ir.Node``, ``onnx.NodeProto`` or an attribute dict)
    that differ from the plain RMSNorm (``{}`` for a plain one)."""
    if isinstance(attrs, onnx.NodeProto):
        attrs = {a.name: helper.get_attribute_value(a) for a in attrs.attribute}
    elif not isinstance(attrs, dict):
        attrs = {k: a.value for k, a in attrs.attributes.items()}
    return {k: int(attrs[k]) for k in RMS_VARIANT_ATTRIBUTES if int(attrs.get(k, 0) or 0) != 0}


def _body_crms(f: _Body) -> list[str]:
    eps = f.cast_like(f.attr_const("epsilon", onnx.AttributeProto.FLOAT), "X")
    width = f("Slice", f("Shape", "X"), f.ints(-1), f.ints(2**62))
    d = f.cast_like(f("Add", width, f.ints(1)), "X")
    s = f.reduce("ReduceSum", "X", [-1])
    ss = f.reduce("ReduceSum", f("Mul", "X", "X"), [-1])
    ms = f("Div", f("Add", ss, f("Mul", s, s)), d)
    return [f("Mul", "G", f("Div", "X", f("Sqrt", f("Add", ms, eps))))]


def _body_dyt(f: _Body) -> list[str]:
    t = f("Tanh", f("Mul", "Alpha", "X"))
    return [f("Add", f("Mul", f.bcast("W", "X"), t), f.bcast("B", "X"))]


def _body_scale(f: _Body) -> list[str]:
    eps = f.cast_like(f.attr_const("epsilon", onnx.AttributeProto.FLOAT), "X")
    norm = f("Sqrt", f.reduce("ReduceSum", f("Mul", "X", "X"), [-1]))
    return [f("Mul", "G", f("Div", "X", f("Max", norm, eps)))]


_BODIES = {
    "UnifiedNorm": _body_unified,
    "PowerNorm": _body_power,
    "GroupScaling": _body_group_scaling,
    "RMSNorm": _body_rms,
    "CRMSNorm": _body_crms,
    "DynamicTanh": _body_dyt,
    "ScaleNorm": _body_scale,
}


def function_proto(op: str, opset: int, variant: bool = False) -> onnx.FunctionProto:
    """The ONNX function body of canonical ``op``, written for default-domain ``opset``; ``variant``: RMSNorm's
    body that reads ``eps_outside`` and ``partial`` too (the plain one computes only their defaults)."""
    f = _Body(opset, variant and op == "RMSNorm")
    (out,) = _BODIES[op](f)
    f.nodes.append(helper.make_node("Identity", [out], ["Y"]))
    defaults = [helper.make_attribute(name, value) for name, value in ATTRIBUTES[op].items()]
    return helper.make_function(
        DOMAIN, op, list(INPUTS[op]), ["Y"], f.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attribute_protos=defaults,  # a node that leaves an attribute out gets the op's default
    )


def model_opset(model) -> int:
    """The default-domain opset of an ``onnx_ir.Model`` (or an ``onnx.ModelProto``)."""
    if isinstance(model, onnx.ModelProto):
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                return o.version
        raise ValueError("model imports no default ONNX opset")
    for domain in ("", "ai.onnx"):
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    raise ValueError("model imports no default ONNX opset")


def attach_functions(model):
    """Give ``model`` (an ``onnx_ir.Model``, or an ``onnx.ModelProto``) the function bodies of the
    canonical ops it uses, and no others.

    Idempotent; bodies are regenerated for the model's default-domain opset. RMSNorm gets the
    variant body where one of its nodes has ``eps_outside`` or ``partial`` set (:func:`rms_variant`).
    """
    if isinstance(model, onnx.ModelProto):
        return _attach_functions_proto(model)
    import onnx_ir as ir

    used = sorted({n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN and n.op_type in _BODIES})
    for key in [k for k in model.functions if k[0] == DOMAIN]:
        del model.functions[key]
    opset = model_opset(model)
    variant = any(rms_variant(n) for n in model.graph.all_nodes() if n.domain == DOMAIN and n.op_type == "RMSNorm")
    for op in used:
        fn = ir.serde.deserialize_function(function_proto(op, opset, variant))
        model.functions[fn.identifier()] = fn
    if used and DOMAIN not in model.opset_imports:
        model.opset_imports[DOMAIN] = VERSION
    return model


def _attach_functions_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    used = sorted({n.op_type for n in _all_nodes(model.graph) if n.domain == DOMAIN and n.op_type in _BODIES})
    keep = [fn for fn in model.functions if fn.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)
    opset = model_opset(model)
    variant = any(rms_variant(n) for n in _all_nodes(model.graph) if n.domain == DOMAIN and n.op_type == "RMSNorm")
    model.functions.extend(function_proto(op, opset, variant) for op in used)
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model


def _all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            for g in a.graphs:
                yield from _all_nodes(g)
