"""remove_noop_casts: a Cast to the type its input already has is dropped (exact), others stay."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

from normdeploy.canonicalize.noop_casts import remove_noop_casts
from normdeploy.core.passes import PassContext
from tests.graph_helpers import GraphBuilder, assert_same_outputs, op_counts


def _run(model):
    m = ir.from_proto(model)
    result = remove_noop_casts(m, PassContext())
    return ir.to_proto(m), result


def test_noop_cast_on_a_stream_is_removed_and_others_stay():
    """Add -> Cast(float -> float) -> Add (TorchScript's ``x.float()``) loses the Cast; a real Cast stays."""
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    h = b("Add", x, b.const(np.linspace(-1, 1, 8)), out="h")
    same = b("Cast", h, to=TensorProto.FLOAT, out="same")
    half = b("Cast", same, to=TensorProto.FLOAT16, out="half")
    b("Add", same, b("Cast", half, to=TensorProto.FLOAT), out="y")
    model = b.model("y")
    after, result = _run(model)
    assert op_counts(after)["Cast"] == 2 and "Identity" not in op_counts(after), op_counts(after)
    (add,) = [n for n in after.graph.node if n.output[0] == "y"]
    assert add.input[0] == "h"  # the reader reads the Cast's input, under its own name
    assert result.rewrites == [] and "1 Cast(s)" in result.notes[0] and "n_same" in result.notes[0], result
    assert_same_outputs(model, after)


def test_noop_cast_writing_a_graph_output_keeps_the_output_name():
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    b("Cast", b("Relu", x), to=TensorProto.FLOAT, out="y")
    model = b.model("y")
    after, result = _run(model)
    assert [o.name for o in after.graph.output] == ["y"] and "Cast" not in op_counts(after)
    assert "write a graph output" in result.notes[0]
    assert_same_outputs(model, after)


def test_nothing_to_remove_gives_no_result():
    b = GraphBuilder(18)
    x = b.input("x", [2, 8])
    b("Cast", x, to=TensorProto.FLOAT16, out="y")
    model = b.model("y", dtype=np.float16)
    after, result = _run(model)
    assert result is None and op_counts(after) == {"Cast": 1}
