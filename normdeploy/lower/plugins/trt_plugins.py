"""normdeploy's kernels as TensorRT Quickly Deployable Plugins with ahead-of-time implementations.

Two layers, so that everything but the last few lines is testable without TensorRT:

1. :func:`build_aot_kernel` (plain Python, needs only triton): for one plugin, I/O dtypes,
   input shape (ints or TensorRT shape expressions), attributes and tactic it compiles the
   kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and
   returns an :class:`AotKernel`: kernel name, PTX, launch grid/block/shared memory and
   the int32 scalar arguments, after :func:`check_launch_abi` has checked the PTX entry
   against TensorRT's calling convention.
   :func:`interpret_aot_launch` runs that kernel under the Triton interpreter with exactly
   those arguments; :mod:`normdeploy.lower.plugins.cuda_launch` launches it on a GPU as
   TensorRT does, without TensorRT.
2. :func:`register_plugins` (needs ``tensorrt``, imported only there): ``register`` (output
   like the input), ``autotune`` (type combinations of :func:`autotune_combinations` and
   the block-size tactics of :data:`normdeploy.lower.plugins.kernels.TACTICS`) and ``aot_impl`` (a thin
   wrapper that converts layer 1's result into ``KernelLaunchParams`` / ``SymIntExprs``).

The launch ABI. TensorRT's AOT launch passes, in this order, one pointer per plugin input,
the ``SymIntExprs`` extra arguments (int32 only), one pointer per output. The kernels
declare exactly that (see :mod:`normdeploy.lower.plugins.kernels`). Triton >= 3.3 appends
hidden pointer parameters to every kernel (global scratch, and from 3.5 profile scratch),
which TensorRT does not pass; TensorRT 10.9..10.13, which normdeploy accepts, is not
documented to pad them (NVIDIA's sample used a Triton without them until 10.14). So
:func:`build_aot_kernel` deletes their declarations by default (``trim_hidden``), after
:func:`check_launch_abi` has proven it safe for that PTX: the compiled metadata says
``global_scratch_size == 0`` and ``profile_scratch_size == 0`` and no instruction of the
entry reads those parameters; a kernel that needs scratch memory is refused
(:class:`ScratchMemoryError`). ``NORMDEPLOY_TRT_KEEP_HIDDEN_PARAMS=1`` keeps them.

Target and ISA (:func:`aot_target`): the GPU that builds the engine, from torch's device
capability (:func:`current_target`); the oldest PTX ISA that architecture needs, because
TensorRT has the PTX JIT-compiled by the driver of the host that *runs* the engine; and
with ``--hardware-compat ampere+`` (:func:`aot_build_options`) portable sm_80 PTX instead
of Triton's arch-specific ``sm_90a``.

Float attributes (eps, alpha, scale) are passed as the int32 bits of their float32
magnitude, never negative, with their signs in a ``SIGNS`` constexpr
(:func:`normdeploy.lower.plugins.kernels.float_args`); one kernel per (dtypes, block
configuration, signs, target) is compiled and cached, whatever the attribute values.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import operator
import os
import re
import shutil
import subprocess
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "NAMESPACE", "PLUGIN_VERSION", "PluginSpec", "PLUGINS", "plugin_attributes",
    "AotKernel", "AbiReport", "KernelPlan", "LaunchAbiError", "ScratchMemoryError", "PtxParam",
    "plan_kernel", "build_aot_kernel", "check_launch_abi", "ptx_entry_params", "trim_hidden_params",
    "interpret_aot_launch", "aot_target", "aot_build_options", "MIN_PTX_ISA", "current_target",
    "autotune_combinations", "resource_usage", "register_plugins", "tensorrt_available",
]

# ----------------------------------------------------------------------------- the contract with the lowering
NAMESPACE = "normdeploy"
PLUGIN_VERSION = "1"


@dataclass(frozen=True)
class PluginSpec:
    """One plugin: its inputs (in order), its attributes (name -> Python type, in order), its kernel.

    ``defaults``: attributes added after the plugin first shipped, with the value that reproduces
    its old behaviour. A node (or a TensorRT field collection) without one of them gets that value,
    so files lowered before it existed still parse and compute what they did. (``tensorrt.plugin``
    refuses default values in the registered signature, so the wrappers fill them in themselves.)
    """

    name: str
    canonical: str
    inputs: tuple[str, ...]
    attributes: tuple[tuple[str, type], ...]
    kernel: str
    math: str
    defaults: tuple[tuple[str, Any], ...] = ()

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.attributes)


RMSNORM = PluginSpec("NormdeployRMSNorm", "RMSNorm", ("x", "g"),
                     (("epsilon", float), ("eps_outside", int), ("partial", int)), "row_norm_fwd",
                     "y = g * x / sqrt(mean(s^2) + epsilon), or with eps_outside = 1 g * x / (sqrt(mean(s^2)) + "
                     "epsilon); s = x[..., :partial] (partial = 0: all of x), last axis, g [C]",
                     (("eps_outside", 0), ("partial", 0)))
CRMSNORM = PluginSpec("NormdeployCRMSNorm", "CRMSNorm", ("x", "g"), (("epsilon", float),), "row_norm_fwd",
                      "y = g * x / sqrt((sum x^2 + (sum x)^2) / (C + 1) + epsilon), last axis, g [C]")
GROUP_SCALING = PluginSpec("NormdeployGroupScaling", "GroupScaling", ("x",), (("groups", int), ("epsilon", float)),
                           "row_norm_fwd",
                           "y = x / sqrt(mean over its group of x^2 + epsilon), groups of C/groups contiguous channels")
SCALENORM = PluginSpec("NormdeployScaleNorm", "ScaleNorm", ("x",), (("scale", float), ("epsilon", float)),
                       "row_norm_fwd", "y = scale * x / max(norm2(x), epsilon), last axis")
DYT = PluginSpec("NormdeployDynamicTanh", "DynamicTanh", ("x", "w", "b"), (("alpha", float), ("axis", int)),
                 "dyt_fwd", "y = w_c * tanh(alpha * x) + b_c, c on axis")
DYT_GAIN = PluginSpec("NormdeployDynamicTanhGain", "DynamicTanh", ("x", "w"), (("alpha", float), ("axis", int)),
                      "dyt_fwd", "y = w_c * tanh(alpha * x), c on axis (bias all zero)")
DYT_PLAIN = PluginSpec("NormdeployDynamicTanhPlain", "DynamicTanh", ("x",), (("alpha", float),), "dyt_fwd",
                       "y = tanh(alpha * x) (weight all one, bias all zero)")

#: every plugin, by op_type / plugin name
PLUGINS: dict[str, PluginSpec] = {p.name: p for p in (RMSNORM, CRMSNORM, GROUP_SCALING, SCALENORM, DYT, DYT_GAIN,
                                                      DYT_PLAIN)}


def plugin_attributes(spec: PluginSpec, values: dict) -> dict:
    """The ONNX attributes of a plugin node: the plugin's fields, typed (those with a default may be left
    out of ``values``), then the parser's own keys."""
    values = {**dict(spec.defaults), **values}
    missing = [a for a in spec.attribute_names if a not in values]
    if missing:
        raise ValueError(f"{spec.name}: missing attribute(s) {missing}")
    attrs: dict = {}
    for name, typ in spec.attributes:
        v = typ(values[name])
        if typ is int and not -(2**31) <= v < 2**31:
            raise ValueError(f"{spec.name}.{name} = {v} does not fit the INT32 plugin field")
        attrs[name] = v
    attrs["plugin_namespace"] = NAMESPACE
    attrs["aot"] = 1
    return attrs


