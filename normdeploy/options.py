"""What a user can ask of normdeploy, in typed groups; every default is written here once.

The Python API (:mod:`normdeploy.api`) takes these groups or their fields as flat keywords
(``optimize(model, data="digits.npz", bench=False)``); the command line
(:mod:`normdeploy.cli`) builds its flags from the same fields: a field's ``metadata``
carries its flag, help text and section, and the flag's default is the field's default.

| group | fields |
|---|---|
| :class:`ExportOptions` | inputs, opset, trust_pickle |
| :class:`RewriteOptions` | allow_approx, calib, max_error, preln_form |
| :class:`VerifyOptions` | data, tolerance |
| :class:`BenchOptions` | bench (run it at all), seconds, warmup, threads, sessions |
| :class:`OrtOptions` | rms_op, graph_optimization, short_row, cleanup, ort_fusions, fp16, engine_cache |
| :class:`TrtOptions` | lower_only, io_dtype, workspace, opt_level, hardware_compat, timing_cache |
| :class:`TuneOptions` | autotune, autotune_seconds |

plus ``target`` and ``batch`` on :class:`Options` itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .bench.timing import ALIVE_MODES, DEFAULT_SESSIONS, ONE_ALIVE_BYTES, ONE_ALIVE_HALF_BYTES
from .core.errors import InputError
from .core.passes import ORT_GRAPH_LEVELS, ORT_RMS_OPS, PRELN_FORMS, SHORT_ROW

TARGETS = ("ort-cpu", "ort-cuda", "ort-trt", "trt-fp32", "trt-fp16", "trt-bf16", "openvino")
CLI_TARGETS = TARGETS + ("auto",)


def _number(value, flag: str, *, low: float, low_ok: bool, integer: bool = False, high: float | None = None,
            example: str = "", inf_ok: bool = False) -> None:
    """Refuse (InputError naming the flag) a value that is not a number in range: NaN never, +inf only
    where ``inf_ok`` (a limit that accepts anything)."""
    import math

    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (not integer and not (math.isfinite(value) or (inf_ok and value > 0))):
        raise InputError(f"{flag} {value!r} is not {kind}", f"give {kind}{example}")
    if value < low or (value == low and not low_ok) or (high is not None and value > high):
        rng = (f"from {low:g} to {high:g}" if high is not None else f"{'at least' if low_ok else 'above'} {low:g}")
        raise InputError(f"{flag} {value:g} is out of range: it must be {rng}", f"give {kind} {rng}{example}")


def check_input_text(text) -> None:
    """Refuse an ``--input`` that is not ``[NAME:]SHAPE[:DTYPE]`` (``::::``, an empty name, ...)."""
    from .core.inputs import parse_input_spec

    if not isinstance(text, str) or not text.strip():
        raise InputError(f"--input {text!r} is empty", "write it as name:1x3x224x224 (dtype optional: name:1x16:int64)")
    parts = text.split(":")
    if len(parts) > 3 or any(not p.strip() for p in parts):
        raise InputError(f"--input {text!r} is not NAME:SHAPE[:DTYPE]",
                         "write it as name:1x3x224x224 (dtype optional: name:1x16:int64)")
    parse_input_spec(text)


def flag(*decls: str, help: str, metavar: str | None = None, choices: tuple | None = None,
         is_flag: bool = False, hidden_aliases: tuple[str, ...] = ()) -> dict:
    """Field metadata: how the field appears on the command line."""
    return {"cli": {"decls": decls, "help": help, "metavar": metavar, "choices": choices, "is_flag": is_flag,
                    "aliases": hidden_aliases}}


@dataclass(frozen=True)
class ExportOptions:
    """How the model is read and exported to ONNX."""

    inputs: tuple[str, ...] = field(default=(), metadata=flag(
        "--input", metavar="NAME:SHAPE[:DTYPE]",
        help="Input shape, e.g. input:1x3x224x224 or input_ids:1x128:int64; repeatable. Default: read from the model."))
    opset: int = field(default=20, metadata=flag("--opset", help="ONNX opset for torch exports."))
    trust_pickle: bool = field(default=False, metadata=flag(
        "--trust-pickle", is_flag=True,
        help="Unpickle torch files that reference classes outside torch.nn and normdeploy "
             "(unpickling runs code: only for files you trust)."))

    def __post_init__(self):
        for text in self.inputs:
            check_input_text(text)
        _number(self.opset, "--opset", low=7, low_ok=True, integer=True, example=", such as 17 or 20")


@dataclass(frozen=True)
class RewriteOptions:
    """Which rewrites run, and the limits of the approximate ones."""

    allow_approx: bool = field(default=False, metadata=flag(
        "--allow-approx", is_flag=True, help="Also run approximate rewrites (need --calib)."))
    calib: str | None = field(default=None, metadata=flag(
        "--calib", metavar="FILE.npz", help="Calibration inputs (.npz, one array per model input) for --allow-approx."))
    max_error: float = field(default=1e-2, metadata=flag(
        "--max-error", help="With --allow-approx: largest accepted max relative error; above it the run is refused."))
    preln_form: str = field(default="rmsnorm", metadata=flag(
        "--preln-form", choices=PRELN_FORMS, help="What the LayerNorms of a pre-LN residual stream become (both exact)."))

    def __post_init__(self):
        _number(self.max_error, "--max-error", low=0, low_ok=True, example=", such as 1e-2", inf_ok=True)


@dataclass(frozen=True)
class VerifyOptions:
    """What the optimized model is compared with the original on, and how closely."""

    data: str | None = field(default=None, metadata=flag(
        "--data", metavar="FILE.npz", help="Real inputs for the accuracy check: an .npz with one array per model input."))
    tolerance: float | None = field(default=None, metadata=flag(
        "--tolerance", help="Largest accepted max relative error of the optimized model against the original "
                            "(exact rewrites; default by the float type the model computes in: 1e-4 for float32, "
                            "1e-2 for float16, 8e-2 for bfloat16)."))

    def __post_init__(self):
        if self.tolerance is not None:  # None: by the model's compute dtype (pipeline.DEFAULT_TOLERANCE)
            _number(self.tolerance, "--tolerance", low=0, low_ok=True, example=", such as 1e-4", inf_ok=True)


#: ``--bench-alive`` choices: :data:`normdeploy.bench.timing.ALIVE_MODES`, or ``auto`` (:func:`~normdeploy.bench.timing.one_session_alive`)
BENCH_ALIVE = ("auto",) + ALIVE_MODES


@dataclass(frozen=True)
class BenchOptions:
    """The interleaved latency run."""

    bench: bool = field(default=True, metadata=flag(
        "--bench/--no-bench", help="Measure latency (original, optimized and floor, interleaved)."))
    seconds: float = field(default=3.0, metadata=flag(
        "--seconds", help="Time budget of the interleaved latency run.", hidden_aliases=("--bench-seconds",)))
    warmup: int = field(default=10, metadata=flag("--warmup", help="Untimed calls of every variant first."))
    threads: int | None = field(default=None, metadata=flag(
        "--threads", help="Intra-op threads of every session (default: available cores, at most 8)."))
    sessions: int = field(default=DEFAULT_SESSIONS, metadata=flag(
        "--sessions", help="Sessions each variant is timed in (created in rotating order, each interleaved with "
                           "the others; a session's own bias then enters the 95 % interval instead of the ratio)."))
    alive: str = field(default="auto", metadata=flag(
        "--bench-alive", choices=BENCH_ALIVE,
        help="Sessions alive at once in the latency run: 'all' (every variant's, calls interleaved round by "
             "round), 'one' (variants timed in turn, one session's memory), 'auto' (one from "
             f"{ONE_ALIVE_BYTES >> 20} MiB of weights, {ONE_ALIVE_HALF_BYTES >> 20} MiB for a half-precision model "
             "on the CPU)."))

    def __post_init__(self):
        _number(self.seconds, "--seconds (--bench-seconds)", low=0, low_ok=False, example=", such as 3 (seconds)")
        _number(self.sessions, "--sessions", low=1, low_ok=True, integer=True, example=", such as 3")
        _number(self.warmup, "--warmup", low=0, low_ok=True, integer=True, example=", such as 10")
        if self.alive not in BENCH_ALIVE:
            raise InputError(f"--bench-alive {self.alive!r} is not a choice", "use auto, all or one")
        if self.threads is not None:
            _number(self.threads, "--threads", low=1, low_ok=True, integer=True, example=", such as 1")


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime targets (ort-cpu, ort-cuda, ort-trt)."""

    rms_op: str = field(default="simplified", metadata=flag(
        "--ort-rms-op", choices=ORT_RMS_OPS,
        help="RMSNorm as ONNX Runtime's SimplifiedLayerNormalization (fastest measured), as the standard "
             "opset-23 RMSNormalization (the file then passes onnx.checker), or decomposed into "
             "Mul, ReduceMean, Add, Sqrt, Div."))
    graph_optimization: str = field(default="all", metadata=flag(
        "--ort-graph-optimization", choices=ORT_GRAPH_LEVELS,
        help="ONNX Runtime's session graph optimization level for the optimized model (timed with it, and "
             "written into the Triton entry's config.pbtxt): disable, basic, extended or all (ONNX Runtime's "
             "default)."))
    short_row: int = field(default=SHORT_ROW, metadata=flag(
        "--ort-short-row", metavar="N",
        help="GroupScaling (PowerNorm) rows shorter than N stay decomposed ops; longer ones use ONNX Runtime's "
             "fused RMS kernel (0: always fused)."))
    cleanup: bool = field(default=True, metadata=flag(
        "--cleanup/--no-cleanup",
        help="ort-*: end the lower stage with an exact graph clean-up (constant and shape-arithmetic folding, "
             "no-op and redundant nodes, Pad into Conv; onnxscript's optimizer rules); the floor gets the same."))
    ort_fusions: bool = field(default=False, metadata=flag(
        "--ort-fusions/--no-ort-fusions",
        help="ort-cpu: fuse each residual Add into the LayerNorm/RMSNorm that reads it (ONNX Runtime's "
             "SkipLayerNormalization / SkipSimplifiedLayerNormalization; exact). Off by default: no gain "
             "measured on GPT-2/Llama/ViT/BERT-sized models."))
    fp16: bool = field(default=False, metadata=flag(
        "--fp16", is_flag=True, help="Run the optimized model in fp16, normalization statistics in fp32."))
    engine_cache: str | None = field(default=None, metadata=flag(
        "--engine-cache", metavar="DIR", help="ort-trt: directory for ONNX Runtime's TensorRT engine and timing caches."))

    def __post_init__(self):
        _number(self.short_row, "--ort-short-row", low=0, low_ok=True, integer=True, example=", such as 64")


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT targets (trt-fp32, trt-fp16, trt-bf16)."""

    lower_only: bool = field(default=False, metadata=flag(
        "--lower-only", is_flag=True,
        help="Write the plugin-lowered, precision-converted ONNX and stop (no GPU needed)."))
    io_dtype: str = field(default="fp32", metadata=flag(
        "--io-dtype", choices=("fp32", "fp16", "bf16"), help="trt-fp16/bf16: dtype of the model's inputs and outputs."))
    workspace: str | None = field(default=None, metadata=flag(
        "--workspace", metavar="SIZE", help="TensorRT workspace limit, e.g. 2G."))
    opt_level: int | None = field(default=None, metadata=flag(
        "--opt-level", help="TensorRT builder optimization level 0-5."))
    hardware_compat: str = field(default="none", metadata=flag(
        "--hardware-compat", metavar="none|ampere+|same-cc", help="TensorRT hardware compatibility of the engine."))
    timing_cache: str | None = field(default=None, metadata=flag(
        "--timing-cache", metavar="FILE", help="TensorRT timing cache file, read if present and written back."))

    def __post_init__(self):
        if self.opt_level is not None:
            _number(self.opt_level, "--opt-level", low=0, low_ok=True, high=5, integer=True)


@dataclass(frozen=True)
class TuneOptions:
    """Choices made by measurement on this machine (:mod:`normdeploy.autotune`, ort-* targets)."""

    autotune: bool = field(default=False, metadata=flag(
        "--autotune", is_flag=True,
        help="ort-*: build every exact variant of the lowering and session settings (RMSNorm form, GroupScaling "
             "short rows, graph optimization level), time them interleaved here and keep the fastest; the "
             "report says each one's speedup against the default and the flags that reproduce the choice."))
    autotune_seconds: float = field(default=10.0, metadata=flag(
        "--autotune-seconds", help="Time budget of the autotune's interleaved timing (all candidates together)."))

    def __post_init__(self):
        _number(self.autotune_seconds, "--autotune-seconds", low=0, low_ok=False, example=", such as 10 (seconds)")


GROUPS = {"export": ExportOptions, "rewrite": RewriteOptions, "verify": VerifyOptions, "bench": BenchOptions,
          "ort": OrtOptions, "trt": TrtOptions, "tune": TuneOptions}


@dataclass(frozen=True)
class Options:
    """Everything :func:`normdeploy.optimize` and the commands take."""

    target: str = field(default="ort-cpu", metadata=flag(
        "--target", choices=CLI_TARGETS,
        help="What to deploy to; openvino = OpenVINO's CPU plugin at f32; auto = trt-fp16 where TensorRT and a GPU "
             "are present, else ort-cpu."))
    batch: str | None = field(default=None, metadata=flag(
        "--batch", metavar="N|MIN:OPT:MAX",
        help="Batch for latency (OPT) and the TensorRT optimization profile's range (default: the input's)."))
    export: ExportOptions = ExportOptions()
    rewrite: RewriteOptions = RewriteOptions()
    verify: VerifyOptions = VerifyOptions()
    bench: BenchOptions = BenchOptions()
    ort: OrtOptions = OrtOptions()
    trt: TrtOptions = TrtOptions()
    tune: TuneOptions = TuneOptions()

    @classmethod
    def from_flat(cls, base: Options | None = None, **values: Any) -> Options:
        """``base`` (default: all defaults) with flat field values applied: ``from_flat(data=..., seconds=1)``.

        A group may also be given whole (``rewrite=RewriteOptions(...)`` or a dict of its fields).
        """
        base = base or cls()
        top, groups = {}, {name: {} for name in GROUPS}
        for key, value in values.items():
            if key in GROUPS and (isinstance(value, (GROUPS[key], dict))):
                groups[key].update(dataclasses.asdict(value) if not isinstance(value, dict) else value)
            elif key in ("target", "batch"):
                top[key] = value
            elif key in FLAT:
                groups[FLAT[key]][key] = value
            else:
                raise InputError(f"unknown option {key!r}", f"options are: {', '.join(sorted(('target', 'batch', *FLAT)))}")
        replaced = {name: dataclasses.replace(getattr(base, name), **vals) for name, vals in groups.items() if vals}
        if "inputs" in groups["export"]:
            replaced["export"] = dataclasses.replace(replaced["export"], inputs=tuple(groups["export"]["inputs"]))
        return dataclasses.replace(base, **top, **replaced)


#: flat field name -> its group
FLAT: dict[str, str] = {f.name: group for group, kind in GROUPS.items() for f in dataclasses.fields(kind)}
assert len(FLAT) == sum(len(dataclasses.fields(k)) for k in GROUPS.values()), "flat option names must be unique"
