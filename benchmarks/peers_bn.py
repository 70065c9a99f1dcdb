"""The BatchNorm family through the peer tools and through normdeploy, side by side.

    .venv/bin/python benchmarks/peers_bn.py [--seconds 4] [--threads 1] [--out benchmarks/results/peers_bn.md]

Every case is a small ONNX graph (plus the zoo's spiking CNN for MPBN). Each goes through

* ONNX Runtime's own optimizer: an InferenceSession at ORT_ENABLE_EXTENDED with
  ``optimized_model_filepath`` set, the written file read back (EXTENDED, not ALL: ALL adds
  the NCHWc layout nodes of this CPU, which hide what was folded; timing runs at ALL anyway);
* onnxoptimizer 0.4.2: ``optimize(model, get_fuse_and_elimination_passes())`` (includes
  ``fuse_bn_into_conv``);
* onnxslim 0.1.98: ``slim(model)``;
* normdeploy: ``normdeploy.optimize(model, target="ort-cpu")`` (canonicalize, rewrite, lower, verify).

Verdicts. A case is *folded* by a tool when its output has no normalization node left and
no more compute nodes than the same tool makes of the *fold floor* (the graph with the
foldable part of the normalization removed: identity for BN/UN/MPBN, GroupScaling for
PowerNorm, unit gain for LayerNorm); *partial* when the normalization node is gone but
ops remain (the shift Add kept before a padded Conv); *kept* otherwise. Outputs are
compared with the unoptimized original on random inputs (and the digits test set for the
spiking CNN): *match* means max |diff| <= 1e-5 * max |original| on every output.

Latency (DESIGN.md section 6): all models of a case (original, the normalization-free floor,
each tool's output) are timed interleaved with ONNX Runtime (ORT_ENABLE_ALL) after warm-up, in
``--sessions`` sessions each (normdeploy.bench.timing.interleaved);
each ratio is p50(model) / p50(floor), so 1.00 means no normalization cost is left.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import normdeploy  # noqa: E402
from normdeploy.bench.floor import floor_model  # noqa: E402
from normdeploy.bench.timing import cpu_name, interleaved  # noqa: E402
from normdeploy.build import OrtRunner  # noqa: E402
from normdeploy.core import norms as survey  # noqa: E402
from normdeploy.core import ops  # noqa: E402

TOLERANCE = 1e-5
TOOLS = ("onnxruntime", "onnxoptimizer", "onnxslim", "normdeploy")
BOOKKEEPING = {"Identity", "Constant"}


# ----------------------------------------------------------------------------- cases

class Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs, self.outputs, self.n = [], [], [], [], 0

    def input(self, name, shape):
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def const(self, value, dtype=np.float32):
        self.n += 1
        name = f"w{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def rand(self, *shape, scale=None, low=None, high=None):
        if low is not None:
            return self.const(self.rng.uniform(low, high, shape))
        scale = scale or 1.0 / np.sqrt(max(1, int(np.prod(shape[1:]))))
        return self.const(self.rng.standard_normal(shape) * scale)

    def __call__(self, op, *inputs, out=None, domain="", **attrs):
        self.n += 1
        out = out or f"t{self.n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"{op}_{self.n}", domain=domain, **attrs))
        return out

    def bn(self, x, c):
        return self("BatchNormalization", x, self.rand(c, low=0.5, high=1.5), self.rand(c, scale=0.2),
                    self.rand(c, scale=0.2), self.rand(c, low=0.5, high=1.5), epsilon=1e-5)

    def model(self, *outputs):
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        opsets = [helper.make_opsetid("", 18)]
        if any(n.domain == ops.DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(ops.DOMAIN, ops.VERSION))
        m = helper.make_model(helper.make_graph(self.nodes, "case", self.inputs, outs, self.inits),
                              opset_imports=opsets)
        m.ir_version = 9
        ops.attach_functions(m)
        return onnx.shape_inference.infer_shapes(m)


def _conv_bn(depthwise=False):
    g = Graph(1)
    c = 64
    y = g("Conv", g.input("x", [1, c, 32, 32]), g.rand(c, 1 if depthwise else c, 3, 3), g.rand(c, scale=0.1),
          pads=[1, 1, 1, 1], group=c if depthwise else 1)
    return g.model(g("Relu", g.bn(y, c), out="y"))


def _convtranspose_bn(depthwise=False):
    g = Graph(2)
    c = 32
    y = g("ConvTranspose", g.input("x", [1, c, 16, 16]), g.rand(c, 1 if depthwise else c, 4, 4),
          strides=[2, 2], pads=[1, 1, 1, 1], group=c if depthwise else 1)
    return g.model(g("Relu", g.bn(y, c), out="y"))


def _bn_conv(pad: int):
    g = Graph(3)
    c = 64
    x = g.bn(g.input("x", [1, c, 32, 32]), c)
    k = 1 if pad == 0 else 3
    return g.model(g("Conv", x, g.rand(c, c, k, k), g.rand(c, scale=0.1), out="y", pads=[pad] * 4))


def _gemm_bn():
    g = Graph(4)
    y = g("Gemm", g.input("x", [64, 512]), g.rand(512, 512), g.rand(512, scale=0.1), transB=1)
    return g.model(g("Relu", g.bn(y, 512), out="y"))


def _matmul_bn():
    g = Graph(5)
    y = g("MatMul", g.input("x", [64, 512]), g.rand(512, 512))
    return g.model(g("Relu", g.bn(y, 512), out="y"))


def _matmul_nd_bn():
    """Linear over the last axis of [N, L, K] (MatMul + Add), then BatchNorm1d over that axis via [N, C, L]."""
    g = Graph(6)
    y = g("Add", g("MatMul", g.input("x", [8, 64, 256]), g.rand(256, 256)), g.rand(256, scale=0.1))
    return g.model(g("Relu", g.bn(g("Transpose", y, perm=[0, 2, 1]), 256), out="y"))


def _conv_bn_second_user():
    g = Graph(7)
    c = 64
    y = g("Conv", g.input("x", [1, c, 32, 32]), g.rand(c, c, 3, 3), pads=[1, 1, 1, 1])
    return g.model(g("Relu", g.bn(y, c), out="y"), g("Sigmoid", y, out="side"))


def _conv_un():
    g = Graph(8)
    c = 64
    y = g("Conv", g.input("x", [1, c, 32, 32]), g.rand(c, c, 3, 3), pads=[1, 1, 1, 1])
    un = g("UnifiedNorm", y, g.rand(c, low=0.5, high=2.0), g.rand(c, low=0.5, high=1.5), g.rand(c, scale=0.2),
           domain=ops.DOMAIN, axis=1, epsilon=1e-5)
    return g.model(g("Relu", un, out="y"))


def _powernorm_linear():
    g = Graph(9)
    d = 192
    h = g("PowerNorm", g.input("x", [1, 197, d]), g.rand(d, low=0.5, high=2.0), g.rand(d, low=0.5, high=1.5),
          g.rand(d, scale=0.2), domain=ops.DOMAIN, groups=4, epsilon=1e-5)
    return g.model(g("Add", g("MatMul", h, g.rand(d, 3 * d)), g.rand(3 * d, scale=0.1), out="y"))


def _layernorm_linear():
    g = Graph(10)
    d = 192
    h = g("LayerNormalization", g.input("x", [1, 197, d]), g.rand(d, low=0.5, high=1.5), g.rand(d, scale=0.2),
          axis=-1, epsilon=1e-5)
    return g.model(g("Add", g("MatMul", h, g.rand(d, 3 * d)), g.rand(3 * d, scale=0.1), out="y"))


def _snn():
    return normdeploy.optimize(os.path.join(ROOT, "models", "snn_lif_mpbn.pt"), bench=False).original


CASES = [
    ("Conv -> BN", _conv_bn, {}),
    ("depthwise Conv -> BN", lambda: _conv_bn(True), {}),
    ("ConvTranspose -> BN", _convtranspose_bn, {}),
    ("depthwise ConvTranspose -> BN", lambda: _convtranspose_bn(True), {}),
    ("BN -> Conv (no padding)", lambda: _bn_conv(0), {}),
    ("BN -> Conv (padding)", lambda: _bn_conv(1), {}),
    ("Gemm(transB=1) -> BN", _gemm_bn, {}),
    ("MatMul 2-D -> BN", _matmul_bn, {}),
    ("MatMul N-D + bias -> Transpose -> BN1d", _matmul_nd_bn, {}),
    ("Conv -> BN, conv output has a 2nd user (must stay)", _conv_bn_second_user, {"must_keep": True}),
    ("Conv -> UnifiedNorm", _conv_un, {}),
    ("PowerNorm -> Linear (affine part)", _powernorm_linear, {}),
    ("LayerNorm gain/bias -> Linear", _layernorm_linear, {}),
    ("MPBN LIF, spiking CNN (zoo, T = 4)", _snn, {"real": True}),
]


# ----------------------------------------------------------------------------- the tools

def run_ort_optimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = path
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def run_onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, onnxoptimizer.get_fuse_and_elimination_passes())


def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(onnx.ModelProto.FromString(model.SerializeToString()))


def run_normdeploy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict]]:
    """normdeploy's optimized model and the passes of its report (what each rewrote or skipped, and why)."""
    result = normdeploy.optimize(model, target="ort-cpu", bench=False)
    return result.optimized, result.report["passes"]


