"""normdeploy.build.trt: flag parsing, availability messages, the builder's TensorRT calls (against a
recording stand-in for the tensorrt module), and, on a GPU host with TensorRT, real engines."""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from normdeploy.build import trt as trt_build
from normdeploy.build.trt import (
    Profile,
    auto_target,
    available,
    build_engine,
    make_profiles,
    ort_providers,
    parse_batch,
    parse_hardware_compat,
    parse_size,
    require,
)
from normdeploy.core.errors import InputError, UnsupportedError
from tests.conftest import MODELS

GPU_OK, GPU_WHY = available()
gpu = pytest.mark.skipif(not GPU_OK, reason=f"needs TensorRT and an NVIDIA GPU: {GPU_WHY}")


# ----------------------------------------------------------------------------- flags

def test_parse_batch():
    assert parse_batch("1:8:32") == (1, 8, 32)
    assert parse_batch("8") == (1, 8, 8)
    assert parse_batch(4) == (1, 4, 4)
    assert parse_batch("2:2:2") == (2, 2, 2)
    assert parse_batch(None) is None
    for bad in ("0:1:2", "8:4:16", "1:2", "a:b:c", "1:2:3:4", "-1", ""):
        with pytest.raises(InputError, match="--batch"):
            parse_batch(bad)


def test_parse_size_and_levels():
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("4G") == 4 * 2**30
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(1024) == 1024
    assert parse_size(None) is None
    for bad in ("4X", "-1G", "G", "0"):
        with pytest.raises(InputError, match="--workspace"):
            parse_size(bad)
    assert parse_hardware_compat(None) == "none"
    assert parse_hardware_compat("AMPERE_PLUS") == "ampere+"
    assert parse_hardware_compat("same-compute-capability") == "same-cc"
    with pytest.raises(InputError, match="--hardware-compat"):
        parse_hardware_compat("hopper")
    assert trt_build.check_opt_level(5) == 5
    with pytest.raises(InputError, match="0..5"):
        trt_build.check_opt_level(6)


def _io_model(dims_by_input: dict, out_dims=("N", 4)) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, TP.INT64 if "ids" in n else TP.FLOAT, list(d))
              for n, d in dims_by_input.items()]
    first = next(iter(dims_by_input))
    nodes = [helper.make_node("Identity", [first], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", inputs,
                                               [helper.make_tensor_value_info("y", TP.FLOAT, list(out_dims))]))


def test_make_profiles():
    m = _io_model({"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq")})
    (p,) = make_profiles(m, (1, 8, 32), {"input_ids": (1, 128), "attention_mask": (1, 128)})
    assert p.shapes["input_ids"] == ((1, 128), (8, 128), (32, 128))
    assert p.to_json()["attention_mask"] == {"min": [1, 128], "opt": [8, 128], "max": [32, 128]}
    # no --batch: the --input batch, fixed
    (p,) = make_profiles(m, None, {"input_ids": (4, 16), "attention_mask": (4, 16)})
    assert p.shapes["input_ids"] == ((4, 16),) * 3
    # image model: static C, H, W
    m = _io_model({"input": ("N", 3, 8, 8)})
    (p,) = make_profiles(m, (1, 4, 16))
    assert p.shapes["input"] == ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))
    # fully static: no profile needed
    assert make_profiles(_io_model({"input": (2, 3)}, (2, 4)), (1, 2, 2)) == []


def test_make_profiles_errors_are_one_line():
    m = _io_model({"input_ids": ("batch", "seq")})
    with pytest.raises(InputError) as e:
        make_profiles(m, (1, 8, 32))
    text = str(e.value)
    assert "input_ids" in text and "seq" in text and "--input input_ids:?x?" in text and "\n" not in text
    with pytest.raises(InputError, match="rank"):
        make_profiles(m, (1, 8, 32), {"input_ids": (1, 2, 3)})


# ----------------------------------------------------------------------------- availability (item 5)

