"""The tools a user would pick instead of normdeploy, each applied to the same model.

``bench`` times these side by side with normdeploy's original, optimized and floor
models, in the same interleaved run (DESIGN.md section 6; what each tool does with
normalization is in PEERS.md). Every peer starts from the model normdeploy exported,
runs with the same intra-op thread count, and is checked for accuracy against the
original like normdeploy's own output.

| peer | what it is |
|---|---|
| ``original`` (not built here) | the exported original on ONNX Runtime at ``ORT_ENABLE_ALL``, which *is* ONNX Runtime's default graph optimization; the "ORT default" peer and normdeploy's baseline are one column |
| ``ort-basic`` | the same file at ``ORT_ENABLE_BASIC`` (constant folding, redundant-node removal, Conv+BN fold) |
| ``ort-extended`` | the same file at ``ORT_ENABLE_EXTENDED`` (basic plus ONNX Runtime's contrib-op fusions: LayerNorm, GELU, attention), without ``ENABLE_ALL``'s layout passes |
| ``ort-disable`` | the same file at ``ORT_DISABLE_ALL``: what ONNX Runtime's graph optimizer buys at all |
| ``ort-transformers`` | ``onnxruntime.transformers.optimizer.optimize_model(path, model_type, num_heads=0, hidden_size=0)`` (0 = detect), then ``ORT_ENABLE_ALL``; ``model_type`` is guessed (:func:`guess_model_type`), and a model without attention is not given to it |
| ``onnxslim`` | ``onnxslim.slim(model)``, then ``ORT_ENABLE_ALL`` |
| ``onnxoptimizer`` | ``onnxoptimizer.optimize(model)`` (its fuse-and-eliminate passes, incl. ``fuse_bn_into_conv``), then ``ORT_ENABLE_ALL`` |
| ``openvino`` | OpenVINO's CPU plugin reading the ONNX file, reshaped to static input shapes (one compiled model per shape), ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_PRECISION_HINT=f32`` (it would pick bf16 on CPUs with AMX), ``INFERENCE_NUM_THREADS`` = the thread count (:class:`normdeploy.build.openvino.OpenVinoRunner`); optional; with ``--target openvino`` it is the original column itself |
| ``torch`` | the torch module in eager mode under ``torch.no_grad()``, ``torch.set_num_threads`` = the thread count; only when the input is a torch model |

The file tools and OpenVINO get the original with normdeploy's canonical nodes inlined
from their ONNX function bodies (``onnx.inliner.inline_local_functions``): standard ops
only, which is what they would see from a plain export. ONNX Runtime inlines the same
bodies itself. A peer that refuses the model, crashes, or is not installed is kept as a
column reading ``n/a: <reason>``, never dropped silently.

:func:`prepare` does the part of a peer that does not depend on the thread count (the
tools' rewrites of the model, seconds on a large one) once; :func:`instantiate` makes its
runner for one thread count, so a benchmark over several thread counts and batch sizes
rewrites each model once. :func:`build` is the two in one.
"""
from __future__ import annotations

import contextlib
import io
import logging
import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from ..build.openvino import OpenVinoRunner, inline_functions

PEERS = ("torch", "ort-disable", "ort-basic", "ort-extended", "ort-transformers", "onnxslim", "onnxoptimizer", "openvino")

WHAT = {
    "original": "exported original, ONNX Runtime ORT_ENABLE_ALL (= ONNX Runtime's default optimizations)",
    "optimized": "normdeploy's optimized model, ONNX Runtime ORT_ENABLE_ALL",
    "floor": "original with every normalization (incl. recognized decomposed ones) replaced by Identity "
             "(wrong output; the bound)",
    "torch": "torch eager, no_grad",
    "ort-disable": "exported original, ONNX Runtime ORT_DISABLE_ALL",
    "ort-basic": "exported original, ONNX Runtime ORT_ENABLE_BASIC",
    "ort-extended": "exported original, ONNX Runtime ORT_ENABLE_EXTENDED",
    "ort-transformers": "onnxruntime.transformers.optimizer.optimize_model, then ORT_ENABLE_ALL",
    "onnxslim": "onnxslim.slim, then ORT_ENABLE_ALL",
    "onnxoptimizer": "onnxoptimizer.optimize (fuse and eliminate passes), then ORT_ENABLE_ALL",
    "openvino": "OpenVINO CPU plugin, LATENCY hint, f32",
}

#: name fragments -> the transformers optimizer's model_type
_TYPE_HINTS = (("gpt2", "gpt2"), ("gpt", "gpt2"), ("llama", "gpt2"), ("bert", "bert"), ("vit", "vit"),
               ("swin", "swin"), ("t5", "t5"), ("bart", "bart"), ("clip", "clip"), ("phi", "phi"))


@dataclass
class Peer:
    name: str
    what: str
    runner: object | None = None
    status: str = "ok"  # "ok" or "n/a: <reason>"
    info: dict = field(default_factory=dict)
    #: (threads, target) -> runner: what :func:`instantiate` calls; None where the peer is n/a
    make: Callable[[int, str], object] | None = field(default=None, repr=False, compare=False)
    factory: object | None = None  # () -> another runner like ``runner``: a further timed session (instantiate)


