"""Stage ``build`` for the ``trt-*`` targets: a TensorRT engine from the lowered ONNX model.

The only module that imports ``tensorrt`` (always inside functions: importing this module
needs neither TensorRT nor a GPU). What it does, in TensorRT's own terms:

* :func:`build_engine`: a network created strongly typed (``STRONGLY_TYPED`` on 10.x;
  TensorRT 11 networks are always strongly typed and the flag is ignored, so it is not
  passed there), so every tensor keeps the type the ONNX file gives it: the precision
  decisions of :mod:`normdeploy.lower.precision` are final. normdeploy's plugins are registered
  (``normdeploy.lower.plugins.trt_plugins.register_plugins``) before ``OnnxParser.parse(bytes, path=...)``;
  one optimization profile per ``--batch MIN:OPT:MAX``; the workspace pool limit; a timing
  cache read from and written back to ``--timing-cache`` (shared across builds); builder
  optimization level; hardware compatibility level (``ampere+`` also makes the plugins
  compile portable sm_80 PTX: ``aot_build_options``). ``model.plan`` is written atomically.
* :func:`save_onnx`: the parser's input file, with external data beyond 2 GB (protobuf's limit).
* :class:`EngineRunner`: ``deserialize_cuda_engine``, named I/O tensors, ``set_input_shape``
  and ``set_tensor_address`` on torch CUDA buffers, ``execute_async_v3`` on a torch CUDA
  stream. Same face as :class:`normdeploy.build.OrtRunner` (``input_names``,
  ``output_names``, ``run(feed) -> list[np.ndarray]``; :meth:`EngineRunner.run_in_profile`
  splits a batch the profile does not take), plus device-side timing with CUDA events
  (:meth:`EngineRunner.time_once`, :meth:`EngineRunner.measure`).
* :func:`measure_interleaved`: several engines timed in alternation, trtexec's warm-up and
  duration, summarized by :func:`percentiles` as trtexec reports GPU compute time.
* :data:`ENGINE_TOLERANCE`: how far an engine may be from the original before it is refused.
* :func:`available` / :func:`require` / :func:`auto_target`: whether TensorRT and a CUDA
  device are usable here, and the one-line error (DESIGN.md section 8) when they are not.
* :func:`parse_batch`, :func:`parse_size`, :func:`make_profiles`: flag parsing, tested on CPU.
* :func:`ort_providers`: ONNX Runtime's CUDA / TensorRT execution-provider options for the
  ``ort-cuda`` / ``ort-trt`` targets (engine and timing caches, profiles).
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..core.errors import InputError, UnsupportedError
from ..core.graph import save_model

MIN_TENSORRT = (10, 9)
TRT_TARGETS = ("trt-fp32", "trt-fp16", "trt-bf16")
HARDWARE_COMPAT = ("none", "ampere+", "same-cc")
INSTALL_TRT = "pip install 'tensorrt>=10.9' (the tensorrt-cu12 or -cu13 wheel matching your CUDA)"
INSTALL_TORCH_CUDA = "install a CUDA build of torch from https://pytorch.org/get-started/locally/"


# ----------------------------------------------------------------------------- availability

def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def tensorrt_status() -> tuple[bool, str]:
    """(usable, detail) for the tensorrt Python package alone."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, f"the tensorrt Python package is not installed, install it with {INSTALL_TRT}"
    except Exception as e:  # noqa: BLE001 - a broken install raises anything (missing libnvinfer, ...)
        return False, f"the tensorrt package fails to import ({type(e).__name__}: {str(e).splitlines()[0][:120]}), " \
                      f"reinstall it with {INSTALL_TRT}"
    version = getattr(trt, "__version__", "0")
    if _version_tuple(version) < MIN_TENSORRT:
        return False, f"TensorRT {version} is older than {'.'.join(map(str, MIN_TENSORRT))} (ahead-of-time " \
                      f"plugins), upgrade with {INSTALL_TRT}"
    return True, f"TensorRT {version}"


