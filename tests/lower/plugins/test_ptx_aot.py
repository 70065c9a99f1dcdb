"""The AOT path without a GPU: every plugin kernel compiled to PTX and checked against TensorRT's launch.

Matrix (to keep compile time down): every plugin for sm_80, sm_86, sm_89 and sm_90 in fp16;
fp32 and bf16 for sm_90 only; the two-pass (long or unknown row) variants, tactic 2 and
mixed precision on one arch each.

For each PTX ``aot_impl`` would return: the kernel name is the ``.entry``; block = num_warps
* 32 = the PTX's ``.reqntid``; shared memory = the compiled metadata's; the ``.param``
list is exactly TensorRT's (inputs, int32 extras, outputs): Triton's hidden scratch pointers
are deleted by default, after the check that the kernel never reads them and that the
metadata reports no scratch; every int32 extra is non-negative; the PTX targets the oldest
ISA of its architecture; arithmetic is fp32 whatever the I/O dtype; the kernel, launched
under the interpreter with exactly the arguments TensorRT would pass, computes the plugin's math.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import types
import typing

import numpy as np
import pytest
import triton.language as tl

from normdeploy.lower.plugins import trt_plugins as T
from normdeploy.lower.plugins.kernels import f32_bits
from normdeploy.lower.plugins.trt_plugins import PLUGINS
from tests.conftest import ROOT

ARCHS = (80, 86, 89, 90)
SHAPE = (2, 7, 768)
ATTRS = {"epsilon": 1e-5, "groups": 4, "scale": 27.712812921102035, "alpha": 0.5, "axis": -1, "eps_outside": 0,
         "partial": 0}


def attrs_for(spec):
    return {a: ATTRS[a] for a in spec.attribute_names}


def io(spec, dtype):
    return [dtype] * (len(spec.inputs) + 1)


MATRIX = [(p, a, "fp16") for p in PLUGINS for a in ARCHS] + [(p, 90, d) for p in PLUGINS for d in ("fp32", "bf16")]


def entry_params(ptx: str, name: str) -> list[str]:
    """The .param lines of the entry, parsed independently of normdeploy.lower.plugins.trt_plugins."""
    m = re.search(r"\.entry\s+" + name + r"\s*\((.*?)\)", ptx, flags=re.S)
    assert m, f"no .entry {name}"
    return [p.strip() for p in m.group(1).split(",") if p.strip()]


def expected_rows_and_cols(spec, shape):
    lead = int(np.prod(shape[:-1]))
    if spec.name == "NormdeployGroupScaling":
        return lead * ATTRS["groups"], shape[-1] // ATTRS["groups"]
    if spec.name == "NormdeployDynamicTanhPlain":
        return 1, int(np.prod(shape))
    return lead, shape[-1]


@pytest.mark.parametrize("plugin,arch,dtype", MATRIX, ids=[f"{p}-sm{a}-{d}" for p, a, d in MATRIX])
def test_aot_kernel_is_consistent_with_tensorrt_launch(plugin, arch, dtype):
    spec = PLUGINS[plugin]
    aot = T.build_aot_kernel(plugin, io(spec, dtype), SHAPE, attrs_for(spec), 1, target=arch,
                             ptx_version=T.MIN_PTX_ISA[arch])
    md, ptx = aot.metadata, aot.ptx

    # kernel name and target
    assert aot.kernel_name == spec.kernel == md.name
    assert re.search(r"\.visible\s+\.entry\s+" + aot.kernel_name + r"\(", ptx)
    assert re.search(r"^\.target\s+sm_(\d+)a?\s*$", ptx, flags=re.M).group(1) == str(arch)
    assert aot.ptx_version == f"{T.MIN_PTX_ISA[arch] // 10}.{T.MIN_PTX_ISA[arch] % 10}"

    # launch parameters
    assert aot.block == (md.num_warps * 32, 1, 1)
    assert int(re.search(r"\.reqntid\s+(\d+)", ptx).group(1)) == aot.block[0]
    assert aot.shared_mem == md.shared
    rows, n_cols = expected_rows_and_cols(spec, SHAPE)
    extras, const = dict(aot.extra_args), dict(aot.plan.constexprs)
    assert extras["n_cols"] == n_cols and extras.get("n_rows", const.get("n_rows")) == rows
    if spec.kernel == "dyt_fwd":
        tiles = -(-rows // const["BLOCK_R"]) * -(-n_cols // const["BLOCK_C"])
        assert aot.grid[0] == tiles
        assert np.int32(extras["alpha_bits"]).view(np.float32) == np.float32(ATTRS["alpha"])
    else:
        assert aot.grid[0] == -(-rows // const["ROWS"])
        assert np.int32(extras["eps_bits"]).view(np.float32) == np.float32(ATTRS["epsilon"])
    assert all(v >= 0 for v in extras.values())  # SymInt32s stay non-negative (signs are a constexpr)

    # the .param trap: by default exactly TensorRT's list (Triton's hidden scratch pointers deleted)
    params = entry_params(ptx, aot.kernel_name)
    trt = list(aot.plan.trt_params)
    assert trt == [f"{n}_ptr" for n in spec.inputs] + [n for n, _ in aot.extra_args] + ["y_ptr"]
    assert len(params) == len(trt), params
    assert aot.abi.count == len(trt) and not aot.abi.hidden
    for decl, want in zip(params, trt):
        assert (".u32" in decl) == (want in extras), (decl, want)
        assert (".u64" in decl) == (want not in extras), (decl, want)
    body = ptx[ptx.index(params[-1]) + len(params[-1]):]
    for i in range(len(trt)):  # every parameter TensorRT passes is actually read
        assert re.search(rf"ld\.param\.\w+\s+%\w+,\s*\[{aot.kernel_name}_param_{i}\]", body), f"param {i} unused"

    # fp32 arithmetic whatever the I/O type: no half-precision math, only conversions
    assert not re.search(r"\b(add|sub|mul|fma|div|rsqrt|sqrt|max|min)(\.\w+)*\.(f16|bf16|f16x2|bf16x2)\b", ptx)
    if dtype != "fp32":
        assert re.search(r"cvt\.f32\.(b?f16)", ptx) or re.search(r"cvt\.\w+\.f32\.(b?f16)", ptx)


@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_hidden_scratch_parameters_are_unused_before_they_are_deleted(plugin):
    """What makes deleting them safe: the untrimmed entry has Triton's two extra pointers (3.3+), the
    metadata says no scratch is needed, and no instruction reads them."""
    spec = PLUGINS[plugin]
    aot = T.build_aot_kernel(plugin, io(spec, "fp16"), SHAPE, attrs_for(spec), 1, target=90, trim_hidden=False)
    params = entry_params(aot.ptx, aot.kernel_name)
    trt = aot.plan.trt_params
    assert len(params) == len(trt) + len(aot.abi.hidden) and len(aot.abi.hidden) in (0, 1, 2)
    assert aot.metadata.global_scratch_size == 0 and getattr(aot.metadata, "profile_scratch_size", 0) == 0
    body = aot.ptx[aot.ptx.index(params[-1]) + len(params[-1]):]
    for decl in params[len(trt):]:
        assert decl.startswith(".param .u64 .ptr .global"), decl
        assert not re.search(re.escape(decl.split()[-1]) + r"\b", body), f"{decl} is read by the kernel"
    trimmed = T.build_aot_kernel(plugin, io(spec, "fp16"), SHAPE, attrs_for(spec), 1, target=90)
    assert len(entry_params(trimmed.ptx, trimmed.kernel_name)) == len(trt)


def _reference(plugin, x, params):
    import torch

    x64, a = x.double(), ATTRS
    if plugin in ("NormdeployRMSNorm", "NormdeployCRMSNorm"):
        s2 = (x64 * x64).sum(-1, keepdim=True)
        d = x64.shape[-1]
        ms = (s2 + x64.sum(-1, keepdim=True) ** 2) / (d + 1) if plugin == "NormdeployCRMSNorm" else s2 / d
        return params[0].double() * x64 / torch.sqrt(ms + a["epsilon"])
    if plugin == "NormdeployGroupScaling":
        g = x64.reshape(*x64.shape[:-1], a["groups"], -1)
        return (g / torch.sqrt((g * g).mean(-1, keepdim=True) + a["epsilon"])).reshape(x64.shape)
    if plugin == "NormdeployScaleNorm":
        return a["scale"] * x64 / torch.clamp(x64.norm(dim=-1, keepdim=True), min=a["epsilon"])
    t = torch.tanh(a["alpha"] * x64)
    shape = [1] * x64.dim()
    shape[a["axis"]] = -1
    for p, op in zip(params, (torch.mul, torch.add)):
        t = op(t, p.double().reshape(shape))
    return t


@pytest.mark.parametrize("plugin", list(PLUGINS))
@pytest.mark.parametrize("shape,axis", [((2, 7, 768), -1), ((3, 33), -1), ((2, 3, 5, 4), 1)],
                         ids=["tokens", "odd-width", "nchw"])
def test_tensorrts_arguments_compute_the_plugin_math(plugin, shape, axis, monkeypatch):
    """The kernel under the interpreter, called with exactly the arguments of the AOT plan (pointers, int32
    extras, constexprs, grid), against float64 references; with negative alpha and scale too (item 7)."""
    import torch

    spec = PLUGINS[plugin]
    if spec.kernel != "dyt_fwd" and axis != -1:
        pytest.skip("row kernels normalize the last axis")
    for sign in (-1.0, 1.0):
        monkeypatch.setitem(ATTRS, "alpha", 0.5 * sign)
        monkeypatch.setitem(ATTRS, "scale", 27.712812921102035 * sign)
        monkeypatch.setitem(ATTRS, "axis", axis)
        monkeypatch.setitem(ATTRS, "groups", 3 if shape[-1] == 33 else 4)
        attrs = attrs_for(spec)
        gen = torch.Generator().manual_seed(len(shape))
        x = torch.randn(shape, generator=gen)
        c = shape[axis]
        params = [torch.randn(c, generator=gen) for _ in spec.inputs[1:]]
        plan = T.plan_kernel(plugin, io(spec, "fp32"), shape, attrs)
        assert all(v >= 0 for _, v in plan.extras), plan.extras
        y = torch.empty_like(x)
        T.interpret_aot_launch(plan, [x, *params, y])
        ref = _reference(plugin, x, params)
        err = ((y.double() - ref).abs() / (ref.abs() + 0.01 * ref.abs().max())).max().item()
        assert err < 1e-5, f"{plugin} {shape} sign {sign}: {err:.3g}"


# ----------------------------------------------------------------------------- RMSNorm's eps_outside / partial

#: bzhangGo/rmsnorm's variants of the RMSNorm plugin: (eps_outside, partial) on rows of SHAPE[-1] = 768
RMS_VARIANTS = {"eps_outside": (1, 0), "partial": (0, 389), "both": (1, 389)}
RMS_VARIANT_MATRIX = ([(v, a, "fp16") for v in RMS_VARIANTS for a in ARCHS]
                      + [(v, 90, d) for v in RMS_VARIANTS for d in ("fp32", "bf16")])


def rms_attrs(variant: str) -> dict:
    eps_outside, partial = RMS_VARIANTS[variant]
    return {"epsilon": 1e-5, "eps_outside": eps_outside, "partial": partial}


@pytest.mark.parametrize("variant,arch,dtype", RMS_VARIANT_MATRIX,
                         ids=[f"{v}-sm{a}-{d}" for v, a, d in RMS_VARIANT_MATRIX])
def test_rms_variants_compile_to_ptx_consistent_with_tensorrt_launch(variant, arch, dtype):
    """The variants compile like the plain plugin: exactly TensorRT's parameters, n_stat = k a run-time int32
    after n_cols only where partial is set (one kernel for every k), all read, fp32 arithmetic."""
    spec = PLUGINS["NormdeployRMSNorm"]
    attrs = rms_attrs(variant)
    aot = T.build_aot_kernel(spec.name, io(spec, dtype), SHAPE, attrs, 1, target=arch,
                             ptx_version=T.MIN_PTX_ISA[arch])
    const, extras = dict(aot.plan.constexprs), dict(aot.extra_args)
    assert const["PARTIAL"] is bool(attrs["partial"]) and const["EPS_OUTSIDE"] is bool(attrs["eps_outside"])
    want = ["n_rows", "n_cols"] + (["n_stat"] if attrs["partial"] else []) + ["eps_bits"]
    assert [n for n, _ in aot.extra_args] == want
    if attrs["partial"]:
        assert extras["n_stat"] == attrs["partial"] and "n_stat" not in const
    else:
        assert const["n_stat"] == 0
    params = entry_params(aot.ptx, aot.kernel_name)
    trt = list(aot.plan.trt_params)
    assert trt == ["x_ptr", "g_ptr", *want, "y_ptr"] and len(params) == len(trt) and not aot.abi.hidden
    for decl, name in zip(params, trt):
        assert (".u32" in decl) == (name in extras) and (".u64" in decl) == (name not in extras), (decl, name)
    body = aot.ptx[aot.ptx.index(params[-1]) + len(params[-1]):]
    for i in range(len(trt)):
        assert re.search(rf"ld\.param\.\w+\s+%\w+,\s*\[{aot.kernel_name}_param_{i}\]", body), f"param {i} unused"
    assert not re.search(r"\b(add|sub|mul|fma|div|rsqrt|sqrt|max|min)(\.\w+)*\.(f16|bf16|f16x2|bf16x2)\b", aot.ptx)
    if attrs["eps_outside"]:  # sqrt then a division, not rsqrt
        assert re.search(r"\bsqrt\.rn\.f32\b", aot.ptx) and re.search(r"\b(div|rcp)(\.\w+)*\.f32\b", aot.ptx)
    assert all(v >= 0 for v in extras.values())


def test_plain_rmsnorm_plan_is_unchanged_by_the_variant_fields():
    """Defaults, explicit or left out (a file lowered before the fields existed), give the plain kernel: no
    n_stat parameter, the same plan and the same PTX."""
    spec = PLUGINS["NormdeployRMSNorm"]
    old = T.plan_kernel(spec.name, io(spec, "fp16"), SHAPE, {"epsilon": 1e-5})
    new = T.plan_kernel(spec.name, io(spec, "fp16"), SHAPE, {"epsilon": 1e-5, "eps_outside": 0, "partial": 0})
    assert old == new and [n for n, _ in new.extras] == ["n_rows", "n_cols", "eps_bits"]
    a = T.build_aot_kernel(spec.name, io(spec, "fp16"), SHAPE, {"epsilon": 1e-5}, 1, target=90)
    assert len(entry_params(a.ptx, a.kernel_name)) == 6
    assert T.plugin_attributes(spec, {"epsilon": 1e-5}) == {"epsilon": 1e-5, "eps_outside": 0, "partial": 0,
                                                            "plugin_namespace": "normdeploy", "aot": 1}


@pytest.mark.parametrize("variant", list(RMS_VARIANTS))
@pytest.mark.parametrize("shape", [(2, 7, 768), (3, 33), (2, 20001)], ids=["tokens", "odd-width", "two-pass"])
def test_rms_variants_tensorrts_arguments_compute_the_math(variant, shape):
    """The variant kernel under the interpreter with exactly the AOT plan's arguments, against float64."""
    import torch

    spec = PLUGINS["NormdeployRMSNorm"]
    attrs = rms_attrs(variant)
    c = shape[-1]
    if attrs["partial"]:
        attrs["partial"] = {768: 389, 33: 13, 20001: 16390}[c]  # not multiples of 4 or 8; past one block
    gen = torch.Generator().manual_seed(c)
    x, g = torch.randn(shape, generator=gen), torch.randn(c, generator=gen)
    plan = T.plan_kernel(spec.name, io(spec, "fp32"), shape, attrs)
    assert dict(plan.constexprs)["ONE_BLOCK"] is (c <= 16384)
    y = torch.empty_like(x)
    T.interpret_aot_launch(plan, [x, g, y])
    x64 = x.double()
    s = x64[..., :attrs["partial"]] if attrs["partial"] else x64
    ms = (s * s).mean(-1, keepdim=True)
    den = ms.sqrt() + attrs["epsilon"] if attrs["eps_outside"] else (ms + attrs["epsilon"]).sqrt()
    ref = g.double() * x64 / den
    err = ((y.double() - ref).abs() / (ref.abs() + 0.01 * ref.abs().max())).max().item()
    assert err < 1e-5, f"{variant} {shape}: {err:.3g}"


