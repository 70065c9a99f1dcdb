"""GroupNorm and EvoNorm: recognized and reported (recognize_groupnorm), GroupNormalization lowered for ONNX Runtime
(lower_groupnorm_to_instance_norm), their affines folded where linear layers read them (fold_affine_into_linear).

Corpus: tests/corpus/groupnorm.py (a diffusion UNet's ResnetBlock2D and attention block, timm's GroupNorm,
timm's EvoNorm2dB0 / EvoNorm2dS0 as timm/layers/evo_norm.py writes them), exported the three ways, at
opset 18 (InstanceNormalization spelling from both exporters) and 21 (dynamo: one GroupNormalization).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from normdeploy.core.norms import count_by_kind
from normdeploy.core.passes import PassContext
from tests.corpus import groupnorm as GN
from tests.corpus.harness import check
from tests.graph_helpers import op_counts, run_step
from tests.rewrite.test_fold_affine import G, run

LOWER = "lower_groupnorm_to_instance_norm"
RECOGNIZE = "recognize_groupnorm"


def _group_norm_node(opset: int, dtype=np.float32, c: int = 8, groups: int = 4, stash: int | None = None,
                     unit: bool = False):
    g = G(dtype=dtype, opset=opset, seed=opset)
    n = groups if opset < 21 else c
    scale = np.ones(n) if unit else g.rng.uniform(0.5, 1.5, n) * np.where(g.rng.uniform(size=n) < 0.3, -1, 1)
    bias = np.zeros(n) if unit else g.rng.uniform(-1, 1, n)
    attrs = {"num_groups": groups, "epsilon": 1e-5}
    if stash is not None:
        attrs["stash_type"] = stash
    y = g("GroupNormalization", g.input([None, c, 5, 5]), g.const(scale), g.const(bias), out="out", **attrs)
    return g.model(y)


def _feeds(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": (rng.standard_normal((3, 8, 5, 5)) * 2 + 0.5).astype(dtype)}


@pytest.mark.parametrize("opset", [18, 21])
@pytest.mark.parametrize("unit", [False, True])
def test_group_normalization_lowers_to_instance_norm_exactly(opset, unit):
    """GroupNormalization-18 (per-group scale) and -21 (per-channel): Reshape, InstanceNormalization, Reshape and
    the affine (left out when unit), equal to what ONNX Runtime computes for the op itself."""
    before = _group_norm_node(opset, unit=unit)
    after, result = run_step(before, LOWER, PassContext())
    assert result.matched == 1 and len(result.rewrites) == 1, result.skipped
    ops = op_counts(after)
    assert ops["GroupNormalization"] == 0 and ops["InstanceNormalization"] == 1 and ops["Reshape"] == 2
    assert ops["Mul"] == ops["Add"] == (0 if unit else 1), ops
    assert count_by_kind(before) == count_by_kind(after) == {"GroupNorm": 1}
    for seed in (0, 1):
        feeds = _feeds(np.float32, seed)
        want, got = run(before, feeds)[0], run(after, feeds)[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_float16_group_normalization_keeps_float32_statistics():
    """stash_type 1 (the default) with a float16 input: Cast to float32 around the InstanceNormalization."""
    before = _group_norm_node(21, np.float16)
    after, result = run_step(before, LOWER, PassContext())
    assert len(result.rewrites) == 1, result.skipped
    assert op_counts(after)["Cast"] == 2
    inorm = next(n for n in after.graph.node if n.op_type == "InstanceNormalization")
    inits = {i.name: i for i in after.graph.initializer}
    assert inits[inorm.input[1]].data_type == onnx.TensorProto.FLOAT
    feeds = _feeds(np.float16)
    want, got = run(before, feeds)[0], run(after, feeds)[0]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float64) - want).max() <= 4e-3 * np.abs(want.astype(np.float64)).max()


def test_other_stash_type_is_refused_with_the_reason():
    before = _group_norm_node(21, stash=11)
    after, result = run_step(before, LOWER, PassContext())
    (skip,) = result.skipped
    assert "stash_type 11" in skip.reason
    assert op_counts(after)["GroupNormalization"] == 1


def _instance_spelling(scale_value: float = 1.0):
    """torch's TorchScript spelling of F.group_norm on a hand-built graph (with a chosen InstanceNorm scale)."""
    g = G(opset=17, seed=2)
    x = g.input([2, 8, 4, 4])
    r = g("Reshape", x, g.const(np.array([0, 4, -1]), np.int64))
    i = g("InstanceNormalization", r, g.const(np.full(4, scale_value)), g.const(np.zeros(4)), epsilon=1e-5)
    y = g("Reshape", i, g("Shape", x))
    y = g("Add", g("Mul", y, g.rand(8, 1, 1)), g.rand(8, 1, 1), out="out")
    return g.model(y)


def test_instance_norm_spelling_is_reported_as_group_norm_and_kept():
    before = _instance_spelling()
    assert count_by_kind(before) == {"GroupNorm": 1}
    after, result = run_step(before, RECOGNIZE, PassContext())
    (skip,) = result.skipped
    assert skip.reason.startswith("GroupNorm (4 groups, eps 1e-05; torch F.group_norm spelled Reshape "
                                  "InstanceNormalization Reshape Mul Add) recognized: kept as exported"), skip.reason
    assert after.SerializeToString() == before.SerializeToString()
    _, lowered = run_step(before, LOWER, PassContext())
    assert not lowered.rewrites and "kept as Reshape InstanceNormalization Reshape Mul Add" in lowered.skipped[0].reason


