"""One adapter per linear op type: what a fold does to a linear layer's constant weight and bias.

A linear layer computes ``t = W(x) + b``: Conv (any groups, stride, dilation, padding),
ConvTranspose (any groups), Gemm (transA = 0, any transB, alpha, beta, with or without C),
MatMul with a constant operand of any rank on either side (``X @ W`` or ``W @ X``). Every
rewrite that moves arithmetic into such a layer uses these operations, each exact in real
arithmetic, computed in float64 from the stored weight and stored once in its dtype:

* ``scale_inputs(a)``:   ``W'(x) = W(a x)``, i.e. ``W' = W diag(a)`` along the contraction
  (input-channel) axis;
* ``input_shift(c)``:    ``W(x + c) = W(x) + W(c)``: the output offset ``W(c)`` of the
  *original* weight, or the reason it is not one value per output position (a Conv that
  pads, a ConvTranspose: border outputs see fewer taps);
* ``scale_outputs(a)``:  ``t' = a t``: ``W' = diag(a) W``, ``b' = a b``;
* ``add_to_output(v)``:  ``t' = t + v``: into the bias (Conv bias, Gemm C, the constant Add
  that alone reads a MatMul), else a 2-D ``X @ W`` becomes a Gemm with C = v, else a new Add;
* ``centre_outputs()``:  ``t' = t - mean_out(t)``: ``W`` and ``b`` minus their means over the
  output axis (pre-LN re-centring);
* ``centre_inputs()``, ``drop_last_input()`` (2-D layers only): ``W' = C W`` with the
  centring matrix ``C = I - 1 1^T / k`` (LN-free), and ``W'_j = W_j - W_k`` for ``j < k``
  (a reader of CRMSNorm's ``d - 1`` stored coordinates).

A MatMul weight may be ``Transpose(W)`` of a constant (:func:`weight_value`: a tied LM head).

Nothing changes in the graph until :meth:`Linear.apply`; a shared weight is never edited
(every new weight is a new constant).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .graph import Namer, add_node, attr, const_value, constant, consumers, rank_of, replace_value, set_input

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ONNX_DOMAINS = ("", "ai.onnx")


def padded(node: ir.Node) -> bool:
    pads = attr(node, "pads")
    auto = attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    return bool(pads is not None and any(int(p) != 0 for p in pads)) or auto in ("SAME_UPPER", "SAME_LOWER")


def weight_value(v: ir.Value | None) -> np.ndarray | None:
    """A linear layer's constant weight: a constant, or ``Transpose(W)`` of a constant W (a tied LM head,
    ``MatMul(x, Transpose(wte.weight))``, whose W the embedding's Gather also reads; the exporters'
    constant folders leave that Transpose of a large weight in place). A fold stores its new weight as
    a new constant in the transposed layout; W itself is never edited."""
    c = const_value(v)
    if c is not None or v is None:
        return c
    n = v.producer()
    if n is None or n.op_type != "Transpose" or n.domain not in ONNX_DOMAINS or len(n.inputs) != 1:
        return None
    w = const_value(n.inputs[0])
    if w is None:
        return None
    perm = attr(n, "perm")
    return np.transpose(w, None if perm is None else [int(p) for p in perm])


def _bias_value(v: ir.Value) -> np.ndarray | None:
    """A Conv / Gemm bias: a constant, or computed from constants only (dynamo at opset 17 gives a bias-free
    Conv the bias ``Expand(CastLike(0, x), Shape(W)[0:1])``)."""
    from .affine import constant_of

    c = const_value(v)
    return c if c is not None else constant_of(v)


def matmul_weight_slot(node: ir.Node) -> int | None:
    if weight_value(node.inputs[1]) is not None:
        return 1
    if weight_value(node.inputs[0]) is not None:
        return 0
    return None


def bias_add_of(graph: ir.Graph, node: ir.Node) -> tuple[ir.Node, int, np.ndarray] | None:
    """The ``Add(node output, constant)`` that alone reads ``node``'s output, if any."""
    out = node.outputs[0]
    readers = consumers(out)
    if out.is_graph_output() or len(readers) != 1 or len(out.uses()) != 1:
        return None
    add = readers[0]
    if add.op_type != "Add" or add.domain not in ONNX_DOMAINS or len(add.inputs) != 2:
        return None
    other = 1 if add.inputs[0] is out else 0
    v = const_value(add.inputs[other])
    return None if v is None else (add, other, v)


