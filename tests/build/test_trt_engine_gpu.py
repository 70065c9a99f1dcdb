"""TensorRT engines built with normdeploy's AOT plugins, compared with ONNX Runtime on the original model.

These need an NVIDIA GPU and TensorRT 10.9+ (``tensorrt.plugin.aot_impl``); elsewhere every test
skips and says why. What they check, on the GPU:

* the plugin-lowered model parses (plugins found by op_type + plugin_namespace), builds as a
  strongly typed engine (fp32 and fp16), and matches ONNX Runtime on the original model
  (fp32 1e-5, fp16 1e-2 relative to the largest output);
* the same with Triton's hidden scratch parameters kept in the PTX (the default deletes them), and
  with portable sm_80 PTX (what ``--hardware-compat ampere+`` builds);
* without TensorRT: the PTX aot_impl returns, JIT-compiled by the driver and launched with
  ``cuLaunchKernel`` as TensorRT's AOT launch does, against the interpreter (scripts/gpu_check.sh runs this);
* the serialized engine runs in a process that never imports normdeploy's plugins (the AOT
  kernels are inside the plan);
* the kernels launched directly on CUDA tensors agree with the interpreter on CPU.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from normdeploy.core.passes import PassContext
from tests.graph_helpers import run_step

pytestmark = pytest.mark.gpu

C = 48


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        return f"torch not importable ({e})"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def _trt_reason() -> str | None:
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as e:  # noqa: BLE001 - ImportError or a broken install
        return f"tensorrt not importable ({type(e).__name__}: {e})"
    if not hasattr(trtp, "aot_impl"):
        return f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl (needs 10.9 or newer)"
    return None


@pytest.fixture(scope="module")
def trt():
    reasons = [r for r in (_trt_reason(), _cuda_reason()) if r]
    if reasons:
        pytest.skip("needs TensorRT and an NVIDIA GPU: " + "; ".join(reasons))
    import tensorrt

    from normdeploy.lower.plugins.trt_plugins import register_plugins

    register_plugins()
    return tensorrt


@pytest.fixture(scope="module")
def cuda():
    reason = _cuda_reason()
    if reason:
        pytest.skip("needs an NVIDIA GPU: " + reason)
    import torch

    return torch


def build_engine(trt, model, x_shape, min_batch=1, max_batch=8) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        pytest.fail(f"TensorRT could not parse the lowered model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 28)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (min_batch, *x_shape[1:]), tuple(x_shape), (max_batch, *x_shape[1:]))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "engine build failed"
    return bytes(plan)


def run_engine(trt, plan: bytes, x: np.ndarray) -> np.ndarray:
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    ctx.set_input_shape(inp, x.shape)
    xt = torch.from_numpy(x).cuda()
    yt = torch.empty(tuple(ctx.get_tensor_shape(out)), dtype=xt.dtype, device="cuda")
    ctx.set_tensor_address(inp, xt.data_ptr())
    ctx.set_tensor_address(out, yt.data_ptr())
    stream = torch.cuda.Stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return yt.cpu().numpy()


def ort_reference(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def assert_matches(got, ref, tol, what):
    scale = float(np.abs(ref.astype(np.float64)).max())
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    assert err <= tol * scale, f"{what}: max |TensorRT - ONNX Runtime| = {err:.3g} > {tol} * {scale:.3g}"


def lowered(model, target):
    out, result = run_step(model, "lower_to_trt_plugins", PassContext(target=target))
    assert not result.skipped, result.skipped
    return out


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 1e-2)], ids=["fp32", "fp16"])
def test_engine_matches_onnxruntime(trt, canonical_model, dtype, tol):
    model = canonical_model(dtype)
    plan = build_engine(trt, lowered(model, "trt-fp32" if dtype == np.float32 else "trt-fp16"), (3, 5, C))
    for batch in (1, 3, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 5, C)).astype(dtype)
        assert_matches(run_engine(trt, plan, x), ort_reference(model, x), tol, f"{dtype.__name__} batch {batch}")


@pytest.mark.parametrize("env", ["NORMDEPLOY_TRT_KEEP_HIDDEN_PARAMS", "NORMDEPLOY_TRT_PORTABLE_PTX"])
def test_engine_with_either_launch_abi_choice(trt, canonical_model, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    model = canonical_model(np.float16)
    plan = build_engine(trt, lowered(model, "trt-fp16"), (3, 5, C))
    x = np.random.default_rng(7).standard_normal((4, 5, C)).astype(np.float16)
    assert_matches(run_engine(trt, plan, x), ort_reference(model, x), 1e-2, env)


def test_serialized_engine_runs_without_the_plugin_definitions(trt, canonical_model, tmp_path):
    model = canonical_model(np.float32)
    plan = build_engine(trt, lowered(model, "trt-fp32"), (2, 5, C))
    x = np.random.default_rng(9).standard_normal((2, 5, C)).astype(np.float32)
    (tmp_path / "model.plan").write_bytes(plan)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorrt as trt, torch
        assert not any(m.startswith("normdeploy.lower.plugins") for m in sys.modules)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(open({str(tmp_path / 'model.plan')!r}, "rb").read())
        ctx = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})).cuda()
        ctx.set_input_shape(names[0], tuple(x.shape))
        y = torch.empty(tuple(ctx.get_tensor_shape(names[1])), device="cuda")
        ctx.set_tensor_address(names[0], x.data_ptr()); ctx.set_tensor_address(names[1], y.data_ptr())
        s = torch.cuda.Stream(); assert ctx.execute_async_v3(s.cuda_stream); s.synchronize()
        np.save({str(tmp_path / 'y.npy')!r}, y.cpu().numpy())
        assert not any(m.startswith("normdeploy.lower.plugins") for m in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_matches(np.load(tmp_path / "y.npy"), ort_reference(model, x), 1e-5, "plan in a fresh process")


def test_kernels_on_cuda_match_the_interpreter(cuda):
    torch = cuda
    from normdeploy.lower.plugins import kernels as K

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for c in (7, 768, 20001):
            x = torch.randn(4, c, generator=gen).to(dtype)
            w = torch.randn(c, generator=gen).to(dtype)
            runs = {
                "rms": lambda t, w=w: K.rms_norm(t, w.to(t.device), 1e-6),
                "crms": lambda t, w=w: K.crms_norm(t, w.to(t.device), 1e-6),
                "gs": lambda t: K.group_scaling(t, 1, 1e-5),
                "sn": lambda t: K.scale_norm(t, 3.0, 1e-5),
                "dyt": lambda t, w=w: K.dynamic_tanh(t, 0.5, w.to(t.device), w.to(t.device)),
            }
            for name, fn in runs.items():
                on_gpu, on_cpu = fn(x.cuda()).cpu().double(), fn(x).double()
                tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
                err = ((on_gpu - on_cpu).abs() / (on_cpu.abs() + 0.01 * on_cpu.abs().max())).max().item()
                assert err <= tol, f"{name} {dtype} C={c}: GPU vs interpreter {err:.3g}"



@pytest.mark.parametrize("trim,portable", [(True, False), (False, False), (True, True)],
                         ids=["trimmed", "hidden-params-null", "portable-sm80"])
def test_aot_ptx_runs_as_tensorrt_launches_it(cuda, trim, portable):
    """No TensorRT needed: the PTX aot_impl returns for this GPU, JIT-compiled by the driver and launched with
    cuLaunchKernel in TensorRT's argument order (inputs, int32 extras, outputs; untrimmed: null for each hidden
    scratch pointer, as a padding TensorRT would), agrees with the same launch under the interpreter on CPU;
    aligned and misaligned inputs, odd widths, negative float attributes, and the portable sm_80 form."""
    torch = cuda
    from normdeploy.lower.plugins import trt_plugins as T
    from normdeploy.lower.plugins.cuda_launch import AotLauncher

    major, minor = torch.cuda.get_device_capability()
    arch, isa = T.aot_target(10 * major + minor, portable)
    attrs = {"epsilon": 1e-5, "groups": 4, "scale": -5.0, "alpha": -0.7, "axis": -1}
    tol = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
    gen = torch.Generator().manual_seed(0)
    for plugin, spec in T.PLUGINS.items():
        a = {k: attrs[k] for k in spec.attribute_names}
        for dtype, tdt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            for shape, offset in (((4, 5, 768), 0), ((3, 36), 0), ((6, 1024), 1)):
                aot = T.build_aot_kernel(plugin, [dtype] * (len(spec.inputs) + 1), shape, a, 2, target=arch,
                                         ptx_version=isa, trim_hidden=trim)
                c = shape[-1]
                x_cpu = torch.randn(shape, generator=gen).to(tdt)
                params = [torch.randn(c, generator=gen).to(tdt) for _ in spec.inputs[1:]]
                ref = torch.empty_like(x_cpu)
                T.interpret_aot_launch(aot, [x_cpu, *params, ref])
                buf = torch.empty(x_cpu.numel() + offset, dtype=tdt, device="cuda")
                x = buf[offset:].view(shape)
                x.copy_(x_cpu)
                y = torch.empty_like(x)
                AotLauncher(aot, hidden_nulls=not trim)(x, *(p.cuda() for p in params), y)
                torch.cuda.synchronize()
                got, want = y.cpu().double(), ref.double()
                err = ((got - want).abs() / (want.abs() + 0.01 * want.abs().max())).max().item()
                assert err <= tol[dtype], f"{plugin} {dtype} {shape} offset {offset}: GPU vs interpreter {err:.3g}"