def test_available_here_names_what_is_missing():
    ok, why = available()
    if ok:
        pytest.skip("this machine has TensorRT and a GPU")
    assert ("tensorrt" in why and "pip install" in why) or "GPU" in why
    assert "\n" not in why
    assert auto_target() == "ort-cpu"


def test_require_message(monkeypatch):
    monkeypatch.setattr(trt_build, "tensorrt_status",
                        lambda: (False, f"the tensorrt Python package is not installed, install it with "
                                        f"{trt_build.INSTALL_TRT}"))
    monkeypatch.setattr(trt_build, "cuda_status", lambda: (True, "NVIDIA A100"))
    with pytest.raises(UnsupportedError) as e:
        require("trt-fp16")
    text = str(e.value)
    assert text.startswith("target trt-fp16 needs TensorRT and an NVIDIA GPU: the tensorrt Python package is not "
                           "installed, install it with pip install 'tensorrt>=10.9'")
    assert "--lower-only" in text and "--target ort-cpu" in text and "GPU is" not in text and "\n" not in text
    assert e.value.exit_code == 3

    monkeypatch.setattr(trt_build, "tensorrt_status", lambda: (True, "TensorRT 10.13.0"))
    monkeypatch.setattr(trt_build, "cuda_status",
                        lambda: (False, "no NVIDIA GPU is visible to CUDA (check nvidia-smi, the NVIDIA driver and "
                                        "CUDA_VISIBLE_DEVICES)"))
    with pytest.raises(UnsupportedError, match=r"needs TensorRT and an NVIDIA GPU: no NVIDIA GPU is visible"):
        require("trt-bf16")
    assert auto_target() == "ort-cpu"

    monkeypatch.setattr(trt_build, "cuda_status", lambda: (True, "NVIDIA A100"))
    require("trt-fp16")  # no error
    assert auto_target() == "trt-fp16"
    assert available() == (True, "TensorRT 10.13.0 on NVIDIA A100")


def test_tensorrt_status_variants(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    ok, why = trt_build.tensorrt_status()
    assert not ok and "not installed" in why and "pip install 'tensorrt>=10.9'" in why
    old = types.ModuleType("tensorrt")
    old.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    ok, why = trt_build.tensorrt_status()
    assert not ok and "10.3.0 is older than 10.9" in why
    ok, why = trt_build.cuda_status()
    import torch

    if torch.version.cuda is None:
        assert not ok and "CPU-only build" in why and "pytorch.org" in why


def test_build_without_tensorrt_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UnsupportedError) as e:
        build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "m.plan"))
    assert "cannot build a TensorRT engine: the tensorrt Python package is not installed" in str(e.value)
    assert "--lower-only" in str(e.value)
    with pytest.raises(UnsupportedError, match="tensorrt"):
        trt_build.EngineRunner(b"plan")
    assert not (tmp_path / "m.plan").exists()


# ----------------------------------------------------------------------------- the builder's calls, recorded