def test_instance_norm_of_a_reshaped_tensor_with_a_scale_is_not_group_norm():
    _, result = run_step(_instance_spelling(2.0), RECOGNIZE, PassContext())
    (skip,) = result.skipped
    assert "non-unit scale" in skip.reason, skip.reason


# ----------------------------------------------------------------------------- the corpus, exported (slow)

#: (way, opset): the spellings that differ: dynamo at 21 writes GroupNormalization, else InstanceNormalization
EXPORTS = [("dynamo", 18), ("dynamo", 21), ("torchscript", 17), ("torchscript", 21), ("pt2", 20)]


def _passes(r):
    return {p["name"]: p for p in r.report["passes"]}


def _is_group_normalization(way, opset):
    return way == "dynamo" and opset >= 21


@pytest.mark.slow
@pytest.mark.parametrize("way,opset", EXPORTS)
def test_unet_resnet_block_group_norms_are_recognized_and_lowered(way, opset, tmp_path):
    """Two GroupNorms each read by a SiLU: recognized (or lowered from GroupNormalization), gain kept (SiLU is not
    linear: said), exact vs torch."""
    torch.manual_seed(0)
    m = GN.randomize_(GN.ResnetBlock())
    r = check(m, (torch.randn(2, 8, 6, 6),), way, tmp_path, before={"GroupNorm": 2}, after={"GroupNorm": 2},
              opset=opset)
    p = _passes(r)
    ops = op_counts(_proto(r.optimized_model))
    assert ops["InstanceNormalization"] == 2 and ops["GroupNormalization"] == 0, ops
    if _is_group_normalization(way, opset):
        assert len(p[LOWER]["rewrites"]) == 2 and not p[RECOGNIZE]["skipped"]
        reasons = [s["reason"] for s in p["fold_affine_into_linear"]["skipped"]]
        assert len(reasons) == 2 and all("Sigmoid" in s and "not linear" in s for s in reasons), reasons
    else:
        assert [s["reason"].split(";")[0] for s in p[RECOGNIZE]["skipped"]] == ["GroupNorm (4 groups, eps 1e-06"] * 2
        assert not p[LOWER]["rewrites"] and len(p[LOWER]["skipped"]) == 2
        assert all("not linear" in s["reason"] for s in p["fold_affine_into_linear"]["skipped"])


@pytest.mark.slow
@pytest.mark.parametrize("way,opset", EXPORTS)
def test_attention_block_group_norm_affine_folds_into_q_k_v(way, opset, tmp_path):
    torch.manual_seed(0)
    m = GN.randomize_(GN.AttnBlock())
    r = check(m, (torch.randn(2, 8, 4, 4),), way, tmp_path, before={"GroupNorm": 1}, after={"GroupNorm": 1},
              opset=opset)
    p = _passes(r)
    (rw,) = p["fold_affine_into_linear"]["rewrites"]
    assert rw["what"].count("Conv ") == 3 and "folded into Conv" in rw["what"], rw
    graph = r.optimized_model.graph
    (inorm,) = [n for n in graph if n.op_type == "InstanceNormalization"]
    (ungroup,) = [u for u, _ in inorm.outputs[0].uses()]
    assert sorted(u.op_type for u, _ in ungroup.outputs[0].uses()) == ["Conv"] * 3  # the GN affine is gone


@pytest.mark.slow
@pytest.mark.parametrize("way,opset", [("dynamo", 18), ("dynamo", 21), ("torchscript", 17), ("pt2", 20)])
@pytest.mark.parametrize("kind", ["S0", "B0"])
def test_evonorm_is_recognized_kept_and_its_affine_folds(kind, way, opset, tmp_path):
    """timm's EvoNorm2dS0 / B0 between two convs: reported with its kind and why it stays, its ``* w + b`` folded
    into the next conv (whose padding keeps the shift as an Add). (dynamo at opset 17 writes torch.var's
    ReduceMean with an attribute opset 17 lacks: the file fails the ONNX checker, so opset 18 is the lowest.)"""
    torch.manual_seed(0)
    m = GN.randomize_(GN.EvoNormConvBlock(kind))
    r = check(m, (torch.randn(2, 3, 6, 6),), way, tmp_path, before={}, opset=opset)
    p = _passes(r)
    (skip,) = p[RECOGNIZE]["skipped"]
    assert skip["reason"].startswith(f"EvoNorm-{kind} (timm evo_norm.py") and "kept as exported" in skip["reason"]
    if kind == "S0":
        assert ", 4 groups, eps 1e-05;" in skip["reason"], skip["reason"]
    folded = p["fold_affine_into_linear"]["rewrites"]
    assert len(folded) == 1 and folded[0]["spelling"] == "constant affine: Mul Add", folded
    assert "into Conv" in folded[0]["what"]


def _proto(model):
    import onnx_ir as ir

    return ir.to_proto(model)
