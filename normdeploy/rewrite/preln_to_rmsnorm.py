"""Pre-LN to Pre-RMSNorm, exact (DESIGN.md 3.3; Jiang et al., NeurIPS 2023).

A pre-LN transformer keeps a residual stream ``h`` of width d::

    h_0 = write_0(x)                      embeddings (+ positions, class token)
    h_{i+1} = h_i + write_{i+1}(LN_i(h_i))  each branch ends in a linear projection
    out = head(LN_f(select(h_L)))          select: a token, a mean over tokens, or nothing

**Why it is exact.** If every *write* into the stream has zero mean over d, every ``h_i``
has, so ``LN(h) = g (h - mean h) / sqrt(var h + eps) + b`` equals
``g h / sqrt(mean(h^2) + eps) + b``: an RMSNorm with the same gain and epsilon, then the
bias (which the rewrite stage folds into the consumers where it can). A selection that keeps
each token's d-vector whole (Gather or Slice of tokens, a mean over tokens, Cast, a Reshape
or Transpose that keeps the model axis last) maps zero-mean vectors to zero-mean vectors,
so an LN may read the stream through one.

**Writes re-centred in their weights** (free). For ``y = x W + c``, ``mean_d(y) = x mean_d(W)
+ mean_d(c)``, so ``W' = W - mean_d(W)`` (each row minus its mean over d), ``c' = c - mean_d(c)``
give ``y - mean_d(y)``. A layer scale (a per-channel constant ``gamma`` multiplying the
branch before the residual Add: CaiT, DeiT-III, BEiT, DINOv2) makes the write
``gamma * (x W + c) = x (W diag gamma) + gamma c``, still affine: ``gamma`` is folded into
the weight and bias, the product re-centred, and the Mul removed. Embedding tables,
position tables and class tokens are constants: their mean over d is subtracted. On the
way to the Add a write may go through Reshape / Transpose / Flatten (the model axis
followed, e.g. a Conv's channel axis moved last), Gather / Slice / Concat / Pad (with 0)
on other axes (Swin's window reverse), a Resize of other axes (DINOv2's interpolated position
table: each output a linear combination of inputs along those axes, the same for every channel), Expand, Identity /
Dropout / Cast, scalar Mul or Div. Weights are re-centred in float64 and stored once in their dtype; a constant shared
with another reader is written as a new constant for the stream only, so the other reader
keeps the original (for an embedding table, see the explicit re-centring below).

**Explicit re-centring** (``w - ReduceMean(w)`` over d, one node pair). A write that is not
affine (Whisper's conv + GELU stem, an LN output such as CLIP's ``pre_layrnorm``), whose
shapes cannot be followed, or whose value (or a tensor on its way) has another reader or
is a graph output (re-centring its weights would change what that reader sees) is
re-centred explicitly where it enters the stream: the stream's Add reads the re-centred
copy, every other reader the original. So every write is zero-mean and the argument above
holds. An embedding table that another node also reads (an LM head tied to it, ``MatMul(x,
Transpose(E))``) is not copied: the rows its Gather reads are re-centred explicitly there,
a ``[tokens, d]`` tensor instead of a second ``[vocab, d]`` table.

**Memory.** The edits are made one weight at a time: each new weight is computed in float64
from its stored value, cast to the stored dtype and kept, the temporaries dropped before the
next (a large constant, such as an untied embedding table, is centred a slice of rows at a
time, :func:`centred_as`), so the pass holds the new weights plus one weight's float64
temporaries, never all of them at once.

**A stream tensor that must keep its value.** A stream tensor that is a graph output (CLIP's
and BEiT's ``last_hidden_state``) or has a reader other than the stream's Adds and LNs
(Swin's patch merging, which concatenates four tokens along the model axis before its LN:
that LN needs each token's own mean) must keep its original, un-centred value ``h``. Re-
centring the writes before it replaces ``h`` by ``h - mean_d(h)``, and no re-centring placed
at ``h`` gives ``h`` back: that needs ``mean_d(h) = sum_i mean_d(w_i)`` over every earlier write.
A write re-centred in its weights no longer computes its mean; recovering it takes a product
``x_i . mean_d(W_i)``, a second pass over the write's input; a write re-centred explicitly
has its mean at hand (the ReduceMean), but then every write needs one, one per LN, which the
rule below refuses. Measured on ONNX Runtime (CPU, one thread, T=788 tokens, d=768):
LayerNormalization 248 us, SimplifiedLayerNormalization 127 us (so a conversion saves about
120 us), ReduceMean + Sub 103 us, the ``[T, 4d] x [4d, 1]`` product for one MLP write 516 us.
So that tensor and everything upstream of it keep their values: their writes are not touched
and the LNs reading them stay LayerNorm (skipped, naming the tensor and its reader). Where
the stream goes on past such a tensor ``u`` (a residual Add reads it), that Add reads an
explicit re-centring of ``u`` (every other reader keeps ``u``) and the rest of the stream is
converted: only the norm inputs there are re-centred, never the value that must be kept.

**When it pays.** An explicit re-centring costs most of what one LayerNorm-to-RMSNorm
conversion saves (103 us against 120 us above), so a stream is converted only when it turns at
least twice as many LNs into RMSNorm as it adds explicit re-centrings; otherwise its LNs are
skipped, with the reasons.

Only values on the converted part of the stream differ after the rewrite, and they are read
only by the converted LNs (whose outputs are unchanged) and by the stream's Adds; so the
model computes the same function up to float rounding.

Refused outright (with the node that breaks it): an LN whose scale or bias is not a constant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..core.graph import (
    Namer,
    add_node,
    attr,
    const_value,
    constant,
    consumers,
    opset_of,
    rank_of,
    remove_nodes,
    replace_value,
    shape_of,
    value,
)
from ..core.linear import linear_layer
from ..core.ops import DOMAIN
from ..core.passes import PassContext, PassResult, Refuse

#: readers that see only a tensor's shape: re-centring its values changes nothing for them
SHAPE_READERS = ("Shape", "Size")
#: ops an LN may read the stream through (each keeps every token's d-vector whole, see _selects_tokens)
SELECTORS = ("Identity", "Cast", "Dropout", "Gather", "Slice", "ReduceMean", "Squeeze", "Unsqueeze", "Reshape",
             "Flatten", "Transpose")
#: an LN-to-RMSNorm conversion must convert at least this many LNs per explicit re-centring it adds
LNS_PER_EXPLICIT = 2


@dataclass
class Stream:
    """One residual stream: the LNs reading it, the Adds building it, the values written into it.

    ``paths[id(ln)] = (root, nodes)``: the stream tensor an LN reads and the token selections
    (:data:`SELECTORS`) between it and the LN, in order.
    """

    states: list[ir.Value]  # the stream tensors the LNs read (roots), in no particular order
    adds: list[ir.Node]  # residual Adds that build the states
    writes: list[ir.Value]  # values added into the stream (a state may itself be a write: h_0)
    lns: list[ir.Node] = field(default_factory=list)
    paths: dict = field(default_factory=dict)

    def heads(self) -> dict[int, set[int]]:
        """``id(root) -> ids of the nodes that read it on the way to an LN`` (the LN or its first selection)."""
        out: dict[int, set[int]] = {}
        for ln in self.lns:
            root, path = self.paths[id(ln)]
            out.setdefault(id(root), set()).add(id(path[0] if path else ln))
        return out

    def readers_on_stream(self) -> set[int]:
        """Ids of the nodes that read stream values: the residual Adds, the LNs and their first selections."""
        ids = {id(n) for n in self.adds} | {id(n) for n in self.lns}
        for _, path in self.paths.values():
            if path:
                ids.add(id(path[0]))
        return ids


def _is_last_axis_ln(node: ir.Node) -> bool:
    if node.op_type != "LayerNormalization":
        return False
    axis = int(attr(node, "axis", -1))
    rank = rank_of(node.inputs[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def _is_constant(v: ir.Value) -> bool:
    """``v`` is an initializer (what graphsurgeon called a Constant), not a Constant node's output."""
    return v.producer() is None and v.const_value is not None


