"""Values a recognizer can know before run time: constants, also where an exporter computes them.

:func:`normdeploy.core.pattern.fold` sees constants through Reshape, Unsqueeze, Squeeze and
Cast of constants. Exporters also write a parameter or a repeat count through shape
arithmetic that folds only once the static dimensions of the tensors involved are read:

* the dynamo exporter without its optimizer (opset 17 files, where normdeploy's constant
  folder does not run) reshapes a parameter to ``Concat(1, C, 1, 1)`` of one-element
  Constants, and writes eps as ``CastLike(1e-05, x)``;
* TorchScript's exporter with a dynamic axis reshapes a parameter to
  ``Concat(1, Unsqueeze(Gather(Shape(x), 1)), 1, 1)`` (``x``'s dimension 1 being static),
  and builds ``repeat_interleave``'s Tile repeats with ``OneHot`` from ``Shape(x)[2] / G``.

:func:`evaluate` returns such a value, or None when it depends on anything not known
before run time (a dynamic dimension, a graph input). Shape vectors are carried as
partially known arrays internally (unknown dimensions as None); only fully known values
leave this module. Arithmetic is ONNX's: integer Div truncates, float ops in the tensor's
own type, Cast rounds to nearest even, as NumPy does.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..core.graph import DEFAULT_DOMAINS, attr, const_value
from ..core.pattern import dtype_of, static_shape

_DEPTH = 24


def evaluate(v: ir.Value | None) -> np.ndarray | None:
    """The value of ``v`` if it is known before run time, else None."""
    a = _partial(v, _DEPTH)
    if a is None or (a.dtype == object and any(e is None for e in a.reshape(-1))):
        return None
    if a.dtype == object:
        return np.asarray(a.tolist(), np.int64)
    return a


def onnx_reshape(x: np.ndarray, shape: list[int], allowzero: int = 0) -> np.ndarray:
    """``x`` reshaped as ONNX's Reshape does: a 0 copies x's dimension there unless ``allowzero``; -1 is inferred.
    Raises ValueError where the element counts differ."""
    if not allowzero:
        shape = [x.shape[i] if s == 0 and i < x.ndim else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _known(a: np.ndarray | None) -> np.ndarray | None:
    """An object array of shape values with every entry known, as int64 (others unchanged)."""
    if a is not None and a.dtype == object and not any(e is None for e in a.reshape(-1)):
        return np.asarray(a.tolist(), np.int64).reshape(a.shape)
    return a


def _ints(a: np.ndarray | None) -> list[int] | None:
    if a is None or (a.dtype == object and any(e is None for e in a.reshape(-1))):
        return None
    return [int(e) for e in a.reshape(-1)]


def _elementwise(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    if a.dtype == object or b.dtype == object:  # shape arithmetic with unknown dimensions
        if a.dtype != object and not np.issubdtype(a.dtype, np.integer):
            return None
        if b.dtype != object and not np.issubdtype(b.dtype, np.integer):
            return None
        f = {"Add": lambda p, q: p + q, "Sub": lambda p, q: p - q, "Mul": lambda p, q: p * q,
             "Div": lambda p, q: int(p / q) if q else None}[op]
        out = np.frompyfunc(lambda p, q: None if p is None or q is None else f(int(p), int(q)), 2, 1)(a, b)
        return np.asarray(out, object)
    if a.dtype != b.dtype:
        return None
    if np.issubdtype(a.dtype, np.integer):
        if op == "Div":
            if np.any(b == 0):
                return None
            return np.trunc(a / b).astype(a.dtype)
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b).astype(a.dtype)
    with np.errstate(all="ignore"):
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)


def _axes(node: ir.Node, depth: int) -> list[int] | None:
    if "axes" in node.attributes:
        return [int(a) for a in node.attributes.get_ints("axes")]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return _ints(_partial(node.inputs[1], depth))
    return []


def _partial(v: ir.Value | None, depth: int) -> np.ndarray | None:
    """``v``'s value with unknown shape dimensions as None (object arrays), or None if unknown."""
    a = _partial_op(v, depth)
    if a is None or isinstance(a, np.ndarray):
        return a
    # a 0-d result (Gather of one index): NumPy returns the element itself (a known dimension), not an array
    return np.asarray(a)


