"""Matrix products on CuPy through cuBLAS called directly (ctypes), so that a CUDA graph can capture them.

Why: a training step on a GPU is many short launches, and the host's time per launch, not the GPU, sets its time
(BENCHMARKS.md). Replaying the step's forward and backward as CUDA graphs (minidiff.execution.graphs) removes that
cost, but CuPy refuses every cuBLAS call while a stream captures (`cupy_backends.cuda.libs.cublas.setStream` raises
NotImplementedError) although cuBLAS itself supports capture. So the products go to cuBLAS
here, on a handle of our own with a workspace of our own, in eager runs and captures alike. The workspace is set
again after every change of stream (cublasSetStream resets it to cuBLAS's default, which cuBLAS would then allocate
per stream, inside a capture too), and one workspace on every stream is also what cuBLAS requires for bitwise equal
results across streams: a replayed graph gives the eager step's bits. The products are plain float32 (cuBLAS's
default math mode) whatever CUPY_TF32 says: sums are computed as products too (channels.channel_sums), and TF32 would
round their inputs to 10 bits.

cuBLAS is column-major; a row-major C = A B is computed as the column-major C^T = B^T A^T, and a row-major matrix's
memory read column-major is its transpose, so row-major operands go in untransposed (op N) and column-major ones
(a `.T` view) as op T. Leading dimensions that share one stride become one strided batch. Operands that fit neither
layout (a general strided view) are copied first. `gemm_args` works this out from shapes and strides alone, so it is
tested on the CPU against NumPy (tests/kernels/test_cublas_plan.py); only the call itself needs a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import threading

import numpy as np

OP_N, OP_T = 0, 1
WORKSPACE_BYTES = 8 << 20   # cuBLAS's own guidance for Hopper is up to 32 MiB; these products are small
_FUNCTIONS = {np.dtype(np.float32): ("cublasSgemm_v2", "cublasSgemmStridedBatched", ctypes.c_float),
              np.dtype(np.float64): ("cublasDgemm_v2", "cublasDgemmStridedBatched", ctypes.c_double)}


def matrix_layout(rows, cols, s0, s1):
    """(op, ld) of a rows x cols matrix with element strides (s0, s1), as the column-major operand of the swapped
    product: op N for row-major memory (unit column stride), op T for column-major; None when it is neither."""
    if (s1 == 1 or cols == 1) and (rows == 1 or s0 >= max(cols, 1)):
        return OP_N, (s0 if rows > 1 else max(cols, 1))
    if (s0 == 1 or rows == 1) and (cols == 1 or s1 >= max(rows, 1)):
        return OP_T, (s1 if cols > 1 else max(rows, 1))
    return None


def batch_stride(shape, strides):
    """The one element stride that steps through the leading dims `shape` in C order (0 when broadcast or a single
    matrix), or None when they do not collapse into one."""
    stride = expected = None
    for size, st in zip(reversed(shape), reversed(strides)):
        if size == 1:
            continue
        if stride is None:
            stride = st
        elif st != expected:
            return None
        expected = st * size
    return 0 if stride is None else stride


def operand(shape, strides):
    """(op, ld, batch stride) of an operand (..., rows, cols) with element strides, or None: copy it first."""
    layout = matrix_layout(shape[-2], shape[-1], strides[-2], strides[-1])
    bstride = batch_stride(shape[:-2], strides[:-2])
    if layout is None or bstride is None or min(strides) < 0:
        return None
    return (*layout, bstride)


def broadcast_strides(x, shape):
    """x's element strides as an operand of `shape` (x's shape with NumPy's broadcasting): 0 along every dim of
    size 1 in x, whose stride is either never used or a broadcast's."""
    pad = len(shape) - x.ndim
    sizes = (1,) * pad + tuple(x.shape)
    strides = (0,) * pad + tuple(s // x.itemsize for s in x.strides)
    return tuple(0 if size == 1 else st for size, st in zip(sizes, strides))


def gemm_args(a, b, c):
    """How cuBLAS computes c = a @ b, for a (..., m, k) and b (..., k, n) broadcast to c's batch, c (..., m, n)
    C-contiguous: (plan of b, plan of a, n, m, k, ldc, stride of c, batch count), a plan being `operand`'s
    (op, ld, batch stride), or None where that operand must be copied to C order first."""
    *batch, m, n = c.shape
    k = a.shape[-1]
    pb = operand((*batch, k, n), broadcast_strides(b, (*batch, k, n)))
    pa = operand((*batch, m, k), broadcast_strides(a, (*batch, m, k)))
    return pb, pa, n, m, k, n, m * n, math.prod(batch)


class _Cublas:
    """One cuBLAS handle (per device and thread, `_cublas`) with its own workspace, and the gemm entry points."""

    def __init__(self, cupy):
        self.lib = lib = ctypes.CDLL(_library_path(cupy))
        handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cupy.cuda.runtime.malloc(WORKSPACE_BYTES)   # outside CuPy's pool: never handed elsewhere
        self._set_workspace()
        self.stream = None
        self.cupy = cupy
        self.one = {dt: f[2](1.0) for dt, f in _FUNCTIONS.items()}
        self.zero = {dt: f[2](0.0) for dt, f in _FUNCTIONS.items()}
        for gemm, batched, _ in _FUNCTIONS.values():
            getattr(lib, gemm).argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2 + \
                [ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int]
            getattr(lib, batched).argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2 + \
                [ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong] + \
                [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_longlong, ctypes.c_int]

    def gemm(self, dtype, opb, opa, n, m, k, b, ldb, sb, a, lda, sa, c, ldc, sc, count):
        """C = op(B') op(A') in cuBLAS's column-major terms (see gemm_args), on the current stream; pointers as
        ints, strided-batched when count > 1."""
        stream = self.cupy.cuda.get_current_stream().ptr
        if stream != self.stream:   # the handle follows the current stream (a capture's, then the default)
            _check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream)), "cublasSetStream")
            self._set_workspace()   # cublasSetStream has just put cuBLAS's default workspace back
            self.stream = stream
        gemm, batched, _ = _FUNCTIONS[dtype]
        one, zero = ctypes.byref(self.one[dtype]), ctypes.byref(self.zero[dtype])
        if count == 1:
            status = getattr(self.lib, gemm)(self.handle, opb, opa, n, m, k, one, b, ldb, a, lda, zero, c, ldc)
        else:
            status = getattr(self.lib, batched)(self.handle, opb, opa, n, m, k, one, b, ldb, sb, a, lda, sa, zero,
                                                c, ldc, sc, count)
        _check(status, gemm if count == 1 else batched)

    def _set_workspace(self):
        _check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace),
                                              ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")