def cuda_status() -> tuple[bool, str]:
    """(usable, detail) for a CUDA device, seen through torch (which the runner uses for memory)."""
    try:
        import torch
    except ImportError:
        return False, f"torch is not installed, {INSTALL_TORCH_CUDA}"
    if torch.version.cuda is None:
        return False, f"no CUDA GPU is usable (torch {torch.__version__} is a CPU-only build; on a GPU host, " \
                      f"{INSTALL_TORCH_CUDA})"
    try:
        ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception as e:  # noqa: BLE001 - driver problems surface here
        return False, f"CUDA initialization failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not ok:
        return False, "no NVIDIA GPU is visible to CUDA (check nvidia-smi, the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
    return True, torch.cuda.get_device_name(0)


def available() -> tuple[bool, str]:
    """Whether TensorRT engines can be built and run here; the reason names everything missing."""
    trt_ok, trt_why = tensorrt_status()
    gpu_ok, gpu_why = cuda_status()
    if trt_ok and gpu_ok:
        return True, f"{trt_why} on {gpu_why}"
    return False, " and ".join(why for ok, why in ((gpu_ok, gpu_why), (trt_ok, trt_why)) if not ok)


def require(target: str) -> None:
    """Raise the one-line error of a ``trt-*`` target on a machine that cannot build engines."""
    ok, why = available()
    if not ok:
        raise UnsupportedError(f"target {target} needs TensorRT and an NVIDIA GPU: {why}",
                               "or pass --lower-only to write the TensorRT-ready ONNX here for a GPU host, "
                               "or use --target ort-cpu")


def auto_target() -> str:
    """``--target auto``: trt-fp16 where TensorRT and a GPU are present, else ort-cpu."""
    return "trt-fp16" if available()[0] else "ort-cpu"


# ----------------------------------------------------------------------------- flags

def parse_batch(text: str | int | None) -> tuple[int, int, int] | None:
    """``--batch``: ``MIN:OPT:MAX`` (``1:8:32``), or ``N`` meaning ``1:N:N`` (batches 1..N, tuned for N)."""
    if text is None:
        return None
    parts = str(text).strip().split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or any(v < 1 for v in values):
        raise InputError(f"--batch {text!r} is not N or MIN:OPT:MAX with positive integers",
                         "write e.g. --batch 8 or --batch 1:8:32")
    lo, opt, hi = values
    if not lo <= opt <= hi:
        raise InputError(f"--batch {text!r}: needs MIN <= OPT <= MAX", "write e.g. --batch 1:8:32")
    return lo, opt, hi


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_size(text: str | int | None) -> int | None:
    """``--workspace``: bytes, or a number with K/M/G (binary units): ``512M``, ``4G``, ``1.5GiB``."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise InputError(f"--workspace {text!r} is not a size", "write bytes or a size such as 512M or 4G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_hardware_compat(text: str | None) -> str:
    value = (text or "none").lower().replace("_", "-")
    aliases = {"ampere-plus": "ampere+", "ampereplus": "ampere+", "same-compute-capability": "same-cc"}
    value = aliases.get(value, value)
    if value not in HARDWARE_COMPAT:
        raise InputError(f"--hardware-compat {text!r} is unknown", f"use one of {', '.join(HARDWARE_COMPAT)}")
    return value


def check_opt_level(level: int | None) -> int | None:
    if level is not None and not 0 <= int(level) <= 5:
        raise InputError(f"--opt-level {level} is out of range", "TensorRT's builder optimization level is 0..5 "
                                                                 "(default 3; higher builds longer, may run faster)")
    return None if level is None else int(level)


@dataclass
class Profile:
    """One optimization profile: per input name, the (min, opt, max) shapes."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in self.shapes.items()}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def make_profiles(model: onnx.ModelProto, batch: tuple[int, int, int] | None,
                  input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[Profile]:
    """Optimization profiles for ``model``'s inputs: one profile, or [] when every input is static.

    A dynamic first axis takes ``batch`` (MIN, OPT, MAX), or the ``--input`` batch for all
    three when no ``batch`` is given; every other dynamic axis takes its size from
    ``input_shapes`` (the ``--input`` shapes), the same in min, opt and max. Static axes
    keep their size.
    """
    input_shapes = input_shapes or {}
    inputs = _graph_inputs(model)
    if all(d.HasField("dim_value") for vi in inputs for d in vi.type.tensor_type.shape.dim):
        return []
    shapes = {}
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        given = input_shapes.get(vi.name)
        if given is not None and len(given) != len(static):
            raise InputError(f"--input {vi.name} has rank {len(given)}, the model's input has rank {len(static)}",
                             "fix --input")
        lo, opt, hi = [], [], []
        for axis, s in enumerate(static):
            if s is not None:
                sizes = (s, s, s)
            elif axis == 0 and batch:
                sizes = batch
            elif given is not None:
                sizes = (given[axis],) * 3
            else:
                name = dims[axis].dim_param or "?"
                shown = "x".join(str(v) if v is not None else "?" for v in static)
                raise InputError(f"input {vi.name} has a dynamic axis {axis} ({name}) and no size to build the "
                                 "engine for", f"pass --input {vi.name}:{shown} with each ? replaced by a size "
                                 "(the batch axis also takes --batch MIN:OPT:MAX)")
            lo.append(sizes[0])
            opt.append(sizes[1])
            hi.append(sizes[2])
        shapes[vi.name] = (tuple(lo), tuple(opt), tuple(hi))
    return [Profile(shapes)]


