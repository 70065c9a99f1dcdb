"""Triton kernels behind normdeploy's TensorRT plugins, and launchers for them.

Math (DESIGN.md section 2; a *row* is the normalized slice of the input):

* ``rmsnorm_fwd``        y = g * x * rsqrt(mean(x^2) + eps)                   rows of C
* ``crmsnorm_fwd``       y = g * x * rsqrt((sum x^2 + (sum x)^2) / (C+1) + eps)  rows of C = d-1
* ``group_scaling_fwd``  y = x * rsqrt(mean(x^2) + eps)                        rows of C/G (one group)
* ``scalenorm_fwd``      y = x * scale / max(sqrt(sum x^2), eps)               rows of C
* ``dyt_fwd``            y = w_c * tanh(alpha * x) + b_c  (w, b optional)      elementwise

Numerics: every input is loaded in its own dtype (fp32, fp16 or bf16) and upcast; all
arithmetic and every reduction is fp32; the result is rounded once to the output dtype.
Squares are therefore never formed in fp16 (|x| > 256 would overflow). A NaN makes its
whole row (GroupScaling: its group; DynamicTanh: its element) NaN, as in the reference
modules (the ScaleNorm clamp propagates NaN explicitly; Triton's default ``maximum``
would drop it).

Rows of any length: when a row fits one block (``ONE_BLOCK``) it is loaded once and
kept in registers; otherwise the kernel makes two passes over it in blocks of
``BLOCK`` (sum of squares, then normalize and store), so hidden sizes have no upper
bound. One program normalizes one row; the launch grid is the number of rows.

Calling convention (the one TensorRT's AOT launch uses): non-constexpr parameters are
declared as ``(input pointers..., int32 scalars..., output pointers...)``. TensorRT's
AOT extra arguments are 32-bit integers only, so float attributes (eps, alpha, scale)
travel as the int32 bit pattern of their float32 value (:func:`f32_bits`) and are
bit-cast back inside the kernel; one compiled kernel then serves every layer whatever
its eps, instead of one compile per distinct value.

The kernel bodies are plain Python functions. :func:`jit_kernel` wraps one in a
``triton.JITFunction`` (for ``triton.compile`` and CUDA launches) and
:func:`interpreted_kernel` in the Triton interpreter's ``InterpretedFunction`` (CPU
tensors). Both wrappers are built explicitly rather than by ``@triton.jit``, which
chooses between them once, at decoration time, from ``TRITON_INTERPRET``: this way one
process can run a kernel under the interpreter and compile it to PTX, whatever the
environment says (do not set ``TRITON_INTERPRET=1`` in a process that must compile: it
turns Triton's own library functions into interpreter objects at import). The double
wrapping is safe because the bodies call only ``triton.language`` *builtins*, which the
interpreter patches while a kernel runs, and no ``@jit`` library function: ``tl.sum``
and ``tl.zeros`` are ``@jit`` functions that cannot be called from interpreted code
unless the interpreter was on at import, so the kernels spell them
``tl.reduce(v, 0, tl.standard._sum_combine)`` (exactly what ``tl.sum`` expands to; the
interpreter recognizes that combine function and reduces with ``np.sum``) and
``tl.full([BLOCK], 0.0, tl.float32)``. (With ``TRITON_INTERPRET=1`` set, the same bodies
also run under Triton's own interpreter mode; the tests check both.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import triton
import triton.language as tl

__all__ = [
    "KERNELS", "RowConfig", "row_config", "dyt_config", "f32_bits", "jit_kernel", "interpreted_kernel",
    "rms_norm", "crms_norm", "group_scaling", "scale_norm", "dynamic_tanh",
]


# ----------------------------------------------------------------------------- kernels

def rmsnorm_fwd(x_ptr, g_ptr, n_cols, eps_bits, y_ptr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    eps = eps_bits.to(tl.float32, bitcast=True)
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.reduce(x * x, 0, tl.standard._sum_combine) / n_cols + eps)
        g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x * inv * g).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.full([BLOCK], 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
            acc += x * x
        inv = tl.rsqrt(tl.reduce(acc, 0, tl.standard._sum_combine) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (x * inv * g).to(y_ptr.dtype.element_ty), mask=mask)


def crmsnorm_fwd(x_ptr, g_ptr, n_cols, eps_bits, y_ptr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    eps = eps_bits.to(tl.float32, bitcast=True)
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.reduce(x, 0, tl.standard._sum_combine)
        inv = tl.rsqrt((tl.reduce(x * x, 0, tl.standard._sum_combine) + s1 * s1) / (n_cols + 1) + eps)
        g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x * inv * g).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc1 = tl.full([BLOCK], 0.0, tl.float32)
        acc2 = tl.full([BLOCK], 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
            acc1 += x
            acc2 += x * x
        s1 = tl.reduce(acc1, 0, tl.standard._sum_combine)
        inv = tl.rsqrt((tl.reduce(acc2, 0, tl.standard._sum_combine) + s1 * s1) / (n_cols + 1) + eps)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (x * inv * g).to(y_ptr.dtype.element_ty), mask=mask)


def group_scaling_fwd(x_ptr, n_cols, eps_bits, y_ptr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    # one program per (token, group): groups are contiguous, so a group is a row of C/G
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    eps = eps_bits.to(tl.float32, bitcast=True)
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.reduce(x * x, 0, tl.standard._sum_combine) / n_cols + eps)
        tl.store(y_row + cols, (x * inv).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.full([BLOCK], 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
            acc += x * x
        inv = tl.rsqrt(tl.reduce(acc, 0, tl.standard._sum_combine) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (x * inv).to(y_ptr.dtype.element_ty), mask=mask)


def scalenorm_fwd(x_ptr, n_cols, scale_bits, eps_bits, y_ptr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    scale = scale_bits.to(tl.float32, bitcast=True)
    eps = eps_bits.to(tl.float32, bitcast=True)
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt_rn(tl.reduce(x * x, 0, tl.standard._sum_combine))
        factor = scale / tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL)
        tl.store(y_row + cols, (x * factor).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.full([BLOCK], 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
            acc += x * x
        norm = tl.sqrt_rn(tl.reduce(acc, 0, tl.standard._sum_combine))
        factor = scale / tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (x * factor).to(y_ptr.dtype.element_ty), mask=mask)


def dyt_fwd(x_ptr, w_ptr, b_ptr, n_elements, n_channels, inner, alpha_bits, y_ptr,
            BLOCK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    # flat elementwise over x; the channel of flat index i is (i // inner) % n_channels,
    # inner = product of the dims after the channel axis (1 for channels-last, then a
    # compile-time constant so that the division disappears)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    alpha = alpha_bits.to(tl.float32, bitcast=True)
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * alpha
    # tanh in fp32 from exp (libdevice's tanh does not run under the interpreter):
    # |z| < 0.3: odd Taylor series to z^9 (truncation < 6e-8 relative);
    # else sign(z) (1 - e) / (1 + e), e = exp(-2|z|) (no cancellation there, saturates to +-1)
    az = tl.abs(z)
    zs = tl.where(az < 0.3, z, 0.0)  # keeps the unused branch free of overflow
    z2 = zs * zs
    small = zs * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 + z2 * (
        -0.05396825396825397 + z2 * 0.021869488536155203))))
    e = tl.exp(-2.0 * az)
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(z < 0.0, -large, large)
    t = tl.where(az < 0.3, small, large)
    if HAS_W or HAS_B:
        ch = (offs // inner) % n_channels
        if HAS_W:
            t = t * tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            t = t + tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, t.to(y_ptr.dtype.element_ty), mask=mask)


#: kernel name (= PTX entry name) -> kernel body
KERNELS = {fn.__name__: fn for fn in (rmsnorm_fwd, crmsnorm_fwd, group_scaling_fwd, scalenorm_fwd, dyt_fwd)}


@functools.lru_cache(maxsize=None)
def jit_kernel(name: str) -> triton.runtime.JITFunction:
    """``KERNELS[name]`` as a JITFunction: what ``triton.compile(ASTSource(...))`` and CUDA launches take."""
    return triton.runtime.JITFunction(KERNELS[name])


@functools.lru_cache(maxsize=None)
def interpreted_kernel(name: str):
    """``KERNELS[name]`` under the Triton interpreter (runs on CPU tensors, numpy semantics)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(KERNELS[name])


