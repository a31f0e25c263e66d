"""The matrix product every layer calls: NumPy's matmul, or on CuPy cuBLAS called directly (minidiff.kernels.cublas),
where a CUDA graph can capture it."""

from __future__ import annotations

from minidiff.backend import get_array_module, is_cupy_module
from minidiff.kernels import cublas as cublas_gpu


def matmul(a, b, out=None):
    """a @ b (NumPy's matmul, into `out` when given) on any backend; the layers call this, never xp.matmul."""
    xp = get_array_module(a, b)
    if is_cupy_module(xp):
        return cublas_gpu.matmul(xp, a, b, out)
    return xp.matmul(a, b, out=out)
