"""No silence: what the canonicalize stage recognized, and every normalization-like subgraph it left alone.

Run on the canonical model (after every recognizer), so a subgraph still there is, by
construction, inside no canonical node. :func:`find_leftovers` looks for the statistics and
shapes a normalization is built from:

* a mean of squares ``ReduceMean(x^2)`` (``Pow(x, 2)`` or ``Mul(x, x)``): RMSNorm, a
  variance of LayerNorm, PowerNorm's GroupScaling;
* a sum of squares ``ReduceSum(x^2)`` / ``ReduceSumSquare(x)``, and a ``ReduceL2(x)``: the
  L2 norm of ScaleNorm, CRMSNorm, ``torch.norm``;
* a Tanh of a scaled input ``tanh(alpha * x)`` / ``tanh(x / d)`` with a constant: DyT
  (the tanh GELU, ``tanh(sqrt(2/pi) (x + 0.044715 x^3))``, is an activation and not listed);
* a per-channel constant affine ``a * x + c`` (:func:`normdeploy.core.affine.constant_affine`):
  a decomposed BatchNorm, a frozen UnifiedNorm, a layer scale.

Each one comes with the node that identifies it and the condition that failed: the reason
a recognizer of the stage gave for that node (its skip, through the one reason mechanism of
:class:`~normdeploy.core.pattern.Recognizer`), else the first step of the normalization's
chain that is not there, found by walking forward from the statistic (:func:`why_statistic`):
``mean(x^2)`` -> ``+ eps`` -> ``sqrt`` -> ``x / .``. A per-channel affine is no normalization:
it is reported as what it is, an affine source that the rewrite stage folds or not (its fate).

:func:`describe_normalizations` gives, for every normalization node of the canonical model,
its kind, the spelling a recognizer matched (``Rewrite.spelling``) or that it came as exported,
and what the later passes did to it or why they left it. Both feed ``inspect`` and ``report.json``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from ..core.affine import constant_affine
from ..core.graph import DEFAULT_DOMAINS, consumers
from ..core.norms import find_norms
from ..core.passes import PassResult
from ..core.pattern import Const, Lit, Match, Var, any_of, fold, match, op, same_value, spelling_of, strip_noop
from .naming import module_path

# ----------------------------------------------------------------------------- patterns

X = Var("x")
SQUARE = any_of(op("Pow", X, Lit(2.0), name="square"), op("Mul", X, X, name="square"))
MEAN_OF_SQUARES = op("ReduceMean", SQUARE, name="stat", extra_inputs=True)
SUM_OF_SQUARES = any_of(op("ReduceSum", SQUARE, name="stat", extra_inputs=True),
                        op("ReduceSumSquare", X, name="stat", extra_inputs=True))
L2_NORM = op("ReduceL2", X, name="stat", extra_inputs=True)
SCALED_TANH = op("Tanh", any_of(op("Mul", X, Const("alpha"), name="scale"),
                                op("Div", X, Const("divisor"), name="scale")), name="tanh")

MEAN_SQUARES, SUM_SQUARES, L2, TANH, AFFINE = (
    "mean of squares", "sum of squares", "L2 norm", "tanh of a scaled input", "per-channel constant affine")
#: the statistics, with the pattern that finds each (tried on every node output)
STATISTICS = ((MEAN_SQUARES, MEAN_OF_SQUARES), (SUM_SQUARES, SUM_OF_SQUARES), (L2, L2_NORM))

#: ops that pass a per-token statistic on unchanged in value (a restored reduced axis, a Cast)
_TRANSPARENT = frozenset({"Cast", "CastLike", "Identity", "Unsqueeze", "Reshape", "Expand", "Squeeze"})


@dataclass
class Leftover:
    """One normalization-like subgraph no recognizer turned into a canonical node."""

    node: str  # the node that identifies it: the statistic, the Tanh, the affine's first node
    what: str  # MEAN_SQUARES | SUM_SQUARES | L2 | TANH | AFFINE
    spelling: str  # its ops in graph order, e.g. "Pow ReduceMean"
    reason: str  # the condition that failed, naming the node (walking forward from it)
    recognizers: list[str] = field(default_factory=list)  # "<pass>: <reason>" of each recognizer that looked at it
    fate: list[str] = field(default_factory=list)  # what the later passes did or said about the node

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- the scan


def _label(node: ir.Node, index: dict) -> str:
    return node.name or f"<unnamed {node.op_type} #{index.get(node, '?')}>"


def find_leftovers(model: ir.Model, results: list[PassResult] = (), canonicalize: set[str] | None = None
                   ) -> list[Leftover]:
    """Every normalization-like subgraph of ``model``'s main graph (the canonical model), in graph order.

    ``results``: the PassResults of the run; the skips of the ``canonicalize`` steps (by pass
    name) that name a node are what the recognizers said about it, the records of the other
    steps are its fate.
    """
    graph = model.graph
    index = {n: i for i, n in enumerate(graph)}
    canon = [r for r in results if canonicalize is None or r.name in canonicalize]
    later = [r for r in results if canonicalize is not None and r.name not in canonicalize]
    found: dict = {}
    seen: set = set()
    for phase in ("norm-like", "affine"):  # an affine inside a tanh's or a statistic's subgraph is part of it
        for node in graph:
            if node.domain not in DEFAULT_DOMAINS or not node.outputs or node in seen or node in found:
                continue
            hit = _classify(node, phase)
            if hit is None:
                continue
            what, nodes, why = hit
            if phase == "affine" and any(n in seen for n in nodes):
                continue
            seen.update(nodes)
            found[node] = (what, nodes, why)
    out = []
    for node in graph:  # graph order
        if node not in found:
            continue
        what, nodes, why = found[node]
        names = {n.name for n in nodes if n.name}
        # a recognizer names the node it anchors on: the statistic, or the root or norm read from it
        told = names | {r.name for r in consumers(node.outputs[0]) if r.name}
        said = [f"{r.name}: {s.reason}" for r in canon for s in r.skipped if s.node in told]
        fate = [f"{r.name}: {w.what}" for r in later for w in r.rewrites if w.node in names]
        fate += [f"{r.name}: {s.reason}" for r in later for s in r.skipped if s.node in names]
        spelling = spelling_of(Match(nodes=tuple(nodes)), graph)
        out.append(Leftover(_label(node, index), what, spelling, why(), said, fate))
    return out


def _roots(pattern) -> set[str]:
    """The op types a match of ``pattern`` can be rooted at."""
    if hasattr(pattern, "alts"):
        return set().union(*(_roots(a) for a in pattern.alts))
    return {pattern.op}


_STAT_ROOTS = {what: _roots(p) for what, p in STATISTICS}


def _classify(node: ir.Node, phase: str):
    """``(what, nodes, reason thunk)`` when ``node`` identifies a normalization-like subgraph, else None."""
    v = node.outputs[0]
    if phase == "norm-like":
        for what, pattern in STATISTICS:
            if node.op_type not in _STAT_ROOTS[what]:
                continue
            for m in match(pattern, v, Match()):
                if node in m.nodes:
                    x = m.bound.get("x")
                    return what, m.unique_nodes(), lambda x=x, what=what: why_statistic(node, x, what)
        if node.op_type == "Tanh":
            for m in match(SCALED_TANH, v, Match()):
                if not _is_gelu_tanh(m.bound["x"]):
                    return TANH, m.unique_nodes() + _weight_chain(node), lambda m=m: why_scaled_tanh(node, m)
        return None
    if node.op_type in ("Mul", "Div", "Add", "Sub"):
        aff = constant_affine(node)
        if aff is not None and aff.nodes and aff.nodes[0] is node:
            return AFFINE, list(aff.nodes), lambda aff=aff: why_affine(aff)
    return None


def _weight_chain(tanh: ir.Node) -> list[ir.Node]:
    """The per-channel affine (DyT's ``w``, ``b``) that alone reads a Tanh, if any."""
    readers = consumers(tanh.outputs[0])
    if len(readers) != 1 or tanh.outputs[0].is_graph_output():
        return []
    aff = constant_affine(readers[0])
    return list(aff.nodes) if aff is not None and aff.nodes and aff.nodes[0] is readers[0] else []


# ----------------------------------------------------------------------------- the conditions


def _id(node: ir.Node) -> str:
    """How a reason names a node: ``Div n_div7``, or ``Div (unnamed)``."""
    return f"{node.op_type} {node.name}" if node.name else f"{node.op_type} (unnamed)"


def _readers(v: ir.Value) -> list[tuple[ir.Node, ir.Value]]:
    """``(reader, the value it reads)`` of ``v``, looking through ops that keep a statistic's value."""
    out = []
    for r in consumers(v):
        if r.domain in DEFAULT_DOMAINS and r.op_type in _TRANSPARENT and r.inputs and r.inputs[0] is v and r.outputs:
            out.extend(_readers(r.outputs[0]))
        else:
            out.append((r, v))
    return out


def _is_float(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating)) or dtype.name == "bfloat16"  # ml_dtypes' is no numpy floating


