"""CuPy kernels compiled from CUDA source, made once per signature (minidiff.kernels.conv_cuda, norm_cuda, optim_cuda).

Built from the module object a caller already holds (its arrays' module), so no file but minidiff.backend imports
CuPy; CuPy compiles a kernel on first use and caches the binary.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def elementwise_kernel(xp, in_params: str, out_params: str, body: str, name: str):
    """A CuPy ElementwiseKernel."""
    return xp.ElementwiseKernel(in_params, out_params, body, name)


@functools.lru_cache(maxsize=None)
def reduction_kernel(xp, in_params: str, out_params: str, map_expr: str, name: str):
    """A CuPy ReductionKernel summing `map_expr`."""
    return xp.ReductionKernel(in_params, out_params, map_expr, "a + b", "y = a", "0", name)
