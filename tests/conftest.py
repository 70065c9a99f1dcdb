"""Shared helpers: export torch modules to ONNX the way the pipeline does, run ONNX on ORT."""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")


def export_module(module, *shapes, opset: int = 20, dynamic: bool = True) -> onnx.ModelProto:
    """Export ``module`` (eval) through normdeploy's export stage; inputs are float32 of ``shapes``."""
    from normdeploy.export import to_onnx
    from normdeploy.load import InputSpec, Loaded

    specs = [InputSpec(f"input_{i}" if len(shapes) > 1 else "input", tuple(s), "float32", {0: "batch"} if dynamic else {})
             for i, s in enumerate(shapes)]
    model, _ = to_onnx(Loaded("module", "<test>", module.eval(), specs), opset)
    return ir.to_proto(model)


def ort_run(model, *arrays: np.ndarray) -> list[np.ndarray]:
    """Run an ``onnx.ModelProto`` or ``onnx_ir.Model`` on ONNX Runtime (CPU, 1 thread)."""
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = model.clone()
        for v in model.graph.initializers.values():  # weights still in an exported file's external data: copy them in
            if isinstance(v.const_value, ir.ExternalTensor):
                v.const_value = ir.tensor(np.array(v.const_value.numpy()), name=v.name)
        model = ir.to_proto(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return s.run(None, dict(zip(names, arrays)))


def randomize(module, seed: int = 0, low: float = 0.5, high: float = 1.5):
    """Give every parameter and floating buffer non-trivial values (deterministically)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.empty_like(p).uniform_(low, high, generator=g) * torch.where(
                torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
        for name, b in module.named_buffers():
            if b.dtype.is_floating_point and ("running" in name or "moment" in name or "phi" in name):
                b.copy_(torch.empty_like(b).uniform_(0.2, 2.0, generator=g))
            elif b.dtype.is_floating_point and "mean" in name:
                b.copy_(torch.randn(b.shape, generator=g))
    return module


_EXPORTS: dict = {}


@pytest.fixture(scope="session", autouse=True)
def export_cache():
    """Export each torch checkpoint once per session: the pipeline's export stage memoized by file.

    The key is the file's path, size and modification time, its kind, the opset and the input
    specs; every caller gets its own copy of the model. In-memory modules and ONNX files (cheap
    to load) are not cached; a failing export is never cached.
    """
    import normdeploy.pipeline as pipeline

    real = pipeline.to_onnx

    def cached(loaded, opset=20):
        path = loaded.path
        if loaded.kind == "onnx" or not os.path.isfile(path):
            return real(loaded, opset)
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, loaded.kind, opset,
               tuple((s.name, s.shape, s.dtype, tuple(sorted(s.dynamic.items()))) for s in loaded.inputs))
        if key not in _EXPORTS:
            _EXPORTS[key] = real(loaded, opset)
        model, notes = _EXPORTS[key]
        return model.clone(), list(notes)  # an in-memory copy sharing the (never edited) weight tensors

    pipeline.to_onnx = cached
    yield
    pipeline.to_onnx = real


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from normdeploy.cli import main

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def export_hf(model, input_name: str, shape, dtype: str = "int64", opset: int = 20) -> onnx.ModelProto:
    """Export a transformers model through normdeploy's export stage (dynamic batch)."""
    from normdeploy.export import to_onnx
    from normdeploy.load import InputSpec, Loaded
    from normdeploy.zoo import OneTensor

    spec = InputSpec(input_name, tuple(shape), dtype, {0: "batch"})
    exported, _ = to_onnx(Loaded("module", "<hf>", OneTensor(model, input_name), [spec]), opset)
    return ir.to_proto(exported)


def hf_input(input_name: str, shape, dtype: str, seed: int = 0, vocab: int = 100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "int64":
        return rng.integers(0, vocab, shape).astype(np.int64)
    return rng.standard_normal(shape).astype(np.float32)


from normdeploy.zoo import load_minilm  # noqa: E402,F401 - used by tests through this module
from tests.canonical_model import canonical_model  # noqa: E402,F401 - a fixture the lowering and engine tests share
