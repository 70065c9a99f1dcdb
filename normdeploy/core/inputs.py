"""Model inputs: their specs (name, shape, dtype, dynamic axes), parsed from ``--input`` text, and
deterministic random arrays for them (the example inputs of an export, the random feeds of verify and bench)."""
from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from .errors import InputError

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
           "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}
#: float dtypes numpy does not count as floating (ml_dtypes' bfloat16): drawn as float32, then converted
EXTENSION_FLOATS = frozenset({"bfloat16"})


@dataclass
class InputSpec:
    """One model input: its name, a concrete shape to run with, its dtype, dynamic axes."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def parse_input_spec(text: str) -> tuple[str | None, tuple[int, ...], str]:
    """``name:1x3x8x8[:dtype]`` or ``1x3x8x8`` -> (name or None, shape, dtype)."""
    parts = text.split(":")
    name, dtype = None, "float32"
    if len(parts) == 3:
        name, dims, dtype = parts
    elif len(parts) == 2:
        if "x" in parts[1] or parts[1].isdigit():
            name, dims = parts
        else:
            dims, dtype = parts
    else:
        (dims,) = parts
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
        if any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise InputError(f"--input {text!r}: shape must be positive integers joined by 'x'",
                         "write it as name:1x3x224x224 (dtype optional: name:1x16:int64)") from None
    if dtype not in DTYPES:
        raise InputError(f"--input {text!r}: unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    return name, shape, dtype


def numpy_dtype(name: str):
    return DTYPES[name]


def example_arrays(specs: list[InputSpec], seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Deterministic random inputs for ``specs``: N(0, 1) floats, small non-negative integers, masks of ones.

    ``batch`` replaces the first dimension of inputs whose first axis is dynamic.

    Integer inputs (token ids) are drawn from [0, 16) so they are valid for any vocabulary
    of at least 16 entries; inputs whose name says "mask" are all ones, "type" all zeros, and
    ``position_ids`` (``[batch, sequence]``) count 0, 1, ... along the sequence.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = (batch,) + tuple(s.shape[1:]) if batch and 0 in s.dynamic else s.shape
        dt = numpy_dtype(s.dtype)
        if s.dtype in EXTENSION_FLOATS:
            out[s.name] = rng.standard_normal(shape).astype(np.float32).astype(dt)
        elif np.issubdtype(dt, np.floating):
            out[s.name] = rng.standard_normal(shape).astype(dt)
        elif "mask" in s.name.lower() or dt == np.bool_:
            out[s.name] = np.ones(shape, dt)
        elif "type" in s.name.lower():
            out[s.name] = np.zeros(shape, dt)
        elif s.name.lower() == "position_ids" and len(shape) == 2:
            out[s.name] = np.broadcast_to(np.arange(shape[1], dtype=dt), shape).copy()
        else:
            out[s.name] = rng.integers(0, 16, shape).astype(dt)
    return out
