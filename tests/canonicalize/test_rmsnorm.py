"""recognize_rmsnorm: RMSNorm spellings (decomposed, and ONNX RMSNormalization) -> normdeploy::RMSNorm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normdeploy.core import ops
from tests.graph_helpers import (
    OPSETS,
    GraphBuilder,
    apply,
    assert_same_outputs,
    attrs_of,
    export_torch,
    initializer,
    op_counts,
)

PASS = "recognize_rmsnorm"
RMSNORM = f"{ops.DOMAIN}::RMSNorm"
DECOMPOSED = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div", "RMSNormalization"}


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: float32 statistics, torch.rsqrt, weight * x.to(input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DivSqrtRMSNorm(nn.Module):
    """x / sqrt(mean(x * x) + eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(dim)), eps

    def forward(self, x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


def _seeded(cls, *args, **kw):
    torch.manual_seed(0)
    return cls(*args, **kw)


def _check_canonical(model, after, result, eps, gain=None):
    """One RMSNorm node with the expected epsilon and gain; nothing of the decomposed form left."""
    counts = op_counts(after)
    assert counts[RMSNORM] == 1 and not DECOMPOSED & set(counts), counts
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, []), result
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    assert attrs_of(node)["epsilon"] == pytest.approx(eps)
    if gain is not None:
        np.testing.assert_array_equal(initializer(after, node.input[1]), gain)
    assert [f.name for f in after.functions] == ["RMSNorm"]  # the body travels with the model
    assert_same_outputs(model, after)
    return counts


# ----------------------------------------------------------------------------- what torch emits


