"""Stage ``build`` for the ``openvino`` target: OpenVINO's CPU plugin behind the runner face of
:mod:`normdeploy.build`, and the OpenVINO IR that Triton's OpenVINO backend serves.

The only module of the package that imports ``openvino`` (``normdeploy.bench.peers`` runs its
``openvino`` peer through :class:`OpenVinoRunner`).

What OpenVINO 2026.4.1's ONNX frontend does with normdeploy's files (checked here, CPU plugin):

* it does not read model-local ONNX functions ("Model wasn't fully converted" for a file with a
  ``normdeploy`` node and its function body), so every model is given to it with its local
  functions inlined (:func:`inline_functions`); normdeploy's ``openvino`` lowering leaves none
  in ``model.onnx`` (:mod:`normdeploy.lower.openvino`);
* RMSNorm as opset-23 ``RMSNormalization``, as ONNX Runtime's ``SimplifiedLayerNormalization``
  (default or ``com.microsoft`` domain) and as ``Mul(x, x)``, ``ReduceMean``, ``Add``, ``Sqrt``,
  ``Div`` all compile to its one fused ``RMS`` kernel; ``LayerNormalization`` to ``MVN``.

Exactness: OpenVINO's CPU plugin may compute in bf16 by default on CPUs with AMX or AVX512-BF16
(its ``INFERENCE_PRECISION_HINT``); every model here is compiled with ``INFERENCE_PRECISION_HINT
= f32``, and :attr:`OpenVinoRunner.precision` reads back what the compiled model says it uses.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx

from ..core.errors import InputError, UnsupportedError
from ..core.graph import to_proto, weight_bytes

#: the CPU plugin's configuration for every compiled model (threads added per runner)
CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
INSTALL_HINT = "pip install openvino (2024.0 or newer), or use --target ort-cpu"


def version() -> str | None:
    """The installed OpenVINO's version, or None where it is not installed."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("openvino")
    except Exception:  # noqa: BLE001 - not installed
        return None


def require() -> None:
    """Refuse (one line) where OpenVINO cannot be imported: the ``openvino`` target needs it."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise UnsupportedError("target openvino needs the openvino package, which is not installed",
                               INSTALL_HINT) from None


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every local function inlined and the opsets nothing uses dropped: standard ops only,
    for tools that read files (OpenVINO, onnxslim, onnxoptimizer). ``onnx.inliner`` does the work."""
    import onnx.inliner

    if not model.functions:
        return model
    out = onnx.inliner.inline_local_functions(model)
    used = {n.domain for n in out.graph.node}
    keep = [o for o in out.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def readable_source(model) -> tuple:
    """What ``ov.Core().read_model`` reads for ``model``, with local functions inlined (OpenVINO's ONNX
    frontend does not read them): serialized bytes, or for a model over 1 GiB of weights a file with
    external data in a temporary directory (a protobuf cannot pass 2 GiB). Returns ``(source, tmpdir)``;
    ``tmpdir`` (or None) is the caller's to clean up."""
    import onnx_ir as ir

    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    if isinstance(model, ir.Model) and weight_bytes(model) > (1 << 30):
        from onnx_ir.passes.common import InlinePass

        clone = model.clone()
        InlinePass()(clone)
        tmp = tempfile.TemporaryDirectory(prefix="normdeploy-openvino-")
        path = os.path.join(tmp.name, "model.onnx")
        ir.save(clone, path, external_data="model.onnx.data")
        return path, tmp
    if isinstance(model, ir.Model):
        model = to_proto(model)
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"cannot build an OpenVINO model from a {type(model).__name__}")
    return inline_functions(model).SerializeToString(), None


