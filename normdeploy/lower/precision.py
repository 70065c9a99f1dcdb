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

Its accuracy on CPU is measured by :mod:`normdeploy.verify.precision`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..core.errors import UnsupportedError

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


@dataclass
class Conversion:
    """The converted model and what the conversion did."""

    model: onnx.ModelProto
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


def convert_precision(model: onnx.ModelProto, dtype: str = "fp16", io_dtype: str = "fp32",
                      plugin_params: str = "low") -> onnx.ModelProto:
    """``model`` (fp32) converted to ``dtype`` ("fp16" | "bf16"), statistics in fp32 (module docstring).

    ``io_dtype``: the type of the graph's float inputs and outputs ("fp32", "fp16", "bf16").
    ``plugin_params``: "low" (a plugin node's gains/biases in ``dtype``, like its data) or
    "fp32" (only the data input is low precision; the plugins accept both).
    """
    return convert_precision_detailed(model, dtype, io_dtype, plugin_params).model


def convert_precision_detailed(model: onnx.ModelProto, dtype: str = "fp16", io_dtype: str = "fp32",
                               plugin_params: str = "low") -> Conversion:
    """:func:`convert_precision`, returning the :class:`Conversion` record as well."""
    if dtype not in ("fp16", "bf16"):
        raise UnsupportedError(f"precision {dtype!r} is not a low precision", "use fp16 or bf16")
    if io_dtype not in DTYPES:
        raise UnsupportedError(f"--io-dtype {io_dtype!r} is unknown", "use fp32, fp16 or bf16")
    if plugin_params not in ("low", "fp32"):
        raise ValueError(f"plugin_params must be 'low' or 'fp32', not {plugin_params!r}")
    return _Converter(model, DTYPES[dtype], DTYPES[io_dtype], plugin_params == "fp32").run()


#: the compute precision each target's engine is built in (None: fp32, no conversion)
TARGET_DTYPE = {"trt-fp32": None, "trt-fp16": "fp16", "trt-bf16": "bf16"}


def convert_for_target(model: onnx.ModelProto, target: str, io_dtype: str = "fp32") -> tuple[onnx.ModelProto, dict]:
    """The precision step of the ``lower`` stage for ``target``: the converted model and a report.

    The report holds ``precision`` (what the conversion did, :meth:`Conversion.summary`); its
    accuracy against the fp32 lowering is measured by
    :func:`normdeploy.verify.precision.precision_error_report`. The converted model has
    passed ``onnx.checker`` (full check).
    """
    dtype = TARGET_DTYPE.get(target)
    if dtype is None:
        if io_dtype != "fp32":
            raise UnsupportedError(f"--io-dtype {io_dtype} needs an fp16 or bf16 target, not {target}",
                                   "use --target trt-fp16 / trt-bf16, or drop --io-dtype")
        return model, {"precision": {"dtype": "fp32", "io_dtype": "fp32"}}
    conv = convert_precision_detailed(model, dtype, io_dtype)
    try:
        onnx.checker.check_model(conv.model, full_check=True)
    except Exception as e:  # noqa: BLE001 - a converter bug, reported as such
        raise UnsupportedError(f"the {dtype} model fails onnx.checker: {str(e).splitlines()[0][:200]}",
                               "report this as a bug; --target trt-fp32 avoids the conversion") from None
    return conv.model, {"precision": conv.summary()}


# ----------------------------------------------------------------------------- analysis

def _opset(model: onnx.ModelProto, domain: str = "") -> int:
    for o in model.opset_import:
        if (o.domain or "") in ((domain,) if domain else ("", "ai.onnx")):
            return o.version
    return 1


