"""recognize_crmsnorm: CRMSNorm as ZixuanJiang/pre-rmsnorm-transformer writes it -> normdeploy::CRMSNorm;
the Pre-LN / Pre-RMSNorm / Pre-CRMSNorm GPT of that repository, recognized and exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from normdeploy.core import norms, ops
from tests.conftest import randomize
from tests.corpus import crmsnorm as corpus
from tests.corpus import harness
from tests.graph_helpers import GraphBuilder, apply, assert_same_outputs, attrs_of, initializer, op_counts

PASS = "recognize_crmsnorm"
CRMSNORM = f"{ops.DOMAIN}::CRMSNorm"
WIDTH = 7


def hand_crmsnorm(b: GraphBuilder, x: str, *, d: float = WIDTH + 1, gain=None, keepdims: int = 1,
                  inverse: str = "rsqrt") -> str:
    """``x * rsqrt((sum(x^2) + sum(x)^2) / d + eps)`` [* gain], with the axes as an input (opset >= 13)."""
    axes = b.const(np.array([-1], np.int64), np.int64)
    ss = b("ReduceSum", b("Mul", x, x), axes, keepdims=keepdims)
    s = b("ReduceSum", x, axes, keepdims=1)
    stat = b("Add", ss, b("Mul", s, s), out="stat")
    root = b("Sqrt", b("Add", b("Div", stat, b.const(float(d))), b.const(1e-6)))
    y_out = "y" if gain is None else None
    y = b("Mul", x, b("Reciprocal", root), out=y_out) if inverse == "rsqrt" else b("Div", x, root, out=y_out)
    if gain is not None:
        y = b("Mul", y, b.const(gain), out="y")
    return y


@pytest.mark.parametrize("inverse", ["rsqrt", "div"])
@pytest.mark.parametrize("opset", [17, 18, 23])
def test_hand_built_crmsnorm_becomes_canonical(opset, inverse):
    gain = np.linspace(-1.5, 1.5, WIDTH).astype(np.float32)
    b = GraphBuilder(opset)
    hand_crmsnorm(b, b.input("x", [2, 3, WIDTH]), gain=gain, inverse=inverse)
    model = b.model("y")
    after, result = apply(model, PASS)
    counts = op_counts(after)
    assert counts[CRMSNORM] == 1 and not {"ReduceSum", "Sqrt", "Reciprocal"} & set(counts), counts
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, []), result
    (node,) = [n for n in after.graph.node if n.domain == ops.DOMAIN]
    assert attrs_of(node)["epsilon"] == pytest.approx(1e-6)
    np.testing.assert_array_equal(initializer(after, node.input[1]), gain)
    assert "ReduceSum ReduceSum Mul Add Div Add Sqrt" in result.rewrites[0].spelling
    assert_same_outputs(model, after)


def test_divisor_that_is_not_width_plus_one_is_left_alone():
    """(sum x^2 + (sum x)^2) / w is not CRMSNorm's mean over the d = w + 1 coordinates."""
    b = GraphBuilder(18)
    hand_crmsnorm(b, b.input("x", [2, 3, WIDTH]), d=WIDTH)
    model = b.model("y")
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [] and len(result.skipped) == 1, result
    assert "not width + 1 = 8" in result.skipped[0].reason


def test_sum_of_squares_without_keepdims_is_left_alone():
    b = GraphBuilder(18)
    hand_crmsnorm(b, b.input("x", [2, 3, WIDTH]), keepdims=0)
    model = b.model("y")
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [] and len(result.skipped) == 1, result
    assert "keepdims=0" in result.skipped[0].reason


def test_statistic_read_elsewhere_is_left_alone():
    b = GraphBuilder(18)
    x = b.input("x", [2, 3, WIDTH])
    hand_crmsnorm(b, x)
    b("Identity", "stat", out="side")
    model = b.model("y", "side")
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [] and len(result.skipped) == 1, result
    assert "intermediate tensor stat" in result.skipped[0].reason


# ----------------------------------------------------------------------------- the corpus (issue 12)


def _module(factory, dtype=torch.float32):
    torch.manual_seed(0)
    return randomize(factory(), seed=7).to(dtype)