def _scalar_const(v: ir.Value | None) -> float | None:
    c = fold(v) if v is not None else None
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 and _is_float(c.dtype) else None


def _other(node: ir.Node, v: ir.Value) -> ir.Value | None:
    others = [i for i in node.inputs[:2] if i is not None and i is not v]
    return others[0] if others else None


def _divides(reader: ir.Node, root: ir.Value, x: ir.Value | None, stat: str) -> str:
    """Why ``reader`` of the root ``root`` is not ``x / root`` (or ``x * 1/root``); the full chain when it is."""
    if reader.op_type == "Reciprocal":
        nxt = _readers(reader.outputs[0])
        if not nxt:
            return f"{_id(reader)} of the root of the {stat} is read by nothing"
        r2, v2 = nxt[0]
        if r2.op_type != "Mul":
            return f"{_id(r2)} reads 1/root of the {stat}, where a normalization multiplies x by it"
        return _numerator(r2, _other(r2, v2), x, stat)
    if reader.op_type == "Div":
        if reader.inputs[1] is not root:
            return f"{_id(reader)} divides the root of the {stat} by something, not x by the root"
        return _numerator(reader, reader.inputs[0], x, stat)
    if reader.op_type == "Mul":
        return f"{_id(reader)} multiplies by the root of the {stat}, where a normalization divides by it"
    return f"{_id(reader)} reads the root of the {stat}, where a normalization divides x by it"


