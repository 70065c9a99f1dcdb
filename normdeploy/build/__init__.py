"""Stage ``build``: a lowered ONNX model becomes something that runs.

Every runner has the same face: ``input_names``, ``output_names`` and
``run(feed) -> list[np.ndarray]``, so verify and bench never care what is behind it.

* :class:`OrtRunner`: an ONNX Runtime session (``ort-cpu`` here; ``ort-cuda``/``ort-trt``
  pick those execution providers), sequential execution, a fixed thread count.
* :class:`normdeploy.build.openvino.OpenVinoRunner`: OpenVINO's CPU plugin at f32 (the ``openvino``
  target); :func:`make_runner` picks the runner of a target.
* :class:`TorchRunner`: the original torch module in eval mode (export fidelity).
* :class:`Recorded`: the outputs another runner gave for a list of feeds, replayed (large ones
  from memory-mapped files in a temporary directory), so that verification needs only one
  session alive at a time and no output set held in memory.

Sessions of in-memory models past :data:`SESSION_FILE_BYTES` of weights are made from a file
(``onnx_ir.save`` with external data: memory-mapped weights are copied file to file with
``copy_file_range``, never read into this process), which ONNX Runtime reads once; a
serialized protobuf would hold the weights twice more in memory before the session has them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from ..core.errors import InputError, UnsupportedError
from ..core.graph import to_proto, weight_bytes
from ..core.store import release_mappings

#: in-memory models with more weight bytes than this get their session from a file
SESSION_FILE_BYTES = 32 << 20
#: recorded outputs at least this large go to memory-mapped files (:class:`Recorded`)
RECORD_SPILL_BYTES = 1 << 20

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


#: targets whose models run on another runtime than ONNX Runtime: target -> the runtime's name
OTHER_RUNTIMES = {"openvino": "OpenVINO"}


class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def default_threads() -> int:
    import os

    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


@dataclass(frozen=True)
class _InputMeta:
    name: str
    shape: list


class OrtRunner:
    def __init__(self, model, target: str = "ort-cpu", threads: int | None = None,
                 graph_optimization: str = "all", providers: list | None = None, prepack: bool = True,
                 lean: bool = False):
        """``model``: an ``onnx_ir.Model``, an ``onnx.ModelProto``, serialized bytes, or a path to an .onnx file.

        An in-memory model with more than :data:`SESSION_FILE_BYTES` of weights is written to a
        temporary directory with external data and the session is created from the file (see the
        module docstring); smaller ones are serialized in memory. :meth:`close` frees the session.

        ``prepack=False`` turns off ONNX Runtime's weight prepacking (``session.disable_prepacking``):
        the session then never holds a packed and an unpacked copy of a weight at once, at the cost
        of packing per call; verification without a latency run uses it, timing never does.

        ``lean=True`` (verification sessions of half-precision models, never timed ones) turns off the
        CPU memory arena and memory patterns and orders execution by priority: ONNX Runtime's
        arena keeps every buffer it ever grew to, and its default order runs the Casts of weights
        (inserted where the CPU provider lacks a float16 kernel) as soon as they are ready, all
        before the first MatMul, so that every float32 copy is alive at once; measured on a 2.2 GB
        fp16 Llama at graph optimization level ``disable``: peak 7.6 GB with the defaults, 4.1 GB
        lean. Results are unchanged (the same kernels on the same values, in another order).
        """
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        so.log_severity_level = 3
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if lean:
            so.enable_cpu_mem_arena = False
            so.enable_mem_pattern = False
            so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        missing = [p for p in PROVIDERS[target][:-1] if p not in ort.get_available_providers()]
        if missing:
            raise UnsupportedError(f"target {target} needs ONNX Runtime's {missing[0]}, which this install lacks",
                                   "install onnxruntime-gpu on a CUDA host, or use --target ort-cpu")
        self._tmp = None
        data = self._session_source(model)
        try:
            self.session = ort.InferenceSession(data, so, providers=providers or PROVIDERS[target])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedError(f"ONNX Runtime cannot load the model: {first[:300]}",
                                   "an op or type may be unsupported by this runtime; run inspect to see which") from None
        self.threads = so.intra_op_num_threads
        # a failed run raises with ONNX Runtime's message: its logger (errors, level 3) would print it a second time
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # plain copies: ORT's NodeArg objects keep the whole session (and its weights) alive after close()
        self._input_meta = {i.name: _InputMeta(i.name, list(i.shape)) for i in self.session.get_inputs()}

    def _session_source(self, model):
        import onnx_ir as ir

        if isinstance(model, (bytes, str)):
            return model
        if isinstance(model, onnx.ModelProto):
            return model.SerializeToString()
        if isinstance(model, ir.Model):
            if weight_bytes(model) <= SESSION_FILE_BYTES:
                return to_proto(model).SerializeToString()
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="normdeploy-session-")
            path = f"{self._tmp.name}/model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            # writing read every memory-mapped weight of ``model``: its pages count in this process's resident
            # memory until the maps close (they reopen when read again); the session reads its own copy
            release_mappings(model)
            return path
        raise TypeError(f"cannot build an ONNX Runtime session from a {type(model).__name__}")

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        for name, meta in self._input_meta.items():
            if name not in feed:
                raise InputError(f"no data for model input {name}", f"the model takes {', '.join(self.input_names)}")
            shape = feed[name].shape
            if len(shape) != len(meta.shape):
                raise InputError(f"input {name} has rank {len(shape)}, the model expects {len(meta.shape)} "
                                 f"({meta.shape})", "fix --input or the data file")
            for i, (s, m) in enumerate(zip(shape, meta.shape)):
                if isinstance(m, int) and m != s:
                    raise InputError(f"input {name} dimension {i} is {s}, the model fixes it to {m} ({meta.shape})",
                                     "fix --input or the data file")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: v for k, v in feed.items() if k in self._input_meta}, self._run_options)

    def close(self) -> None:
        """Free the session (and its copy of the weights) and the file it was made from."""
        self.session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return_freed_memory()


def make_runner(model, target: str, threads: int | None = None, **ort_options):
    """The runner of ``target`` for ``model``: :class:`OrtRunner` for ort-* targets (``ort_options`` are its
    keywords), :class:`normdeploy.build.openvino.OpenVinoRunner` for ``openvino`` (f32, ``threads``)."""
    if target == "openvino":
        from .openvino import OpenVinoRunner

        return OpenVinoRunner(model, threads)
    return OrtRunner(model, target, threads, **ort_options)


def runtime_cause(e: BaseException) -> str:
    """The one-line cause of a runtime's failure to run a model, e.g. ``Reshape node /Reshape_new_reshape: The
    input tensor cannot be reshaped to the requested shape. Input shape:{2,16,5}, requested shape:{2,16,3,1}``
    (ONNX Runtime's message without its source path and check expression)."""
    import re

    text = " ".join(str(e).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    detail = text.split("Status Message:", 1)[-1].strip()
    if " was false. " in detail:
        detail = detail.split(" was false. ", 1)[1]
    cause = f"{node.group(1)} node {node.group(2)}: {detail}" if node else f"{type(e).__name__}: {detail}"
    return cause[:300]


def runtime_name(target: str) -> str:
    """The runtime a target's models run on, as the report names it."""
    return OTHER_RUNTIMES.get(target, "ONNX Runtime")


def return_freed_memory() -> None:
    """Hand memory freed on the C heap back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc raises its mmap threshold after large frees (up to 32 MB), so the weights of a closed
    session often sit in free heap chunks that still count as resident until trimmed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Recorded:
    """``runner``'s outputs for each of ``feeds``, computed now; :meth:`run` replays them for those feeds.

    A feed is known by identity (the same dict object), as :func:`normdeploy.verify.compare` passes it.

    Outputs of at least :data:`RECORD_SPILL_BYTES` are written to ``.npy`` files in a temporary
    directory as soon as they are computed and replayed memory-mapped (read-only), so that the
    recording holds no output set in memory: an LM's logits are large (Qwen2's vocabulary of
    151936 makes 78 MB per set of 4 x 32 tokens) and verification records several sets. Smaller
    outputs stay in memory. The directory is removed by :meth:`close` or when the recording is
    garbage-collected. Exactness: ``np.save``/``np.load`` round-trip the array's bytes, dtype and
    shape unchanged.
    """

    def __init__(self, runner: Runner, feeds: list[dict[str, np.ndarray]]):
        import tempfile
        import weakref

        self.input_names, self.output_names = runner.input_names, runner.output_names
        self._outputs: dict[int, list] = {}
        self.directory: str | None = None
        for i, f in enumerate(feeds):
            outs = list(runner.run(f))
            for j, o in enumerate(outs):
                o = np.asarray(o)
                if o.nbytes >= RECORD_SPILL_BYTES and o.dtype != object:
                    if self.directory is None:
                        self.directory = tempfile.mkdtemp(prefix="normdeploy-recorded-")
                        self._cleanup = weakref.finalize(self, _remove_tree, self.directory)
                    path = f"{self.directory}/{i}_{j}.npy"
                    np.save(path, o, allow_pickle=False)
                    outs[j] = path
            self._outputs[id(f)] = outs
            del outs
        self._feeds = feeds  # keeps the ids valid

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            outs = self._outputs[id(feed)]
        except KeyError:
            raise KeyError("Recorded.run: a feed it was not recorded on") from None
        return [np.load(o, mmap_mode="r") if isinstance(o, str) else o for o in outs]

    def close(self) -> None:
        """Remove the spilled outputs (replaying a closed recording fails)."""
        if self.directory is not None:
            self._cleanup()
            self._outputs.clear()


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class TorchRunner:
    def __init__(self, module, input_names: list[str], output_names: list[str]):
        self.module, self.input_names, self.output_names = module, input_names, output_names

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names))
        outs = out if isinstance(out, (tuple, list)) else [out]
        flat = []
        for o in outs:
            if isinstance(o, dict):
                flat.extend(v for v in o.values())
            else:
                flat.append(o)
        return [o.detach().numpy() for o in flat if hasattr(o, "detach")]
