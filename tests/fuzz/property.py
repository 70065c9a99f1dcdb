"""The differential property: what normdeploy must do with every graph the fuzzer draws.

For each target (``ort-cpu``; ``trt-fp16`` with ``lower_only=True``), ``normdeploy.optimize``
either

* **refuses**: raises a :class:`normdeploy.NormdeployError` whose message is one non-empty
  line. A refusal is correct behaviour *unless* it hides a bug: an
  ``AccuracyError`` for an exact rewrite whose output we find wrong on our own inputs (a wrong
  rewrite caught by the final check), "ONNX Runtime cannot load the model" (the original
  loads, so normdeploy wrote a broken graph), a message asking to "report this as a bug",
  or an ``InputError`` for a graph with no bad statistic; or
* **returns** a model whose outputs equal the original's on ONNX Runtime, computed here
  (the report is not trusted), on four input sets of our own (three distributions and one
  scaled by 1e3, batch 3 where the batch is dynamic), within the tolerance the report
  states (``report["accuracy"]["tolerance"]``), and whose report lists every normalization
  it kept or skipped with a reason.

A graph that carries a NaN / Inf / negative statistic must be refused with an ``InputError``.
Anything else that escapes ``optimize`` (a crash) is a failure.

Comparisons are range-relative, as normdeploy's own: ``max |opt - ref| / max |ref|`` per
output. Two things are not normdeploy's fault and are excused, each counted in the figures:

* an input set on which the original is not finite, or on which a spike comparison is
  within rounding of its threshold (``|BN(u) - theta|`` no larger than 16x the original's
  own error on BN(u) plus a relative margin: the exact fold may legitimately flip it);
* an fp32 discrepancy above the tolerance where the *original itself* is that far from
  the exact result: the optimized output is accepted if its distance to the float64 truth
  (the same graph in float64 on ``onnx.reference``) is at most twice the original's plus
  the tolerance.

trt-fp16. The returned model is fp16 with plugin nodes; it runs on ONNX Runtime with every
plugin as its fp32-accumulating function body (``plugins_as_functions``) and fp16 storage
emulated in fp32 (``emulate_rounding``: each op computes in fp32 and rounds its result to
fp16, as TensorRT's kernels do). It is compared with the fp32 original within
``TOL_FP16 = 1e-2`` of the output range. Derivation: fp16's unit roundoff is
u = 2^-11 = 4.9e-4; a fuzz graph has at most ~8 rounded ops on a path and dot products of
at most 48 terms, so a well-conditioned graph stays within (8 + sqrt(48)) u = 7.3e-3.
A graph that amplifies rounding (a norm over one-element groups, the variance of nearly
equal values, values beyond fp16's range) is judged against fp16 deployments of the
original itself (:func:`fp16_bound`: every data-path tensor and non-normalization weight
rounded to fp16, normalization statistics in fp32, with and without one ulp of
range-relative noise per tensor): normdeploy's result must be within
``TOL_FP16 + 2 x`` their largest error; where the original does not fit fp16 at all the set
is not judged. The fp32 trt lowering (before the precision conversion) is also checked, at
the fp32 tolerance, with the same plugin emulation.

Every excuse, refusal (grouped by reason), rewrite and skip is counted in :data:`FIGURES`.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import normdeploy
from normdeploy import pipeline
from normdeploy.core.errors import AccuracyError, InputError, NormdeployError
from normdeploy.core.norms import find_norms
from normdeploy.verify.precision import emulate_rounding, plugins_as_functions

from .graphs import META_KEY, meta_of

TOL_FP16 = 1e-2
TARGETS = ("ort-cpu", "trt-fp16")
CANONICALIZE_PASSES = tuple(s.name for s in pipeline.CANONICALIZE)  # the recognizers' reports
STRICT = os.environ.get("NORMDEPLOY_FUZZ_STRICT", "") not in ("", "0")
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


class FuzzFailure(AssertionError):
    """normdeploy did something the property forbids: ``category`` says what (crash, wrong, silent, ...)."""

    def __init__(self, category: str, target: str, detail: str):
        super().__init__(f"[{category} {target}] {detail}")
        self.category, self.target, self.detail = category, target, detail


# ----------------------------------------------------------------------------- known bugs

@dataclass(frozen=True)
class KnownBug:
    """A failure the fuzzer found that is not fixed yet; its minimal graph is ``regression``."""

    regression: str  # tests/fuzz/regressions/<name>.onnx
    category: str
    target: str  # or "*"
    pattern: str  # regex on the failure detail

    def matches(self, f: FuzzFailure) -> bool:
        return (self.category == f.category and self.target in ("*", f.target)
                and re.search(self.pattern, f.detail) is not None)


#: Filled in as bugs are found (see regressions/README.md). The CI fuzz run counts a failure
#: that matches one of these as known instead of failing; NORMDEPLOY_FUZZ_STRICT=1 fails on them too.
KNOWN_BUGS: tuple[KnownBug, ...] = ()


# ----------------------------------------------------------------------------- figures

@dataclass
class Figures:
    """What the fuzzer saw, over one run (written out by the test module's teardown)."""

    graphs: int = 0
    by_dtype: Counter = field(default_factory=Counter)
    bad_planted: int = 0
    norms_planted: Counter = field(default_factory=Counter)
    outcome: Counter = field(default_factory=Counter)  # "ort-cpu ok", "trt-fp16 refused", ...
    refusals: Counter = field(default_factory=Counter)  # "target: Type: normalized message"
    excused: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    known: Counter = field(default_factory=Counter)
    rewrites: Counter = field(default_factory=Counter)  # "target pass: what (normalized)" of returned models
    skips: Counter = field(default_factory=Counter)  # "target pass: reason (normalized)"
    first_failure: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)  # excuse -> a few of its cases, for the long run's log

    dtype: str = ""  # of the graph being checked: every excuse is counted per dtype

    def excuse(self, key: str, detail: str = "") -> None:
        key = key.replace(": ", f" {self.dtype}: ", 1)
        self.excused[key] += 1
        if detail and len(self.examples.setdefault(key, [])) < 5:
            self.examples[key].append(detail)

    def to_json(self) -> dict:
        return {k: (dict(v.most_common()) if isinstance(v, Counter) else v) for k, v in self.__dict__.items()
                if k != "dtype"}