# ----------------------------------------------------------------------------- build

@dataclass
class BuildInfo:
    plan_path: str
    plan_bytes: int
    seconds: float
    tensorrt_version: str
    strongly_typed_flag: bool
    profiles: list[dict]
    timing_cache: str | None
    timing_cache_reused: bool
    notes: list[str] = field(default_factory=list)
    hardware_compat: str = "none"
    #: per plugin layer, what ``aot_impl`` returned: kernel, PTX target and ISA, parameter counts, block
    plugin_kernels: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _import_trt():
    ok, why = tensorrt_status()
    if not ok:
        raise UnsupportedError(f"cannot build a TensorRT engine: {why}", "or pass --lower-only on this machine")
    import tensorrt as trt

    return trt


def _plugins(plugins_module):
    if isinstance(plugins_module, str):
        import importlib

        return importlib.import_module(plugins_module)
    return plugins_module


def _register_plugins(plugins_module) -> list[str]:
    plugins_module = _plugins(plugins_module)
    if plugins_module is None:
        return []
    register = getattr(plugins_module, "register_plugins", None)
    return list(register() or []) if register else []


def _aot_options(plugins_module, hardware_compat: str):
    """The plugins' build options for this engine (``aot_impl`` cannot see the builder config), or a no-op."""
    import contextlib

    options = getattr(_plugins(plugins_module), "aot_build_options", None)
    return options(hardware_compat=hardware_compat) if options else contextlib.nullcontext([])


#: models whose protobuf is larger than this are written with external data (protobuf's limit is 2 GiB)
EXTERNAL_DATA_BYTES = 1_800_000_000


def save_onnx(model, path: str) -> str:
    """Write ``model`` for TensorRT's parser: its weights in ``<name>.data`` next to it when it is too large
    for one protobuf (> :data:`EXTERNAL_DATA_BYTES`), which ``OnnxParser.parse(bytes, path=...)`` reads
    relative to ``path``. ``model`` itself is left untouched (saving with external data empties the
    tensors of the proto it writes, so a copy is written). An ``onnx_ir.Model`` is streamed
    (:func:`normdeploy.core.graph.save_model`). Returns ``path``."""
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        save_model(model, path, external_above=EXTERNAL_DATA_BYTES)
        return path
    if model.ByteSize() <= EXTERNAL_DATA_BYTES:
        onnx.save(model, path)
        return path
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(path) + ".data", size_threshold=1024)
    return path


