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
    """Every directory's files, less normdeploy's ownership marker (tested in tests/cli/test_output_safety.py)."""
    from normdeploy.package.files import MARKER

    return {os.path.relpath(d, repo): sorted(x for x in f if x != MARKER) for d, _, f in os.walk(repo)}


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


# ----------------------------------------------------------------------------- permissions (issue 14)

def _modes(root: str) -> dict[str, int]:
    out = {".": os.stat(root).st_mode & 0o777}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = os.stat(p).st_mode & 0o777
    return out


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_entries_honour_the_umask(tmp_path, umask, dir_mode, file_mode):
    """A server running as another user reads the entry (mkdtemp alone would leave 0700 directories)."""
    old = os.umask(umask)
    try:
        entry = write_repository(str(tmp_path / "repo"), "m", _model(("N", 3), ("N", 3)), backend="python")
    finally:
        os.umask(old)
    modes = _modes(entry)
    assert set(modes) == {".", "config.pbtxt", ".normdeploy-output", "1", os.path.join("1", "model.onnx"),
                          os.path.join("1", "model.py")}
    for path, mode in modes.items():
        want = dir_mode if os.path.isdir(os.path.join(entry, path)) else file_mode
        assert mode == want, (path, oct(mode), oct(want))


def test_output_directory_honours_the_umask(tmp_path):
    from normdeploy import package, pipeline

    result = pipeline.optimize(os.path.join(ROOT, "models", "digits_cnn_bn_un.pt"),
                               pipeline.Options.from_flat(bench=False))
    old = os.umask(0o022)
    try:
        out = package.write(str(tmp_path / "out"), result, triton_backend="python")
    finally:
        os.umask(old)
    modes = _modes(out)
    assert modes["."] == 0o755 and modes["triton"] == 0o755
    assert {m for p, m in modes.items() if os.path.isdir(os.path.join(out, p))} == {0o755}
    assert {m for p, m in modes.items() if os.path.isfile(os.path.join(out, p))} == {0o644}


# ----------------------------------------------------------------------------- the check (issue 14)

from normdeploy.package.triton import EntryError, check_entry, plan_entry  # noqa: E402

PROFILE_1_8_32 = {"input": {"min": [1, 3, 8, 8], "opt": [8, 3, 8, 8], "max": [32, 3, 8, 8]}}


def _image(batch="N"):
    return _model((batch, 3, 8, 8), (batch, 10))


