"""recognize_unified_norm: ``w x / sqrt(r + eps) + b`` (UN's eval path, PowerNorm's affine) -> normdeploy::UnifiedNorm."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from normdeploy import nn
from normdeploy.core import ops
from tests.conftest import randomize
from tests.corpus import harness
from tests.corpus import unified_norm as corpus
from tests.graph_helpers import GraphBuilder, apply, assert_same_outputs, attrs_of, initializer, node_of, op_counts

PASS = "recognize_unified_norm"
UN = f"{ops.DOMAIN}::UnifiedNorm"
C = 6


def _params(seed: int = 0):
    rng = np.random.default_rng(seed)
    r = rng.uniform(0.2, 2.0, C).astype(np.float32)
    w = (rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)).astype(np.float32)
    return r, w, rng.normal(size=C).astype(np.float32)


def _hand_un(b: GraphBuilder, x: str, r, w, bias, eps=1e-5, folded: bool = False) -> str:
    """UN1d's eval arithmetic on ``[B, C, N, 1]``: ``x / sqrt(r + eps)``, ``w * .``, ``. + b`` (``[1, C, 1, 1]``)."""
    shape = (1, -1, 1, 1)
    if folded:  # the exporter folded sqrt(r + eps) into one constant
        div = b("Div", x, b.const(np.sqrt(r.astype(np.float64) + eps).astype(np.float32).reshape(shape)), out="d")
    else:
        root = b("Sqrt", b("Add", b.const(r.reshape(shape)), b.const(np.float32(eps))))
        div = b("Div", x, root, out="d")
    return b("Add", b("Mul", b.const(w.reshape(shape)), div), b.const(bias.reshape(shape)), out="y")


def _assert_one_un(model, spelling: str, axis: int, r, w, bias, eps: float = 1e-5):
    """``model`` becomes one UnifiedNorm with these parameters (rewritten with ``spelling``), outputs unchanged."""
    after, result = apply(model, PASS)
    assert op_counts(after) == {UN: 1}
    assert (result.matched, len(result.rewrites), result.skipped) == (1, 1, []), result
    assert result.rewrites[0].spelling == f"running-statistic affine (UN / PowerNorm eval): {spelling}"
    c = _canonical(after)
    assert c["axis"] == axis and c["epsilon"] == pytest.approx(eps)
    for k, v in (("r", r), ("w", w), ("b", bias)):
        np.testing.assert_array_equal(c[k], v)
    assert_same_outputs(model, after)


def _canonical(after) -> dict:
    node = node_of(after, "UnifiedNorm")
    assert node.domain == ops.DOMAIN
    a = attrs_of(node)
    return {"axis": a["axis"], "epsilon": a["epsilon"],
            **{k: initializer(after, node.input[i]) for i, k in ((1, "r"), (2, "w"), (3, "b"))}}


# ----------------------------------------------------------------------------- hand-built spellings (fast)


def test_root_of_statistic_plus_eps():
    r, w, bias = _params()
    b = GraphBuilder(18)
    _hand_un(b, b.input("x", ["batch", C, 5, 1]), r, w, bias)
    _assert_one_un(b.model("y"), "Add Sqrt Div Mul Add", 1, r, w, bias)


def test_divisor_folded_by_the_exporter():
    """Only s = sqrt(r + eps) is left: R = s^2, epsilon 0."""
    r, w, bias = _params(1)
    b = GraphBuilder(18)
    _hand_un(b, b.input("x", [2, C, 5, 1]), r, w, bias, folded=True)
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {UN: 1} and result.skipped == []
    assert result.rewrites[0].spelling == "running-statistic affine (UN / PowerNorm eval): Div Mul Add"
    c = _canonical(after)
    assert c["epsilon"] == 0.0
    np.testing.assert_allclose(c["r"], r + 1e-5, rtol=1e-6)
    assert_same_outputs(model, after)


def _assert_untouched(model, reason_part: str | None):
    after, result = apply(model, PASS)
    assert after is model and result.rewrites == [], result
    if reason_part is None:
        assert (result.matched, result.skipped) == (0, []), result
    else:
        assert len(result.skipped) == 1 and reason_part in result.skipped[0].reason, result.skipped
        assert result.skipped[0].node == "n_d"  # the reason names the division


def test_non_positive_statistic():
    r, w, bias = _params()
    r[2] = -1.0
    b = GraphBuilder(18)
    _hand_un(b, b.input("x", [2, C, 5, 1]), r, w, bias)
    _assert_untouched(b.model("y"), "running statistic + eps is not positive")


def test_weight_not_a_constant():
    r, _, bias = _params()
    b = GraphBuilder(18)
    x = b.input("x", [2, C, 5, 1])
    root = b("Sqrt", b("Add", b.const(r.reshape(1, -1, 1, 1)), b.const(np.float32(1e-5))))
    d = b("Div", x, root, out="d")
    b("Add", b("Mul", b.input("w", [1, C, 1, 1]), d), b.const(bias.reshape(1, -1, 1, 1)), out="y")
    _assert_untouched(b.model("y"), "the weight after it is not a constant")