def test_rms_variants_two_pass_and_dynamic_width_compile():
    """Rows longer than one block, and a width known only at run time (eps_outside needs no static width: the
    kernel divides by the n_cols it is launched with), take the two-pass loop and compile."""
    spec = PLUGINS["NormdeployRMSNorm"]
    for variant in RMS_VARIANTS:
        aot = T.build_aot_kernel(spec.name, io(spec, "fp16"), (3, 40000), rms_attrs(variant), 1, target=80)
        assert dict(aot.plan.constexprs)["ONE_BLOCK"] is False
        assert len(entry_params(aot.ptx, aot.kernel_name)) == len(aot.plan.trt_params)
        dyn = T.plan_kernel(spec.name, io(spec, "fp16"), (Dim("batch"), Dim("hidden")), rms_attrs(variant), 2)
        assert dict(dyn.constexprs)["ONE_BLOCK"] is False and repr(dict(dyn.extras)["n_cols"]) == "hidden"


def test_rms_variant_fields_out_of_range_are_refused():
    spec = PLUGINS["NormdeployRMSNorm"]
    with pytest.raises(ValueError, match="partial"):
        T.plan_kernel(spec.name, io(spec, "fp16"), (2, 16), {"epsilon": 1e-5, "eps_outside": 0, "partial": 17})
    with pytest.raises(ValueError, match="partial"):
        T.plan_kernel(spec.name, io(spec, "fp16"), (2, 16), {"epsilon": 1e-5, "eps_outside": 0, "partial": -1})
    with pytest.raises(ValueError, match="eps_outside"):
        T.plan_kernel(spec.name, io(spec, "fp16"), (2, 16), {"epsilon": 1e-5, "eps_outside": 2, "partial": 0})


