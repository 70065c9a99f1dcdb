"""normdeploy.package.triton: every written config.pbtxt parses as Triton's inference.ModelConfig, and the
repository layout is the one Triton Inference Server loads (<repo>/<name>/config.pbtxt, <name>/<version>/model.*)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper

from normdeploy.package.triton import MODEL_FILES, config_pbtxt, model_name, parse_config, write_repository

pytest.importorskip("tritonclient.grpc.model_config_pb2")
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from tests.conftest import ROOT


def _model(in_dims, out_dims, in_type=TP.FLOAT, out_type=TP.FLOAT, extra_inputs=()):
    inputs = [helper.make_tensor_value_info("input", in_type, list(in_dims))] + list(extra_inputs)
    nodes = [helper.make_node("Identity", ["input"], ["output"])]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs,
                                            [helper.make_tensor_value_info("output", out_type, list(out_dims))]),
                          opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 10
    return m


def _layout(repo: str) -> dict[str, list[str]]:
    return {os.path.relpath(d, repo): sorted(f) for d, _, f in os.walk(repo)}


def test_batchable_onnx_config_parses():
    m = _model(("N", 3, 8, 8), ("N", 10))
    cfg = parse_config(config_pbtxt(m, "digits"))
    assert cfg.name == "digits" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 64
    assert list(cfg.input[0].dims) == [3, 8, 8] and cfg.input[0].data_type == mc.TYPE_FP32
    assert list(cfg.output[0].dims) == [10]
    assert cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and cfg.instance_group[0].count == 1


def test_static_model_is_not_batched():
    cfg = parse_config(config_pbtxt(_model((1, 3), (1, 3)), "static"))
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3]
    assert not cfg.HasField("dynamic_batching")


def test_types_dynamic_axes_and_options():
    ids = helper.make_tensor_value_info("attention_mask", TP.INT64, ["N", "seq"])
    m = _model(("N", "seq"), ("N", "seq"), TP.FLOAT16, TP.BFLOAT16, [ids])
    text = config_pbtxt(m, "enc", backend="tensorrt", max_batch_size=32, instance_kind="KIND_GPU", instances=2,
                        preferred_batch_sizes=[4, 8, 64], max_queue_delay_us=100, gpus=[0, 1])
    cfg = parse_config(text)
    assert cfg.backend == "tensorrt" and cfg.max_batch_size == 32
    assert [i.data_type for i in cfg.input] == [mc.TYPE_FP16, mc.TYPE_INT64]
    assert cfg.output[0].data_type == mc.TYPE_BF16 and list(cfg.output[0].dims) == [-1]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]  # 64 > max_batch_size dropped
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    group = cfg.instance_group[0]
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 2 and list(group.gpus) == [0, 1]


def test_rank1_tensors_get_a_reshape():
    cfg = parse_config(config_pbtxt(_model(("N",), ("N",)), "scores"))
    assert list(cfg.input[0].dims) == [1] and list(cfg.input[0].reshape.shape) == []
    assert cfg.max_batch_size == 64


def test_bad_arguments():
    m = _model(("N", 3), ("N", 3))
    with pytest.raises(ValueError, match="backend"):
        config_pbtxt(m, "x", backend="pytorch")
    with pytest.raises(ValueError, match="instance kind"):
        config_pbtxt(m, "x", instance_kind="KIND_TPU")
    with pytest.raises(ValueError, match="Triton-safe"):
        write_repository("/tmp/unused", "bad name", m)
    with pytest.raises(ValueError, match="artifact"):
        write_repository("/tmp/unused", "x", m, backend="tensorrt")
    assert model_name("vit ln.v2") == "vit_ln_v2"


def test_onnx_repository_layout(tmp_path):
    m = _model(("N", 3), ("N", 3))
    repo = tmp_path / "triton"
    entry = write_repository(str(repo), "vit_ln", m)
    assert entry == str(repo / "vit_ln")
    assert _layout(str(repo)) == {".": [], "vit_ln": ["config.pbtxt"], os.path.join("vit_ln", "1"): ["model.onnx"]}
    cfg = parse_config((repo / "vit_ln" / "config.pbtxt").read_text())
    assert cfg.name == "vit_ln" and cfg.backend == "onnxruntime"  # the name Triton matches with the directory
    served = onnx.load(str(repo / "vit_ln" / "1" / MODEL_FILES["onnxruntime"]))
    onnx.checker.check_model(served)
    assert served.graph == m.graph
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary directories left


def test_plan_repository_layout_and_replace(tmp_path):
    m = _model(("N", 3), ("N", 3), TP.FLOAT16, TP.FLOAT16)
    repo = tmp_path / "triton"
    write_repository(str(repo), "enc", m, b"engine-1", max_batch_size=32, version=2)
    assert _layout(str(repo)) == {".": [], "enc": ["config.pbtxt"], os.path.join("enc", "2"): ["model.plan"]}
    cfg = parse_config((repo / "enc" / "config.pbtxt").read_text())
    assert cfg.backend == "tensorrt" and cfg.max_batch_size == 32
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert cfg.input[0].data_type == mc.TYPE_FP16
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine-2")
    write_repository(str(repo), "enc", m, str(plan))  # replaces the entry, version 1 now
    assert _layout(str(repo)) == {".": [], "enc": ["config.pbtxt"], os.path.join("enc", "1"): ["model.plan"]}
    assert (repo / "enc" / "1" / "model.plan").read_bytes() == b"engine-2"
    with pytest.raises(FileExistsError):
        write_repository(str(repo), "enc", m, b"engine-3", replace=False)
    assert (repo / "enc" / "1" / "model.plan").read_bytes() == b"engine-2"
    assert sorted(os.listdir(tmp_path)) == ["model.plan", "triton"]


def test_failed_write_leaves_nothing(tmp_path):
    m = _model(("N", 3), ("N", 3))
    repo = tmp_path / "triton"
    write_repository(str(repo), "keep", m)
    with pytest.raises(FileNotFoundError):
        write_repository(str(repo), "keep", m, str(tmp_path / "missing.plan"))
    assert _layout(str(repo))[os.path.join("keep", "1")] == ["model.onnx"]  # the old entry is intact
    assert sorted(os.listdir(tmp_path)) == ["triton"]


def test_pipeline_package_writes_a_parsable_triton_entry(tmp_path):
    """The package stage's triton/<name>/ (section 7) parses and has the layout Triton loads."""
    from normdeploy import package, pipeline

    path = os.path.join(ROOT, "models", "digits_cnn_bn_un.pt")
    if not os.path.exists(path):
        pytest.skip("models/digits_cnn_bn_un.pt is not in the checkout")
    result = pipeline.optimize(path, pipeline.Options.from_flat(bench=False))
    out = package.write(str(tmp_path / "out"), result)
    triton = os.path.join(out, "triton")
    (name,) = os.listdir(triton)
    cfg = parse_config(open(os.path.join(triton, name, "config.pbtxt")).read())
    assert cfg.name == name and os.path.exists(os.path.join(triton, name, "1", MODEL_FILES[cfg.backend]))
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert cfg.max_batch_size > 0 and list(cfg.input[0].dims) == list(x.shape[1:])
