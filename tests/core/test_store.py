"""The tensor store (normdeploy.core.store): spilled weights read back bit for bit, files removed,
mappings released, and a spilling run writing the same model as one that keeps everything in memory."""
from __future__ import annotations

import gc
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from normdeploy.build import OrtRunner, Recorded
from normdeploy.core import store
from normdeploy.core.graph import Namer, constant, save_model
from normdeploy.core.store import StoredTensor, TensorStore, release_mappings, spilling


@pytest.mark.parametrize("array", [
    np.float32(3.5) * np.ones((), np.float32),                      # 0-d
    np.arange(12, dtype=np.float16).reshape(3, 4),
    np.arange(24, dtype=np.int64).reshape(2, 3, 4)[:, ::2],        # not contiguous
    np.array([1.0, -2.0], dtype=">f4"),                             # big-endian
    np.zeros((0, 3), np.float32),                                   # empty
    np.array([True, False, True]),
])
def test_put_reads_back_the_same_dtype_shape_and_values(array):
    s = TensorStore()
    t = s.put(array, "w")
    back = t.numpy()
    assert back.shape == array.shape
    assert back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)
    assert t.offset % store.ALIGNMENT == 0


def test_directory_removed_when_the_last_tensor_dies():
    s = TensorStore()
    directory = s.directory
    t = s.put(np.ones(1000, np.float32), "w")
    del s
    gc.collect()
    assert os.path.isdir(directory), "a live tensor still reads the file"
    np.testing.assert_array_equal(t.numpy(), np.ones(1000, np.float32))
    t.release()
    del t
    gc.collect()
    assert not os.path.exists(directory)


def test_constant_spills_only_large_tensors_while_spilling(monkeypatch):
    monkeypatch.setattr(store, "SPILL_BYTES", 64)
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 20})
    namer = Namer(graph)
    small = constant(namer, "w", "small", np.ones(4, np.float32))
    assert not isinstance(small.const_value, StoredTensor)  # no store active
    with spilling(TensorStore()):
        big = constant(namer, "w", "big", np.arange(64, dtype=np.float32))
        tiny = constant(namer, "w", "tiny", np.ones(4, np.float32))
    assert isinstance(big.const_value, StoredTensor)
    assert not isinstance(tiny.const_value, StoredTensor)
    np.testing.assert_array_equal(big.const_value.numpy(), np.arange(64, dtype=np.float32))


def test_release_mappings_closes_maps_and_they_reopen():
    s = TensorStore()
    v = ir.Value(name="w", const_value=s.put(np.arange(1000, dtype=np.float32), "w"))
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], initializers=[v], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    v.const_value.numpy()  # maps it
    assert v.const_value.raw is not None
    assert release_mappings(model) == 1
    assert v.const_value.raw is None
    np.testing.assert_array_equal(v.const_value.numpy(), np.arange(1000, dtype=np.float32))


