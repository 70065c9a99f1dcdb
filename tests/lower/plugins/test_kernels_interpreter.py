"""The plugin kernels under the Triton interpreter (CPU tensors) against normdeploy.nn's reference modules.

The reference is the module evaluated in float64 on the (already rounded) kernel input;
tolerances are relative to each element plus a floor relative to the largest output:
fp32 1e-5, fp16 2e-3 (about 2 ulp), bf16 1.6e-2 (about 2 ulp).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from normdeploy import nn as N
from normdeploy.lower.plugins import kernels as K
from tests.conftest import ROOT

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
WIDTHS = [1, 7, 33, 256, 1000]
GROUPS = {1: 1, 7: 7, 33: 3, 48: 4, 256: 4, 1000: 8}  # long rows: one group


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """|got - ref| <= tol * (|ref| + 0.01 max|ref|), NaN exactly where the reference has NaN."""
    assert got.dtype == dtype, f"{what}: output dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    g, r = got.double(), ref.double()
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(g), nan), f"{what}: NaN pattern differs from the reference"
    g, r = g[~nan], r[~nan]
    if r.numel() == 0:
        return
    tol = TOL[dtype]
    bound = tol * (r.abs() + 0.01 * r.abs().max())
    err = (g - r).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (f"{what}: |got - ref| = {err[worst]:.3g} > {bound[worst]:.3g} "
                                        f"(got {g[worst]:.8g}, ref {r[worst]:.8g}, tol {tol})")


def _params(c: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=gen), torch.randn(c, generator=gen)


def run_case(kind: str, x: torch.Tensor, seed: int = 0, **launch) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, float64 reference) of ``kind`` on ``x``."""
    c = x.shape[-1]
    dtype = x.dtype
    w, b = _params(c, seed)
    w, b = w.to(dtype), b.to(dtype)  # the kernel reads parameters in the model's dtype
    x64 = x.double()
    with torch.no_grad():
        if kind == "rmsnorm":
            m = N.RMSNorm(c, eps=1e-6).double()
            m.weight.copy_(w.double())
            return K.rms_norm(x, w, 1e-6, **launch), m(x64)
        if kind == "crmsnorm":
            m = N.CRMSNorm(c, eps=1e-6).double()
            m.weight.copy_(w.double())
            return K.crms_norm(x, w, 1e-6, **launch), m(x64)
        if kind == "group_scaling":
            g = GROUPS.get(c, 1)
            return K.group_scaling(x, g, 1e-5, **launch), N.GroupScaling(g, eps=1e-5).double()(x64)
        if kind == "scalenorm":
            m = N.ScaleNorm(c, eps=1e-5).double()
            scale = float(np.float32(m.scale.item()))
            m.scale.fill_(scale)
            return K.scale_norm(x, scale, 1e-5, **launch), m(x64)
        if kind == "dyt":
            m = N.DynamicTanh(c, alpha_init=0.5).double()
            m.weight.copy_(w.double())
            m.bias.copy_(b.double())
            return K.dynamic_tanh(x, 0.5, w, b, **launch), m(x64)
    raise ValueError(kind)


KINDS = ["rmsnorm", "crmsnorm", "group_scaling", "scalenorm", "dyt"]
ROW_KINDS = ["rmsnorm", "crmsnorm", "group_scaling", "scalenorm"]