def _numerator(node: ir.Node, num: ir.Value | None, x: ir.Value | None, stat: str) -> str:
    if num is None or x is None:
        return f"{_id(node)} has no numerator to compare with the squared tensor"
    src = strip_noop(num)
    p = src.producer()
    if same_value(src, x) or (p is not None and p.op_type == "Mul" and any(
            i is not None and same_value(i, x) for i in p.inputs)):
        return (f"every step of a normalization is there ({stat} of {x.name}, eps, square root, "
                f"{_id(node)}), but no recognizer of this stage took it (axes, constants or another reader of an "
                "intermediate tensor differ from every spelling it knows)")
    return f"{_id(node)} divides {num.name}, not the squared tensor {x.name}"


def why_statistic(stat: ir.Node, x: ir.Value | None, what: str) -> str:
    """The first step of ``stat + eps -> sqrt -> x / .`` (or clamp-then-divide for a norm) that is not there."""
    label = f"{_id(stat)}"
    v = stat.outputs[0]
    if v.is_graph_output():
        return f"{label} ({what}) is a graph output, read by no normalization"
    readers = _readers(v)
    if not readers:
        return f"{label} ({what}) is read by nothing"
    reasons = [_why_after_stat(r, rv, x, what, label) for r, rv in readers]
    return "; ".join(dict.fromkeys(reasons))


