"""Per-token statistics in every spelling the exporters write, shared by this stage's recognizers.

A mean over axes A of a tensor ``t`` (keeping A as unit axes, so that it broadcasts against
``t``) comes out of torch's exporters as any of::

    ReduceMean(t, A, keepdims=1)                           x.mean(A, keepdim=True)
    ReduceMean(t, A, keepdims=0) ──> Unsqueeze(A)          x.mean(A)[..., None], x.mean(1)[:, None]
    ReduceMean(t, A, keepdims=0) ──> Reshape(s) [──> Expand(s')]
                                   torch.var / var_mean under the dynamo exporter (s computed at run
                                   time from Shape, Reshape, Concat; the Expand is a no-op)
    ReduceSum(t, A) [restored as above] ──> Div(N) | Mul(1/N)
                                   var_mean's mean (N = the number of reduced elements)

:func:`mean_over` is that pattern (in :mod:`normdeploy.core.pattern`'s language) and
:func:`mean_axes` checks a match of it: the axes, the restoring op putting back exactly the
reduced axes (a Reshape to the input's shape with 1 at A, checked on the symbolic shape its
shape operand computes, :func:`int_values`), a no-op Expand, and N equal to the product of
the reduced dimensions. The spellings compute the same function; a sum divided by N rounds
differently from ReduceMean's kernel only in the last bit.

:func:`constant_of` folds the small constant expressions a gain is written as before the
exporter's constant folding runs (Gemma's ``1 + w`` at opset 17: ``Add(Cast(w), 1)``),
evaluating each op in the operands' dtype, as the runtime would.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..core.graph import DEFAULT_DOMAINS, attr, shape_of
from ..core.pattern import Const, Match, Var, any_of, fold, op, reduction_axes

# ----------------------------------------------------------------------------- patterns


def restored(p, name: str):
    """``p`` (a reduction) as is, or with its dropped axes put back by Unsqueeze or Reshape [+ Expand]."""
    reshaped = op("Reshape", p, Var(f"{name}.shape"), name=f"{name}.reshape")
    unsqueezed = op("Unsqueeze", p, name=f"{name}.unsqueeze", extra_inputs=True)
    return any_of(
        p,
        unsqueezed,
        reshaped,
        op("Expand", reshaped, Var(f"{name}.expand_shape"), name=f"{name}.expand"),
        op("Expand", unsqueezed, Var(f"{name}.expand_shape"), name=f"{name}.expand"),
    )


def mean_over(inner, name: str):
    """The mean of ``inner`` over some axes, kept as unit axes, in each spelling above; binds ``name``."""
    rm = op("ReduceMean", inner, name=name, extra_inputs=True)
    rs = op("ReduceSum", inner, name=name, extra_inputs=True)
    per_count = (lambda s: op("Div", s, Const(f"{name}.count")), lambda s: op("Mul", s, Const(f"{name}.inv_count")))
    return any_of(
        restored(rm, name),
        *(f(restored(rs, name)) for f in per_count),
        restored(any_of(*(f(rs) for f in per_count)), name),
    )


# ----------------------------------------------------------------------------- checks


def _dim(d):
    return d if isinstance(d, int) else (d if isinstance(d, str) else None)


def int_values(v: ir.Value | None, depth: int = 10) -> list | None:
    """The elements of a 1-D (or scalar) int tensor computed from constants and shapes, or None.

    Each element is an int, or a str naming a symbolic dimension of a tensor's shape; only
    Shape, Concat, Gather, Slice, Reshape / Squeeze / Unsqueeze / Identity / Cast of such
    values, and integer Add / Sub / Mul of them are followed.
    """
    if v is None or depth == 0:
        return None
    c = fold(v)
    if c is not None:
        if c.dtype.kind not in "iuf" or c.ndim > 1:
            return None
        if c.dtype.kind == "f" and not np.all(c == np.round(c)):
            return None
        return [int(a) for a in c.reshape(-1)]
    n = v.producer()
    if n is None or n.domain not in DEFAULT_DOMAINS:
        return None
    ins = [int_values(i, depth - 1) if i is not None else None for i in n.inputs]
    t = n.op_type
    if t == "Shape":
        shape = shape_of(n.inputs[0])
        if shape is None:
            return None
        r = len(shape)
        start, end = attr(n, "start", 0), attr(n, "end", r)
        dims = [_dim(d) for d in shape[slice(start, end)]]
        return None if any(d is None for d in dims) else dims
    if t in ("Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast", "CastLike"):
        return ins[0]
    if t == "Concat":
        return None if any(i is None for i in ins) else [d for i in ins for d in i]
    if t == "Gather" and attr(n, "axis", 0) == 0 and ins[0] is not None and ins[1] is not None:
        try:
            return [ins[0][k] for k in ins[1]]
        except IndexError:
            return None
    if t == "Slice" and ins[0] is not None and ins[1] is not None and ins[2] is not None:
        if len(n.inputs) > 3 and n.inputs[3] is not None and ins[3] not in ([0], [-1]):
            return None
        step = ins[4][0] if len(n.inputs) > 4 and ins[4] else 1
        if not all(isinstance(s, int) for s in (ins[1][0], ins[2][0], step)):
            return None
        return ins[0][ins[1][0]:ins[2][0]:step]
    if t in ("Add", "Sub", "Mul") and ins[0] is not None and ins[1] is not None:
        a, b = ins
        if len(a) != len(b):
            a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a)) if len(b) == 1 else (None, None)
        if a is None or not all(isinstance(e, int) for e in a + b):
            return None
        f = {"Add": lambda p, q: p + q, "Sub": lambda p, q: p - q, "Mul": lambda p, q: p * q}[t]
        return [f(p, q) for p, q in zip(a, b)]
    return None


def _reshape_result(target: list, source: list) -> list:
    """Reshape's shape operand ``target`` with each 0 (allowzero off) replaced by the input's dimension."""
    return [source[i] if d == 0 and i < len(source) else d for i, d in enumerate(target)]


def _unit_shape(x_shape: list, axes: list[int]) -> list:
    r = len(x_shape)
    return [1 if i - r in axes else x_shape[i] for i in range(r)]


def _dims_equal(got: list, want: list) -> bool:
    """Reshape dims ``got`` (with at most one -1) give exactly the dims ``want``."""
    if len(got) != len(want):
        return False
    free = [i for i, d in enumerate(got) if d == -1]
    if len(free) > 1:
        return False
    # a -1 takes what the other dimensions leave of the element count: equal elsewhere, it is want's
    return all(g == w for i, (g, w) in enumerate(zip(got, want)) if i not in free)


def mean_axes(m: Match, name: str, source: ir.Value) -> list[int] | str:
    """The axes (sorted, negative) of the mean bound as ``name`` over (an elementwise function of) ``source``,
    or why the match is not a mean kept as unit axes (the spellings of :func:`mean_over`)."""
    node = m.bound[name]
    rank = len(shape_of(source)) if shape_of(source) is not None else None
    axes = reduction_axes(node, rank)
    if isinstance(axes, str):
        return axes
    keep = node.attributes.get_int("keepdims", 1)
    x_shape = shape_of(source)
    unsq, reshape, expand = (m.bound.get(f"{name}.{k}") for k in ("unsqueeze", "reshape", "expand"))
    if not keep and unsq is None and reshape is None:
        return f"{node.op_type} {node.name} drops the reduced axes (keepdims=0) and nothing puts them back"
    if unsq is not None:
        if keep:
            return f"Unsqueeze {unsq.name} adds an axis to a statistic that kept its axes"
        ua = attr(unsq, "axes") if "axes" in unsq.attributes else int_values(unsq.inputs[1]) \
            if len(unsq.inputs) > 1 else None
        if ua is None or rank is None or any(not isinstance(a, int) for a in ua):
            return f"Unsqueeze {unsq.name} axes are not known"
        if sorted({a % rank - rank for a in ua}) != axes:
            return (f"Unsqueeze {unsq.name} puts back axes {sorted(ua)}, not the reduced axes {axes} of "
                    f"{node.op_type} {node.name}")
    if reshape is not None:
        if x_shape is None or any(d is None for d in x_shape):
            return f"shape of {source.name} is not known (needed to check Reshape {reshape.name})"
        target = int_values(m.bound[f"{name}.shape"])
        want = _unit_shape([_dim(d) for d in x_shape], axes)
        kept = [d for i, d in enumerate(want) if i - len(want) not in axes] if not keep else want
        if target is None or attr(reshape, "allowzero", 0) and 0 in target or \
                not _dims_equal(_reshape_result(target, kept), want):
            return (f"Reshape {reshape.name} of {node.op_type} {node.name} does not put back exactly the reduced "
                    f"axes (shape {target}, want {want})")
    if expand is not None:
        es = int_values(m.bound[f"{name}.expand_shape"])
        want = _unit_shape([_dim(d) for d in x_shape], axes) if x_shape is not None else None
        if es is None or want is None or len(es) > len(want) or \
                not all(e == 1 or e == w for e, w in zip(es[::-1], want[::-1])):
            return f"Expand {expand.name} is not a no-op on the statistic (shape {es})"
    count = m.values.get(f"{name}.count")
    inv = m.values.get(f"{name}.inv_count")
    if node.op_type == "ReduceSum" or count is not None or inv is not None:
        if node.op_type != "ReduceSum":
            return f"{node.op_type} {node.name} is divided again by a count"
        if x_shape is None or rank is None or any(not isinstance(x_shape[a], int) for a in axes):
            return f"reduced dimensions of {source.name} are not static (needed to check the count of a sum)"
        n = int(np.prod([x_shape[a] for a in axes]))
        c = count if count is not None else inv
        if c.size != 1:
            return f"sum of {node.name} is divided by a non-scalar"
        c = float(c.reshape(-1)[0])
        if not (c == n if count is not None else np.float32(c) == np.float32(1.0 / n)):
            return f"sum {node.name} over {n} elements is scaled by {c}, not 1/{n}: not a mean"
    return axes


# ----------------------------------------------------------------------------- constants

_EVAL = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
}


def constant_of(v: ir.Value | None, depth: int = 6) -> np.ndarray | None:
    """``v``'s value when it is a constant or a small expression of constants (Add, Sub, Mul, Div, Neg,
    Cast, Reshape, Unsqueeze, Squeeze), each evaluated in the operands' dtype; else None."""
    c = fold(v)
    if c is not None or v is None or depth == 0:
        return c
    n = v.producer()
    if n is None or n.domain not in DEFAULT_DOMAINS:
        return None
    if n.op_type in _EVAL and len(n.inputs) == 2:
        a, b = constant_of(n.inputs[0], depth - 1), constant_of(n.inputs[1], depth - 1)
        if a is None or b is None or a.dtype != b.dtype or a.dtype.kind != "f":
            return None
        with np.errstate(all="ignore"):
            return np.asarray(_EVAL[n.op_type](a, b), a.dtype)
    if n.op_type == "Neg" and n.inputs:
        a = constant_of(n.inputs[0], depth - 1)
        return None if a is None else -a
    if n.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity") and n.inputs:
        a = constant_of(n.inputs[0], depth - 1)
        if a is None:
            return None
        if n.op_type == "Cast":
            try:
                to = np.dtype(ir.DataType(n.attributes.get_int("to")).numpy())
            except (TypeError, ValueError):
                return None
            return a.astype(to)
        if n.op_type == "Identity":
            return a
        shape = int_values(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] is not None else None
        try:
            if n.op_type == "Reshape":
                if shape is None or not all(isinstance(s, int) for s in shape):
                    return None
                return a.reshape([a.shape[i] if s == 0 else s for i, s in enumerate(shape)])
            axes = attr(n, "axes") if "axes" in n.attributes else shape
            if n.op_type == "Unsqueeze":
                if axes is None:
                    return None
                for ax in sorted(x % (a.ndim + len(axes)) for x in axes):
                    a = np.expand_dims(a, ax)
                return a
            return np.squeeze(a) if axes is None else np.squeeze(a, axis=tuple(x % a.ndim for x in axes))
        except (ValueError, IndexError):
            return None
    return None