def parse_peers(text: str | None) -> tuple[str, ...]:
    """``"all"``, ``"none"`` or a comma-separated list of :data:`PEERS`."""
    from ..core.errors import InputError

    if text is None or text.strip() in ("", "all"):
        return PEERS
    if text.strip() == "none":
        return ()
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in PEERS]
    if bad:
        raise InputError(f"unknown peer {bad[0]!r}", f"choose from {', '.join(PEERS)}, 'all' or 'none'")
    return names


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") if text else ""
    return f"n/a: {type(e).__name__}: {first}"[:240] if first else f"n/a: {type(e).__name__}"


@contextlib.contextmanager
def _quiet():
    """Silence the peers' chatter: Python prints, warnings, loggers and ONNX Runtime's C++ log."""
    import warnings

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(level)


def has_attention(model: onnx.ModelProto) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return "Softmax" in ops and "MatMul" in ops or bool(ops & {"Attention", "MultiHeadAttention"})


def guess_model_type(model: onnx.ModelProto, hint: str = "") -> str | None:
    """The transformers optimizer's ``model_type`` for this model, or None when it has no attention.

    A name fragment of the model (``gpt2``, ``bert``, ``vit``, ...) decides first; a graph
    with attention (Softmax and MatMul) and no such hint is treated as an encoder (``bert``,
    the optimizer's generic type); a graph without attention is not a transformer.
    """
    if not has_attention(model):
        return None
    low = os.path.basename(hint).lower()
    for frag, mt in _TYPE_HINTS:
        if frag in low:
            return mt
    return "bert"


class TorchEagerRunner:
    """The torch module in eval mode with a fixed thread count (:class:`normdeploy.build.TorchRunner`)."""

    def __init__(self, module, input_names: list[str], output_names: list[str], threads: int):
        import torch

        from ..build import TorchRunner

        torch.set_num_threads(int(threads))
        self.inner = TorchRunner(module, input_names, output_names)
        self.input_names, self.output_names, self.threads = input_names, output_names, threads

    def run(self, feed):
        return self.inner.run(feed)


def _ort(model: onnx.ModelProto, target: str, threads: int, level: str = "all"):
    from ..build import PROVIDERS, OrtRunner

    # the ONNX Runtime peers of a non-ONNX-Runtime target (openvino) run on ONNX Runtime's CPU provider
    return OrtRunner(model, target if target in PROVIDERS else "ort-cpu", threads, graph_optimization=level)


def _ort_maker(model: onnx.ModelProto, level: str = "all", workdir: str | None = None,
               name: str = "model") -> Callable[[int, str], object]:
    """``(threads, target) -> runner``; with ``workdir``, a model past :data:`normdeploy.build.SESSION_FILE_BYTES`
    is written there once (external data) and every session is made from that file: a session made from a
    serialized protobuf holds the weights about twice more (measured: 1.2 GB against 0.36 GB a session of
    GPT-2 small), which a benchmark holding a dozen sessions at once cannot afford."""
    source = _to_file(model, workdir, name) if workdir else model
    return lambda threads, target: _ort(source, target, threads, level)


def _to_file(model: onnx.ModelProto, workdir: str, name: str) -> onnx.ModelProto | str:
    """``model`` saved as ``workdir/name.onnx`` with external data (the proto untouched), or ``model`` itself
    where its weights are small enough to serialize."""
    import onnx_ir as ir

    from ..build import SESSION_FILE_BYTES

    if sum(len(t.raw_data) for t in model.graph.initializer) <= SESSION_FILE_BYTES:
        return model
    path = os.path.join(workdir, f"{name}.onnx")
    ir.save(ir.from_proto(model), path, external_data=f"{name}.onnx.data")
    return path


def _transformers(original: onnx.ModelProto, inlined: onnx.ModelProto, hint: str, workdir: str | None = None) -> Peer:
    peer = Peer("ort-transformers", WHAT["ort-transformers"])
    model_type = guess_model_type(original, hint)
    if model_type is None:
        peer.status = "n/a: no attention (Softmax+MatMul) in the graph; the optimizer targets transformer models"
        return peer
    from onnxruntime.transformers.optimizer import optimize_model

    peer.info["model_type"] = model_type
    with tempfile.TemporaryDirectory(prefix="normdeploy-peer-") as d:
        path = os.path.join(d, "model.onnx")
        onnx.save(inlined, path)
        try:
            with _quiet():
                om = optimize_model(path, model_type=model_type, num_heads=0, hidden_size=0)
        except Exception as e:  # noqa: BLE001 - its crash is the result
            peer.status = _reason(e).replace("n/a: ", f"n/a: optimize_model(model_type={model_type!r}) crashed: ", 1)
            return peer
        stats = {}
        with contextlib.suppress(Exception), _quiet():
            stats = {k: int(v) for k, v in om.get_fused_operator_statistics().items() if v}
        peer.info["fused"] = stats
        peer.what = f"{WHAT['ort-transformers']} (model_type={model_type!r})"
        peer.make = _ort_maker(om.model, workdir=workdir, name="ort-transformers")
    return peer