def _partial_op(v: ir.Value | None, depth: int) -> np.ndarray | None:
    if v is None:
        return None
    c = const_value(v)
    if c is not None or depth == 0:
        return c
    n = v.producer()
    if n is None or n.domain not in DEFAULT_DOMAINS or len(n.outputs) != 1:
        return None
    op = n.op_type
    if op == "Shape":
        shape = static_shape(n.inputs[0])
        if shape is None:
            return None
        rank = len(shape)
        start, end = int(attr(n, "start", 0)), attr(n, "end", None)
        end = rank if end is None else int(end)
        return np.asarray(shape[slice(start, end)] if rank else [], object)
    ins = [_known(_partial(i, depth - 1)) if i is not None else None for i in n.inputs]
    x = ins[0] if ins else None
    if x is None and op not in ("Concat",):
        return None
    try:
        if op == "Identity":
            return x
        if op == "Cast":
            to = np.dtype(ir.DataType(n.attributes.get_int("to")).numpy())
            if x.dtype == object:
                return x if np.issubdtype(to, np.integer) else None
            return x.astype(to)
        if op == "CastLike":
            to = dtype_of(n.inputs[1])
            if to is None or x.dtype == object:
                return None
            return x.astype(to)
        if op in ("Reshape",):
            shape = _ints(ins[1])
            return None if shape is None else onnx_reshape(x, shape, attr(n, "allowzero", 0))
        if op == "Unsqueeze":
            axes = _axes(n, depth - 1)
            if axes is None:
                return None
            out_rank = x.ndim + len(axes)
            for a in sorted(a % out_rank for a in axes):
                x = np.expand_dims(x, a)
            return x
        if op == "Squeeze":
            axes = _axes(n, depth - 1)
            if axes is None:
                return None
            return np.squeeze(x) if not axes else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
        if op == "Concat":
            if any(i is None for i in ins):
                return None
            if any(i.dtype == object for i in ins):
                ins = [i.astype(object) for i in ins]
            return np.concatenate(ins, axis=int(attr(n, "axis", 0)))
        if op == "Gather":
            idx = ins[1]
            if idx is None or idx.dtype == object:
                return None
            return np.take(x, idx.astype(np.int64), axis=int(attr(n, "axis", 0)))
        if op == "Slice":
            starts, ends = _ints(ins[1]), _ints(ins[2])
            axes = _ints(ins[3]) if len(ins) > 3 and n.inputs[3] is not None else list(range(len(starts or [])))
            steps = _ints(ins[4]) if len(ins) > 4 and n.inputs[4] is not None else [1] * len(starts or [])
            if starts is None or ends is None or axes is None or steps is None:
                return None
            index = [slice(None)] * x.ndim
            for s, e, a, st in zip(starts, ends, axes, steps):
                index[a % x.ndim] = slice(s, e, st)
            return x[tuple(index)]
        if op in ("Add", "Sub", "Mul", "Div"):
            if ins[1] is None:
                return None
            return _elementwise(op, x, ins[1])
        if op == "Expand":
            shape = _ints(ins[1])
            if shape is None or x.dtype == object:
                return None
            return x * np.ones(shape, x.dtype)
        if op == "OneHot":
            depth_v, values = _ints(ins[1]), ins[2]
            if depth_v is None or values is None or x.dtype == object or values.dtype == object:
                return None
            d = depth_v[0]
            idx = np.where(x < 0, x + d, x).astype(np.int64)
            hot = idx[..., None] == np.arange(d)
            out = np.where(hot, values.reshape(-1)[1], values.reshape(-1)[0])
            axis = int(attr(n, "axis", -1))
            return np.moveaxis(out, -1, axis % out.ndim)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError):
        return None
    return None


def per_channel(params: dict[str, np.ndarray], x: ir.Value) -> tuple[int | None, int, dict[str, np.ndarray]] | str:
    """Parameters broadcast against ``x`` as 1-D vectors along one channel axis, or the reason they are not.

    Returns ``(axis, C, vectors)``: ``axis`` the channel axis as a negative index (None when
    every parameter is one scalar; then ``C`` is 1), each vector of length ``C``. Each
    parameter must vary along that one axis only and must not raise the rank of ``x``.
    """
    rank = len(static_shape(x)) if static_shape(x) is not None else None
    axis, size = None, 1
    for name, a in params.items():
        if rank is not None and a.ndim > rank:
            if any(d != 1 for d in a.shape[:a.ndim - rank]):
                return f"{name} of shape {list(a.shape)} has a higher rank than the input ({rank})"
        varying = [i - a.ndim for i, d in enumerate(a.shape) if d != 1]
        if len(varying) > 1:
            return f"{name} of shape {list(a.shape)} varies along more than one axis"
        if not varying:
            continue
        if axis is not None and (varying[0] != axis or a.shape[varying[0]] != size):
            return (f"{name} of shape {list(a.shape)} is not along the axis of the other parameters "
                    f"(axis {axis}, {size} channels)")
        axis, size = varying[0], a.shape[varying[0]]
    if axis is not None and rank is not None:
        if -axis > rank:
            return f"parameters vary along axis {axis}, beyond the rank {rank} of the input"
        dim = static_shape(x)[axis]
        if dim is not None and dim != size:
            return f"parameters have {size} channels, the input's axis {axis} has {dim}"
    return axis, size, {name: np.broadcast_to(a.reshape(-1), (size,)).copy() if a.size == 1 else a.reshape(-1).copy()
                        for name, a in params.items()}