def known_value(v: ir.Value | None) -> np.ndarray | None:
    """A parameter's value where it is known before run time: a constant, a small expression of constants
    (:func:`constant_of`: Gemma's ``1 + w``) or shape arithmetic of static dimensions
    (:func:`normdeploy.canonicalize.static_values.evaluate`: dynamo's ``Concat`` reshapes, ``CastLike(eps, x)``)."""
    from .static_values import evaluate

    c = constant_of(v)
    if c is None:
        c = evaluate(v)
    return None if c is None else np.asarray(c)


def scalar_value(v: ir.Value | None, what: str) -> float | str:
    """The value of a known scalar (any shape of one element), or the reason it is not one."""
    c = known_value(v)
    if c is None:
        return f"{what} is not a constant"
    if c.size != 1:
        return f"{what} is not a scalar (shape {list(c.shape)})"
    return float(c.reshape(-1)[0])


def outside_reader(m: Match, depth: int = 12) -> str | None:
    """Why the matched nodes other than the root cannot be removed, or None if they can.

    As :func:`normdeploy.core.pattern.outside_consumer`, except that a node outside the match that
    only computes an operand of the match (the ``Shape(var)``, ``Concat`` of a Reshape's shape
    operand) is not an outside reader: it dies with the match.
    """
    from ..core.graph import consumers

    nodes = m.unique_nodes()
    inside = set(nodes)
    # nodes within ``depth`` producers of the match's inputs: those whose every reader is inside join it
    around: list[ir.Node] = []
    frontier = [i for n in nodes for i in n.inputs if i is not None]
    seen: set = set()
    for _ in range(depth):
        nxt = []
        for v in frontier:
            p = v.producer()
            if p is None or p in inside or p in seen:
                continue
            seen.add(p)
            around.append(p)
            nxt.extend(i for i in p.inputs if i is not None)
        frontier = nxt
    changed = True
    while changed:
        changed = False
        for p in around:
            if p in inside:
                continue
            if all(not o.is_graph_output() and all(c in inside for c in consumers(o)) and consumers(o)
                   for o in p.outputs):
                inside.add(p)
                changed = True
    for n in nodes[1:]:
        for o in n.outputs:
            if o.is_graph_output():
                return f"intermediate tensor {o.name} is a graph output"
            for c in consumers(o):
                if c not in inside:
                    return f"intermediate tensor {o.name} has another consumer ({c.op_type} {c.name})"
    return None