class OpenVinoRunner:
    """OpenVINO's CPU plugin behind the runner face of :mod:`normdeploy.build`.

    ``model``: an ``onnx_ir.Model``, an ``onnx.ModelProto`` or serialized bytes; local functions are
    inlined first (the ONNX frontend does not read them). OpenVINO is fastest on static shapes (a
    dynamic batch axis costs it milliseconds per call on small models), so, as its documentation
    advises, the model is reshaped to each input shape it is called with and compiled once per
    shape, with :data:`CONFIG` (f32, LATENCY) and ``INFERENCE_NUM_THREADS = threads``.
    """

    def __init__(self, model, threads: int | None = None):
        import openvino as ov

        from . import default_threads

        self.core = ov.Core()
        self.threads = int(threads or default_threads())
        self.config = {**CONFIG, "INFERENCE_NUM_THREADS": self.threads}
        self._source, self._tmp = readable_source(model)
        try:
            probe = self.core.read_model(self._source)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError with its C++ trace
            raise UnsupportedError(f"OpenVINO cannot read the model: {_first_line(e)}",
                                   "an op may be unsupported by OpenVINO's ONNX frontend; use --target ort-cpu") from None
        self.input_names = [i.get_any_name() for i in probe.inputs]
        self.output_names = [o.get_any_name() for o in probe.outputs]
        self._input_meta = {i.get_any_name(): i.get_partial_shape() for i in probe.inputs}
        self._compiled: dict[tuple, tuple] = {}
        self.precision: str | None = None  # what the compiled model reports, after the first call
        self.layers: dict[str, int] = {}  # normalization layers of the last compiled model (layer_counts)

    def _request(self, feed: dict[str, np.ndarray]):
        key = tuple((n, feed[n].shape) for n in self.input_names)
        if key not in self._compiled:
            m = self.core.read_model(self._source)
            m.reshape({n: list(feed[n].shape) for n in self.input_names})
            try:
                compiled = self.core.compile_model(m, "CPU", self.config)
            except Exception as e:  # noqa: BLE001
                raise UnsupportedError(f"OpenVINO cannot compile the model: {_first_line(e)}",
                                       "use --target ort-cpu") from None
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
            self.layers = layer_counts(compiled)
            self._compiled[key] = (compiled, compiled.create_infer_request())
        return self._compiled[key]

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        for name, shape in self._input_meta.items():
            if name not in feed:
                raise InputError(f"no data for model input {name}", f"the model takes {', '.join(self.input_names)}")
            got = feed[name].shape
            if shape.rank.is_static and len(got) != shape.rank.get_length():
                raise InputError(f"input {name} has rank {len(got)}, the model expects {shape.rank.get_length()} "
                                 f"({shape})", "fix --input or the data file")
            if shape.rank.is_static:
                for i, (s, d) in enumerate(zip(got, shape)):
                    if d.is_static and d.get_length() != s:
                        raise InputError(f"input {name} dimension {i} is {s}, the model fixes it to "
                                         f"{d.get_length()} ({shape})", "fix --input or the data file")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled, request = self._request(feed)
        res = request.infer({n: feed[n] for n in self.input_names})
        return [np.array(res[o]) for o in compiled.outputs]

    def close(self) -> None:
        """Free the compiled models and the file a large model was read from."""
        self._compiled.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


#: OpenVINO CPU layer types that are normalizations, as its compiled model names them
NORM_LAYERS = ("RMS", "MVN", "NormalizeL2", "BatchNormInference")


def layer_counts(compiled) -> dict[str, int]:
    """How many layers of each :data:`NORM_LAYERS` type a compiled model runs (its runtime graph's
    ``layerType``): what OpenVINO made of the model's normalizations after its own fusions."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        kind = op.get_rt_info()["layerType"].astype(str)
        if kind in NORM_LAYERS:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def runtime_info(runner: OpenVinoRunner | None = None) -> dict:
    """report.json's ``runtime`` block for the ``openvino`` target: what ran, on what, in which precision."""
    import openvino as ov

    core = ov.Core()
    info = {"name": "OpenVINO", "version": version(), "device": "CPU",
            "device_name": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            "capabilities": [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")],
            "config": dict(CONFIG)}
    if runner is not None:
        info["threads"] = runner.threads
        info["config"]["INFERENCE_NUM_THREADS"] = runner.threads
        info["inference_precision"] = runner.precision  # read back from the compiled model
    return info


def save_ir(model, path: str) -> list[str]:
    """Write ``model`` (ONNX, local functions inlined) as OpenVINO IR ``path`` (``.xml``) and its ``.bin``.

    ``compress_to_fp16=False``: ``openvino.save_model`` would otherwise store the weights in fp16,
    which is not exact. Returns the files written.
    """
    import openvino as ov

    source, tmp = readable_source(model)
    try:
        ov.save_model(ov.Core().read_model(source), path, compress_to_fp16=False)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return [path, os.path.splitext(path)[0] + ".bin"]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return ((useful or lines or [type(e).__name__])[0])[:300]