_INSTANCE = {}


def _cublas(cupy):
    """The handle of this thread and device: a handle follows one current stream at a time, and CuPy's current
    stream is per thread (trainers in threads, as a sweep runs them, must not swap each other's streams)."""
    key = (cupy.cuda.get_device_id(), threading.get_ident())
    if key not in _INSTANCE:
        _INSTANCE[key] = _Cublas(cupy)
    return _INSTANCE[key]


def _library_path(cupy):
    """The libcublas CuPy itself loaded, of the CUDA major version CuPy runs (PyTorch may have mapped another), else
    the one the loader finds."""
    getattr(cupy.cuda, "cublas")   # CuPy loads libcublas on first use of its wrapper
    major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split()[-1] for line in f if "/libcublas.so" in line]
    except OSError:
        paths = []
    for path in paths:
        if os.path.basename(path).startswith(f"libcublas.so.{major}"):
            return path
    found = ctypes.util.find_library("cublas")
    if found is None:
        raise OSError("libcublas not found")
    return found


def _check(status, what):
    """RuntimeError for a cuBLAS call that did not return CUBLAS_STATUS_SUCCESS (0)."""
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def workspace_bytes() -> int:
    """Device memory held by the cuBLAS workspaces (one per device and thread that made a product)."""
    return WORKSPACE_BYTES * len(_INSTANCE)


def matmul(cupy, a, b, out=None):
    """a @ b for CuPy float32/float64 arrays (ndim >= 2, NumPy's broadcasting of the leading dims), into `out` when
    given (any layout); other cases go to cupy.matmul."""
    if a.ndim < 2 or b.ndim < 2 or a.dtype != b.dtype or a.dtype not in _FUNCTIONS:
        return cupy.matmul(a, b, out=out)
    m, k = a.shape[-2:]
    if b.shape[-2] != k:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not line up")
    shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), m, b.shape[-1])
    if out is not None and tuple(out.shape) != shape:
        raise ValueError(f"matmul: out has shape {out.shape}, the product {shape}")
    direct = out is not None and out.flags.c_contiguous and out.dtype == a.dtype and not (
        cupy.may_share_memory(out, a) or cupy.may_share_memory(out, b))   # cuBLAS would read what it writes
    c = out if direct else cupy.empty(shape, dtype=a.dtype)
    if c.size:
        if k == 0:
            c.fill(0)
        else:
            args = gemm_args(a, b, c)
            if args[0] is None or args[1] is None:
                batch = shape[:-2]
                b = b if args[0] is not None else cupy.ascontiguousarray(cupy.broadcast_to(b, (*batch, k, shape[-1])))
                a = a if args[1] is not None else cupy.ascontiguousarray(cupy.broadcast_to(a, (*batch, m, k)))
                args = gemm_args(a, b, c)
            pb, pa, n, m, k, ldc, sc, count = args
            _cublas(cupy).gemm(a.dtype, pb[0], pa[0], n, m, k, b.data.ptr, pb[1], pb[2], a.data.ptr, pa[1], pa[2],
                               c.data.ptr, ldc, sc, count)
    if out is not None and c is not out:
        out[...] = c
        return out
    return c
