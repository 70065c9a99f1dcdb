"""The trt-* path of the pipeline end to end against the recording stand-in of TensorRT (tests/build/test_trt.py)
on a pretend GPU: what ``optimize`` builds, verifies, gates and times, without TensorRT or a GPU.

The stand-in's "engine" is the path of the ONNX file its parser was given; the stand-in engine runner
loads that file (external data included) and runs it on ONNX Runtime with each plugin op as its
function body, and its "GPU time" is a fixed figure per kind of engine (original 3 ms, optimized 2 ms,
floor 1.5 ms), so that the report's arithmetic is checked exactly.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from normdeploy.build import OrtRunner
from normdeploy.build import trt as trt_build
from normdeploy.core.errors import AccuracyError
from normdeploy.options import Options
from normdeploy.pipeline import optimize
from tests.build.test_trt import _fake_tensorrt
from tests.conftest import MODELS

DIGITS = os.path.join(MODELS, "digits_cnn_bn_un.pt")
VIT_DYT = os.path.join(MODELS, "vit_dyt.pt")
GPU_MS = {"original": 3.0, "optimized": 2.0, "floor": 1.5}
_RUN_IN_PROFILE = getattr(trt_build.EngineRunner, "run_in_profile", None)  # before the fixture replaces the class


def _kind(model: onnx.ModelProto, path: str) -> str:
    """Which engine a parsed file is: the optimized one has the plugin nodes (when the model has any) and is
    the pipeline's ``model.onnx``; the floor has Identity where the normalizations were."""
    if os.path.basename(path) == "model.onnx":
        return "optimized"
    assert not any(n.op_type.startswith("Normdeploy") for n in model.graph.node)
    return "floor" if any(n.name.endswith("_identity") for n in model.graph.node) else "original"


class EngineStandIn(OrtRunner):
    """What EngineRunner offers the pipeline (run, bind, time_once), over the parsed ONNX on ONNX Runtime."""

    corrupt_after: int | None = None  # the optimized "engine" goes wrong after this many runs (a broken plugin)
    made: list = []

    def __init__(self, plan: bytes, *args, **kwargs):
        from normdeploy.verify.precision import plugins_as_functions

        assert plan.startswith(b"PLAN:")
        path, data = plan[5:].split(b"\n", 1)
        path = path.decode()
        # the file with its external data while the build directory is there, else the bytes parsed
        self.model = onnx.load(path) if os.path.exists(path) else onnx.load_from_string(data)
        self.kind = _kind(self.model, path)
        super().__init__(plugins_as_functions(self.model), "ort-cpu", 1)
        self.runs, self.timed = 0, 0
        EngineStandIn.made.append(self)

    calls: list = []

    def run_in_profile(self, feed):  # the real batch splitting, over batch_range below
        return _RUN_IN_PROFILE(self, feed) if _RUN_IN_PROFILE else self.run(feed)

    def batch_range(self):
        """The batch range of the optimization profile the stand-in builder was given last."""
        shapes = [c[1] for c in self.calls if c[0] == "profile"]
        if not shapes:
            return None
        lo, _, hi = next(iter(shapes[-1].values()))
        return lo[0], hi[0]

    def run(self, feed):
        rng = self.batch_range()
        n = next(iter(feed.values())).shape[0]
        assert rng is None or rng[0] <= n <= rng[1], f"batch {n} outside the profile {rng}"
        out = super().run(feed)
        self.runs += 1
        if self.kind == "optimized" and self.corrupt_after is not None and self.runs > self.corrupt_after:
            out = [o * 1.5 + 0.1 for o in out]
        return out

    def bind(self, feed):
        self.bound = feed

    def measure(self, feed, **kwargs):  # what the pipeline before issue 15 called: one engine alone
        return {"p50_ms": float(np.median([self.time_once() for _ in range(10)])), "runs": 10}

    def time_once(self):
        self.timed += 1
        return GPU_MS[self.kind] * (1.0 + 0.01 * ((self.timed * 7) % 5 - 2) / 2)


@pytest.fixture
def recorded_trt(monkeypatch):
    calls: list = []
    fake = _fake_tensorrt("10.13.0", calls, plan_is_path=True)
    monkeypatch.setattr(trt_build, "_import_trt", lambda: fake)
    monkeypatch.setattr(trt_build, "tensorrt_status", lambda: (True, "TensorRT 10.13.0"))
    monkeypatch.setattr(trt_build, "cuda_status", lambda: (True, "a pretend GPU"))
    monkeypatch.setattr(trt_build, "_register_plugins", lambda module: [])
    monkeypatch.setattr(trt_build, "EngineRunner", EngineStandIn)
    monkeypatch.setattr(EngineStandIn, "corrupt_after", None)
    monkeypatch.setattr(EngineStandIn, "made", [])
    monkeypatch.setattr(EngineStandIn, "calls", calls)
    return calls