def _width(ln: ir.Node) -> int | None:
    g = const_value(ln.inputs[1])
    if g is not None and g.ndim >= 1:
        return int(g.shape[-1])
    shape = shape_of(ln.inputs[0])
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _same_dim(a, b) -> bool:
    """Two dimensions known to be equal: the same int, or the same symbolic name."""
    return a is not None and a == b


def _static_axes(node: ir.Node, slot: int, attr_name: str = "axes") -> list[int] | None:
    """A node's axes (attribute, or constant input ``slot``), or None when not known."""
    a = attr(node, attr_name)
    if a is not None:
        return [int(x) for x in a]
    if len(node.inputs) > slot and node.inputs[slot] is not None:
        c = const_value(node.inputs[slot])
        return None if c is None else [int(x) for x in np.atleast_1d(c)]
    return None


def _selects_tokens(node: ir.Node, d: int) -> bool:
    """Whether ``node`` (reading the stream as input 0) keeps every token's d-vector whole on the last axis.

    Such a node maps zero-mean vectors to zero-mean vectors, so an LN may read the stream through it.
    """
    if node.domain not in ("", "ai.onnx") or node.op_type not in SELECTORS or not node.inputs or node.inputs[0] is None:
        return False
    op, x, y = node.op_type, node.inputs[0], node.outputs[0]
    rank = rank_of(x)
    if op in ("Identity", "Cast", "Dropout"):
        return True
    if rank is None:
        return False
    last = rank - 1
    if op == "Gather":
        return int(attr(node, "axis", 0)) % rank != last
    if op == "Slice":
        axes = _static_axes(node, 3)
        if axes is None:
            n = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if len(node.inputs) > 3 and node.inputs[3] is not None or n is None:
                return False
            axes = list(range(int(np.atleast_1d(n).size)))
        return all(a % rank != last for a in axes)
    if op == "ReduceMean":
        axes = _static_axes(node, 1)
        if not axes:
            return False  # every axis (or an identity): not a selection of tokens
        return all(a % rank != last for a in axes)
    if op == "Transpose":
        perm = attr(node, "perm")
        return perm is not None and int(perm[-1]) == last
    # Squeeze, Unsqueeze, Reshape, Flatten: row-major, so equal last dims keep each d-vector whole
    sx, sy = shape_of(x), shape_of(y)
    return bool(sx and sy) and sx[-1] == d and sy[-1] == d


def _selection_path(v: ir.Value, d: int) -> tuple[ir.Value, list[ir.Node]]:
    """Walk up from an LN's input through token selections to the stream tensor (stopping at an Add)."""
    path: list[ir.Node] = []
    while True:
        p = v.producer()
        if p is None or p.op_type == "Add" or not _selects_tokens(p, d) or len(path) > 16:
            return v, path
        path.insert(0, p)
        v = p.inputs[0]


def find_streams(graph: ir.Graph) -> list[Stream]:
    """Group last-axis LayerNorm inputs into residual streams joined by Add trees."""
    lns = [n for n in graph if _is_last_axis_ln(n)]
    paths = {}
    for ln in lns:
        d = _width(ln)
        paths[id(ln)] = _selection_path(ln.inputs[0], d) if d is not None else (ln.inputs[0], [])
    states = {id(r): r for r, _ in paths.values()}
    parent = {k: k for k in states}

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    expansions = {}
    for key, t in states.items():
        adds, writes, prev = [], [], []
        _expand(t, states, adds, writes, prev, top=True)
        expansions[key] = (adds, writes)
        for p in prev:
            parent[find(id(p))] = find(key)
    groups: dict[int, Stream] = {}
    for key, t in states.items():
        root = find(key)
        s = groups.setdefault(root, Stream([], [], []))
        s.states.append(t)
        s.adds += [a for a in expansions[key][0] if all(a is not b for b in s.adds)]
        s.writes += [w for w in expansions[key][1] if all(w is not x for x in s.writes)]
    for s in groups.values():
        ids = {id(t) for t in s.states}
        s.lns = [n for n in lns if id(paths[id(n)][0]) in ids]
        s.paths = {id(n): paths[id(n)] for n in s.lns}
    return list(groups.values())


def _expand(t, states, adds, writes, prev, top=False):
    """Split stream state ``t`` into residual Adds, earlier states and writes."""
    if not top and id(t) in states:
        if all(t is not p for p in prev):
            prev.append(t)
        return
    p = t.producer()
    if p is not None and p.op_type == "Add" and p.domain in ("", "ai.onnx") and _reaches_state(p, states):
        if any(p is a for a in adds):
            return
        adds.append(p)
        for x in p.inputs:
            _expand(x, states, adds, writes, prev)
        return
    if all(t is not w for w in writes):
        writes.append(t)


