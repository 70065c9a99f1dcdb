"""Shared helpers for pass tests: torch exports, hand-built ONNX graphs, ONNX Runtime comparisons."""
from __future__ import annotations

import io
import logging
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from normdeploy.core.passes import PassContext, PassResult
from normdeploy.pipeline import step

logging.getLogger("torch.onnx").setLevel(logging.ERROR)
logging.getLogger("onnxscript").setLevel(logging.ERROR)

OPSETS = (17, 18, 20, 23)


_EXPORTS: dict = {}


def export_torch(module, x, opset: int, optimize: bool = False, dynamo: bool = True,
                 key: str | None = None) -> onnx.ModelProto:
    """``module`` (eval mode) exported as torch does it: the dynamo exporter, or TorchScript's with ``dynamo=False``.

    ``optimize=True`` is what ``torch.onnx.export(dynamo=True, optimize=True)`` does: the same
    export, then ``ONNXProgram.optimize()``. With a ``key``, one export serves both variants.
    """
    import torch

    if key is not None and (key, opset, optimize, dynamo) in _EXPORTS:
        return _EXPORTS[key, opset, optimize, dynamo]
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(module, (x,), dynamo=True, optimize=False, opset_version=opset, verbose=False)
            plain = prog.model_proto
            prog.optimize()
            variants = {False: plain, True: prog.model_proto}
        else:
            f = io.BytesIO()
            torch.onnx.export(module, (x,), f, dynamo=False, opset_version=opset)
            variants = {False: onnx.load_from_string(f.getvalue())}
    if key is not None:
        for opt, model in variants.items():
            _EXPORTS[key, opset, opt, dynamo] = model
    return variants[optimize]


def op_counts(model: onnx.ModelProto) -> Counter:
    """Node kinds of the main graph; non-default domains as ``domain::op``."""
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)


def run_step(model: onnx.ModelProto, name: str, ctx: PassContext | None = None
             ) -> tuple[onnx.ModelProto, PassResult | None]:
    """Run the step ``name`` of the pass tables through the real runner on an in-memory copy of ``model``."""
    m = ir.from_proto(model)
    result = step(name).run(m, ctx or PassContext())
    if result is not None and not result.rewrites:
        return model, result  # a pass that rewrote nothing leaves the model as it was
    return ir.to_proto(m), result


def apply(model: onnx.ModelProto, pass_name: str) -> tuple[onnx.ModelProto, PassResult]:
    """Run one pass through the real runner (the pass, cleanup, sort, function bodies, shapes)."""
    after, result = run_step(model, pass_name)
    assert result.matched == len(result.rewrites) + len(result.skipped), \
        f"every candidate is rewritten or skipped with a reason: {result}"
    return after, result


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    return feeds


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, rtol: float = 1e-5, atol: float = 1e-5,
                        seeds=(0, 1)) -> None:
    """Same output names, and values equal within (rtol, atol) on random inputs (ONNX Runtime, CPU)."""
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    for seed in seeds:
        feeds = random_feeds(before, seed)
        want, got = ort_run(before, feeds), ort_run(after, feeds)
        for name, w in want.items():
            g = got[name]
            assert g.shape == w.shape and g.dtype == w.dtype, \
                f"output {name}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
            err = np.abs(g.astype(np.float64) - w.astype(np.float64))
            bad = err > atol + rtol * np.abs(w.astype(np.float64))
            assert not bad.any(), (f"output {name} (seed {seed}) differs beyond rtol={rtol}, atol={atol}: "
                                   f"max abs err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}")


def node_of(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type == op_type]
    return node


def attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    (init,) = [i for i in model.graph.initializer if i.name == name]
    return numpy_helper.to_array(init)


class GraphBuilder:
    """Hand-built ONNX graphs, one node per call: ``b("Mul", a, c)`` returns the new output's name."""

    def __init__(self, opset: int = 18):
        self.opset, self.nodes, self.inits, self.inputs, self._n = opset, [], [], [], 0

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def input(self, name: str, shape, dtype=np.float32) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
        return name

    def const(self, value, dtype=np.float32, name: str | None = None) -> str:
        name = name or self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def __call__(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"n_{out}", **attrs))
        return out

    def reduce_mean(self, x: str, axes, out: str | None = None) -> str:
        """ReduceMean with keepdims; axes as attribute before opset 18, as an input from 18 on."""
        if self.opset >= 18:
            return self("ReduceMean", x, self.const(list(axes), np.int64), out=out, keepdims=1)
        return self("ReduceMean", x, out=out, axes=list(axes), keepdims=1)

    def model(self, *outputs: str, dtype=np.float32) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph = helper.make_graph(self.nodes, "hand", self.inputs,
                                  [helper.make_tensor_value_info(o, elem, None) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8 if self.opset < 21 else (10 if self.opset < 23 else 11)
        return onnx.shape_inference.infer_shapes(model)
