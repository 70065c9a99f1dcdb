"""fold_mpbn_into_threshold: membrane-potential BatchNorm folded into the LIF firing threshold, spike for spike."""
from __future__ import annotations

import os
from decimal import Decimal, getcontext

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from normdeploy.core import norms as survey
from normdeploy.core import ops
from normdeploy.core.passes import PassContext
from tests.conftest import ROOT
from tests.graph_helpers import run_step

from .test_fold_affine import SETTINGS, G, as_proto, gammas, run

PASS = "fold_mpbn_into_threshold"
COMPARE = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal}
#: how each pattern spells the spike, and the relation it means between BN(u) and theta
PATTERNS = {
    "sub_greater": "gt",    # Sub(BN(u), theta) -> Greater(., 0): what torch exports for LIFNeuron
    "greater": "gt",        # Greater(BN(u), theta)
    "less_swapped": "gt",   # Less(theta, BN(u))
    "greater_equal": "ge",  # GreaterOrEqual(BN(u), theta)
    "sub_swapped": "gt",    # Sub(theta, BN(u)) -> Less(., 0)
    "less_equal": "le",     # LessOrEqual(BN(u), theta): a spike below the threshold
}


def fold(model: onnx.ModelProto):
    after, result = run_step(model, PASS, PassContext())
    assert result.matched == len(result.rewrites) + len(result.skipped), result
    return after, result


def spike(g: G, y: str, theta: str, pattern: str, out: str) -> str:
    zero = g.const(0.0)
    if pattern == "sub_greater":
        return g("Greater", g("Sub", y, theta), zero, out=out)
    if pattern == "greater":
        return g("Greater", y, theta, out=out)
    if pattern == "less_swapped":
        return g("Less", theta, y, out=out)
    if pattern == "greater_equal":
        return g("GreaterOrEqual", y, theta, out=out)
    if pattern == "sub_swapped":
        return g("Less", g("Sub", theta, y), zero, out=out)
    return g("LessOrEqual", y, theta, out=out)


def exact_spikes(u, gamma, beta, mean, var, eps, theta, rel) -> np.ndarray:
    """``[gamma (u - mean) / sqrt(var + eps) + beta  rel  theta]`` in exact arithmetic on the stored values.

    float64 decides wherever its margin is wide; the rest is evaluated with 80-digit decimals.
    """
    u, gamma, beta, mean, var, theta = (np.asarray(a, np.float64) for a in (u, gamma, beta, mean, var, theta))
    eps = float(np.float32(eps))
    y = gamma * (u - mean) / np.sqrt(var + eps) + beta
    y, theta_b = np.broadcast_arrays(y, theta)
    out = COMPARE[rel](y, theta_b)
    near = np.abs(y - theta_b) <= 1e-9 * (np.abs(y) + np.abs(theta_b) + 1e-300)
    if near.any():
        getcontext().prec = 80
        full = [np.broadcast_to(a, y.shape) for a in (u, gamma, beta, mean, var)]
        for i in zip(*np.nonzero(near)):
            uu, gg, bb, mm, vv = (Decimal(float(a[i])) for a in full)
            yd = gg * (uu - mm) / (vv + Decimal(eps)).sqrt() + bb
            td = Decimal(float(theta_b[i]))
            out[i] = {"gt": yd > td, "ge": yd >= td, "lt": yd < td, "le": yd <= td}[rel]
    return out


def spiking_step(rank: int, gamma: str, theta_kind: str, pattern: str, dtype, seed: int, readers: int = 1):
    """One LIF comparison: u [N, C, ...] -> BN -> threshold -> spike (bool); returns the model and its parameters."""
    c = 5
    shape = [None, c] + [3] * (rank - 2)
    g = G(dtype=dtype, seed=seed)
    u = g.input(shape, "u")
    params = dict(gamma=gammas(g.rng, c, gamma), beta=g.rng.uniform(-1, 1, c), mean=g.rng.uniform(-1, 1, c),
                  var=g.rng.uniform(0.1, 2.0, c))
    params = {k: v.astype(dtype) for k, v in params.items()}
    y = g("BatchNormalization", u, *(g.const(params[k]) for k in ("gamma", "beta", "mean", "var")), epsilon=1e-5)
    theta = {"scalar": np.asarray(1.0), "channel": g.rng.uniform(0.5, 1.5, (c,) + (1,) * (rank - 2)),
             "element": g.rng.uniform(0.5, 1.5, [c] + [3] * (rank - 2))}[theta_kind].astype(dtype)
    outs = [spike(g, y, g.const(theta), pattern, f"spike{i}") for i in range(readers)]
    model = g.model(*outs, types={o: np.bool_ for o in outs})
    chan = (c,) + (1,) * (rank - 2)
    params = {k: v.reshape(chan) for k, v in params.items()}
    return model, params, theta


