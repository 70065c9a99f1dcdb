"""benchmarks/peers_models.py: its variant registry, the best-exact selection, the load marking, the tables.

The pure parts run on hand-made timings; one slow test runs ``--quick`` on the tiny GPT-2.
"""
import json
import os

import numpy as np
import pytest

from benchmarks import peers_models as pm
from normdeploy.bench import ModelBench, Variant
from normdeploy.bench.timing import BenchResult, Timing, machine_info
from normdeploy.verify import Accuracy, OutputComparison


class _Ctx:
    """A ModelContext stand-in: the builders under test read nothing from it."""

    name, module, inputs, data, result, threads = "m", None, (), None, None, 1


def test_missing_features_are_listed_na_with_their_reason(monkeypatch):
    from normdeploy import options

    monkeypatch.setattr(options, "TARGETS", tuple(t for t in options.TARGETS if t != "openvino"))
    monkeypatch.setattr(options, "FLAT", {k: v for k, v in options.FLAT.items() if k != "autotune"})
    monkeypatch.setattr(pm, "_has_option", lambda name: name in options.FLAT)
    registry = {n: pm.VARIANTS[n] for n in ("original", "nd-openvino", "nd-autotune", "floor")}
    cands, prepared, na = pm.build_variants(_Ctx(), registry)
    assert cands == {} and prepared == []
    assert na["nd-openvino"].startswith("n/a: ") and "--target openvino" in na["nd-openvino"]
    assert na["nd-autotune"].startswith("n/a: ") and "--autotune" in na["nd-autotune"]


def test_a_builder_that_crashes_is_na_and_the_others_still_build():
    def boom(ctx):
        raise RuntimeError("tool exploded\nsecond line")

    registry = {"bad": pm.VariantSpec("bad", "peer", "a crashing peer", boom),
                "good": pm.VariantSpec("good", "normdeploy", "a model", lambda ctx: (lambda threads: "proto")),
                "unavailable": pm.VariantSpec("unavailable", "normdeploy", "absent",
                                              lambda ctx: (_ for _ in ()).throw(pm.NotAvailable("not in this tree")))}
    cands, prepared, na = pm.build_variants(_Ctx(), registry)
    assert na == {"bad": "n/a: RuntimeError: tool exploded", "unavailable": "n/a: not in this tree"}
    assert list(cands) == ["good"] and cands["good"][0](2) == "proto"


def test_the_registry_holds_every_variant_the_issue_names():
    kinds = {n: s.kind for n, s in pm.VARIANTS.items()}
    assert {n for n, k in kinds.items() if k == "normdeploy"} == {"normdeploy", "nd-openvino", "nd-autotune"}
    assert {"ort-all", "ort-extended", "ort-basic", "ort-disable", "ort-transformers", "onnxslim", "onnxoptimizer",
            "openvino"} == {n for n, k in kinds.items() if k == "peer"}
    assert kinds["original"] == "reference" and kinds["floor"] == "floor"


def test_best_exact_excludes_inexact_and_unmeasured_variants():
    p50 = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 0.5}
    err = {"a": 5e-3, "b": 1e-6, "c": 0.0, "d": None}  # a: fastest but inexact; d: no accuracy (crashed)
    assert pm.best_exact(p50, err, ["a", "b", "c", "d"], 1e-4) == "b"
    assert pm.best_exact(p50, err, ["a", "b", "c", "d"], 1e-2) == "a"
    assert pm.best_exact(p50, err, ["a", "d", "e"], 1e-4) is None  # e: not timed


@pytest.mark.parametrize("before,after,cores,loaded", [(0.3, 1.9, 2, False), (2.4, 2.5, 2, False),
                                                        (2.6, 1.0, 2, True), (1.0, 3.0, 2, True),
                                                        (3.0, 3.0, 4, False)])
def test_load_marking(before, after, cores, loaded):
    assert pm.is_loaded(before, after, cores) is loaded


def _bench(errs: dict[str, float], scale: dict[str, float], n: int = 60) -> ModelBench:
    rng = np.random.default_rng(1)
    timings = {k: Timing(k, list(map(float, s * rng.lognormal(0, 0.01, n)))) for k, s in scale.items()}
    res = BenchResult(timings, 1, machine_info(1))
    variants = {}
    for name in scale:
        role = {"original": "original", "floor": "floor", "normdeploy": "candidate"}.get(name, "peer")
        v = Variant(name, role, name)
        if name in errs:
            out = OutputComparison("y", errs[name], errs[name], 1.0)
            v.accuracy["random"] = Accuracy("random", 4, [out])
        variants[name] = v
    return ModelBench("m", "module", [], 1, 1, variants, res, {}, [])