@pytest.mark.slow
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("opset", OPSETS)
def test_nn_rmsnorm(opset, optimize):
    module = _seeded(nn.RMSNorm, 8, eps=1e-6)
    with torch.no_grad():
        module.weight.normal_()
    model = export_torch(module, torch.randn(2, 3, 8), opset, optimize, key="nn.RMSNorm")
    before = op_counts(model)
    if opset >= 23:
        assert before == {"RMSNormalization": 1}
    else:  # Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul: ONNX Runtime fuses none of it
        assert {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul"} <= set(before) and "Div" not in before
    after, result = apply(model, PASS)
    counts = _check_canonical(model, after, result, 1e-6, module.weight.detach().numpy())
    # the exporter's trailing CastLike(y, x) (a no-op for float32) is outside the norm and stays
    assert set(counts) <= {RMSNORM, "CastLike"}


@pytest.mark.slow
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("opset", OPSETS)
def test_llama_rmsnorm_float32(opset, optimize):
    module = _seeded(LlamaRMSNorm, 8)
    model = export_torch(module, torch.randn(2, 3, 8), opset, optimize, key="LlamaRMSNorm")
    before = op_counts(model)
    if opset >= 23 and optimize:  # onnxscript's optimizer fuses it into the opset-23 op
        assert before == {"RMSNormalization": 1}
    else:  # torch.rsqrt exports as Sqrt + Reciprocal; the float32 -> float32 casts vanish
        assert {"Pow", "Sqrt", "Reciprocal"} <= set(before) and "Cast" not in before
    after, result = apply(model, PASS)
    assert op_counts(after) == {RMSNORM: 1}
    _check_canonical(model, after, result, 1e-6, module.weight.detach().numpy())


@pytest.mark.slow
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("opset", OPSETS)
def test_div_sqrt_rmsnorm(opset, optimize):
    module = _seeded(DivSqrtRMSNorm, 8, eps=1e-5)
    model = export_torch(module, torch.randn(2, 3, 8), opset, optimize, key="DivSqrtRMSNorm")
    assert {"Mul", "ReduceMean", "Sqrt", "Div"} <= set(op_counts(model))
    after, result = apply(model, PASS)
    assert op_counts(after) == {RMSNORM: 1}
    _check_canonical(model, after, result, 1e-5, module.weight.detach().numpy())


@pytest.mark.slow
@pytest.mark.parametrize("opset", [20, 23])
def test_llama_rmsnorm_float16_keeps_float32_statistics(opset):
    module = _seeded(LlamaRMSNorm, 8).half()
    model = export_torch(module, torch.randn(2, 3, 8, dtype=torch.float16), opset, optimize=True)
    if opset >= 23:  # onnxscript's optimizer fuses the float16 spelling into RMSNormalization(stash_type=1)
        assert op_counts(model) == {"RMSNormalization": 1}
    else:
        assert {"Cast", "Pow", "Sqrt", "Reciprocal"} <= set(op_counts(model))
    after, result = apply(model, PASS)
    assert len(result.rewrites) == 1 and result.skipped == []
    # Cast(x, float32) -> RMSNorm(G = ones, float32) -> Cast(float16) -> Mul(weight): the gain stays outside
    assert op_counts(after) == {"Cast": 2, RMSNORM: 1, "Mul": 1}
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    np.testing.assert_array_equal(initializer(after, node.input[1]), np.ones(8, np.float32))
    assert_same_outputs(model, after, rtol=1e-3, atol=1e-3)  # float16 outputs


@pytest.mark.slow
def test_torchscript_export_div_one_and_noop_casts():
    """TorchScript at opset 17: axes attribute, rsqrt as Div(1, Sqrt), Cast(float32) on float32 tensors."""
    module = _seeded(LlamaRMSNorm, 8)
    model = export_torch(module, torch.randn(2, 3, 8), 17, dynamo=False)
    before = op_counts(model)
    assert before["Cast"] == 2 and before["Div"] == 1 and "Reciprocal" not in before
    after, result = apply(model, PASS)
    # the leading no-op Cast stays (it is outside the norm); the one before the gain is looked through
    assert op_counts(after) == {"Cast": 1, RMSNORM: 1}
    _check_canonical(model, after, result, 1e-6, module.weight.detach().numpy())


# ----------------------------------------------------------------------------- hand-built spellings


def hand_rmsnorm(b: GraphBuilder, x: str, *, square: str = "pow", inverse: str = "pow_half", axes=(-1,), eps=1e-6,
                 gain_before=None, gain_after=None, out: str = "y") -> dict[str, str]:
    t = {}
    if gain_before is not None:
        num = b("Mul", b.const(gain_before), x)
    else:
        num = x
    sq = b("Pow", x, b.const(2.0)) if square == "pow" else b("Mul", x, x)
    t["ms"] = b.reduce_mean(sq, axes, out="ms")
    t["s"] = b("Add", eps if isinstance(eps, str) else b.const(eps), t["ms"], out="s")
    y_out = out if gain_after is None else None
    if inverse == "pow_half":
        y = b("Mul", b("Pow", t["s"], b.const(-0.5)), num, out=y_out)
    elif inverse == "reciprocal":
        y = b("Mul", num, b("Reciprocal", b("Sqrt", t["s"])), out=y_out)
    else:
        y = b("Div", num, b("Sqrt", t["s"]), out=y_out)
    if gain_after is not None:
        y = b("Mul", y, b.const(gain_after), out=out)
    t["y"] = y
    return t


@pytest.mark.parametrize("opset", [17, 18, 23])
@pytest.mark.parametrize("inverse", ["pow_half", "reciprocal", "div"])
def test_hand_built_spellings(inverse, opset):
    g = np.linspace(-2, 2, 8).astype(np.float32)
    b = GraphBuilder(opset)
    hand_rmsnorm(b, b.input("x", [2, 3, 8]), inverse=inverse, square="mul", eps=1e-4, gain_after=g)
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {RMSNORM: 1}
    _check_canonical(model, after, result, 1e-4, g)


def test_gain_before_the_product():
    g = np.linspace(0.5, 1.5, 8).astype(np.float32)
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [4, 8]), inverse="div", gain_before=g)
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-6, g)


def test_gains_before_and_after_multiply_once():
    g1 = np.linspace(0.5, 1.5, 8).astype(np.float32)
    g2 = np.float32(3.0)  # a scalar gain broadcasts over the last axis
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [4, 8]), inverse="reciprocal", gain_before=g1, gain_after=g2)
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-6, (g1.astype(np.float64) * 3.0).astype(np.float32))


def test_no_gain_gives_unit_gain():
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", ["batch", 8]))
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-6, np.ones(8, np.float32))