def test_report_has_the_original_optimized_and_floor_engines(recorded_trt, tmp_path):
    """Item 8: three engines, same precision conversion and profiles, timed interleaved; the report compares them."""
    res = optimize(VIT_DYT, Options.from_flat(target="trt-fp16", seconds=0.2, batch="1:2:4"))
    made = {e.kind: e for e in EngineStandIn.made}
    assert set(made) == {"original", "optimized", "floor"}
    profiles = [c[1] for c in recorded_trt if c[0] == "profile"]
    assert len(profiles) == 3 and profiles[0] == profiles[1] == profiles[2]  # the same optimization profile
    # the baselines went through the same fp16 conversion and carry no plugin node
    for kind in ("original", "floor"):
        m = made[kind].model
        assert not any(n.op_type.startswith("Normdeploy") for n in m.graph.node)
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer), kind
    # the original keeps its DynamicTanh nodes (TensorRT's parser imports their local functions); the floor has none
    assert sum(n.op_type == "DynamicTanh" for n in made["original"].model.graph.node) == 9
    assert not any(n.op_type == "DynamicTanh" for n in made["floor"].model.graph.node)
    lat = res.report["latency"]
    for kind in ("original", "optimized", "floor"):
        assert lat[kind]["p50_ms"] == pytest.approx(GPU_MS[kind], rel=0.02)
        assert {"p90_ms", "p95_ms", "p99_ms", "min_ms", "max_ms", "mean_ms", "cv", "runs"} <= set(lat[kind])
        assert lat[kind]["runs"] >= 10 and made[kind].timed > lat[kind]["runs"]  # warm-up came first
    assert len({made[k].timed for k in made}) >= 1 and lat["optimized"]["runs"] == lat["original"]["runs"]
    assert lat["speedup"] == pytest.approx(1.5, rel=0.03)
    assert lat["norm_cost_left"] == pytest.approx(1 / 3, rel=0.1)
    assert "CUDA events" in lat["method"] and "interleaved" in lat["method"] and lat["batch"] == 2
    assert res.bench is not None and set(res.bench.timings) == {"original", "optimized", "floor"}
    acc = res.report["accuracy"]
    assert acc["engine"]["samples"] >= 16 and acc["engine_tolerance"] == 2e-2
    out = res.save(str(tmp_path / "out"))
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["latency"]["speedup"] == pytest.approx(1.5, rel=0.03)
    assert os.path.exists(os.path.join(out, "latency.png"))


def test_a_broken_engine_is_refused(recorded_trt, tmp_path):
    """Item 6: an engine whose outputs stop matching after the first batch fails the run (exit code 4); every
    input set is compared, fed in batches the profile takes."""
    EngineStandIn.corrupt_after = 1
    with pytest.raises(AccuracyError, match="engine differs") as e:
        optimize(DIGITS, Options.from_flat(target="trt-fp32", bench=False))
    assert e.value.exit_code == 4
    EngineStandIn.corrupt_after = None
    res = optimize(DIGITS, Options.from_flat(target="trt-fp32", bench=False, data=os.path.join(MODELS,
                                                                                               "digits_test.npz")))
    acc = res.report["accuracy"]
    assert acc["engine"]["max_rel_err"] < 1e-5 and acc["engine_data"]["samples"] > 100  # every input set
    (engine,) = [e for e in EngineStandIn.made if e.kind == "optimized"][-1:]
    # the profile takes batch 1 only (the example's): 4 random seeds of 4 samples, then --data, one sample a run
    assert engine.batch_range() == (1, 1) and engine.runs == 4 * 4 + acc["engine_data"]["samples"]
    assert res.report["latency"] is None


def test_models_over_2gb_reach_the_parser_with_external_data(recorded_trt, monkeypatch):
    """Item 1: the parser's input is saved with external data when the protobuf is too large (here the limit
    is lowered; onnx.save refuses above it, as protobuf does at 2 GB)."""
    limit = 20_000
    real_save = onnx.save

    def save(model, path, *args, save_as_external_data=False, **kwargs):
        if not save_as_external_data and model.ByteSize() > limit:
            raise ValueError("The proto size is larger than the 2 GB limit. Please use save_as_external_data to "
                             "save tensors separately from the model file.")
        return real_save(model, path, *args, save_as_external_data=save_as_external_data, **kwargs)

    monkeypatch.setattr(onnx, "save", save)
    monkeypatch.setattr(trt_build, "EXTERNAL_DATA_BYTES", limit, raising=False)
    res = optimize(DIGITS, Options.from_flat(target="trt-fp32", seconds=0.05))
    parsed = [c for c in recorded_trt if c[0] == "parse_dir"]
    assert parsed and all(any(f.endswith(".onnx.data") for f in c[1]) for c in parsed), parsed
    assert res.report["accuracy"]["engine"]["max_rel_err"] < 1e-5  # the weights were there
    assert res.optimized.graph.initializer[0].HasField("raw_data") or res.optimized.graph.initializer[0].float_data