def test_summary_key_ratio_is_normdeploy_best_over_fastest_exact_peer_and_flags_cost_left():
    # onnxslim is the fastest peer but inexact: the best exact peer is ort-basic
    scale = {"original": 10.0, "normdeploy": 9.0, "floor": 8.0, "ort-basic": 9.5, "onnxslim": 7.0}
    mb = _bench({"normdeploy": 1e-7, "ort-basic": 0.0, "onnxslim": 3e-2}, scale)
    kinds = {"normdeploy": "normdeploy", "ort-basic": "peer", "onnxslim": "peer", "floor": "floor"}
    cell = pm.summarize(mb, kinds, 1e-4, (0.5, 3.1), 2)
    assert cell["best_peer"] == "ort-basic" and cell["best_normdeploy"] == "normdeploy"
    ratio, lo, hi = cell["key"]
    assert ratio == pytest.approx(9.0 / 9.5, rel=0.02) and lo < ratio < hi
    assert cell["loaded"] is True
    assert cell["norm_cost_left"] == pytest.approx(0.5, abs=0.05)
    data = {"meta": {}, "models": [{"name": "m", "what": "w", "norms": "LayerNorm ×1 → RMSNorm ×1",
                                    "kept": ["p: why"], "cells": [json.loads(json.dumps(cell))]}]}
    row = [ln for ln in pm.key_table(data["models"]) if ln.startswith("| m |")][0]
    assert "ort-basic" in row and "**0.9" in row and "**loaded**" in row
    copy = data["models"][0]["cells"][0]
    for share, text in ((0.42, "| 42% |"), (0.63, "| 63% (above 50%) |")):
        copy["norm_cost_left"] = share
        row = [ln for ln in pm.key_table(data["models"]) if ln.startswith("| m |")][0]
        assert text in row
    assert "- **m** (batch 1 / 1 thread(s) 63%)" in pm.render({**data, "meta": _META})


_META = {"versions": {}, "cpu": "cpu", "cores": 2, "started": "now", "duration_s": 1.0, "command": "c",
         "method": "m", "seconds": 1.0, "min_rounds": 20, "settle": [], "tolerance": 1e-4}


def test_readme_splice_replaces_only_its_own_markers(tmp_path):
    from benchmarks import readme_table

    path = tmp_path / "README.md"
    start, end = pm.README_MARKERS
    path.write_text(f"a\n{readme_table.START}\nold table\n{readme_table.END}\nb\n{start}\nold\n{end}\nc\n")
    readme_table.update_readme("new peers table", start, end, str(path))
    text = path.read_text()
    assert "new peers table" in text and "old table" in text and "\nold\n" not in text