FIGURES = Figures()


def _normalize(msg: str) -> str:
    """A refusal message with node names and numbers replaced, to group refusals by reason."""
    msg = re.sub(r"\bn_[A-Za-z_]*\d+\w*", "<node>", msg)
    msg = re.sub(r"\b[a-z_]+\d+\b", "<tensor>", msg)
    msg = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "<n>", msg)
    return msg[:160]


def _what(what: str) -> str:
    """A rewrite description reduced to its shape: op kinds kept, node names and numbers dropped."""
    what = re.sub(r"\b(n_)?[a-z_]+\d+\w*", "", what)
    what = re.sub(r"\(\d+ comparisons?\)|, \d+ comparisons?", "", what)
    return re.sub(r"\s+", " ", what).strip()[:110]


# ----------------------------------------------------------------------------- running graphs

def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feeds: dict, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Outputs (and the ``extra`` intermediate tensors) of ``model`` on ONNX Runtime, no graph optimizations."""
    m = model
    if extra:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        elem = m.graph.output[0].type.tensor_type.elem_type
        m.graph.output.extend(helper.make_tensor_value_info(e, elem, None) for e in extra if e not in have)
    sess = _session(m)
    names = [o.name for o in sess.get_outputs()]
    types = {vi.name: helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in m.graph.input}
    inputs = {i.name for i in sess.get_inputs()}
    # feeds in the type each graph input declares (an emulated fp16 graph takes fp32 inputs)
    return dict(zip(names, sess.run(names, {k: np.asarray(v).astype(types[k]) for k, v in feeds.items() if k in inputs})))


def retype(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """The same graph computing in ``elem`` (FLOAT or DOUBLE): float initializers, I/O and Casts retyped.

    Enough for the fuzzer's graphs, whose canonical function bodies are type-generic (CastLike).
    """
    npt = helper.tensor_dtype_to_np_dtype(elem)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type in FLOATS:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(npt), t.name))
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type in FLOATS:
            vi.type.tensor_type.elem_type = elem
    del g.value_info[:]
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i in FLOATS:
                a.i = elem
    return m


def _conv_transpose_op():
    """ConvTranspose for ``onnx.reference``, whose own gets grouped ConvTranspose wrong (onnx 1.23: groups > 1
    with stride 2 differ from ONNX Runtime by up to 100 %). Direct scatter; no pads, dilations or output padding
    (the generator uses none)."""
    from onnx.reference.op_run import OpRun

    class ConvTranspose(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 output_padding=None, output_shape=None, pads=None, strides=None):
            g, sp = int(group or 1), x.ndim - 2
            strides = list(strides or [1] * sp)
            if any(pads or []) or any(output_padding or []) or any(d != 1 for d in (dilations or [])) or output_shape:
                raise NotImplementedError("fuzz ConvTranspose: pads, output padding, dilations")
            n, c = x.shape[:2]
            k, co_g = w.shape[2:], w.shape[1]
            y = np.zeros((n, co_g * g, *[(x.shape[2 + i] - 1) * strides[i] + k[i] for i in range(sp)]), x.dtype)
            cg = c // g
            for gi in range(g):
                xs, ws = x[:, gi * cg:(gi + 1) * cg], w[gi * cg:(gi + 1) * cg]
                for idx in np.ndindex(*x.shape[2:]):
                    contrib = np.einsum("nc,co...->no...", xs[(slice(None), slice(None)) + idx], ws)
                    window = tuple(slice(idx[i] * strides[i], idx[i] * strides[i] + k[i]) for i in range(sp))
                    y[(slice(None), slice(gi * co_g, (gi + 1) * co_g)) + window] += contrib
            if b is not None:
                y = y + b.reshape((1, -1) + (1,) * sp)
            return (y,)

    return ConvTranspose


def truth(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` evaluated in float64 by ``onnx.reference`` (the exact result, to rounding)."""
    from onnx.reference import ReferenceEvaluator

    m64 = retype(model, TensorProto.DOUBLE)
    ev = ReferenceEvaluator(m64, new_ops=[_conv_transpose_op()])
    f64 = {k: np.asarray(v).astype(np.float64) for k, v in feeds.items() if k in ev.input_names}
    return {k: np.asarray(v) for k, v in ev.run(None, f64, intermediate=True).items()}