def test_small_model_with_spilled_tensors_saves_self_contained(tmp_path):
    s = TensorStore()
    w = ir.Value(name="w", const_value=s.put(np.arange(6, dtype=np.float32).reshape(2, 3), "w"),
                 shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    x = ir.Value(name="x", shape=ir.Shape([1, 2]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("MatMul", [x, w])
    node.outputs[0].name = "y"
    node.outputs[0].shape, node.outputs[0].type = ir.Shape([1, 3]), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(inputs=[x], outputs=[node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 20},
                     name="g")
    path = tmp_path / "m.onnx"
    save_model(ir.Model(graph, ir_version=10), str(path))
    s.close()  # the store's file is gone: the saved model must not need it
    assert os.listdir(tmp_path) == ["m.onnx"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    out = OrtRunner(proto).run({"x": np.ones((1, 2), np.float32)})[0]
    np.testing.assert_array_equal(out, np.array([[3.0, 5.0, 7.0]], np.float32))


def test_optimize_spilling_everything_writes_the_same_model(monkeypatch, tmp_path):
    """With every new tensor spilled (thresholds 0) the optimized model is the same as in memory."""
    import normdeploy

    model = "models/digits_cnn_bn_un.pt"  # its BatchNorm and UnifiedNorm fold into new Conv/Gemm weights
    plain = normdeploy.optimize(model, bench=False)
    monkeypatch.setattr(store, "SPILL_BYTES", 0)
    monkeypatch.setattr(store, "SPILL_MODEL_BYTES", -1)
    spilled_runs = []
    real_put = TensorStore.put

    def counting_put(self, array, name):
        spilled_runs.append(name)
        return real_put(self, array, name)

    monkeypatch.setattr(TensorStore, "put", counting_put)
    spilled = normdeploy.optimize(model, bench=False)
    assert spilled_runs, "nothing was spilled: the test would prove nothing"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    save_model(plain.optimized_model, str(a))
    save_model(spilled.optimized_model, str(b))
    assert onnx.load(str(a)).SerializeToString() == onnx.load(str(b)).SerializeToString()


def test_recorded_replays_outputs_by_feed_identity():
    class Counting:
        input_names, output_names = ["x"], ["y"]
        calls = 0

        def run(self, feed):
            Counting.calls += 1
            return [feed["x"] * 2]

    feeds = [{"x": np.ones(2)}, {"x": np.full(2, 3.0)}]
    rec = Recorded(Counting(), feeds)
    assert Counting.calls == 2
    np.testing.assert_array_equal(rec.run(feeds[1])[0], np.full(2, 6.0))
    assert Counting.calls == 2
    with pytest.raises(KeyError):
        rec.run({"x": np.ones(2)})


def test_a_session_made_from_a_written_file_leaves_the_models_weights_unmapped(monkeypatch, tmp_path):
    """OrtRunner writes a large in-memory model to a file for its session: writing reads (maps) every weight
    the model loaded from its external data, and those pages would stay in this process's resident memory
    next to the session's own copy. The maps are closed after writing; the weights read back the same
    afterwards, and the session computes with them."""
    from normdeploy import build

    monkeypatch.setattr(build, "SESSION_FILE_BYTES", 0)
    wv = np.arange(3 << 16, dtype=np.float32).reshape(1 << 16, 3) / (3 << 16)  # 768 KiB (a tiny one is not mapped)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1 << 16])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [onnx.numpy_helper.from_array(wv, "w")]),
        opset_imports=[onnx.helper.make_opsetid("", 20)])
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    model = ir.load(str(tmp_path / "m.onnx"))
    w = model.graph.initializers["w"].const_value
    assert isinstance(w, ir.ExternalTensor)
    w.numpy()
    assert w.raw is not None
    runner = OrtRunner(model, threads=1)
    assert w.raw is None, "the weight's map is still open after the session's file was written"
    feed = np.random.default_rng(0).standard_normal((1, 1 << 16)).astype(np.float32)
    np.testing.assert_allclose(runner.run({"x": feed})[0], feed.astype(np.float64) @ wv, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(w.numpy(), wv)
    runner.close()


def _mapped_bytes(path: str) -> int:
    """Resident bytes of this process's maps of ``path`` (/proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                current = parts[5] if len(parts) >= 6 else None
            elif parts and parts[0] == "Rss:" and current == path:
                total += int(parts[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_a_folded_transpose_of_an_external_weight_leaves_the_input_file_unmapped(tmp_path):
    """The dynamo exporter writes a Linear as ``MatMul(x, Transpose(W))``; onnxscript's constant folder (run by
    export.finalize) folds the Transpose into an in-memory view of W's memory map, which kept the whole
    input data file mapped and resident for the rest of the run (1973 MiB of a 2.2 GB fp16 Llama). After
    finalize the folded weight is a stored external tensor, bit-identical to W.T, and once the model's maps
    are released no page of the input's data file is resident."""
    from normdeploy.export import finalize
    from normdeploy.load import load_onnx

    rng = np.random.default_rng(0)
    wv = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MiB: past SPILL_BYTES
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 1024])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 512])
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         onnx.helper.make_node("MatMul", ["x", "wt"], ["y"])], "g", [x], [y], [onnx.numpy_helper.from_array(wv, "w")]), opset_imports=[onnx.helper.make_opsetid("", 20)])
    data = str(tmp_path / "m.onnx.data")
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    model = finalize(load_onnx(str(tmp_path / "m.onnx")))
    assert [n.op_type for n in model.graph] == ["MatMul"], "the Transpose is folded"
    (w,) = model.graph.initializers.values()
    assert isinstance(w.const_value, StoredTensor), type(w.const_value)
    np.testing.assert_array_equal(w.const_value.numpy(), wv.T)
    release_mappings(model)
    gc.collect()
    assert _mapped_bytes(os.path.realpath(data)) == 0, "the input's data file is still mapped"
    feed = rng.standard_normal((2, 1024)).astype(np.float32)
    runner = OrtRunner(model, threads=1)
    np.testing.assert_allclose(runner.run({"x": feed})[0], feed.astype(np.float64) @ wv.T, rtol=1e-4, atol=1e-3)
    runner.close()
