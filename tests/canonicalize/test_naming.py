"""name_norms_after_modules: normalization nodes take their torch module's name; never an empty one."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from normdeploy.canonicalize.naming import module_path, name_norms_by_module
from tests.graph_helpers import GraphBuilder


@pytest.mark.parametrize("name, path", [
    ("blocks.0.norm1/node_ReduceMean_3", "blocks.0.norm1"),  # dynamo, as the export stage names it
    ("blocks.0.norm1/node_Add_5_LayerNormalization", "blocks.0.norm1"),  # what a recognizer makes of it
    ("/encoder/block.0/layer.0/layer_norm/Pow", "encoder.block.0.layer.0.layer_norm"),  # TorchScript
    ("/encoder/block.0/layer.0/layer_norm/Pow_RMSNorm", "encoder.block.0.layer.0.layer_norm"),
    ("/Pow", None),  # TorchScript, an op of the root module: no module path
    ("/LayerNormalization_RMSNorm", None),
    ("node_Add_1", None), ("", None), (None, None),
])
def test_module_path(name, path):
    assert module_path(name) == path


def _norms_model(names: list[str]) -> ir.Model:
    b = GraphBuilder(18)
    x = b.input("x", [2, 4, 8])
    for _ in names:
        x = b("LayerNormalization", x, b.const(np.linspace(0.5, 1.5, 8)), b.const(np.zeros(8)), axis=-1)
    model = ir.from_proto(b.model(x))
    for n, name in zip(model.graph, names):
        n.name = name
    return model


def test_torchscript_names_become_module_paths():
    model = _norms_model(["/embeddings/LayerNorm/LayerNormalization", "/encoder/layer.0/output/LayerNorm/Add_1"])
    renames = name_norms_by_module(model)
    assert [n.name for n in model.graph] == ["embeddings.LayerNorm", "encoder.layer.0.output.LayerNorm"]
    assert renames == [("/embeddings/LayerNorm/LayerNormalization", "embeddings.LayerNorm"),
                       ("/encoder/layer.0/output/LayerNorm/Add_1", "encoder.layer.0.output.LayerNorm")]


def test_a_norm_of_the_root_module_keeps_its_name():
    """The bug: ``"/LayerNormalization".split("/", 1)[0]`` is ``""``, so the first norm of a TorchScript export's
    root module (or any name starting with "/") was renamed to the empty string."""
    model = _norms_model(["/LayerNormalization", "/LayerNormalization_1"])
    name_norms_by_module(model)
    assert [n.name for n in model.graph] == ["/LayerNormalization", "/LayerNormalization_1"]


def test_unnamed_norms_get_unique_names():
    model = _norms_model(["", "", "LayerNormalization_1"])
    name_norms_by_module(model)
    names = [n.name for n in model.graph]
    assert all(names) and len(set(names)) == 3, names
    assert names[2] == "LayerNormalization_1" and names[1] == "LayerNormalization_1_1"


def test_taken_module_name_is_not_reused():
    model = _norms_model(["ln/node_a", "ln/node_b"])
    name_norms_by_module(model)
    assert [n.name for n in model.graph] == ["ln", "ln/node_b"]