def statistics_label(m: Match, names: tuple[str, ...]) -> str:
    """How the means bound as ``names`` were written, for a rewrite's spelling (e.g. ``"keepdims=0 + Reshape,
    sum / N"``); empty when each is a plain ``ReduceMean(keepdims=1)``."""
    forms = []
    for name in names:
        node = m.bound.get(name)
        if node is None:
            continue
        if m.bound.get(f"{name}.reshape") is not None:
            forms.append("keepdims=0 + Reshape" + (" + Expand" if m.bound.get(f"{name}.expand") is not None else ""))
        elif m.bound.get(f"{name}.unsqueeze") is not None:
            forms.append("keepdims=0 + Unsqueeze")
        if node.op_type == "ReduceSum":
            forms.append("sum / N")
    return ", ".join(dict.fromkeys(forms))


def number_of(v: ir.Value | None, depth: int = 8) -> float | None:
    """A scalar known before run time, also where the exporter counts elements at run time
    (torch.var's Bessel factor: ``CastLike(ReduceProd(Gather(Shape(x), axes)))``, then ``Sub(., 1)``)."""
    if v is None or depth == 0:
        return None
    c = known_value(v)
    if c is not None:
        return float(c.reshape(-1)[0]) if c.size == 1 else None
    n = v.producer()
    if n is None or n.domain not in DEFAULT_DOMAINS or not n.inputs:
        return None
    if n.op_type in ("Cast", "CastLike", "Identity", "Reshape", "Squeeze", "Unsqueeze"):
        return number_of(n.inputs[0], depth - 1)
    if n.op_type == "ReduceProd" and (len(n.inputs) == 1 or n.inputs[1] is None) and "axes" not in n.attributes:
        dims = int_values(n.inputs[0])
        return float(np.prod(dims)) if dims is not None and all(isinstance(d, int) for d in dims) else None
    if n.op_type in _EVAL and len(n.inputs) == 2:
        a, b = number_of(n.inputs[0], depth - 1), number_of(n.inputs[1], depth - 1)
        if a is None or b is None or (n.op_type == "Div" and b == 0):
            return None
        return float(_EVAL[n.op_type](a, b))
    return None