def parser_errors(parser) -> list[str]:
    """Every error the ONNX parser recorded, one line each: node, op, description."""
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        parts = []
        for attr, label in (("node_name", "node"), ("node_operator", "op")):
            try:
                v = getattr(e, attr)()
            except Exception:  # noqa: BLE001 - older TensorRT lacks these accessors
                v = None
            if v:
                parts.append(f"{label} {v}")
        desc = str(e.desc()).strip().replace("\n", " ")
        lines.append(f"{', '.join(parts) + ': ' if parts else ''}{desc}")
    return lines


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_engine(onnx_path: str, plan_path: str, profiles: list[Profile] | None = None,
                 workspace_bytes: int | None = None, timing_cache_path: str | None = None,
                 opt_level: int | None = None, hardware_compat: str = "none",
                 plugins_module="normdeploy.lower.plugins.trt_plugins", verbose: bool = False) -> BuildInfo:
    """Build ``model.plan`` from the lowered (and precision-converted) ONNX at ``onnx_path``."""
    trt = _import_trt()
    hardware_compat = parse_hardware_compat(hardware_compat)
    check_opt_level(opt_level)
    t0 = time.perf_counter()
    notes: list[str] = []
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    _register_plugins(plugins_module)
    builder = trt.Builder(logger)
    major = _version_tuple(trt.__version__)[0]
    flags = 0
    flag_enum = trt.NetworkDefinitionCreationFlag
    strongly = getattr(flag_enum, "STRONGLY_TYPED", None)
    if strongly is not None and major < 11:  # TensorRT 11: always strongly typed, the flag is deprecated
        flags |= 1 << int(strongly)
    prefer_aot = getattr(flag_enum, "PREFER_AOT_PYTHON_PLUGINS", None)
    if prefer_aot is not None:  # serialize the plugins' compiled kernels, never a Python callback
        flags |= 1 << int(prefer_aot)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        data = f.read()
    if not parser.parse(data, path=os.path.abspath(onnx_path)):
        errors = parser_errors(parser)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UnsupportedError(f"TensorRT {trt.__version__} cannot parse {os.path.basename(onnx_path)}: "
                               f"{errors[0] if errors else 'unknown parser error'}{more}"[:400],
                               "check the op is supported by this TensorRT version and its plugin is registered; "
                               "run `normdeploy inspect` and rerun with --debug for the full list")

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    if hardware_compat != "none":
        level_name = {"ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}[hardware_compat]
        level = getattr(trt.HardwareCompatibilityLevel, level_name, None)
        if level is None:
            raise UnsupportedError(f"TensorRT {trt.__version__} has no hardware compatibility level {hardware_compat}",
                                   "upgrade TensorRT or drop --hardware-compat")
        config.hardware_compatibility_level = level

    for p in profiles or []:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    reused = False
    if timing_cache_path:
        blob = b""
        if os.path.exists(timing_cache_path):
            with open(timing_cache_path, "rb") as f:
                blob = f.read()
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            notes.append(f"timing cache {timing_cache_path} was made by another TensorRT version or GPU; "
                         "started afresh")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        else:
            reused = bool(blob)

    with _aot_options(plugins_module, hardware_compat) as kernels:
        serialized = builder.build_serialized_network(network, config)
        kernels = [dict(k) for k in kernels]
    if serialized is None:
        raise UnsupportedError(f"TensorRT {trt.__version__} failed to build an engine from "
                               f"{os.path.basename(onnx_path)} (see the TensorRT log above)",
                               "try a larger --workspace, another --opt-level, or --target ort-cpu")
    plan = bytes(serialized)
    _atomic_write(plan_path, plan)
    if timing_cache_path:
        _atomic_write(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    if hardware_compat == "ampere+" and kernels:
        notes.append("hardware compatibility ampere+: the plugin kernels are sm_80 PTX, which the driver JITs on "
                     "any Ampere or later GPU")
    return BuildInfo(plan_path, len(plan), time.perf_counter() - t0, trt.__version__,
                     bool(flags & (1 << int(strongly))) if strongly is not None else False,
                     [p.to_json() for p in profiles or []], timing_cache_path, reused, notes, hardware_compat,
                     kernels)


# ----------------------------------------------------------------------------- run

def _torch_dtype(trt, dt):
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
    for name, tdt in table.items():
        if getattr(trt.DataType, name, None) == dt:
            return tdt
    raise UnsupportedError(f"engine tensor type {dt} is not supported by the runner", "use fp32/fp16/bf16/int I/O")


#: trtexec's defaults (samples/common/sampleOptions.h): warm-up 200 ms, at least 10 iterations over 3 s,
#: percentiles 90, 95 and 99
TRTEXEC_WARMUP_MS, TRTEXEC_DURATION_S, TRTEXEC_MIN_ITERATIONS, TRTEXEC_PERCENTILES = 200.0, 3.0, 10, (90, 95, 99)


def _trtexec_percentile(sorted_ms: np.ndarray, p: float) -> float:
    """trtexec's percentile: of n ascending times, the one at index n - 1 - floor((1 - p/100) n) (nearest rank)."""
    n = sorted_ms.size
    f32 = np.float32
    exclude = int((f32(1) - f32(p) / f32(100)) * f32(n))  # in float32, as trtexec computes it
    return float(sorted_ms[max(n - 1 - exclude, 0)])


def percentiles(times_ms: list[float], batch: int | None = None) -> dict:
    """GPU compute times summarized as trtexec reports them: min, max, mean, median, p90/p95/p99, CV.

    ``p50_ms`` is the median (the mean of the middle two for an even count), ``pNN_ms`` trtexec's
    nearest-rank percentiles, ``cv`` the coefficient of variation; with ``batch``, the
    throughput at the median (samples per second).
    """
    a = np.sort(np.asarray(times_ms, np.float64))
    if a.size == 0:
        raise ValueError("no timings")
    stats = {"p50_ms": float(np.median(a)),
             **{f"p{p}_ms": _trtexec_percentile(a, p) for p in TRTEXEC_PERCENTILES},
             "min_ms": float(a[0]), "max_ms": float(a[-1]), "mean_ms": float(a.mean()),
             "cv": float(a.std() / a.mean()) if a.mean() > 0 else 0.0, "runs": int(a.size)}
    if batch is not None:
        stats["batch"] = int(batch)
        stats["throughput_per_s"] = batch * 1000.0 / stats["p50_ms"] if stats["p50_ms"] > 0 else float("inf")
    return stats


def batch_chunks(n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """How to feed ``n`` samples to an engine whose profile takes batches ``lo..hi``: (start, stop, pad) runs.

    Runs of ``hi``; a last run shorter than ``lo`` is padded with ``pad`` repeats of its last
    sample (their outputs dropped). ``n`` within ``lo..hi``: one run.
    """
    if n < 1 or lo < 1 or hi < lo:
        raise ValueError(f"cannot split a batch of {n} for a profile of {lo}..{hi}")
    if lo <= n <= hi:
        return [(0, n, 0)]
    out = []
    for start in range(0, n, hi):
        stop = min(n, start + hi)
        out.append((start, stop, max(0, lo - (stop - start))))
    return out


def measure_interleaved(runners: dict, feed: dict[str, np.ndarray], *, warmup_ms: float = TRTEXEC_WARMUP_MS,
                        duration_s: float = TRTEXEC_DURATION_S, min_iterations: int = TRTEXEC_MIN_ITERATIONS,
                        max_iterations: int = 1_000_000, warmup_calls: int = 2,
                        progress=None) -> dict[str, list[float]]:
    """GPU compute time per execution of every runner, interleaved (A B C, B C A, C A B, ...).

    Each runner binds ``feed`` once (its own device buffers and stream), warms up for
    ``warmup_ms`` of its own GPU time (and at least ``warmup_calls`` executions), then every
    round times one execution of each runner with CUDA events (:meth:`EngineRunner.time_once`)
    until ``duration_s`` have passed and each has ``min_iterations`` samples: trtexec's warm-up
    and duration, with the engines alternating so that clock and thermal drift cancel in
    their ratios. Returns name -> ms.
    """
    names = list(runners)
    for n in names:
        runners[n].bind(feed)
    for n in names:
        spent, k = 0.0, 0
        while spent < warmup_ms or k < warmup_calls:
            spent += runners[n].time_once()
            k += 1
    times: dict[str, list[float]] = {n: [] for n in names}
    start, rounds = time.perf_counter(), 0
    while rounds < max_iterations and (rounds < min_iterations or time.perf_counter() - start < duration_s):
        k = rounds % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(runners[n].time_once())
        rounds += 1
        if progress is not None:
            progress(min(1.0, (time.perf_counter() - start) / max(duration_s, 1e-9)))
    return times


#: the largest max relative error accepted of a TensorRT engine against the original on ONNX Runtime, per
#: target (never below --tolerance): fp32 engines may run matrix products in TF32 (TensorRT's default on
#: Ampere and later), fp16/bf16 ones round every activation to 11 / 8 significant bits
ENGINE_TOLERANCE = {"trt-fp32": 5e-3, "trt-fp16": 2e-2, "trt-bf16": 6e-2}


def engine_tolerance(target: str, tolerance: float) -> float:
    return max(float(tolerance), ENGINE_TOLERANCE.get(target, 0.0))


class EngineRunner:
    """Runs a serialized TensorRT engine; the face of :class:`normdeploy.build.OrtRunner`.

    ``run`` uploads the feed, executes on its own CUDA stream, waits for it and returns
    host arrays (bf16 outputs come back as float32: numpy has no bfloat16).
    """

    def __init__(self, plan: bytes | str, device: int = 0, plugins_module="normdeploy.lower.plugins.trt_plugins"):
        trt = _import_trt()
        ok, why = cuda_status()
        if not ok:
            raise UnsupportedError(f"cannot run a TensorRT engine: {why}", "run it on a GPU host")
        import torch

        if isinstance(plan, str):
            with open(plan, "rb") as f:
                plan = f.read()
        try:
            _register_plugins(plugins_module)  # AOT engines do not need it; a JIT fallback would
        except ImportError:
            pass
        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UnsupportedError("TensorRT cannot load this engine (built by another TensorRT version or for "
                                   "another GPU)", "rebuild model.plan on this host, or build with --hardware-compat")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._buffers: dict[str, object] = {}
        self._events = None

    def batch_range(self) -> tuple[int, int] | None:
        """(min, max) batch of the engine's first input with a batch axis: profile 0, or its fixed size."""
        for name in self.input_names:
            shape = tuple(self.engine.get_tensor_shape(name))
            if not shape:
                continue
            if shape[0] >= 0:
                return shape[0], shape[0]
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            return int(lo[0]), int(hi[0])
        return None

    def run_in_profile(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """:meth:`run` on any batch: split into runs the optimization profile accepts (:func:`batch_chunks`)."""
        rng = self.batch_range()
        n = next(iter(feed.values())).shape[0] if feed else 0
        if rng is None or not n or rng[0] <= n <= rng[1]:
            return self.run(feed)
        parts: list[list[np.ndarray]] = []
        for start, stop, pad in batch_chunks(n, *rng):
            chunk = {k: v[start:stop] for k, v in feed.items()}
            if pad:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()}
            parts.append([o[:stop - start] for o in self.run(chunk)])
        return [np.concatenate(outs) for outs in zip(*parts)]

    def bind(self, feed: dict[str, np.ndarray]) -> None:
        """Upload ``feed``, set input shapes and allocate outputs (kept for :meth:`execute`)."""
        torch = self.torch
        for name in self.input_names:
            if name not in feed:
                raise InputError(f"no data for engine input {name}", f"the engine takes {', '.join(self.input_names)}")
            host = torch.from_numpy(np.ascontiguousarray(feed[name]))
            t = host.to(self.device).to(self.dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"input {name} shape {tuple(t.shape)} is outside the engine's optimization profile",
                                 "rebuild with a --batch / --input range that covers it")
            self.context.set_tensor_address(name, t.data_ptr())
            self._buffers[name] = t
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UnsupportedError(f"engine output {name} has a data-dependent shape {shape}",
                                       "the runner supports outputs whose shape follows from the inputs")
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, t.data_ptr())
            self._buffers[name] = t
        torch.cuda.current_stream(self.device).synchronize()  # the uploads ran on the default stream

    def execute(self) -> None:
        """Launch on the runner's stream and wait for it (inputs bound by :meth:`bind`)."""
        torch = self.torch
        torch.cuda.current_stream(self.device).synchronize()  # uploads happened on the default stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UnsupportedError("TensorRT execute_async_v3 failed (see the TensorRT log)", "rerun with --debug")
        self.stream.synchronize()

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.bind(feed)
        self.execute()
        out = []
        for name in self.output_names:
            t = self._buffers[name]
            if t.dtype == self.torch.bfloat16:
                t = t.float()
            out.append(t.cpu().numpy())
        return out

    def time_once(self) -> float:
        """GPU time of one execution on the bound buffers (ms), from CUDA events recorded on the runner's stream."""
        torch = self.torch
        if self._events is None:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        start, end = self._events
        start.record(self.stream)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UnsupportedError("TensorRT execute_async_v3 failed (see the TensorRT log)", "rerun with --debug")
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))

    def measure(self, feed: dict[str, np.ndarray], warmup: int = 20, runs: int = 200,
                seconds: float | None = None) -> dict:
        """This engine alone: GPU time per execution after ``warmup`` runs (:func:`percentiles`)."""
        self.bind(feed)
        for _ in range(warmup):
            self.time_once()
        times = []
        start_all = time.perf_counter()
        for _ in range(runs):
            times.append(self.time_once())
            if seconds is not None and time.perf_counter() - start_all > seconds:
                break
        return percentiles(times, next(iter(feed.values())).shape[0] if feed else 1)