def _why_after_stat(r: ir.Node, v: ir.Value, x, what: str, label: str) -> str:
    is_root = what == L2  # a ReduceL2 is already a square root
    desc = f"{what} ({label})"
    if r.op_type in ("Add", "Max") and len(r.inputs) >= 2:
        other = _other(r, v)
        eps = _scalar_const(other)
        if eps is None:
            return (f"{_id(r)} after {label} ({what}) combines it with "
                    f"{other.name if other is not None else 'nothing'}, which is not a constant scalar eps")
        nxt = _readers(r.outputs[0])
        if not nxt:
            return f"{_id(r)} (the {desc} plus eps) is read by nothing"
        r2, v2 = nxt[0]
        if is_root:
            return _divides(r2, v2, x, desc)
        return _after_eps(r2, v2, x, desc)
    if r.op_type == "Clip":
        nxt = _readers(r.outputs[0])
        return _divides(nxt[0][0], nxt[0][1], x, desc) if nxt and is_root else \
            _after_eps(nxt[0][0], nxt[0][1], x, desc) if nxt else f"{_id(r)} after {label} is read by nothing"
    if r.op_type == "Sqrt" and not is_root:
        nxt = _readers(r.outputs[0])
        if not nxt:
            return f"{_id(r)} of {label} is read by nothing"
        reason = _divides(nxt[0][0], nxt[0][1], x, desc)
        return f"no eps is added to {label} ({what}) before {_id(r)}" + (
            "" if reason.startswith("every step") else f"; {reason}")
    if is_root and r.op_type in ("Div", "Reciprocal"):
        reason = _divides(r, v, x, desc)
        return f"no eps clamps or is added to {label} ({what})" + ("" if reason.startswith("every step")
                                                                    else f"; {reason}")
    return (f"{_id(r)} reads {label} ({what}), where a normalization "
            f"{'clamps it by or adds' if is_root else 'adds'} a constant eps")


def _after_eps(r: ir.Node, v: ir.Value, x, what: str) -> str:
    if r.op_type == "Sqrt":
        nxt = _readers(r.outputs[0])
        if not nxt:
            return f"{_id(r)} of the {what} plus eps is read by nothing"
        return _divides(nxt[0][0], nxt[0][1], x, what)
    if r.op_type == "Pow":
        k = _scalar_const(r.inputs[1] if len(r.inputs) > 1 else None)
        if k != -0.5:
            return f"{_id(r)} raises the {what} plus eps to {k}, not to -0.5 (an inverse square root)"
        nxt = _readers(r.outputs[0])
        if not nxt or nxt[0][0].op_type != "Mul":
            return f"{_id(r)} (an inverse square root) is not multiplied into x"
        m = nxt[0][0]
        return _numerator(m, _other(m, nxt[0][1]), x, what)
    return f"{_id(r)} reads the {what} plus eps, where a normalization takes its square root"


def _is_cube(n: ir.Node) -> bool:
    """``Pow(a, 3)``, or ``Mul(a, Mul(a, a))`` in either order."""
    if n.op_type == "Pow":
        return _scalar_const(n.inputs[1] if len(n.inputs) > 1 else None) == 3.0
    if n.op_type != "Mul" or len(n.inputs) != 2 or any(i is None for i in n.inputs):
        return False
    for a, b in (n.inputs, n.inputs[::-1]):
        p = strip_noop(b).producer()
        if p is not None and p.op_type == "Mul" and len(p.inputs) == 2 and all(
                i is not None and same_value(i, a) for i in p.inputs):
            return True
    return False


def _is_gelu_tanh(t: ir.Value, depth: int = 3) -> bool:
    """``t`` is ``x + 0.044715 x^3`` (the tanh GELU's argument): a cube within a few producers."""
    stack = [(strip_noop(t), depth)]
    while stack:
        v, d = stack.pop()
        n = v.producer()
        if n is None or d == 0:
            continue
        if _is_cube(n):
            return True
        stack.extend((strip_noop(i), d - 1) for i in n.inputs if i is not None)
    return False