def _fake_tensorrt(version: str, calls: list, parse_ok: bool = True, cache_matches: bool = True,
                   plan_is_onnx: bool = False, plan_is_path: bool = False):
    """A stand-in for the tensorrt module that records the builder's calls in ``calls``.

    ``plan_is_onnx``: the "engine" it builds is the ONNX bytes it parsed, so a stand-in
    runner can execute it on ONNX Runtime (tests/package/test_triton.py). ``plan_is_path``:
    the "engine" is ``b"PLAN:" + path + b"\\n" + bytes`` of the file it parsed (which may keep
    its weights in external data beside it; tests/build/test_trt_pipeline.py).
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    parsed: list[bytes] = []
    paths: list[str] = []

    class Logger:
        WARNING, INFO = 2, 3

        def __init__(self, level):
            calls.append(("logger", level))

    class Flag:
        STRONGLY_TYPED = 0
        PREFER_AOT_PYTHON_PLUGINS = 2

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return self.blob + b"+new"

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, n):
            calls.append(("workspace", pool, n))

        def __setattr__(self, k, v):
            if k in ("builder_optimization_level", "hardware_compatibility_level"):
                calls.append((k, v))
            object.__setattr__(self, k, v)

        def add_optimization_profile(self, p):
            calls.append(("profile", dict(p.shapes)))

        def create_timing_cache(self, blob):
            calls.append(("create_timing_cache", bytes(blob)))
            return Cache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache.blob, ignore_mismatch))
            ok = cache_matches or cache.blob == b""
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self):
            return self.cache

    class OptProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return "network"

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptProfile()

        def build_serialized_network(self, network, config):
            calls.append(("build", network))
            if plan_is_path:
                return b"PLAN:" + paths[-1].encode() + b"\n" + parsed[-1]
            return parsed[-1] if plan_is_onnx else b"PLAN-BYTES"

    class Error:
        def desc(self):
            return "No importer registered for op: NormdeployRMSNorm"

        def node_name(self):
            return "blocks.0.norm1_plugin"

        def node_operator(self):
            return "NormdeployRMSNorm"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse(self, data, path=None):
            calls.append(("parse", len(data), path))
            if path:
                calls.append(("parse_dir", sorted(os.listdir(os.path.dirname(path)))))
                paths.append(path)
            parsed.append(bytes(data))
            if not parse_ok:
                self.num_errors = 2
            return parse_ok

        def get_error(self, i):
            return Error()

    trt.Logger, trt.NetworkDefinitionCreationFlag, trt.Builder, trt.OnnxParser = Logger, Flag, Builder, OnnxParser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(NONE=0, AMPERE_PLUS=1, SAME_COMPUTE_CAPABILITY=2)
    return trt


def _plugins_module(calls):
    mod = types.ModuleType("fake_plugins")
    mod.register_plugins = lambda: calls.append(("register_plugins",)) or ["normdeploy::NormdeployRMSNorm"]
    return mod


@pytest.mark.parametrize("version,strongly", [("10.13.0", True), ("11.0.0", False)])
def test_build_engine_calls(monkeypatch, tmp_path, version, strongly):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(version, calls))
    onnx_path, plan_path, cache = tmp_path / "model.onnx", tmp_path / "model.plan", tmp_path / "timing.cache"
    onnx_path.write_bytes(b"onnx-bytes")
    cache.write_bytes(b"old")
    profile = Profile({"input": ((1, 3), (8, 3), (32, 3))})
    info = build_engine(str(onnx_path), str(plan_path), [profile], workspace_bytes=2**30,
                        timing_cache_path=str(cache), opt_level=4, hardware_compat="ampere+",
                        plugins_module=_plugins_module(calls))
    names = [c[0] for c in calls]
    assert names.index("register_plugins") < names.index("parse")  # plugins registered before parsing
    flags = dict(c for c in calls if c[0] == "create_network")["create_network"]
    assert bool(flags & 1) == strongly and flags & (1 << 2)  # STRONGLY_TYPED on 10.x only; AOT plugins preferred
    assert ("parse", len(b"onnx-bytes"), str(onnx_path)) in calls  # parse(bytes, path=...) for external data
    assert ("workspace", "WORKSPACE", 2**30) in calls
    assert ("builder_optimization_level", 4) in calls and ("hardware_compatibility_level", 1) in calls
    assert ("profile", {"input": ((1, 3), (8, 3), (32, 3))}) in calls
    assert ("set_timing_cache", b"old", False) in calls
    assert plan_path.read_bytes() == b"PLAN-BYTES"
    assert cache.read_bytes() == b"old+new"  # serialized back for the next build
    assert info.timing_cache_reused and info.strongly_typed_flag == strongly and info.plan_bytes == 10
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary files left


def test_build_engine_timing_cache_mismatch_starts_afresh(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.13.0", calls, cache_matches=False))
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "t.cache").write_bytes(b"from another gpu")
    info = build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "m.plan"), timing_cache_path=str(tmp_path / "t.cache"),
                        plugins_module=None)
    assert not info.timing_cache_reused and "started afresh" in info.notes[0]
    assert (tmp_path / "t.cache").read_bytes() == b"+new"


def test_build_engine_parser_error_is_one_line(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.13.0", calls, parse_ok=False))
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(UnsupportedError) as e:
        build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "m.plan"), plugins_module=None)
    text = str(e.value)
    assert text.startswith("TensorRT 10.13.0 cannot parse m.onnx: node blocks.0.norm1_plugin, op NormdeployRMSNorm: "
                           "No importer registered for op: NormdeployRMSNorm (and 1 more)")
    assert "\n" not in text and not (tmp_path / "m.plan").exists()


def test_ort_providers():
    (p,) = [Profile({"input_ids": ((1, 16), (8, 16), (32, 16))})]
    providers = ort_providers("ort-trt", cache_dir="/tmp/cache", profiles=[p], workspace_bytes=2**30, opt_level=3,
                              hardware_compat="ampere+")
    name, opts = providers[0]
    assert name == "TensorrtExecutionProvider" and providers[1][0] == "CUDAExecutionProvider"
    assert providers[-1] == "CPUExecutionProvider"
    assert opts["trt_fp16_enable"] == "False"  # precision comes from the (converted) model: strongly typed
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == "/tmp/cache"
    assert opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_profile_min_shapes"] == "input_ids:1x16" and opts["trt_profile_max_shapes"] == "input_ids:32x16"
    assert opts["trt_max_workspace_size"] == str(2**30) and opts["trt_engine_hw_compatible"] == "True"
    assert ort_providers("ort-cuda")[0][0] == "CUDAExecutionProvider"
    with pytest.raises(ValueError):
        ort_providers("ort-cpu")


def test_percentiles_as_trtexec_reports_them():
    stats = trt_build.percentiles([1.0] * 90 + [2.0] * 9 + [10.0], batch=8)
    assert stats["p50_ms"] == 1.0 and stats["runs"] == 100 and stats["min_ms"] == 1.0 and stats["max_ms"] == 10.0
    # nearest rank, as trtexec: of n sorted, index n - 1 - floor((1 - p/100) n)
    assert stats["p90_ms"] == 1.0 and stats["p95_ms"] == 2.0 and stats["p99_ms"] == 10.0  # float32 arithmetic
    assert stats["mean_ms"] == pytest.approx(1.18) and stats["throughput_per_s"] == 8000.0
    assert trt_build.percentiles([3.0, 1.0])["p50_ms"] == 2.0  # the median of an even count: the middle two
    assert trt_build.percentiles(list(range(1, 11)))["p99_ms"] == 10 and \
        trt_build.percentiles(list(range(1, 11)))["p90_ms"] == 9
    assert (trt_build.TRTEXEC_WARMUP_MS, trt_build.TRTEXEC_DURATION_S, trt_build.TRTEXEC_PERCENTILES) == \
        (200.0, 3.0, (90, 95, 99))


def test_batch_chunks():
    assert trt_build.batch_chunks(4, 1, 8) == [(0, 4, 0)]
    assert trt_build.batch_chunks(4, 1, 1) == [(0, 1, 0), (1, 2, 0), (2, 3, 0), (3, 4, 0)]
    assert trt_build.batch_chunks(64, 1, 16)[-1] == (48, 64, 0)
    assert trt_build.batch_chunks(10, 4, 4) == [(0, 4, 0), (4, 8, 0), (8, 10, 2)]  # padded to the profile's min
    assert trt_build.batch_chunks(2, 4, 8) == [(0, 2, 2)]
    with pytest.raises(ValueError):
        trt_build.batch_chunks(3, 4, 2)


class _Profiled:
    """An EngineRunner's batch handling without an engine: a profile of 2..4, outputs = inputs * 2."""

    input_names, output_names = ["x"], ["y"]

    def __init__(self):
        self.batches = []

    def batch_range(self):
        return 2, 4

    def run(self, feed):
        assert 2 <= feed["x"].shape[0] <= 4
        self.batches.append(feed["x"].shape[0])
        return [feed["x"] * 2]


