"""normdeploy.lower.plugins.cuda_launch without a GPU: the arguments it hands cuLaunchKernel, recorded by a
stand-in of libcuda. (tests/build/test_trt_engine_gpu.py launches real PTX with it on a GPU.)"""
from __future__ import annotations

import ctypes

from normdeploy.lower.plugins import cuda_launch as C


class FakeCuda:
    """Records cuLaunchKernel's arguments; ``int32`` are the positions of the int32 parameters."""

    def __init__(self, int32=(2, 3)):
        self.launches, self.int32 = [], set(int32)

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        n = len(params)
        values = []
        for i in range(n):
            ptr = ctypes.cast(params[i], ctypes.POINTER(ctypes.c_int32 if i in self.int32 else ctypes.c_uint64))
            values.append(ptr.contents.value)
        self.launches.append((gx.value, gy, gz, bx.value, by, bz, shared.value, stream.value, values, extra))
        return 0


def test_launch_passes_tensorrts_argument_order(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(C, "_LIB", fake)
    C.launch("fn", 7, 256, 64, [0x1000, 0x2000], [-1 & 0x7FFFFFFF, 768], [0x3000], stream=5, hidden_nulls=2)
    (gx, gy, gz, bx, by, bz, shared, stream, values, extra), = fake.launches
    assert (gx, gy, gz, bx, by, bz, shared, stream, extra) == (7, 1, 1, 256, 1, 1, 64, 5, None)
    # inputs (u64), int32 extras, outputs (u64), then a null per hidden parameter
    assert values == [0x1000, 0x2000, 0x7FFFFFFF, 768, 0x3000, 0, 0]
    C.launch("fn", 0, 256, 0, [1], [], [2])  # an empty grid launches nothing
    assert len(fake.launches) == 1


class _Cuda:
    """A CUDA tensor's face, enough for AotLauncher's checks."""

    is_cuda = True

    def __init__(self, ptr):
        self.ptr = ptr

    def is_contiguous(self):
        return True

    def data_ptr(self):
        return self.ptr


def test_bound_launch_packs_the_aot_kernels_arguments_once(monkeypatch):
    from normdeploy.lower.plugins import kernels as K
    from normdeploy.lower.plugins import trt_plugins as T

    fake = FakeCuda(int32=(2, 3, 4))
    monkeypatch.setattr(C, "_LIB", fake)
    monkeypatch.setattr(C, "load_ptx", lambda ptx, name: "fn")
    aot = T.build_aot_kernel("NormdeployRMSNorm", ["fp16"] * 3, (4, 768), {"epsilon": 1e-5}, 1, target=90)
    run = C.AotLauncher(aot).bind(_Cuda(0x1000), _Cuda(0x2000), _Cuda(0x3000), stream=9)
    run()
    run()
    (gx, _, _, bx, _, _, shared, stream, values, _), second = fake.launches
    assert second[8] == values and (gx, bx, shared, stream) == (aot.grid[0], aot.block[0], aot.shared_mem, 9)
    # x, g, then the extras n_rows, n_cols, eps_bits (int32), then y
    assert values[:2] == [0x1000, 0x2000] and values[-1] == 0x3000
    assert values[2:-1] == [4, 768, K.f32_bits(1e-5)] and len(values) == len(aot.plan.trt_params) == 6
