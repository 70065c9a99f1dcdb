"""fold_affine_into_linear: every per-channel affine into a linear neighbour, exactly, or refused with a reason."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normdeploy.core import ops
from normdeploy.core.passes import PassContext
from tests.conftest import ROOT
from tests.graph_helpers import run_step

PASS = "fold_affine_into_linear"
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
NORMS = {"BatchNormalization", "UnifiedNorm", "PowerNorm", "LayerNormalization", "RMSNorm", "DynamicTanh",
         "ScaleNorm"}


# ----------------------------------------------------------------------------- helpers

class G:
    """A hand-built graph: ``g("Conv", x, w, out="y", group=2)`` adds a node and returns its output."""

    def __init__(self, dtype=np.float32, opset: int = 18, seed: int = 0):
        self.dtype, self.opset = np.dtype(dtype), opset
        self.nodes, self.inits, self.inputs, self.n = [], [], [], 0
        self.rng = np.random.default_rng(seed)

    def input(self, shape, name: str = "x") -> str:
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(self.dtype), shape))
        return name

    def const(self, value, dtype=None, name=None) -> str:
        self.n += 1
        name = name or f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype or self.dtype), name))
        return name

    def rand(self, *shape, low=-1.0, high=1.0) -> str:
        return self.const(self.rng.uniform(low, high, shape))

    def __call__(self, op, *inputs, out=None, domain="", **attrs) -> str:
        self.n += 1
        out = out or f"{op.lower()}{self.n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"{op}_{self.n}", domain=domain, **attrs))
        return out

    def bn(self, x, c, gamma="mixed", name=None) -> str:
        return self("BatchNormalization", x, self.const(gammas(self.rng, c, gamma)), self.rand(c),
                    self.rand(c), self.rand(c, low=0.1, high=2.0), out=name, epsilon=1e-5)

    def model(self, *outputs, types: dict | None = None) -> onnx.ModelProto:
        """The model with ``outputs`` (of the graph's dtype unless ``types`` says otherwise), shapes inferred."""
        types = types or {}
        outs = [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(np.dtype(types.get(o, self.dtype))),
                                              None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == ops.DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(ops.DOMAIN, ops.VERSION))
        m = helper.make_model(graph, opset_imports=opsets)
        m.ir_version = 8
        ops.attach_functions(m)
        return onnx.shape_inference.infer_shapes(m)


def gammas(rng, c: int, mode: str) -> np.ndarray:
    mag = rng.uniform(0.3, 2.0, c)
    if mode == "positive":
        return mag
    if mode == "negative":
        return -mag
    if mode == "zero":
        g = mag * np.sign(rng.uniform(-1, 1, c))
        g[:: 2] = 0.0
        return g
    return mag * np.where(rng.uniform(size=c) < 0.5, -1.0, 1.0)


GAMMA = st.sampled_from(["positive", "negative", "mixed", "zero"])
DTYPE = st.sampled_from([np.float32, np.float16])
#: fp32: the issue's bar; fp16: both graphs round in fp16 (the original twice), a few ulps of 2^-11
RTOL = {np.float32: 1e-5, np.float16: 4e-3}


def as_proto(model) -> onnx.ModelProto:
    """An export as a ModelProto (``to_onnx`` gives an ``onnx_ir.Model``)."""
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def fold(model: onnx.ModelProto):
    after, result = run_step(model, PASS, PassContext())
    assert result.matched == len(result.rewrites) + len(result.skipped), result
    return after, result


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def feeds_for(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        out[vi.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return out


def assert_same(before, after, rtol: float = 1e-5, seeds=(0, 1)) -> None:
    """Outputs keep their names, and max |after - before| <= rtol * max |before| per output."""
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    for seed in seeds:
        feeds = feeds_for(before, seed)
        for name, w, g in zip([o.name for o in before.graph.output], run(before, feeds), run(after, feeds)):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            w64, g64 = w.astype(np.float64), g.astype(np.float64)
            err = np.abs(g64 - w64).max() / max(np.abs(w64).max(), 1e-30)
            assert err <= rtol, f"output {name} (seed {seed}): max rel err {err:.3g} > {rtol}"


def kinds(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def norm_count(model) -> int:
    return sum(n.op_type in NORMS for n in model.graph.node)


def assert_folded(before, after, result, drop: int = 1, rtol: float = 1e-5) -> None:
    assert result.rewrites, result.skipped
    assert norm_count(after) == 0, kinds(after)
    assert len(after.graph.node) == len(before.graph.node) - drop, (kinds(before), kinds(after))
    assert_same(before, after, rtol)


def assert_untouched(model, reason: str) -> None:
    after, result = fold(model)
    assert not result.rewrites
    assert after.SerializeToString() == model.SerializeToString()
    assert any(reason in s.reason for s in result.skipped), [s.reason for s in result.skipped]


# ----------------------------------------------------------------------------- after the linear layer

@SETTINGS
@given(dims=st.integers(1, 3), depthwise=st.booleans(), groups=st.sampled_from([1, 2]), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), pad=st.integers(0, 1), bias=st.booleans(), gamma=GAMMA, dtype=DTYPE,
       seed=st.integers(0, 99))
def test_conv_then_bn(dims, depthwise, groups, stride, dilation, pad, bias, gamma, dtype, seed):
    cin = 4
    group = cin if depthwise else groups
    cout = cin if depthwise else 6
    k = 3 if dims < 3 else 2
    g = G(dtype=dtype, seed=seed)
    x = g.input([1, cin] + [7] * dims)
    inputs = [x, g.rand(cout, cin // group, *[k] * dims)] + ([g.rand(cout)] if bias else [])
    y = g("Conv", *inputs, group=group, strides=[stride] * dims, dilations=[dilation] * dims, pads=[pad] * 2 * dims)
    before = g.model(g.bn(y, cout, gamma, name="out"))
    after, result = fold(before)
    assert_folded(before, after, result, rtol=RTOL[dtype])
    assert "Conv" in result.rewrites[0].what


@SETTINGS
@given(dims=st.integers(1, 2), groups=st.sampled_from([1, 2, "depthwise"]), stride=st.integers(1, 2),
       pad=st.integers(0, 1), bias=st.booleans(), gamma=GAMMA, seed=st.integers(0, 99))
def test_convtranspose_then_bn(dims, groups, stride, pad, bias, gamma, seed):
    cin = 4
    group = cin if groups == "depthwise" else groups
    cpg = 1 if groups == "depthwise" else 3
    g = G(seed=seed)
    x = g.input([1, cin] + [5] * dims)
    inputs = [x, g.rand(cin, cpg, *[3] * dims)] + ([g.rand(cpg * group)] if bias else [])
    y = g("ConvTranspose", *inputs, group=group, strides=[stride] * dims, pads=[pad] * 2 * dims)
    before = g.model(g.bn(y, cpg * group, gamma, name="out"))
    after, result = fold(before)
    assert_folded(before, after, result)


@SETTINGS
@given(trans_a=st.booleans(), trans_b=st.booleans(), alpha=st.sampled_from([1.0, 0.5, -2.0]),
       beta=st.sampled_from([1.0, 0.25]), c_shape=st.sampled_from([None, "n", "1n", "mn"]), gamma=GAMMA,
       dtype=DTYPE, seed=st.integers(0, 99))
def test_gemm_then_bn(trans_a, trans_b, alpha, beta, c_shape, gamma, dtype, seed):
    m, k, n = 3, 5, 6
    g = G(dtype=dtype, seed=seed)
    x = g.input([k, m] if trans_a else [m, k])
    inputs = [x, g.rand(*((n, k) if trans_b else (k, n)))]
    if c_shape:
        inputs.append(g.rand(*{"n": (n,), "1n": (1, n), "mn": (m, n)}[c_shape]))
    y = g("Gemm", *inputs, transA=int(trans_a), transB=int(trans_b), alpha=alpha, beta=beta)
    before = g.model(g.bn(y, n, gamma, name="out"))
    after, result = fold(before)
    assert_folded(before, after, result, rtol=RTOL[dtype])


@SETTINGS
@given(layout=st.sampled_from(["2d", "nd_transpose", "nd_bias_transpose", "left", "left_batched", "flatten"]),
       gamma=GAMMA, seed=st.integers(0, 99))
def test_matmul_then_bn(layout, gamma, seed):
    """MatMul with a constant weight on either side, 2-D and N-D, BN reaching it through Transpose/Reshape."""
    g = G(seed=seed)
    drop = 1
    if layout == "2d":  # [N, K] @ [K, C] -> BN1d: the MatMul becomes a Gemm whose C is the shift
        y = g("MatMul", g.input([4, 5]), g.rand(5, 6))
        out = g.bn(y, 6, gamma, name="out")
    elif layout == "nd_transpose":  # [N, L, K] @ [K, C] -> Transpose -> [N, C, L] -> BN1d
        y = g("MatMul", g.input([2, 7, 5]), g.rand(5, 6))
        out = g.bn(g("Transpose", y, perm=[0, 2, 1]), 6, gamma, name="out")
        drop = 0
    elif layout == "nd_bias_transpose":  # Linear on [N, L, K] exported as MatMul + Add, then BN1d on [N, C, L]
        y = g("Add", g("MatMul", g.input([2, 7, 5]), g.rand(5, 6)), g.rand(6))
        out = g.bn(g("Transpose", y, perm=[0, 2, 1]), 6, gamma, name="out")
    elif layout == "left":  # W [C, K] @ X [N, K, L] -> [N, C, L] -> BN1d (a 1x1 Conv1d written as MatMul)
        y = g("MatMul", g.rand(6, 5), g.input([2, 5, 7]))
        out = g.bn(y, 6, gamma, name="out")
        drop = 0
    elif layout == "left_batched":  # W [N, C, K] broadcast batch, bias Add after
        y = g("Add", g("MatMul", g.rand(2, 6, 5), g.input([2, 5, 7])), g.rand(6, 1))
        out = g.bn(y, 6, gamma, name="out")
    else:  # [N, K] @ [K, C] + b -> Reshape [N, C, 1, 1] -> BN2d
        y = g("Add", g("MatMul", g.input([3, 5]), g.rand(5, 6)), g.rand(6))
        out = g.bn(g("Reshape", y, g.const([-1, 6, 1, 1], np.int64)), 6, gamma, name="out")
    before = g.model(out)
    after, result = fold(before)
    assert_folded(before, after, result, drop=drop)
    if layout == "2d":
        assert kinds(after) == ["Gemm"]


MOVES = [("Reshape", (1, 6, 4)), ("Reshape", (1, 3, 2, 4)), ("Reshape", (1, 24)), ("Reshape", (1, 2, 3, 4)),
         ("Reshape", (1, 6, 2, 2, 1)), ("Reshape", (1, 12, 2)), ("Flatten", 2), ("Flatten", 1),
         ("Transpose", (0, 2, 1, 3)), ("Transpose", (0, 3, 2, 1)), ("Transpose", (1, 0, 2, 3)), ("Unsqueeze", 1),
         ("Unsqueeze", 4)]


def _move(g: G, x: str, move) -> str:
    op, arg = move
    if op == "Reshape":
        return g("Reshape", x, g.const(list(arg), np.int64))
    if op == "Flatten":
        return g("Flatten", x, axis=arg)
    if op == "Transpose":
        return g("Transpose", x, perm=list(arg))
    return g("Unsqueeze", x, g.const([arg], np.int64))


@SETTINGS
@given(move=st.sampled_from(MOVES), side=st.sampled_from(["producer", "consumer"]), seed=st.integers(0, 99))
def test_through_movers_the_fold_is_exact_or_refused(move, side, seed):
    """Conv -> mover -> BN (axis 1 of whatever comes out), BN -> mover -> MatMul: never wrong."""
    g = G(seed=seed)
    if side == "producer":
        y = _move(g, g("Conv", g.input([1, 3, 2, 2]), g.rand(6, 3, 1, 1), g.rand(6)), move)
        shape = onnx.shape_inference.infer_shapes(g.model(y)).graph.output[0].type.tensor_type.shape.dim
        out = g.bn(y, shape[1].dim_value, name="out")
    else:
        y = _move(g, g.bn(g.input([1, 6, 2, 2]), 6), move)
        shape = onnx.shape_inference.infer_shapes(g.model(y)).graph.output[0].type.tensor_type.shape.dim
        out = g("MatMul", y, g.rand(shape[-1].dim_value, 3), out="out")
    before = g.model(out)
    after, result = fold(before)
    if result.rewrites:
        assert norm_count(after) == 0
        assert_same(before, after)
    else:
        assert after.SerializeToString() == before.SerializeToString()
        assert result.skipped[0].reason


def test_gemm_reshape_then_bn2d_and_conv_flatten_then_bn1d():
    g = G(seed=3)
    y = g("Gemm", g.input([3, 5]), g.rand(6, 5), g.rand(6), transB=1)
    a = g.bn(g("Reshape", y, g.const([3, 6, 1, 1], np.int64)), 6, name="a")
    z = g("Conv", g.input([3, 2, 1, 1], "x2"), g.rand(4, 2, 1, 1))
    b = g.bn(g("Flatten", z, axis=1), 4, name="b")
    before = g.model(a, b)
    after, result = fold(before)
    assert_folded(before, after, result, drop=2)


def test_unified_norm_after_conv_and_matmul():
    g = G(seed=4)
    y = g("Conv", g.input([1, 3, 6, 6]), g.rand(5, 3, 3, 3), pads=[1, 1, 1, 1])
    a = g("UnifiedNorm", y, g.rand(5, low=0.2, high=2), g.rand(5), g.rand(5), domain=ops.DOMAIN, out="a", axis=1,
          epsilon=1e-5)
    z = g("Add", g("MatMul", g.input([2, 4, 3], "t"), g.rand(3, 7)), g.rand(7))
    b = g("UnifiedNorm", z, g.rand(7, low=0.2, high=2), g.rand(7), g.rand(7), domain=ops.DOMAIN, out="b", axis=-1,
          epsilon=1e-5)
    before = g.model(a, b)
    after, result = fold(before)
    assert_folded(before, after, result, drop=2)


# ----------------------------------------------------------------------------- before the linear layer

@SETTINGS
@given(dims=st.integers(1, 3), depthwise=st.booleans(), groups=st.sampled_from([1, 2]), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), pad=st.sampled_from([0, 1, "same"]), bias=st.booleans(),
       gamma=st.sampled_from(["positive", "negative", "mixed"]), dtype=DTYPE, seed=st.integers(0, 99))
def test_bn_then_conv(dims, depthwise, groups, stride, dilation, pad, bias, gamma, dtype, seed):
    cin = 4
    group = cin if depthwise else groups
    cout = 8 if depthwise else 6
    k = 3 if dims < 3 else 2
    g = G(dtype=dtype, seed=seed)
    x = g.bn(g.input([1, cin] + [6] * dims), cin, gamma)
    inputs = [x, g.rand(cout, cin // group, *[k] * dims)] + ([g.rand(cout)] if bias else [])
    padding = {"auto_pad": "SAME_UPPER"} if pad == "same" else {"pads": [pad] * 2 * dims}
    if pad == "same":  # ONNX Runtime supports neither stride nor dilation with SAME padding
        stride = dilation = 1
    y = g("Conv", *inputs, out="out", group=group, strides=[stride] * dims, dilations=[dilation] * dims, **padding)
    before = g.model(y)
    after, result = fold(before)
    if pad == 0:
        assert_folded(before, after, result, rtol=RTOL[dtype])
        assert not result.notes
    else:  # the scale folds, the shift stays as an Add before the Conv, and the report says so
        assert_folded(before, after, result, drop=0, rtol=RTOL[dtype])
        assert kinds(after) == ["Add", "Conv"]
        assert any("pads" in note and "shift stays as an Add" in note for note in result.notes), result.notes


@SETTINGS
@given(trans_a=st.booleans(), trans_b=st.booleans(), alpha=st.sampled_from([1.0, -0.5]),
       beta=st.sampled_from([1.0, 0.5]), with_c=st.booleans(), gamma=GAMMA, seed=st.integers(0, 99))
def test_affine_then_gemm(trans_a, trans_b, alpha, beta, with_c, gamma, seed):
    """BN1d before Gemm (transA=0), UnifiedNorm over axis 0 before Gemm(transA=1): both on the contraction axis."""
    k, m, n = 5, 3, 4
    g = G(seed=seed)
    if trans_a:
        x = g("UnifiedNorm", g.input([k, m]), g.rand(k, low=0.2, high=2), g.const(gammas(g.rng, k, gamma)),
              g.rand(k), domain=ops.DOMAIN, axis=0, epsilon=1e-5)
    else:
        x = g.bn(g.input([m, k]), k, gamma)
    inputs = [x, g.rand(*((n, k) if trans_b else (k, n)))] + ([g.rand(n)] if with_c else [])
    before = g.model(g("Gemm", *inputs, out="out", transA=int(trans_a), transB=int(trans_b), alpha=alpha, beta=beta))
    after, result = fold(before)
    assert_folded(before, after, result)


@SETTINGS
@given(layout=st.sampled_from(["right", "right_bias", "right_nd", "left", "flatten_gemm", "transpose"]),
       gamma=GAMMA, seed=st.integers(0, 99))
def test_affine_then_matmul(layout, gamma, seed):
    g = G(seed=seed)
    drop = 1
    if layout == "right":  # BN1d [N, K] -> MatMul(x, W): the MatMul becomes a Gemm, C = W c
        out = g("MatMul", g.bn(g.input([3, 5]), 5, gamma), g.rand(5, 4), out="out")
    elif layout == "right_bias":  # ... and into the bias Add of a Linear
        out = g("Add", g("MatMul", g.bn(g.input([3, 5]), 5, gamma), g.rand(5, 4)), g.rand(4), out="out")
    elif layout == "right_nd":  # UnifiedNorm over the last axis of [N, L, K] -> MatMul with a batched weight [N, K, C]
        x = g("UnifiedNorm", g.input([2, 3, 5]), g.rand(5, low=0.2, high=2), g.const(gammas(g.rng, 5, gamma)),
              g.rand(5), domain=ops.DOMAIN, axis=-1, epsilon=1e-5)
        out = g("Add", g("MatMul", x, g.rand(2, 5, 4)), g.rand(4), out="out")
    elif layout == "left":  # BN1d [N, K, L] -> MatMul(W [C, K], x)
        out = g("Add", g("MatMul", g.rand(4, 5), g.bn(g.input([2, 5, 3]), 5, gamma)), g.rand(4, 1), out="out")
    elif layout == "flatten_gemm":  # BN2d -> Flatten -> Gemm: per-channel scale becomes per-feature
        x = g("Flatten", g.bn(g.input([2, 3, 2, 2]), 3, gamma), axis=1)
        out = g("Gemm", x, g.rand(4, 12), g.rand(4), out="out", transB=1)
    else:  # BN1d [N, C, L] -> Transpose -> [N, L, C] -> Linear
        x = g("Transpose", g.bn(g.input([2, 5, 3]), 5, gamma), perm=[0, 2, 1])
        out = g("Add", g("MatMul", x, g.rand(5, 4)), g.rand(4), out="out")
    before = g.model(out)
    after, result = fold(before)
    assert_folded(before, after, result, drop=drop)


def test_bn_then_convtranspose_keeps_the_shift():
    g = G(seed=5)
    x = g.bn(g.input([1, 4, 5, 5]), 4, "mixed")
    before = g.model(g("ConvTranspose", x, g.rand(4, 2, 3, 3), g.rand(4), out="out", group=2, strides=[2, 2]))
    after, result = fold(before)
    assert_folded(before, after, result, drop=0)
    assert kinds(after) == ["Add", "ConvTranspose"]
    assert any("ConvTranspose" in n and "shift stays" in n for n in result.notes)


def test_bn_feeding_several_convs_folds_into_each():
    g = G(seed=6)
    x = g.bn(g.input([1, 4, 6, 6]), 4, "mixed")
    a = g("Conv", x, g.rand(3, 4, 1, 1), out="a")
    b = g("Conv", x, g.rand(6, 2, 3, 3), out="b", group=2, pads=[1, 1, 1, 1])
    c = g("Conv", g("Reshape", x, g.const([1, 4, 36, 1], np.int64)), g.rand(2, 4, 1, 1), out="c")
    before = g.model(a, b, c)
    after, result = fold(before)
    assert_folded(before, after, result, drop=0)  # BN out, one kept-shift Add in (before the padded conv)
    assert sorted(kinds(after)) == ["Add", "Conv", "Conv", "Conv", "Reshape"]


# ----------------------------------------------------------------------------- the LayerNorm family into consumers

def _token_norm(g: G, kind: str, x: str, d: int) -> str:
    gain, bias = g.rand(d, low=0.5, high=1.5), g.rand(d)
    if kind == "ln":
        return g("LayerNormalization", x, gain, bias, axis=-1, epsilon=1e-5)
    if kind == "rms":
        return g("RMSNorm", x, gain, domain=ops.DOMAIN, epsilon=1e-6)
    if kind == "dyt":
        return g("DynamicTanh", x, g.const(0.7), gain, bias, domain=ops.DOMAIN, axis=-1)
    if kind == "scale":
        return g("ScaleNorm", x, g.const(2.5), domain=ops.DOMAIN, epsilon=1e-5)
    if kind == "powernorm":
        return g("PowerNorm", x, g.rand(d, low=0.2, high=2), gain, bias, domain=ops.DOMAIN, groups=2, epsilon=1e-5)
    return g("UnifiedNorm", x, g.rand(d, low=0.2, high=2), gain, bias, domain=ops.DOMAIN, axis=-1, epsilon=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ln", "rms", "dyt", "scale", "powernorm", "un"])
def test_token_norm_gain_folds_into_qkv(kind):
    """Pre-norm block: norm -> Q, K, V projections (MatMul + Add) -> the gain and bias live in W, b."""
    d = 8
    g = G(seed=7)
    h = _token_norm(g, kind, g.input([2, 5, d]), d)
    outs = [g("Add", g("MatMul", h, g.rand(d, 6)), g.rand(6), out=name) for name in ("q", "k", "v")]
    before = g.model(*outs)
    after, result = fold(before)
    assert result.rewrites, result.skipped
    assert len(after.graph.node) == len(before.graph.node) - (1 if kind == "un" else 0)
    assert_same(before, after)
    node = next((n for n in after.graph.node if n.domain == ops.DOMAIN or n.op_type == "LayerNormalization"), None)
    if kind == "un":
        assert node is None
    elif kind == "powernorm":
        assert node.op_type == "GroupScaling"
    else:
        params = [numpy_helper.to_array(i) for i in after.graph.initializer if i.name in node.input[1:]]
        gain_and_bias = params if kind != "dyt" else params[1:]
        assert all(np.all(p == 1) or np.all(p == 0) for p in gain_and_bias), params
        again, result2 = fold(after)
        assert not result2.rewrites and "nothing to fold" in result2.skipped[0].reason


def test_constant_add_and_mul_after_the_norm_join_the_fold():
    """RMSNorm -> Add(bias) (what preln_to_rmsnorm leaves) and BN -> Mul(k) -> Sub(k2) -> Conv: all fold away."""
    g = G(seed=19)
    h = g("Add", _token_norm(g, "rms", g.input([2, 5, 8]), 8), g.rand(8))
    a = g("Add", g("MatMul", h, g.rand(8, 4)), g.rand(4), out="a")
    x = g("Sub", g("Mul", g.bn(g.input([1, 3, 5, 5], "x2"), 3), g.rand(3, 1, 1)), g.const(0.5))
    b = g("Conv", x, g.rand(4, 3, 3, 3), out="b")
    before = g.model(a, b)
    after, result = fold(before)
    assert len(result.rewrites) == 2, result.skipped
    assert sorted(kinds(after)) == ["Add", "Conv", "MatMul", "RMSNorm"]
    assert_same(before, after)


def test_final_norm_through_gather_into_head():
    """ViT head: LN -> x[:, 0] (Gather) -> Gemm."""
    g = G(seed=8)
    h = _token_norm(g, "ln", g.input([2, 5, 8]), 8)
    cls = g("Gather", h, g.const(0, np.int64), axis=1)
    before = g.model(g("Gemm", cls, g.rand(3, 8), g.rand(3), out="out", transB=1))
    after, result = fold(before)
    assert result.rewrites
    assert_same(before, after)


def test_post_norm_residual_keeps_the_affine():
    g = G(seed=9)
    x = g.input([2, 5, 8])
    h = _token_norm(g, "ln", x, 8)
    before = g.model(g("Add", h, g("MatMul", h, g.rand(8, 8)), out="out"))
    assert_untouched(before, "residual")


# ----------------------------------------------------------------------------- refused, graph untouched

def test_conv_output_with_a_second_reader_is_not_folded():
    """torch.ao's fuse_modules gets this wrong; the BN must stay (neither neighbour can take it)."""
    g = G(seed=10)
    y = g("Conv", g.input([1, 3, 6, 6]), g.rand(4, 3, 3, 3), pads=[1, 1, 1, 1])
    before = g.model(g("Relu", g.bn(y, 4)), g("Sigmoid", y, out="side"))
    assert_untouched(before, "readers")


def test_nonconstant_parameters_are_refused():
    g = G(seed=11)
    y = g("Conv", g.input([1, 3, 6, 6]), g.rand(4, 3, 3, 3))
    gamma = g.input([4], "gamma")
    before = g.model(g("BatchNormalization", y, gamma, g.rand(4), g.rand(4), g.rand(4, low=0.5), out="out"))
    assert_untouched(before, "scale is not a constant")


def test_nonlinear_neighbours_are_refused():
    g = G(seed=12)
    before = g.model(g("Relu", g.bn(g("Relu", g.input([1, 3, 4, 4])), 3), out="out"))
    after, result = fold(before)
    assert not result.rewrites
    reason = result.skipped[0].reason
    assert "into the producer: producer Relu" in reason and "into the consumers: Relu" in reason


def test_graph_outputs_are_kept_or_refused():
    g = G(seed=13)
    y = g("Conv", g.input([1, 3, 6, 6]), g.rand(4, 3, 3, 3), out="conv_out")
    before = g.model(g.bn(y, 4, name="bn_out"), "conv_out")
    assert_untouched(before, "graph output")
    g = G(seed=13)
    y = g("Conv", g.input([1, 3, 6, 6]), g.rand(4, 3, 3, 3))
    before = g.model(g.bn(y, 4, name="bn_out"))
    after, result = fold(before)
    assert [o.name for o in after.graph.output] == ["bn_out"]
    assert_folded(before, after, result)


def test_zero_scale_before_a_padded_conv_is_refused():
    g = G(seed=14)
    x = g("BatchNormalization", g.input([1, 2, 5, 5]), g.const([0.0, 1.0]), g.const([0.5, 0.1]), g.const([0.0, 0.0]),
          g.const([1.0, 1.0]))
    before = g.model(g("Conv", x, g.rand(3, 2, 3, 3), out="out", pads=[1, 1, 1, 1]))
    assert_untouched(before, "scale is zero where the shift is not")


def test_training_mode_and_scale_varying_per_position_are_refused():
    g = G(seed=15, opset=15)
    y = g("Conv", g.input([1, 3, 4, 4]), g.rand(4, 3, 1, 1))
    before = g.model(g("BatchNormalization", y, g.rand(4), g.rand(4), g.rand(4), g.rand(4, low=0.5), out="out",
                       training_mode=1))
    assert_untouched(before, "training mode")
    g = G(seed=15)
    y = g("Conv", g.input([1, 3, 2, 2]), g.rand(4, 3, 1, 1))  # [1, 4, 2, 2] -> [1, 16]: BN1d per element
    before = g.model(g.bn(g("Flatten", y, axis=1), 16, name="out"))
    assert_untouched(before, "not per output channel")


# ----------------------------------------------------------------------------- safety

def test_shared_weight_is_cloned():
    g = G(seed=16)
    w = g.rand(4, 3, 3, 3)
    a = g.bn(g("Conv", g.input([1, 3, 6, 6]), w), 4, name="a")
    b = g("Conv", g.input([1, 3, 6, 6], "x2"), w, out="b")
    before = g.model(a, b)
    after, result = fold(before)
    assert_folded(before, after, result)
    conv_b = [n for n in after.graph.node if n.output[0] == "b"][0]
    assert conv_b.input[1] == w
    np.testing.assert_array_equal(numpy_helper.to_array([i for i in after.graph.initializer if i.name == w][0]),
                                  numpy_helper.to_array([i for i in before.graph.initializer if i.name == w][0]))


@pytest.mark.parametrize("where", ["after_conv", "before_conv", "before_padded_conv", "after_gemm", "ln_matmul"])
def test_fp16_models_fold_in_float64(where):
    g = G(dtype=np.float16, seed=17)
    if where == "after_conv":
        out = g.bn(g("Conv", g.input([1, 3, 6, 6]), g.rand(4, 3, 3, 3), pads=[1, 1, 1, 1]), 4, name="out")
    elif where == "before_conv":
        out = g("Conv", g.bn(g.input([1, 3, 6, 6]), 3), g.rand(4, 3, 3, 3), g.rand(4), out="out")
    elif where == "before_padded_conv":  # the kept shift Add is fp16 too
        out = g("Conv", g.bn(g.input([1, 3, 6, 6]), 3), g.rand(4, 3, 3, 3), out="out", pads=[1, 1, 1, 1])
    elif where == "after_gemm":
        out = g.bn(g("Gemm", g.input([2, 5]), g.rand(4, 5), g.rand(4), transB=1), 4, name="out")
    else:
        out = g("Add", g("MatMul", _token_norm(g, "ln", g.input([2, 3, 8]), 8), g.rand(8, 4)), g.rand(4), out="out")
    before = g.model(out)
    after, result = fold(before)
    assert result.rewrites
    assert all(i.data_type == TensorProto.FLOAT16 for i in after.graph.initializer
               if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE))
    assert_same(before, after, rtol=4e-3)


def test_same_input_gives_byte_identical_output_and_second_run_is_a_no_op():
    g = G(seed=18)
    y = g("Conv", g.input([1, 3, 6, 6]), g.rand(4, 3, 3, 3))
    z = g("MatMul", g.bn(g("Flatten", g("Relu", g.bn(y, 4)), axis=1), 64), g.rand(64, 5), out="out")
    before = g.model(z)
    a, _ = fold(before)
    b, _ = fold(before)
    assert a.SerializeToString() == b.SerializeToString()
    again, result = fold(a)
    assert not result.rewrites


# ----------------------------------------------------------------------------- real models

@pytest.mark.slow
def test_zoo_digits_cnn_has_no_normalization_left():
    import os

    from normdeploy.export import to_onnx
    from normdeploy.load import load

    root = ROOT
    before = as_proto(to_onnx(load(os.path.join(root, "models", "digits_cnn_bn_un.pt")))[0])
    after, result = fold(before)
    assert len(result.rewrites) == 2 and norm_count(after) == 0
    data = np.load(os.path.join(root, "models", "digits_test.npz"))["input"].astype(np.float32)
    (want,), (got,) = run(before, {"input": data}), run(after, {"input": data})
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.array_equal(got.argmax(1), want.argmax(1))