def fold_floor(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with only the foldable part of each normalization removed (what a perfect fold leaves)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for n in m.graph.node:
        kind = survey.kind_of(n)
        if n.op_type == "PowerNorm":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            nodes.append(helper.make_node("GroupScaling", [n.input[0]], [n.output[0]], name=n.name, domain=ops.DOMAIN,
                                          **attrs))
        elif n.op_type == "LayerNormalization":
            d = [i for i in m.graph.initializer if i.name == n.input[1]][0]
            ones = numpy_helper.from_array(np.ones(tuple(d.dims), np.float32), f"{n.name}_unit")
            m.graph.initializer.append(ones)
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            nodes.append(helper.make_node(n.op_type, [n.input[0], ones.name], [n.output[0]], name=n.name, **attrs))
        elif kind:
            nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return ops.attach_functions(m)


# ----------------------------------------------------------------------------- measuring

#: op types that are one linear layer, whatever a tool fused into them (bias, activation)
LINEAR_CLASS = {"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid"}


def dynamic_ops(model: onnx.ModelProto) -> tuple[Counter, set]:
    """Op classes of the nodes that depend on a graph input, and which of them are normalizations.

    Constant subgraphs are not counted (a runtime folds them once at load); every linear layer
    counts as "linear" and activations as "activation", so a tool that fuses Gemm + Relu or
    turns MatMul + Add into Gemm is not charged for it.
    """
    inits = {i.name for i in model.graph.initializer}
    live = {i.name for i in model.graph.input if i.name not in inits}
    ops_, norms = Counter(), set()
    for n in model.graph.node:  # graphs are topologically sorted
        if any(i in live for i in n.input if i):
            live.update(n.output)
            if n.op_type in BOOKKEEPING:
                continue
            key = "linear" if n.op_type in LINEAR_CLASS else "activation" if n.op_type in ACTIVATIONS else n.op_type
            ops_[key] += 1
            if survey.kind_of(n):
                norms.add(key)
    return ops_, norms


def gain_left(model: onnx.ModelProto) -> bool:
    """A LayerNormalization whose scale is not 1 or whose bias is not 0 still applies its affine itself."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "LayerNormalization":
            scale = inits.get(n.input[1])
            bias = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if scale is None or np.any(scale != 1) or (bias is not None and np.any(bias != 0)):
                return True
    return False


def norm_left(model: onnx.ModelProto) -> int:
    return sum(survey.count_by_kind(model).values())


def feeds_for(model: onnx.ModelProto, real: bool, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    specs = [(vi.name, [d.dim_value if d.HasField("dim_value") else 8 for d in vi.type.tensor_type.shape.dim])
             for vi in model.graph.input if vi.name not in inits]
    feeds = [{n: rng.standard_normal(s).astype(np.float32) for n, s in specs},
             {n: (rng.standard_normal(s) * 3).astype(np.float32) for n, s in specs}]
    if real:
        digits = np.load(os.path.join(ROOT, "models", "digits_test.npz"))["input"].astype(np.float32)
        feeds.append({specs[0][0]: digits})
    return feeds


def max_rel_err(ref: OrtRunner, opt: OrtRunner, feeds: list[dict]) -> float:
    worst = 0.0
    for feed in feeds:
        for a, b in zip(ref.run(feed), opt.run(feed)):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if a64.shape != b64.shape:
                return float("inf")
            worst = max(worst, float(np.abs(a64 - b64).max() / max(np.abs(a64).max(), 1e-30)))
    return worst


def verdict(tool_model, tool_floor) -> tuple[str, str]:
    """(folded | partial | kept, what is left beyond the tool's own fold floor)."""
    (ops_model, norms), (ops_floor, _) = dynamic_ops(tool_model), dynamic_ops(tool_floor)
    left = ops_model - ops_floor
    left.pop("activation", None)  # a tool that could not fuse an activation after a kept norm: not the norm's cost
    what = ", ".join(f"{k}" + (f" x{v}" if v > 1 else "") for k, v in sorted(left.items()))
    if norms & set(left):
        return "kept", ", ".join(f"{k}" + (f" x{left[k]}" if left[k] > 1 else "") for k in sorted(norms & set(left)))
    if gain_left(tool_model) and not gain_left(tool_floor):
        return "kept", "gain/bias inside LayerNormalization"
    if not left:
        return "folded", ""
    if set(left) <= {"Add", "Sub"}:
        return "partial", what  # the scale folded, a shift stays
    return "kept", what


def bench_case(name, make, flags, seconds, threads, sessions=3):
    original = make()
    floor = floor_model(original)
    ffloor = fold_floor(original)

    def session(model):
        return lambda: OrtRunner(model, threads=threads)

    factories = {"original": session(original), "floor": session(floor)}
    reference = OrtRunner(original, threads=threads, graph_optimization="disable")
    feeds = feeds_for(original, flags.get("real", False))
    row = {"case": name, "norms_before": norm_left(original), "tools": {}, "flags": flags}
    for tool in TOOLS:
        cell = {}
        try:
            if tool == "normdeploy":
                out, results = run_normdeploy(original)
                out_floor, _ = run_normdeploy(ffloor)
                cell["skipped"] = [s["reason"] for r in results for s in r["skipped"] if r["name"].startswith("fold")]
                cell["notes"] = [n for r in results for n in r["notes"] if "shift stays" in n]
            else:
                fn = {"onnxruntime": run_ort_optimizer, "onnxoptimizer": run_onnxoptimizer,
                      "onnxslim": run_onnxslim}[tool]
                out, out_floor = fn(original), fn(ffloor)
            cell["verdict"], cell["left"] = verdict(out, out_floor)
            runner = OrtRunner(out, threads=threads)
            cell["err"] = max_rel_err(reference, runner, feeds)
            runner.close()
            factories[tool] = session(out)
        except Exception as e:  # noqa: BLE001 - a peer failing on a graph is a result
            cell["verdict"], cell["error"] = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        row["tools"][tool] = cell
    feed = feeds[0]
    res = interleaved(factories, feed, seconds=seconds, warmup=10, sessions=sessions)
    row["p50"] = {k: res.p50(k) for k in factories}
    row["ci"] = {k: res.ratio_interval(k, "floor") for k in factories}
    row["sessions"] = res.sessions
    row["rounds"] = len(res.timings["floor"].samples_ms)
    return row


# ----------------------------------------------------------------------------- report

def cell_text(cell: dict) -> str:
    if cell["verdict"] == "error":
        return f"error ({cell['error'][:60]})"
    text = {"folded": "**folded**", "partial": "partial", "kept": "kept"}[cell["verdict"]]
    if cell["left"]:
        text += f" ({cell['left']} left)"
    text += ", match" if cell["err"] <= TOLERANCE else f", **MISMATCH {cell['err']:.1e}**"
    return text


def report(rows, args, elapsed) -> str:
    import onnxoptimizer
    import onnxruntime
    import onnxslim
    import torch

    lines = [
        "# The BatchNorm family: peer tools vs normdeploy",
        "",
        f"Generated by `{' '.join(['.venv/bin/python', 'benchmarks/peers_bn.py'] + sys.argv[1:])}` "
        f"in {elapsed:.0f} s.",
        "",
        f"Machine: {cpu_name()} ({platform.machine()}), {len(os.sched_getaffinity(0))} cores available, "
        f"ONNX Runtime intra-op threads = {args.threads}; onnxruntime {onnxruntime.__version__}, "
        f"onnxoptimizer {getattr(onnxoptimizer, '__version__', '0.4.2')}, onnxslim {onnxslim.__version__}, "
        f"onnx {onnx.__version__}, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "## Who folds what",
        "",
        "*folded*: no input-dependent op left beyond what the same tool makes of the fold floor (the graph "
        "with the foldable part removed: BN/UN/MPBN -> Identity, PowerNorm -> GroupScaling, LayerNorm -> unit "
        "gain, no bias); *partial*: the scale folded, a shift Add stays; *kept*: the normalization node, or the "
        "ops it was inlined into, remain (listed). Ops computed from constants only are not counted: a runtime "
        "folds them once at load. "
        f"*match*: every output within {TOLERANCE:g} x max |original| of the unoptimized original on random "
        "inputs (and the 360 digits test images for the spiking CNN).",
        "",
        "| case | norm nodes | " + " | ".join(TOOLS) + " |",
        "|---|---|" + "---|" * len(TOOLS),
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['norms_before']} | "
                     + " | ".join(cell_text(r["tools"][t]) for t in TOOLS) + " |")
    lines += ["", "## Latency relative to the normalization-free floor", "",
              "p50 of each model / p50 of the floor (every normalization node replaced by Identity: it computes the "
              "wrong thing, but no normalization optimization can beat it), timed interleaved in one run; "
              "[95 % bootstrap interval]. The last column is normdeploy's speedup over the original.", "",
              "| case | floor p50 ms | original | " + " | ".join(TOOLS) + " | normdeploy speedup |",
              "|---|---|---|" + "---|" * len(TOOLS) + "---|"]
    for r in rows:
        p50 = r["p50"]

        def ratio(k):
            if k not in p50:
                return "n/a"
            lo, hi = r["ci"][k]
            return f"{p50[k] / p50['floor']:.2f} [{lo:.2f}, {hi:.2f}]"
        speed = f"{p50['original'] / p50['normdeploy']:.2f}x" if "normdeploy" in p50 else "n/a"
        lines.append(f"| {r['case']} | {p50['floor']:.3f} | {ratio('original')} | "
                     + " | ".join(ratio(t) for t in TOOLS) + f" | {speed} |")
    lines += ["", "## normdeploy's reasons and notes", ""]
    for r in rows:
        nd = r["tools"]["normdeploy"]
        for reason in nd.get("skipped", []):
            lines.append(f"- {r['case']}: refused: {reason}")
        for note in nd.get("notes", []):
            lines.append(f"- {r['case']}: {note}")
    lines += ["", "Max relative error per tool (vs the unoptimized original):", "",
              "| case | " + " | ".join(TOOLS) + " |", "|---|" + "---|" * len(TOOLS)]
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(
            "error" if "err" not in r["tools"][t] else f"{r['tools'][t]['err']:.1e}" for t in TOOLS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="timing budget per case")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--sessions", type=int, default=3, help="sessions per model, created in rotating order (default 3)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "peers_bn.md"))
    ap.add_argument("--only", default=None, help="run the cases whose name contains this text")
    args = ap.parse_args()
    start = time.time()
    rows = []
    for name, make, flags in CASES:
        if args.only and args.only.lower() not in name.lower():
            continue
        rows.append(bench_case(name, make, flags, args.seconds, args.threads, args.sessions))
        t = rows[-1]["tools"]
        print(f"{name}: " + "; ".join(f"{k} {v['verdict']}" for k, v in t.items()), flush=True)
    text = report(rows, args, time.time() - start)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    bad = [r["case"] for r in rows for t in TOOLS if r["tools"][t].get("err", 0) > TOLERANCE and t == "normdeploy"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