def centre(v: np.ndarray, axis: int) -> np.ndarray:
    v64 = np.asarray(v, np.float64)
    if v64.ndim < -axis:
        return np.zeros_like(v64)  # a scalar broadcast along the axis has zero deviation from its mean
    return v64 - v64.mean(axis=axis, keepdims=True)


class Linear:
    """The common state: the node, its stored weight, the pending float64 weight and bias.

    ``in_axis`` / ``out_axis`` name the contracted and produced channel axes on the layer's
    input and output tensors, ``in_rank`` / ``out_rank`` the rank to read a per-channel array
    at (None: right-aligned), ``in_size`` / ``out_size`` their lengths.
    """

    in_axis: int
    in_rank: int | None
    in_size: int
    out_axis: int
    out_rank: int | None
    out_size: int
    two_d = False  # a [k, n] (or [n, k] with transB) weight: centre_inputs / drop_last_input apply

    def __init__(self, graph: ir.Graph, node: ir.Node, slot: int, w: np.ndarray, dtype=None):
        self.graph, self.node, self.slot, self.w = graph, node, slot, w
        self._w64: np.ndarray | None = None  # made on first use: a layer only looked at costs no copy
        self.w_changed = False
        self.dtype = np.dtype(dtype) if dtype is not None else w.dtype  # of a bias this adapter adds

    # -- the operations (overridden per op type) --
    def scale_inputs(self, a: np.ndarray) -> None:
        raise NotImplementedError

    def input_shift(self, c: np.ndarray) -> np.ndarray | str:
        raise NotImplementedError

    def scale_outputs(self, a: np.ndarray) -> None:
        raise NotImplementedError

    def add_to_output(self, v: np.ndarray) -> None:
        raise NotImplementedError

    def centre_outputs(self) -> None:
        raise NotImplementedError

    def apply(self, namer: Namer, suffix: str | None = None) -> None:
        raise NotImplementedError

    @property
    def w64(self) -> np.ndarray:
        """The pending weight in float64 (the stored one until an operation changes it)."""
        if self._w64 is None:
            self._w64 = self.w.astype(np.float64)
        return self._w64

    def _set_weight(self, w64: np.ndarray) -> None:
        self._w64, self.w_changed = w64, True

    @property
    def base(self) -> str:
        return self.node.name or self.node.op_type.lower()


def linear_layer(graph: ir.Graph, node: ir.Node, slot: int = 0, dtype=None, bias_add: bool = True) -> Linear | str:
    """The adapter for ``node`` read through input ``slot`` (the activation), or why it is not a linear layer."""
    op = node.op_type
    if node.domain not in ONNX_DOMAINS or op not in LINEAR:
        return f"{op} {node.name} is not linear"
    if op in ("Conv", "ConvTranspose", "Gemm"):
        if slot != 0:
            what = "a parameter" if op != "Gemm" else ("B" if slot == 1 else "C")
            return f"{op} {node.name} reads the normalized tensor as {what}"
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return f"{op} {node.name} {'B' if op == 'Gemm' else 'weight'} is not a constant"
        has_b = len(node.inputs) > 2 and node.inputs[2] is not None
        b = _bias_value(node.inputs[2]) if has_b else None
        if has_b and b is None:
            return f"{op} {node.name} {'C' if op == 'Gemm' else 'bias'} is not a constant"
        cls = {"Conv": _Conv, "ConvTranspose": _ConvTranspose, "Gemm": _Gemm}[op]
        return cls(graph, node, 1, w, dtype, b)
    wslot = 1 - slot
    w = weight_value(node.inputs[wslot])
    if w is None:
        return f"MatMul {node.name} other operand is not a constant"
    if wslot == 0 and w.ndim < 2:
        return f"MatMul {node.name} left weight is a vector"
    return _MatMul(graph, node, wslot, w, dtype, bias_add_of(graph, node) if bias_add else None)