def test_parameters_on_different_axes():
    r, w, bias = _params()
    b = GraphBuilder(18)
    x = b.input("x", [2, C, 5, C])
    root = b("Sqrt", b("Add", b.const(r.reshape(1, -1, 1, 1)), b.const(np.float32(1e-5))))
    d = b("Div", x, root, out="d")
    b("Add", b("Mul", b.const(w), d), b.const(bias), out="y")  # w, b on the last axis, r on axis 1
    _assert_untouched(b.model("y"), "is not along the axis of the other parameters")


def test_statistic_without_affine_is_reported():
    r, _, _ = _params()
    b = GraphBuilder(18)
    x = b.input("x", [2, C, 5, 1])
    b("Div", x, b("Sqrt", b("Add", b.const(r.reshape(1, -1, 1, 1)), b.const(np.float32(1e-5)))), out="d")
    _assert_untouched(b.model("d"), "is not followed by a constant weight Mul and bias Add")


def test_decomposed_batchnorm_is_not_a_candidate():
    """``(x - mean) / sqrt(var + eps) * g + b`` is a BatchNorm: the affine folds take it, not this pass."""
    r, w, bias = _params()
    b = GraphBuilder(18)
    x = b.input("x", [2, C, 5, 1])
    _hand_un(b, b("Sub", x, b.const(np.linspace(-1, 1, C).astype(np.float32).reshape(1, -1, 1, 1))), r, w, bias)
    _assert_untouched(b.model("y"), None)


@pytest.mark.parametrize("scale_first", [False, True])
def test_input_shifted_by_a_position_embedding_is_an_input(scale_first):
    """The first block of a ViT normalizes ``tokens + pos_embed`` (a constant per token and channel, not per
    channel): a UnifiedNorm of that sum, in either spelling (the zoo's vit_un from a .pt2 missed its first one)."""
    r, w, bias = _params(5)
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, C])
    pos = np.random.default_rng(6).normal(size=(1, 4, C)).astype(np.float32)
    shifted = b("Add", x, b.const(pos))
    if scale_first:
        _hand_scale_first(b, shifted, r, w, bias, view=None)
    else:
        d = b("Div", shifted, b("Sqrt", b("Add", b.const(r), b.const(np.float32(1e-5)))), out="d")
        b("Add", b("Mul", b.const(w), d), b.const(bias), out="y")
    model = b.model("y")
    after, result = apply(model, PASS)
    assert op_counts(after) == {"Add": 1, UN: 1} and result.skipped == [], result
    assert_same_outputs(model, after)


def test_division_by_a_run_time_statistic_is_not_a_candidate():
    """``x / sqrt(mean(x^2) + eps) * w + b`` divides by a statistic of x: an RMSNorm's business, not UN's."""
    _, w, bias = _params()
    b = GraphBuilder(18)
    x = b.input("x", [2, 5, C])
    ms = b.reduce_mean(b("Mul", x, x), [-1])
    d = b("Div", x, b("Sqrt", b("Add", ms, b.const(np.float32(1e-5)))), out="d")
    b("Add", b("Mul", b.const(w), d), b.const(bias), out="y")
    _assert_untouched(b.model("y"), None)


def _hand_scale_first(b: GraphBuilder, x: str, r, w, bias, eps=1e-5, view=(-1, 1, 1), bias_reads_scale=False) -> str:
    """normdeploy.nn.UnifiedNorm's eval as ``torch.export`` traces it: ``x * view(w / sqrt(r + eps)) + view(b)``
    (normdeploy/nn.py ``_bcast``: ``v.reshape(-1, 1, 1)`` for channel axis 1 of a 4-D input)."""
    scale = b("Div", b.const(w), b("Sqrt", b("Add", b.const(r), b.const(np.float32(eps)))), out="d")
    if view is not None:
        scale = b("Reshape", scale, b.const(np.array(view, np.int64), dtype=np.int64))
    shift = b.const(bias.reshape(view) if view is not None else bias)
    if bias_reads_scale:  # a hand-written BatchNorm: b - mean * scale, the scale read twice
        shift = b("Sub", shift, b("Mul", b.const(np.full(len(r), 0.5, np.float32).reshape(view or (-1,))), scale))
    return b("Add", b("Mul", x, scale), shift, out="y")


@pytest.mark.parametrize("shape, view, axis", [([2, C, 5, 4], (-1, 1, 1), 1), ([2, 5, C], None, 2)])
def test_scale_computed_first(shape, view, axis):
    """``x * (w / sqrt(r + eps)) + b``, the scale viewed along channel axis 1 or not at all (channels last)."""
    r, w, bias = _params(2)
    b = GraphBuilder(18)
    _hand_scale_first(b, b.input("x", shape), r, w, bias, view=view)
    _assert_one_un(b.model("y"), "Add Sqrt Div Mul Add" if view is None else "Add Sqrt Div Reshape Mul Add", axis,
                   r, w, bias)


