"""Where a run keeps the weights it makes, so that a large model is never all in memory twice.

A rewrite of a large model makes new weight tensors (a folded Conv kernel, a re-centred
projection, an fp16 copy of every matrix); held in memory, they add up to about the model's
size again, on top of the pages of the original that the passes read. While a
:class:`TensorStore` is *spilling* (:func:`spilling`, entered by ``pipeline.transform`` for
models past :data:`SPILL_MODEL_BYTES`), every new initializer of at least
:data:`SPILL_BYTES` made through :func:`normdeploy.core.graph.constant` (and the precision
conversion) is appended to one data file in the run's work directory and the graph holds an
``onnx_ir.ExternalTensor`` over it, memory-mapped on demand like the original's own external
data. :func:`release_mappings` closes those mappings between steps, so the pages a pass read
leave the resident set once it is done.

Exactness: the bytes written are the array's bytes (little-endian, C order), read back by
onnx-ir's ``ExternalTensor`` as the same dtype and shape; nothing is converted.

Why by hand: onnx-ir maps external data lazily and writes it out (``onnx_ir.save`` streams
with ``copy_file_range``), but has no append-as-you-go store for tensors made during edits;
``onnx_ir.external_data.convert_tensors_to_external`` rewrites one whole file per call.
"""
from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
import shutil
import tempfile
import weakref

import numpy as np
import onnx_ir as ir

#: a new tensor at least this large is spilled while spilling is on
SPILL_BYTES = 1 << 20
#: models with more weight bytes than this spill their new tensors (``pipeline.transform``)
SPILL_MODEL_BYTES = 256 << 20
#: offsets of spilled tensors are aligned to this (what ONNX Runtime and numpy read fastest)
ALIGNMENT = 64

_ACTIVE: contextvars.ContextVar[TensorStore | None] = contextvars.ContextVar("normdeploy_store", default=None)


class StoredTensor(ir.ExternalTensor):
    """An ``ExternalTensor`` over a :class:`TensorStore`'s file that keeps the store (and its file) alive."""

    __slots__ = ("store",)


class TensorStore:
    """An append-only external-data file in its own temporary directory, deleted with the store.

    The directory lives as long as some :class:`StoredTensor` of it does (or :meth:`close`).
    """

    def __init__(self, prefix: str = "normdeploy-weights-"):
        self.directory = tempfile.mkdtemp(prefix=prefix)
        self.location = "spilled.data"
        self.path = os.path.join(self.directory, self.location)
        self._file = open(self.path, "wb")  # noqa: SIM115 - held open for appends; closed by close()
        self.bytes = 0
        self.tensors = 0
        self._finalizer = weakref.finalize(self, _remove, self._file, self.directory)

    def put(self, array: np.ndarray, name: str) -> StoredTensor:
        """Append ``array``; the tensor that reads it back (same dtype, shape and bytes)."""
        arr = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        pad = -self._file.tell() % ALIGNMENT
        if pad:
            self._file.write(b"\0" * pad)
        offset = self._file.tell()
        self._file.write(memoryview(arr).cast("B") if arr.size else b"")
        self._file.flush()
        self.bytes += arr.nbytes
        self.tensors += 1
        t = StoredTensor(self.location, offset, arr.nbytes, ir.DataType.from_numpy(arr.dtype),
                         shape=ir.Shape(arr.shape), name=name, base_dir=self.directory)
        t.store = self
        return t

    def close(self) -> None:
        """Delete the directory now (the tensors that read it become unreadable)."""
        self._finalizer()


def _remove(f, directory: str) -> None:
    with contextlib.suppress(OSError):
        f.close()
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def spilling(store: TensorStore | None):
    """While active, :func:`tensor` spills large new tensors into ``store`` (None: nothing spills)."""
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


def active() -> TensorStore | None:
    """The store new tensors spill to now, if any."""
    return _ACTIVE.get()


def tensor(array: np.ndarray, name: str):
    """The tensor a new initializer holds: spilled to the active store when large, else in memory."""
    store = _ACTIVE.get()
    arr = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    if store is not None and arr.nbytes >= SPILL_BYTES:
        return store.put(arr, name)
    return ir.tensor(arr, name=name)


def release_mappings(model: ir.Model) -> int:
    """Close the memory maps of ``model``'s external tensors (they reopen when read again); returns how many.

    A mapping that a live numpy view still reads stays open (``BufferError``): closing it
    would invalidate that view.
    """
    closed = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) and t.raw is not None:
            try:
                t.release()
                closed += 1
            except BufferError:
                pass
    return closed


def _over_a_map(array: np.ndarray) -> bool:
    """Whether ``array`` is a view whose memory is a memory map (an external tensor's file)."""
    b = array
    while isinstance(b, np.ndarray):
        b = b.base
    if isinstance(b, memoryview):
        b = b.obj
    return isinstance(b, mmap.mmap)


def store_mapped_views(model: ir.Model, store: TensorStore | None = None) -> int:
    """Put every in-memory initializer that is a view over a memory map into ``store``; returns how many.

    onnxscript's constant folder folds ``Transpose(W)`` of an external weight (the dynamo exporter
    leaves one per Linear) into an in-memory tensor over ``np.transpose`` of W's memory-mapped
    array. The ``ExternalTensor`` it read is dropped, but the view keeps its map of the whole data
    file open: :func:`release_mappings` cannot close it (the model holds no external tensor), and
    every read of the view (a pass, the file a session is made from) leaves its pages resident
    for the rest of the run. Measured on a 2.2 GB fp16 Llama (155 folded Transposes): 1973 MiB of
    the input's data file resident from the export to the end, under each session's own copy, so
    verification peaked at 2.1x the weights. Each such tensor (of at least :data:`SPILL_BYTES`) is
    written to ``store`` (a new one when None) one at a time and the graph holds the
    :class:`StoredTensor` that reads it back, memory-mapped on demand and released like the rest.
    Exact: the bytes written are the view's values in C order, the same dtype and shape.
    """
    moved = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) or not isinstance(getattr(t, "raw", None), np.ndarray):
            continue
        if t.raw.nbytes < SPILL_BYTES or not _over_a_map(t.raw):
            continue
        store = store if store is not None else TensorStore()
        v.const_value = store.put(t.numpy(), t.name or v.name)
        moved += 1
    return moved