def test_run_in_profile_splits_and_pads():
    r = _Profiled()
    x = np.arange(9, dtype=np.float32).reshape(9, 1)
    (y,) = trt_build.EngineRunner.run_in_profile(r, {"x": x})
    assert np.array_equal(y, x * 2) and r.batches == [4, 4, 2]  # the last sample padded to the minimum of 2
    (y,) = trt_build.in_profile(r).run({"x": x[:3]})
    assert np.array_equal(y, x[:3] * 2) and r.batches[-1] == 3


class _Timed:
    def __init__(self, name, ms, order):
        self.name, self.ms, self.order, self.bound = name, ms, order, None

    def bind(self, feed):
        self.bound = feed

    def time_once(self):
        self.order.append(self.name)
        return self.ms


def test_measure_interleaved_rotates_warms_up_and_times_each():
    order: list = []
    runners = {n: _Timed(n, ms, order) for n, ms in (("original", 2.0), ("optimized", 1.0), ("floor", 0.5))}
    feed = {"x": np.zeros((1, 2), np.float32)}
    times = trt_build.measure_interleaved(runners, feed, warmup_ms=10.0, duration_s=0.0, min_iterations=6)
    assert all(r.bound is feed for r in runners.values())
    assert {k: len(v) for k, v in times.items()} == {"original": 6, "optimized": 6, "floor": 6}
    assert times["optimized"] == [1.0] * 6
    warm = {"original": 5, "optimized": 10, "floor": 20}  # 10 ms of each one's GPU time first
    timed = order[sum(warm.values()):]
    assert order[:sum(warm.values())] == [n for n, k in warm.items() for _ in range(k)]
    assert timed[:9] == ["original", "optimized", "floor", "optimized", "floor", "original", "floor", "original",
                         "optimized"]  # A B C, B C A, C A B: each position shared equally