def boundary_inputs(params, theta, eps, dtype, batch_shape) -> np.ndarray:
    """u within two ulps of the folded threshold theta' at every element (random where gamma = 0)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        t = p["mean"] + (theta.astype(np.float64) - p["beta"]) * np.sqrt(p["var"] + eps) / p["gamma"]
    t = np.where(np.isfinite(t), t, 0.0)
    base = np.broadcast_to(t, batch_shape[1:]).astype(dtype)
    rows = []
    for k in (-2, -1, 0, 1, 2):
        r = base.copy()
        for _ in range(abs(k)):
            r = np.nextafter(r, np.asarray(np.inf if k > 0 else -np.inf, dtype))
        rows.append(r)
    return np.stack(rows).astype(dtype)


@SETTINGS
@given(rank=st.sampled_from([2, 3, 4]), gamma=st.sampled_from(["positive", "negative", "mixed", "zero"]),
       theta_kind=st.sampled_from(["scalar", "channel", "element"]), pattern=st.sampled_from(sorted(PATTERNS)),
       dtype=st.sampled_from([np.float32, np.float16]), readers=st.integers(1, 2), seed=st.integers(0, 999))
def test_mpbn_folds_into_the_threshold(rank, gamma, theta_kind, pattern, dtype, readers, seed):
    before, params, theta = spiking_step(rank, gamma, theta_kind, pattern, dtype, seed, readers)
    after, result = fold(before)
    assert len(result.rewrites) == 1, result.skipped
    kinds = [n.op_type for n in after.graph.node]
    assert "BatchNormalization" not in kinds and "Sub" not in kinds
    mixed = not (np.all(params["gamma"] > 0) or np.all(params["gamma"] < 0))
    assert len(kinds) == readers + (1 if mixed else 0), kinds
    assert kinds.count("Mul") == (1 if mixed else 0)
    rel = PATTERNS[pattern]
    rng = np.random.default_rng(seed)
    shape = (6, 5) + (3,) * (rank - 2)
    for u in (rng.standard_normal(shape) * 2, boundary_inputs(params, theta, 1e-5, dtype, (5,) + shape[1:])):
        u = u.astype(dtype)
        want = exact_spikes(u, params["gamma"], params["beta"], params["mean"], params["var"], 1e-5, theta, rel)
        for got in run(after, {"u": u}):
            assert got.dtype == np.bool_ and got.shape == want.shape
            assert np.array_equal(got, want), f"{int((got != want).sum())} spikes differ from the exact MPBN"
    u = (rng.standard_normal(shape) * 2).astype(dtype)
    orig = run(before, {"u": u})[0]
    got = run(after, {"u": u})[0]
    # the unfolded graph rounds BN(u) in its dtype; it can only disagree where BN(u) is within rounding of theta
    p = {k: v.astype(np.float64) for k, v in params.items()}
    y = p["gamma"] * (u.astype(np.float64) - p["mean"]) / np.sqrt(p["var"] + 1e-5) + p["beta"]
    band = 8 * np.finfo(dtype).eps * (np.abs(y) + np.abs(theta.astype(np.float64)) + 1)
    assert np.all((orig == got) | (np.abs(y - theta) <= band))


def test_boundary_rounding_against_the_exact_formula_for_both_signs():
    """theta' is rounded down for '>' and up for '<': u = the stored threshold and its neighbours spike exactly."""
    g = G(seed=1)
    gamma = np.asarray([0.7, -0.7, 1e-3, -3.0], np.float32)
    beta, mean, var = (np.asarray(v, np.float32) for v in ([0.1, 0.1, 0.99, -2.0], [0.3, 0.3, 0.0, 1.0],
                                                              [1 / 3, 1 / 3, 0.5, 7.0]))
    y = g("BatchNormalization", g.input([None, 4], "u"), *(g.const(v) for v in (gamma, beta, mean, var)),
          epsilon=1e-5)
    before = g.model(spike(g, y, g.const(1.0), "sub_greater", "s"), types={"s": np.bool_})
    after, result = fold(before)
    assert result.rewrites
    u = boundary_inputs({"gamma": gamma, "beta": beta, "mean": mean, "var": var}, np.asarray(1.0), 1e-5,
                        np.float32, (5, 4))
    want = exact_spikes(u, gamma, beta, mean, var, 1e-5, 1.0, "gt")
    (got,) = run(after, {"u": u})
    assert np.array_equal(got, want)
    for col, rising in ((0, True), (1, False), (3, False)):  # the rows straddle theta': both spike values occur
        seq = want[:, col].tolist() if rising else want[::-1, col].tolist()
        assert seq == sorted(seq) and seq[0] is False and seq[-1] is True, (col, want[:, col])


