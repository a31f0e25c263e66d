"""Per-channel sums and adds on channels-last arrays (N, *spatial, C), shared by the convolution and GroupNorm.

- `channel_sums`: sums over the spatial positions as one batched matrix-vector product with a row of ones: in NumPy
  one BLAS call instead of a reduction that walks a strided axis, and on CuPy a cuBLAS product that splits the long
  axis where CuPy's reduction would give each of the few outputs one thread block (BENCHMARKS.md has the timings);
- `add_channels`: a per-channel (or per-image-and-channel) add on "wide rows": x (N, S, C) seen as (N, S / k, k C)
  with the values tiled k times (`tiled`), so NumPy's inner loop runs over k C elements instead of C (a broadcast over
  a few channels pays the inner loop's overhead every C elements).
Tiling is a product with a constant 0/1 matrix: each output is one value times 1 plus zeros, so it is exact for
finite values.
"""

from __future__ import annotations

import functools

from minidiff.backend import get_array_module, is_cupy_module
from minidiff.kernels.matmul import matmul
from minidiff.kernels.workspace import constant, ones_row

WIDE = 128   # target inner-loop length (elements) of the broadcast products; tests lower it to exercise 1 < k < S


def channel_sums(a):
    """a (N, S, C) -> (N, C), sums over S as a batched matrix-vector product (also the conv bias gradient and the
    UNet's timestep gradient)."""
    return matmul(ones_row(a.shape[1], a), a).reshape(a.shape[0], a.shape[2])


def wide_factor(S, C):
    """k = the largest divisor of S with k * C <= WIDE (at least 1): (N, S, C) is then seen as (N, S / k, k * C)."""
    return _wide_factor(S, C, WIDE)


@functools.lru_cache(maxsize=None)
def _wide_factor(S, C, wide):
    return max(k for k in range(1, S + 1) if S % k == 0 and (k * C <= wide or k == 1))


def tiled(v, k):
    """v (..., C) -> (..., k C): v repeated k times along its last axis, as one exact product with a 0/1 matrix."""
    C = v.shape[-1]
    return v @ constant(("tile", C, k), v, lambda xp, dtype: (xp.arange(k * C)[None, :] % C ==
                                                             xp.arange(C)[:, None]).astype(dtype))


def add_channels(a, v):
    """a (N, *spatial, C) += v in place, v (C,) per channel or (N, C) per image and channel, on wide rows."""
    if not a.flags.c_contiguous:
        raise ValueError("add_channels works in place on a C-contiguous array")   # a reshape would be a copy
    N, C = a.shape[0], a.shape[-1]
    if is_cupy_module(get_array_module(a)):   # a broadcast add is one kernel there; wide rows only pay in NumPy
        a.reshape(N, -1, C)[...] += v if v.ndim == 1 else v[:, None]
        return a
    S = a.size // (N * C)
    k = wide_factor(S, C)
    if v.ndim == 1:
        a.reshape(-1, k * C)[...] += tiled(v, k)
    else:
        a.reshape(N, S // k, k * C)[...] += tiled(v, k)[:, None]
    return a