def is_plugin(node: onnx.NodeProto) -> bool:
    """A TensorRT plugin node of normdeploy: ``op_type`` Normdeploy*, or a ``plugin_namespace`` attribute."""
    return node.op_type.startswith(PLUGIN_PREFIX) or any(a.name == "plugin_namespace" for a in node.attribute)


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.asarray(a.f, np.float32)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), np.float32)
    return None


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor that ONNX type inference, initializers and Constants tell,
    completed by a schema walk for nodes inference could not type (custom ops): a plugin or
    canonical node's outputs take the type of its first input."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    opset = _opset(model)
    for n in model.graph.node:
        if n.op_type == "Constant" and _domain(n) == "":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    types[n.output[0]] = FLOAT
                elif a.name in ("value_int", "value_ints"):
                    types[n.output[0]] = TensorProto.INT64
        missing = [o for o in n.output if o and o not in types]
        if not missing:
            continue
        known = [types.get(i) for i in n.input]
        if is_plugin(n) or _domain(n) == CANONICAL_DOMAIN:
            if known and known[0]:
                for o in missing:
                    types[o] = known[0]
            continue
        schema = _schema(n, opset)
        if schema is None:
            continue
        for j, o in enumerate(n.output):
            if not o or o in types or j >= len(schema.outputs) and not _variadic(schema.outputs):
                continue
            formal = schema.outputs[min(j, len(schema.outputs) - 1)]
            if formal.type_str.startswith("tensor("):
                types[o] = _tensor_type_from_str(formal.type_str) or 0
                continue
            for k, i in enumerate(n.input):
                f = _formal(schema.inputs, k)
                if f is not None and f.type_str == formal.type_str and types.get(i):
                    types[o] = types[i]
                    break
    return {k: v for k, v in types.items() if v}


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