def why_scaled_tanh(tanh: ir.Node, m: Match) -> str:
    """DyT is ``w * tanh(alpha x) + b`` with one scalar alpha and constant w, b varying along one axis."""
    k = m.values.get("alpha", m.values.get("divisor"))
    scale = m.bound["scale"]
    if k is not None and k.size != 1:
        return (f"{_id(tanh)}: {_id(scale)} scales x by a constant of shape {list(k.shape)}, "
                "not by one scalar alpha")
    readers = _readers(tanh.outputs[0])
    if tanh.outputs[0].is_graph_output():
        return f"{_id(tanh)} is a graph output (no DyT weight follows it)"
    if not readers:
        return f"{_id(tanh)} is read by nothing"
    r, v = readers[0]
    if len(readers) > 1:
        return f"{_id(tanh)} has {len(readers)} readers, where DyT's weight alone reads it"
    if r.op_type != "Mul":
        return f"{_id(r)} reads {_id(tanh)}, where DyT multiplies it by a constant weight"
    w = fold(_other(r, v))
    if w is None:
        return f"{_id(r)} after {_id(tanh)} multiplies by a non-constant tensor, not a DyT weight"
    return (f"tanh(alpha x) * w is there ({_id(tanh)}, {_id(r)}, weight of shape {list(w.shape)}), "
            "but no recognizer of this stage took it")


def why_affine(aff) -> str:
    """A per-channel affine is no normalization: say so, and what the rewrite stage does with it."""
    ops = ", ".join(f"{_id(n)}" for n in aff.nodes)
    shift = " + c" if np.any(aff.shift != 0) else ""
    return (f"y = a * x{shift} by constants varying along axis {aff.axis} ({ops}) follows no statistic of x, so "
            "it is no normalization to recognize: it stays an affine, for fold_affine_into_linear to fold")


# ----------------------------------------------------------------------------- the normalizations


def describe_normalizations(model: ir.Model, results: list[PassResult], canonicalize: set[str]) -> list[dict]:
    """One entry per normalization node of the canonical ``model``: kind, op, spelling, recognition and fate.

    ``recognized``: what the canonicalize steps (``canonicalize``, by name) did to make the node,
    with ``spelling`` the ops they matched (``Rewrite.spelling``); a node no recognizer made
    came as exported (``spelling`` names its op). ``rewrites``: what later passes did to it;
    ``kept_because``: why each later pass left it, when none rewrote it. A recognizer records
    the node under the name it made; the naming step may then have renamed it after its
    module (:func:`normdeploy.canonicalize.naming.module_path`).
    """
    canon = [r for r in results if r.name in canonicalize]
    later = [r for r in results if r.name not in canonicalize]
    norms = find_norms(model)
    names = {n.name for n in norms}

    def owner(node_name: str | None) -> str | None:
        if node_name in names:
            return node_name
        path = module_path(node_name)
        return path if path in names else None

    made: dict[str, list] = {}
    for r in canon:
        for w in r.rewrites:
            key = owner(w.node)
            if key is not None:
                made.setdefault(key, []).append((r.name, w))
    entries = []
    for n in norms:
        applied = [f"{r.name}: {w.what}" for r in later for w in r.rewrites if w.node == n.name]
        reasons = [f"{r.name}: {s.reason}" for r in later for s in r.skipped if s.node == n.name]
        recs = made.get(n.name, [])
        spelling = next((w.spelling for _, w in recs if w.spelling), None)
        op_name = f"{n.domain + '::' if n.domain else ''}{n.op_type}"
        entries.append({
            "node": n.name, "kind": n.kind, "op": op_name,
            "recognized": [f"{name}: {w.what}" for name, w in recs],
            "recognized_by": recs[0][0] if recs else None,
            "spelling": spelling or f"as exported: {op_name}",
            "rewrites": applied,
            "kept_because": [] if applied else (reasons or ["no pass applies to this kind on this target"]),
        })
    return entries