def test_unified_norm_as_membrane_normalization():
    g = G(seed=2)
    y = g("UnifiedNorm", g.input([None, 3, 4], "u"), g.const([0.5, 1.0, 2.0]), g.const([1.0, -1.0, 0.0]),
          g.const([0.2, 0.0, 0.3]), domain=ops.DOMAIN, axis=1, epsilon=1e-5)
    before = g.model(spike(g, y, g.const(0.25), "greater", "s"), types={"s": np.bool_})
    after, result = fold(before)
    assert result.rewrites and "UnifiedNorm" not in [n.op_type for n in after.graph.node]
    u = np.random.default_rng(0).standard_normal((64, 3, 4)).astype(np.float32)
    assert np.array_equal(run(after, {"u": u})[0], run(before, {"u": u})[0])


# ----------------------------------------------------------------------------- refused, graph untouched

def _refused(make, reason: str) -> None:
    g = G(seed=3)
    before = make(g)
    after, result = fold(before)
    assert not result.rewrites
    assert after.SerializeToString() == before.SerializeToString()
    assert any(reason in s.reason for s in result.skipped), [s.reason for s in result.skipped]


def test_refusals():
    def second_reader(g):
        y = g.bn(g.input([None, 3], "u"), 3)
        return g.model(spike(g, y, g.const(1.0), "greater", "s"), g("Sub", y, g.input([1], "v"), out="d"),
                       types={"s": np.bool_})

    def nonzero_after_sub(g):
        y = g.bn(g.input([None, 3], "u"), 3)
        return g.model(g("Greater", g("Sub", y, g.const(1.0)), g.const(0.5), out="s"), types={"s": np.bool_})

    def variable_threshold(g):
        y = g.bn(g.input([None, 3], "u"), 3)
        return g.model(g("Greater", y, g.input([1], "theta"), out="s"), types={"s": np.bool_})

    def variable_gamma(g):
        y = g("BatchNormalization", g.input([None, 3], "u"), g.input([3], "gamma"), g.rand(3), g.rand(3),
              g.rand(3, low=0.5))
        return g.model(g("Greater", y, g.const(1.0), out="s"), types={"s": np.bool_})

    _refused(second_reader, "Sub Sub_")
    _refused(nonzero_after_sub, "non-zero")
    _refused(variable_threshold, "non-constant threshold")
    _refused(variable_gamma, "scale is not a constant")


# ----------------------------------------------------------------------------- the spiking model of the zoo

@pytest.fixture(scope="module")
def snn():
    from normdeploy.export import to_onnx
    from normdeploy.load import load

    model = as_proto(to_onnx(load(os.path.join(ROOT, "models", "snn_lif_mpbn.pt")))[0])
    for n in model.graph.node:  # every spike train becomes an output, so spikes are compared, not just logits
        if n.op_type == "Cast" and n.input[0] in {m.output[0] for m in model.graph.node if m.op_type == "Greater"}:
            model.graph.output.append(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    return model


@pytest.mark.slow
def test_spiking_cnn_optimizes_to_no_normalization_with_identical_spikes(snn):
    from normdeploy.pipeline import transform

    assert survey.count_by_kind(snn) == {"BatchNorm": 8}  # 2 LIF layers x T = 4 steps
    _t = transform(snn, PassContext())
    after, results = _t.optimized, _t.results
    assert survey.count_by_kind(after) == {}
    (mpbn,) = [r for r in results if r.name == PASS]
    assert len(mpbn.rewrites) == 8 and all("u > theta'" in r.what for r in mpbn.rewrites)
    digits = np.load(os.path.join(ROOT, "models", "digits_test.npz"))["input"].astype(np.float32)
    rng = np.random.default_rng(0)
    for x in (digits, rng.standard_normal((256, 1, 8, 8)).astype(np.float32),
              (rng.standard_normal((256, 1, 8, 8)) * 4).astype(np.float32)):
        want, got = run(snn, {"input": x}), run(after, {"input": x})
        assert len(want) == 9
        for w, o in zip(want, got):
            assert np.array_equal(w, o)  # spikes and logits bit for bit
        assert 0.05 < float(np.mean(want[1])) < 0.95  # the layers do spike