def test_long_and_unknown_rows_compile_the_two_pass_loop():
    for plugin in [p for p in PLUGINS if PLUGINS[p].kernel != "dyt_fwd"]:
        _two_pass(plugin)


def _two_pass(plugin):
    spec = PLUGINS[plugin]
    long_shape = (3, 16384 * (ATTRS["groups"] if plugin == "NormdeployGroupScaling" else 1) * 2)
    aot = T.build_aot_kernel(plugin, io(spec, "fp16"), long_shape, attrs_for(spec), 1, target=80)
    assert dict(aot.plan.constexprs)["ONE_BLOCK"] is False
    assert len(entry_params(aot.ptx, aot.kernel_name)) == len(aot.plan.trt_params)
    assert re.search(r"\bbra(\.uni)?\s", aot.ptx), "no loop in the PTX"
    # the same plugin when the hidden size is only known at run time (dynamic dimension)
    dyn = T.plan_kernel(plugin, io(spec, "fp16"), (Dim("batch"), Dim("hidden")), attrs_for(spec), 2)
    assert dict(dyn.constexprs)["ONE_BLOCK"] is False


class Dim:
    """A stand-in for TensorRT's ShapeExpr: +, *, // build expressions; constants fold."""

    is_fake = False

    def __init__(self, text: str, value: int | None = None):
        self.text, self.value = text, value

    @property
    def is_constant(self) -> bool:
        return self.value is not None

    def constant_value(self) -> int:
        assert self.value is not None
        return self.value

    def _op(self, other, sym, fn):
        o = other if isinstance(other, Dim) else Dim(str(other), other)
        v = fn(self.value, o.value) if self.value is not None and o.value is not None else None
        return Dim(f"({self.text}{sym}{o.text})", v)

    def __add__(self, o):
        return self._op(o, "+", lambda a, b: a + b)

    def __mul__(self, o):
        return self._op(o, "*", lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._op(o, "//", lambda a, b: a // b)

    def __repr__(self):
        return self.text


def test_dynamic_batch_and_sequence_become_shape_expressions():
    spec = PLUGINS["NormdeployRMSNorm"]
    plan = T.plan_kernel(spec.name, io(spec, "fp16"), (Dim("B"), Dim("S"), Dim("C", 768)), attrs_for(spec))
    extras = dict(plan.extras)
    assert repr(extras["n_rows"]) == "(B*S)" and extras["n_cols"].value == 768
    assert repr(plan.grid) == "(((B*S)+3)//4)"  # four rows of 768 (blocks of 1024) a program
    assert dict(plan.constexprs) | {"BLOCK": 1024, "ROWS": 4, "ONE_BLOCK": True} == dict(plan.constexprs)
    gs = PLUGINS["NormdeployGroupScaling"]
    plan = T.plan_kernel(gs.name, io(gs, "bf16"), (Dim("B"), Dim("C", 768)), attrs_for(gs))
    assert repr(dict(plan.extras)["n_rows"]) == "(B*4)" and dict(plan.extras)["n_cols"].value == 192
    assert repr(plan.grid) == "(((B*4)+15)//16)"
    dyt = PLUGINS["NormdeployDynamicTanh"]
    plan = T.plan_kernel(dyt.name, io(dyt, "fp32"), (Dim("N"), Dim("C", 3), Dim("H"), Dim("W")),
                         {"alpha": 0.5, "axis": 1})
    extras = dict(plan.extras)
    assert repr(extras["n_rows"]) == "(N*C)" and repr(extras["n_cols"]) == "(H*W)" and extras["n_channels"].value == 3
    assert dict(plan.constexprs)["CH_ON_COLS"] is False
    assert repr(plan.grid) == "((((N*C)+15)//16)*(((H*W)+255)//256))"
    plan = T.plan_kernel(dyt.name, io(dyt, "fp16"), (Dim("B"), Dim("S"), Dim("C", 768)), {"alpha": 0.5, "axis": -1})
    assert dict(plan.constexprs)["CH_ON_COLS"] is True and repr(dict(plan.extras)["n_rows"]) == "(B*S)"
    with pytest.raises(ValueError, match="divisible"):
        T.plan_kernel(gs.name, io(gs, "fp16"), (2, 10), {"groups": 4, "epsilon": 1e-5})


def test_autotune_combinations_all_compile_plans():
    for spec in PLUGINS.values():
        combos = T.autotune_combinations(spec)
        for combo in combos:
            assert len(combo.split(",")) == len(spec.inputs) + 1
            for dtypes in T.expand_combination(combo):
                plan = T.plan_kernel(spec.name, dtypes, SHAPE, attrs_for(spec))
                assert dict(plan.pointer_dtypes)["x_ptr"] == dtypes[0]
    rms = PLUGINS["NormdeployRMSNorm"]
    mixed = T.build_aot_kernel(rms.name, ["fp16", "fp32", "fp16"], SHAPE, attrs_for(rms), 2, target=90)
    assert mixed.abi.count == len(mixed.plan.trt_params)


def test_tactics_change_the_launch():
    spec = PLUGINS["NormdeployRMSNorm"]
    a1 = T.build_aot_kernel(spec.name, io(spec, "fp16"), SHAPE, attrs_for(spec), 1, target=90)
    a2 = T.build_aot_kernel(spec.name, io(spec, "fp16"), SHAPE, attrs_for(spec), 2, target=90)
    assert a2.block[0] == 4 * a1.block[0] and a1.grid[0] == 2 * a2.grid[0]  # twice the rows, twice the threads each


# ----------------------------------------------------------------------------- refusing what TensorRT cannot launch

def tma_copy(x_ptr, n, y_ptr, BLOCK: tl.constexpr):
    """Not a plugin kernel: it builds a TMA descriptor on the device, which needs Triton global scratch."""
    d = tl.make_tensor_descriptor(x_ptr, shape=[n], strides=[1], block_shape=[BLOCK])
    v = d.load([tl.program_id(0) * BLOCK])
    tl.store(y_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), v)


def _tma_kernel():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"x_ptr": "*fp32", "n": "i32", "y_ptr": "*fp32", "BLOCK": "constexpr"}
    src = ASTSource(triton.JITFunction(tma_copy), signature, {"BLOCK": 64})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True})