class _InProfile:
    """A runner's face over :meth:`EngineRunner.run_in_profile` (what verify compares on any batch)."""

    def __init__(self, runner):
        self.runner = runner
        self.input_names, self.output_names = runner.input_names, runner.output_names

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return getattr(self.runner, "run_in_profile", self.runner.run)(feed)


def in_profile(runner) -> _InProfile:
    """``runner`` fed in batches its optimization profile takes (runners without profiles: unchanged)."""
    return _InProfile(runner)


def gpu_info() -> dict:
    """The GPU, its driver and the TensorRT version: the provenance of engine timings."""
    info: dict = {}
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                        cuda_runtime=torch.version.cuda)
    except Exception:  # noqa: BLE001
        pass
    try:
        import tensorrt as trt

        info["tensorrt"] = trt.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


# ----------------------------------------------------------------------------- ONNX Runtime GPU providers

def _shape_list(profile: Profile, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profile.shapes.items())


def ort_providers(target: str, cache_dir: str | None = None, profiles: list[Profile] | None = None,
                  workspace_bytes: int | None = None, opt_level: int | None = None,
                  hardware_compat: str = "none", device_id: int = 0) -> list:
    """``providers=`` for ``onnxruntime.InferenceSession`` on the ``ort-cuda`` / ``ort-trt`` targets.

    Precision comes from the model itself (feed it the fp16/bf16 model of
    :mod:`normdeploy.lower.precision`): ``trt_fp16_enable`` is left off, because it asks TensorRT
    for weak typing (gone in TensorRT 11); with it off, ONNX Runtime's TensorRT provider
    builds a strongly typed network from the file's types. ``cache_dir`` enables the engine
    and timing caches there (reused across sessions and models).
    """
    cuda = ("CUDAExecutionProvider", {"device_id": str(device_id), "cudnn_conv_algo_search": "EXHAUSTIVE"})
    if target == "ort-cuda":
        return [cuda, "CPUExecutionProvider"]
    if target != "ort-trt":
        raise ValueError(f"not an ONNX Runtime GPU target: {target}")
    opts = {"device_id": str(device_id), "trt_fp16_enable": "False"}
    if cache_dir:
        opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache_dir,
                     "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache_dir})
    if workspace_bytes:
        opts["trt_max_workspace_size"] = str(int(workspace_bytes))
    if opt_level is not None:
        opts["trt_builder_optimization_level"] = str(check_opt_level(opt_level))
    if parse_hardware_compat(hardware_compat) == "ampere+":
        opts["trt_engine_hw_compatible"] = "True"
    if profiles:
        p = profiles[0]
        opts.update({"trt_profile_min_shapes": _shape_list(p, 0), "trt_profile_opt_shapes": _shape_list(p, 1),
                     "trt_profile_max_shapes": _shape_list(p, 2)})
    return [("TensorrtExecutionProvider", opts), cuda, "CPUExecutionProvider"]