def test_engine_tolerance():
    assert trt_build.engine_tolerance("trt-fp16", 1e-4) == 2e-2
    assert trt_build.engine_tolerance("trt-fp32", 1e-1) == 1e-1  # --tolerance wins when larger
    assert trt_build.engine_tolerance("trt-bf16", 1e-4) > trt_build.engine_tolerance("trt-fp16", 1e-4)


def test_save_onnx_uses_external_data_beyond_the_protobuf_limit(monkeypatch, tmp_path):
    """Item 1: TensorRT's parser input is written the way package._save writes model.onnx: weights apart when
    the protobuf would pass 2 GB (here the limit is lowered to 1 kB); the caller's model is left whole."""
    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, [1, 64])], [w])
    model = helper.make_model(g)
    before = model.SerializeToString()
    assert trt_build.save_onnx(model, str(tmp_path / "small.onnx")) == str(tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    monkeypatch.setattr(trt_build, "EXTERNAL_DATA_BYTES", 1000)
    trt_build.save_onnx(model, str(tmp_path / "big.onnx"))
    assert (tmp_path / "big.onnx.data").stat().st_size >= 4096 * 4
    assert (tmp_path / "big.onnx").stat().st_size < 1000
    assert model.SerializeToString() == before
    back = onnx.load(str(tmp_path / "big.onnx"))
    assert np.array_equal(numpy_helper.to_array(back.graph.initializer[0]), numpy_helper.to_array(w))


def test_build_engine_asks_the_plugins_for_portable_kernels(monkeypatch, tmp_path):
    """Item 4: --hardware-compat ampere+ reaches aot_impl (which cannot see the builder config) as portable
    sm_80 PTX; what each aot_impl returned is in the build report."""
    import contextlib

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.13.0", calls))
    mod = _plugins_module(calls)

    @contextlib.contextmanager
    def aot_build_options(hardware_compat="none"):
        calls.append(("aot_build_options", hardware_compat))
        built: list = []
        yield built
        built.append({"plugin": "NormdeployRMSNorm", "target": "sm_80"})  # after the build: not reported

    mod.aot_build_options = aot_build_options
    (tmp_path / "m.onnx").write_bytes(b"x")
    info = build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "m.plan"), hardware_compat="ampere+",
                        plugins_module=mod)
    names = [c[0] for c in calls]
    assert ("aot_build_options", "ampere+") in calls and names.index("aot_build_options") < names.index("build")
    assert info.hardware_compat == "ampere+" and info.plugin_kernels == []
    info = build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "m.plan"), plugins_module=mod)
    assert calls[-2:] == [("aot_build_options", "none"), ("build", "network")]


