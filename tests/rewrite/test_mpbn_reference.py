"""fold_mpbn_into_threshold on the MPBN neuron as yfguo91/MPBN writes it (tests/corpus/mpbn.py).

The reference's spike is ``spike_activation(bn(mem) / V_th)``: ``x > 0.5`` returned straight-through
a surrogate, ``(out_s.float() - out_bp).detach() + out_bp``. The fold takes the Div by V_th into
the threshold (any V_th, either sign), proves the straight-through sum equal to the spike and
drops it, and folds BN into ``[u > theta']``; the reset ``mem * (1 - spike)`` then reads the spike
itself. Spikes must be bit-identical to eager torch; BatchNorm3d after the per-step convs
(``myBatchNorm3d``, reshaped or stacked over time) folds into the convs (fold_affine_into_linear).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from normdeploy.core.passes import PassContext
from tests.corpus import mpbn as M
from tests.corpus.harness import WAYS, export, random_inputs, torch_outputs
from tests.graph_helpers import op_counts, run_step

from .test_fold_affine import G, run

PASS = "fold_mpbn_into_threshold"
TEMP = 3.0


def _fold(model):
    after, result = run_step(model, PASS, PassContext())
    assert result.matched == len(result.rewrites) + len(result.skipped), result
    return after, result


def _mpbn_spike(v_th: float, surrogate: str = "tanh", c: int = 4, seed: int = 0):
    """One step of MPBN's ``mem_update`` spike as the exporters write it: BN(u) / V_th -> Greater(0.5) -> Cast,
    straight-through ``(s - bp) + bp`` with MPBN's tanh surrogate, its ``ste`` clamp, or an unbounded one."""
    g = G(seed=seed)
    u = g.input([None, c, 3, 3], "u")
    rng = g.rng
    gamma = rng.uniform(0.5, 1.5, c) * np.where(rng.uniform(size=c) < 0.3, -1, 1)
    y = g("BatchNormalization", u, g.const(gamma), g.rand(c), g.rand(c), g.rand(c, low=0.3, high=2.0), epsilon=1e-5)
    d = g("Div", y, g.const(v_th))
    s = g("Cast", g("Greater", d, g.const(0.5)), to=1)
    if surrogate == "unbounded":
        bp = g("Mul", d, g.const(1.0))
    else:
        bp = g("Clip", d, g.const(0.0), g.const(1.0))
        if surrogate == "tanh":
            t = np.float32(np.tanh(TEMP * 0.5))
            bp = g("Div", g("Add", g("Tanh", g("Mul", g.const(TEMP), g("Sub", bp, g.const(0.5)))), g.const(t)),
                   g.const(2 * t))
    o = g("Add", g("Sub", s, bp), bp, out="spike")
    return g.model(o)


@pytest.mark.parametrize("v_th", [1.0, 0.7, 2.5, -0.5])
@pytest.mark.parametrize("surrogate", ["tanh", "ste"])
def test_div_by_the_threshold_and_the_straight_through_spike_fold(v_th, surrogate):
    before = _mpbn_spike(v_th, surrogate, seed=int(abs(v_th) * 10))
    after, result = _fold(before)
    (rw,) = result.rewrites
    assert "the Div by the threshold folded in" in rw.what and "straight-through" in rw.what, rw.what
    ops = op_counts(after)
    assert ops["BatchNormalization"] == ops["Div"] == ops["Tanh"] == ops["Clip"] == ops["Sub"] == 0, ops
    rng = np.random.default_rng(1)
    for scale in (0.5, 2.0, 8.0):
        u = (rng.standard_normal((64, 4, 3, 3)) * scale).astype(np.float32)
        want, got = run(before, {"u": u})[0], run(after, {"u": u})[0]
        assert want.dtype == got.dtype == np.float32
        assert np.array_equal(want, got), f"{int((want != got).sum())} spikes differ"
        assert 0.05 < want.mean() < 0.95  # the inputs do cross the threshold


def test_unbounded_surrogate_is_refused_with_the_reason():
    """``(s - d) + d`` with d unbounded is not s in floating point (``(1 - d) + d`` rounds): refused."""
    before = _mpbn_spike(1.0, "unbounded")
    after, result = _fold(before)
    (skip,) = result.skipped
    assert "not within [0.5, 2]" in skip.reason or "not bounded" in skip.reason, skip.reason
    assert after.SerializeToString() == before.SerializeToString()


# ----------------------------------------------------------------------------- the reference module, exported

VARIANTS = {
    "reshaped": {},                   # SpikePool conv, myBatchNorm3d, LIFAct(V_th = 1.0), tanh surrogate
    "stacked": {"stacked": True},     # SpikeConv: per-step convs, torch.stack (Concat) before myBatchNorm3d
    "v_th": {"v_th": 0.7},            # another V_th
    "ste": {"ste": True},             # spike_activation(ste=True): the clamp surrogate
}


@pytest.mark.slow
@pytest.mark.parametrize("way,opset", [(w, 20) for w in WAYS] + [("dynamo", 17), ("torchscript", 17)])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mpbn_spiking_block_folds_every_norm_with_identical_spikes(variant, way, opset, tmp_path):
    """3 time steps x 2 LIFAct = 6 membrane BNs folded into thresholds, 2 BatchNorm3d into their convs; the
    spikes of both layers are bit-identical to eager torch, the logits within 1e-5."""
    import normdeploy
    from tests.conftest import ort_run

    torch.manual_seed(0)
    m = M.randomize_(M.SpikingBlock(**VARIANTS[variant]), 2)
    args = (torch.randn(2, 3, 6, 6),)
    r = normdeploy.optimize(export(m, args, way, str(tmp_path), opset=opset), target="ort-cpu", bench=False)
    assert r.report["norm_nodes"] == {"before": {"BatchNorm": 8}, "after": {}}
    passes = {p["name"]: p for p in r.report["passes"]}
    mp = passes[PASS]
    assert len(mp["rewrites"]) == 6 and not mp["skipped"], mp["skipped"]
    assert all("the Div by the threshold folded in" in w["what"] and "straight-through" in w["what"]
               for w in mp["rewrites"]), mp["rewrites"]
    fa = passes["fold_affine_into_linear"]
    assert len(fa["rewrites"]) == 2 and all("into Conv" in w["what"] for w in fa["rewrites"]), fa
    if variant == "stacked":
        assert any("through Concat" in w["what"] for w in fa["rewrites"]), fa["rewrites"]
    ops = op_counts(ir_to_proto(r.optimized_model))
    assert ops["Tanh"] == ops["Clip"] == 0, ops
    for seed, batch in enumerate((None, 3)):
        feeds = random_inputs(args, seed, batch)
        ref, got = torch_outputs(m, feeds), ort_run(r.optimized_model, *feeds)
        logits_err = np.abs(ref[0] - got[0]).max() / np.abs(ref[0]).max()
        assert logits_err <= 1e-5, logits_err
        for i in (1, 2):
            assert np.array_equal(ref[i], got[i]), f"layer {i}: {int((ref[i] != got[i]).sum())} spikes differ"
            assert 0.05 < ref[i].mean() < 0.95


def ir_to_proto(model):
    import onnx_ir as ir

    return ir.to_proto(model)
