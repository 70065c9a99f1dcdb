"""The CI gate (normdeploy.bench.gate, ``normdeploy gate``): verdicts from one interleaved run.

The real optimized model of the shipped example must pass; a copy slowed by a heavy
useless node (a 320x320 MatMul on a scalar of the input, multiplied by zero and added to
the output: same outputs, ~10x the latency) must fail the latency check; a copy with one
weight scaled by 1.01 must fail the accuracy checks. All three are measured in the same
interleaved run as the original.
"""
import json
import os
import re

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from normdeploy.bench import ModelBench, Variant
from normdeploy.bench import gate as gate_mod
from normdeploy.bench.timing import BenchResult, Timing, machine_info
from normdeploy.core.errors import InputError
from tests.conftest import MODELS

EXAMPLE = os.path.join(MODELS, "digits_cnn_bn_un.pt")
DATA = os.path.join(MODELS, "digits_test.npz")
FAST = ("--seconds", "1.5", "--warmup", "5", "--threads", "1")


def slowed(model: onnx.ModelProto, k: int = 320) -> onnx.ModelProto:
    """``model`` plus useless work: y' = y + 0 * sum((mean(x) * C) @ W), C and W k x k.

    The MatMul depends on the input, so no runtime can fold it away; the result is finite
    and multiplied by an exact zero, so every output is unchanged bit for bit.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    x, y = g.input[0].name, g.output[0].name
    pre = y + "_before_useless_work"
    for n in g.node:
        for i, o in enumerate(n.output):
            if o == y:
                n.output[i] = pre
    rng = np.random.default_rng(0)
    g.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32), "useless_c"),
        numpy_helper.from_array((rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32), "useless_w"),
        numpy_helper.from_array(np.zeros((), np.float32), "useless_zero")])
    g.node.extend([
        helper.make_node("ReduceMean", [x], ["useless_s"], keepdims=0, name="useless_mean"),
        helper.make_node("Mul", ["useless_s", "useless_c"], ["useless_a"], name="useless_scale"),
        helper.make_node("MatMul", ["useless_a", "useless_w"], ["useless_b"], name="useless_matmul"),
        helper.make_node("ReduceSum", ["useless_b"], ["useless_sum"], keepdims=0, name="useless_sum"),
        helper.make_node("Mul", ["useless_sum", "useless_zero"], ["useless_nothing"], name="useless_times_zero"),
        helper.make_node("Add", [pre, "useless_nothing"], [y], name="useless_add")])
    onnx.checker.check_model(m)
    return m


def perturbed(model: onnx.ModelProto, factor: float = 1.01) -> onnx.ModelProto:
    """``model`` with the largest float weight of a Conv/Gemm/MatMul scaled by ``factor``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    linear_inputs = {i for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") for i in n.input[1:]}
    cands = [t for t in m.graph.initializer if t.name in linear_inputs and t.data_type == onnx.TensorProto.FLOAT]
    t = max(cands, key=lambda t: int(np.prod(t.dims)))
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    return m


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """real.onnx (normdeploy's optimized example), slow.onnx and perturbed.onnx, on disk."""
    import onnxruntime

    from normdeploy.core.passes import PassContext
    from normdeploy.pipeline import Options, prepare, transform

    _, original, _ = prepare(EXAMPLE, Options.from_flat())
    real = transform(original, PassContext(ort_version=onnxruntime.__version__)).optimized
    d = tmp_path_factory.mktemp("gate")
    paths = {}
    for name, m in (("real", real), ("slow", slowed(real)), ("perturbed", perturbed(real))):
        paths[name] = str(d / f"{name}.onnx")
        onnx.save(m, paths[name])
    return paths


@pytest.fixture
def run():
    from normdeploy.cli.bench import bench
    from normdeploy.cli.gate import gate

    group = click.Group("normdeploy")
    group.add_command(bench)
    group.add_command(gate)

    def invoke(*args):
        return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)

    return invoke


# ----------------------------------------------------------------------------- the acceptance test

@pytest.fixture(scope="module")
def one_run(variants):
    """One gate invocation, one interleaved run: original, real, slow, perturbed (and floor)."""
    from normdeploy.cli.gate import gate

    group = click.Group("normdeploy")
    group.add_command(gate)
    r = CliRunner().invoke(group, ["gate", EXAMPLE, "--optimized", variants["real"], "--optimized", variants["slow"],
                                   "--optimized", variants["perturbed"], "--data", DATA, *FAST, "--json"],
                           catch_exceptions=False)
    return r, json.loads(r.stdout)