DTYPES = ("fp32", "fp16", "bf16")
#: dynamic shared memory a kernel may ask for without an opt-in attribute on the launch
MAX_DEFAULT_SHARED = 48 * 1024
_POINTER_PARAMS = {"x": "x_ptr", "g": "g_ptr", "w": "w_ptr", "b": "b_ptr"}


class LaunchAbiError(RuntimeError):
    """The compiled kernel cannot be launched the way TensorRT's AOT launch calls it."""


class ScratchMemoryError(LaunchAbiError):
    """The compiled kernel needs Triton scratch memory, which TensorRT's AOT launch does not provide."""


# ----------------------------------------------------------------------------- shapes (ints or TensorRT ShapeExprs)

def _dim(d):
    """An integer dimension (Python or numpy) as int; a shape expression unchanged."""
    try:
        return operator.index(d)
    except TypeError:
        return d


def const_dim(d) -> int | None:
    """``d`` as an int if it is known at build time (an int, or a constant TensorRT ShapeExpr), else None."""
    d = _dim(d)
    if isinstance(d, int):
        return d
    if getattr(d, "is_fake", False):
        return None
    try:
        if d.is_constant:
            return int(d.constant_value())
    except (AttributeError, RuntimeError):
        return None
    return None


def _mul(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if isinstance(a, int):  # ShapeExpr has no __rmul__
        return b if a == 1 else b * a
    return a if (isinstance(b, int) and b == 1) else a * b


def _prod(dims: Sequence) -> Any:
    out: Any = 1
    for d in dims:
        out = _mul(out, d)
    return out


# ----------------------------------------------------------------------------- plan: what to compile, how to launch

@dataclass(frozen=True)
class KernelPlan:
    """A kernel launch in TensorRT's terms, before compilation."""

    kernel: str
    inputs: tuple[str, ...]                  # pointer params, in plugin input order
    extras: tuple[tuple[str, Any], ...]      # (int32 param, value or shape expression)
    outputs: tuple[str, ...]                 # pointer params
    pointer_dtypes: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    grid: Any                                # grid_x (int or shape expression)
    num_warps: int

    @property
    def trt_params(self) -> tuple[str, ...]:
        """The parameters TensorRT supplies, in launch order: inputs, extras, outputs."""
        return (*self.inputs, *(n for n, _ in self.extras), *self.outputs)


#: the row kernel's ``KIND`` per plugin (the numbering of :mod:`normdeploy.lower.plugins.kernels`: RMS, CRMS,
#: GROUP_RMS, SCALE); kept here as ints so that planning imports no triton
ROW_KIND = {"NormdeployRMSNorm": 0, "NormdeployCRMSNorm": 1, "NormdeployGroupScaling": 2, "NormdeployScaleNorm": 3}
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _cdiv(a, b: int):
    """ceil(a / b) for an int or a shape expression ``a`` (ShapeExprs have +, *, //; no cdiv needed)."""
    if isinstance(a, int):
        return -(-a // b)
    return a if b == 1 else (a + (b - 1)) // b


def plan_kernel(plugin: str, io_dtypes: Sequence[str], x_shape: Sequence, attrs: dict, tactic: int = 1) -> KernelPlan:
    """Kernel, constexprs, scalar arguments and grid for one plugin layer.

    ``io_dtypes`` holds one of ``fp32|fp16|bf16`` per plugin input, then the output;
    ``x_shape`` is the first input's shape (ints, or TensorRT shape expressions for
    dynamic dimensions); ``attrs`` the plugin attributes. Float attributes become the int32
    bits of their magnitude (never negative) and a ``SIGNS`` constexpr
    (:func:`normdeploy.lower.plugins.kernels.float_args`).
    """
    from .kernels import dyt_config, float_args, row_config, vector_width

    spec = PLUGINS[plugin]
    io_dtypes = tuple(io_dtypes)
    if len(io_dtypes) != len(spec.inputs) + 1:
        raise ValueError(f"{plugin}: {len(io_dtypes)} I/O dtypes for {len(spec.inputs)} inputs and 1 output")
    for dt in io_dtypes:
        if dt not in DTYPES:
            raise ValueError(f"{plugin}: unsupported dtype {dt!r}; expected one of {DTYPES}")
    if io_dtypes[0] != io_dtypes[-1]:
        raise ValueError(f"{plugin}: output dtype {io_dtypes[-1]} differs from input dtype {io_dtypes[0]}")
    x_shape = tuple(_dim(d) for d in x_shape)
    rank = len(x_shape)
    if rank == 0:
        raise ValueError(f"{plugin}: input must have at least one axis")
    pointers = tuple((_POINTER_PARAMS[n], dt) for n, dt in zip(spec.inputs, io_dtypes)) + (("y_ptr", io_dtypes[-1]),)
    inputs = tuple(_POINTER_PARAMS[n] for n in spec.inputs)
    vec = vector_width(_ELEMENT_BYTES[io_dtypes[0]])

    if spec.kernel == "row_norm_fwd":
        kind = ROW_KIND[plugin]
        c = x_shape[-1]
        rows = _prod(x_shape[:-1])
        n_cols = c
        if kind == ROW_KIND["NormdeployGroupScaling"]:
            groups = int(attrs["groups"])
            cc = const_dim(c)
            if groups < 1 or (cc is not None and cc % groups):
                raise ValueError(f"{plugin}: {cc} channels are not divisible into {groups} groups")
            if groups != 1:
                n_cols = c // groups
                rows = _mul(rows, groups)
        eps_outside, partial = 0, 0
        if kind == ROW_KIND["NormdeployRMSNorm"]:  # bzhangGo/rmsnorm's variants (defaults: the plain RMSNorm)
            eps_outside, partial = int(attrs.get("eps_outside", 0)), int(attrs.get("partial", 0))
            cc = const_dim(c)
            if eps_outside not in (0, 1):
                raise ValueError(f"{plugin}: eps_outside must be 0 or 1, not {eps_outside}")
            if partial < 0 or (cc is not None and partial > cc):
                raise ValueError(f"{plugin}: partial = {partial}: the statistic must cover 1..{cc} leading "
                                 "channels (0: all)")
        cfg = row_config(const_dim(n_cols), tactic)
        scale = float(attrs["scale"]) if kind == ROW_KIND["NormdeployScaleNorm"] else 1.0
        (scale_bits, eps_bits), signs = float_args(scale, float(attrs["epsilon"]))
        extras: list[tuple[str, Any]] = [("n_rows", rows), ("n_cols", n_cols)]
        constexprs: list[tuple[str, Any]] = [("KIND", kind), ("BLOCK", cfg.block), ("ROWS", cfg.rows), ("VEC", vec),
                                             ("ONE_BLOCK", cfg.one_block), ("SIGNS", signs),
                                             ("PARTIAL", partial > 0), ("EPS_OUTSIDE", eps_outside == 1)]
        if partial:  # one compiled kernel serves every k: n_stat is a run-time int32 (after n_cols)
            extras.append(("n_stat", partial))
        else:
            constexprs.append(("n_stat", 0))
        if kind == ROW_KIND["NormdeployScaleNorm"]:
            extras.append(("scale_bits", scale_bits))
        else:
            constexprs.append(("scale_bits", 0))
        if "g" not in spec.inputs:
            constexprs.append(("g_ptr", None))
        extras.append(("eps_bits", eps_bits))
        return KernelPlan(spec.kernel, inputs, tuple(extras), ("y_ptr",), pointers, tuple(constexprs),
                          _cdiv(rows, cfg.rows), cfg.num_warps)

    # DynamicTanh: a 2-D view of x (kernels.dyt_view), tiles of BLOCK_R x BLOCK_C
    axis = int(attrs.get("axis", -1))
    if not -rank <= axis < rank:
        raise ValueError(f"{plugin}: axis {axis} out of range for rank {rank}")
    pos = axis % rank
    has_w, has_b = "w" in spec.inputs, "b" in spec.inputs
    numel = _prod(x_shape)
    inner = _prod(x_shape[pos + 1:])
    (alpha_bits,), signs = float_args(float(attrs["alpha"]))
    constexprs = [("HAS_W", has_w), ("HAS_B", has_b), ("VEC", vec), ("SIGNS", signs)]
    if not has_w:
        constexprs.append(("w_ptr", None))
    if not has_b:
        constexprs.append(("b_ptr", None))
    extras = []
    if not (has_w or has_b):  # x flat: [1, numel]
        cfg = dyt_config(None, tactic, plain=True)
        n_rows, n_cols = 1, numel
        constexprs += [("n_rows", 1), ("n_channels", 1), ("CH_ON_COLS", True)]
        extras.append(("n_cols", numel))
    elif const_dim(inner) == 1:  # channels last: [numel / C, C], the channel is the column
        n_cols = x_shape[pos]
        n_rows = _prod(x_shape[:pos])
        cfg = dyt_config(const_dim(n_cols), tactic)
        constexprs += [("n_channels", 1), ("CH_ON_COLS", True)]
        extras += [("n_rows", n_rows), ("n_cols", n_cols)]
    else:  # [outer * C, inner], the channel of a row is row % C
        n_rows, n_cols = _prod(x_shape[:pos + 1]), inner
        cfg = dyt_config(const_dim(n_cols), tactic)
        constexprs.append(("CH_ON_COLS", False))
        extras += [("n_rows", n_rows), ("n_cols", n_cols), ("n_channels", x_shape[pos])]
    extras.append(("alpha_bits", alpha_bits))
    constexprs += [("BLOCK_R", cfg.block_r), ("BLOCK_C", cfg.block_c)]
    grid = _mul(_cdiv(n_rows, cfg.block_r), _cdiv(n_cols, cfg.block_c))
    return KernelPlan("dyt_fwd", inputs, tuple(extras), ("y_ptr",), pointers, tuple(constexprs), grid, cfg.num_warps)


# ----------------------------------------------------------------------------- compile

def _gpu_target(target):
    from triton.backends.compiler import GPUTarget

    if isinstance(target, int):
        return GPUTarget("cuda", target, 32)
    if isinstance(target, str):  # "sm_90", "90"
        return GPUTarget("cuda", int(target.removeprefix("sm_").rstrip("a")), 32)
    return target


@functools.lru_cache(maxsize=256)
def _compile(kernel: str, signature: tuple, constexprs: tuple, attrs: tuple, arch: int, num_warps: int,
             ptx_version: int | None):
    import triton
    from triton.compiler import ASTSource

    from .kernels import jit_kernel

    # attrs: ((index,), ((name, value), ...)) pairs, hashable for the cache; ASTSource wants lists
    src = ASTSource(jit_kernel(kernel), dict(signature), dict(constexprs), {k: [list(x) for x in v] for k, v in attrs})
    options: dict[str, Any] = {"num_warps": num_warps, "enable_fp_fusion": True}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    return triton.compile(src, target=_gpu_target(arch), options=options)


def compile_plan(plan: KernelPlan, target, *, ptx_version: int | None = None):
    """``triton.compile`` of ``plan`` for ``target`` (an sm number such as 90, or a GPUTarget); cached.

    No alignment is assumed at compile time: the kernels test their pointers and row length
    at run time and take 16-byte vector accesses where they allow it (see ``kernels.py``).
    """
    from .kernels import jit_kernel

    fn = jit_kernel(plan.kernel)
    ptr = dict(plan.pointer_dtypes)
    extra_names = {n for n, _ in plan.extras}
    const = dict(plan.constexprs)
    signature = []
    for a in fn.arg_names:
        if a in const:
            signature.append((a, "constexpr"))
        elif a in ptr:
            signature.append((a, "*" + ptr[a]))
        elif a in extra_names:
            signature.append((a, "i32"))
        else:
            raise LaunchAbiError(f"{plan.kernel}: parameter {a} is neither an I/O pointer, an extra nor a constexpr")
    runtime = [a for a, t in signature if t != "constexpr"]
    if tuple(runtime) != plan.trt_params:
        raise LaunchAbiError(f"{plan.kernel}: runtime parameters {runtime} are not TensorRT's launch order "
                             f"{list(plan.trt_params)} (inputs, extras, outputs)")
    arch = _gpu_target(target).arch
    return _compile(plan.kernel, tuple(signature), tuple(sorted(const.items(), key=lambda kv: kv[0])), (), arch,
                    plan.num_warps, ptx_version)


# ----------------------------------------------------------------------------- PTX entry inspection

@dataclass(frozen=True)
class PtxParam:
    name: str
    decl: str  # e.g. ".u64 .ptr .global .align 1", ".u32"

    @property
    def is_pointer(self) -> bool:
        return self.decl.startswith(".u64") or self.decl.startswith(".b64")

    @property
    def is_int32(self) -> bool:
        return self.decl.split()[0] in (".u32", ".s32", ".b32")


def _entry_span(ptx: str, kernel_name: str) -> tuple[int, int, int]:
    """(start of '.entry', index of '(' , index of the closing ')') of ``kernel_name``'s entry."""
    m = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\(", ptx)
    if not m:
        raise LaunchAbiError(f"kernel {kernel_name!r} has no .entry in the PTX")
    close = ptx.index(")", m.end())
    return m.start(), m.end() - 1, close


def ptx_entry_params(ptx: str, kernel_name: str) -> list[PtxParam]:
    """The ``.param`` declarations of ``kernel_name``'s ``.entry``, in order."""
    _, open_, close = _entry_span(ptx, kernel_name)
    params = []
    for decl in ptx[open_ + 1:close].split(","):
        decl = decl.strip()
        if not decl:
            continue
        m = re.fullmatch(r"\.param\s+(.*?)\s+(\S+)", decl, flags=re.S)
        if not m:
            raise LaunchAbiError(f"unexpected parameter declaration {decl!r} in {kernel_name}")
        params.append(PtxParam(m.group(2), " ".join(m.group(1).split())))
    return params


def _entry_body(ptx: str, kernel_name: str) -> str:
    """The PTX from the end of the entry's parameter list to the end of its body."""
    _, _, close = _entry_span(ptx, kernel_name)
    nxt = re.search(r"\.entry\s", ptx[close:])
    return ptx[close:close + nxt.start()] if nxt else ptx[close:]


@dataclass(frozen=True)
class AbiReport:
    entry_params: tuple[PtxParam, ...]
    trt_params: tuple[str, ...]           # what TensorRT supplies, in order
    hidden: tuple[PtxParam, ...]          # entry parameters beyond TensorRT's list
    reqntid: int | None                   # the block size the PTX demands, if it says

    @property
    def count(self) -> int:
        return len(self.entry_params)


def check_launch_abi(ptx: str, kernel_name: str, metadata, trt_params: Sequence[str],
                     extra_params: Sequence[str] = ()) -> AbiReport:
    """Check that TensorRT's AOT launch of ``trt_params`` fits the PTX entry of ``kernel_name``.

    ``trt_params`` are the parameters TensorRT supplies in order (inputs, extras, outputs);
    those named in ``extra_params`` are int32 scalars, the rest pointers. Every further
    entry parameter must be a pointer the kernel never reads (Triton's global and profile
    scratch), and the compiled ``metadata`` must say no scratch memory is needed; otherwise
    :class:`ScratchMemoryError`. Any other mismatch raises :class:`LaunchAbiError`.
    """
    params = ptx_entry_params(ptx, kernel_name)
    n = len(trt_params)
    if len(params) < n:
        raise LaunchAbiError(f"{kernel_name}: PTX entry has {len(params)} parameters, TensorRT passes {n}")
    extras = set(extra_params)
    for want, got in zip(trt_params, params[:n]):
        ok = got.is_int32 if want in extras else got.is_pointer
        if not ok:
            kind = "int32" if want in extras else "pointer"
            raise LaunchAbiError(f"{kernel_name}: TensorRT passes {kind} {want} where the PTX declares "
                                 f"{got.decl} {got.name}")
    gsz = int(getattr(metadata, "global_scratch_size", 0) or 0)
    psz = int(getattr(metadata, "profile_scratch_size", 0) or 0)
    if gsz or psz:
        raise ScratchMemoryError(f"{kernel_name} needs Triton scratch memory (global {gsz} B, profile {psz} B) "
                                 "that TensorRT's AOT launch does not allocate; refusing it")
    hidden = tuple(params[n:])
    body = _entry_body(ptx, kernel_name)
    for p in hidden:
        if not p.is_pointer:
            raise LaunchAbiError(f"{kernel_name}: parameter {p.name} ({p.decl}) beyond TensorRT's list "
                                 "is not a pointer")
        if re.search(re.escape(p.name) + r"\b", body):
            raise ScratchMemoryError(f"{kernel_name} reads {p.name}, a parameter TensorRT does not pass; refusing it")
    m = re.search(r"\.reqntid\s+(\d+)", ptx[_entry_span(ptx, kernel_name)[2]:][:200])
    return AbiReport(tuple(params), tuple(trt_params), hidden, int(m.group(1)) if m else None)


def trim_hidden_params(ptx: str, kernel_name: str, keep: int) -> str:
    """``ptx`` with the entry's parameters after the first ``keep`` deleted (they must be unused)."""
    _, open_, close = _entry_span(ptx, kernel_name)
    params = ptx_entry_params(ptx, kernel_name)
    body = _entry_body(ptx, kernel_name)
    for p in params[keep:]:
        if re.search(re.escape(p.name) + r"\b", body):
            raise LaunchAbiError(f"{kernel_name}: cannot drop {p.name}, the kernel reads it")
    decls = [d.strip() for d in ptx[open_ + 1:close].split(",") if d.strip()][:keep]
    return ptx[:open_ + 1] + "\n\t" + ",\n\t".join(decls) + "\n" + ptx[close:]


# ----------------------------------------------------------------------------- the AOT kernel

@dataclass(frozen=True)
class AotKernel:
    """What ``aot_impl`` hands TensorRT, plus what it was derived from (for checks and reports)."""

    plugin: str
    kernel_name: str
    ptx: str
    grid: tuple                       # (grid_x, 1, 1); grid_x an int or a shape expression
    block: tuple[int, int, int]       # (num_warps * 32, 1, 1)
    shared_mem: int                   # bytes of dynamic shared memory, from the compiled metadata
    extra_args: tuple[tuple[str, Any], ...]
    plan: KernelPlan
    arch: int
    abi: AbiReport
    metadata: Any = dataclasses.field(repr=False, compare=False)
    cubin: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def ptx_version(self) -> str | None:
        m = re.search(r"^\s*\.version\s+(\d+\.\d+)", self.ptx, flags=re.M)
        return m.group(1) if m else None


#: the oldest PTX ISA to emit per compute capability: the ISA the architecture first appeared in, but at
#: least 7.8 (CUDA 11.8, the oldest driver TensorRT 10 runs on; Triton 3.8 writes ``::cta`` state-space
#: qualifiers, which need 7.8). Triton names cc >= 9.0 with the arch-specific suffix ("sm_90a"), which
#: needs ISA 8.0 (CUDA 12.0); sm_100a / 101a / 103a / 120a / 121a need 8.6 / 8.6 / 8.8 / 8.7 / 8.8.
MIN_PTX_ISA = {80: 78, 86: 78, 87: 78, 89: 78, 90: 80, 100: 86, 101: 86, 103: 88, 120: 87, 121: 88}
#: the architecture of portable kernels (``--hardware-compat ampere+``): sm_80 PTX JITs on every later GPU
PORTABLE_ARCH = 80


def aot_target(build_arch: int, portable: bool = False) -> tuple[int, int | None]:
    """(architecture, PTX ISA) to compile for, given the GPU the engine is built on.

    ``portable`` (an engine for Ampere and later): plain sm_80 PTX, which the driver of any
    later GPU JITs (Triton's sm_90 PTX is ``.target sm_90a``, arch-specific: it runs on cc 9.0
    only). The ISA is the oldest the target needs (:data:`MIN_PTX_ISA`), not the newest the
    build host's driver or Triton's ptxas knows: TensorRT JITs the PTX with the driver of the
    host that *runs* the engine, which may be older than the build host's. None (an
    architecture not in the table): Triton's default, capped by the local driver at build.
    """
    arch = PORTABLE_ARCH if portable else int(build_arch)
    return arch, MIN_PTX_ISA.get(arch)


def build_aot_kernel(plugin: str, io_dtypes: Sequence[str], x_shape: Sequence, attrs: dict, tactic: int = 1, *,
                     target, ptx_version: int | None = None, trim_hidden: bool = True) -> AotKernel:
    """Compile ``plugin``'s kernel for ``target`` and return what its ``aot_impl`` returns to TensorRT.

    Arguments as for :func:`plan_kernel`; ``target`` is an sm number (80, 86, 89, 90...) or a
    ``GPUTarget``; ``ptx_version`` is the PTX ISA to emit (e.g. 80; see :func:`aot_target`).
    ``trim_hidden`` (the default) deletes the declarations of Triton's hidden scratch
    parameters, once :func:`check_launch_abi` has proven them unused, so that the PTX entry
    declares exactly the parameters TensorRT's launch passes (TensorRT before 10.14, whose
    sample used a Triton without hidden parameters, is not documented to pad missing
    arguments). Raises :class:`ScratchMemoryError` / :class:`LaunchAbiError` when the compiled
    kernel does not fit TensorRT's launch.
    """
    plan = plan_kernel(plugin, io_dtypes, x_shape, attrs, tactic)
    compiled = compile_plan(plan, target, ptx_version=ptx_version)
    md = compiled.metadata
    name, ptx = md.name, compiled.asm["ptx"]
    abi = check_launch_abi(ptx, name, md, plan.trt_params, [n for n, _ in plan.extras])
    block = md.num_warps * md.warp_size if hasattr(md, "warp_size") else md.num_warps * 32
    if abi.reqntid is not None and abi.reqntid != block:
        raise LaunchAbiError(f"{name}: PTX requires {abi.reqntid} threads per block, launch would use {block}")
    if md.shared > MAX_DEFAULT_SHARED:
        raise LaunchAbiError(f"{name}: needs {md.shared} B of shared memory, more than {MAX_DEFAULT_SHARED} B")
    special = (getattr(md, "num_ctas", 1) != 1, getattr(md, "launch_cooperative_grid", False),
               getattr(md, "launch_pdl", False))
    if any(special):
        raise LaunchAbiError(f"{name}: needs a cluster, cooperative or PDL launch, which TensorRT's AOT launch "
                             "does not do")
    if trim_hidden and abi.hidden:
        ptx = trim_hidden_params(ptx, name, len(plan.trt_params))
        abi = check_launch_abi(ptx, name, md, plan.trt_params, [n for n, _ in plan.extras])
    return AotKernel(plugin, name, ptx, (plan.grid, 1, 1), (block, 1, 1), int(md.shared), plan.extras, plan,
                     _gpu_target(target).arch, abi, md, compiled.asm.get("cubin"))


def interpret_aot_launch(aot: AotKernel | KernelPlan, tensors: Sequence) -> None:
    """Run the kernel of ``aot`` under the Triton interpreter exactly as TensorRT's AOT launch would call it.

    ``tensors``: one CPU torch tensor per plugin input, then the output (written in place).
    The arguments are the plan's: the pointers in order, the int32 extras (their values as
    TensorRT would evaluate them; shapes must be concrete here), the constexprs it was
    compiled with, and its grid. So the argument encoding itself (row counts, float bits,
    signs) is checked on CPU, not just the kernels' math.
    """
    from .kernels import interpreted_kernel, restoring_triton_language

    plan = aot.plan if isinstance(aot, AotKernel) else aot
    names = plan.inputs + plan.outputs
    if len(tensors) != len(names):
        raise ValueError(f"{plan.kernel}: {len(tensors)} tensors for {len(names)} pointers")
    values = dict(zip(names, tensors))
    for n, v in plan.extras:
        v = const_dim(v)
        if v is None:
            raise ValueError(f"{plan.kernel}: extra {n} is not a concrete integer")
        if not -(2**31) <= v < 2**31:
            raise LaunchAbiError(f"{plan.kernel}: extra {n} = {v} does not fit an int32 SymInt32")
        values[n] = v
    grid = const_dim(plan.grid)
    if grid is None:
        raise ValueError(f"{plan.kernel}: grid {plan.grid!r} is not concrete")
    if grid:
        with restoring_triton_language():
            interpreted_kernel(plan.kernel)[(grid,)](**values, **dict(plan.constexprs))


# ----------------------------------------------------------------------------- autotune

def autotune_combinations(spec: PluginSpec | str) -> list[str]:
    """The ``AutoTuneCombination`` type strings of a plugin (positions: inputs, then the output).

    Everything in one dtype (fp32, fp16 or bf16), or fp16/bf16 activations with fp32
    parameters (gain, weight, bias).
    """
    spec = PLUGINS[spec] if isinstance(spec, str) else spec
    n_param = len(spec.inputs) - 1
    combos = [", ".join(["FP32|FP16|BF16"] * (n_param + 2))]
    if n_param:
        combos.append(", ".join(["FP16|BF16"] + ["FP32|FP32"] * n_param + ["FP16|BF16"]))
    return combos


_TRT_TYPE = {"FP32": "fp32", "FP16": "fp16", "BF16": "bf16"}


def expand_combination(combo: str) -> list[tuple[str, ...]]:
    """The dtype tuples a ``|``-only (dependent) combination string stands for, as :func:`plan_kernel` dtypes."""
    cols = [[_TRT_TYPE[t.strip()] for t in pos.split("|")] for pos in combo.split(",")]
    n = max(len(c) for c in cols)
    if any(len(c) not in (1, n) for c in cols):
        raise ValueError(f"illegal dependent lengths in {combo!r}")
    return [tuple(c[i] if len(c) > 1 else c[0] for c in cols) for i in range(n)]


# ----------------------------------------------------------------------------- compiler-reported resources

def _triton_ptxas(arch: int):
    """The ptxas Triton itself assembles ``arch`` with (3.5/3.6: one ptxas; 3.7+: a newer one for sm_90 and up)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(arch)
    except TypeError:  # Triton < 3.7: get_ptxas() takes no architecture
        return get_ptxas()


def _ptxas(arch: int) -> str | None:
    try:
        return _triton_ptxas(arch).path
    except Exception:  # noqa: BLE001 - triton internals moved
        return shutil.which("ptxas")


def _cuobjdump() -> str | None:
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(p) if p.exists() else shutil.which("cuobjdump")
    except Exception:  # noqa: BLE001
        return shutil.which("cuobjdump")


def ptxas_info(ptx: str, arch: int) -> dict:
    """``ptxas -v`` on ``ptx`` for its own ``.target``: registers, spills, stack, static shared memory, barriers."""
    exe = _ptxas(arch)
    if exe is None:
        raise FileNotFoundError("no ptxas (expected under triton/backends/nvidia/bin)")
    m = re.search(r"^\s*\.target\s+(\S+)", ptx, flags=re.M)
    gpu = m.group(1) if m else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([exe, "-v", "--gpu-name", gpu, str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"ptxas failed for {gpu}: {r.stderr.strip()}")
    text = r.stdout + r.stderr

    def num(pattern: str) -> int:
        mm = re.search(pattern, text)
        return int(mm.group(1)) if mm else 0

    return {"ptxas": Path(exe).name, "gpu_name": gpu, "registers": num(r"Used (\d+) registers"),
            "spill_stores": num(r"(\d+) bytes spill stores"), "spill_loads": num(r"(\d+) bytes spill loads"),
            "stack": num(r"(\d+) bytes stack frame"), "static_smem": num(r"(\d+) bytes smem"),
            "barriers": num(r"used (\d+) barriers"), "log": text.strip()}


def cubin_resources(cubin: bytes, kernel_name: str) -> dict:
    """``cuobjdump --dump-resource-usage`` on the cubin Triton built: REG, SHARED, LOCAL, STACK."""
    exe = _cuobjdump()
    if exe is None:
        raise FileNotFoundError("no cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(cubin)
        r = subprocess.run([exe, "--dump-resource-usage", str(p)], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(r.stderr.strip())
    m = re.search(r"Function " + re.escape(kernel_name) + r":\s*\n\s*(.*)", r.stdout)
    if not m:
        raise RuntimeError(f"no resource line for {kernel_name} in cuobjdump output")
    return {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(1))}


def resource_usage(aot: AotKernel) -> dict:
    """Registers and shared memory of an AOT kernel as the compiler reports them (no GPU driver needed).

    ``dynamic_smem`` is Triton's metadata (what the launch requests); registers, spills and
    static shared memory come from ``ptxas -v`` on the returned PTX, cross-checked with
    ``cuobjdump --dump-resource-usage`` on the cubin Triton produced.
    """
    info = ptxas_info(aot.ptx, aot.arch)
    out = {k: info[k] for k in ("ptxas", "gpu_name", "registers", "spill_stores", "spill_loads", "stack",
                                 "static_smem", "barriers")}
    out["dynamic_smem"] = aot.shared_mem
    if aot.cubin:
        try:
            out["cubin"] = cubin_resources(aot.cubin, aot.kernel_name)
        except (FileNotFoundError, RuntimeError) as e:
            out["cubin"] = {"error": str(e)}
    return out


# ----------------------------------------------------------------------------- TensorRT registration (thin)

def tensorrt_available() -> bool:
    try:
        import tensorrt.plugin  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (missing libnvinfer)
        return False
    return True


def current_target():
    """The GPUTarget of the current CUDA device, from torch's device capability.

    Not ``triton.runtime.driver.active``: that compiles a C helper module at run time (it needs
    a C compiler and Python's headers on the host that builds engines); torch answers the same
    question from the CUDA runtime it already loaded.
    """
    import torch
    from triton.backends.compiler import GPUTarget

    if not torch.cuda.is_available():
        raise RuntimeError("normdeploy's AOT plugins are compiled for the GPU that builds the engine, and torch "
                           "sees no CUDA device")
    major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
    return GPUTarget("cuda", 10 * int(major) + int(minor), 32)


def driver_ptx_version() -> int | None:
    """Highest PTX ISA the installed CUDA driver can JIT (Triton's numbering, e.g. 84), or None if unknown."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
        from triton.backends.nvidia.compiler import ptx_get_version

        return int(ptx_get_version(f"{v.value // 1000}.{(v.value % 1000) // 10}"))
    except Exception:  # noqa: BLE001
        return None


def _ptx_cap(arch: int) -> int | None:
    """Triton's default ISA for ``arch``, capped by the local driver (architectures :data:`MIN_PTX_ISA` lacks)."""
    drv = driver_ptx_version()
    if drv is None:
        return None
    try:
        from triton.backends.nvidia.compiler import ptx_get_version

        default = int(ptx_get_version(_triton_ptxas(arch).version))
    except Exception:  # noqa: BLE001
        return drv
    return min(default, drv)


#: set to 1 to keep the declarations of Triton's unused hidden scratch parameters in the PTX entry
#: (by default they are deleted, so that the entry declares exactly what TensorRT passes)
ENV_KEEP_HIDDEN = "NORMDEPLOY_TRT_KEEP_HIDDEN_PARAMS"
#: set to 1 to compile portable sm_80 kernels whatever the GPU (what --hardware-compat ampere+ does)
ENV_PORTABLE = "NORMDEPLOY_TRT_PORTABLE_PTX"

_BUILD_OPTIONS: dict[str, Any] = {"portable": None}
#: every kernel ``aot_impl`` returned while :func:`aot_build_options` was active (for the build report)
BUILT_KERNELS: list[dict] = []


@contextlib.contextmanager
def aot_build_options(hardware_compat: str = "none"):
    """What the next engine build needs from ``aot_impl``, which cannot see the builder config.

    ``hardware_compat="ampere+"``: portable sm_80 PTX (:func:`aot_target`). Records a summary
    of each kernel returned in :data:`BUILT_KERNELS` (cleared on entry).
    """
    old = dict(_BUILD_OPTIONS)
    _BUILD_OPTIONS["portable"] = hardware_compat == "ampere+"
    BUILT_KERNELS.clear()
    try:
        yield BUILT_KERNELS
    finally:
        _BUILD_OPTIONS.clear()
        _BUILD_OPTIONS.update(old)


def _portable() -> bool:
    if _BUILD_OPTIONS["portable"] is not None:
        return bool(_BUILD_OPTIONS["portable"])
    return os.environ.get(ENV_PORTABLE) == "1"


_TRT_DTYPES: dict | None = None


def _dtype_name(trt_dtype) -> str:
    global _TRT_DTYPES
    if _TRT_DTYPES is None:
        import tensorrt as trt

        _TRT_DTYPES = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    try:
        return _TRT_DTYPES[trt_dtype]
    except KeyError:
        raise ValueError(f"normdeploy plugins take fp32, fp16 or bf16 tensors, not {trt_dtype}") from None


def aot_impl_result(spec: PluginSpec, descs: Sequence, attrs: dict, outputs: Sequence, tactic: int, trtp):
    """The body of every ``aot_impl``: TensorRT descriptors in, (name, PTX, launch params, extra args) out."""
    from .kernels import TACTICS

    dtypes = [_dtype_name(d.dtype) for d in (*descs, *outputs)]
    arch, isa = aot_target(current_target().arch, _portable())
    if isa is None:
        isa = _ptx_cap(arch)
    drv = driver_ptx_version()
    if isa is not None and drv is not None and drv < isa:
        raise LaunchAbiError(f"the CUDA driver here JITs PTX ISA up to {drv / 10:.1f}, sm_{arch} kernels need "
                             f"{isa / 10:.1f}; update the NVIDIA driver")
    aot = build_aot_kernel(spec.name, dtypes, tuple(descs[0].shape_expr), attrs,
                           tactic if tactic in TACTICS else TACTICS[0], target=arch, ptx_version=isa,
                           trim_hidden=os.environ.get(ENV_KEEP_HIDDEN) != "1")
    BUILT_KERNELS.append({"plugin": spec.name, "kernel": aot.kernel_name, "target": re.search(
        r"^\s*\.target\s+(\S+)", aot.ptx, flags=re.M).group(1), "ptx_isa": aot.ptx_version,
        "params": aot.abi.count, "trt_params": len(aot.plan.trt_params), "block": aot.block[0],
        "shared_mem": aot.shared_mem, "tactic": tactic})
    launch = trtp.KernelLaunchParams()
    launch.grid_x = aot.grid[0] if isinstance(aot.grid[0], int) else trtp.SymInt32(aot.grid[0])
    launch.block_x = aot.block[0]
    launch.shared_mem = aot.shared_mem
    extra = trtp.SymIntExprs(len(aot.extra_args))
    for i, (_, value) in enumerate(aot.extra_args):
        extra[i] = trtp.SymInt32(value)
    return aot.kernel_name, aot.ptx, launch, extra


def _function(name: str, params: list[tuple[str, Any]], returns: Any, body, defaults: dict | None = None) -> Any:
    """A function with an explicit signature (``tensorrt.plugin`` validates parameter names and annotations).

    ``defaults``: parameters a caller may leave out (a plugin field missing from an older file); they are
    not in the signature, which ``tensorrt.plugin`` requires free of default values."""
    sig = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a)
                             for p, a in params], return_annotation=returns)
    defaults = dict(defaults or {})

    def fn(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs).arguments
        missing = [p for p in sig.parameters if p not in bound and p not in defaults]
        if missing:
            raise TypeError(f"{name}() missing argument(s) {missing}")
        return body(**{**defaults, **bound})

    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = sig
    fn.__annotations__ = {**{p: a for p, a in params}, "return": returns}
    return fn


def plugin_functions(spec: PluginSpec, trtp) -> dict[str, Any]:
    """The ``register``, ``autotune`` and ``aot_impl`` functions of one plugin, for ``trtp`` (``tensorrt.plugin``)."""
    td = trtp.TensorDesc
    tensors = [(n, td) for n in spec.inputs]
    attrs = list(spec.attributes)
    outputs = ("outputs", typing.Tuple[td])
    tactic = ("tactic", int)
    ret = typing.Tuple[typing.Union[str, bytes], typing.Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]
    attr_names = spec.attribute_names

    def register_body(**kw):
        return kw[spec.inputs[0]].like()

    def autotune_body(**kw):
        from .kernels import TACTICS

        return [trtp.AutoTuneCombination(c, "LINEAR", list(TACTICS)) for c in autotune_combinations(spec)]

    def aot_body(**kw):
        return aot_impl_result(spec, [kw[n] for n in spec.inputs], {a: kw[a] for a in attr_names}, kw["outputs"],
                               kw["tactic"], trtp)

    stem = spec.name[len("Normdeploy"):].lower()
    defaults = dict(spec.defaults)
    return {
        "register": _function(f"{stem}_desc", tensors + attrs, td, register_body, defaults),
        "autotune": _function(f"{stem}_autotune", tensors + attrs + [outputs],
                              typing.List[trtp.AutoTuneCombination], autotune_body, defaults),
        "aot_impl": _function(f"{stem}_aot_impl", tensors + attrs + [outputs, tactic], ret, aot_body, defaults),
    }


_REGISTERED: list[str] = []


def register_plugins(trtp=None) -> list[str]:
    """Register every normdeploy plugin with TensorRT (idempotent); returns the plugin ids.

    Call before parsing an ONNX file holding plugin nodes. ``trtp`` defaults to
    ``tensorrt.plugin``; raises ImportError with a clear message if TensorRT is absent.
    """
    if trtp is None:
        if _REGISTERED:
            return list(_REGISTERED)
        try:
            import tensorrt.plugin as trtp
        except ImportError as e:
            raise ImportError("normdeploy's TensorRT plugins need the tensorrt package (10.9 or newer, "
                              f"for tensorrt.plugin.aot_impl): {e}") from e
        track = True
    else:
        track = False
    ids = []
    for spec in PLUGINS.values():
        fns = plugin_functions(spec, trtp)
        trtp.register(spec.plugin_id)(fns["register"])
        trtp.autotune(spec.plugin_id)(fns["autotune"])
        trtp.aot_impl(spec.plugin_id)(fns["aot_impl"])
        ids.append(spec.plugin_id)
    if track:
        _REGISTERED.extend(ids)
    return ids