def ideal_fp16(model: onnx.ModelProto, meta: dict, noise: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """An fp32 graph computing what an ideal fp16 deployment of ``model`` computes.

    Every data-path tensor (``meta["data"]``: inputs, layer and normalization outputs) is
    rounded to fp16 after the node that writes it; weights that do not belong to a
    normalization are rounded to fp16; normalization parameters and the statistics inside
    a normalization stay fp32 (what normdeploy promises for its fp16 conversion).
    ``noise`` (tensor name -> an array of its shape) is added to a tensor before its rounding:
    the range-relative error that fp16 accumulation leaves in a tensor (see :func:`judge_fp16`).
    """
    m = retype(model, TensorProto.FLOAT)
    g = m.graph
    keep = set(meta["norm_consts"])
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            v = numpy_helper.to_array(t).astype(np.float16).astype(np.float32)
            g.initializer[i].CopyFrom(numpy_helper.from_array(v, t.name))
    data = set(meta["data"])
    inputs = {i.name for i in g.input}
    noise = noise or {}

    def rounding(src: str, dst: str) -> list[onnx.NodeProto]:
        nodes = []
        if src.split("__")[0] in noise:
            name = src.split("__")[0]
            g.initializer.append(numpy_helper.from_array(noise[name].astype(np.float32), name + "__noise"))
            nodes.append(helper.make_node("Add", [src, name + "__noise"], [src + "__n"]))
            src = src + "__n"
        return nodes + [helper.make_node("Cast", [src], [src + "__h"], to=TensorProto.FLOAT16),
                        helper.make_node("Cast", [src + "__h"], [dst], to=TensorProto.FLOAT)]

    nodes = []
    renamed = {name: name + "__r" for name in data & inputs}
    for name in renamed:
        nodes += [helper.make_node("Identity", [name], [name + "__in"])] + rounding(name + "__in", name + "__r")
    for n in g.node:
        for k, x in enumerate(n.input):
            if x in renamed:
                n.input[k] = renamed[x]
        outs = [(k, o) for k, o in enumerate(n.output) if o in data]
        nodes.append(n)
        for k, o in outs:
            n.output[k] = o + "__raw"
            nodes += rounding(o + "__raw", o)
    del g.node[:]
    g.node.extend(nodes)
    return m


def input_sets(model: onnx.ModelProto) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Our own inputs: three distributions and one scaled by 1e3; batch 3 where the batch is dynamic."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 3 for d in tt.shape.dim]
        specs.append((vi.name, shape, helper.tensor_dtype_to_np_dtype(tt.elem_type)))

    def make(seed, fn):
        rng = np.random.default_rng(seed)
        return {name: fn(rng, shape).astype(dt) for name, shape, dt in specs}

    return [
        ("normal(0.3, 1.5)", make(11, lambda r, s: r.standard_normal(s) * 1.5 + 0.3)),
        ("uniform(-3, 3)", make(12, lambda r, s: r.uniform(-3, 3, s))),
        ("normal(0, 1)", make(13, lambda r, s: r.standard_normal(s))),
        ("normal(0, 1) x 1e3", make(14, lambda r, s: r.standard_normal(s) * 1e3)),
    ]


# ----------------------------------------------------------------------------- comparing

def rel_err(ref: np.ndarray, got: np.ndarray) -> float | None:
    """max |got - ref| / max |ref| (absolute where ref is all zero); None where ref is not finite."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if not np.all(np.isfinite(ref64)):
        return None
    if ref64.shape != got64.shape or not np.all(np.isfinite(got64)):
        return float("inf")
    scale = float(np.abs(ref64).max()) if ref64.size else 0.0
    diff = float(np.abs(got64 - ref64).max()) if ref64.size else 0.0
    return diff / scale if scale > 0 else diff


@dataclass
class Reference:
    """The original on every input set: ONNX Runtime outputs, spike pre-activations, float64 truth (lazily)."""

    model: onnx.ModelProto
    meta: dict
    sets: list
    outputs: list[dict] = field(default_factory=list)
    _truth: dict = field(default_factory=dict)

    def __post_init__(self):
        self.names = [o.name for o in self.model.graph.output]
        inputs = {i.name for i in self.model.graph.input}
        inside = [d for d in self.meta["data"] if d not in inputs and d not in self.names]
        extra = tuple(dict.fromkeys([s["pre"] for s in self.meta["spikes"]] + inside))
        self.outputs = [run_ort(self.model, feeds, extra) for _, feeds in self.sets]
        #: per set: every data-path tensor of the original is finite (else its outputs are not judged:
        #: an fp16 original whose BatchNorm overflows to inf may still reach a finite output by accident)
        self.finite_inside = [all(np.all(np.isfinite(np.asarray(o[d], np.float64))) for d in inside)
                              for o in self.outputs]
        self.thetas = {s["theta"]: numpy_helper.to_array(next(t for t in self.model.graph.initializer
                                                              if t.name == s["theta"])).astype(np.float64)
                       for s in self.meta["spikes"]}

    def truth(self, i: int) -> dict:
        if i not in self._truth:
            self._truth[i] = truth(self.model, self.sets[i][1])
        return self._truth[i]

    def ambiguous(self, i: int, rel_margin: float) -> bool:
        """Some spike pre-activation of set ``i`` lies within rounding of its threshold."""
        for s in self.meta["spikes"]:
            y32 = np.asarray(self.outputs[i][s["pre"]], np.float64)
            y64 = np.asarray(self.truth(i)[s["pre"]], np.float64)
            theta = self.thetas[s["theta"]]
            if not (np.all(np.isfinite(y32)) and np.all(np.isfinite(y64))):
                return True
            margin = 16 * np.abs(y32 - y64) + rel_margin * (np.abs(y64).max() + np.abs(theta).max())
            if np.any(np.abs(y64 - theta) <= margin):
                return True
        return False


def judge_fp32(ref: Reference, got: list[dict], tol: float, what: str, target: str, context: str = "") -> None:
    """``got`` (outputs per input set) equals the original within ``tol``, or is as exact as the original.

    "As exact": its distance to the float64 truth is at most twice the original's, plus ``tol``,
    plus 8 unit roundoffs of the model's dtype (a rewrite reorders a few roundings; for an
    fp16 model that alone is 3.9e-3 of the range).
    """
    slack = 8 * float(np.finfo(np.dtype(ref.meta["dtype"])).eps) / 2
    for i, (label, _) in enumerate(ref.sets):
        if not ref.finite_inside[i]:
            FIGURES.excuse(f"{target}: set skipped, the original overflows inside")
            continue
        if ref.meta["spikes"] and ref.ambiguous(i, 1e-6):
            FIGURES.excuse(f"{target}: set skipped, spike within rounding of its threshold")
            continue
        for name in ref.names:
            r, g = ref.outputs[i][name], got[i][name]
            if np.shape(r) != np.shape(g) or np.asarray(r).dtype != np.asarray(g).dtype:
                raise FuzzFailure("wrong", target, f"{what}: output {name} is {np.asarray(g).dtype}{list(np.shape(g))}, "
                                                   f"the original's {np.asarray(r).dtype}{list(np.shape(r))}")
            e = rel_err(r, g)
            if e is None:
                FIGURES.excuse(f"{target}: output not finite in the original")
                continue
            if e <= tol:
                continue
            t = ref.truth(i)[name]
            e_ref, e_got = rel_err(t, r), rel_err(t, g)
            if e_ref is not None and e_got is not None and e_got <= 2 * e_ref + tol + slack:
                FIGURES.excuse(f"{target}: the original itself is that far from the float64 result",
                               f"{ref.meta['dtype']} {what} {name}: err {e:.3g}, original vs float64 {e_ref:.3g}, "
                               f"optimized vs float64 {e_got:.3g}; " + "; ".join(ref.meta["steps"]))
                continue
            raise FuzzFailure("wrong", target, f"{what}: output {name} on inputs {label}: max rel err {e:.3g} > "
                                               f"tolerance {tol:g} (float64 truth: original off by {e_ref:.3g}, "
                                               f"optimized by {e_got:.3g}; {ref.meta['dtype']} model)"
                                               + (f"; {context}" if context else ""))


FP16_NOISE_DRAWS = 3


def fp16_bound(ref: Reference, i: int, name: str) -> float | None:
    """How far an fp16 deployment of the original may land from it on set ``i``, output ``name``.

    The largest error, against the fp32 original, of (a) the ideal fp16 deployment
    (:func:`ideal_fp16`) and (b) ``FP16_NOISE_DRAWS`` copies of it in which every data-path
    tensor also carries a uniform perturbation of up to one fp16 ulp of its range (2^-10 max|t|),
    the error fp16 accumulation leaves (a dot product's rounding error is relative to the
    size of its terms, not of its result). A graph that amplifies such errors (a norm over
    one-element groups, a variance of nearly equal values) gets a bound to match.
    None when the ideal deployment is not finite (the original does not fit fp16).
    """
    feeds = ref.sets[i][1]
    data = [d for d in ref.meta["data"] if d not in feeds]
    values = dict(run_ort(ref.model, feeds, tuple(d for d in data if d not in ref.names)))
    values.update({k: v for k, v in feeds.items() if k in ref.meta["data"]})
    errs = [rel_err(ref.outputs[i][name], run_ort(ideal_fp16(ref.model, ref.meta), feeds)[name])]
    rng = np.random.default_rng(1000 + i)
    for _ in range(FP16_NOISE_DRAWS):
        noise = {}
        for d in ref.meta["data"]:
            v = np.asarray(values[d], np.float64)
            if v.size and np.all(np.isfinite(v)):
                noise[d] = rng.uniform(-1, 1, v.shape) * 2.0 ** -10 * np.abs(v).max()
        errs.append(rel_err(ref.outputs[i][name], run_ort(ideal_fp16(ref.model, ref.meta, noise), feeds)[name]))
    if errs[0] is None or not np.isfinite(errs[0]):
        return None
    return max(e for e in errs if e is not None)


def judge_fp16(ref: Reference, got: list[dict], target: str, context: str = "") -> None:
    """fp16 outputs within TOL_FP16 of the fp32 original, or within TOL_FP16 + 2 x :func:`fp16_bound`."""
    for i, (label, feeds) in enumerate(ref.sets):
        if not ref.finite_inside[i]:
            FIGURES.excuse(f"{target}: set skipped, the original overflows inside")
            continue
        if ref.meta["spikes"] and ref.ambiguous(i, 3e-2):
            FIGURES.excuse(f"{target}: set skipped, spike within fp16 rounding of its threshold")
            continue
        for name in ref.names:
            r, g = ref.outputs[i][name], got[i][name]
            if np.shape(r) != np.shape(g):
                raise FuzzFailure("wrong", target, f"output {name} has shape {list(np.shape(g))}, "
                                                   f"the original's {list(np.shape(r))}")
            e = rel_err(r, g)
            if e is None:
                FIGURES.excuse(f"{target}: output not finite in the original")
                continue
            if e <= TOL_FP16:
                continue
            bound = fp16_bound(ref, i, name)
            if bound is None:
                FIGURES.excuse(f"{target}: the original does not fit fp16 (ideal fp16 deployment not finite)")
                continue
            if e <= TOL_FP16 + 2 * bound:
                FIGURES.excuse(f"{target}: fp16 error within what an fp16 deployment of the original shows",
                               f"{name}: err {e:.3g}, fp16 deployments of the original {bound:.3g}; "
                               + "; ".join(ref.meta["steps"]))
                continue
            raise FuzzFailure("wrong", target, f"fp16 output {name} on inputs {label}: max rel err {e:.3g} > "
                                               f"{TOL_FP16:g} + 2 x {bound:.3g} (fp16 deployments of the original)"
                                               + (f"; {context}" if context else ""))


# ----------------------------------------------------------------------------- the report

def check_report(report: dict, canonical: onnx.ModelProto, meta: dict, target: str) -> None:
    """Every normalization of the canonical graph is accounted for in the passes, skips with a one-line reason."""
    passes = report["passes"]
    later = [p for p in passes if p["name"] not in CANONICALIZE_PASSES]
    for p in passes:
        for s in p["skipped"]:
            if not s["reason"] or not s["reason"].strip() or "\n" in s["reason"]:
                raise FuzzFailure("report", target, f"pass {p['name']} skipped {s['node']} without a one-line reason: "
                                                    f"{s['reason']!r}")
    named = {w["node"] for p in later for w in p["rewrites"]} | {s["node"] for p in later for s in p["skipped"]}
    for n in find_norms(canonical):
        if n.name not in named:
            raise FuzzFailure("silent", target, f"{n.kind} {n.name} ({n.op_type}) is neither rewritten nor skipped "
                                                f"with a reason by any pass")
    canon_nodes = {n.name for n in canonical.graph.node}
    recognizer_skips = {s["node"] for p in passes if p["name"] in CANONICALIZE_PASSES for s in p["skipped"]}
    for norm in meta["norms"]:
        if norm["decomposed"] and norm["anchor"] in canon_nodes and norm["anchor"] not in recognizer_skips:
            raise FuzzFailure("silent", target, f"decomposed {norm['kind']} with statistic {norm['anchor']} was "
                                                f"neither recognized nor reported by a recognizer")


# ----------------------------------------------------------------------------- the property

def _transformed(model: onnx.ModelProto, target: str):
    """What ``optimize`` builds before verifying (prepare + transform), for checks the report cannot give."""
    from normdeploy.options import Options

    opts = Options.from_flat()
    prep = pipeline.prepare(model, opts)
    return pipeline.transform(prep.original, pipeline.context(target, opts, prep.specs))


def _innermost(e: BaseException) -> str:
    """``normdeploy/<module>.py:<line> in <function>``: the deepest normdeploy frame of ``e``'s traceback."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}normdeploy{os.sep}" in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"normdeploy{f.filename.split(os.sep + 'normdeploy', 1)[1]}:{f.lineno} in {f.name}"