def _checks(rep, cand):
    return {c["name"]: c for c in rep["candidates"][cand]["checks"]}


@pytest.mark.slow
def test_gate_fails_slowed_model_and_passes_real_one_in_the_same_run(one_run):
    r, rep = one_run
    assert r.exit_code == 1, r.stdout + r.stderr
    assert rep["verdict"] == "FAIL" and set(rep["failed"]) == {"slow", "perturbed"}
    assert rep["candidates"]["real"]["verdict"] == "PASS"
    real, slow = _checks(rep, "real"), _checks(rep, "slow")
    # same run: every candidate was timed in the same rounds against the same original
    assert real["latency"]["rounds"] == slow["latency"]["rounds"] == rep["rounds"] >= 10
    assert real["latency"]["p50_ms"]["original"] == slow["latency"]["p50_ms"]["original"] == rep["p50_ms"]["original"]
    assert real["latency"]["verdict"] == "PASS" and real["latency"]["value"] < 1.0  # the rewrite makes it faster
    assert slow["latency"]["verdict"] == "FAIL" and slow["latency"]["value"] > 3.0
    assert slow["latency"]["value"] > slow["latency"]["limit"]
    # the useless work changes no output: the slowed model fails on latency alone
    assert all(slow[k]["verdict"] != "FAIL" for k in ("max_rel_err", "cosine_min", "top1_agreement"))
    assert slow["max_rel_err"]["value"] == real["max_rel_err"]["value"]


@pytest.mark.slow
def test_gate_fails_perturbed_weights_on_accuracy(one_run):
    _, rep = one_run
    real, bad = _checks(rep, "real"), _checks(rep, "perturbed")
    assert real["max_rel_err"]["verdict"] == "PASS" and real["max_rel_err"]["value"] < 1e-5
    assert bad["max_rel_err"]["verdict"] == "FAIL" and bad["max_rel_err"]["value"] > 1e-3
    assert bad["max_rel_err"]["output"] and bad["max_rel_err"]["inputs"]
    assert bad["cosine_min"]["verdict"] == "PASS"  # 1 % on one weight barely turns the vector
    assert bad["latency"]["verdict"] == "PASS"


@pytest.mark.slow
def test_gate_json_structure(one_run):
    _, rep = one_run
    assert {"verdict", "failed", "model", "thresholds", "machine", "threads", "versions", "provenance", "batch",
            "rounds", "wall_seconds", "p50_ms", "method", "candidates"} <= set(rep)
    assert rep["threads"] == rep["machine"]["threads"] == 1
    assert rep["machine"]["onnxruntime"] and rep["machine"]["cpu"] and rep["versions"]["onnxruntime"]
    assert rep["thresholds"] == {"max_slowdown": None, "allowance": 0.05, "min_speedup": None, "max_abs_err": None,
                                 "max_rel_err": 1e-4, "min_cosine": 0.9999, "min_top1": 1.0}
    for cand in ("real", "slow", "perturbed"):
        c = rep["candidates"][cand]
        assert [ch["name"] for ch in c["checks"]] == ["latency", "max_abs_err", "max_rel_err", "cosine_min",
                                                      "top1_agreement"]
        assert len(c["lines"]) == len(c["checks"])
        for ch in c["checks"]:
            assert ch["verdict"] in ("PASS", "FAIL", "SKIP")
        lat = c["checks"][0]
        lo, hi = lat["ratio_ci95"]
        assert lo <= lat["ratio"] <= hi
        assert lat["limit"] == pytest.approx(1 + max(0.05, lat["noise"]))
        assert c["checks"][1]["verdict"] == "SKIP"  # max_abs_err has no default threshold
    real = rep["candidates"]["real"]  # noise may put it a hair below the floor: clamped to 0, or no figure and why
    assert 0.0 <= real["norm_cost_left"] < 0.5 if real["norm_cost_left"] is not None else real["norm_cost_left_note"]