def _onnxslim(inlined: onnx.ModelProto, workdir: str | None = None) -> Peer:
    import onnxslim

    with _quiet():
        slim = onnxslim.slim(inlined)
    if slim is None:
        raise RuntimeError("onnxslim returned no model")
    return Peer("onnxslim", WHAT["onnxslim"], info={"nodes": [len(inlined.graph.node), len(slim.graph.node)]},
                make=_ort_maker(slim, workdir=workdir, name="onnxslim"))


def _onnxoptimizer(inlined: onnx.ModelProto, workdir: str | None = None) -> Peer:
    import onnxoptimizer

    with _quiet():
        out = onnxoptimizer.optimize(inlined)
    return Peer("onnxoptimizer", WHAT["onnxoptimizer"], info={"nodes": [len(inlined.graph.node), len(out.graph.node)]},
                make=_ort_maker(out, workdir=workdir, name="onnxoptimizer"))


def prepare(names: tuple[str, ...] | list[str], original: onnx.ModelProto, loaded, input_names: list[str],
            output_names: list[str], hint: str = "", workdir: str | None = None) -> list[Peer]:
    """One :class:`Peer` per name, in order, with the tool's rewrite of the model done and ``make`` set;
    a peer that cannot be prepared says why in ``status`` (and has no ``make``). With ``workdir`` the
    large models the ONNX Runtime peers run are kept there as files, not in memory (:func:`_ort_maker`)."""
    peers: list[Peer] = []
    inlined = None
    original_source = None
    levels = {"ort-disable": "disable", "ort-basic": "basic", "ort-extended": "extended"}
    for name in names:
        peer = Peer(name, WHAT.get(name, name))
        try:
            if name == "torch":
                if loaded is None or loaded.kind not in ("module", "torchscript", "exported_program"):
                    peer.status = "n/a: the input is not a torch model"
                else:
                    module = loaded.obj.module() if loaded.kind == "exported_program" else loaded.obj
                    peer.make = lambda threads, target, m=module: TorchEagerRunner(m, input_names, output_names,
                                                                                  threads)
            elif name in levels:
                if original_source is None:  # one file for every level
                    original_source = _to_file(original, workdir, "original") if workdir else original
                peer.make = _ort_maker(original_source, levels[name])
            else:
                if inlined is None:
                    inlined = inline_functions(original)
                if name == "ort-transformers":
                    peer = _transformers(original, inlined, hint, workdir)
                elif name == "onnxslim":
                    peer = _onnxslim(inlined, workdir)
                elif name == "onnxoptimizer":
                    peer = _onnxoptimizer(inlined, workdir)
                elif name == "openvino":
                    from ..build import openvino as ov_build

                    if ov_build.version() is None:
                        peer.status = "n/a: OpenVINO is not installed (pip install openvino)"
                    else:
                        def openvino_runner(threads, target, model=inlined):
                            with _quiet():
                                return OpenVinoRunner(model, threads)

                        peer.make = openvino_runner
                else:
                    peer.status = f"n/a: unknown peer {name}"
        except ImportError as e:
            peer.make, peer.status = None, f"n/a: not installed ({e.name or e})"
        except Exception as e:  # noqa: BLE001 - a peer that refuses or crashes is a result, not an error
            peer.make, peer.status = None, _reason(e)
        peers.append(peer)
    return peers


def instantiate(peer: Peer, threads: int, target: str = "ort-cpu") -> Peer:
    """A copy of a prepared ``peer`` with its runner for ``threads``; one whose runtime refuses the model
    (a session that fails to load, say) becomes ``n/a`` with the reason."""
    out = dataclasses.replace(peer, runner=None, info=dict(peer.info))
    if peer.make is None:
        return out
    try:
        with _quiet():
            out.runner = peer.make(threads, target)
        out.factory = lambda: peer.make(threads, target)
    except ImportError as e:
        out.status = f"n/a: not installed ({e.name or e})"
    except Exception as e:  # noqa: BLE001 - a peer that refuses or crashes is a result, not an error
        out.status = _reason(e)
    return out


def build(names: tuple[str, ...] | list[str], original: onnx.ModelProto, loaded, threads: int,
          input_names: list[str], output_names: list[str], target: str = "ort-cpu", hint: str = "") -> list[Peer]:
    """One :class:`Peer` per name, in order, with its runner (:func:`prepare` then :func:`instantiate`);
    a peer that cannot be built says why in ``status``."""
    return [instantiate(p, threads, target) for p in prepare(names, original, loaded, input_names, output_names, hint)]


def versions() -> dict[str, str]:
    """Versions of every runtime and tool a figure may come from (absent ones omitted)."""
    out = {}
    for mod, dist in (("onnxruntime", "onnxruntime"), ("torch", "torch"), ("onnx", "onnx"), ("onnxslim", "onnxslim"),
                      ("onnxoptimizer", "onnxoptimizer"), ("openvino", "openvino")):
        try:
            from importlib.metadata import version

            out[mod] = version(dist)
        except Exception:  # noqa: BLE001
            continue
    return out