def _optimize(model: onnx.ModelProto, target: str):
    kw = {"lower_only": True} if target.startswith("trt-") else {}
    return normdeploy.optimize(model, target=target, bench=False, threads=1, **kw)


def _refusal(e: NormdeployError, model, meta, ref: Reference, target: str) -> None:
    """A refusal is fine unless it hides a bug (module docstring); raises FuzzFailure when it does."""
    msg = str(e)
    if not msg.strip() or "\n" in msg:
        raise FuzzFailure("message", target, f"{type(e).__name__} without a one-line message: {msg!r}")
    key = f"{target} {meta['dtype']}: {type(e).__name__}: {_normalize(msg)}"
    if meta["bad"]:
        if not isinstance(e, InputError):
            raise FuzzFailure("refusal", target, f"bad input ({meta['bad']}) refused as {type(e).__name__}, "
                                                 f"not as bad input: {msg}")
        FIGURES.refusals[key] += 1
        return
    if isinstance(e, InputError):
        raise FuzzFailure("refusal", target, f"a valid graph refused as bad input: {msg}")
    if "report this as a bug" in msg or "cannot load the model" in msg:
        raise FuzzFailure("broken", target, msg)
    if isinstance(e, AccuracyError):
        # was the transform wrong, or is the original too ill-conditioned for the tolerance?
        t = _transformed(model, target)
        opt = t.optimized if not target.startswith("trt-") else plugins_as_functions(t.optimized)
        got = [run_ort(opt, feeds) for _, feeds in ref.sets]
        exact = all(r.exact for r in t.results if r.rewrites)
        tol = normdeploy.options.Options.from_flat().verify.tolerance
        if tol is None:  # the default: by the float type the model computes in, as optimize chooses it
            tol = pipeline.DEFAULT_TOLERANCE[pipeline.compute_dtype(ir.from_proto(model))]
        if exact:
            rewrote = ", ".join(f"{r.name} x{len(r.rewrites)}" for r in t.results if r.rewrites)
            judge_fp32(ref, got, tol, "refused model (AccuracyError)", target, f"rewrites by {rewrote}")
            # our inputs agree within tolerance or the original is ill-conditioned: a fair refusal
    FIGURES.refusals[key] += 1


