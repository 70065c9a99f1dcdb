"""Reduce a failing fuzz graph further than hypothesis's shrinker does (a dev tool, not a test).

Hypothesis shrinks the *choices* that built a graph; a graph that fails often still holds an
unrelated branch. This removes graph outputs and bypasses nodes one at a time, prunes what
is dead, and keeps each change under which the same failure (category, target, and a
pattern on its message) still happens::

    .venv/bin/python -m tests.fuzz.reduce failing.onnx out.onnx broken ort-cpu 'ReduceSum'

The fuzzer's metadata is updated to what is left (normalizations, spikes, data tensors).
"""
from __future__ import annotations

import json
import re
import sys

import onnx

from .graphs import META_KEY, meta_of
from .property import FuzzFailure, check_case


def _with_meta(model: onnx.ModelProto, meta: dict) -> onnx.ModelProto:
    for p in model.metadata_props:
        if p.key == META_KEY:
            p.value = json.dumps(meta)
    return model


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes no output depends on, then unused initializers and graph inputs; update the metadata."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs)
    del g.value_info[:]
    used = {(n.domain, n.op_type) for n in g.node}
    funcs = [f for f in m.functions if (f.domain, f.name) in used]
    del m.functions[:]
    m.functions.extend(funcs)
    meta = meta_of(m)
    tensors = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    nodes = {n.name for n in g.node}
    meta["norms"] = [n for n in meta["norms"] if n["node"] in nodes or (n["anchor"] and n["anchor"] in nodes)]
    meta["spikes"] = [s for s in meta["spikes"] if s["pre"] in tensors]
    meta["data"] = [d for d in meta["data"] if d in tensors]
    meta["norm_consts"] = [c for c in meta["norm_consts"] if c in needed]
    meta["outputs_middle"] = [o for o in meta["outputs_middle"] if o in {x.name for x in g.output}]
    meta.setdefault("steps", []).append("(reduced by tests/fuzz/reduce.py)") if "(reduced" not in " ".join(
        meta.get("steps", [])) else None
    return _with_meta(m, meta)


def _fails(model: onnx.ModelProto, category: str, target: str, pattern: str) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        check_case(model, strict=True)
    except FuzzFailure as f:
        return f.category == category and f.target == target and re.search(pattern, f.detail) is not None
    except Exception:  # noqa: BLE001 - an invalid reduction
        return False
    return False


def reduce(model: onnx.ModelProto, category: str, target: str, pattern: str) -> onnx.ModelProto:
    if meta_of(model)["bad"]:
        return model  # the planted bad value must stay where it is: leave such graphs as hypothesis shrank them
    assert _fails(model, category, target, pattern), "the graph does not show that failure"
    changed = True
    while changed:
        changed = False
        for i in range(len(model.graph.output)):  # drop a graph output
            if len(model.graph.output) < 2:
                break
            m = onnx.ModelProto()
            m.CopyFrom(model)
            del m.graph.output[i]
            m = prune(m)
            if _fails(m, category, target, pattern):
                model, changed = m, True
                break
        if changed:
            continue
        for i, n in enumerate(model.graph.node):  # bypass a node: its readers read its first input instead
            if not n.input or not n.input[0] or n.op_type in ("Cast",):
                continue
            m = onnx.ModelProto()
            m.CopyFrom(model)
            out, src = n.output[0], n.input[0]
            for other in m.graph.node:
                for k, x in enumerate(other.input):
                    if x == out:
                        other.input[k] = src
            for o in m.graph.output:
                if o.name == out:
                    if src in {x.name for x in m.graph.input} or src in {x.name for x in m.graph.output}:
                        break
                    # keep the output's name: the bypassed node's input is renamed into it
                    for other in m.graph.node:
                        for k, x in enumerate(other.output):
                            if x == src:
                                other.output[k] = out
                        for k, x in enumerate(other.input):
                            if x == src:
                                other.input[k] = out
            else:
                m = prune(m)
                if _fails(m, category, target, pattern):
                    model, changed = m, True
                    break
    return model


def main(argv: list[str]) -> None:
    src, dst, category, target, pattern = argv
    model = reduce(onnx.load(src), category, target, pattern)
    onnx.save(model, dst)
    print(f"{len(model.graph.node)} nodes: " + ", ".join(n.op_type for n in model.graph.node))


if __name__ == "__main__":
    main(sys.argv[1:])