def _randn(shape, dtype, seed=1, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("c", WIDTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_module(kind, c, dtype):
    x = _randn((3, 5, c), dtype, seed=c)
    got, ref = run_case(kind, x)
    assert_close(got, ref, dtype, f"{kind} C={c}")


@pytest.mark.parametrize("kind", KINDS)
def test_one_row_and_one_dimensional_input(kind):
    for shape in [(1, 37), (37,)]:
        x = _randn(shape, torch.float32, seed=3)
        got, ref = run_case(kind, x)
        assert_close(got, ref, torch.float32, f"{kind} {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("c", [16385, 20001])
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_very_long_rows_take_the_block_loop(kind, c, dtype):
    assert not K.row_config(c).one_block
    x = _randn((2, c), dtype, seed=c)
    got, ref = run_case(kind, x)
    assert_close(got, ref, dtype, f"{kind} C={c}")


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_widest_one_pass_row(kind):
    assert K.row_config(16384).one_block  # the widest rows real models use stay in registers: x read once
    x = _randn((2, 16384), torch.bfloat16, seed=16)
    got, ref = run_case(kind, x)
    assert_close(got, ref, torch.bfloat16, f"{kind} C=16384")


def _misaligned(x: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """``x`` copied into a buffer at an offset of ``elements``: its data pointer is not 16-byte aligned."""
    buf = torch.empty(x.numel() + elements, dtype=x.dtype)
    out = buf[elements:].view(x.shape)
    out.copy_(x)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", KINDS)
def test_vector_and_scalar_paths_agree(kind, dtype):
    """Both branches of the run-time alignment test: 16-byte vectors (aligned pointers, rows a multiple of 16
    bytes) and scalar accesses (a misaligned pointer, or rows of 33 elements), many rows to a tile."""
    for c, misalign in ((64, False), (64, True), (33, False), (192, True)):
        x = _randn((9, c), dtype, seed=c)
        if misalign:
            x = _misaligned(x)
        aligned = x.data_ptr() % 16 == 0 and (c * x.element_size()) % 16 == 0
        assert aligned == (not misalign and c != 33)
        got, ref = run_case(kind, x)
        assert_close(got, ref, dtype, f"{kind} C={c} misaligned={misalign}")
        if kind in ROW_KINDS:
            got2, _ = run_case(kind, x, rows=4)  # 9 rows in tiles of 4: a partial last tile
            assert_close(got2, ref, dtype, f"{kind} C={c} rows=4")


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_two_pass_loop_misaligned(kind):
    x = _misaligned(_randn((3, 1000), torch.float16, seed=4))
    got, ref = run_case(kind, x, block=128)
    assert_close(got, ref, torch.float16, f"{kind} two-pass misaligned")


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_two_pass_loop_with_a_partial_last_block(kind):
    x = _randn((4, 1000), torch.float32, seed=5)
    got, ref = run_case(kind, x, block=64)   # 15 full blocks and one of 40
    assert_close(got, ref, torch.float32, f"{kind} BLOCK=64")
    got2, _ = run_case(kind, x, tactic=2)
    assert_close(got2, ref, torch.float32, f"{kind} tactic 2")


def test_dyt_partial_tiles_and_tactics():
    x = _randn((3, 1000), torch.float16, seed=6)
    for launch in ({"block": 64}, {"block": 64, "rows": 2}, {"tactic": 2}):
        got, ref = run_case("dyt", x, **launch)
        assert_close(got, ref, torch.float16, f"dyt {launch}")


@pytest.mark.parametrize("kind", ["scalenorm", "dyt"])
def test_negative_float_attributes(kind):
    """A negative DyT alpha or ScaleNorm gain: the kernels get |value| as bits and the sign as SIGNS."""
    x = _randn((4, 40), torch.float32, seed=21)
    if kind == "dyt":
        w, b = _params(40, 22)
        got = K.dynamic_tanh(x, -0.7, w, b)
        ref = w.double() * torch.tanh(-0.7 * x.double()) + b.double()
        assert_close(K.dynamic_tanh(x, -0.7), torch.tanh(-0.7 * x.double()), torch.float32, "plain")
    else:
        got = K.scale_norm(x, -3.0, 1e-5)
        ref = -3.0 * x.double() / x.double().norm(dim=-1, keepdim=True)
    assert_close(got, ref, torch.float32, f"{kind} negative")
    assert K.float_args(-3.0, 1e-5) == ((K.f32_bits(3.0), K.f32_bits(1e-5)), 0b01)
    assert K.float_args(-0.0)[1] == 1 and K.float_args(0.5, -2.0)[1] == 0b10
    assert all(b >= 0 for b in K.float_args(-1e30, float("-inf"), -float("nan"))[0])


# ----------------------------------------------------------------------------- bzhangGo/rmsnorm's RMSNorm variants

def rms_variant_reference(x: torch.Tensor, g: torch.Tensor, eps: float, eps_outside: bool, partial: int):
    """numpy float64: g x / (sqrt(mean(s^2)) + eps) (eps outside) or g x / sqrt(mean(s^2) + eps), s = x[..., :k]."""
    x64, g64 = x.double().numpy(), g.double().numpy()
    s = x64[..., :partial] if partial else x64
    ms = np.mean(s * s, axis=-1, keepdims=True)
    den = np.sqrt(ms) + eps if eps_outside else np.sqrt(ms + eps)
    return torch.from_numpy(g64 * x64 / den)


#: (width, k): one-pass rows; k not a multiple of the vector width (4 fp32, 8 fp16/bf16); k = C; and rows
#: longer than one block (16385, 20001: the two-pass loop), with k inside the first block and beyond it
VARIANT_CASES = [(7, 3), (33, 5), (256, 128), (1000, 997), (1000, 1000), (16385, 4099), (20001, 17003)]
VARIANTS = [(True, 0), (False, 1), (True, 1)]  # (eps_outside, partial given): eps outside, partial, both


@pytest.mark.parametrize("eps_outside,with_partial", VARIANTS, ids=["eps_outside", "partial", "both"])
@pytest.mark.parametrize("c,k", VARIANT_CASES, ids=[f"C{c}-k{k}" for c, k in VARIANT_CASES])
def test_rms_variants_match_float64_reference(c, k, eps_outside, with_partial):
    partial = k if with_partial else 0
    dtypes = [torch.float32] if c > 1000 else DTYPES  # long rows: fp32 only (interpreter time)
    for dtype in dtypes:
        x = _randn((3, c), dtype, seed=c + k)
        g = _randn((c,), dtype, seed=k)
        eps = 0.25  # large enough that inside and outside the root differ visibly
        got = K.rms_norm(x, g, eps, eps_outside=eps_outside, partial=partial)
        ref = rms_variant_reference(x, g, eps, eps_outside, partial)
        assert_close(got, ref, dtype, f"C={c} partial={partial} eps_outside={eps_outside} {dtype}")
        other = rms_variant_reference(x, g, eps, not eps_outside, partial)  # eps on the other side of the root
        gap = ((got.double() - other).abs() / other.abs().max()).max().item()
        assert gap > 0.05, f"eps placement has no visible effect ({gap:.3g}; bf16 tolerance 0.016)"


@pytest.mark.parametrize("eps_outside,with_partial", VARIANTS, ids=["eps_outside", "partial", "both"])
def test_rms_variants_in_the_two_pass_loop_with_small_blocks_and_both_paths(eps_outside, with_partial):
    """Blocks of 64 over rows of 1000 (k = 131 ends inside the third block), aligned and misaligned, tactic 2."""
    x = _randn((5, 1000), torch.float16, seed=31)
    g = _randn((1000,), torch.float16, seed=32)
    partial = 131 if with_partial else 0
    ref = rms_variant_reference(x, g, 1e-2, eps_outside, partial)
    for launch in ({"block": 64}, {"block": 64, "rows": 2}, {"tactic": 2}):
        for xin in (x, _misaligned(x)):
            got = K.rms_norm(xin, g, 1e-2, eps_outside=eps_outside, partial=partial, **launch)
            assert_close(got, ref, torch.float16, f"{launch} misaligned={xin.data_ptr() % 16 != 0}")


def test_partial_statistic_ignores_the_columns_after_k():
    """Columns from k on are divided but never enter the statistic: huge values or a NaN there change only
    their own elements."""
    x = _randn((2, 40), torch.float32, seed=33)
    g = torch.ones(40)
    base = K.rms_norm(x, g, 1e-6, partial=9)
    x2 = x.clone()
    x2[:, 9:] *= 1e4
    x2[1, 20] = float("nan")
    y2 = K.rms_norm(x2, g, 1e-6, partial=9)
    assert torch.allclose(y2[:, :9], base[:, :9], rtol=1e-6, atol=0)
    assert torch.isnan(y2).sum() == 1 and torch.isnan(y2[1, 20])
    x3 = x.clone()
    x3[0, 3] = float("nan")  # inside the statistic: the whole row
    assert torch.isnan(K.rms_norm(x3, g, 1e-6, partial=9)[0]).all()


def test_ordinary_rmsnorm_unchanged_by_the_variant_arguments():
    """Defaults (eps_outside=False, partial=0) are the plain RMSNorm, bit for bit; partial = C is the same
    statistic (bit for bit too: the same sum over the same columns, divided by the same count)."""
    for c in (48, 1000, 16385):
        x = _randn((3, c), torch.float32, seed=c)
        g = _randn((c,), torch.float32, seed=c + 1)
        plain = K.rms_norm(x, g, 1e-6)
        assert torch.equal(K.rms_norm(x, g, 1e-6, eps_outside=False, partial=0), plain)
        assert torch.equal(K.rms_norm(x, g, 1e-6, partial=c), plain)
        m = N.RMSNorm(c, eps=1e-6).double()
        with torch.no_grad():
            m.weight.copy_(g.double())
            assert_close(plain, m(x.double()), torch.float32, f"plain C={c}")


def test_rms_partial_out_of_range_is_refused():
    x = torch.zeros(2, 8)
    for k in (-1, 9):
        with pytest.raises(ValueError, match="partial"):
            K.rms_norm(x, torch.ones(8), partial=k)


def test_sum_combine_is_there():
    """The kernels reduce with tl.standard._sum_combine (what tl.sum expands to, and what the interpreter
    reduces with np.sum): a private Triton name, checked here for every Triton the tests run with."""
    import triton
    import triton.language as tl

    assert isinstance(tl.standard._sum_combine, triton.runtime.JITFunction)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", KINDS)
def test_zeros(kind, dtype):
    x = torch.zeros(3, 40, dtype=dtype)
    got, ref = run_case(kind, x)
    assert torch.isfinite(got.float()).all()
    assert_close(got, ref, dtype, f"{kind} zeros")
    if kind != "dyt":
        assert (got == 0).all()


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_fp16_magnitudes_whose_squares_overflow_fp16(kind):
    # |x| ~ 3e4: x^2 ~ 1e9 is far beyond fp16's 65504; the kernels square in fp32
    x = (_randn((4, 300), torch.float32, seed=7).sign() * torch.linspace(3e2, 6e4, 300)).to(torch.float16)
    got, ref = run_case(kind, x)
    assert torch.isfinite(got.float()).all()
    assert_close(got, ref, torch.float16, f"{kind} large fp16")
    if kind == "rmsnorm":  # the trap the kernels avoid: the same module evaluated in fp16
        naive = N.RMSNorm(300)(x)
        assert not torch.allclose(naive.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_propagates_like_the_reference(kind):
    x = _randn((3, 5, 48), torch.float32, seed=8)
    x[1, 2, 13] = float("nan")
    got, ref = run_case(kind, x)
    assert_close(got, ref, torch.float32, f"{kind} NaN")
    nans = torch.isnan(got)
    if kind == "dyt":
        assert nans.sum() == 1
    elif kind == "group_scaling":
        assert nans.sum() == 48 // GROUPS.get(48, 1) and nans[1, 2].any()
    else:
        assert nans[1, 2].all() and nans.sum() == 48


def test_scalenorm_nan_is_not_swallowed_by_the_eps_clamp():
    x = torch.tensor([[float("nan"), 0.0, 0.0, 0.0]])
    y = K.scale_norm(x, 2.0, 1e-5)
    assert torch.isnan(y).all()


@pytest.mark.parametrize("axis,shape", [(1, (2, 3, 4, 5)), (2, (2, 3, 4, 5)), (0, (3, 7)), (-1, (2, 3, 4, 5))])
def test_dyt_channel_axis(axis, shape):
    x = _randn(shape, torch.float32, seed=9)
    c = shape[axis]
    w, b = _params(c, 10)
    m = N.DynamicTanh(c, alpha_init=0.8, axis=axis).double()
    with torch.no_grad():
        m.weight.copy_(w.double())
        m.bias.copy_(b.double())
        ref = m(x.double())
    assert_close(K.dynamic_tanh(x, 0.8, w, b, axis), ref, torch.float32, f"dyt axis {axis}")


def test_dyt_without_weight_or_bias():
    x = _randn((4, 33), torch.float16, seed=11)
    w, b = (t.to(torch.float16) for t in _params(33, 12))
    t = torch.tanh(0.25 * x.double())
    assert_close(K.dynamic_tanh(x, 0.25), t, torch.float16, "plain")
    assert_close(K.dynamic_tanh(x, 0.25, weight=w), t * w.double(), torch.float16, "gain only")
    assert_close(K.dynamic_tanh(x, 0.25, bias=b), t + b.double(), torch.float16, "bias only")


def test_dyt_tanh_accuracy_over_the_whole_range():
    z = torch.cat([torch.logspace(-9, 1.5, 2000), torch.tensor([0.0, 0.2999999, 0.3, 0.3000001, 9.0, 40.0, 1e30,
                                                                 float("inf")])])
    z = torch.cat([z, -z]).to(torch.float32)
    got = K.dynamic_tanh(z, 1.0)
    ref = torch.tanh(z.double())
    rel = ((got.double() - ref).abs() / ref.abs().clamp_min(1e-300))
    rel[ref == 0] = (got[ref == 0].double() - 0).abs()
    assert rel.max() < 2e-6, f"max relative error {rel.max():.3g}"
    assert torch.equal(torch.sign(got), torch.sign(z)) and (got.abs() <= 1).all()


def test_group_scaling_groups_of_one_channel_and_bad_groups():
    x = _randn((2, 6), torch.float32, seed=13)
    y = K.group_scaling(x, 6, 0.0)
    assert torch.allclose(y, x.sign(), atol=1e-6)  # each channel divided by its own |x|
    with pytest.raises(ValueError, match="not divisible"):
        K.group_scaling(x, 4)


def test_parameter_length_is_checked():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="gain"):
        K.rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight"):
        K.dynamic_tanh(x, 1.0, torch.ones(3))


def test_empty_input():
    x = torch.zeros(0, 16)
    assert K.rms_norm(x, torch.ones(16)).shape == (0, 16)
    assert K.dynamic_tanh(x, 1.0).shape == (0, 16)


def test_launch_config():
    # short rows share a program: 4096 elements a tile, one warp per 1024 of them (tactic 2: per 512)
    assert K.row_config(64) == K.RowConfig(64, True, 4, 64)
    assert K.row_config(192) == K.RowConfig(256, True, 4, 16)
    assert K.row_config(768) == K.RowConfig(1024, True, 4, 4)
    assert K.row_config(768, 2) == K.RowConfig(1024, True, 16, 8)
    assert K.row_config(4096) == K.RowConfig(4096, True, 4, 1)
    assert K.row_config(16384) == K.RowConfig(16384, True, 16, 1)
    assert K.row_config(1).rows == K.MAX_ROWS
    assert K.row_config(16384).one_block and not K.row_config(16385).one_block
    assert not K.row_config(None).one_block  # hidden size unknown when the engine is built
    assert K.dyt_config(768) == K.DytConfig(16, 256, 4) and K.dyt_config(None, 2) == K.DytConfig(32, 256, 8)
    assert K.dyt_config(64) == K.DytConfig(64, 64, 4)
    assert K.dyt_config(None, plain=True) == K.DytConfig(1, 4096, 4)
    assert K.dyt_view((2, 5, 48), -1, True) == (10, 48, 48, True)
    assert K.dyt_view((2, 3, 4, 5), 1, True) == (6, 20, 3, False)
    assert K.dyt_view((2, 3, 4, 5), 1, False) == (1, 120, 1, True)
    assert K.vector_width(2) == 8 and K.vector_width(4) == 4
    assert K.f32_bits(1.0) == 0x3F800000 and K.f32_bits(-2.0) == -(2**31) + 0x40000000
    with pytest.raises(ValueError):
        K.row_config(10, tactic=3)


@pytest.mark.slow
def test_kernels_also_run_with_TRITON_INTERPRET_set():
    """The kernels work in Triton's own interpreter mode too (TRITON_INTERPRET=1 before triton is imported)."""
    script = textwrap.dedent("""
        import torch, triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        assert isinstance(tl.sum, InterpretedFunction)   # the mode is on
        from normdeploy.lower.plugins import kernels as K
        x = torch.randn(3, 50, dtype=torch.float16)
        w = torch.randn(50, dtype=torch.float16)
        xf = x.double()
        checks = {
            "rms": (K.rms_norm(x, w, 1e-6), w.double() * xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-6)),
            "gs": (K.group_scaling(x, 5, 1e-5), (xf.reshape(3, 5, 10) / torch.sqrt(
                (xf.reshape(3, 5, 10) ** 2).mean(-1, keepdim=True) + 1e-5)).reshape(3, 50)),
            "sn": (K.scale_norm(x, 2.0, 1e-5), 2.0 * xf / xf.norm(dim=-1, keepdim=True)),
            "dyt": (K.dynamic_tanh(x, 0.5, w, w), w.double() * torch.tanh(0.5 * xf) + w.double()),
        }
        for name, (got, ref) in checks.items():
            err = ((got.double() - ref).abs() / (ref.abs() + 1e-2)).max().item()
            assert err < 4e-3, (name, err)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = ROOT
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