def test_kernel_that_needs_scratch_memory_is_refused():
    compiled = _tma_kernel()
    md = compiled.metadata
    assert md.global_scratch_size > 0  # device-side TMA descriptors live in global scratch
    with pytest.raises(T.ScratchMemoryError, match="scratch"):
        T.check_launch_abi(compiled.asm["ptx"], md.name, md, ["x_ptr", "n", "y_ptr"], ["n"])
    # even with metadata claiming no scratch, reading the hidden parameter is caught in the PTX
    clean = types.SimpleNamespace(global_scratch_size=0, profile_scratch_size=0)
    with pytest.raises(T.ScratchMemoryError, match="reads"):
        T.check_launch_abi(compiled.asm["ptx"], md.name, clean, ["x_ptr", "n", "y_ptr"], ["n"])


def test_profile_scratch_and_abi_mismatches_are_refused():
    spec = PLUGINS["NormdeployScaleNorm"]
    aot = T.build_aot_kernel(spec.name, io(spec, "fp16"), SHAPE, attrs_for(spec), 1, target=90)
    trt, extras = aot.plan.trt_params, [n for n, _ in aot.extra_args]
    prof = types.SimpleNamespace(global_scratch_size=0, profile_scratch_size=256)
    with pytest.raises(T.ScratchMemoryError):
        T.check_launch_abi(aot.ptx, aot.kernel_name, prof, trt, extras)
    with pytest.raises(T.LaunchAbiError, match="int32"):  # a scalar where the PTX has a pointer
        T.check_launch_abi(aot.ptx, aot.kernel_name, aot.metadata, trt, ["x_ptr", *extras])
    with pytest.raises(T.LaunchAbiError, match="parameters"):  # more arguments than the entry declares
        T.check_launch_abi(aot.ptx, aot.kernel_name, aot.metadata, [*trt, "a", "b", "c"], extras)
    with pytest.raises(T.LaunchAbiError, match="no .entry"):
        T.check_launch_abi(aot.ptx, "not_the_kernel", aot.metadata, trt, extras)


