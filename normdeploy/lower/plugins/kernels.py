"""Triton kernels behind normdeploy's TensorRT plugins, and launchers for them.

Math (DESIGN.md section 2; a *row* is the normalized slice of the input):

* ``row_norm_fwd`` KIND RMS        y = g * x * rsqrt(mean(x^2) + eps)                   rows of C
* ... ``EPS_OUTSIDE``              y = g * x / (sqrt(mean(s^2)) + eps)                   (bzhangGo/rmsnorm)
* ... ``PARTIAL``, n_stat = k      s = x[:k], the first k of the C columns: mean(s^2) = sum(s^2) / k; all C divided
* ``row_norm_fwd`` KIND CRMS       y = g * x * rsqrt((sum x^2 + (sum x)^2) / (C+1) + eps)  rows of C = d-1
* ``row_norm_fwd`` KIND GROUP_RMS  y = x * rsqrt(mean(x^2) + eps)                        rows of C/G (one group)
* ``row_norm_fwd`` KIND SCALE      y = x * scale / max(sqrt(sum x^2), eps)               rows of C
* ``dyt_fwd``                      y = w_c * tanh(alpha * x) + b_c  (w, b optional)      elementwise

Numerics: every input is loaded in its own dtype (fp32, fp16 or bf16) and upcast; all
arithmetic and every reduction is fp32; the result is rounded once to the output dtype.
Squares are therefore never formed in fp16 (|x| > 256 would overflow). RMS's variants keep
that: the statistic is the fp32 sum of squares of the first ``n_stat`` columns (n_stat = C
unless ``PARTIAL``; a k beyond the row is clamped to it, as ONNX ``Slice`` does), divided by
n_stat, and with ``EPS_OUTSIDE`` the factor is ``1 / (sqrt_rn(s2 / n_stat) + eps)``: the
ONNX function body of ``normdeploy::RMSNorm`` (``ReduceMean(s * s)``, ``Sqrt``, ``Add(eps)``,
``Div``) in fp32, so the kernel equals it to fp32 rounding (a few ulp: the reduction order,
``div.full``), exact in the project's sense. Without the two constexprs every KIND computes
what it did before they existed, with the same instructions (``n_stat`` is then unused).
A NaN makes its whole row (GroupScaling: its group; DynamicTanh, and a column outside a
partial statistic: its element) NaN, as in the reference modules (the ScaleNorm clamp
propagates NaN explicitly; Triton's default ``maximum`` would drop it).

Tiles: a ``row_norm_fwd`` program normalizes ``ROWS`` consecutive rows (many when rows are
short), loading the gain once for all of them; when a row fits one block (``ONE_BLOCK``,
up to 16384 elements) it is loaded once and kept in registers, otherwise the kernel makes
two passes over it in blocks of ``BLOCK`` (statistic, then normalize and store), so
hidden sizes have no upper bound (with ``PARTIAL`` the first pass reads only the blocks
the statistic covers). ``dyt_fwd`` sees x as a 2-D grid of [BLOCK_R, BLOCK_C] tiles in
which the channel is the column (channels last) or the row, so w and b are loaded once per
tile and no element needs a division or modulo. Both take 16-byte vector accesses when a
run-time test finds the pointers and rows aligned (the body is emitted twice with
``tl.static_range``: hinted and plain), scalar ones otherwise.

Calling convention (the one TensorRT's AOT launch uses): non-constexpr parameters are
declared as ``(input pointers..., int32 scalars..., output pointers...)``; a scalar that a
plugin does not need (``scale_bits`` outside SCALE, ``n_stat`` without ``PARTIAL``) is bound
as a constexpr in the AOT plan, so it is not a parameter of that PTX entry. TensorRT's
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
interpreter patches while a kernel runs, and no ``@jit`` library function: ``tl.sum``,
``tl.zeros`` and ``tl.cdiv`` are ``@jit`` functions that cannot be called from interpreted
code unless the interpreter was on at import, so the kernels spell them
``tl.reduce(v, axis, tl.standard._sum_combine)`` (exactly what ``tl.sum`` expands to; the
interpreter recognizes that combine function and reduces with ``np.sum``; present in
Triton 3.5 to 3.9), ``tl.full([ROWS, BLOCK], 0.0, tl.float32)`` and ``(a + b - 1) // b``.
Loops over a run-time bound are ``while`` loops: Triton 3.5's interpreter cannot
``range()`` over a scalar argument with numpy 2.4. (With ``TRITON_INTERPRET=1`` set, the
same bodies also run under Triton's own interpreter mode; the tests check both.)
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import triton
import triton.language as tl

__all__ = [
    "KERNELS", "RowConfig", "DytConfig", "row_config", "dyt_config", "dyt_view", "vector_width", "f32_bits",
    "float_args",
    "jit_kernel", "interpreted_kernel",
    "rms_norm", "crms_norm", "group_scaling", "scale_norm", "dynamic_tanh",
]


# ----------------------------------------------------------------------------- kernels

#: what the row kernel's statistic is (its ``KIND`` constexpr; constexpr globals are what kernels may read)
RMS, CRMS, GROUP_RMS, SCALE = (tl.constexpr(k) for k in range(4))


def row_norm_fwd(x_ptr, g_ptr, n_rows, n_cols, n_stat, scale_bits, eps_bits, y_ptr,
                 KIND: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr,
                 ONE_BLOCK: tl.constexpr, SIGNS: tl.constexpr, PARTIAL: tl.constexpr, EPS_OUTSIDE: tl.constexpr):
    # a tile of ROWS consecutive rows of n_cols; KIND picks the statistic, g_ptr is None for GROUP_RMS/SCALE
    # float attributes arrive as the bits of their magnitude; their signs are bits of SIGNS (scale 1, eps 2)
    # KIND RMS only: PARTIAL takes the statistic over the first n_stat columns (at most n_cols, as ONNX Slice
    # clamps), EPS_OUTSIDE adds eps to the RMS outside the root; otherwise n_stat is unused (a constexpr 0 in
    # the AOT plans) and the statistic covers the n_cols columns of the row, computed as it always was
    if KIND == SCALE:
        scale = scale_bits.to(tl.float32, bitcast=True)
        if SIGNS & 1:
            scale = -scale
    eps = eps_bits.to(tl.float32, bitcast=True)
    if SIGNS & 2:
        eps = -eps
    if PARTIAL:
        stat_end = tl.minimum(n_stat, n_cols)
    else:
        stat_end = n_cols
    # 16-byte vector accesses where every pointer and every row start allow them, tested here at run time.
    # The body is written once and emitted twice (static_range): path 1 with alignment hints and a mask that
    # is constant over each vector, path 0 plain; each keeps its tensors to itself (no layout conversions).
    addr = x_ptr.to(tl.int64) | y_ptr.to(tl.int64)
    if KIND <= CRMS:
        addr = addr | g_ptr.to(tl.int64)
    vec = (addr % 16 == 0) & (n_cols % VEC == 0)
    for path in tl.static_range(2):
        if path == 1:
            take = vec
        else:
            take = not vec
        if take:
            rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            cols = tl.arange(0, BLOCK)
            row_in = (rows < n_rows)[:, None]
            if ONE_BLOCK:
                xp = x_ptr + rows[:, None] * n_cols + cols[None, :]
                yp = y_ptr + rows[:, None] * n_cols + cols[None, :]
                if path == 1:
                    xp = tl.multiple_of(xp, [1, 16])
                    yp = tl.multiple_of(yp, [1, 16])
                    cm = (cols // VEC) < (n_cols // VEC)
                else:
                    cm = cols < n_cols
                x = tl.load(xp, mask=row_in & cm[None, :], other=0.0).to(tl.float32)
                if PARTIAL:
                    s2 = tl.reduce(tl.where((cols < stat_end)[None, :], x * x, 0.0), 1, tl.standard._sum_combine)
                else:
                    s2 = tl.reduce(x * x, 1, tl.standard._sum_combine)
                if KIND == SCALE:
                    factor = scale / tl.maximum(tl.sqrt_rn(s2), eps, propagate_nan=tl.PropagateNan.ALL)
                elif KIND == CRMS:
                    s1 = tl.reduce(x, 1, tl.standard._sum_combine)
                    factor = tl.rsqrt((s2 + s1 * s1) / (n_cols + 1) + eps)
                elif EPS_OUTSIDE:
                    factor = 1.0 / (tl.sqrt_rn(s2 / stat_end) + eps)
                else:
                    factor = tl.rsqrt(s2 / stat_end + eps)
                y = x * factor[:, None]
                if KIND <= CRMS:  # the gain: loaded once per tile, shared by its ROWS rows
                    gp = g_ptr + cols
                    if path == 1:
                        gp = tl.multiple_of(gp, 16)
                    y = y * tl.load(gp, mask=cm, other=0.0).to(tl.float32)[None, :]
                tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=row_in & cm[None, :])
            else:
                # rows longer than a block: pass 1 accumulates the statistic, pass 2 normalizes (x read twice)
                acc2 = tl.full([ROWS, BLOCK], 0.0, tl.float32)
                acc1 = tl.full([ROWS, BLOCK], 0.0, tl.float32)
                it = 0
                # pass 1 reads the blocks the statistic covers: the row, or (PARTIAL) its first stat_end columns
                while it * BLOCK < stat_end:  # while: Triton 3.5's interpreter cannot range() over a runtime bound
                    c = it * BLOCK + cols
                    xp = x_ptr + rows[:, None] * n_cols + c[None, :]
                    if path == 1:
                        xp = tl.multiple_of(xp, [1, 16])
                        cm = (c // VEC) < (n_cols // VEC)
                    else:
                        cm = c < n_cols
                    x = tl.load(xp, mask=row_in & cm[None, :], other=0.0).to(tl.float32)
                    if PARTIAL:
                        acc2 += tl.where((c < stat_end)[None, :], x * x, 0.0)
                    else:
                        acc2 += x * x
                    if KIND == CRMS:
                        acc1 += x
                    it += 1
                s2 = tl.reduce(acc2, 1, tl.standard._sum_combine)
                if KIND == SCALE:
                    factor = scale / tl.maximum(tl.sqrt_rn(s2), eps, propagate_nan=tl.PropagateNan.ALL)
                elif KIND == CRMS:
                    s1 = tl.reduce(acc1, 1, tl.standard._sum_combine)
                    factor = tl.rsqrt((s2 + s1 * s1) / (n_cols + 1) + eps)
                elif EPS_OUTSIDE:
                    factor = 1.0 / (tl.sqrt_rn(s2 / stat_end) + eps)
                else:
                    factor = tl.rsqrt(s2 / stat_end + eps)
                it = 0
                while it * BLOCK < n_cols:
                    c = it * BLOCK + cols
                    xp = x_ptr + rows[:, None] * n_cols + c[None, :]
                    yp = y_ptr + rows[:, None] * n_cols + c[None, :]
                    if path == 1:
                        xp = tl.multiple_of(xp, [1, 16])
                        yp = tl.multiple_of(yp, [1, 16])
                        cm = (c // VEC) < (n_cols // VEC)
                    else:
                        cm = c < n_cols
                    x = tl.load(xp, mask=row_in & cm[None, :], other=0.0).to(tl.float32)
                    y = x * factor[:, None]
                    if KIND <= CRMS:
                        gp = g_ptr + c
                        if path == 1:
                            gp = tl.multiple_of(gp, 16)
                        y = y * tl.load(gp, mask=cm, other=0.0).to(tl.float32)[None, :]
                    tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=row_in & cm[None, :])
                    it += 1


def dyt_fwd(x_ptr, w_ptr, b_ptr, n_rows, n_cols, n_channels, alpha_bits, y_ptr,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
            HAS_W: tl.constexpr, HAS_B: tl.constexpr, CH_ON_COLS: tl.constexpr, SIGNS: tl.constexpr):
    # x seen as [n_rows, n_cols], one [BLOCK_R, BLOCK_C] tile per program (1-D grid, column tiles fastest).
    # CH_ON_COLS (channels last): the channel is the column; else the row's channel is row % n_channels
    # (x = [outer, C, inner] seen as [outer * C, inner]). w and b are loaded once per tile either way:
    # no per-element division or modulo.
    alpha = alpha_bits.to(tl.float32, bitcast=True)  # the bits of |alpha|; its sign is SIGNS
    if SIGNS & 1:
        alpha = -alpha
    pid = tl.program_id(0)
    col_tiles = (n_cols + (BLOCK_C - 1)) // BLOCK_C
    pid_r = pid // col_tiles
    pid_c = pid - pid_r * col_tiles
    vec = ((x_ptr.to(tl.int64) | y_ptr.to(tl.int64)) % 16 == 0) & (n_cols % VEC == 0)
    for path in tl.static_range(2):  # path 1: 16-byte vectors (as in row_norm_fwd); path 0: scalar accesses
        if path == 1:
            take = vec
        else:
            take = not vec
        if take:
            rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
            cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
            row_in = (rows < n_rows)[:, None]
            xp = x_ptr + rows[:, None] * n_cols + cols[None, :]
            yp = y_ptr + rows[:, None] * n_cols + cols[None, :]
            if path == 1:
                xp = tl.multiple_of(xp, [1, 16])
                yp = tl.multiple_of(yp, [1, 16])
                cm = (cols // VEC) < (n_cols // VEC)
            else:
                cm = cols < n_cols
            z = tl.load(xp, mask=row_in & cm[None, :], other=0.0).to(tl.float32) * alpha
            # tanh in fp32 without libdevice (which the interpreter lacks) and without an IEEE division:
            # |z| < 0.3: odd Taylor series to z^9 (truncation < 6e-8 relative);
            # else sign(z) (1 - e) / (1 + e), e = exp(-2|z|) = 2^(-2 log2(e) |z|) (ex2.approx and div.full;
            # no cancellation there, saturates to +-1, NaN stays NaN)
            az = tl.abs(z)
            e = tl.exp2(az * -2.8853900817779268)
            large = (1.0 - e) / (1.0 + e)
            large = tl.where(z < 0.0, -large, large)
            zs = tl.where(az < 0.3, z, 0.0)  # keeps the unused branch free of overflow
            z2 = zs * zs
            small = zs * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 + z2 * (
                -0.05396825396825397 + z2 * 0.021869488536155203))))
            t = tl.where(az < 0.3, small, large)
            if HAS_W or HAS_B:
                if CH_ON_COLS:
                    pm = cols < n_cols
                    if HAS_W:
                        t = t * tl.load(w_ptr + cols, mask=pm, other=0.0).to(tl.float32)[None, :]
                    if HAS_B:
                        t = t + tl.load(b_ptr + cols, mask=pm, other=0.0).to(tl.float32)[None, :]
                else:
                    ch = rows % n_channels
                    rm = rows < n_rows
                    if HAS_W:
                        t = t * tl.load(w_ptr + ch, mask=rm, other=0.0).to(tl.float32)[:, None]
                    if HAS_B:
                        t = t + tl.load(b_ptr + ch, mask=rm, other=0.0).to(tl.float32)[:, None]
            tl.store(yp, t.to(y_ptr.dtype.element_ty), mask=row_in & cm[None, :])


#: kernel name (= PTX entry name) -> kernel body
KERNELS = {fn.__name__: fn for fn in (row_norm_fwd, dyt_fwd)}


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

#: rows up to this many elements are normalized from registers in one pass (16 warps, 32 elements a thread)
MAX_ONE_BLOCK = 16384
#: the tactics every plugin advertises to TensorRT's autotuner (TensorRT times them on the target GPU)
TACTICS = (1, 2)
#: elements one program handles in the one-pass row kernel and in DynamicTanh, per tactic
TILE = {1: 4096, 2: 8192}
#: most rows one program normalizes (short rows)
MAX_ROWS = 64


@dataclass(frozen=True)
class RowConfig:
    block: int          # columns per block (a power of two; >= the row in the one-pass kernel)
    one_block: bool     # the whole row in registers (one pass) or blocks of ``block`` (two passes)
    num_warps: int
    rows: int = 1       # rows per program


@dataclass(frozen=True)
class DytConfig:
    block_r: int
    block_c: int
    num_warps: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_tactic(tactic: int) -> None:
    if tactic not in TACTICS:
        raise ValueError(f"unknown tactic {tactic}; expected one of {TACTICS}")


def row_config(n_cols: int | None, tactic: int = 1) -> RowConfig:
    """Tile, single/two-pass choice and warps for rows of ``n_cols`` (None: unknown at build).

    One pass (rows of at most :data:`MAX_ONE_BLOCK`): ``block`` = the row rounded up to a
    power of two; short rows are batched, ``rows`` = ``TILE[tactic] // block`` of them per
    program (at most :data:`MAX_ROWS`), so that every program moves a few KiB however short
    the row; one warp per 1024 elements of the tile (tactic 1: 32 elements a thread, eight
    16-byte vectors of fp16) or per 512 (tactic 2), at most 16. Longer rows, or rows of a
    length unknown when the kernel is built, take the two-pass loop, one row a program, in
    blocks of 4096 with 8 warps (tactic 1) or 8192 with 16 (tactic 2).
    """
    _check_tactic(tactic)
    if n_cols is not None and n_cols <= MAX_ONE_BLOCK:
        block = _next_pow2(max(1, n_cols))
        rows = max(1, min(MAX_ROWS, TILE[tactic] // block))
        per_warp = 1024 if tactic == 1 else 512
        return RowConfig(block, True, max(1, min(16, rows * block // per_warp)), rows)
    return RowConfig(4096, False, 8) if tactic == 1 else RowConfig(8192, False, 16)


#: DynamicTanh's widest column tile: w and b are loaded once per tile, so a tile of 256 columns and
#: TILE / 256 rows reads them once per 16 (tactic 1) or 32 rows, and holds few of them per thread
DYT_MAX_BLOCK_C = 256


def dyt_config(n_cols: int | None = None, tactic: int = 1, plain: bool = False) -> DytConfig:
    """The DynamicTanh tile for rows of ``n_cols`` (None: unknown at build); ``plain``: no w/b, x seen flat.

    Tiles of ``TILE[tactic]`` elements (4096 with 4 warps, 8192 with 8: 32 elements a thread):
    the columns rounded up to a power of two, at most :data:`DYT_MAX_BLOCK_C` (which it is when
    unknown), the rest of the tile in rows. Without w and b, one flat tile.
    """
    _check_tactic(tactic)
    tile = TILE[tactic]
    warps = 4 if tactic == 1 else 8
    if plain:
        return DytConfig(1, tile, warps)
    block_c = min(DYT_MAX_BLOCK_C, _next_pow2(max(1, n_cols))) if n_cols is not None else DYT_MAX_BLOCK_C
    return DytConfig(max(1, tile // block_c), block_c, warps)


def vector_width(element_bytes: int) -> int:
    """Elements in one 16-byte access (fp32 4, fp16/bf16 8)."""
    return max(1, 16 // int(element_bytes))


def f32_bits(value: float) -> int:
    """The bit pattern of float32(``value``) as a signed int32."""
    return int(np.asarray(value, np.float32).view(np.int32))


def float_args(*values: float) -> tuple[tuple[int, ...], int]:
    """How float attributes reach the kernels: the int32 bits of each float32 magnitude, never negative,
    and a sign mask (bit k set: value k is negative, -0.0 included), which the kernels take as ``SIGNS``.

    TensorRT's AOT extra arguments are int32 ``SymInt32`` expressions, built as dimension
    expressions (``IExprBuilder.constant``); keeping them non-negative keeps them in the range
    dimensions live in, whatever TensorRT checks. The sign costs at most a second compiled variant.
    """
    bits = tuple(f32_bits(v) & 0x7FFFFFFF for v in values)  # the sign bit cleared: the magnitude's bits
    signs = sum(1 << k for k, v in enumerate(values) if np.signbit(np.float32(v)))
    return bits, signs


# ----------------------------------------------------------------------------- launchers

_MISSING = object()


@contextlib.contextmanager
def restoring_triton_language():
    """Leave ``triton.language`` as it was found after the interpreter ran.

    Triton 3.5's interpreter patches the builtins of ``triton.language``, ``.core``, ``.math``
    and ``tensor`` in place and never restores them (3.6+ scopes its patches), after which
    ``triton.compile`` in the same process fails (``block_argument has no attribute dtype``):
    every interpreted launch here runs inside this guard, so interpreting and compiling can
    share a process on every supported Triton.
    """
    objs = [tl, tl.core, tl.math, tl.core.tensor, getattr(tl.core, "tensor_descriptor_base", None)]
    saved = [(o, dict(vars(o))) for o in objs if o is not None]
    try:
        yield
    finally:
        for o, before in saved:
            now = dict(vars(o))
            for k in now.keys() - before.keys():
                delattr(o, k)
            for k, v in before.items():
                if now.get(k, _MISSING) is not v:
                    setattr(o, k, v)


def _run(name: str, grid: int, args: tuple, constexprs: dict, num_warps: int, device_type: str) -> None:
    if grid == 0:
        return
    if device_type == "cpu":
        with restoring_triton_language():
            interpreted_kernel(name)[(grid,)](*args, **constexprs)
    else:
        jit_kernel(name)[(grid,)](*args, **constexprs, num_warps=num_warps)


def _row_launch(kind, x, n_cols: int, g, scale: float, eps: float, tactic: int, block: int | None,
                num_warps: int | None, rows: int | None = None, *, eps_outside: bool = False, partial: int = 0):
    import torch

    x = x.contiguous()
    y = torch.empty_like(x)
    cfg = row_config(n_cols, tactic)
    if block is not None:
        cfg = RowConfig(block, n_cols <= block, num_warps or cfg.num_warps, rows or (cfg.rows if n_cols <= block
                                                                                     else 1))
    else:
        cfg = RowConfig(cfg.block, cfg.one_block, num_warps or cfg.num_warps, rows or cfg.rows)
    n_rows = x.numel() // n_cols if n_cols else 0
    grid = (n_rows + cfg.rows - 1) // cfg.rows
    (scale_bits, eps_bits), signs = float_args(scale, eps)
    _run("row_norm_fwd", grid, (x, g, n_rows, n_cols, partial if partial else n_cols, scale_bits, eps_bits, y),
         {"KIND": kind, "BLOCK": cfg.block, "ROWS": cfg.rows, "VEC": vector_width(x.element_size()),
          "ONE_BLOCK": cfg.one_block, "SIGNS": signs, "PARTIAL": bool(partial), "EPS_OUTSIDE": bool(eps_outside)},
         cfg.num_warps, x.device.type)
    return y


def _gain(weight, x, what: str):
    weight = weight.contiguous()
    if weight.numel() != x.shape[-1]:
        raise ValueError(f"{what} gain has {weight.numel()} elements for {x.shape[-1]} channels")
    return weight


def rms_norm(x, weight, eps: float = 1e-6, *, eps_outside: bool = False, partial: int = 0, tactic: int = 1,
             block: int | None = None, num_warps: int | None = None, rows: int | None = None):
    """RMSNorm over the last axis of ``x`` with gain ``weight`` [C] (CPU: interpreter; CUDA: compiled).

    bzhangGo/rmsnorm's variants (the canonical op's attributes of the same names): ``eps_outside``
    divides by ``sqrt(mean(s^2)) + eps`` instead of ``sqrt(mean(s^2) + eps)``; ``partial = k``
    (0 < k <= C) takes the statistic s over the first k channels, ``x[..., :k]``, and divides all C.
    """
    c = x.shape[-1]
    if not 0 <= int(partial) <= c:
        raise ValueError(f"RMSNorm partial={partial}: the statistic must cover 1..{c} leading channels (0: all)")
    return _row_launch(RMS.value, x, x.shape[-1], _gain(weight, x, "RMSNorm"), 0.0, eps, tactic, block, num_warps,
                       rows, eps_outside=bool(eps_outside), partial=int(partial))


def crms_norm(x, weight, eps: float = 1e-6, *, tactic: int = 1, block: int | None = None,
              num_warps: int | None = None, rows: int | None = None):
    """CRMSNorm over the last axis (d-1 stored coordinates) with gain ``weight`` [C]."""
    return _row_launch(CRMS.value, x, x.shape[-1], _gain(weight, x, "CRMSNorm"), 0.0, eps, tactic, block, num_warps,
                       rows)


def group_scaling(x, groups: int = 1, eps: float = 1e-5, *, tactic: int = 1, block: int | None = None,
                  num_warps: int | None = None, rows: int | None = None):
    """PowerNorm's GroupScaling: each of ``groups`` contiguous channel groups of the last axis divided by its RMS."""
    c = x.shape[-1]
    if groups < 1 or c % groups:
        raise ValueError(f"GroupScaling: {c} channels are not divisible into {groups} groups")
    return _row_launch(GROUP_RMS.value, x, c // groups, None, 0.0, eps, tactic, block, num_warps, rows)


def scale_norm(x, scale: float, eps: float = 1e-5, *, tactic: int = 1, block: int | None = None,
               num_warps: int | None = None, rows: int | None = None):
    """ScaleNorm over the last axis: ``scale * x / max(||x||_2, eps)``."""
    return _row_launch(SCALE.value, x, x.shape[-1], None, scale, eps, tactic, block, num_warps, rows)


def dyt_view(shape, axis: int, has_param: bool) -> tuple[int, int, int, bool]:
    """(n_rows, n_cols, n_channels, channels on columns) of the 2-D view ``dyt_fwd`` takes of ``shape``.

    Channels last (nothing after the channel axis): [numel / C, C], the channel is the
    column. Otherwise [outer * C, inner], the channel of a row is ``row % C``. Without
    weight and bias: x flat, [1, numel].
    """
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape, dtype=np.int64))
    if not has_param or not shape:
        return 1, numel, 1, True
    pos = axis % len(shape)
    c = shape[pos]
    inner = int(np.prod(shape[pos + 1:], dtype=np.int64))
    if inner == 1:
        return (numel // c if c else 0), c, c, True
    return numel // inner, inner, c, False


def dynamic_tanh(x, alpha: float, weight=None, bias=None, axis: int = -1, *, tactic: int = 1,
                 block: int | None = None, num_warps: int | None = None, rows: int | None = None):
    """DynamicTanh ``weight_c * tanh(alpha * x) + bias_c`` with the channel on ``axis``; weight/bias optional.

    ``block`` / ``rows`` override the tile's columns / rows (tests: partial tiles).
    """
    import torch

    x = x.contiguous()
    y = torch.empty_like(x)
    pos = axis % x.dim() if x.dim() else 0
    c = x.shape[pos] if x.dim() else 1
    for v, what in ((weight, "weight"), (bias, "bias")):
        if v is not None and v.numel() != c:
            raise ValueError(f"DynamicTanh {what} has {v.numel()} elements for {c} channels")
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    has_param = w is not None or b is not None
    n_rows, n_cols, n_channels, on_cols = dyt_view(tuple(x.shape), axis, has_param)
    cfg = dyt_config(n_cols, tactic, plain=not has_param)
    block_c = block or cfg.block_c
    block_r = rows or (cfg.block_r if block is None else max(1, TILE[tactic] // block_c) if has_param else 1)
    grid = ((n_rows + block_r - 1) // block_r) * ((n_cols + block_c - 1) // block_c) if n_rows and n_cols else 0
    (alpha_bits,), signs = float_args(alpha)
    _run("dyt_fwd", grid, (x, w, b, n_rows, n_cols, n_channels, alpha_bits, y),
         {"BLOCK_R": block_r, "BLOCK_C": block_c, "VEC": vector_width(x.element_size()), "HAS_W": w is not None,
          "HAS_B": b is not None, "CH_ON_COLS": on_cols, "SIGNS": signs}, num_warps or cfg.num_warps, x.device.type)
    return y