class _Conv(Linear):
    """Conv, weight ``[Cout, Cin/group, k...]``: output channel o reads the inputs of group ``o // (Cout/group)``."""

    def __init__(self, graph, node, slot, w, dtype, b):
        super().__init__(graph, node, slot, w, dtype)
        self.group = int(attr(node, "group", 1))
        self.b = b
        self.b64 = None  # pending bias (None: unchanged)
        self.in_axis, self.in_rank, self.in_size = 1, w.ndim, w.shape[1] * self.group
        self.out_axis, self.out_rank, self.out_size = 1, w.ndim, w.shape[0]

    def _bias64(self):
        return self.b64 if self.b64 is not None else (0.0 if self.b is None else self.b.astype(np.float64))

    def scale_inputs(self, a):
        w = self.w
        cin_g, cout_g = w.shape[1], w.shape[0] // self.group
        a_rep = np.repeat(a.reshape(self.group, cin_g), cout_g, axis=0)  # [Cout, Cin/group]
        self._set_weight(self.w64 * a_rep.reshape(a_rep.shape + (1,) * (w.ndim - 2)))

    def input_shift(self, c):
        if padded(self.node):
            return f"Conv {self.node.name} pads"
        w, w64 = self.w, self.w.astype(np.float64)
        cin_g, cout_g = w.shape[1], w.shape[0] // self.group
        c_rep = np.repeat(c.reshape(self.group, cin_g), cout_g, axis=0)
        return (w64.reshape(w.shape[0], cin_g, -1) * c_rep[:, :, None]).sum(axis=(1, 2))

    def scale_outputs(self, a):
        self._set_weight(self.w64 * a.reshape((-1,) + (1,) * (self.w.ndim - 1)))
        self.b64 = a * self._bias64()

    def add_to_output(self, v):
        self.b64 = self._bias64() + v

    def centre_outputs(self):
        self._set_weight(centre(self.w, -self.w.ndim))  # over output channels
        if self.b is not None:
            self.b64 = centre(self.b, -1)

    def apply(self, namer, suffix=None):
        if self.w_changed:
            self.node.replace_input_with(1, constant(namer, self.base, suffix or "weight_folded",
                                                     self.w64.astype(self.w.dtype)))
        if self.b64 is not None:
            set_input(self.node, 2, constant(namer, self.base, suffix or "bias_folded",
                                             np.asarray(self.b64).astype(self.w.dtype)))