@pytest.mark.parametrize("arch", [80, 90])
def test_trimmed_ptx_declares_exactly_tensorrts_parameters_and_assembles(arch):
    spec = PLUGINS["NormdeployDynamicTanh"]
    aot = T.build_aot_kernel(spec.name, io(spec, "fp16"), SHAPE, attrs_for(spec), 1, target=arch)
    params = entry_params(aot.ptx, aot.kernel_name)
    assert len(params) == len(aot.plan.trt_params) and not aot.abi.hidden
    info = T.ptxas_info(aot.ptx, arch)  # raises if ptxas rejects the edited PTX
    assert info["registers"] > 0


def test_ptx_isa_is_the_oldest_the_architecture_needs():
    """Item 4: TensorRT JITs the PTX with the driver of the host that runs the engine, so the ISA is the one
    the architecture first appeared in, not the newest the build host knows."""
    assert T.aot_target(90) == (90, 80) and T.aot_target(80) == (80, 78) and T.aot_target(89) == (89, 78)
    assert T.aot_target(90, portable=True) == (80, 78) and T.aot_target(120, portable=True) == (80, 78)
    assert T.aot_target(75) == (75, None)  # not in the table: Triton's default, capped by the driver
    spec = PLUGINS["NormdeployRMSNorm"]
    default = T.build_aot_kernel(spec.name, io(spec, "fp16"), SHAPE, attrs_for(spec), 1, target=90)
    oldest = T.build_aot_kernel(spec.name, io(spec, "fp16"), SHAPE, attrs_for(spec), 1, target=90, ptx_version=80)
    assert oldest.ptx_version == "8.0" and default.ptx_version != "8.0"  # Triton alone emits its ptxas' ISA
    assert oldest.cubin  # Triton assembled it


