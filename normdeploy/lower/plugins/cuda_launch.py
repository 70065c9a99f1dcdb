"""Launch an AOT kernel the way TensorRT's AOT launch does, through the CUDA driver API: no TensorRT needed.

TensorRT serializes the PTX ``aot_impl`` returns, has the driver JIT it, and launches the entry with
``cuLaunchKernel``: one pointer per plugin input, the int32 extra arguments, one pointer per output,
``grid_x`` blocks of ``block_x`` threads with ``shared_mem`` bytes of dynamic shared memory. This
module does exactly that with ``ctypes`` and ``libcuda.so.1`` on torch CUDA tensors, so a GPU host
without TensorRT (``scripts/gpu_check.sh``) checks and times the very PTX an engine would carry:
its trimmed parameter list, its ISA, its portable sm_80 form, the int32 encoding of its arguments.

``hidden_nulls=True`` appends a null pointer for each parameter beyond TensorRT's list (an untrimmed
PTX, launched as a TensorRT that pads missing arguments with null would).
"""
from __future__ import annotations

import ctypes
import hashlib
from typing import Sequence

__all__ = ["CudaError", "AotLauncher", "load_ptx", "launch"]

CU_JIT_ERROR_LOG_BUFFER = 5
CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call, its error and the JIT log if any."""


_LIB = None
_MODULES: dict[str, tuple] = {}


def _lib():
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL("libcuda.so.1")
        _check(lib, lib.cuInit(0), "cuInit")
        _LIB = lib
    return _LIB


def _check(lib, status: int, what: str, log: bytes = b"") -> None:
    if status == 0:
        return
    msg = ctypes.c_char_p()
    lib.cuGetErrorString(status, ctypes.byref(msg))
    text = msg.value.decode() if msg.value else f"error {status}"
    extra = f"; JIT log: {log.decode(errors='replace').strip()}" if log.strip(b"\0 \n") else ""
    raise CudaError(f"{what} failed: {text}{extra}")


def _ensure_context(lib) -> None:
    """Use the current context (torch's primary context once torch has touched CUDA), else retain one."""
    ctx = ctypes.c_void_p()
    _check(lib, lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if ctx.value:
        return
    dev = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(lib, lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def load_ptx(ptx: str, kernel_name: str):
    """JIT ``ptx`` with the driver (as TensorRT has it done) and return the CUfunction of ``kernel_name`` (cached)."""
    key = hashlib.sha256(ptx.encode() + kernel_name.encode()).hexdigest()
    if key in _MODULES:
        return _MODULES[key][1]
    lib = _lib()
    _ensure_context(lib)
    log = ctypes.create_string_buffer(16384)
    opts = (ctypes.c_int * 2)(CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES)
    vals = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p), ctypes.c_void_p(len(log)))
    mod = ctypes.c_void_p()
    _check(lib, lib.cuModuleLoadDataEx(ctypes.byref(mod), ctypes.c_char_p(ptx.encode() + b"\0"), 2, opts, vals),
           f"cuModuleLoadDataEx ({kernel_name})", log.raw)
    fn = ctypes.c_void_p()
    _check(lib, lib.cuModuleGetFunction(ctypes.byref(fn), mod, kernel_name.encode()), "cuModuleGetFunction")
    _MODULES[key] = (mod, fn)
    return fn


def launch(fn, grid: int, block: int, shared: int, pointers_in: Sequence[int], extras: Sequence[int],
           pointers_out: Sequence[int], stream: int = 0, hidden_nulls: int = 0) -> None:
    """``cuLaunchKernel(fn)`` with TensorRT's argument order: input pointers, int32 extras, output pointers."""
    lib = _lib()
    values = ([ctypes.c_uint64(int(p)) for p in pointers_in] + [ctypes.c_int32(int(e)) for e in extras]
              + [ctypes.c_uint64(int(p)) for p in pointers_out] + [ctypes.c_uint64(0) for _ in range(hidden_nulls)])
    params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    if grid <= 0:
        return
    _check(lib, lib.cuLaunchKernel(fn, ctypes.c_uint(grid), 1, 1, ctypes.c_uint(block), 1, 1, ctypes.c_uint(shared),
                                   ctypes.c_void_p(stream), params, None), "cuLaunchKernel")


class AotLauncher:
    """One :class:`~normdeploy.lower.plugins.trt_plugins.AotKernel`, launched on torch CUDA tensors as TensorRT would.

    ``launcher(x, *params, y)`` (the plugin's inputs, then its output) launches on the current
    torch stream; the extras, grid, block and shared memory are the AOT kernel's, which must be
    concrete (a static shape).
    """

    def __init__(self, aot, hidden_nulls: bool = False):
        from .trt_plugins import const_dim

        self.aot = aot
        self.fn = load_ptx(aot.ptx, aot.kernel_name)
        self.extras = [const_dim(v) for _, v in aot.extra_args]
        self.grid = const_dim(aot.grid[0])
        if self.grid is None or any(e is None for e in self.extras):
            raise ValueError(f"{aot.kernel_name}: grid and extras must be concrete to launch here")
        self.hidden = len(aot.abi.hidden) if hidden_nulls else 0

    def _pointers(self, tensors) -> tuple[list[int], list[int]]:
        n_in = len(self.aot.plan.inputs)
        if len(tensors) != n_in + 1:
            raise ValueError(f"{self.aot.plugin}: {len(tensors)} tensors for {n_in} inputs and 1 output")
        for t in tensors:
            if not (t.is_cuda and t.is_contiguous()):
                raise ValueError("AotLauncher takes contiguous CUDA tensors")
        return [t.data_ptr() for t in tensors[:n_in]], [tensors[-1].data_ptr()]

    def __call__(self, *tensors) -> None:
        import torch

        ins, outs = self._pointers(tensors)
        launch(self.fn, self.grid, self.aot.block[0], self.aot.shared_mem, ins, self.extras, outs,
               torch.cuda.current_stream().cuda_stream, self.hidden)

    def bind(self, *tensors, stream: int | None = None):
        """A zero-argument launch on ``tensors`` with its arguments packed once (for timing: no per-call Python
        work beyond the ``cuLaunchKernel`` call itself); ``stream`` defaults to torch's current stream."""
        if stream is None:
            import torch

            stream = torch.cuda.current_stream().cuda_stream
        ins, outs = self._pointers(tensors)
        values = ([ctypes.c_uint64(p) for p in ins] + [ctypes.c_int32(int(e)) for e in self.extras]
                  + [ctypes.c_uint64(p) for p in outs] + [ctypes.c_uint64(0) for _ in range(self.hidden)])
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        lib, fn = _lib(), self.fn
        args = (fn, ctypes.c_uint(self.grid), 1, 1, ctypes.c_uint(self.aot.block[0]), 1, 1,
                ctypes.c_uint(self.aot.shared_mem), ctypes.c_void_p(stream), params, None)
        keep = (values, tensors)

        def run() -> None:
            if self.grid > 0:
                _check(lib, lib.cuLaunchKernel(*args), "cuLaunchKernel")
            return keep is None  # keeps the argument buffers and tensors alive with the closure

        return run
