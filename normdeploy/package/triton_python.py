"""The Python-backend variant of a Triton entry: normdeploy's ONNX model served with ONNX Runtime.

Triton Inference Server from PyPI (``nvidia-pytriton``'s ``tritonserver``) has only the
Python backend, so this is the entry a CPU machine without an NGC image can serve::

    <repo>/<name>/config.pbtxt          backend "python", parameters onnx_file, intra_op_num_threads
    <repo>/<name>/1/model.py            :mod:`normdeploy.package.triton_python_model`, copied
    <repo>/<name>/1/model.onnx          the served model

The config follows the same rules as the ONNX Runtime entry (:mod:`.triton`): batching where
every input and output has a dynamic first axis. model.py needs numpy and onnxruntime in
the server's Python environment, never normdeploy. For ``trt-*`` results the served model
is the precision-converted lowering with each TensorRT plugin op replaced by its ONNX
function body (:func:`served_onnx`), which ONNX Runtime runs.
"""
from __future__ import annotations

import os
import shutil

MODEL_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_python_model.py")


def entry_parameters(intra_op_threads: int = 1) -> dict[str, str]:
    """The ``parameters`` model.py reads."""
    if int(intra_op_threads) < 1:
        raise ValueError("intra_op_threads must be at least 1")
    return {"onnx_file": "model.onnx", "intra_op_num_threads": str(int(intra_op_threads))}


def write_model_py(version_dir: str) -> None:
    shutil.copyfile(MODEL_PY, os.path.join(version_dir, "model.py"))


def served_onnx(model, target: str):
    """The ONNX model the Python backend runs for a result of ``target``: plugin ops as function bodies on trt-*
    (an ``onnx.ModelProto`` or ``onnx_ir.Model``, as given)."""
    if not target.startswith("trt-"):
        return model
    from ..verify.precision import plugins_as_functions

    return plugins_as_functions(model)