def test_portable_kernels_are_plain_sm80_that_assembles_for_later_gpus():
    """--hardware-compat ampere+: sm_80 PTX (not Triton's arch-specific sm_90a), assembled here for sm_86,
    sm_89 and sm_90 as the driver of such a GPU would JIT it."""
    arch, isa = T.aot_target(90, portable=True)
    for plugin in ("NormdeployRMSNorm", "NormdeployDynamicTanh"):
        spec = PLUGINS[plugin]
        aot = T.build_aot_kernel(plugin, io(spec, "bf16"), SHAPE, attrs_for(spec), 1, target=arch, ptx_version=isa)
        assert re.search(r"^\.target\s+sm_80\s*$", aot.ptx, flags=re.M) and aot.ptx_version == "7.8"
        for gpu in (86, 89, 90):
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "k.ptx")
                open(src, "w").write(aot.ptx)
                r = subprocess.run([T._ptxas(gpu), "--gpu-name", f"sm_{gpu}", src, "-o", os.path.join(d, "k.o")],
                                   capture_output=True, text=True)
                assert r.returncode == 0, r.stderr


def test_kernels_vectorize_when_alignment_allows():
    """One PTX, two paths: 16-byte vector loads and stores when the pointers and rows allow it (tested at run
    time), scalar ones otherwise (a network input may be offset); no alignment assumed at compile time."""
    for plugin in PLUGINS:
        spec = PLUGINS[plugin]
        for dtype, scalar in (("fp16", r"\.b16"), ("fp32", r"\.b32")):
            aot = T.build_aot_kernel(plugin, io(spec, dtype), SHAPE, attrs_for(spec), 1, target=90)
            assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", aot.ptx), f"{plugin} {dtype}: no vector load"
            assert re.search(r"st\.global(\.\w+)*\.v4\.b32", aot.ptx), f"{plugin} {dtype}: no vector store"
            assert re.search(r"ld\.global(\.\w+)*" + scalar + r"\s", aot.ptx), f"{plugin} {dtype}: no scalar path"
    dyt = T.build_aot_kernel("NormdeployDynamicTanh", io(PLUGINS["NormdeployDynamicTanh"], "fp16"), SHAPE,
                             attrs_for(PLUGINS["NormdeployDynamicTanh"]), 1, target=90)
    assert not re.search(r"\b(rem|div)\.(s|u)(32|64)", dyt.ptx.split("ld.global")[1])  # no per-element div/mod


@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_compiler_reported_resources_sm90(plugin):
    spec = PLUGINS[plugin]
    for shape in ((64, 4096), (64, 16384), (4096, 64)):
        aot = T.build_aot_kernel(plugin, io(spec, "fp16"), shape, attrs_for(spec), 1, target=90, ptx_version=80)
        r = T.resource_usage(aot)
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0
        # Triton's own cubin (its ptxas flags, e.g. --regAllocOptLevel=2 on 3.9) fits too
        assert 0 < r["cubin"]["REG"] <= 255 and r["cubin"].get("LOCAL", 0) == 0
    assert r["dynamic_smem"] == aot.metadata.shared


# --------------------------------------------------------------------- tensorrt.plugin wrappers, stand-in module

class FakeTensorDesc:
    def __init__(self, shape_expr=(), dtype=None):
        self.shape_expr, self.dtype = tuple(shape_expr), dtype

    def like(self):
        return FakeTensorDesc(self.shape_expr, self.dtype)


class FakeLaunchParams:
    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = 1
        self.shared_mem = 0


class FakeSymInt32:
    def __init__(self, v):
        self.v = v


class FakeSymIntExprs:
    def __init__(self, n):
        self.items = [None] * n

    def __setitem__(self, i, v):
        assert isinstance(v, FakeSymInt32), "TensorRT requires SymInt32 extra arguments"
        self.items[i] = v

    def __len__(self):
        return len(self.items)


class FakeAutoTuneCombination:
    def __init__(self, io_types=None, layouts=None, tactics=None):
        self.io_types, self.layouts, self.tactics = io_types, layouts, tactics


