"""Lowering for the ``openvino`` target: ONNX Runtime's lowering (:mod:`normdeploy.lower.ort`) with
RMSNorm decomposed, then every canonical node left inlined from its function body.

OpenVINO's ONNX frontend reads normdeploy's lowered ONNX when it holds standard ops only. What it
does with each form (OpenVINO 2026.4.1, CPU plugin, checked by compiling and listing the
compiled model's layer types, and timing interleaved at 1 thread; loaded 2-core machine,
direction only):

* RMSNorm: opset-23 ``RMSNormalization``, ONNX Runtime's ``SimplifiedLayerNormalization``
  (default and ``com.microsoft`` domains) and ``Mul(x, x)``, ``ReduceMean``, ``Add``, ``Sqrt``,
  ``Div`` (then ``Mul(g)``) are all read and all compile to the same graph, one fused ``RMS``
  layer per norm (zoo vit_rmsnorm: 9 ``RMS``; llama_rmsnorm: 5; vit_powernorm's GroupScaling,
  reshaped to ``[..., G, C/G]``: 9), and time alike (vit_rmsnorm batch 1: 0.569, 0.566, 0.567 ms).
  normdeploy writes the decomposed form: standard ops at the model's own opset (no version
  conversion to opset 23, no runtime-specific schema), read by every OpenVINO release that fuses
  RMS. GroupScaling always takes it too: the short-row rule of the ONNX Runtime lowering
  (``SHORT_ROW``) is about ONNX Runtime's kernel, and OpenVINO fuses either way.
* LayerNormalization (opset 17) is kept as it is: OpenVINO reads it as its ``MVN`` op.
* UnifiedNorm, DyT, ScaleNorm, CRMSNorm, PowerNorm's affine: the ONNX Runtime lowering's standard
  ops (Mul/Add, Tanh, ReduceL2/Max/Div, ReduceSumSquare/ReduceSum) as they are.

OpenVINO does not read model-local ONNX functions ("Model wasn't fully converted"), so a canonical
node the lowering left (a parameter that is not a constant) is inlined from its function body by
onnx-ir's ``InlinePass`` (:func:`inline_canonical_functions`), exact by definition: the body is the
op's definition. The result has no ``normdeploy`` node and no local function.
"""
from __future__ import annotations

import onnx_ir as ir

from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult


def inline_canonical_functions(model: ir.Model, ctx: PassContext) -> PassResult | None:
    """Inline every ``normdeploy`` node still in the model from its function body (onnx-ir's ``InlinePass``),
    then drop the functions and opsets nothing uses; in place. None when there is none."""
    from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

    left = [n for n in model.graph.all_nodes() if n.domain == DOMAIN]
    if not left:
        return None
    result = PassResult("inline_canonical_functions", exact=True)
    result.matched = len(left)
    InlinePass(criteria=lambda f: f.domain == DOMAIN)(model)
    RemoveUnusedFunctionsPass()(model)
    RemoveUnusedOpsetsPass()(model)
    for n in left:
        result.rewrote(f"{n.op_type} {n.name} inlined from its ONNX function body (OpenVINO does not read local "
                       "functions)", n.name)
    return result