def test_trt_entry_takes_the_profile():
    e = plan_entry(_image(), "m", "tensorrt", profile=PROFILE_1_8_32, preferred_batch_sizes=[8, 64])
    assert (e.max_batch_size, e.dynamic_batching, e.preferred_batch_sizes) == (32, True, [8])
    assert e.inputs[0].dims == [3, 8, 8] and e.instance_kind == "KIND_GPU"
    check_entry(e, _image(), PROFILE_1_8_32)
    # the --input batch fixed (no --batch): profile 1:1:1 -> max_batch_size 1, nothing to batch dynamically
    fixed1 = {"input": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]}}
    e = plan_entry(_image(), "m", "tensorrt", profile=fixed1)
    assert (e.max_batch_size, e.dynamic_batching, e.inputs[0].dims) == (1, False, [3, 8, 8])
    check_entry(e, _image(), fixed1)
    # a fixed batch of 4: not batching, the batch axis written as the profile fixes it
    fixed4 = {"input": {"min": [4, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [4, 3, 8, 8]}}
    e = plan_entry(_image(), "m", "tensorrt", profile=fixed4)
    assert (e.max_batch_size, e.inputs[0].dims, e.outputs[0].dims) == (0, [4, 3, 8, 8], [-1, 10])
    check_entry(e, _image(), fixed4)
    # a profile starting above 1: Triton's batcher would send batch 1, so no batching; the batch axis stays open
    from_2 = {"input": {"min": [2, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}}
    e = plan_entry(_image(), "m", "tensorrt", profile=from_2)
    assert (e.max_batch_size, e.inputs[0].dims) == (0, [-1, 3, 8, 8])
    check_entry(e, _image(), from_2)


@pytest.mark.parametrize("change,message", [
    (dict(max_batch_size=64), "configuration specified max-batch 64 but TensorRT engine only supports max-batch 32"),
    (dict(instance_kind="KIND_CPU"), "instance kind KIND_CPU is not one the backend runs"),
    (dict(preferred_batch_sizes=[0]), "preferred batch sizes [0] lie outside 1..max_batch_size 32"),
    (dict(dims=[3, 9, 8]), "tensor input has dims [3, 9, 8] in the config but the model expects [3, 8, 8]"),
    (dict(dims=[3, 8]), "tensor input has dims [3, 8] in the config but the model expects [3, 8, 8]"),
    (dict(data_type="TYPE_FP16"), "tensor input is TYPE_FP16 in the config but TYPE_FP32 in the model"),
    (dict(name="x y"), "the name is not Triton-safe"),
])
def test_check_refuses_what_triton_refuses(change, message):
    e = plan_entry(_image(), "m", "tensorrt", profile=PROFILE_1_8_32)
    for k, v in change.items():
        if k in ("dims", "data_type"):
            setattr(e.inputs[0], k, v)
        else:
            setattr(e, k, v)
    with pytest.raises(EntryError) as err:
        check_entry(e, _image(), PROFILE_1_8_32)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_check_refuses_batching_without_a_dynamic_first_axis_and_dims_outside_the_profile():
    static = _image(batch=2)
    e = plan_entry(static, "m")
    assert e.max_batch_size == 0
    e.max_batch_size = 8
    with pytest.raises(EntryError, match=r"max_batch_size 8 but the first axis of input \(\[2, 3, 8, 8\]\) is not a "
                                         "dynamic batch axis"):
        check_entry(e, static)
    seq = _model(("N", "seq"), ("N", "seq"))
    profile = {"input": {"min": [1, 4], "opt": [4, 16], "max": [8, 32]}}
    e = plan_entry(seq, "m", "tensorrt", profile=profile)
    assert (e.max_batch_size, e.inputs[0].dims) == (8, [-1])  # the profile leaves the sequence open
    check_entry(e, seq, profile)
    e.inputs[0].dims = [64]
    with pytest.raises(EntryError, match="dim 64 lies outside the engine profile's 4..32 on axis 1"):
        check_entry(e, seq, profile)
    # the profile starting at batch 2 with max_batch_size > 0: Triton would send batch 1
    profile2 = {"input": {"min": [2, 4], "opt": [4, 16], "max": [8, 32]}}
    e = plan_entry(seq, "m", "tensorrt", profile=profile)
    with pytest.raises(EntryError, match="profile starts at batch 2"):
        check_entry(e, seq, profile2)


def test_scalars_and_python_backend_types():
    scalar = _model((), ())
    e = plan_entry(scalar, "s")
    assert e.max_batch_size == 0 and e.inputs[0].dims == [1] and e.inputs[0].reshape is None
    cfg = parse_config(e.to_pbtxt())
    assert not cfg.input[0].HasField("reshape")  # Triton's core refuses an empty reshape without batching
    check_entry(e, scalar)
    e.inputs[0].reshape = []
    with pytest.raises(EntryError, match="empty reshape on a model that does not batch"):
        check_entry(e, scalar)
    bf16 = _model(("N", 4), ("N", 4), TP.BFLOAT16, TP.BFLOAT16)
    with pytest.raises(EntryError, match="bfloat16, which the Python backend's numpy cannot hold"):
        check_entry(plan_entry(bf16, "b", "python"), bf16)
    with pytest.raises(EntryError, match="instance kind KIND_GPU is not one the backend runs"):
        check_entry(plan_entry(_image(), "p", "python", instance_kind="KIND_GPU"), _image())
    with pytest.raises(EntryError):  # what write_repository checks before writing anything
        write_repository("/nonexistent/never-written", "b", bf16, backend="python")
    assert not os.path.exists("/nonexistent")


def test_python_entry_layout_and_config(tmp_path):
    m = _image()
    entry = write_repository(str(tmp_path / "repo"), "digits", m, backend="python", max_batch_size=16,
                             preferred_batch_sizes=[4], intra_op_threads=2)
    assert _layout(entry) == {".": ["config.pbtxt"], "1": ["model.onnx", "model.py"]}
    cfg = parse_config(open(os.path.join(entry, "config.pbtxt")).read())
    assert cfg.backend == "python" and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4]
    assert {k: v.string_value for k, v in cfg.parameters.items()} == {"onnx_file": "model.onnx",
                                                                      "intra_op_num_threads": "2"}
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    from normdeploy.package.triton_python import MODEL_PY

    assert open(os.path.join(entry, "1", "model.py")).read() == open(MODEL_PY).read()
    assert onnx.load(os.path.join(entry, "1", "model.onnx")).graph == m.graph


# ----------------------------------------------------------------------------- a trt-* build's entry (issue 14)

@pytest.fixture
def recorded_trt(monkeypatch):
    """trt-* builds against the recording stand-in of tensorrt (tests/build/test_trt.py) on a pretend GPU.

    The stand-in's "engine" is the ONNX it parsed; the engine runner runs it on ONNX Runtime
    (plugin ops as their function bodies), so the pipeline verifies it as it would a real one.
    """
    from normdeploy.build import OrtRunner
    from normdeploy.build import trt as trt_build
    from normdeploy.verify.precision import plugins_as_functions
    from tests.build.test_trt import _fake_tensorrt

    calls: list = []
    fake = _fake_tensorrt("10.13.0", calls, plan_is_onnx=True)
    # handed to build_engine alone: a tensorrt module in sys.modules would change what torch.export does
    monkeypatch.setattr(trt_build, "_import_trt", lambda: fake)
    monkeypatch.setattr(trt_build, "tensorrt_status", lambda: (True, "TensorRT 10.13.0"))
    monkeypatch.setattr(trt_build, "cuda_status", lambda: (True, "a pretend GPU"))
    monkeypatch.setattr(trt_build, "_register_plugins", lambda module: [])

    class EngineStandIn(OrtRunner):
        def __init__(self, plan, *a, **k):
            super().__init__(plugins_as_functions(onnx.load_from_string(plan)), "ort-cpu", 1)

    monkeypatch.setattr(trt_build, "EngineRunner", EngineStandIn)
    return calls


@pytest.mark.parametrize("flags,batching", [((), False), (("--batch", "1:4:16"), True), (("--batch", "2:4:8"), False)])
def test_trt_entry_agrees_with_the_profile_the_build_used(cli, tmp_path, recorded_trt, flags, batching):
    """Without --batch the profile is fixed to the example batch: the entry must not say max_batch_size 64."""
    import json

    out = tmp_path / "out"
    r = cli("optimize", os.path.join(ROOT, "models", "digits_cnn_bn_un.pt"), "--target", "trt-fp32", "--out", out,
            "--no-bench", *flags)
    assert r.exit_code == 0, r.stderr
    (profile,) = [c[1] for c in recorded_trt if c[0] == "profile"]  # what the builder was given
    (lo, opt, hi), = profile.values()
    report = json.loads((out / "report.json").read_text())
    cfg = parse_config((out / "triton" / "digits_cnn_bn_un" / "config.pbtxt").read_text())
    assert cfg.backend == "tensorrt" and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    if batching:  # the batcher may form any batch 1..max: the profile must start at 1 and end at max_batch_size
        assert lo[0] == 1 and cfg.max_batch_size == hi[0] > 1
        assert list(cfg.input[0].dims) == list(hi[1:])
        assert list(cfg.dynamic_batching.preferred_batch_size) == [opt[0]]
    else:
        assert cfg.max_batch_size in (0, hi[0]) and not cfg.HasField("dynamic_batching")
        if cfg.max_batch_size == 0:
            assert [d if d != -1 else None for d in cfg.input[0].dims] == [a if a == b else None
                                                                            for a, b in zip(lo, hi)]
        else:
            assert lo[0] == hi[0] == 1 and list(cfg.input[0].dims) == list(hi[1:])
    if not flags:
        assert (lo[0], hi[0]) == (1, 1) and cfg.max_batch_size == 1  # the example batch of 1
    assert cfg.parameters["tensorrt_version"].string_value == "10.13.0"
    assert report["engine"]["tensorrt_version"] == "10.13.0" and report["triton"]["tensorrt_version"] == "10.13.0"
    assert report["triton"]["max_batch_size"] == cfg.max_batch_size
    assert report["triton"]["engine_profile"] == report["engine"]["profiles"][0]
    assert (out / "triton" / "digits_cnn_bn_un" / "1" / "model.plan").read_bytes() == (out / "model.plan").read_bytes()