@pytest.mark.slow
def test_quick_run_on_the_tiny_gpt2_writes_md_json_png(tmp_path):
    assert pm.main(["--quick", "--only", "tiny-gpt2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "peers_models.json").read_text())
    (cell,) = data["models"][0]["cells"]
    kinds = {n: s.kind for n, s in pm.VARIANTS.items()}
    # which variant is fastest is a timing of 0.3 s: only its kind is asserted
    assert kinds[cell["best_normdeploy"]] == "normdeploy" and kinds[cell["best_peer"]] == "peer"
    assert cell["max_rel_err"]["normdeploy"] < 1e-4 and "onnxslim" in cell["speedup"]
    assert os.path.getsize(tmp_path / "peers_models.png") > 0
    assert "p50(normdeploy best) / p50(best peer)" in (tmp_path / "peers_models.md").read_text()


def test_a_large_peer_model_is_kept_as_a_file_and_its_sessions_made_from_it(tmp_path, monkeypatch):
    """peers.prepare(workdir=...): past SESSION_FILE_BYTES (here 0) the model is written once, the proto untouched,
    and each session reads the file (a session from a serialized proto holds the weights twice more)."""
    from onnx import TensorProto, helper, numpy_helper

    from normdeploy import build
    from normdeploy.bench import peers

    monkeypatch.setattr(build, "SESSION_FILE_BYTES", 0)
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    (peer,) = peers.prepare(["ort-basic"], model, None, ["x"], ["y"], workdir=str(tmp_path))
    assert (tmp_path / "original.onnx").exists() and (tmp_path / "original.onnx.data").exists()
    assert numpy_helper.to_array(model.graph.initializer[0]).tobytes() == w.tobytes()  # the proto untouched
    x = np.ones((2, 4), np.float32)
    for threads in (1, 2):
        runner = peers.instantiate(peer, threads).runner
        np.testing.assert_allclose(runner.run({"x": x})[0], x @ w, rtol=1e-6)


def _stored_cell(model: str, speedups: dict) -> dict:
    variants = {"original": {"latency": {"speedup": 1.0, "speedup_ci95": [1.0, 1.0]}}}
    variants.update({n: {"latency": {"speedup": s, "speedup_ci95": [s - 0.01, s + 0.01]}} for n, s in speedups.items()})
    variants["openvino"] = {"latency": None}  # did not run
    return {"bench": {"model": model, "machine": {"cpu": "cpu", "cores": 2, "onnxruntime": "x"}, "threads": 1,
                      "rounds": 30, "sessions": 3, "variants": variants}}


def test_update_puts_the_measured_models_in_place_and_refuses_other_settings():
    meta = {**_META, "batches": [1], "threads": [1], "sessions": 3, "warmup": 3}
    old = {"meta": meta, "models": [{"name": "a", "cells": [1]}, {"name": "b", "cells": [2]}]}
    new = {"meta": {**meta, "started": "later", "command": "c --update"},
           "models": [{"name": "b", "cells": [3]}, {"name": "z", "cells": [4]}]}
    merged = pm.merge_update(old, new)
    assert [(m["name"], m["cells"]) for m in merged["models"]] == [("a", [1]), ("b", [3]), ("z", [4])]
    assert merged["meta"]["updates"] == [{"models": ["b", "z"], "started": "later", "command": "c --update",
                                          "duration_s": 1.0}]
    assert merged["meta"]["started"] == "now" and "updates" not in old["meta"]
    # measured again later: only each model's latest update is named
    again = pm.merge_update(merged, {"meta": {**meta, "started": "last", "command": "c2"},
                                     "models": [{"name": "z", "cells": [5]}]})
    assert [(u["models"], u["started"]) for u in again["meta"]["updates"]] == [(["b"], "later"), (["z"], "last")]
    assert pm.merge_update(again, {"meta": {**meta, "started": "end", "command": "c3"}, "models": [
        {"name": "b", "cells": [6]}, {"name": "z", "cells": [7]}]})["meta"]["updates"] == [
        {"models": ["b", "z"], "started": "end", "command": "c3", "duration_s": 1.0}]
    with pytest.raises(SystemExit, match="threads"):
        pm.merge_update(old, {"meta": {**new["meta"], "threads": [2]}, "models": []})


def test_the_plot_is_drawn_from_the_stored_cells(tmp_path):
    """plot_from_json: every stored cell is a bar group, with the speedups stored, not recomputed."""
    from normdeploy.bench.plot import speedups_figure

    cells = [_stored_cell("m1 b1 t1", {"normdeploy": 1.2, "onnxslim": 1.1}), _stored_cell("m2 b1 t1", {"normdeploy": 0.9})]
    summaries = [pm._CellSummary(c["bench"]) for c in cells]
    assert summaries[0].timed == ["original", "normdeploy", "onnxslim"] and summaries[0].speedup("openvino") is None
    fig = speedups_figure(summaries, "t", ["normdeploy", "onnxslim"])
    bars = sorted(round(p.get_width(), 6) for p in fig.axes[0].patches)
    assert bars == [0.9, 1.1, 1.2]
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["m1 b1 t1 (30 rounds, 3 sessions)", "m2 b1 t1 (30 rounds, 3 sessions)"]
    pm.plot_from_json({"models": [{"name": "m1", "cells": cells}]}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_the_tables_name_the_models_measured_again():
    meta = {**_META, "updates": [{"models": ["b"], "started": "later", "command": "c --update", "duration_s": 1}]}
    assert pm._updates(meta) == "; b measured again by `c --update` (later)" and pm._updates(_META) == ""