def test_scale_computed_first_read_twice_is_left_to_the_affine_folds():
    """A hand-written BatchNorm that computes its shift from the same scale: not a UnifiedNorm, said so."""
    r, w, bias = _params(3)
    b = GraphBuilder(18)
    _hand_scale_first(b, b.input("x", [2, C, 5, 4]), r, w, bias, bias_reads_scale=True)
    _assert_untouched(b.model("y"), "has another consumer")


def test_export_folder_keeps_the_running_statistic_of_a_scale_and_folds_the_rest():
    """normdeploy.export.finalize: ``r + eps`` under ``w / sqrt(.)`` stays; ``x / sqrt(r + eps)`` folds to one constant."""
    import onnx_ir as ir

    from normdeploy.export import finalize

    r, w, bias = _params(4)
    for scale_first, want in ((True, {"Add": 2, "Sqrt": 1, "Div": 1, "Reshape": 1, "Mul": 1}),
                              (False, {"Div": 1, "Mul": 1, "Add": 1})):
        b = GraphBuilder(18)
        x = b.input("x", [2, C, 5, 1])
        (_hand_scale_first if scale_first else _hand_un)(b, x, r, w, bias)
        model = finalize(ir.from_proto(b.model("y")))
        assert collections.Counter(n.op_type for n in model.graph) == want, scale_first


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 18, 23])
@pytest.mark.parametrize("factory, kind", [(lambda: nn.UnifiedNorm(16, axis=-1), "UnifiedNorm"),
                                           (lambda: nn.PowerNorm(16, groups=2), "PowerNorm")])
def test_pt2_of_normdeploys_own_module_names_it(factory, kind, opset, tmp_path):
    """A ``.pt2`` of normdeploy.nn.UnifiedNorm / PowerNorm (torch.export traces the eval arithmetic, the scale
    first): counted as its kind before, gone after on ort-cpu, exact vs torch."""
    harness.check(_module(factory), (torch.randn(2, 5, 16),), "pt2", tmp_path, before={kind: 1}, opset=opset)


# ----------------------------------------------------------------------------- the corpus (issue 12)


EXPORTS = harness.EXPORTS


def _module(factory):
    torch.manual_seed(0)
    return randomize(factory(), seed=11)


def _pass(result, name: str = PASS) -> dict:
    (p,) = [p for p in result.report["passes"] if p["name"] == name]
    return p


#: what each export leaves of the divisor: the root of r + eps, or a constant (the dynamo exporter's files are
#: constant-folded by normdeploy's export stage from opset 18 on: normdeploy.export.finalize)
SPELLING = {(w, o): "Div Mul Add" if w in ("dynamo", "pt2") and o >= 18 else "Add Sqrt Div Mul Add" for w, o in EXPORTS}


@pytest.mark.slow
@pytest.mark.parametrize("way, opset", EXPORTS)
def test_corpus_un1d(way, opset, tmp_path):
    """UN1d's eval path, each way: one UnifiedNorm before, none after (ort-cpu: Mul, Add), exact vs torch."""
    result = harness.check(_module(lambda: corpus.UN1d(16)), (torch.randn(2, 5, 16),), way, tmp_path,
                           before={"UnifiedNorm": 1}, opset=opset)
    p = _pass(result)
    assert [w["spelling"] for w in p["rewrites"]] == \
        [f"running-statistic affine (UN / PowerNorm eval): {SPELLING[way, opset]}"] and p["skipped"] == [], p


@pytest.mark.slow
@pytest.mark.parametrize("way, opset", EXPORTS)
def test_corpus_un_folds_into_the_next_linear_layer(way, opset, tmp_path):
    """A pre-norm MLP with UN1d: the whole UN (a per-channel affine) folds into fc1 through the layout ops."""
    result = harness.check(_module(corpus.UNMlp), (torch.randn(2, 5, 16),), way, tmp_path,
                           before={"UnifiedNorm": 1}, opset=opset)
    assert len(_pass(result)["rewrites"]) == 1
    fold = _pass(result, "fold_affine_into_linear")
    assert len(fold["rewrites"]) == 1, fold
    lowered = [p for p in result.report["passes"] if p["name"] == "lower_canonical_to_standard_ops" and p["rewrites"]]
    assert lowered == [], lowered  # nothing of the UnifiedNorm was left for lowering to write out


@pytest.mark.slow
def test_corpus_un1d_float16(tmp_path):
    """A float16 UN1d (fairseq's --fp16 runs the model in half): recognized; float16 tolerance (2 ulp)."""
    harness.check(_module(lambda: corpus.UN1d(16)).half(), (torch.randn(2, 5, 16).half(),), "dynamo", tmp_path,
                  before={"UnifiedNorm": 1}, tol=2e-3, tolerance=1e-2)
