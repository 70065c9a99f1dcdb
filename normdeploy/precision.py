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

Measuring the result on CPU (:func:`precision_error_report`): ONNX Runtime's CPU provider
has few fp16 kernels; it runs the others in fp32 behind Casts it inserts and removes the
Casts between neighbouring fallback nodes, so a naive fp16 model whose variance overflows
still returns the right answer there. The report therefore runs, by default, an fp32
copy of the graph in which every low-precision tensor is rounded to its type and back
(:func:`emulate_rounding`: fp32 arithmetic, low-precision storage, which is what
TensorRT's kernels with fp32 accumulation do), on ONNX Runtime; ``onnx.reference`` runs
the graph in its own types as a second opinion (and bf16, which ONNX Runtime's CPU
provider mostly cannot). Plugin nodes run as fp32-accumulating function bodies on ONNX
Runtime (:func:`plugins_as_functions`) or as the Triton kernels themselves under
``onnx.reference`` (``plugins.emulate``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import UnsupportedError

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


def convert_for_target(model: onnx.ModelProto, target: str, io_dtype: str = "fp32",
                       feeds: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict]:
    """The precision step of the ``lower`` stage for ``target``: the converted model and a report.

    The report holds ``precision`` (what the conversion did, :meth:`Conversion.summary`) and,
    when ``feeds`` are given, ``accuracy`` (:func:`precision_error_report` against the fp32
    lowered model). The converted model has passed ``onnx.checker`` (full check).
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
    report: dict = {"precision": conv.summary()}
    if feeds is not None:
        report["accuracy"] = precision_error_report(model, conv.model, feeds)
    return conv.model, report


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


# ----------------------------------------------------------------------------- accuracy on CPU

def plugin_ops() -> list:
    """``onnx.reference`` implementations of the plugin ops (from ``plugins.emulate``), or []."""
    try:
        from plugins import emulate
    except Exception:  # noqa: BLE001 - the emulation module is optional here
        return []
    from onnx.reference.op_run import OpRun

    for attr in ("PLUGIN_OPS", "NEW_OPS", "OPS", "new_ops"):
        found = getattr(emulate, attr, None)
        if callable(found):
            found = found()
        if found:
            return list(found.values()) if isinstance(found, dict) else list(found)
    return [v for v in vars(emulate).values()
            if isinstance(v, type) and issubclass(v, OpRun) and v is not OpRun and v.__name__.startswith(PLUGIN_PREFIX)]


def has_plugins(model: onnx.ModelProto) -> bool:
    return any(is_plugin(n) for n in model.graph.node)


def low_precision_types(model: onnx.ModelProto) -> set[int]:
    """The low-precision float types (fp16, bf16) the graph's tensors use."""
    g = model.graph
    found = {vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output) + list(g.value_info)}
    found |= {t.data_type for t in g.initializer}
    found |= {a.i for n in g.node for a in n.attribute if n.op_type == "Cast" and a.name == "to"}
    return found & {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def emulate_rounding(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 graph that computes what ``model`` computes with low-precision *storage*.

    Every fp16/bf16 tensor becomes fp32, and each node output that was low precision is
    rounded to it and back (``Cast(to=low)`` then ``Cast(to=float)``) under its old name:
    each op computes in fp32 and its result is rounded once, which is how TensorRT's
    kernels behave with fp32 accumulation (and, for single elementwise ops, bit for bit what
    a native fp16 op returns: fp32 carries more than twice fp16's precision, so the double
    rounding is harmless). Overflow shows: a square above 65504 rounds to inf.

    Why not run the fp16 graph on ONNX Runtime directly: its CPU provider has few fp16
    kernels, runs the others in fp32 behind inserted Casts, and drops the Casts between
    neighbouring fallback nodes, so whole chains never see fp16 (a naive fp16 LayerNorm
    whose variance overflows returns the right answer there).
    Initializers are already rounded; they are stored back as fp32 (exact).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    low = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
    lows: set[str] = set()
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type in low:
            lows.add(vi.name)
    for i, t in enumerate(g.initializer):
        if t.data_type in low:
            g.initializer[i].CopyFrom(numpy_helper.from_array(_to_float32(t), t.name))
    names = {t for n in g.node for t in list(n.input) + list(n.output)} | {i.name for i in g.input}
    types = elem_types(model)
    nodes = []

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        return name

    for i in g.input:  # low-precision inputs: fed fp32, rounded on entry
        t = i.type.tensor_type.elem_type
        if t in low:
            i.type.tensor_type.elem_type = FLOAT
            raw = fresh(f"{i.name}__fp32_in")
            for n in g.node:
                for k, x in enumerate(n.input):
                    if x == i.name:
                        n.input[k] = raw
            nodes += [helper.make_node("Cast", [i.name], [raw + "_r"], to=t),
                      helper.make_node("Cast", [raw + "_r"], [raw], to=FLOAT)]
            names.add(raw + "_r")
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i in low:
                rounding = a.i
                a.i = FLOAT
                out = n.output[0]
                raw = fresh(f"{out}__raw")
                n.output[0] = raw
                nodes += [n, helper.make_node("Cast", [raw], [raw + "_r"], to=rounding),
                          helper.make_node("Cast", [raw + "_r"], [out], to=FLOAT)]
                names.add(raw + "_r")
                break
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in low:
                a.t.CopyFrom(numpy_helper.from_array(_to_float32(a.t), a.t.name))
        else:
            outs = [(k, o) for k, o in enumerate(n.output) if o and types.get(o) in low]
            nodes.append(n)
            for k, o in outs:
                raw = fresh(f"{o}__raw")
                n.output[k] = raw
                nodes += [helper.make_node("Cast", [raw], [raw + "_r"], to=types[o]),
                          helper.make_node("Cast", [raw + "_r"], [o], to=FLOAT)]
                names.add(raw + "_r")
    del g.node[:]
    g.node.extend(nodes)
    for vi in list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type in low:
            vi.type.tensor_type.elem_type = FLOAT
    return m


def _to_float32(t: onnx.TensorProto) -> np.ndarray:
    if t.data_type == TensorProto.BFLOAT16 and t.raw_data:
        bits = np.frombuffer(t.raw_data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tuple(t.dims))
    return numpy_helper.to_array(t).astype(np.float32)


def run_all_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray], engine: str = "auto"
                    ) -> tuple[dict[str, np.ndarray], str]:
    """Every tensor the graph computes (intermediates included) on ``feeds``, and the engine used.

    ``engine``:

    * "onnxruntime": the graph on ONNX Runtime's CPU provider, graph optimizations off
      (each exposed tensor is the graph's own); plugin nodes run as the function bodies of
      :func:`plugins_as_functions`. For fp16 this *under*-states the error (see
      :func:`emulate_rounding`); bf16 graphs mostly do not load (then: "reference").
    * "reference": ``onnx.reference`` in the graph's own dtypes (numpy arithmetic per op),
      plugin nodes through ``plugins.emulate`` (the Triton kernels under the interpreter).
      Slow; fine for small models.
    * "emulate": :func:`emulate_rounding`, then "onnxruntime".
    * "auto": "emulate" for graphs with fp16/bf16 tensors, otherwise "onnxruntime".
    """
    if engine == "auto":
        engine = "emulate" if low_precision_types(model) else "onnxruntime"
    if engine == "emulate":
        vals, used = run_all_tensors(emulate_rounding(model), feeds, "onnxruntime")
        return vals, f"{used}, low-precision storage emulated in fp32"
    feeds = _feeds_for(model, feeds)
    plugins = has_plugins(model)
    if engine == "onnxruntime":
        try:
            return _run_ort(model, feeds), "onnxruntime" + (" (plugins as function bodies)" if plugins else "")
        except _OrtCannotRun:
            pass
    label = "onnx.reference" + (" (plugins: Triton kernels, interpreted)" if plugins else "")
    return _run_reference(model, feeds), label


class _OrtCannotRun(Exception):
    pass


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    m = plugins_as_functions(model) if has_plugins(model) else model
    try:
        m = onnx.shape_inference.infer_shapes(m)  # types for every intermediate, plugin outputs included
    except Exception:  # noqa: BLE001 - fall back to the value_info the model carries
        m = onnx.ModelProto.FromString(m.SerializeToString())
    have = {o.name for o in m.graph.output}
    for vi in m.graph.value_info:  # (numpy has no bfloat16: those stay internal)
        if vi.name not in have and vi.type.tensor_type.elem_type not in (0, TensorProto.BFLOAT16):
            m.graph.output.append(vi)
            have.add(vi.name)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise _OrtCannotRun(str(e)) from e
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    values = sess.run(names, {k: v for k, v in feeds.items() if k in inputs})
    out = dict(zip(names, values))
    out.update({k: v for k, v in feeds.items() if k in inputs})
    return out


def _run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(model, new_ops=plugin_ops() or None)
    inputs = set(ev.input_names)
    results = ev.run(None, {k: v for k, v in feeds.items() if k in inputs}, intermediate=True)
    return {k: np.asarray(v) for k, v in results.items() if isinstance(v, np.ndarray) or np.isscalar(v)}


def _as_float64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _is_float_array(a) -> bool:
    a = np.asarray(a)
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def precision_error_report(fp32_model: onnx.ModelProto, low_model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                           threshold: float = 1e-2, engine: str = "auto") -> dict:
    """How far the low-precision graph is from fp32 on ``feeds``, and where the error arises.

    Both graphs run on CPU (:func:`run_all_tensors`); float feeds are cast to each graph's
    input types. Every tensor that both graphs compute under the same name (the
    conversion keeps names) is compared.

    * Per model output (``outputs``): ``max_abs_err`` = max |low - fp32|, ``max_rel_err`` =
      that divided by max |fp32| (the output's magnitude, as in :mod:`normdeploy.verify`),
      ``cosine_min``, and ``nonfinite``: entries that are NaN/Inf in the low graph but not in
      fp32 (any such entry makes both errors infinite).
    * Per compared tensor, its error e(t) is that same range-relative ``max_rel_err``
      (for fp16, fp32 values beyond +-65504 are first clamped to it, so that a saturated
      ``finfo.min`` mask is not an error; an inf where fp32 is finite still is);
      a node's error e(n) is the largest over its outputs; the error a node *adds* is
      e(n) minus the largest e over its inputs (a Cast's output carries its input's error;
      constants count as 0).
    * ``origin``: the node where the error arises, defined as the **first node in
      topological order whose e(n) exceeds ``threshold``** (or whose output turns
      non-finite) **and whose error carries on**: one of its outputs is a graph output or
      feeds (through Casts) a node that also exceeds the threshold; ``rule: "first over
      threshold"``. Nodes over the threshold whose error dies at the next node are listed
      in ``absorbed`` (e.g. an fp16 attention-mask Add that turns -3.4e38 into -inf, which
      Softmax maps to the same 0). When no node qualifies, the origin is the node not
      absorbed that adds the most error (``rule: "largest added error"``). ``worst_tensor`` names the
      tensor of largest e(t) (usually near the end, where errors have accumulated).
    """
    ref_vals, ref_engine = run_all_tensors(fp32_model, feeds, engine)
    low_vals, low_engine = run_all_tensors(low_model, feeds, engine)
    from .verify import compare_arrays

    outputs = {}
    for o in fp32_model.graph.output:
        if o.name in ref_vals and o.name in low_vals and _is_float_array(ref_vals[o.name]):
            c = compare_arrays(o.name, _as_float64(ref_vals[o.name]), _as_float64(low_vals[o.name]))
            outputs[o.name] = {"max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err,
                               "cosine_min": c.cosine_min, "nonfinite": c.nonfinite}

    # fp32 values beyond fp16's range (finfo.min attention masks) are compared as the
    # saturated values the fp16 graph holds; an fp16 inf against a finite fp32 value still
    # counts as non-finite.
    limit = float(np.finfo(np.float16).max) if TensorProto.FLOAT16 in low_precision_types(low_model) else None
    err: dict[str, float] = {}
    for name, r in ref_vals.items():
        lo = low_vals.get(name)
        if lo is None or not _is_float_array(r) or not _is_float_array(lo) or np.shape(r) != np.shape(lo):
            continue
        r64 = _as_float64(r)
        if limit is not None:
            r64 = np.where(np.isfinite(r64), np.clip(r64, -limit, limit), r64)
        err[name] = compare_arrays(name, r64, _as_float64(lo)).max_rel_err
    # Casts between float types (mostly the conversion's own) carry their tensor's error both
    # ways, so a node whose output is renamed or cast still gets the error of its tensor.
    casts = [n for n in low_model.graph.node if n.op_type == "Cast" and n.input and n.output
             and any(a.name == "to" and a.i in _FLOATS for a in n.attribute)]
    for n in reversed(casts):
        if n.output[0] in err and n.input[0] not in err:
            err[n.input[0]] = err[n.output[0]]
    for n in casts:
        if n.input[0] in err and n.output[0] not in err:
            err[n.output[0]] = err[n.input[0]]
    cast_ids = {id(n) for n in casts}
    node_rows = []
    for i, n in enumerate(low_model.graph.node):
        outs = [o for o in n.output if o in err]
        if id(n) in cast_ids or not outs:
            continue
        e_out = max(err[o] for o in outs)
        e_in = max((err.get(t, 0.0) for t in n.input if t), default=0.0)
        added = 0.0 if e_out == e_in else (e_out - e_in if np.isfinite(e_in) else 0.0)
        node_rows.append({"node": n.name or f"{n.op_type}_{i}", "op_type": n.op_type, "tensor": outs[0],
                          "rel_err": e_out, "input_rel_err": e_in, "added_rel_err": added,
                          "nonfinite": bool(not np.isfinite(e_out))})
    over = {r["node"] for r in node_rows if r["nonfinite"] or r["rel_err"] > threshold}
    node_of = {(n.name or f"{n.op_type}_{i}"): n for i, n in enumerate(low_model.graph.node)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in low_model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    graph_outputs = {o.name for o in low_model.graph.output}

    def reaches_on(name: str) -> bool:
        """An output of node ``name`` is a graph output or feeds (through Casts) a node also over threshold."""
        todo, seen = list(node_of[name].output), set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in graph_outputs:
                return True
            for c in consumers.get(t, []):
                if id(c) in cast_ids:
                    todo.extend(c.output)
                elif (c.name or "") in over or any(r["node"] in over and r["tensor"] in c.output for r in node_rows):
                    return True
        return False

    absorbed = [r["node"] for r in node_rows if r["node"] in over and not reaches_on(r["node"])]
    origin = next(({**r, "rule": "first over threshold"} for r in node_rows
                   if r["node"] in over and r["node"] not in absorbed), None)
    carried = [r for r in node_rows if r["node"] not in absorbed]
    if origin is None and carried:
        origin = {**max(carried, key=lambda r: r["added_rel_err"]), "rule": "largest added error"}
    worst = max(node_rows, key=lambda r: r["rel_err"], default=None)
    return {
        "engine": {"fp32": ref_engine, "low": low_engine},
        "threshold": threshold,
        "outputs": outputs,
        "max_abs_err": max((o["max_abs_err"] for o in outputs.values()), default=0.0),
        "max_rel_err": max((o["max_rel_err"] for o in outputs.values()), default=0.0),
        "nonfinite": sum(o["nonfinite"] for o in outputs.values()),
        "tensors_compared": len(node_rows),
        "origin": origin,
        "absorbed": absorbed,
        "worst_tensor": worst,
    }


def _feeds_for(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with float arrays cast to the element type each graph input declares."""
    out = dict(feeds)
    for i in model.graph.input:
        if i.name in out and _is_float_array(out[i.name]):
            t = i.type.tensor_type.elem_type
            out[i.name] = _numpy_array_of(out[i.name], t)
    return out


def _numpy_array_of(a: np.ndarray, t: int) -> np.ndarray:
    if t == TensorProto.FLOAT16:
        return np.asarray(a).astype(np.float16)
    if t == TensorProto.BFLOAT16:
        import ml_dtypes

        return np.asarray(a).astype(np.float32).astype(ml_dtypes.bfloat16)
    if t == TensorProto.DOUBLE:
        return np.asarray(a).astype(np.float64)
    return np.asarray(a).astype(np.float32)


# ----------------------------------------------------------------------------- plugins on ONNX Runtime

#: plugin op_type -> (its inputs, its attributes, the canonical op computing it, and how the
#: canonical op's inputs come from the plugin's: input names, or ("attr", name) for a scalar
#: attribute turned into a constant, or "zeros_like:w" for an all-zero bias)
_PLUGIN_BODIES = {
    "NormdeployRMSNorm": (("x", "g"), ("epsilon",), "RMSNorm", ("x", "g"), ("epsilon",)),
    "NormdeployCRMSNorm": (("x", "g"), ("epsilon",), "CRMSNorm", ("x", "g"), ("epsilon",)),
    "NormdeployGroupScaling": (("x",), ("groups", "epsilon"), "GroupScaling", ("x",), ("groups", "epsilon")),
    "NormdeployScaleNorm": (("x",), ("scale", "epsilon"), "ScaleNorm", ("x", ("attr", "scale")), ("epsilon",)),
    "NormdeployDynamicTanh": (("x", "w", "b"), ("alpha", "axis"), "DynamicTanh", ("x", ("attr", "alpha"), "w", "b"),
                              ("axis",)),
    "NormdeployDynamicTanhGain": (("x", "w"), ("alpha", "axis"), "DynamicTanh",
                                  ("x", ("attr", "alpha"), "w", "zeros_like:w"), ("axis",)),
    "NormdeployDynamicTanhPlain": (("x",), ("alpha",), None, (), ()),
}
_PLUGIN_EXTRA_ATTRS = ("plugin_namespace", "aot")


def plugins_as_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a plugin-lowered ``model`` that ONNX Runtime runs: each plugin op gets a
    model-local function (domain = the node's) with the plugin's numerics: inputs of any
    float type cast to fp32, the canonical op's math in fp32 (:mod:`normdeploy.ops`), the
    result cast back to the data input's type. Plugin ops without such a body (none today)
    are left as they are.

    This is the ONNX Runtime route of plugin emulation; ``plugins.emulate`` runs the Triton
    kernels themselves under ``onnx.reference`` (tests check the two agree).
    """
    from . import ops

    m = onnx.ModelProto()
    m.CopyFrom(model)
    used = {(n.domain, n.op_type) for n in m.graph.node if is_plugin(n) and n.op_type in _PLUGIN_BODIES}
    if not used:
        return m
    opset = _opset(m)
    have = {(f.domain, f.name) for f in m.functions}
    canon_needed = set()
    for domain, op in sorted(used):
        if (domain, op) in have:
            continue
        inputs, attrs, canon, canon_inputs, canon_attrs = _PLUGIN_BODIES[op]
        nodes = [helper.make_node("Cast", [i], [f"{i}_f32"], to=FLOAT) for i in inputs]
        if canon is None:  # tanh(alpha x)
            alpha = helper.make_node("Constant", [], ["alpha_t"])
            alpha.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="alpha",
                                                       type=onnx.AttributeProto.FLOAT))
            nodes += [alpha, helper.make_node("Mul", ["x_f32", "alpha_t"], ["ax"]),
                      helper.make_node("Tanh", ["ax"], ["y_f32"])]
        else:
            args = []
            for ci in canon_inputs:
                if isinstance(ci, tuple):  # a scalar attribute as a constant tensor
                    c = helper.make_node("Constant", [], [f"{ci[1]}_t"])
                    c.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name=ci[1],
                                                           type=onnx.AttributeProto.FLOAT))
                    nodes.append(c)
                    args.append(f"{ci[1]}_t")
                elif ci.startswith("zeros_like:"):
                    src = ci.split(":", 1)[1] + "_f32"
                    nodes.append(helper.make_node("Sub", [src, src], ["zeros"]))
                    args.append("zeros")
                else:
                    args.append(f"{ci}_f32")
            call = helper.make_node(canon, args, ["y_f32"], domain=CANONICAL_DOMAIN)
            for a in canon_attrs:
                kind = onnx.AttributeProto.INT if a in ("groups", "axis") else onnx.AttributeProto.FLOAT
                call.attribute.append(onnx.AttributeProto(name=a, ref_attr_name=a, type=kind))
            nodes.append(call)
            canon_needed.add(canon)
        nodes.append(helper.make_node("CastLike", ["y_f32", "x"], ["y"]))
        m.functions.append(helper.make_function(
            domain, op, list(inputs), ["y"], nodes,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(CANONICAL_DOMAIN, ops.VERSION)],
            attributes=list(attrs) + list(_PLUGIN_EXTRA_ATTRS)))
    for canon in sorted(canon_needed):
        if (CANONICAL_DOMAIN, canon) not in have:
            m.functions.append(ops.function_proto(canon, opset))
    for domain in {d for d, _ in used} | {CANONICAL_DOMAIN}:
        if not any(o.domain == domain for o in m.opset_import):
            m.opset_import.append(helper.make_opsetid(domain, ops.VERSION))
    return m