@pytest.mark.slow
def test_gate_text_one_line_per_check_with_provenance(run, variants):
    r = run("gate", EXAMPLE, "--optimized", variants["real"], "--optimized", variants["slow"], *FAST,
            "--min-speedup", "1.0")
    assert r.exit_code == 1
    lines = r.stdout.strip().splitlines()
    verdicts = [ln for ln in lines if re.match(r"^(PASS|FAIL|SKIP) ", ln)]
    assert len(verdicts) == 2 * 6  # latency, speedup, 4 accuracy checks, per candidate
    pat = re.compile(r"^(PASS|FAIL|SKIP)  (real|slow): (latency|speedup|max_abs_err|max_rel_err|cosine_min|"
                     r"top1_agreement) +\S")
    assert all(pat.match(ln) for ln in verdicts), verdicts
    by = {(m.group(2), m.group(3)): m.group(1) for m in map(pat.match, verdicts)}
    assert by[("real", "latency")] == "PASS" and by[("slow", "latency")] == "FAIL"
    assert by[("real", "speedup")] == "PASS" and by[("slow", "speedup")] == "FAIL"
    assert by[("real", "max_rel_err")] == by[("slow", "max_rel_err")] == "PASS"
    import onnxruntime

    from normdeploy.bench.timing import cpu_name

    for ln in verdicts:
        if re.search(r": (latency|speedup) ", ln):
            assert cpu_name() in ln and "1 thread" in ln and f"onnxruntime {onnxruntime.__version__}" in ln
    assert cpu_name() in lines[0] and "interleaved rounds" in lines[0]
    assert lines[-1].startswith("gate: FAIL") and "slow" in lines[-1]