def _reaches_state(add: ir.Node, states, depth: int = 0) -> bool:
    """Whether an Add tree contains an earlier stream state (so it is residual, not a write)."""
    if depth > 64:
        return False
    for x in add.inputs:
        if id(x) in states:
            return True
        p = x.producer() if x is not None else None
        if p is not None and p.op_type == "Add" and _reaches_state(p, states, depth + 1):
            return True
    return False


# ----------------------------------------------------------------------------- who reads the stream


def _graph_output_through(r: ir.Node) -> str | None:
    """If ``r`` is an Identity / Cast chain ending in a graph output, that output's name."""
    seen = 0
    while r is not None and r.op_type in ("Identity", "Cast") and seen < 8:
        out = r.outputs[0]
        if out.is_graph_output():
            return out.name
        users = consumers(out)
        r = users[0] if len(users) == 1 else None
        seen += 1
    return None


def _describe_reader(t: ir.Value, r: ir.Node, stream: Stream, depth: int = 0) -> str:
    """Why reader ``r`` of stream tensor ``t`` needs ``t``'s un-centred value, naming the node and the cause."""
    out = _graph_output_through(r)
    if out is not None:
        return f"stream tensor {t.name} is the graph output {out} (through {r.op_type} {r.name})"
    if r.op_type == "LayerNormalization":
        return f"stream tensor {t.name} is read by LayerNorm {r.name} over another axis than the model axis"
    if r.op_type == "Add":  # the stream goes on, but no LN of it reads what follows: say what does
        other = next((x for x in r.inputs if x is not t), None)
        q = other.producer() if other is not None else None
        what = f"{q.op_type} {q.name}" if q is not None else f"{other.name}" if other is not None else "itself"
        via = f"stream tensor {t.name} goes on through Add {r.name} (adding {what}), which no LayerNorm of it reads"
        nxt = r.outputs[0]
        if nxt.is_graph_output():
            return f"{via}, into the graph output {nxt.name}"
        readers = [x for x in consumers(nxt) if x.op_type not in SHAPE_READERS]
        if readers and depth < 8:
            return f"{via}; then " + _describe_reader(nxt, readers[0], stream, depth + 1)
        return via
    regroup = ("Reshape", "Transpose", "Slice", "Pad", "Gather", "Squeeze", "Unsqueeze", "Identity", "Cast")
    if r.op_type in regroup:  # follow the regrouping (every branch) to what it feeds
        todo, seen, beyond = [r], set(), None
        while todo and len(seen) < 64:
            n = todo.pop(0)
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Concat":
                rank = rank_of(n.outputs[0])
                if rank is not None and int(attr(n, "axis", 0)) % rank == rank - 1:
                    return (f"stream tensor {t.name} is regrouped by {r.op_type} {r.name} and Concat {n.name} "
                            f"joins several tokens along the model axis (a patch merging): what reads it needs each "
                            f"token's own mean")
            elif n.op_type not in regroup:
                beyond = beyond or n
                continue
            if n.outputs[0].is_graph_output():
                return f"stream tensor {t.name} reaches the graph output {n.outputs[0].name} through {r.op_type} {r.name}"
            todo += consumers(n.outputs[0])
        if beyond is not None:
            return (f"stream tensor {t.name} is read by {beyond.op_type} {beyond.name} (through {r.op_type} "
                    f"{r.name}), which needs its un-centred value")
    return (f"stream tensor {t.name} is read by {r.op_type} {r.name}, which needs its un-centred value (not a "
            f"LayerNorm over the model axis, a residual Add or a token selection feeding one)")


def must_keep(stream: Stream) -> dict[int, str]:
    """The stream tensors whose un-centred value something needs, each with the reason (node and cause)."""
    tensors = {id(v): v for v in stream.states}
    tensors.update({id(a.outputs[0]): a.outputs[0] for a in stream.adds})
    adds = {id(a) for a in stream.adds}
    heads = stream.heads()
    keep: dict[int, str] = {}
    for key, t in tensors.items():
        if t.is_graph_output():
            keep[key] = f"stream tensor {t.name} is a graph output"
            continue
        for r in consumers(t):
            if id(r) in adds or id(r) in heads.get(key, ()) or r.op_type in SHAPE_READERS:
                continue
            keep[key] = _describe_reader(t, r, stream)
            break
    nxt: dict[int, set[int]] = {}  # a selection's output -> the nodes allowed to read it
    for ln in stream.lns:
        _, path = stream.paths[id(ln)]
        for i, n in enumerate(path):
            nxt.setdefault(id(n.outputs[0]), set()).add(id(path[i + 1] if i + 1 < len(path) else ln))
    for ln in stream.lns:
        root, path = stream.paths[id(ln)]
        if id(root) in keep:
            continue
        for n in path:
            out = n.outputs[0]
            if out.is_graph_output():
                keep[id(root)] = f"{out.name} ({n.op_type} {n.name} of stream tensor {root.name}) is a graph output"
                break
            other = [r for r in consumers(out) if id(r) not in nxt[id(out)] and r.op_type not in SHAPE_READERS]
            if other:
                keep[id(root)] = (f"{out.name} ({n.op_type} {n.name} of stream tensor {root.name}) is also read by "
                                  f"{other[0].op_type} {other[0].name}, which needs its un-centred value")
                break
    return keep


# ----------------------------------------------------------------------------- re-centring the writes


def _vector_along(c: np.ndarray, axis: int, d: int) -> np.ndarray | None:
    """A constant factor as a length-d float64 vector along ``axis`` (negative), if it is one; else None."""
    c = np.asarray(c)
    if c.ndim < -axis:
        return np.full(d, float(c.reshape(-1)[0])) if c.size == 1 else None
    pos = c.ndim + axis
    if any(s != 1 for i, s in enumerate(c.shape) if i != pos) or c.shape[pos] not in (1, d):
        return None
    return np.broadcast_to(np.asarray(c, np.float64).reshape(-1), (d,)).copy()


def _along(vec: np.ndarray, axis: int) -> np.ndarray:
    """``vec`` shaped to broadcast on ``axis`` (negative) of a tensor."""
    return vec.reshape((-1,) + (1,) * (-axis - 1))


