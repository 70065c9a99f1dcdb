"""Precision conversion: an fp32 ONNX model becomes an fp16 or bf16 one whose normalization
statistics are still computed in fp32 (DESIGN.md section 4).

TensorRT 11 builds only strongly typed networks: the type of every tensor is read from the
ONNX file, so an fp16 engine needs an fp16 model. Converting *every* op is what loses
accuracy: a variance computed in fp16 overflows as soon as the centred activations exceed
sqrt(65504) ~ 256, and a LayerNorm pinned to fp32 by a builder flag drags the block
around it to fp32. This module converts the graph itself and decides, node by node, in
which precision each one computes.

What runs in low precision, what stays fp32, and why:

* **Low precision** (fp16/bf16 inputs and outputs): every standard op whose schema accepts
  the low type at the model's opset (MatMul, Gemm, Conv, Add, Gelu, Softmax, Reshape, ...),
  and every TensorRT plugin node (``op_type`` starting with ``Normdeploy``): its kernel
  loads low-precision tensors and accumulates in fp32; its float inputs (data, and by
  default its gains/biases too: ``plugin_params``) are low precision and its attributes
  are kept as they are. Softmax stays low: its kernels subtract the row maximum
  (so every exponential is <= 1), the denominator is at most the row length, and both
  TensorRT and ONNX Runtime accumulate it in fp32.
* **fp32, wrapped in Casts**: the normalization ops that compute statistics
  (LayerNormalization, RMSNormalization, ONNX Runtime's SimplifiedLayerNormalization and
  Skip*LayerNormalization, BatchNormalization, InstanceNormalization,
  GroupNormalization, MeanVarianceNormalization, LpNormalization) and canonical
  ``normdeploy`` nodes left unlowered (their function bodies form squares and means).
  The data input is cast up, scale/bias/statistics stay the original fp32 initializers,
  the output is cast down once.
* **fp32 statistic chains** of decomposed normalizations: every reduction (ReduceMean,
  ReduceSum, ReduceSumSquare, ReduceL1/L2, ReduceLogSum(Exp), ReduceProd), a square
  (``Pow(x, 2)`` or ``Mul(x, x)``) that feeds a reduction, every elementwise op whose
  non-constant inputs all come from such a statistic (``+ eps``, ``Sqrt``,
  ``Reciprocal``, ...), and the one op where a statistic meets the data (``x - mean``,
  ``x / std``, ``x * rstd``), followed by its per-channel scale and bias (constant ``Mul``
  and ``Add``) as for LayerNormalization; the result is normalized, so it is rounded to
  low precision safely. A decomposed LayerNorm therefore never forms a square or a
  variance in fp16, and it is the same fp32 island as a LayerNormalization op (which
  also keeps ONNX Runtime's LayerNorm fusion from binding fp16 and fp32 to one type).
* **fp32 shape arithmetic**: floats computed from ``Shape``/``Size`` values (scale
  factors like ``1/sqrt(head_dim)`` taken from a shape) keep fp32, so integer-valued
  sizes above 2048 stay exact; integer tensors are never touched.
* Ops whose schema does not accept the low type (or fixes an input to ``tensor(float)``,
  e.g. Resize scales), ops of unknown domains, float ``Range`` (positions stay exact), and
  ops with a float ``dtype`` attribute (RandomNormal, EyeLike, ...) keep fp32. Shape and
  Size read whatever type they are given (no Cast just to take a shape).

Constants: every fp32 initializer and ``Constant`` is cast **once**, at conversion time,
from its stored value (folded weights were computed in float64 and stored once) to each
precision its consumers need; an fp32 copy is kept only if an fp32 consumer exists, and
no Cast node ever reads a constant. float64 tensors are left alone. Finite values beyond the low type's range saturate
to its largest finite value (fp32 ``finfo.min`` attention masks become -65504 rather than
-inf, so ``0 * mask`` stays 0); infinities and NaN stay what they are.

Graph inputs and outputs keep their names and stay fp32 unless ``io_dtype`` says
otherwise; Cast nodes sit at the boundary. A Cast is inserted wherever a tensor's producer
and consumer disagree on precision, once per (tensor, precision).

Control flow (If/Loop/Scan) is refused: its subgraphs read outer tensors implicitly.

Works on an ``onnx_ir.Model`` (a ModelProto is accepted and returned as one): the conversion
edits a clone that shares every tensor it does not convert, so the input is left as it is; the
model is never serialized whole (type inference and onnx.checker are called without the
initializers above 1 KB), and each fp32 constant is read, chunk by chunk, straight from its
stored (possibly memory-mapped) value. Models past the 2 GB protobuf limit convert.

Its accuracy on CPU is measured by :mod:`normdeploy.verify.precision`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from ..core.errors import UnsupportedError
from ..core.graph import DEFAULT_DOMAINS, opset_of, to_proto
from ..core.store import tensor as spilled_tensor

FLOAT = TensorProto.FLOAT
DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_TYPE_STR = {TensorProto.FLOAT: "tensor(float)", TensorProto.FLOAT16: "tensor(float16)",
             TensorProto.BFLOAT16: "tensor(bfloat16)"}
_SHORT = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)

PLUGIN_PREFIX = "Normdeploy"
CANONICAL_DOMAIN = "normdeploy"

#: normalization ops computed in fp32 between Casts: (domain, op_type); "" covers ai.onnx
#: and ONNX Runtime's default-domain contrib ops.
NORM_OPS = {
    ("", "LayerNormalization"), ("", "RMSNormalization"), ("", "SimplifiedLayerNormalization"),
    ("", "BatchNormalization"), ("", "InstanceNormalization"), ("", "GroupNormalization"),
    ("", "MeanVarianceNormalization"), ("", "LpNormalization"),
    ("com.microsoft", "SkipLayerNormalization"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
    ("com.microsoft", "LayerNormalization"), ("com.microsoft", "SimplifiedLayerNormalization"),
}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceProd"}
#: ops a statistic flows through unchanged in kind (it stays a per-row statistic)
_STAT_PASS = {"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Max", "Min", "Clip", "Neg", "Abs",
              "Identity", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Transpose", "Flatten", "Cast",
              "CastLike"}
#: where a statistic meets the data: computed in fp32, result is normalized (not a statistic)
_STAT_COMBINE = {"Add", "Sub", "Mul", "Div"}
_SHAPE_SOURCES = {"Shape", "Size"}
_CONTROL_FLOW = {"If", "Loop", "Scan"}
_TYPE_AGNOSTIC = {"Shape", "Size"}
#: elements converted at a time (bounds the float64 temporaries of a huge weight)
_CHUNK = 1 << 22

Model = onnx.ModelProto | ir.Model


@dataclass
class Conversion:
    """The converted model (of the type given: ``onnx.ModelProto`` or ``onnx_ir.Model``) and what the conversion did."""

    model: Model | None
    dtype: str
    io_dtype: str
    fp32_nodes: dict[str, str] = field(default_factory=dict)  # node name -> why it stays fp32
    low_nodes: int = 0
    casts_inserted: int = 0
    constants_converted: int = 0
    saturated_values: int = 0  # finite constant entries beyond the low range, clamped
    underflowed_values: int = 0  # non-zero constant entries that became zero

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for why in self.fp32_nodes.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {"dtype": self.dtype, "io_dtype": self.io_dtype, "low_precision_nodes": self.low_nodes,
                "fp32_nodes": len(self.fp32_nodes), "fp32_reasons": reasons, "casts_inserted": self.casts_inserted,
                "constants_converted": self.constants_converted, "saturated_values": self.saturated_values,
                "underflowed_values": self.underflowed_values}


def convert_precision(model: Model, dtype: str = "fp16", io_dtype: str = "fp32", plugin_params: str = "low") -> Model:
    """``model`` (fp32) converted to ``dtype`` ("fp16" | "bf16"), statistics in fp32 (module docstring).

    ``model`` is an ``onnx_ir.Model`` (left as it is: a new one is returned, sharing the
    tensors that are not converted) or an ``onnx.ModelProto`` (a ModelProto is returned).
    ``io_dtype``: the type of the graph's float inputs and outputs ("fp32", "fp16", "bf16").
    ``plugin_params``: "low" (a plugin node's gains/biases in ``dtype``, like its data) or
    "fp32" (only the data input is low precision; the plugins accept both).
    """
    return convert_precision_detailed(model, dtype, io_dtype, plugin_params).model


def convert_precision_detailed(model: Model, dtype: str = "fp16", io_dtype: str = "fp32",
                               plugin_params: str = "low") -> Conversion:
    """:func:`convert_precision`, returning the :class:`Conversion` record as well."""
    conv = _convert(_working_copy(model), dtype, io_dtype, plugin_params)
    if isinstance(model, onnx.ModelProto):
        conv.model = to_proto(conv.model)
    return conv


def _working_copy(model: Model) -> ir.Model:
    """An ``onnx_ir.Model`` the conversion may edit: the proto deserialized, or a clone sharing the tensors."""
    return ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model.clone()


def _convert(model: ir.Model, dtype: str, io_dtype: str, plugin_params: str) -> Conversion:
    """Convert ``model`` in place; the record's ``model`` is ``model``."""
    if dtype not in ("fp16", "bf16"):
        raise UnsupportedError(f"precision {dtype!r} is not a low precision", "use fp16 or bf16")
    if io_dtype not in DTYPES:
        raise UnsupportedError(f"--io-dtype {io_dtype!r} is unknown", "use fp32, fp16 or bf16")
    if plugin_params not in ("low", "fp32"):
        raise ValueError(f"plugin_params must be 'low' or 'fp32', not {plugin_params!r}")
    return _Converter(model, DTYPES[dtype], DTYPES[io_dtype], plugin_params == "fp32").run()


#: the compute precision each target's engine is built in (None: fp32, no conversion)
TARGET_DTYPE = {"trt-fp32": None, "trt-fp16": "fp16", "trt-bf16": "bf16"}


def convert_for_target(model: Model, target: str, io_dtype: str = "fp32") -> tuple[Model, dict]:
    """The precision step of the ``lower`` stage for ``target``: the converted model and a report.

    The model comes back as the type it was given (``onnx_ir.Model`` or ``onnx.ModelProto``);
    for ``trt-fp32`` it is ``model`` itself. The report holds ``precision`` (what the
    conversion did, :meth:`Conversion.summary`); its accuracy against the fp32 lowering is
    measured by :func:`normdeploy.verify.precision.precision_error_report`. The converted
    model has passed ``onnx.checker`` (full check; initializers above 1 KB are checked as
    graph inputs of their type and shape, so that no model is serialized whole).
    """
    dtype = TARGET_DTYPE.get(target)
    if dtype is None:
        if io_dtype != "fp32":
            raise UnsupportedError(f"--io-dtype {io_dtype} needs an fp16 or bf16 target, not {target}",
                                   "use --target trt-fp16 / trt-bf16, or drop --io-dtype")
        return model, {"precision": {"dtype": "fp32", "io_dtype": "fp32"}}
    conv = _convert(_working_copy(model), dtype, io_dtype, "low")
    try:
        _call_onnx_api(lambda proto: onnx.checker.check_model(proto, full_check=True), conv.model)
    except Exception as e:  # noqa: BLE001 - a converter bug, reported as such
        raise UnsupportedError(f"the {dtype} model fails onnx.checker: {str(e).splitlines()[0][:200]}",
                               "report this as a bug; --target trt-fp32 avoids the conversion") from None
    converted = to_proto(conv.model) if isinstance(model, onnx.ModelProto) else conv.model
    return converted, {"precision": conv.summary()}


def _call_onnx_api(fn, model: ir.Model):
    """``fn(proto)`` on ``model`` serialized without its initializers above 1 KB (they travel as typed graph
    inputs); the model is left as it was, initializer order included."""
    from onnx_ir.passes.common import _c_api_utils

    order = list(model.graph.initializers)
    try:
        return _c_api_utils.call_onnx_api(fn, model)
    finally:
        inits = model.graph.initializers
        if list(inits) != order:  # call_onnx_api re-registers the large ones last
            values = [inits[name] for name in order]
            for name in order:
                inits.pop(name)
            for v in values:
                model.graph.register_initializer(v)


# ----------------------------------------------------------------------------- analysis

def _opset(model: Model, domain: str = "") -> int:
    if isinstance(model, onnx.ModelProto):
        for o in model.opset_import:
            if (o.domain or "") in ((domain,) if domain else ("", "ai.onnx")):
                return o.version
        return 1
    return opset_of(model.graph, domain) or 1


def is_plugin(node: onnx.NodeProto | ir.Node) -> bool:
    """A TensorRT plugin node of normdeploy: ``op_type`` Normdeploy*, or a ``plugin_namespace`` attribute."""
    names = [a.name for a in node.attribute] if isinstance(node, onnx.NodeProto) else node.attributes
    return node.op_type.startswith(PLUGIN_PREFIX) or "plugin_namespace" in names


def _domain(node: ir.Node) -> str:
    return "" if node.domain in DEFAULT_DOMAINS else node.domain


def _constant_value(node: ir.Node) -> np.ndarray | None:
    for name, a in node.attributes.items():
        if a.is_ref():
            continue
        if name == "value":
            return a.as_tensor().numpy()
        if name == "value_float":
            return np.asarray(a.value, np.float32)
        if name == "value_floats":
            return np.asarray(list(a.value), np.float32)
    return None


def elem_types(model: Model) -> dict[str, int]:
    """Element type (ONNX ``TensorProto`` code) of every tensor, by name (:func:`_value_types`)."""
    m = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    return {v.name: int(t) for v, t in _value_types(m).items() if v.name}


def _value_types(model: ir.Model) -> dict[ir.Value, int]:
    """Element type of every value of the main graph that ONNX type inference, the model's own
    value infos, initializers and Constants tell, completed by a schema walk for nodes inference
    could not type (custom ops): a plugin or canonical node's outputs take the type of its first input."""
    g = model.graph
    types: dict[ir.Value, int] = {}
    by_name = ir.convenience.create_value_mapping(g)
    for v in by_name.values():
        if v.dtype and isinstance(v.type, ir.TensorType):
            types[v] = v.dtype
    try:
        inferred = _call_onnx_api(onnx.shape_inference.infer_shapes, model).graph
    except Exception:  # noqa: BLE001 - inference is best effort
        inferred = None
    if inferred is not None:
        for vi in list(inferred.input) + list(inferred.output) + list(inferred.value_info):
            v = by_name.get(vi.name)
            if v is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[v] = vi.type.tensor_type.elem_type
    for v in g.initializers.values():
        if v.const_value is not None:
            types[v] = v.const_value.dtype
        elif v.dtype is not None:
            types[v] = v.dtype
    opset = _opset(model)
    for n in g:
        if n.op_type == "Constant" and _domain(n) == "" and n.outputs:
            for name, a in n.attributes.items():
                if a.is_ref():
                    continue
                if name == "value":
                    types[n.outputs[0]] = a.as_tensor().dtype
                elif name in ("value_float", "value_floats"):
                    types[n.outputs[0]] = FLOAT
                elif name in ("value_int", "value_ints"):
                    types[n.outputs[0]] = TensorProto.INT64
        missing = [o for o in n.outputs if o.name and o not in types]
        if not missing:
            continue
        known = [types.get(i) if i is not None else None for i in n.inputs]
        if is_plugin(n) or _domain(n) == CANONICAL_DOMAIN:
            if known and known[0]:
                for o in missing:
                    types[o] = known[0]
            continue
        schema = _schema(n, opset)
        if schema is None:
            continue
        for j, o in enumerate(n.outputs):
            if not o.name or o in types or j >= len(schema.outputs) and not _variadic(schema.outputs):
                continue
            formal = schema.outputs[min(j, len(schema.outputs) - 1)]
            if formal.type_str.startswith("tensor("):
                types[o] = _tensor_type_from_str(formal.type_str) or 0
                continue
            for k, i in enumerate(n.inputs):
                f = _formal(schema.inputs, k)
                if f is not None and i is not None and f.type_str == formal.type_str and types.get(i):
                    types[o] = types[i]
                    break
    return {v: int(t) for v, t in types.items() if t}


def _tensor_type_from_str(s: str) -> int | None:
    for t, name in _TYPE_STR.items():
        if name == s:
            return t
    return None


def _variadic(formals) -> bool:
    return bool(formals) and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic


def _formal(formals, index: int):
    if index < len(formals):
        return formals[index]
    return formals[-1] if _variadic(formals) else None


def _schema(node: ir.Node, opset: int):
    if _domain(node) != "":
        return None
    try:
        return onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:  # noqa: BLE001 - unknown op (e.g. ONNX Runtime contrib in the default domain)
        return None


def _allowed(schema, type_str: str) -> set[str] | None:
    """Allowed type strings of a formal parameter's type string (None: fixed, not a variable)."""
    for c in schema.type_constraints:
        if c.type_param_str == type_str:
            return set(c.allowed_type_strs)
    return None


class _Converter:
    """Converts one ``onnx_ir.Model`` in place (:func:`_convert`)."""

    def __init__(self, model: ir.Model, low: int, io: int, plugin_params_fp32: bool = False):
        g = model.graph
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for n in g for a in n.attributes.values()) or any(n.op_type in _CONTROL_FLOW for n in g):
            raise UnsupportedError("precision conversion does not handle control flow (If/Loop/Scan)",
                                   "convert this model to fp16 with your own tools, or use --target trt-fp32")
        if low == TensorProto.BFLOAT16 and _opset(model) < 13:
            raise UnsupportedError(f"bf16 needs ONNX opset 13 or newer; the model has opset {_opset(model)}",
                                   "re-export with --opset 17 or newer")
        self.model, self.graph = model, g
        self.low, self.io, self.plugin_params_fp32 = low, io, plugin_params_fp32
        self.opset = _opset(model)
        self.types = _value_types(model)
        graph_inputs = set(g.inputs)
        self.inits = {v for v in g.initializers.values() if v not in graph_inputs}  # overridable = input
        self.consts = {n.outputs[0]: n for n in g if n.op_type == "Constant" and _domain(n) == ""
                       and len(n.outputs) == 1 and _constant_value(n) is not None}
        self.used_names = {n.name for n in g if n.name} | {v.name for v in g.inputs} | set(g.initializers) \
            | {v.name for v in g.outputs} | {v.name for n in g for v in (*n.inputs, *n.outputs) if v is not None}
        self.conv = Conversion(model, _SHORT[low], _SHORT[io])

    # -- helpers -------------------------------------------------------------------------------

    def is_float(self, v: ir.Value | None) -> bool:
        return v is not None and self.types.get(v) == FLOAT

    def is_const(self, v: ir.Value | None) -> bool:
        return v in self.inits or v in self.consts

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used_names:
            i += 1
            name = f"{base}_{i}"
        self.used_names.add(name)
        return name

    def const_array(self, v: ir.Value) -> np.ndarray:
        if v in self.inits:
            return v.const_value.numpy()  # memory-mapped where the weights are external data
        return _constant_value(self.consts[v])

    def uses(self, v: ir.Value) -> int:
        """How many node inputs read ``v`` (a node reading it twice counts twice)."""
        return len(v.uses())

    # -- node modes -------------------------------------------------------------------------------

    def plan(self) -> dict[ir.Node, str | None]:
        """For each node: None (low precision) or the reason it computes in fp32."""
        reasons: dict[ir.Node, str | None] = {}
        shape_ints: set[ir.Value] = set()  # integer tensors computed from Shape/Size
        shape_floats: set[ir.Value] = set()  # float tensors computed from shape values
        stats: set[ir.Value] = set()  # fp32 statistic tensors
        normalized: set[ir.Value] = set()  # fp32 results of applying a statistic, and their affine tail
        for n in self.graph:
            dom, op = _domain(n), n.op_type
            float_ins = [i for i in n.inputs if self.is_float(i)]
            float_outs = [o for o in n.outputs if self.is_float(o)]
            nonconst_float_ins = [i for i in float_ins if not self.is_const(i)]
            # shape-value taint
            if op in _SHAPE_SOURCES or any(i in shape_ints for i in n.inputs if i is not None):
                shape_ints.update(o for o in n.outputs if not self.is_float(o) and self.types.get(o) not in _FLOATS)
            if op in ("Cast", "CastLike") and n.inputs and n.inputs[0] in shape_ints:
                shape_floats.update(float_outs)
            elif any(i in shape_floats for i in float_ins):
                shape_floats.update(float_outs)
            reason: str | None = None
            if is_plugin(n):
                reasons[n] = None
                continue
            if (dom, op) in NORM_OPS:
                reason = "normalization op: statistics in fp32"
            elif dom == CANONICAL_DOMAIN:
                reason = "canonical normdeploy op: statistics in fp32"
            elif dom != "":
                reason = f"op of domain {dom!r}: precision support unknown"
            elif op in REDUCTIONS:
                reason = "reduction: statistic in fp32"
            elif self._square_into_reduction(n):
                reason = "square feeding a reduction: statistic in fp32"
            elif nonconst_float_ins and all(i in stats for i in nonconst_float_ins) and op in _STAT_PASS:
                reason = "statistic chain: fp32"
                stats.update(float_outs)
            elif op in _STAT_COMBINE and any(i in stats for i in nonconst_float_ins):
                reason = "applies a statistic to the data: fp32, result normalized"
                if op in ("Div", "Mul"):
                    normalized.update(o for o in float_outs if self.uses(o) == 1)
            elif op in ("Mul", "Add") and len(nonconst_float_ins) == 1 and nonconst_float_ins[0] in normalized \
                    and len(float_ins) == 2:
                reason = "scale/bias of a normalization: fp32, as LayerNormalization's"
                normalized.update(o for o in float_outs if self.uses(o) == 1)
            elif any(i in shape_floats for i in float_ins) or any(o in shape_floats for o in float_outs):
                reason = "shape arithmetic: fp32"
            elif op == "Range" and float_outs:
                reason = "Range over floats: positions stay exact in fp32"
            elif "dtype" in n.attributes and float_outs:
                reason = "float dtype attribute: fp32"
            elif float_ins or float_outs:
                reason = self._schema_refuses(n)
            if reason and (op in REDUCTIONS or reason.startswith("square")):
                stats.update(float_outs)
            if reason and not (float_ins or float_outs):
                reason = None  # nothing of its precision to decide
            reasons[n] = reason
        return reasons

    def _square_into_reduction(self, n: ir.Node) -> bool:
        if not n.outputs or not any(c.op_type in REDUCTIONS for c, _ in n.outputs[0].uses()):
            return False
        if n.op_type == "Mul" and len(n.inputs) == 2 and n.inputs[0] is not None and n.inputs[0] is n.inputs[1]:
            return True
        if n.op_type == "Pow" and len(n.inputs) == 2 and self.is_const(n.inputs[1]):
            e = np.asarray(self.const_array(n.inputs[1]), np.float64)
            return e.size == 1 and float(e.reshape(-1)[0]) >= 2.0
        return False

    def _schema_refuses(self, n: ir.Node) -> str | None:
        schema = _schema(n, self.opset)
        if schema is None:
            return f"no ONNX schema for {n.op_type} at opset {self.opset}: kept fp32"
        low_str = _TYPE_STR[self.low]
        for values, formals in ((n.inputs, schema.inputs), (n.outputs, schema.outputs)):
            for k, v in enumerate(values):
                if not self.is_float(v):
                    continue
                f = _formal(formals, k)
                if f is None:
                    continue
                allowed = _allowed(schema, f.type_str)
                if allowed is not None and low_str not in allowed:
                    return f"{n.op_type} has no {_SHORT[self.low]} kernel in the ONNX schema: fp32"
        return None

    def _low_slots(self, n: ir.Node) -> tuple[set[int], set[int]]:
        """Indices of the float inputs and outputs that become low precision in a low node."""
        if is_plugin(n):
            return ({k for k, i in enumerate(n.inputs) if self.is_float(i) and not (k > 0 and self.plugin_params_fp32)},
                    {k for k, o in enumerate(n.outputs) if self.is_float(o)})
        schema = _schema(n, self.opset)
        ins, outs = set(), set()
        for k, i in enumerate(n.inputs):
            if self.is_float(i):
                f = _formal(schema.inputs, k) if schema else None
                if f is not None and _allowed(schema, f.type_str) is not None:
                    ins.add(k)
        for k, o in enumerate(n.outputs):
            if self.is_float(o):
                f = _formal(schema.outputs, k) if schema else None
                if f is not None and _allowed(schema, f.type_str) is not None:
                    outs.add(k)
        return ins, outs

    # -- rewriting ----------------------------------------------------------------------------

    def convert_constant(self, arr: np.ndarray, to: int) -> np.ndarray:
        """``arr`` rounded once to ``to``; finite values beyond its range saturate (counted), chunk by chunk."""
        a = np.asarray(arr)
        if to == FLOAT:
            return a.astype(np.float32)
        if to == TensorProto.FLOAT16:
            big = float(np.finfo(np.float16).max)
            out_t = np.dtype(np.float16)
            tiny = float(np.finfo(np.float16).smallest_subnormal)
        else:
            import ml_dtypes

            big = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
            out_t = np.dtype(ml_dtypes.bfloat16)
            tiny = float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_subnormal)
        out = np.empty(a.shape, out_t)
        flat_in, flat_out = a.reshape(-1), out.reshape(-1)
        for start in range(0, flat_in.size, _CHUNK):
            a64 = flat_in[start:start + _CHUNK].astype(np.float64)
            finite = np.isfinite(a64)
            over = finite & (np.abs(a64) > big)
            self.conv.saturated_values += int(over.sum())
            self.conv.underflowed_values += int((finite & (a64 != 0) & (np.abs(a64) < tiny / 2)).sum())
            flat_out[start:start + _CHUNK] = np.where(over, np.sign(a64) * big, a64).astype(out_t)
        return out

    def run(self) -> Conversion:
        g = self.graph
        nodes = list(g)
        reasons = self.plan()
        actual: dict[ir.Value, int] = {}  # dtype of each float tensor as produced in the new graph
        for v in g.inputs:
            if v not in self.inits and self.is_float(v):
                actual[v] = self.io
        cast_cache: dict[tuple[ir.Value, int], ir.Value] = {}
        const_cache: dict[tuple[ir.Value, int], ir.Value] = {}
        fp32_const_uses: set[ir.Value] = set()

        def need(v: ir.Value, to: int, reader: ir.Node) -> ir.Value:
            """``v`` as a tensor of type ``to``, for ``reader`` (a Cast goes right before it)."""
            if self.is_const(v):
                if to == FLOAT:
                    fp32_const_uses.add(v)
                    return v
                key = (v, to)
                if key not in const_cache:
                    arr = self.convert_constant(self.const_array(v), to)
                    name = self.fresh(f"{v.name}_{_SHORT[to]}")
                    new = ir.Value(name=name, const_value=spilled_tensor(arr, name), shape=ir.Shape(arr.shape),
                                   type=ir.TensorType(ir.DataType(to)))
                    g.register_initializer(new)
                    self.conv.constants_converted += 1
                    const_cache[key] = new
                return const_cache[key]
            have = actual.get(v, FLOAT)
            if have == to:
                return v
            key = (v, to)
            if key not in cast_cache:
                out = ir.Value(name=self.fresh(f"{v.name}_{_SHORT[to]}"), shape=v.shape,
                               type=ir.TensorType(ir.DataType(to)))
                g.insert_before(reader, ir.node("Cast", [v], {"to": int(to)}, outputs=[out],
                                                name=self.fresh(f"Cast_{out.name}")))
                self.conv.casts_inserted += 1
                cast_cache[key] = out
                actual[out] = to
            return cast_cache[key]

        const_nodes = set(self.consts.values())
        dropped_consts = []
        for idx, n in enumerate(nodes):
            if n in const_nodes and self.is_float(n.outputs[0]):
                dropped_consts.append(n)  # constants are materialized on demand by need()
                continue
            reason = reasons.get(n)
            float_ins = [k for k, i in enumerate(n.inputs) if self.is_float(i)]
            float_outs = [k for k, o in enumerate(n.outputs) if self.is_float(o)]
            if not float_ins and not float_outs:
                continue
            if reason is None:
                low_in, low_out = self._low_slots(n)
                self.conv.low_nodes += 1
            else:
                low_in, low_out = set(), set()
                self.conv.fp32_nodes[n.name or f"{n.op_type}_{idx}"] = reason
            for k in float_ins:
                if n.op_type in _TYPE_AGNOSTIC and _domain(n) == "":
                    if self.is_const(n.inputs[k]):
                        fp32_const_uses.add(n.inputs[k])  # the shape of the stored constant
                    continue  # Shape/Size read any type: no Cast just to take a shape
                n.replace_input_with(k, need(n.inputs[k], self.low if k in low_in else FLOAT, n))
            for k in float_outs:
                actual[n.outputs[k]] = self.low if k in low_out else FLOAT
            if reason is None:
                _retype_attributes(n, self, low_out)

        # graph outputs: io dtype, original names (a Cast writes the name, the producer an internal one)
        replaced: dict[ir.Value, ir.Value] = {}
        for i, o in enumerate(list(g.outputs)):
            if o in replaced:
                g.outputs[i] = replaced[o]
                continue
            if self.is_float(o) and not self.is_const(o):
                have = actual.get(o, FLOAT)
                if have != self.io:
                    name = o.name
                    out = ir.Value(shape=o.shape, type=ir.TensorType(ir.DataType(self.io)))
                    o.name = self.fresh(f"{name}_{_SHORT[have]}")
                    out.name = name
                    g.append(ir.node("Cast", [o], {"to": int(self.io)}, outputs=[out],
                                     name=self.fresh(f"Cast_{name}_out")))
                    self.conv.casts_inserted += 1
                    actual[out] = self.io
                    replaced[o] = out
                    g.outputs[i] = out
                o_now = g.outputs[i]
                _retype(o_now, actual.get(o_now, FLOAT))
            elif self.is_const(o):
                fp32_const_uses.add(o)  # a constant graph output stays as stored
        for n in dropped_consts:
            if n.outputs[0] not in fp32_const_uses:
                g.remove(n, safe=False)
        for v in self.inits:
            if self.is_float(v) and v not in fp32_const_uses:
                g.initializers.pop(v.name)
        for v in g.inputs:
            if v not in self.inits and self.is_float(v):
                _retype(v, self.io)
        # element types of the tensors the nodes write (shapes stay; Casts took their source's)
        for n in g:
            for o in n.outputs:
                if o in actual and not o.is_graph_output():
                    _retype(o, actual[o])
        return self.conv


def _retype(v: ir.Value, to: int) -> None:
    """Give ``v`` a new tensor type of element type ``to`` (``v.dtype = ...`` would edit its type object in
    place, and onnx-ir's clones share type objects with the model they were cloned from)."""
    v.type = ir.TensorType(ir.DataType(to))


def _retype_attributes(node: ir.Node, conv: _Converter, low_out: set[int]) -> None:
    """A low-precision node whose attributes name fp32 gets them renamed: Cast's ``to``,
    ConstantOfShape's ``value``."""
    if 0 not in low_out:
        return
    if node.op_type == "Cast":
        to = node.attributes.get("to")
        if to is not None and to.value == FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", conv.low)
    elif node.op_type == "ConstantOfShape":
        value = node.attributes.get("value")
        if value is None:  # the default value is fp32 zero
            zero = conv.convert_constant(np.zeros(1, np.float32), conv.low)
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(zero, name="value"))
        elif value.as_tensor().dtype == FLOAT:
            t = value.as_tensor()
            arr = conv.convert_constant(t.numpy(), conv.low)
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(arr, name=t.name))