def check_target(model: onnx.ModelProto, meta: dict, ref: Reference, target: str, canonical) -> str:
    """The property for one target; returns "ok" or "refused", raises FuzzFailure."""
    try:
        res = _optimize(model, target)
    except NormdeployError as e:
        _refusal(e, model, meta, ref, target)
        return "refused"
    except Exception as e:
        raise FuzzFailure("crash", target, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                          f" (raised under {_innermost(e)})") from e
    if meta["bad"]:
        raise FuzzFailure("not-refused", target, f"graph with {meta['bad']} was optimized, not refused as bad input")
    report = res.report
    if canonical is None:
        raise FuzzFailure("inconsistent", target, "prepare + transform refused the graph, optimize did not")
    check_report(report, canonical, meta, target)
    for p in report["passes"]:
        for w in p["rewrites"]:
            FIGURES.rewrites[f"{target} {p['name']}: {_what(w['what'])}"] += 1
        for sk in p["skipped"]:
            FIGURES.skips[f"{target} {p['name']}: {_normalize(sk['reason'])[:120]}"] += 1
        for note in p["notes"]:
            if "shift stays" in note:
                FIGURES.rewrites[f"{target} {p['name']}: (note) a kept shift before a padded Conv / ConvTranspose"] += 1
    opt = res.optimized
    if [o.name for o in opt.graph.output] != ref.names:
        raise FuzzFailure("wrong", target, f"outputs {[o.name for o in opt.graph.output]} instead of {ref.names}")
    if target == "ort-cpu":
        try:
            got = [run_ort(opt, feeds) for _, feeds in ref.sets]
        except Exception as e:
            raise FuzzFailure("broken", target, f"optimized model does not run: {str(e).splitlines()[0][:200]}") from e
        rewrote = ", ".join(f"{p['name']} x{len(p['rewrites'])}" for p in report["passes"] if p["rewrites"])
        judge_fp32(ref, got, float(report["accuracy"]["tolerance"]), "optimized model", target, f"rewrites by {rewrote}")
    else:
        try:
            emulated = plugins_as_functions(emulate_rounding(opt))
            got = [run_ort(emulated, feeds) for _, feeds in ref.sets]
        except Exception as e:
            raise FuzzFailure("broken", target, f"fp16 model does not run emulated: {str(e).splitlines()[0][:200]}"
                              ) from e
        conv = report.get("precision", {}).get("precision", {})
        judge_fp16(ref, got, target, f"the conversion saturated {conv.get('saturated_values')} and flushed "
                                     f"{conv.get('underflowed_values')} constant entries; the report states "
                                     f"max_rel_err {report.get('precision', {}).get('accuracy', {}).get('max_rel_err', 0):.3g}")
        lowered32 = plugins_as_functions(_transformed(model, target).optimized)
        got32 = [run_ort(lowered32, feeds) for _, feeds in ref.sets]
        rewrote = ", ".join(f"{p['name']} x{len(p['rewrites'])}" for p in report["passes"] if p["rewrites"])
        judge_fp32(ref, got32, float(report["accuracy"]["tolerance"]), "fp32 trt lowering (before fp16)", target,
                   f"rewrites by {rewrote}")
    return "ok"


