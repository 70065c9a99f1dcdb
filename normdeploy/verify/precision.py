"""How accurate a precision-converted or plugin-lowered model is, measured on CPU.

ONNX Runtime's CPU provider
has few fp16 kernels; it runs the others in fp32 behind Casts it inserts and removes the
Casts between neighbouring fallback nodes, so a naive fp16 model whose variance overflows
still returns the right answer there. The report therefore runs, by default, an fp32
copy of the graph in which every low-precision tensor is rounded to its type and back
(:func:`emulate_rounding`: fp32 arithmetic, low-precision storage, which is what
TensorRT's kernels with fp32 accumulation do), on ONNX Runtime; ``onnx.reference`` runs
the graph in its own types as a second opinion (and bf16, which ONNX Runtime's CPU
provider mostly cannot). Plugin nodes run as fp32-accumulating function bodies on ONNX
Runtime (:func:`plugins_as_functions`) or as the Triton kernels themselves under
``onnx.reference`` (``normdeploy.lower.plugins.emulate``).

This module stays on ``onnx.ModelProto``: it runs only on models small enough to be measured
on CPU. Its public functions also take an ``onnx_ir.Model``, serialized on entry
(:func:`as_proto`).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from ..core.graph import to_proto
from ..lower.precision import _FLOATS, CANONICAL_DOMAIN, FLOAT, PLUGIN_PREFIX, _opset, elem_types, is_plugin
from . import compare_arrays


def plugin_ops() -> list:
    """``onnx.reference`` implementations of the plugin ops (from ``normdeploy.lower.plugins.emulate``), or []."""
    try:
        from ..lower.plugins import emulate
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


def as_proto(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    """``model`` as an ``onnx.ModelProto``: an ``onnx_ir.Model`` is serialized (under 2 GB only), a proto passes."""
    return to_proto(model)


def has_plugins(model: onnx.ModelProto | ir.Model) -> bool:
    model = as_proto(model)
    return any(is_plugin(n) for n in model.graph.node)


def low_precision_types(model: onnx.ModelProto | ir.Model) -> set[int]:
    """The low-precision float types (fp16, bf16) the graph's tensors use."""
    model = as_proto(model)
    g = model.graph
    found = {vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output) + list(g.value_info)}
    found |= {t.data_type for t in g.initializer}
    found |= {a.i for n in g.node for a in n.attribute if n.op_type == "Cast" and a.name == "to"}
    return found & {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def emulate_rounding(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
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
    model = as_proto(model)
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


def run_all_tensors(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray], engine: str = "auto"
                    ) -> tuple[dict[str, np.ndarray], str]:
    """Every tensor the graph computes (intermediates included) on ``feeds``, and the engine used.

    ``engine``:

    * "onnxruntime": the graph on ONNX Runtime's CPU provider, graph optimizations off
      (each exposed tensor is the graph's own); plugin nodes run as the function bodies of
      :func:`plugins_as_functions`. For fp16 this *under*-states the error (see
      :func:`emulate_rounding`); bf16 graphs mostly do not load (then: "reference").
    * "reference": ``onnx.reference`` in the graph's own dtypes (numpy arithmetic per op),
      plugin nodes through ``normdeploy.lower.plugins.emulate`` (the Triton kernels under the interpreter).
      Slow; fine for small models.
    * "emulate": :func:`emulate_rounding`, then "onnxruntime".
    * "auto": "emulate" for graphs with fp16/bf16 tensors, otherwise "onnxruntime".
    """
    model = as_proto(model)
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


def precision_error_report(fp32_model: onnx.ModelProto | ir.Model, low_model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray],
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
    fp32_model, low_model = as_proto(fp32_model), as_proto(low_model)
    ref_vals, ref_engine = run_all_tensors(fp32_model, feeds, engine)
    low_vals, low_engine = run_all_tensors(low_model, feeds, engine)

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
    "NormdeployRMSNorm": (("x", "g"), ("epsilon", "eps_outside", "partial"), "RMSNorm", ("x", "g"),
                          ("epsilon", "eps_outside", "partial")),
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


def plugins_as_functions(model: onnx.ModelProto | ir.Model):
    """A copy of a plugin-lowered ``model`` that ONNX Runtime runs: each plugin op gets a
    model-local function (domain = the node's) with the plugin's numerics: inputs of any
    float type cast to fp32, the canonical op's math in fp32 (:mod:`normdeploy.core.ops`), the
    result cast back to the data input's type. Plugin ops without such a body (none today)
    are left as they are.

    An ``onnx_ir.Model`` gives an ``onnx_ir.Model`` (a clone sharing the weights, any size);
    an ``onnx.ModelProto`` gives a copy.

    This is the ONNX Runtime route of plugin emulation; ``normdeploy.lower.plugins.emulate`` runs the Triton
    kernels themselves under ``onnx.reference`` (tests check the two agree).
    """
    if isinstance(model, ir.Model):
        return _plugins_as_functions_ir(model)
    from ..core import ops

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
                kind = (onnx.AttributeProto.INT if a in ("groups", "axis", "eps_outside", "partial")
                        else onnx.AttributeProto.FLOAT)
                call.attribute.append(onnx.AttributeProto(name=a, ref_attr_name=a, type=kind))
            nodes.append(call)
            canon_needed.add(canon)
        nodes.append(helper.make_node("CastLike", ["y_f32", "x"], ["y"]))
        m.functions.append(helper.make_function(
            domain, op, list(inputs), ["y"], nodes,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(CANONICAL_DOMAIN, ops.VERSION)],
            attributes=list(attrs) + list(_PLUGIN_EXTRA_ATTRS)))
    # RMSNorm's variant body where a plugin node sets eps_outside or partial (a node without them, or an older
    # file, passes nothing and gets the canonical defaults: the plain RMSNorm)
    variant = any(ops.rms_variant(n) for n in m.graph.node if is_plugin(n) and n.op_type == "NormdeployRMSNorm")
    for canon in sorted(canon_needed):
        if (CANONICAL_DOMAIN, canon) not in have:
            m.functions.append(ops.function_proto(canon, opset, variant))
    for domain in {d for d, _ in used} | {CANONICAL_DOMAIN}:
        if not any(o.domain == domain for o in m.opset_import):
            m.opset_import.append(helper.make_opsetid(domain, ops.VERSION))
    return m


def _plugins_as_functions_ir(model: ir.Model) -> ir.Model:
    """:func:`plugins_as_functions` for an in-memory model: the functions are built on a stub holding only
    the plugin nodes (no weights), then attached to a clone that shares the weights."""
    from ..core import ops

    stub = onnx.ModelProto(ir_version=model.ir_version or 10)
    for domain, version in model.opset_imports.items():
        stub.opset_import.append(helper.make_opsetid(domain, version))
    for n in model.graph:
        if n.op_type in _PLUGIN_BODIES and n.domain:
            variant = ops.rms_variant(n) if n.op_type == "NormdeployRMSNorm" else {}
            stub.graph.node.append(helper.make_node(n.op_type, [], [], domain=n.domain, **variant))
    with_functions = plugins_as_functions(stub)
    out = model.clone()
    for fn in with_functions.functions:
        f = ir.serde.deserialize_function(fn)
        out.functions[f.identifier()] = f
    for o in with_functions.opset_import:
        out.opset_imports.setdefault(o.domain, o.version)
    return out