def _pass_report(result, name: str) -> dict:
    (p,) = [p for p in result.report["passes"] if p["name"] == name]
    return p


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 23])
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_crmsnorm_is_recognized_and_exact(way, opset, tmp_path):
    """customized_layer.py's CRMSNorm, each way: one CRMSNorm before, lowered to standard ops for ORT, exact."""
    module = _module(lambda: corpus.CRMSNorm(15, elementwise_affine=False))
    result = harness.check(module, (torch.randn(2, 5, 15),), way, tmp_path, before={"CRMSNorm": 1}, after={},
                           opset=opset)
    p = _pass_report(result, PASS)
    assert len(p["rewrites"]) == 1 and p["skipped"] == [] and "crms_norm" in p["rewrites"][0]["spelling"], p
    ops_after = {n.op_type for n in result.optimized_model.graph}
    assert {"ReduceSumSquare", "ReduceSum"} <= ops_after, ops_after


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
def test_corpus_crmsnorm_makes_the_trt_plugin(way, tmp_path):
    module = _module(lambda: corpus.CRMSNorm(15, elementwise_affine=False))
    result = harness.check(module, (torch.randn(2, 5, 15),), way, tmp_path, before={"CRMSNorm": 1},
                           after={"CRMSNorm": 1}, target="trt-fp16")
    plugins = [n.op_type for n in result.optimized_model.graph if n.domain == ops.DOMAIN]
    assert plugins == ["NormdeployCRMSNorm"], plugins


@pytest.mark.slow
@pytest.mark.parametrize("way", ["dynamo", "torchscript"])
def test_corpus_crmsnorm_float16_keeps_float32_statistics(way, tmp_path):
    """``crms_norm(x.float(), eps).type_as(x)`` on a half model: the canonical node reads Cast(x, float32)."""
    module = _module(lambda: corpus.CRMSNorm(15, elementwise_affine=False), torch.float16)
    result = harness.check(module, (torch.randn(2, 5, 15, dtype=torch.float16),), way, tmp_path,
                           before={"CRMSNorm": 1}, after={"CRMSNorm": 1}, target="trt-fp16")
    (node,) = [n for n in result.optimized_model.graph if n.op_type == "NormdeployCRMSNorm"]
    assert node.inputs[0].producer().op_type == "Cast", node.inputs[0].producer()


#: GPT method -> norms recognized (2 per layer + the final one, depth 2)
GPT_NORMS = {"pre-ln": {"LayerNorm": 5}, "pre-customized-ln": {"LayerNorm": 5}, "pre-rms": {"RMSNorm": 5},
             "pre-crms": {"CRMSNorm": 5}}
#: ... and after ``optimize --target ort-cpu``: Pre-LN becomes Pre-RMSNorm (preln_to_rmsnorm), CRMSNorm lowers to
#: standard ops. TorchScript's export of CustomizedLayerNorm keeps its no-op ``x.float()`` Cast ON the residual
#: stream (Add -> Cast(float -> float) -> Add); canonicalize's remove_noop_casts drops it (exact), so every export
#: way converts the same 5 LayerNorms.
GPT_AFTER = {"pre-ln": {"RMSNorm": 5}, "pre-customized-ln": {"RMSNorm": 5}, "pre-rms": {"RMSNorm": 5}, "pre-crms": {}}


@pytest.mark.slow
@pytest.mark.parametrize("way", harness.WAYS)
@pytest.mark.parametrize("method", list(GPT_NORMS))
def test_corpus_gpt_norms_are_recognized_and_exact(method, way, tmp_path):
    """torch/model.py's GPT with each norm: every norm recognized (counts before, nothing skipped), the
    canonicalized model exact against torch within 1e-5, and ``optimize`` passes its own accuracy check."""
    import normdeploy
    from normdeploy.core.passes import PassContext, run_steps
    from normdeploy.options import Options
    from normdeploy.pipeline import CANONICALIZE, prepare
    from tests.conftest import ort_run

    torch.manual_seed(0)  # torch's own init: the norms have no affine to randomize (elementwise_affine=False);
    module = corpus.GPT(method).eval()  # randomize()'s O(1) weights make float32 itself miss 1e-5 vs float64
    ids = torch.randint(0, 128, (2, 16))
    path = harness.export(module, (ids,), way, str(tmp_path), dynamic_batch=False)
    canonical = prepare(path, Options()).original
    results = run_steps(canonical, CANONICALIZE, PassContext())
    assert norms.count_by_kind(canonical) == GPT_NORMS[method]
    for r in results:
        if r is not None and r.name in ("recognize_layernorm", "recognize_rmsnorm", PASS):
            assert r.skipped == [], r
    for seed in range(2):
        feed = np.random.default_rng(seed).integers(0, 128, (2, 16)).astype(np.int64)
        ref = harness.torch_outputs(module, [feed])
        got = ort_run(canonical, feed)
        assert harness.max_rel_err(ref[0], got[0]) <= 1e-5
    result = normdeploy.optimize(path, target="ort-cpu", bench=False)  # the rewrite stage too (Pre-LN -> Pre-RMSNorm)
    after = GPT_AFTER[method]
    assert result.report["norm_nodes"] == {"before": GPT_NORMS[method], "after": after}, result.report["norm_nodes"]
    for seed in range(2):
        feed = np.random.default_rng(seed).integers(0, 128, (2, 16)).astype(np.int64)
        ref = harness.torch_outputs(module, [feed])
        got = ort_run(result.optimized_model, feed)
        assert harness.max_rel_err(ref[0], got[0]) <= 1e-5, result.report["norm_nodes"]
