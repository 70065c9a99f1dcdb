"""normdeploy's TensorRT plugins: the contract between the ``trt-*`` lowering and the kernels.

Importing this package, or :mod:`normdeploy.lower.plugins.trt_plugins`, imports nothing heavy (no triton,
torch or tensorrt): the lowering pass :mod:`normdeploy.lower.trt` reads the plugin names
and attributes (:data:`normdeploy.lower.plugins.trt_plugins.PLUGINS`) from there; triton is imported when
a kernel is compiled or launched, tensorrt only by :func:`normdeploy.lower.plugins.trt_plugins.register_plugins`.

* :mod:`normdeploy.lower.plugins.kernels`      Triton kernels and launchers (interpreter on CPU, compiled on CUDA)
* :mod:`normdeploy.lower.plugins.trt_plugins`  ``tensorrt.plugin`` registration; the ahead-of-time kernel builder
* :mod:`normdeploy.lower.plugins.emulate`      ``onnx.reference`` implementations of the plugin ops (CPU, interpreter)
* :mod:`normdeploy.lower.plugins.cuda_launch`  the AOT PTX launched through the CUDA driver as TensorRT launches it
* :mod:`normdeploy.lower.plugins.gpu_bench`    every kernel timed against torch (``scripts/gpu_check.sh``)

A plugin node in ONNX (what :mod:`normdeploy.lower.trt` writes and TensorRT's parser reads)::

    op_type = "NormdeployRMSNorm", domain = "normdeploy"
    attributes: epsilon (FLOAT), plugin_namespace = "normdeploy" (STRING), aot = 1 (INT)

TensorRT's ONNX parser imports a node as the plugin ``<plugin_namespace>::<op_type>``
(version ``plugin_version``, default "1"); from 10.10 it also falls back to the node's
domain as the namespace. The nodes carry both, so every TensorRT 10.x parser finds them,
and the domain keeps them out of the default ONNX domain, where a checker would reject
an unknown op. ``aot = 1`` asks the parser for the ahead-of-time implementation (the
compiled kernel is serialized into the engine). Node attributes become plugin fields
typed as the parser converts them: ONNX INT -> INT32, FLOAT -> FLOAT32, STRING -> CHAR;
the parser passes only the fields the plugin declares (``plugin_namespace`` and ``aot``
are read by the parser itself).
"""
from .trt_plugins import NAMESPACE, PLUGIN_VERSION, PLUGINS, PluginSpec, plugin_attributes  # noqa: F401
