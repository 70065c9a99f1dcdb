"""``normdeploy bench``: original, optimized, floor and peers in one interleaved run; table, JSON, plot."""
import json
import os

import click
import onnxruntime
import pytest
from click.testing import CliRunner

from normdeploy.bench import peers
from normdeploy.bench.timing import cpu_name
from normdeploy.core.errors import InputError
from tests.conftest import MODELS

pytestmark = pytest.mark.slow  # exports whole models

EXAMPLE = os.path.join(MODELS, "digits_cnn_bn_un.pt")
DATA = os.path.join(MODELS, "digits_test.npz")
FAST = ("--seconds", "1", "--warmup", "3", "--threads", "1")


@pytest.fixture(scope="module")
def group():
    from normdeploy.cli.bench import bench
    from normdeploy.cli.gate import gate

    g = click.Group("normdeploy")
    g.add_command(bench)
    g.add_command(gate)
    return g


def invoke(group, *args):
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def bench_json(group, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    r = invoke(group, "bench", EXAMPLE, "--data", DATA, *FAST, "--json", "--plot", d / "b.png", "--markdown", d / "b.md")
    assert r.exit_code == 0, r.stdout + r.stderr
    return json.loads(r.stdout), d


def test_bench_json_has_every_variant_with_percentiles_and_provenance(bench_json):
    out, _ = bench_json
    (m,) = out["models"]
    assert m["threads"] == m["machine"]["threads"] == 1
    assert m["machine"]["cpu"] == cpu_name() and m["machine"]["onnxruntime"] == onnxruntime.__version__
    assert m["versions"]["onnxruntime"] == onnxruntime.__version__ and m["versions"]["torch"]
    assert "interleaved" in m["method"] and m["batch"] == 1
    v = m["variants"]
    assert list(v)[:3] == ["original", "optimized", "floor"] and set(peers.PEERS) <= set(v)
    assert [v[n]["role"] for n in ("original", "optimized", "floor", "torch")] == ["original", "candidate", "floor",
                                                                                     "peer"]
    timed = [n for n, e in v.items() if e["latency"]]
    assert {"original", "optimized", "floor", "torch", "ort-disable", "ort-basic", "onnxslim"} <= set(timed)
    for n in timed:
        lat = v[n]["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert lat["runs"] == m["rounds"] >= 10  # one run: every variant timed in every round
        assert lat["throughput_per_s"] == pytest.approx(1000.0 / lat["p50_ms"])
        assert lat["speedup"] == pytest.approx(v["original"]["latency"]["p50_ms"] / lat["p50_ms"])
    assert v["original"]["latency"]["speedup"] == 1.0
    lo, hi = v["optimized"]["latency"]["speedup_ci95"]
    assert lo <= v["optimized"]["latency"]["speedup"] <= hi
    # accuracy of everything against the original, on random inputs and the real digits
    acc = v["optimized"]["accuracy"]
    assert acc["max_rel_err"] < 1e-5 and acc["top1_agreement"] == 1.0 and acc["data"]["samples"] == 360
    for n in ("torch", "onnxslim", "ort-basic"):
        assert v[n]["accuracy"]["max_rel_err"] < 1e-4, n
    assert v["floor"]["accuracy"] is None
    # a CNN has no attention: the transformers optimizer is not given it, and says so
    assert v["ort-transformers"]["status"].startswith("n/a: no attention")
    for n, e in v.items():
        assert e["status"] == "ok" or e["status"].startswith("n/a: "), (n, e["status"])
    assert set(m["norm_cost_left"]) == {"optimized"}
    assert m["norm_nodes"]["before"] == {"BatchNorm": 1, "UnifiedNorm": 1} and m["norm_nodes"]["after"]["optimized"] == {}


def test_bench_writes_png_and_markdown_with_provenance(bench_json):
    out, d = bench_json
    assert out["plot"] == str(d / "b.png")
    assert (d / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (d / "b.md").read_text()
    assert "| variant | p50 ms | p50 per session (n) | p90 ms | p99 ms |" in md
    assert "in 3 session(s) per variant" in md  # --sessions' default
    m = out["models"][0]
    assert m["sessions"] == 3
    for name in ("original", "optimized", "floor", "onnxslim"):
        lat = m["variants"][name]["latency"]
        lo, hi = lat["session_spread_ms"]
        assert lat["sessions"] == 3 and len(lat["session_p50_ms"]) == 3 and lo <= lat["p50_ms"] <= hi
    assert cpu_name() in md and "1 thread," in md and f"onnxruntime {onnxruntime.__version__}" in md
    assert "| optimized |" in md and "| onnxslim |" in md and "normalization cost left" in md


def test_bench_table_on_an_onnx_input(group, tmp_path):
    """ONNX input: the torch peer has nothing to run and says so; the table names machine, threads, runtime."""
    from normdeploy.core.graph import save_model
    from normdeploy.pipeline import Options, prepare

    _, original, _ = prepare(EXAMPLE, Options.from_flat())
    path = tmp_path / "digits.onnx"
    save_model(original, str(path))
    r = invoke(group, "bench", path, *FAST, "--peers", "torch,onnxslim")
    assert r.exit_code == 0, r.stdout + r.stderr
    text = r.stdout
    for row in ("original", "optimized", "floor", "onnxslim", "torch"):
        assert f"│ {row}" in text
    assert "n/a: the input is not a torch model" in text
    assert cpu_name() in text and "1 thread" in text and f"onnxruntime {onnxruntime.__version__}" in text
    assert "normalization cost left (optimized)" in text


def test_bench_bad_input_is_one_line(group, tmp_path):
    r = invoke(group, "bench", EXAMPLE, "--peers", "tensorrt")
    assert r.exit_code == 2 and r.stderr.startswith("error: unknown peer 'tensorrt'")
    r = invoke(group, "bench", tmp_path / "missing.pt")
    assert r.exit_code == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = invoke(group, "bench", EXAMPLE, "--seconds", "0")
    assert r.exit_code == 2 and "--seconds" in r.stderr


def test_parse_peers_and_model_type_guess():
    assert peers.parse_peers("all") == peers.PEERS and peers.parse_peers("none") == ()
    assert peers.parse_peers("onnxslim, torch") == ("onnxslim", "torch")
    with pytest.raises(InputError, match="unknown peer"):
        peers.parse_peers("onnxslim,trt")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])
    attn = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["s"]),
                                                helper.make_node("Softmax", ["s"], ["y"])], "g", [x], [y]))
    conv = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    assert peers.guess_model_type(attn, "models/gpt2_tiny.pt") == "gpt2"
    assert peers.guess_model_type(attn, "hf_vit.pt") == "vit"
    assert peers.guess_model_type(attn, "encoder.onnx") == "bert"
    assert peers.guess_model_type(conv, "vit.onnx") is None
