"""im2col for CuPy in one kernel: the column matrix written straight from the input, padding read as zeros.

Why a second form: `minidiff.conv.im2col` copies the input into the interior of a zero-bordered buffer, then copies a
window view of that buffer into the columns (two launches, and on the host a dozen views and slices per call). On a
GPU at this model's sizes the host's time per launch, not the copying, sets the step's time (BENCHMARKS.md), so here
each column element finds its source pixel itself: row (n, ho, wo), column (i, j, c) reads
x[n, ho * stride - ph + i, wo * stride - pw + j, c], or 0 where that falls in the padding. The values are the same
copies as the NumPy form's, so the columns agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from .backend import elementwise_kernel

# IDX: the index type, unsigned 32-bit where the columns have fewer than 2^31 elements: a GPU divides 32-bit integers
# several times faster than 64-bit ones, and these five divisions per element, not the copying, set the kernel's time
# (59 us a call, 18% of a 32x32 step's device time, with 64-bit indices)
_IM2COL = """
IDX r = (IDX)i;
const int c = r % (IDX)C; r /= (IDX)C;
const int j = r % (IDX)kw; r /= (IDX)kw;
const int a = r % (IDX)kh; r /= (IDX)kh;
const int wo = r % (IDX)Wo; r /= (IDX)Wo;
const int ho = r % (IDX)Ho; r /= (IDX)Ho;
const int y = ho * stride - ph + a;
const int z = wo * stride - pw + j;
cols = (y >= 0 && y < H && z >= 0 && z < W) ? x[(((ptrdiff_t)r * H + y) * W + z) * C + c] : (T)0;
"""
_PARAMS = "raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw, int32 stride, int32 ph, int32 pw"


def im2col(xp, x, cols, stride, ph, pw):
    """Fill `cols` (n, Ho, Wo, kh, kw, C), C-contiguous, with the patches of x (n, H, W, C); returns cols."""
    n, H, W, C = x.shape
    _, Ho, Wo, kh, kw, _ = cols.shape
    idx, name = ("unsigned int", "minidiff_im2col") if cols.size < 2 ** 31 else ("ptrdiff_t", "minidiff_im2col_64")
    kernel = elementwise_kernel(xp, _PARAMS, "T cols", _IM2COL.replace("IDX", idx), name)
    kernel(xp.ascontiguousarray(x), *(np.int32(v) for v in (H, W, C, Ho, Wo, kh, kw, stride, ph, pw)), cols)
    return cols