class _ConvTranspose(_Conv):
    """ConvTranspose, weight ``[Cin, Cout/group, k...]``: output channel ``g * (Cout/group) + j``."""

    def __init__(self, graph, node, slot, w, dtype, b):
        super().__init__(graph, node, slot, w, dtype, b)
        self.in_axis, self.in_rank, self.in_size = 1, w.ndim, w.shape[0]
        self.out_axis, self.out_rank, self.out_size = 1, w.ndim, w.shape[1] * self.group

    def scale_inputs(self, a):
        self._set_weight(self.w64 * a.reshape((-1,) + (1,) * (self.w.ndim - 1)))  # row i reads input channel i

    def input_shift(self, c):
        return f"ConvTranspose {self.node.name} is a ConvTranspose"

    def scale_outputs(self, a):
        w, group = self.w, self.group
        cin, cpg = w.shape[0], w.shape[1]
        ws = self.w64.reshape((group, cin // group, cpg) + w.shape[2:])
        self._set_weight((ws * a.reshape((group, 1, cpg) + (1,) * (w.ndim - 2))).reshape(w.shape))
        self.b64 = a * self._bias64()

    def centre_outputs(self):
        raise NotImplementedError("ConvTranspose writes are not re-centred")


class _Gemm(Linear):
    """Gemm ``t = alpha A' B' + beta C``; B is ``[k, n]``, or ``[n, k]`` with transB; A is read along k.

    A change of C that comes from the arithmetic of a fold is computed on ``beta C`` and stored
    with ``beta = 1``; re-centring centres C itself and keeps beta (centring is linear).
    """

    def __init__(self, graph, node, slot, w, dtype, c):
        super().__init__(graph, node, slot, w, dtype)
        self.trans_b = int(attr(node, "transB", 0))
        self.two_d = not int(attr(node, "transA", 0))
        self.alpha, self.beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        self.c = c
        self.c_new = None  # pending C (None: unchanged)
        self.beta_new = None  # pending beta attribute (None: unchanged)
        k, n = (w.shape[1], w.shape[0]) if self.trans_b else (w.shape[0], w.shape[1])
        self.in_axis, self.in_rank, self.in_size = (0 if int(attr(node, "transA", 0)) else 1), 2, k
        self.out_axis, self.out_rank, self.out_size = 1, 2, n

    def _scaled_c(self):
        """``beta C`` as it stands (None: there is no C)."""
        if self.c_new is not None:
            return self.c_new if self.beta_new == 1.0 else self.beta * self.c_new
        return None if self.c is None else self.beta * self.c.astype(np.float64)

    def scale_inputs(self, a):
        self._set_weight(self.w64 * (a[None, :] if self.trans_b else a[:, None]))

    def input_shift(self, c):
        op_b = self.w.astype(np.float64)
        return self.alpha * (c @ (op_b.T if self.trans_b else op_b))

    def scale_outputs(self, a):
        self._set_weight(self.w64 * (a[:, None] if self.trans_b else a[None, :]))
        c = self._scaled_c()
        if c is not None:
            self.c_new, self.beta_new = a * c, 1.0

    def add_to_output(self, v):
        c = self._scaled_c()
        self.c_new, self.beta_new = (v if c is None else c + v), 1.0

    def centre_outputs(self):
        self._set_weight(centre(self.w, (0 if self.trans_b else 1) - self.w.ndim))
        if self.c is not None:
            self.c_new = centre(self.c, -1)

    def centre_inputs(self):
        self._set_weight(self.w64 - self.w64.mean(axis=-1 if self.trans_b else -2, keepdims=True))

    def drop_last_input(self):
        w = self.w64
        self._set_weight(w[:, :-1] - w[:, -1:] if self.trans_b else w[:-1] - w[-1:])

    def apply(self, namer, suffix=None):
        if self.w_changed:
            self.node.replace_input_with(1, constant(namer, self.base, suffix or "B_folded", self.w64.astype(self.w.dtype)))
        if self.c_new is not None:
            set_input(self.node, 2, constant(namer, self.base, suffix or "C_folded",
                                             np.asarray(self.c_new).astype(self.w.dtype)))
        if self.beta_new is not None:
            self.node.attributes["beta"] = ir.AttrFloat32("beta", self.beta_new)


class _MatMul(Linear):
    """MatMul with a constant operand: ``X @ W`` (weight slot 1) or ``W @ X`` (weight slot 0).

    Its bias, if any, is the constant Add that alone reads its output (``bias_add``).
    """

    def __init__(self, graph, node, slot, w, dtype, bias_add):
        super().__init__(graph, node, slot, w, dtype)
        self.bias_add = bias_add
        self.bias64 = None  # pending value of bias_add's constant
        self.shift = None  # pending output offset when there is no bias Add
        self.two_d = slot == 1 and w.ndim == 2
        if slot == 1:  # X @ W: contraction over X's last axis and W's axis -2 (or W's only axis)
            self.in_axis, self.in_rank, self.in_size = -1, None, (w.shape[-2] if w.ndim >= 2 else w.shape[0])
            self.out_axis, self.out_rank, self.out_size = -1, None, w.shape[-1]
        else:  # W @ X: contraction over X's axis -2 and W's last axis
            self.in_axis, self.in_rank, self.in_size = -2, None, w.shape[-1]
            self.out_axis, self.out_rank, self.out_size = -2, None, w.shape[-2]

    def out_vector(self, v: np.ndarray) -> np.ndarray:
        """A per-output-channel vector shaped to broadcast against the output."""
        return v if self.slot == 1 else v[:, None]

    def scale_inputs(self, a):
        w = self.w
        if self.slot == 1:
            self._set_weight(self.w64 * (a[:, None] if w.ndim >= 2 else a))
        else:
            self._set_weight(self.w64 * a)

    def input_shift(self, c):
        """``c @ W``: 1-D for a 2-D ``W`` (``[N]``, the bias shape ONNX Runtime's Add fusions, BiasGelu among
        them, require; ``[1, N]`` would also broadcast, but blocks them), ``[..., 1, N]`` for a batched one."""
        w64 = self.w.astype(np.float64)
        if self.slot == 1:
            return np.matmul(c[None, :], w64) if self.w.ndim > 2 else c @ w64
        return np.matmul(w64, c[:, None])

    def scale_outputs(self, a):
        self._set_weight(self.w64 * (a if self.slot == 1 else a[:, None]))
        if self.bias_add is not None:
            self.bias64 = self.out_vector(a) * self.bias_add[2].astype(np.float64)

    def add_to_output(self, v):
        if self.bias_add is not None and self.bias64 is not None:  # after scale_outputs: b' = a b + v
            self.bias64 = self.bias64 + v
        elif not np.any(v != 0):
            return
        elif self.bias_add is not None:
            self.bias64 = self.bias_add[2].astype(np.float64) + v
        else:
            self.shift = v if self.shift is None else self.shift + v

    def centre_outputs(self):
        self._set_weight(centre(self.w, -1))

    def has_bias(self) -> bool:
        """Whether a bias Add with a non-zero constant reads this MatMul (a zero one the clean-up removes)."""
        return self.bias_add is not None and bool(np.any(self.bias_add[2] != 0))

    def centre_inputs(self):
        self._set_weight(self.w64 - self.w64.mean(axis=-2, keepdims=True))

    def drop_last_input(self):
        self._set_weight(self.w64[:-1] - self.w64[-1:])

    def becomes_gemm(self) -> bool:
        """Whether the pending shift makes this 2-D ``X @ W`` a Gemm whose C is the shift."""
        v, node = self.shift, self.node
        if v is None or self.slot != 1 or self.w.ndim != 2:
            return False
        n = self.w.shape[1]
        return rank_of(node.inputs[0]) == 2 and v.size in (1, n) and v.ndim <= 2 and v.shape[:-1] in ((), (1,))

    def apply(self, namer, suffix=None):
        node = self.node
        if self.w_changed:
            node.replace_input_with(self.slot, constant(namer, self.base, suffix or "weight_folded",
                                                        self.w64.astype(self.w.dtype)))
        if self.bias64 is not None:
            add, slot, old = self.bias_add
            add.replace_input_with(slot, constant(namer, add.name or "add", "bias_folded", self.bias64.astype(old.dtype)))
        if self.shift is None:
            return
        if self.becomes_gemm():  # one node, what ONNX Runtime fuses anyway
            node.op_type = "Gemm"
            c = np.broadcast_to(np.asarray(self.shift, np.float64).reshape(-1), (self.w.shape[1],))
            set_input(node, 2, constant(namer, self.base, "C_folded", c.astype(self.dtype)))
            node.attributes.clear()
            return
        out = node.outputs[0]
        c = constant(namer, self.base, "shift", np.asarray(self.shift, np.float64).astype(self.dtype))
        add = add_node(namer, "Add", [out, c], base=self.base, suffix="shift_add")
        add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
        replace_value(out, add.outputs[0], except_node=add)