def fake_trtp():
    """Decorators that check signatures the way tensorrt.plugin documents (10.9+), and record the functions."""
    import inspect

    reg: dict = {}

    def check_register(fn):
        sig = inspect.signature(fn)
        seen_attr = False
        for name, p in sig.parameters.items():
            assert p.annotation is not inspect.Parameter.empty and p.default is inspect.Parameter.empty
            assert isinstance(p.annotation, type), f"{name}: annotation must be a class, got {p.annotation!r}"
            if p.annotation is FakeTensorDesc:
                assert not seen_attr, "tensors must come before attributes"
            else:
                assert p.annotation in (int, float, str, bool, bytes) and name not in ("outputs", "stream", "tactic")
                seen_attr = True
        assert sig.return_annotation is FakeTensorDesc

    def decorator(kind):
        def outer(pid):
            ns, name = pid.split("::")
            assert ns == "normdeploy" and "." not in name

            def inner(fn):
                if kind == "register":
                    check_register(fn)
                reg.setdefault(pid, {})[kind] = fn
                return fn
            return inner
        return outer

    return types.SimpleNamespace(TensorDesc=FakeTensorDesc, KernelLaunchParams=FakeLaunchParams,
                                 SymInt32=FakeSymInt32, SymIntExprs=FakeSymIntExprs,
                                 AutoTuneCombination=FakeAutoTuneCombination, register=decorator("register"),
                                 autotune=decorator("autotune"), aot_impl=decorator("aot_impl"), registry=reg)


@pytest.fixture
def trt_standin(monkeypatch):
    from triton.backends.compiler import GPUTarget

    fake_trt = types.SimpleNamespace(float32="DataType.FLOAT", float16="DataType.HALF", bfloat16="DataType.BF16")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setattr(T, "_TRT_DTYPES", None)
    monkeypatch.setattr(T, "current_target", lambda: GPUTarget("cuda", 90, 32))
    monkeypatch.setattr(T, "driver_ptx_version", lambda: 84)
    return fake_trt, fake_trtp()


def test_plugin_wrappers_follow_the_tensorrt_plugin_schema(trt_standin):
    import inspect

    fake_trt, trtp = trt_standin
    ids = T.register_plugins(trtp)
    assert sorted(ids) == sorted(f"normdeploy::{n}" for n in PLUGINS)
    for pid, fns in trtp.registry.items():
        spec = PLUGINS[pid.split("::")[1]]
        names = list(spec.inputs) + list(spec.attribute_names)
        assert list(inspect.signature(fns["register"]).parameters) == names
        assert list(inspect.signature(fns["autotune"]).parameters) == names + ["outputs"]
        sig = inspect.signature(fns["aot_impl"])
        assert list(sig.parameters) == names + ["outputs", "tactic"]
        ret = sig.return_annotation
        assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 4
        assert typing.get_args(ret)[2] is FakeLaunchParams and typing.get_args(ret)[3] is FakeSymIntExprs
        for name, typ in spec.attributes:
            assert sig.parameters[name].annotation is typ


def test_aot_impl_wrapper_returns_what_tensorrt_expects(trt_standin):
    fake_trt, trtp = trt_standin
    T.register_plugins(trtp)
    fns = trtp.registry["normdeploy::NormdeployRMSNorm"]
    x = FakeTensorDesc((Dim("B"), Dim("S"), Dim("C", 768)), fake_trt.float16)
    g = FakeTensorDesc((Dim("C", 768),), fake_trt.float16)
    out = fns["register"](x, g, 1e-5)
    assert out.dtype == fake_trt.float16 and out.shape_expr == x.shape_expr
    combos = fns["autotune"](x, g, 1e-5, 0, 0, (out,))
    assert [c.io_types for c in combos] == T.autotune_combinations("NormdeployRMSNorm")
    assert all(c.tactics == [1, 2] for c in combos)
    name, ptx, launch, extra = fns["aot_impl"](x, g, 1e-5, 0, 0, (out,), 2)
    assert name == "row_norm_fwd" and f".entry {name}(" in ptx
    assert isinstance(launch.grid_x, FakeSymInt32) and repr(launch.grid_x.v) == "(((B*S)+7)//8)"
    assert launch.block_x == int(re.search(r"\.reqntid\s+(\d+)", ptx).group(1))
    assert [type(e) for e in extra.items] == [FakeSymInt32] * 3
    assert repr(extra.items[0].v) == "(B*S)" and extra.items[1].v.value == 768 and extra.items[2].v == f32_bits(1e-5)
    # a fixed shape gives plain ints
    xs = FakeTensorDesc((4, 768), fake_trt.bfloat16)
    gs = FakeTensorDesc((768,), fake_trt.float32)
    _, _, launch, extra = fns["aot_impl"](xs, gs, 1e-5, 0, 0, (xs.like(),), 0)  # tactic 0: TensorRT's default
    assert launch.grid_x == 1 and [e.v for e in extra.items[:2]] == [4, 768]
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        fns["aot_impl"](FakeTensorDesc((4, 768), "DataType.INT8"), gs, 1e-5, 0, 0, (xs,), 1)


def test_rmsnorm_wrappers_take_the_variant_fields_and_default_them_when_absent(trt_standin):
    """TensorRT passes the fields of the node: with eps_outside / partial the kernel gets EPS_OUTSIDE and the
    extra n_stat; a node lowered before the fields existed has neither and gets the plain RMSNorm (the
    registered signature itself has no defaults: tensorrt.plugin refuses them)."""
    import inspect

    fake_trt, trtp = trt_standin
    T.register_plugins(trtp)
    fns = trtp.registry["normdeploy::NormdeployRMSNorm"]
    assert all(p.default is inspect.Parameter.empty for p in inspect.signature(fns["aot_impl"]).parameters.values())
    x = FakeTensorDesc((Dim("B"), Dim("C", 768)), fake_trt.float16)
    g = FakeTensorDesc((Dim("C", 768),), fake_trt.float16)
    assert fns["register"](x, g, epsilon=1e-5).shape_expr == x.shape_expr  # an older node: no variant fields
    with T.aot_build_options() as built:
        _, ptx_old, _, extra_old = fns["aot_impl"](x, g, epsilon=1e-5, outputs=(x.like(),), tactic=1)
        _, ptx_new, _, extra_new = fns["aot_impl"](x, g, epsilon=1e-5, eps_outside=0, partial=0, outputs=(x.like(),),
                                                   tactic=1)
        assert ptx_old == ptx_new and len(extra_old) == len(extra_new) == 3
        name, ptx, _, extra = fns["aot_impl"](x, g, epsilon=1e-5, eps_outside=1, partial=300, outputs=(x.like(),),
                                              tactic=1)
        assert built[-1]["params"] == 7
    assert [e.v if isinstance(e.v, int) else e.v.value for e in extra.items[1:]] == [768, 300, f32_bits(1e-5)]
    assert len(entry_params(ptx, name)) == 2 + len(extra) + 1 == 7
    with pytest.raises(TypeError, match="missing"):
        fns["aot_impl"](x, g, outputs=(x.like(),), tactic=1)  # epsilon has no default