@pytest.mark.slow
def test_gate_default_runs_the_pipeline_and_passes(run):
    r = run("gate", EXAMPLE, "--data", DATA, *FAST, "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert list(rep["candidates"]) == ["optimized"] and rep["verdict"] == "PASS"
    assert _checks(rep, "optimized")["max_rel_err"]["inputs"] in ("random N(0,1), seeds 0-3", f"data file {DATA}")


def test_thresholds_file_and_flags(run, variants, tmp_path):
    """A TOML file relaxes accuracy and states a latency threshold; a flag overrides the file."""
    f = tmp_path / "gate.toml"
    f.write_text("[gate]\nmax_rel_err = 0.05\nmax_slowdown = 50.0\nmin_top1 = false\nmin_cosine = 1.5\n"
                 "seconds = 1.0\n")
    r = run("gate", EXAMPLE, "--optimized", variants["slow"], "--optimized", variants["perturbed"], "--thresholds", f,
            "--min-cosine", "0.9", "--threads", "1", "--warmup", "5", "--json")
    assert r.exit_code == 0, r.stdout
    rep = json.loads(r.stdout)
    assert rep["thresholds"]["max_rel_err"] == 0.05 and rep["thresholds"]["max_slowdown"] == 50.0
    assert rep["thresholds"]["min_top1"] is None and rep["thresholds"]["min_cosine"] == 0.9  # the flag wins
    slow = _checks(rep, "slow")
    assert slow["latency"]["limit"] == pytest.approx(51.0) and "stated max slowdown" in slow["latency"]["text"]
    assert _checks(rep, "perturbed")["top1_agreement"]["verdict"] == "SKIP"


# ----------------------------------------------------------------------------- unit level: no timing

def _bench(samples: dict[str, list[float]]) -> ModelBench:
    timings = {n: Timing(n, list(s)) for n, s in samples.items()}
    res = BenchResult(timings, 1, machine_info(1))
    variants = {n: Variant(n, "original" if n == "original" else "floor" if n == "floor" else "candidate", n)
                for n in samples}
    return ModelBench("m.onnx", "onnx", [], 1, 1, variants, res, {}, [])


def test_latency_limit_is_the_larger_of_allowance_and_noise():
    rng = np.random.default_rng(0)
    base = 1.0 + 0.001 * rng.standard_normal(400)
    quiet = _bench({"original": base, "cand": base * 1.03, "floor": base * 0.5})
    (lat,) = gate_mod.latency_checks(quiet, "cand", gate_mod.Thresholds())
    assert lat.verdict == "PASS" and lat.limit == pytest.approx(1.05) and lat.details["noise"] < 0.01
    (lat,) = gate_mod.latency_checks(quiet, "cand", gate_mod.Thresholds(allowance=0.01))
    assert lat.verdict == "FAIL"
    (lat,) = gate_mod.latency_checks(quiet, "cand", gate_mod.Thresholds(max_slowdown=0.02))
    assert lat.verdict == "FAIL" and "stated max slowdown" in lat.text
    (lat,) = gate_mod.latency_checks(quiet, "cand", gate_mod.Thresholds(max_slowdown=-0.5))
    assert lat.verdict == "FAIL" and lat.limit == pytest.approx(0.5)
    # a noisy run widens the allowance beyond the stated floor of 1 %
    noisy = _bench({"original": base * rng.lognormal(0, 0.5, 400), "cand": base * 1.03 * rng.lognormal(0, 0.5, 400),
                    "floor": base})
    (lat,) = gate_mod.latency_checks(noisy, "cand", gate_mod.Thresholds(allowance=0.01))
    assert lat.details["noise"] > 0.03 and lat.limit == pytest.approx(1 + lat.details["noise"])


def test_min_speedup_check():
    b = _bench({"original": [2.0] * 20, "cand": [1.0] * 20, "floor": [0.5] * 20})
    checks = gate_mod.latency_checks(b, "cand", gate_mod.Thresholds(min_speedup=1.5))
    assert [c.name for c in checks] == ["latency", "speedup"] and checks[1].verdict == "PASS"
    assert checks[1].value == pytest.approx(2.0)
    assert gate_mod.latency_checks(b, "cand", gate_mod.Thresholds(min_speedup=2.5))[1].verdict == "FAIL"


def test_accuracy_checks_name_the_output_and_skip_without_classifier():
    from normdeploy.verify import Accuracy, OutputComparison

    b = _bench({"original": [1.0] * 10, "cand": [1.0] * 10, "floor": [1.0] * 10})
    b.variants["cand"].accuracy = {"random": Accuracy("random", 8, [
        OutputComparison("hidden", 1e-3, 2e-3, 0.99999, None), OutputComparison("pooled", 1e-6, 1e-7, 1.0, None)])}
    checks = {c.name: c for c in gate_mod.accuracy_checks(b, "cand", gate_mod.Thresholds(max_abs_err=1e-4))}
    assert checks["max_abs_err"].verdict == "FAIL" and "output hidden" in checks["max_abs_err"].text
    assert checks["max_rel_err"].verdict == "FAIL" and checks["max_rel_err"].details["output"] == "hidden"
    assert checks["cosine_min"].verdict == "PASS"
    assert checks["top1_agreement"].verdict == "SKIP"
    line = checks["max_rel_err"].line()
    assert line.startswith("FAIL  max_rel_err") and "0.002 > 0.0001" in line


def test_thresholds_file_formats(tmp_path):
    t = tmp_path / "g.toml"
    t.write_text("allowance = 0.1\nmin_speedup = 1.2\nthreads = 2\n")
    th, run = gate_mod.read_file(str(t))
    assert th == {"allowance": 0.1, "min_speedup": 1.2} and run == {"threads": 2}
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"gate": {"max_rel_err": 1e-5, "max_abs_err": None, "seconds": 2}}))
    th, run = gate_mod.read_file(str(j))
    merged = gate_mod.Thresholds().updated(th)
    assert merged.max_rel_err == 1e-5 and merged.max_abs_err is None and run == {"seconds": 2}
    assert gate_mod.Thresholds().updated({"min_cosine": False}).min_cosine is None
    bad = tmp_path / "bad.toml"
    bad.write_text("max_rel_error = 1\n")
    with pytest.raises(InputError, match="unknown key 'max_rel_error'"):
        gate_mod.read_file(str(bad))
    bad.write_text("max_rel_err = [1\n")
    with pytest.raises(InputError, match="does not parse"):
        gate_mod.read_file(str(bad))
    (tmp_path / "g.yaml").write_text("max_rel_err: 1\n")
    with pytest.raises(InputError, match="neither .toml nor .json"):
        gate_mod.read_file(str(tmp_path / "g.yaml"))
    with pytest.raises(InputError, match="not a number"):
        gate_mod.Thresholds().updated({"max_rel_err": "small"})
    with pytest.raises(InputError, match="negative"):
        gate_mod.Thresholds().updated({"allowance": -0.1})


def test_gate_bad_thresholds_are_one_line_errors(run, tmp_path):
    f = tmp_path / "gate.json"
    f.write_text('{"max_slowdown": "a lot"}')
    r = run("gate", EXAMPLE, "--thresholds", f)
    assert r.exit_code == 2 and r.stderr.startswith("error: threshold max_slowdown") and "Traceback" not in r.stderr
    r = run("gate", EXAMPLE, "--thresholds", tmp_path / "missing.toml")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = run("gate", EXAMPLE, "--max-rel-err", "tiny")
    assert r.exit_code == 2 and "neither a number nor 'none'" in r.stderr
    r = run("gate", EXAMPLE, "--optimized", tmp_path / "nope.onnx")
    assert r.exit_code == 2 and "does not exist" in r.stderr


@pytest.mark.slow
def test_gate_refuses_an_optimized_model_of_another_original(run, tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    other = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    onnx.save(other, tmp_path / "other.onnx")
    r = run("gate", EXAMPLE, "--optimized", tmp_path / "other.onnx", "--seconds", "0.2")
    assert r.exit_code == 2 and "takes inputs ['x']" in r.stderr and "built from this original" in r.stderr