# ----------------------------------------------------------------------------- on a GPU host

def _lowered_fp16(name="vit_dyt", dtype="fp16"):
    from normdeploy.core.passes import PassContext
    from normdeploy.lower.precision import convert_precision
    from normdeploy.pipeline import Options, prepare, transform

    loaded, original, _ = prepare(os.path.join(MODELS, f"{name}.pt"), Options.from_flat())
    lowered = transform(original, PassContext(target=f"trt-{dtype}")).optimized
    return loaded.inputs, lowered, convert_precision(lowered, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_engine_builds_runs_and_matches_fp32(tmp_path, dtype):
    from normdeploy.build import OrtRunner
    from normdeploy.core.inputs import example_arrays

    specs, fp32, low = _lowered_fp16(dtype=dtype)
    path = tmp_path / "model.onnx"
    onnx.save(low, path)
    profiles = make_profiles(low, (1, 8, 32))
    cache = tmp_path / "timing.cache"
    info = build_engine(str(path), str(tmp_path / "model.plan"), profiles, workspace_bytes=1 << 30,
                        timing_cache_path=str(cache), opt_level=3)
    assert info.plan_bytes > 0 and cache.exists()
    runner = trt_build.EngineRunner(str(tmp_path / "model.plan"))
    feed = example_arrays(specs, seed=0, batch=8)
    got = runner.run(feed)
    from normdeploy.verify.precision import plugins_as_functions

    ref = OrtRunner(plugins_as_functions(fp32)).run(feed)
    for g, r in zip(got, ref):
        assert np.all(np.isfinite(g))
        assert np.abs(g - r).max() / np.abs(r).max() < (2e-2 if dtype == "fp16" else 5e-2)
    stats = runner.measure(feed, warmup=5, runs=50)
    assert stats["p50_ms"] > 0 and stats["p99_ms"] >= stats["p50_ms"]
    again = build_engine(str(path), str(tmp_path / "again.plan"), profiles, timing_cache_path=str(cache))
    assert again.timing_cache_reused
    with pytest.raises(InputError, match="optimization profile"):
        runner.run(example_arrays(specs, seed=0, batch=64))


@pytest.mark.gpu
@gpu
def test_engine_in_triton_repository(tmp_path):
    from normdeploy.package.triton import parse_config, write_repository

    _, _, low = _lowered_fp16()
    onnx.save(low, tmp_path / "model.onnx")
    build_engine(str(tmp_path / "model.onnx"), str(tmp_path / "model.plan"), make_profiles(low, (1, 8, 32)))
    entry = write_repository(str(tmp_path / "repo"), "vit_dyt", low, str(tmp_path / "model.plan"), max_batch_size=32)
    cfg = parse_config(open(os.path.join(entry, "config.pbtxt")).read())
    assert cfg.backend == "tensorrt" and cfg.max_batch_size == 32
    assert open(os.path.join(entry, "1", "model.plan"), "rb").read() == (tmp_path / "model.plan").read_bytes()