# ----------------------------------------------------------------------------- launch configuration

#: rows up to this many elements are normalized from registers in one pass
MAX_ONE_BLOCK = 8192
#: the tactics every plugin advertises to TensorRT's autotuner (TensorRT times them on the target GPU)
TACTICS = (1, 2)


@dataclass(frozen=True)
class RowConfig:
    block: int
    one_block: bool
    num_warps: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_config(n_cols: int | None, tactic: int = 1) -> RowConfig:
    """Block size, single/two-pass choice and warps for rows of ``n_cols`` (None: unknown at build).

    Tactic 1: one warp per 256 elements of the block, at most 8 warps (8 elements per
    thread up to 2048, more beyond); tactic 2: one warp per 128, at most 16 (twice the
    threads per row). Rows longer than :data:`MAX_ONE_BLOCK`, or of a length unknown when
    the kernel is built, take the two-pass loop in blocks of 4096 with 8 warps (tactic 1)
    or 8192 with 16 (tactic 2). TensorRT times both tactics on the target GPU.
    """
    if tactic not in TACTICS:
        raise ValueError(f"unknown tactic {tactic}; expected one of {TACTICS}")
    if n_cols is not None and n_cols <= MAX_ONE_BLOCK:
        block = _next_pow2(max(1, n_cols))
        per_warp, cap = (256, 8) if tactic == 1 else (128, 16)
        return RowConfig(block, True, min(cap, max(1, block // per_warp)))
    return RowConfig(4096, False, 8) if tactic == 1 else RowConfig(8192, False, 16)


def dyt_config(tactic: int = 1) -> tuple[int, int]:
    """(BLOCK, num_warps) of the elementwise DynamicTanh kernel: 8 elements per thread either way."""
    if tactic not in TACTICS:
        raise ValueError(f"unknown tactic {tactic}; expected one of {TACTICS}")
    return (1024, 4) if tactic == 1 else (4096, 16)


def f32_bits(value: float) -> int:
    """The bit pattern of float32(``value``) as a signed int32 (how floats reach the kernels)."""
    return int(np.asarray(value, np.float32).view(np.int32))


# ----------------------------------------------------------------------------- launchers

def _run(name: str, grid: int, args: tuple, constexprs: dict, num_warps: int, device_type: str) -> None:
    if grid == 0:
        return
    if device_type == "cpu":
        interpreted_kernel(name)[(grid,)](*args, **constexprs)
    else:
        jit_kernel(name)[(grid,)](*args, **constexprs, num_warps=num_warps)


def _row_launch(name: str, x, n_cols: int, head: tuple, tail: tuple, tactic: int, block: int | None,
                num_warps: int | None):
    import torch

    x = x.contiguous()
    y = torch.empty_like(x)
    cfg = row_config(n_cols, tactic)
    if block is not None:
        cfg = RowConfig(block, n_cols <= block, num_warps or cfg.num_warps)
    elif num_warps is not None:
        cfg = RowConfig(cfg.block, cfg.one_block, num_warps)
    rows = x.numel() // n_cols if n_cols else 0
    _run(name, rows, (x, *head, n_cols, *tail, y), {"BLOCK": cfg.block, "ONE_BLOCK": cfg.one_block},
         cfg.num_warps, x.device.type)
    return y


def rms_norm(x, weight, eps: float = 1e-6, *, tactic: int = 1, block: int | None = None,
             num_warps: int | None = None):
    """RMSNorm over the last axis of ``x`` with gain ``weight`` [C] (CPU: interpreter; CUDA: compiled)."""
    weight = weight.contiguous()
    if weight.numel() != x.shape[-1]:
        raise ValueError(f"RMSNorm gain has {weight.numel()} elements for {x.shape[-1]} channels")
    return _row_launch("rmsnorm_fwd", x, x.shape[-1], (weight,), (f32_bits(eps),), tactic, block, num_warps)


def crms_norm(x, weight, eps: float = 1e-6, *, tactic: int = 1, block: int | None = None,
              num_warps: int | None = None):
    """CRMSNorm over the last axis (d-1 stored coordinates) with gain ``weight`` [C]."""
    weight = weight.contiguous()
    if weight.numel() != x.shape[-1]:
        raise ValueError(f"CRMSNorm gain has {weight.numel()} elements for {x.shape[-1]} channels")
    return _row_launch("crmsnorm_fwd", x, x.shape[-1], (weight,), (f32_bits(eps),), tactic, block, num_warps)


def group_scaling(x, groups: int = 1, eps: float = 1e-5, *, tactic: int = 1, block: int | None = None,
                  num_warps: int | None = None):
    """PowerNorm's GroupScaling: each of ``groups`` contiguous channel groups of the last axis divided by its RMS."""
    c = x.shape[-1]
    if groups < 1 or c % groups:
        raise ValueError(f"GroupScaling: {c} channels are not divisible into {groups} groups")
    return _row_launch("group_scaling_fwd", x, c // groups, (), (f32_bits(eps),), tactic, block, num_warps)


def scale_norm(x, scale: float, eps: float = 1e-5, *, tactic: int = 1, block: int | None = None,
               num_warps: int | None = None):
    """ScaleNorm over the last axis: ``scale * x / max(||x||_2, eps)``."""
    return _row_launch("scalenorm_fwd", x, x.shape[-1], (), (f32_bits(scale), f32_bits(eps)), tactic, block,
                       num_warps)


def dynamic_tanh(x, alpha: float, weight=None, bias=None, axis: int = -1, *, tactic: int = 1,
                 block: int | None = None, num_warps: int | None = None):
    """DynamicTanh ``weight_c * tanh(alpha * x) + bias_c`` with the channel on ``axis``; weight/bias optional."""
    import torch

    x = x.contiguous()
    y = torch.empty_like(x)
    pos = axis % x.dim()
    c = x.shape[pos]
    inner = int(np.prod(x.shape[pos + 1:], dtype=np.int64))
    for v, what in ((weight, "weight"), (bias, "bias")):
        if v is not None and v.numel() != c:
            raise ValueError(f"DynamicTanh {what} has {v.numel()} elements for {c} channels")
    blk, warps = dyt_config(tactic)
    blk, warps = block or blk, num_warps or warps
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    grid = triton.cdiv(x.numel(), blk)
    _run("dyt_fwd", grid, (x, w, b, x.numel(), c, inner, f32_bits(alpha), y),
         {"BLOCK": blk, "HAS_W": w is not None, "HAS_B": b is not None}, warps, x.device.type)
    return y