#: float64 bytes a re-centring computes at once; a larger constant is centred in slices of other axes
CHUNK_BYTES = 32 << 20


def centred_as(v: np.ndarray, axis: int, scale: np.ndarray | None = None) -> np.ndarray:
    """``scale * v - mean(scale * v, axis)`` in ``v``'s dtype, computed in float64 a slice at a time.

    The mean is over ``axis`` (negative) alone, so slices along any other axis are independent:
    the float64 temporaries are at most :data:`CHUNK_BYTES`, whatever the size of ``v`` (an
    embedding table of 150 MB would otherwise need two 300 MB float64 copies at once).
    """
    v = np.asarray(v)
    dtype = v.dtype
    if scale is not None:
        shape = np.broadcast_shapes(v.shape, _along(scale, axis).shape)
    else:
        shape = v.shape
    if len(shape) < -axis:  # a scalar broadcast along the axis: zero deviation from its mean
        return np.zeros(shape, dtype)
    pos = len(shape) + axis
    others = [i for i in range(len(shape)) if i != pos]
    if not others or int(np.prod(shape)) * 8 <= CHUNK_BYTES:
        x = np.asarray(v, np.float64) * (_along(scale, axis) if scale is not None else 1.0)
        return (x - x.mean(axis=axis, keepdims=True)).astype(dtype)
    v = np.broadcast_to(v, shape)
    cut = max(others, key=lambda i: shape[i])
    step = max(1, CHUNK_BYTES // (8 * (int(np.prod(shape)) // shape[cut])))
    out = np.empty(shape, dtype)
    s = _along(scale, axis) if scale is not None else None
    for i in range(0, shape[cut], step):
        idx = (slice(None),) * cut + (slice(i, i + step),)
        x = np.asarray(v[idx], np.float64)
        if s is not None:
            x = x * s
        x -= x.mean(axis=axis, keepdims=True)
        out[idx] = x
    return out


def _other_reader(v: ir.Value, node: ir.Node) -> str | None:
    """A reader of ``v`` other than ``node`` (or the graph outputs), named; None when ``node`` alone reads it."""
    if v.is_graph_output():
        return "a graph output"
    for r, _ in v.uses():
        if r is not node:
            return f"{r.op_type} {r.name}"
    return None


class Recentre:
    """Plans the re-centring of every write, then applies it; nothing changes until apply().

    An edit is ``(kind, obj, axis, reader, scale)``: ``scale`` is the per-channel factor (a
    length-d vector along ``axis``, or None) of the layer-scale Muls above ``obj``, folded in
    before the centring; each such Mul is then bypassed.
    """

    def __init__(self, graph: ir.Graph, d: int, namer: Namer | None = None):
        self.graph, self.d, self.edits = graph, d, []
        self.namer = namer or Namer(graph)
        self._seen, self._path, self._shared = {}, set(), []  # per write, see try_plan
        self.replaced: dict[int, ir.Value] = {}  # a bypassed Mul's output -> the value that replaces it

    def try_plan(self, t: ir.Value, readers: list[ir.Node] | None) -> str | None:
        """Plan ``t``'s re-centring, or return why it cannot be done in its weights (nothing planned then).

        ``readers``: the stream's nodes that read ``t`` (a top-level write: a constant is replaced there
        only); None for a stream state that is itself a write (its readers were checked already).
        """
        n = len(self.edits)
        self._seen: dict[int, tuple[int, np.ndarray | None]] = {}  # tensors planned for this write: axis, scale
        self._path: set[int] = set()  # the nodes on this write's path
        self._shared: list[ir.Value] = []  # tensors on it with more than one reader
        try:
            if readers is not None and _is_constant(t):
                for r in readers:
                    self.edits.append(("const", t, -1, r, None))
            else:
                self.plan(t, -1)
            for x in self._shared:  # a fork on the path is fine when every branch rejoins it (Swin's roll)
                others = [r for r in consumers(x) if id(r) not in self._path and r.op_type not in SHAPE_READERS]
                if others:
                    q = x.producer()
                    raise Refuse(f"{x.name} ({q.op_type} {q.name}) on the write into the stream is also read by "
                                 f"{others[0].op_type} {others[0].name}: re-centring it in place would change what "
                                 f"that reader sees")
        except Refuse as e:
            del self.edits[n:]
            return str(e)
        return None

    def plan(self, t: ir.Value, axis: int, reader: ir.Node | None = None, scale: np.ndarray | None = None) -> None:
        """Plan ``t -> scale * t - mean(scale * t, axis)``; ``axis`` is the model-dimension axis of ``t`` (negative).

        ``reader`` is the node on the write path that reads ``t``; a constant is replaced
        there only, so any other reader keeps the original value. Any other tensor on the path
        must not be a graph output and must have no reader off the path (but Shape): its value
        changes. A tensor two branches of the write read (a roll's Slices) is planned once.
        """
        if _is_constant(t):
            self.edits.append(("const", t, axis, reader, scale))
            return
        node = t.producer()
        if node is None:
            raise Refuse(f"{t.name}, written into the stream, is a graph input, not an affine map of constants")
        if reader is not None:
            self._path.add(id(reader))
            if t.is_graph_output():
                raise Refuse(f"{t.name} ({node.op_type} {node.name}) on the write into the stream is also a graph "
                             f"output: re-centring it in place would change that output")
            if id(t) in self._seen:  # a second branch of the write reaches it: planned once, the same way
                ax, sc = self._seen[id(t)]
                if ax != axis or (sc is None) != (scale is None) or (sc is not None and not np.array_equal(sc, scale)):
                    raise Refuse(f"{t.name} ({node.op_type} {node.name}) reaches the stream along two branches with "
                                 f"different model axes or layer scales")
                return
            self._seen[id(t)] = (axis, scale)
            if any(r is not reader and r.op_type not in SHAPE_READERS for r in consumers(t)):
                self._shared.append(t)  # checked once the whole write is planned
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise Refuse(f"{op} {node.name} on the write into the stream is not an ONNX op normdeploy can re-centre")
        if op == "Constant":
            self.edits.append(("constnode", node, axis, None, scale))
        elif op in ("Identity", "Dropout", "Cast"):
            self.plan(node.inputs[0], axis, node, scale)
        elif op in ("Add", "Sub"):
            for x in node.inputs:
                self.plan(x, axis, node, scale)
        elif op in ("Mul", "Div"):
            self._plan_scaling(node, axis, scale)
        elif op == "Gemm":
            if axis != -1:
                raise Refuse(f"Gemm {node.name} output channel is not the model axis")
            if const_value(node.inputs[1]) is None:
                raise Refuse(f"Gemm {node.name} weight is not a constant")
            if len(node.inputs) > 2 and node.inputs[2] is not None and const_value(node.inputs[2]) is None:
                raise Refuse(f"Gemm {node.name} bias is not a constant")
            self.edits.append(("linear", node, axis, None, scale))
        elif op == "MatMul":
            if const_value(node.inputs[1]) is None:
                raise Refuse(f"MatMul {node.name} right operand is not a constant")
            if axis != -1:
                raise Refuse(f"MatMul {node.name} output's model axis is not its last")
            self.edits.append(("linear", node, axis, None, scale))
        elif op == "Conv":
            if not self._is_channel_axis(node, axis):
                raise Refuse(f"Conv {node.name} channel axis is not the model axis")
            has_b = len(node.inputs) > 2 and node.inputs[2] is not None
            if const_value(node.inputs[1]) is None or (has_b and const_value(node.inputs[2]) is None):
                raise Refuse(f"Conv {node.name} weight or bias is not a constant")
            self.edits.append(("linear", node, axis, None, scale))
        elif op == "Gather":
            self._plan_gather(node, axis, scale, reader)
        elif op == "Slice":
            rank = rank_of(t)
            axes = _static_axes(node, 3)
            if axes is None and len(node.inputs) <= 3:
                starts = const_value(node.inputs[1])
                axes = None if starts is None else list(range(int(np.atleast_1d(starts).size)))
            if rank is None or axes is None or any(a % rank == axis % rank for a in axes):
                raise Refuse(f"Slice {node.name} on the write into the stream may cut the model axis")
            self.plan(node.inputs[0], axis, node, scale)
        elif op == "Pad":
            self._plan_pad(node, axis, scale)
        elif op == "Resize":
            self._plan_resize(node, axis, scale)
        elif op == "Expand":
            self.plan(node.inputs[0], axis, node, scale)
        elif op == "Concat":
            rank = rank_of(t)
            cat = int(attr(node, "axis"))
            if rank is None or (cat % rank) == (axis % rank):
                raise Refuse(f"Concat {node.name} joins along the model axis")
            for x in node.inputs:
                self.plan(x, axis, node, scale)
        elif op == "Transpose":
            perm = attr(node, "perm")
            if perm is None:  # the default reverses the axes
                rank = rank_of(t)
                if rank is None:
                    raise Refuse(f"Transpose {node.name} reverses axes of unknown rank")
                perm = list(range(rank))[::-1]
            rank = len(perm)
            self.plan(node.inputs[0], perm[axis % rank] - rank, node, scale)
        elif op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            self.plan(node.inputs[0], self._axis_through_reshape(node, axis), node, scale)
        else:
            raise Refuse(f"{op} {node.name} on the write into the stream is not affine")

    def _plan_scaling(self, node: ir.Node, axis: int, scale) -> None:
        """``x * c`` or ``x / c`` by a constant: a scalar commutes with the centring; a per-channel factor
        (a layer scale) is folded into what computes ``x`` and the node bypassed."""
        a, b = node.inputs
        pairs = ((a, b), (b, a)) if node.op_type == "Mul" else ((a, b),)
        for x, other in pairs:
            cv = const_value(other)
            if cv is None:
                continue
            if cv.size == 1 and cv.ndim < -axis:
                self.plan(x, axis, node, scale)
                return
            vec = _vector_along(cv, axis, self.d)
            if vec is None:
                raise Refuse(f"{node.op_type} {node.name} scales the write by a constant of shape {list(cv.shape)}, "
                             f"not one factor per model channel")
            if node.op_type == "Div":
                if np.any(vec == 0):
                    raise Refuse(f"Div {node.name} divides the write by a zero factor")
                vec = 1.0 / vec
            sx, sy = shape_of(x), shape_of(node.outputs[0])
            if sx is None or sy is None or cv.ndim > len(sx) or len(sx) != len(sy) or len(sx) < -axis or \
                    not (sx[axis] == self.d or _same_dim(sx[axis], sy[axis])):
                raise Refuse(f"{node.op_type} {node.name} broadcasts the write to another shape (or its shapes are "
                             f"not known)")
            slot = 0 if x is a else 1
            self.plan(x, axis, node, vec if scale is None else scale * vec)
            self.edits.append(("bypass", node, axis, slot, None))
            return
        def src(v):
            q = v.producer() if v is not None else None
            return f"{v.name} (from {q.op_type} {q.name})" if q is not None else f"{v.name} (a graph input)"

        raise Refuse(f"{node.op_type} {node.name} on the write into the stream "
                     f"{'multiplies' if node.op_type == 'Mul' else 'divides'} {src(a)} by {src(b)}, two computed "
                     f"tensors: it is not affine")

    def _plan_gather(self, node: ir.Node, axis: int, scale, reader: ir.Node | None = None) -> None:
        table = const_value(node.inputs[0])
        rank = rank_of(node.inputs[0])
        g = int(attr(node, "axis", 0))
        if table is not None:
            if g != 0:
                raise Refuse(f"Gather {node.name} does not read rows of a constant table")
            if axis != -1:
                raise Refuse(f"Gather {node.name} table's last axis is not the model axis")
            other = _other_reader(node.inputs[0], node)
            if other is not None:  # a tied table: re-centre the gathered rows, never copy the table
                why = (f"Gather {node.name} reads the table {node.inputs[0].name} ({table.nbytes / 1e6:.1f} MB), "
                       f"which {other} also reads (tied embeddings): its rows are re-centred where they are gathered "
                       f"instead of storing a centred copy of the table")
                if reader is None or scale is not None:
                    raise Refuse(why)  # re-centred explicitly where it enters the stream (the same place)
                self.edits.append(("explicit", node.outputs[0], axis, reader, why))
                return
            self.edits.append(("gather", node, axis, None, scale))
            return
        if rank is None or g % rank >= axis % rank:  # the model axis must come after the gathered one
            raise Refuse(f"Gather {node.name} on the write into the stream gathers along (or after) the model axis")
        self.plan(node.inputs[0], axis, node, scale)

    def _plan_pad(self, node: ir.Node, axis: int, scale) -> None:
        mode = attr(node, "mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = attr(node, "pads")
        if pads is None and len(node.inputs) > 1:
            c = const_value(node.inputs[1])
            pads = None if c is None else [int(p) for p in c]
        fill = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        rank = rank_of(node.inputs[0])
        pad_axes = _static_axes(node, 3) if len(node.inputs) > 3 else None
        if mode != "constant" or pads is None or rank is None or (fill is not None and np.any(fill != 0)) or \
                (len(node.inputs) > 3 and node.inputs[3] is not None and pad_axes is None):
            raise Refuse(f"Pad {node.name} on the write into the stream is not a zero padding of known axes")
        axes = pad_axes if pad_axes is not None else list(range(rank))
        k = len(axes)
        for i, a in enumerate(axes):
            if a % rank == axis % rank and (pads[i] != 0 or pads[i + k] != 0):
                raise Refuse(f"Pad {node.name} pads the model axis")
        self.plan(node.inputs[0], axis, node, scale)  # the padded zeros have zero mean, before and after

    def _plan_resize(self, node: ir.Node, axis: int, scale) -> None:
        """A Resize that keeps the model axis (DINOv2's interpolated position table): every output value is a
        linear combination of input values along the other axes, with the same coefficients for every channel
        (nearest, linear, cubic), so it commutes with the centring over the model axis; a crop-and-resize fills
        with a constant: refused."""
        x, y = node.inputs[0], node.outputs[0]
        mode = attr(node, "coordinate_transformation_mode", "half_pixel")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        sx, sy = shape_of(x), shape_of(y)
        if mode == "tf_crop_and_resize":
            raise Refuse(f"Resize {node.name} on the write into the stream crops and fills with a constant")
        if attr(node, "axes") is not None:
            kept = all(int(a) % len(sx) != axis % len(sx) for a in attr(node, "axes")) if sx else False
        else:
            kept = bool(sx and sy) and len(sx) == len(sy) and isinstance(sx[axis], int) and sx[axis] == sy[axis]
        if not kept:
            raise Refuse(f"Resize {node.name} on the write into the stream may resize the model axis (or its shapes "
                         f"are not known)")
        self.plan(x, axis, node, scale)

    @staticmethod
    def _is_channel_axis(node: ir.Node, axis: int) -> bool:
        rank = rank_of(node.outputs[0])
        return rank is not None and axis % rank == 1

    @staticmethod
    def _axis_through_reshape(node: ir.Node, axis: int) -> int:
        """Map the model axis back through a reshape that keeps it whole and keeps what precedes it."""
        out, inp = shape_of(node.outputs[0]), shape_of(node.inputs[0])
        if out is None or inp is None:
            raise Refuse(f"{node.op_type} {node.name} shapes are unknown")
        pos = axis % len(out)
        size = out[pos]
        if size is None:
            raise Refuse(f"{node.op_type} {node.name} model axis size is not known")
        if pos == len(out) - 1 and _same_dim(inp[-1], size):
            return -1
        if len(inp) > pos and all(_same_dim(p, q) for p, q in zip(out[:pos + 1], inp[:pos + 1])):
            return pos - len(inp)  # leading dims and the axis kept (e.g. Flatten(2))
        raise Refuse(f"{node.op_type} {node.name} moves or splits the model axis (or its shapes are not known)")

    def explicit(self) -> list[tuple[ir.Value, str]]:
        """The writes' inner values planned to be re-centred by a node pair (tied tables' Gathers), with why."""
        return [(obj, why) for kind, obj, _, _, why in self.edits if kind == "explicit"]

    def apply(self) -> list[tuple[ir.Value, str]]:
        """Make the planned edits, one weight at a time; returns the explicit re-centrings made (value, why)."""
        made = []
        seen = set()
        for kind, obj, axis, reader, scale in self.edits:
            key = (kind, id(obj), id(reader))
            if key in seen:
                continue
            seen.add(key)
            if kind == "explicit":
                made.append((recentre_explicitly(self.graph, self.namer, obj, [reader]), scale))
                continue
            getattr(self, f"_apply_{kind}")(obj, axis, reader, scale)
        return made

    def resolve(self, v: ir.Value) -> ir.Value:
        """The value that stands for ``v`` after the bypassed Muls."""
        while id(v) in self.replaced:
            v = self.replaced[id(v)]
        return v

    def _new(self, base: str, v: np.ndarray, axis: int, scale) -> ir.Value:
        """A new constant: ``scale * v`` minus its mean over ``axis``, stored in ``v``'s dtype."""
        return constant(self.namer, base, "centred", centred_as(v, axis, scale))

    def _apply_const(self, t: ir.Value, axis: int, reader: ir.Node, scale) -> None:
        new = self._new(t.name, const_value(t), axis, scale)
        for i, x in enumerate(reader.inputs):
            if x is t:
                reader.replace_input_with(i, new)

    def _apply_constnode(self, node: ir.Node, axis: int, reader, scale) -> None:
        out = node.outputs[0]
        new = self._new(out.name, const_value(out), axis, scale)
        for user, i in list(out.uses()):
            user.replace_input_with(i, new)

    def _apply_linear(self, node: ir.Node, axis: int, reader, scale) -> None:
        """Gemm, MatMul, Conv: weight and bias (times the layer scale) minus their means over the output channels."""
        scaled = []
        if scale is not None:  # two steps: the adapter's centring reads the stored weight
            before = {id(x) for x in node.inputs}
            layer = linear_layer(self.graph, node, 0, bias_add=False)
            layer.scale_outputs(scale)
            layer.apply(self.namer, "scaled")
            scaled = [x for x in node.inputs if x is not None and id(x) not in before]
            del layer
        layer = linear_layer(self.graph, node, 0, bias_add=False)
        layer.centre_outputs()
        layer.apply(self.namer, "centred")
        for x in scaled:  # the intermediate scaled weight is read by nothing now: drop it at once (memory)
            if not x.uses() and self.graph.initializers.get(x.name) is x:
                self.graph.initializers.pop(x.name)

    def _apply_gather(self, node: ir.Node, axis: int, reader, scale) -> None:
        node.replace_input_with(0, self._new(node.name or "gather", const_value(node.inputs[0]), -1, scale))

    def _apply_bypass(self, node: ir.Node, axis: int, slot: int, scale) -> None:
        """The factor of this Mul / Div is folded into what computes its input ``slot``: its readers read that."""
        out, x = node.outputs[0], node.inputs[slot]
        replace_value(out, x)
        self.replaced[id(out)] = x
        remove_nodes(self.graph, [node])


def recentre_explicitly(graph: ir.Graph, namer: Namer, v: ir.Value, readers: list[ir.Node]) -> ir.Value:
    """``v - ReduceMean(v)`` over the last axis, read by ``readers`` instead of ``v`` (every other reader keeps ``v``)."""
    base = v.name or "stream"
    opset = opset_of(graph) or 18
    mean = value(namer, base, "mean", dtype=v.dtype, shape=ir.Shape(list(v.shape)[:-1] + [1]) if v.shape else None)
    if opset >= 18:
        add_node(namer, "ReduceMean", [v, constant(namer, base, "mean_axes", np.array([-1], np.int64))], [mean],
                 base=base, name=namer(base, "recentre_mean"), attrs={"keepdims": 1})
    else:
        add_node(namer, "ReduceMean", [v], [mean], base=base, name=namer(base, "recentre_mean"),
                 attrs={"axes": [-1], "keepdims": 1})
    centred = value(namer, base, "recentred", dtype=v.dtype, shape=v.shape)
    add_node(namer, "Sub", [v, mean], [centred], base=base, name=namer(base, "recentre"))
    for r in readers:
        for i, x in enumerate(r.inputs):
            if x is v:
                r.replace_input_with(i, centred)
    return centred


# ----------------------------------------------------------------------------- the LNs


def ln_params(ln: ir.Node) -> tuple[np.ndarray, np.ndarray | None, float]:
    """A LayerNormalization's constant scale, bias (None when absent) and epsilon."""
    g = const_value(ln.inputs[1])
    b = const_value(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None else None
    return g, b, float(attr(ln, "epsilon", 1e-5))


def replace_lns(graph: ir.Graph, stream: Stream, namer: Namer, result: PassResult, target_op: str = "RMSNorm"):
    for ln in stream.lns:
        x, y = ln.inputs[0], ln.outputs[0]
        g, b, eps = ln_params(ln)
        base = ln.name or "ln"
        has_bias = b is not None and np.any(b != 0)
        mid = value(namer, base, "rms", dtype=y.dtype, shape=y.shape) if has_bias else None
        rms = add_node(namer, target_op, [x, constant(namer, base, "gain", g)], [mid] if mid is not None else None,
                       base=base, name=base, domain=DOMAIN, attrs={"epsilon": eps})
        out = rms.outputs[0]
        if has_bias:
            add_name = namer(base, "bias")
            out = add_node(namer, "Add", [mid, constant(namer, base, "bias", b)], base=base, name=add_name).outputs[0]
        if y.dtype is not None:  # a model without inferred types leaves them unset
            out.dtype = y.dtype
        out.shape = y.shape
        replace_value(y, out)
        remove_nodes(graph, [ln])
        result.rewrote(f"LayerNormalization {base} -> {target_op}" + (" + Add(bias)" if has_bias else ""), base)


def _ln_name(ln: ir.Node) -> str:
    return ln.name or ln.outputs[0].name


def _why_not_on_stream(ln: ir.Node, root: ir.Value) -> str:
    """Name the post-LN pattern when it is one (the residual Add feeding this LN adds another LN's output),
    else the node the LN's input comes from."""
    p = root.producer()
    if p is not None and p.op_type == "Add":
        for x in p.inputs:
            q = x.producer() if x is not None else None
            for _ in range(3):
                if q is None:
                    break
                if q.op_type == "LayerNormalization":
                    return (f"post-LN block: the residual Add {p.name} feeding it adds the output of LayerNorm "
                            f"{q.name}, so the stream is normalized after the residual, not before")
                q = q.inputs[0].producer() if q.inputs and q.inputs[0] is not None else None
    src = f"{p.op_type} {p.name}" if p is not None else ("a graph input" if not _is_constant(root) else "a constant")
    return (f"not on a pre-LN residual stream: its input {root.name} comes from {src}, and no residual Add joins it to "
            f"another LayerNorm's input")


@dataclass
class Plan:
    """What converting one stream takes; nothing has changed in the graph yet."""

    stream: Stream
    d: int
    rc: Recentre
    convert: list[ir.Node]  # LNs that become RMSNorm / CRMSNorm
    kept: dict[int, str]  # id(ln) -> why it stays a LayerNorm
    adds: list[ir.Node]  # the residual Adds of the converted part
    planned: list[ir.Value]  # writes re-centred in their weights
    explicit: list[tuple[ir.Value, list[ir.Node], str]]  # (value, stream readers, why) re-centred by a node pair
    reason: str | None = None  # set when the whole conversion is refused

    def n_explicit(self) -> int:
        """Explicit re-centrings the conversion adds: at writes and boundaries, and inside writes (tied tables)."""
        return len(self.explicit) + len(self.rc.explicit())


def plan_stream(graph: ir.Graph, stream: Stream, namer: Namer | None = None) -> Plan:
    """Check every condition and plan the re-centring; raises Refuse naming the culprit."""
    for ln in stream.lns:
        for i in (1, 2):
            if len(ln.inputs) > i and ln.inputs[i] is not None and const_value(ln.inputs[i]) is None:
                raise Refuse(f"{ln.name} (LayerNormalization) {'scale' if i == 1 else 'bias'} is not a constant")
    d = int(np.asarray(const_value(stream.lns[0].inputs[1])).shape[-1])
    keep = must_keep(stream)
    # everything upstream of a tensor that must keep its value keeps it too (with that tensor's reason)
    why: dict[int, str] = dict(keep)
    adds = {id(a) for a in stream.adds}
    todo = list(keep)
    values = {id(v): v for v in stream.states}
    values.update({id(a.outputs[0]): a.outputs[0] for a in stream.adds})
    values.update({id(w): w for w in stream.writes})
    while todo:
        key = todo.pop()
        v = values.get(key)
        p = v.producer() if v is not None else None
        if p is None or id(p) not in adds:
            continue
        for x in p.inputs:
            if x is not None and id(x) not in why:
                why[id(x)] = why[key]
                values.setdefault(id(x), x)
                todo.append(id(x))
    kept, convert = {}, []
    for ln in stream.lns:
        root, _ = stream.paths[id(ln)]
        if id(root) in why:
            cause, tail = why[id(root)], ("no re-centring there gives the un-centred value back: that needs the "
                                          "mean of every earlier write, a second pass over each write's input")
            if id(root) in keep:
                kept[id(ln)] = f"{cause}: it must keep its un-centred value, so this LayerNorm stays ({tail})"
            else:
                kept[id(ln)] = (f"{cause}, and {root.name}, which this LayerNorm reads, flows into it through the "
                                f"residual Adds: the stream up to there must keep its un-centred values, so this "
                                f"LayerNorm stays ({tail})")
        else:
            convert.append(ln)
    live_adds = [a for a in stream.adds if id(a.outputs[0]) not in why]
    live = {id(a) for a in live_adds}
    heads = stream.heads()
    rc = Recentre(graph, d, namer)
    planned, explicit = [], []
    states = {id(s) for s in stream.states}
    for w in stream.writes:
        if id(w) in why:
            continue
        stream_readers = [r for r in consumers(w) if id(r) in live]
        if id(w) in states:  # a state that is a write (h_0): its readers were checked with the stream's
            stream_readers += [r for r in consumers(w) if id(r) in heads.get(id(w), ())]
            reason = rc.try_plan(w, None)
        else:
            others = [r for r in consumers(w) if id(r) not in live and r.op_type not in SHAPE_READERS]
            if w.is_graph_output():
                reason = f"{w.name}, written into the stream, is also a graph output"
            elif others:
                reason = (f"{w.name}, written into the stream, is also read by {others[0].op_type} {others[0].name}: "
                          f"re-centring it in place would change what that reader sees")
            else:
                reason = rc.try_plan(w, stream_readers)
        if reason is None:
            planned.append(w)
        else:
            explicit.append((w, stream_readers, reason))
    boundary: dict[int, tuple[ir.Value, list[ir.Node]]] = {}
    for a in live_adds:  # a live Add reading a tensor that must keep its value reads a re-centred copy
        for x in a.inputs:
            if x is not None and id(x) in why:
                boundary.setdefault(id(x), (x, []))[1].append(a)
    for x, readers in boundary.values():
        explicit.append((x, list(dict.fromkeys(readers)), f"the stream goes on past {x.name}, which keeps its value "
                                                           f"({why[id(x)]})"))
    plan = Plan(stream, d, rc, convert, kept, live_adds, planned, explicit)
    n_explicit = plan.n_explicit()
    if not convert:
        plan.reason = "no LayerNorm of the stream can be converted"
    elif len(convert) < LNS_PER_EXPLICIT * n_explicit:
        causes = "; ".join(f"{v.name}: {r}" for v, _, r in explicit + [(v, None, r) for v, r in rc.explicit()])
        plan.reason = (f"converting {len(convert)} LayerNorm(s) would need {n_explicit} explicit re-centring(s) "
                       f"(x - mean(x)), each costing about what one conversion saves, so it does not pay: {causes}")
    return plan


def apply_plan(graph: ir.Graph, plan: Plan, namer: Namer, result: PassResult) -> Stream:
    """Re-centre the writes (weights, then explicit node pairs); returns the converted part as a Stream."""
    for centred, why in plan.rc.apply():
        result.rewrote(f"explicit re-centring {centred.name} = {centred.producer().inputs[0].name} - mean(...) "
                       f"inside a write into the stream: {why}", centred.producer().name)
    stream = plan.stream
    convert = {id(ln) for ln in plan.convert}
    paths = {k: v for k, v in stream.paths.items() if k in convert}
    writes = [plan.rc.resolve(w) for w in plan.planned]
    for v, readers, why in plan.explicit:
        centred = recentre_explicitly(graph, namer, v, readers)
        writes.append(centred)
        for k, (root, path) in list(paths.items()):
            if root is v:
                paths[k] = (centred, path)
        result.rewrote(f"explicit re-centring {centred.name} = {v.name} - mean({v.name}) for the stream: {why}",
                       centred.producer().name)
    lns = [ln for ln in stream.lns if id(ln) in convert]
    states = list({id(r): r for r, _ in paths.values()}.values())
    return Stream(states, list(plan.adds), writes, lns, paths)


def convert_streams(graph: ir.Graph, result: PassResult, convert, check=None, namer: Namer | None = None) -> None:
    """For every pre-LN stream that meets the conditions: re-centre its writes, then ``convert(stream, d)``.

    ``check(plan) -> reason | None`` may refuse a planned conversion before anything changes.
    A stream (or the part of one) that is not converted is reported as skipped, LN by LN, with the reason.
    """
    namer = namer or Namer(graph)
    for stream in find_streams(graph):
        result.matched += len(stream.lns)
        if len(stream.lns) < 2 or not stream.adds:
            for ln in stream.lns:
                result.skip(_ln_name(ln), _why_not_on_stream(ln, stream.paths[id(ln)][0]))
            continue
        try:
            plan = plan_stream(graph, stream, namer)
        except Refuse as e:
            for ln in stream.lns:
                result.skip(_ln_name(ln), f"stream not convertible: {e}")
            continue
        reason = plan.reason or (check(plan) if check is not None else None)
        for ln in stream.lns:
            if id(ln) in plan.kept:
                result.skip(_ln_name(ln), plan.kept[id(ln)])
            elif reason is not None:
                result.skip(_ln_name(ln), f"stream not convertible: {reason}")
        if reason is not None:
            continue
        part = apply_plan(graph, plan, namer, result)
        convert(part, plan.d)
        n_exp = plan.n_explicit()
        result.notes.append(f"re-centred {len(plan.planned)} writes into a residual stream of width {plan.d} in their "
                            f"weights and {n_exp} explicitly; {len(part.lns)} LayerNorms converted"
                            + (f", {len(plan.kept)} kept" if plan.kept else ""))


def preln_to_rmsnorm(graph: ir.Graph, ctx: PassContext, result: PassResult) -> None:
    """Re-centre every write into a pre-LN residual stream; its LayerNorms become RMSNorm (exact)."""
    namer = Namer(graph)

    def convert(stream: Stream, d: int) -> None:
        replace_lns(graph, stream, namer, result)
        result.notes.append(f"{len(stream.lns)} LayerNorms of a residual stream of width {d} became RMSNorm")

    convert_streams(graph, result, convert, namer=namer)
