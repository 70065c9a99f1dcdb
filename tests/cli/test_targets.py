"""Targets through the CLI: trt-* without a GPU, --lower-only, --target auto, --triton-repo."""
import json
import os

import numpy as np
import onnx
import pytest

from normdeploy.build import trt as trt_build
from tests.conftest import MODELS

VIT = os.path.join(MODELS, "vit_ln.pt")
EXAMPLE = os.path.join(MODELS, "digits_cnn_bn_un.pt")
NO_GPU = not trt_build.available()[0]


@pytest.mark.skipif(not NO_GPU, reason="this machine has TensorRT and a GPU")
@pytest.mark.parametrize("target", ["trt-fp32", "trt-fp16", "trt-bf16"])
def test_trt_target_without_gpu_says_what_is_missing(cli, tmp_path, target):
    out = tmp_path / "out"
    r = cli("optimize", EXAMPLE, "--target", target, "--out", out)
    assert r.exit_code == 3
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: target {target} needs TensorRT and an NVIDIA GPU")
    assert "pip install" in err and "--lower-only" in err and "--target ort-cpu" in err
    assert not out.exists()


@pytest.mark.skipif(not NO_GPU, reason="this machine has TensorRT and a GPU")
def test_auto_picks_ort_cpu_without_gpu(cli, tmp_path):
    r = cli("optimize", EXAMPLE, "--target", "auto", "--out", tmp_path / "o", "--no-bench", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["target"] == "ort-cpu"


@pytest.mark.parametrize("flags,phrase", [(("--target", "ort-cpu", "--lower-only"), "--lower-only prepares"),
                                          (("--target", "trt-fp32", "--lower-only", "--io-dtype", "fp16"), "--io-dtype fp16 needs"),
                                          (("--target", "trt-fp16", "--lower-only", "--batch", "8:1:4"), "MIN <= OPT <= MAX"),
                                          (("--target", "trt-fp16", "--lower-only", "--triton-repo", "REPO"), "no Triton backend")])
def test_flag_combinations_refused(cli, tmp_path, flags, phrase):
    out = tmp_path / "out"
    flags = [str(tmp_path / "repo") if f == "REPO" else f for f in flags]
    r = cli("optimize", EXAMPLE, "--out", out, *flags)
    assert r.exit_code == 2 and phrase in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_lower_only_fp16_writes_a_checked_model_and_reports_its_error(cli, tmp_path):
    from normdeploy.verify.precision import plugins_as_functions
    from tests.conftest import ort_run

    out = tmp_path / "out"
    r = cli("optimize", VIT, "--target", "trt-fp16", "--lower-only", "--out", out, "--json",
            "--data", os.path.join(MODELS, "digits_test.npz"), "--batch", "1:4:16")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["target"] == "trt-fp16" and rep["latency"] is None and rep["batch_range"] == [1, 4, 16]
    assert rep["accuracy"]["max_rel_err"] <= 1e-5  # the fp32 lowering is exact
    prec = rep["precision"]["accuracy"]
    assert 0 < prec["max_rel_err"] <= 1e-2 and prec["nonfinite"] == 0 and prec["origin"]["node"]
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert any(n.op_type == "NormdeployRMSNorm" for n in model.graph.node)
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in model.graph.initializer}
    assert not (out / "triton").exists() and not (out / "model.plan").exists()
    x = np.load(os.path.join(MODELS, "digits_test.npz"))["input"][:16]
    (low,) = ort_run(plugins_as_functions(model), x)
    (ref,) = ort_run(onnx.load(out / "original.onnx"), x)
    assert np.isfinite(low).all()
    assert np.abs(low - ref).max() / np.abs(ref).max() <= 2e-2
    assert (low.argmax(1) == ref.argmax(1)).mean() >= 0.99


@pytest.mark.slow
def test_triton_repo_for_ort_cpu(cli, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    r = cli("optimize", EXAMPLE, "--out", tmp_path / "o", "--no-bench", "--triton-repo", repo, "--batch", "1:8:32")
    assert r.exit_code == 0, r.stderr
    cfg = text_format.Parse((repo / "digits_cnn_bn_un" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]
    assert (repo / "digits_cnn_bn_un" / "1" / "model.onnx").is_file()


@pytest.mark.slow
def test_fp16_on_ort_cpu_keeps_statistics_fp32_and_stays_within_1e_2(cli, tmp_path):
    out = tmp_path / "o"
    r = cli("optimize", VIT, "--fp16", "--out", out, "--no-bench", "--json",
            "--data", os.path.join(MODELS, "digits_test.npz"))
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["accuracy"]["tolerance"] == 1e-2 and rep["accuracy"]["max_rel_err"] <= 1e-2
    assert rep["accuracy"]["data"]["top1_agreement"] >= 0.99
    model = onnx.load(out / "model.onnx")
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in model.graph.initializer}
    norms = [n for n in model.graph.node if "LayerNormalization" in n.op_type]
    assert norms
    fp32 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert all(n.input[1] in fp32 for n in norms)  # gains stay fp32: statistics computed in fp32


def test_ort_gpu_targets_without_onnxruntime_gpu(cli, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    r = cli("optimize", EXAMPLE, "--target", "ort-cuda", "--out", tmp_path / "o", "--no-bench")
    assert r.exit_code == 3 and "CUDAExecutionProvider" in r.stderr and "onnxruntime-gpu" in r.stderr
    r = cli("optimize", EXAMPLE, "--target", "trt-fp16", "--fp16", "--lower-only", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--fp16 is for the ONNX Runtime targets" in r.stderr