def test_layernorm_is_left_to_recognize_layernorm():
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    d = b("Sub", x, b.reduce_mean(x, (-1,)), out="d")
    hand_rmsnorm(b, d, inverse="div")  # RMSNorm of x - mean(x) is a LayerNorm
    model = b.model("y")
    after, result = apply(model, PASS)
    assert after is model and (result.matched, result.rewrites, result.skipped) == (0, [], [])
    after, result = apply(model, "recognize_layernorm")
    assert op_counts(after) == {"LayerNormalization": 1}


def test_rms_normalization_scalar_scale():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 3, 8]), b.const(np.float32(0.5)), out="y", epsilon=1e-3)
    model = b.model("y")
    after, result = apply(model, PASS)
    _check_canonical(model, after, result, 1e-3, np.full(8, 0.5, np.float32))


def test_rms_normalization_runtime_scale_is_passed_through():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 3, 8]), b.input("g", [8]), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    assert list(node.input) == ["x", "g"] and attrs_of(node)["epsilon"] == pytest.approx(1e-5)  # the ONNX default
    assert_same_outputs(model, after)


# ----------------------------------------------------------------------------- refusals


def _assert_untouched(model, reason_part: str):
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [], result
    assert len(result.skipped) == 1 and reason_part in result.skipped[0].reason, result.skipped


def test_epsilon_not_constant():
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [2, 8]), eps=b.input("eps", []))
    _assert_untouched(b.model("y"), "epsilon is not a constant")


@pytest.mark.parametrize("axes", [(1,), (-2, -1)])
def test_reduction_not_over_the_last_axis_only(axes):
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [2, 3, 8]), axes=axes)
    _assert_untouched(b.model("y"), "not the last axis only")


@pytest.mark.parametrize("shared", ["ms", "s"])
def test_intermediate_with_another_consumer(shared):
    b = GraphBuilder(18)
    t = hand_rmsnorm(b, b.input("x", [2, 8]), inverse="reciprocal")
    b("Neg", t[shared], out="other")
    _assert_untouched(b.model("y", "other"), f"intermediate tensor {shared} has another consumer (Neg n_other)")


def test_dynamic_last_dimension_without_gain():
    b = GraphBuilder(18)
    hand_rmsnorm(b, b.input("x", [2, "width"]))
    _assert_untouched(b.model("y"), "last dimension of x is not static")


def test_gain_that_is_not_per_channel_stays_outside():
    b = GraphBuilder(18)
    t = hand_rmsnorm(b, b.input("x", [2, 3, 8]), inverse="div", out="core")
    b("Mul", t["y"], b.const(np.arange(3, dtype=np.float32).reshape(3, 1)), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {RMSNORM: 1, "Mul": 1} and result.skipped == []
    assert_same_outputs(model, after)


def test_incomplete_spelling_is_reported():
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    ms = b.reduce_mean(b("Mul", x, x), (-1,))
    b("Div", x, b("Add", ms, b.const(1e-6)), out="y")  # no Sqrt
    _assert_untouched(b.model("y"), "mean of squares is not followed by a recognized RMSNorm spelling")


def test_rms_normalization_over_two_axes():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 3, 8]), b.const(np.ones((3, 8))), out="y", axis=-2)
    _assert_untouched(b.model("y"), "RMSNormalization over axis -2")


def test_rms_normalization_float16_keeps_the_stash_type_semantics():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 8], np.float16), b.const(np.linspace(-1, 1, 8), np.float16), out="y")
    model = b.model("y", dtype=np.float16)
    after, result = apply(model, PASS)
    assert op_counts(after) == {"Cast": 2, RMSNORM: 1, "Mul": 1} and len(result.rewrites) == 1
    assert_same_outputs(model, after, rtol=1e-3, atol=1e-3)  # float16 outputs


def test_rms_normalization_stash_type_not_float32():
    b = GraphBuilder(23)
    b("RMSNormalization", b.input("x", [2, 8]), b.const(np.ones(8)), out="y", stash_type=0)
    _assert_untouched(b.model("y"), "stash_type 0 is not float32")