def check_case(model: onnx.ModelProto, strict: bool = STRICT) -> dict[str, str]:
    """Run the property on one fuzz graph for every target; raises FuzzFailure on the first unknown failure.

    Returns the outcome per target: "ok", "refused" or "known: <regression>".
    """
    meta = meta_of(model)
    onnx.checker.check_model(model, full_check=True)  # the generator's own invariant
    ref = Reference(model, meta, input_sets(model))
    canonical = None
    if not meta["bad"]:  # what the passes after canonicalization must account for (check_report)
        try:
            canonical = _transformed(model, "ort-cpu").canonical
        except NormdeployError:
            pass  # a refusal: optimize refuses too, and _refusal judges it
        except Exception as e:
            raise FuzzFailure("crash", "ort-cpu", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                              f" (raised under {_innermost(e)}, in prepare + transform)") from e
    FIGURES.graphs += 1
    FIGURES.dtype = meta["dtype"]
    FIGURES.by_dtype[meta["dtype"]] += 1
    FIGURES.bad_planted += bool(meta["bad"])
    for n in meta["norms"]:
        FIGURES.norms_planted[("decomposed " if n["decomposed"] else "") + n["kind"]] += 1
    outcome = {}
    for target in TARGETS:
        try:
            outcome[target] = check_target(model, meta, ref, target, canonical)
        except FuzzFailure as f:
            known = next((k for k in KNOWN_BUGS if k.matches(f)), None)
            key = f"[{f.category} {f.target}] {_normalize(f.detail)}"
            if known is not None and not strict:
                FIGURES.known[known.regression] += 1
                outcome[target] = f"known: {known.regression}"
                continue
            FIGURES.failures[key] += 1
            FIGURES.first_failure.setdefault(key, str(f))
            raise
        FIGURES.outcome[f"{target} {outcome[target]}"] += 1
    return outcome


__all__ = ["FIGURES", "KNOWN_BUGS", "META_KEY", "TOL_FP16", "FuzzFailure", "check_case"]