def _schema(node: onnx.NodeProto, opset: int):
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
    def __init__(self, model: onnx.ModelProto, low: int, io: int, plugin_params_fp32: bool = False):
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute) or any(n.op_type in _CONTROL_FLOW
                                                                       for n in model.graph.node):
            raise UnsupportedError("precision conversion does not handle control flow (If/Loop/Scan)",
                                   "convert this model to fp16 with your own tools, or use --target trt-fp32")
        if low == TensorProto.BFLOAT16 and _opset(model) < 13:
            raise UnsupportedError(f"bf16 needs ONNX opset 13 or newer; the model has opset {_opset(model)}",
                                   "re-export with --opset 17 or newer")
        self.src = model
        self.low, self.io, self.plugin_params_fp32 = low, io, plugin_params_fp32
        self.opset = _opset(model)
        self.types = elem_types(model)
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        graph_inputs = {i.name for i in g.input}
        self.inits = {k: v for k, v in self.inits.items() if k not in graph_inputs}  # overridable = input
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and _domain(n) == ""
                       and _constant_value(n) is not None}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.used_names = {t for n in g.node for t in list(n.input) + list(n.output)} | {n.name for n in g.node} \
            | set(self.inits) | graph_inputs | {o.name for o in g.output}
        self.conv = Conversion(onnx.ModelProto(), _SHORT[low], _SHORT[io])

    # -- helpers -------------------------------------------------------------------------------

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == FLOAT

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.consts

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used_names:
            i += 1
            name = f"{base}_{i}"
        self.used_names.add(name)
        return name

    def const_array(self, name: str) -> np.ndarray:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return _constant_value(self.consts[name])

    # -- node modes -------------------------------------------------------------------------------

    def plan(self) -> dict[int, str | None]:
        """For each node index: None (low precision) or the reason it computes in fp32."""
        nodes = list(self.src.graph.node)
        reasons: dict[int, str | None] = {}
        shape_ints: set[str] = set()  # integer tensors computed from Shape/Size
        shape_floats: set[str] = set()  # float tensors computed from shape values
        stats: set[str] = set()  # fp32 statistic tensors
        normalized: set[str] = set()  # fp32 results of applying a statistic, and their affine tail
        for idx, n in enumerate(nodes):
            dom, op = _domain(n), n.op_type
            float_ins = [i for i in n.input if i and self.is_float(i)]
            float_outs = [o for o in n.output if o and self.is_float(o)]
            nonconst_float_ins = [i for i in float_ins if not self.is_const(i)]
            # shape-value taint
            if op in _SHAPE_SOURCES or any(i in shape_ints for i in n.input if i):
                shape_ints.update(o for o in n.output if o and not self.is_float(o)
                                  and self.types.get(o) not in _FLOATS)
            if op in ("Cast", "CastLike") and n.input and n.input[0] in shape_ints:
                shape_floats.update(float_outs)
            elif any(i in shape_floats for i in float_ins):
                shape_floats.update(float_outs)
            reason: str | None = None
            if is_plugin(n):
                reasons[idx] = None
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
                    normalized.update(o for o in float_outs if len(self.consumers.get(o, [])) == 1)
            elif op in ("Mul", "Add") and len(nonconst_float_ins) == 1 and nonconst_float_ins[0] in normalized \
                    and len(float_ins) == 2:
                reason = "scale/bias of a normalization: fp32, as LayerNormalization's"
                normalized.update(o for o in float_outs if len(self.consumers.get(o, [])) == 1)
            elif any(i in shape_floats for i in float_ins) or any(o in shape_floats for o in float_outs):
                reason = "shape arithmetic: fp32"
            elif op == "Range" and float_outs:
                reason = "Range over floats: positions stay exact in fp32"
            elif any(a.name == "dtype" for a in n.attribute) and float_outs:
                reason = "float dtype attribute: fp32"
            elif float_ins or float_outs:
                reason = self._schema_refuses(n)
            if reason and (op in REDUCTIONS or reason.startswith("square")):
                stats.update(float_outs)
            if reason and not (float_ins or float_outs):
                reason = None  # nothing of its precision to decide
            reasons[idx] = reason
        return reasons

    def _square_into_reduction(self, n: onnx.NodeProto) -> bool:
        if not n.output or not any(c.op_type in REDUCTIONS for c in self.consumers.get(n.output[0], [])):
            return False
        if n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]:
            return True
        if n.op_type == "Pow" and len(n.input) == 2 and self.is_const(n.input[1]):
            e = np.asarray(self.const_array(n.input[1]), np.float64)
            return e.size == 1 and float(e.reshape(-1)[0]) >= 2.0
        return False

    def _schema_refuses(self, n: onnx.NodeProto) -> str | None:
        schema = _schema(n, self.opset)
        if schema is None:
            return f"no ONNX schema for {n.op_type} at opset {self.opset}: kept fp32"
        low_str = _TYPE_STR[self.low]
        for names, formals in ((n.input, schema.inputs), (n.output, schema.outputs)):
            for k, name in enumerate(names):
                if not name or not self.is_float(name):
                    continue
                f = _formal(formals, k)
                if f is None:
                    continue
                allowed = _allowed(schema, f.type_str)
                if allowed is not None and low_str not in allowed:
                    return f"{n.op_type} has no {_SHORT[self.low]} kernel in the ONNX schema: fp32"
        return None

    def _low_slots(self, n: onnx.NodeProto) -> tuple[set[int], set[int]]:
        """Indices of the float inputs and outputs that become low precision in a low node."""
        if is_plugin(n):
            return ({k for k, i in enumerate(n.input) if i and self.is_float(i)
                     and not (k > 0 and self.plugin_params_fp32)},
                    {k for k, o in enumerate(n.output) if o and self.is_float(o)})
        schema = _schema(n, self.opset)
        ins, outs = set(), set()
        for k, i in enumerate(n.input):
            if i and self.is_float(i):
                f = _formal(schema.inputs, k) if schema else None
                if f is not None and _allowed(schema, f.type_str) is not None:
                    ins.add(k)
        for k, o in enumerate(n.output):
            if o and self.is_float(o):
                f = _formal(schema.outputs, k) if schema else None
                if f is not None and _allowed(schema, f.type_str) is not None:
                    outs.add(k)
        return ins, outs

    # -- rewriting ----------------------------------------------------------------------------

    def convert_constant(self, arr: np.ndarray, to: int) -> np.ndarray:
        a = np.asarray(arr)
        if to == FLOAT:
            return a.astype(np.float32)
        a64 = a.astype(np.float64)
        if to == TensorProto.FLOAT16:
            big = float(np.finfo(np.float16).max)
            out_t = np.float16
            tiny = float(np.finfo(np.float16).smallest_subnormal)
        else:
            import ml_dtypes

            big = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
            out_t = ml_dtypes.bfloat16
            tiny = float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_subnormal)
        finite = np.isfinite(a64)
        over = finite & (np.abs(a64) > big)
        self.conv.saturated_values += int(over.sum())
        self.conv.underflowed_values += int((finite & (a64 != 0) & (np.abs(a64) < tiny / 2)).sum())
        return np.where(over, np.sign(a64) * big, a64).astype(out_t)

    def run(self) -> Conversion:
        src = self.src
        g = src.graph
        reasons = self.plan()
        nodes_out: list[onnx.NodeProto] = []
        new_inits: list[onnx.TensorProto] = []
        actual: dict[str, int] = {}  # dtype of each float tensor as produced in the new graph
        for i in g.input:
            if i.name not in self.inits and self.is_float(i.name):
                actual[i.name] = self.io
        cast_cache: dict[tuple[str, int], str] = {}
        const_cache: dict[tuple[str, int], str] = {}
        fp32_const_uses: set[str] = set()

        def need(name: str, to: int) -> str:
            """The name of ``name`` as a tensor of type ``to``."""
            if name in self.inits or name in self.consts:
                if to == FLOAT:
                    fp32_const_uses.add(name)
                    return name
                key = (name, to)
                if key not in const_cache:
                    arr = self.convert_constant(self.const_array(name), to)
                    new = self.fresh(f"{name}_{_SHORT[to]}")
                    new_inits.append(_make_tensor(arr, new, to))
                    self.conv.constants_converted += 1
                    const_cache[key] = new
                return const_cache[key]
            have = actual.get(name, FLOAT)
            if have == to:
                return name
            key = (name, to)
            if key not in cast_cache:
                out = self.fresh(f"{name}_{_SHORT[to]}")
                nodes_out.append(helper.make_node("Cast", [name], [out], to=to, name=self.fresh(f"Cast_{out}")))
                self.conv.casts_inserted += 1
                cast_cache[key] = out
                actual[out] = to
            return cast_cache[key]

        for idx, n in enumerate(g.node):
            if n.op_type == "Constant" and n.output[0] in self.consts and self.is_float(n.output[0]):
                continue  # constants are materialized on demand by need()
            new = onnx.NodeProto()
            new.CopyFrom(n)
            reason = reasons.get(idx)
            float_ins = [k for k, i in enumerate(n.input) if i and self.is_float(i)]
            float_outs = [k for k, o in enumerate(n.output) if o and self.is_float(o)]
            if not float_ins and not float_outs:
                nodes_out.append(new)
                continue
            if reason is None:
                low_in, low_out = self._low_slots(n)
                self.conv.low_nodes += 1
            else:
                low_in, low_out = set(), set()
                self.conv.fp32_nodes[n.name or f"{n.op_type}_{idx}"] = reason
            for k in float_ins:
                if n.op_type in _TYPE_AGNOSTIC and _domain(n) == "":
                    continue  # Shape/Size read any type: no Cast just to take a shape
                new.input[k] = need(n.input[k], self.low if k in low_in else FLOAT)
            for k in float_outs:
                actual[n.output[k]] = self.low if k in low_out else FLOAT
            if reason is None:
                _retype_attributes(new, self, low_out)
            nodes_out.append(new)

        # graph outputs: io dtype, original names (a Cast writes the name, the producer an internal one)
        origin: dict[str, str] = {out: src for (src, _), out in cast_cache.items()}
        out_vis = []
        for o in g.output:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(o)
            if self.is_float(o.name) and not self.is_const(o.name):
                have = actual.get(o.name, FLOAT)
                if have != self.io:
                    internal = self.fresh(f"{o.name}_{_SHORT[have]}")
                    for n in nodes_out:
                        for k, t in enumerate(n.input):
                            if t == o.name:
                                n.input[k] = internal
                        for k, t in enumerate(n.output):
                            if t == o.name:
                                n.output[k] = internal
                    actual[internal] = have
                    origin[internal] = o.name
                    nodes_out.append(helper.make_node("Cast", [internal], [o.name], to=self.io,
                                                      name=self.fresh(f"Cast_{o.name}_out")))
                    self.conv.casts_inserted += 1
                    actual[o.name] = self.io
                vi.type.tensor_type.elem_type = actual.get(o.name, FLOAT)
            elif self.is_const(o.name):
                fp32_const_uses.add(o.name)  # a constant graph output stays as stored
            out_vis.append(vi)

        model = onnx.ModelProto()
        model.CopyFrom(src)
        mg = model.graph
        del mg.node[:]
        keep_consts = [n for n in g.node if n.op_type == "Constant" and n.output[0] in fp32_const_uses
                       and n.output[0] in self.consts and self.is_float(n.output[0])]
        mg.node.extend(keep_consts + nodes_out)
        kept_inits = [i for i in g.initializer if i.name not in self.inits or i.name in fp32_const_uses
                      or not self.is_float(i.name)]
        del mg.initializer[:]
        mg.initializer.extend(kept_inits + new_inits)
        for i in mg.input:
            if i.name not in self.inits and self.is_float(i.name):
                i.type.tensor_type.elem_type = self.io
        del mg.output[:]
        mg.output.extend(out_vis)
        # value_info: original shapes, new element types; new tensors take their origin's shape
        known = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
        boundary = {o.name for o in mg.output} | {i.name for i in mg.input}
        vis = []
        for n in mg.node:
            for t in n.output:
                if not t or t in boundary:
                    continue
                base = t
                while base not in known and base in origin:
                    base = origin[base]
                if base not in known:
                    if t in actual:  # a type at least (custom-op outputs have no inferred shape)
                        vis.append(helper.make_tensor_value_info(t, actual[t], None))
                    continue
                vi = onnx.ValueInfoProto()
                vi.CopyFrom(known[base])
                vi.name = t
                if t in actual:
                    vi.type.tensor_type.elem_type = actual[t]
                vis.append(vi)
        del mg.value_info[:]
        mg.value_info.extend(vis)
        self.conv.model = model
        return self.conv


def _make_tensor(arr: np.ndarray, name: str, to: int) -> onnx.TensorProto:
    if to == TensorProto.BFLOAT16:  # raw little-endian bit patterns, exact and compact
        return onnx.TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(arr.shape),
                                raw_data=np.ascontiguousarray(arr).view(np.uint16).astype("<u2").tobytes())
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _retype_attributes(node: onnx.NodeProto, conv: _Converter, low_out: set[int]) -> None:
    """A low-precision node whose attributes name fp32 gets them renamed: Cast's ``to``,
    ConstantOfShape's ``value``."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT and 0 in low_out:
            a.i = conv.low
        elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT and 0 in low_out:
            arr = conv.convert_constant(numpy_helper.to_array(a.t), conv.low)
            a.t.CopyFrom(_make_tensor(arr, a.t.name, conv.low))
    if node.op_type == "ConstantOfShape" and 0 in low_out and not any(a.name == "value" for a in node.attribute):
        zero = conv.convert_constant(np.zeros(1, np.float32), conv.low)  # the default value is fp32 zero
        node.attribute.append(helper.make_attribute("value", _make_tensor(zero, "value", conv.low)))