def _aot_rmsnorm(trtp, fake_trt):
    T.register_plugins(trtp)
    fns = trtp.registry["normdeploy::NormdeployRMSNorm"]
    x = FakeTensorDesc((Dim("B"), Dim("C", 768)), fake_trt.float16)
    g = FakeTensorDesc((Dim("C", 768),), fake_trt.float16)
    return fns["aot_impl"](x, g, 1e-5, 0, 0, (x.like(),), 1)


def test_aot_impl_returns_exactly_the_parameters_tensorrt_passes(trt_standin, monkeypatch):
    """Item 3: TensorRT 10.9..10.13, whose sample used a Triton without hidden parameters, is not documented to
    pad missing arguments: by default the PTX entry declares x, g, n_rows, n_cols, eps_bits, y and nothing more."""
    fake_trt, trtp = trt_standin
    name, ptx, launch, extra = _aot_rmsnorm(trtp, fake_trt)
    params = entry_params(ptx, name)
    assert len(params) == 2 + len(extra) + 1 == 6, params
    monkeypatch.setenv(T.ENV_KEEP_HIDDEN, "1")  # Triton's own declarations, for a TensorRT known to pad
    name, ptx, _, extra = _aot_rmsnorm(trtp, fake_trt)
    assert len(entry_params(ptx, name)) == 6 + len(T.build_aot_kernel(
        "NormdeployRMSNorm", ["fp16"] * 3, (2, 768), {"epsilon": 1e-5}, target=90, trim_hidden=False).abi.hidden)


def test_aot_impl_ptx_does_not_follow_the_build_hosts_driver(trt_standin, monkeypatch):
    """Item 4: a CUDA 13 driver on the build host (ISA 9.0) must not make the engine need one where it runs,
    and an ampere+ engine built on an H100 must not carry sm_90a kernels."""
    fake_trt, trtp = trt_standin
    monkeypatch.setattr(T, "driver_ptx_version", lambda: 90)
    _, ptx, _, _ = _aot_rmsnorm(trtp, fake_trt)
    assert re.search(r"^\.version 8\.0$", ptx, flags=re.M) and re.search(r"^\.target sm_90a$", ptx, flags=re.M)
    with T.aot_build_options(hardware_compat="ampere+") as built:
        _, ptx, _, _ = _aot_rmsnorm(trtp, fake_trt)
        assert built[-1]["target"] == "sm_80" and built[-1]["ptx_isa"] == "7.8" and built[-1]["params"] == 6
    assert re.search(r"^\.version 7\.8$", ptx, flags=re.M) and re.search(r"^\.target sm_80$", ptx, flags=re.M)
    _, ptx, _, _ = _aot_rmsnorm(trtp, fake_trt)  # the option ends with the build
    assert re.search(r"^\.target sm_90a$", ptx, flags=re.M)
    monkeypatch.setattr(T, "driver_ptx_version", lambda: 78)  # a CUDA 11.8 driver cannot JIT sm_90a PTX: said so
    with pytest.raises(T.LaunchAbiError, match="update the NVIDIA driver"):
        _aot_rmsnorm(trtp, fake_trt)


def test_current_target_asks_torch_not_the_triton_driver(monkeypatch):
    """Item 5: triton.runtime.driver.active compiles a C helper at run time (a compiler and Python headers on the
    server); the device capability comes from torch instead."""
    import torch
    import triton.runtime

    class Exploding:
        @property
        def active(self):
            raise AssertionError("triton.runtime.driver.active was used")

    monkeypatch.setattr(triton.runtime, "driver", Exploding())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    target = T.current_target()
    assert (target.backend, target.arch, target.warp_size) == ("cuda", 90, 32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert T.current_target().arch == 86
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        T.current_target()


def test_importing_plugins_needs_neither_tensorrt_nor_a_gpu():
    import subprocess

    code = ("import sys; sys.modules['tensorrt'] = None; import normdeploy.lower.plugins.trt_plugins as T, normdeploy.lower.trt; "
            "assert not T.tensorrt_available(); assert 'triton' not in sys.modules, 'triton imported'; "
            "import normdeploy.lower.plugins.emulate; print('ok')")
    root = ROOT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_register_plugins_without_tensorrt_says_what_is_missing():
    if T.tensorrt_available():  # pragma: no cover - a machine with TensorRT
        pytest.skip("tensorrt is installed here")
    with pytest.raises(ImportError, match="tensorrt"):
        T.register_plugins()


def test_env_switches_are_documented():
    import os

    readme = open(os.path.join(os.path.dirname(T.__file__), "README.md")).read()
    assert T.ENV_KEEP_HIDDEN in readme and T.ENV_PORTABLE in readme
