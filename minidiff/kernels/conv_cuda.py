"""im2col for CuPy in one kernel: the column matrix written straight from the input, padding read as zeros.

Why a second form: `minidiff.nn.conv.im2col` copies the input into the interior of a zero-bordered buffer, then copies a
window view of that buffer into the columns (two launches, and on the host a dozen views and slices per call). On a
GPU at this model's sizes the host's time per launch, not the copying, sets the step's time (BENCHMARKS.md), so here
each column element finds its source pixel itself: row (n, ho, wo), column (i, j, c) reads
x[n, ho * stride - ph + i, wo * stride - pw + j, c], or 0 where that falls in the padding. The values are the same
copies as the NumPy form's, so the columns agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from minidiff.kernels.cuda import elementwise_kernel

_IM2COL = """
ptrdiff_t r = i;
const int c = r % C; r /= C;
const int j = r % kw; r /= kw;
const int a = r % kh; r /= kh;
const int wo = r % Wo; r /= Wo;
const int ho = r % Ho; r /= Ho;
const int y = ho * stride - ph + a;
const int z = wo * stride - pw + j;
cols = (y >= 0 && y < H && z >= 0 && z < W) ? x[((r * H + y) * W + z) * C + c] : (T)0;
"""
_PARAMS = "raw T x, int32 H, int32 W, int32 C, int32 Ho, int32 Wo, int32 kh, int32 kw, int32 stride, int32 ph, int32 pw"


def im2col(xp, x, cols, stride, ph, pw):
    """Fill `cols` (n, Ho, Wo, kh, kw, C), C-contiguous, with the patches of x (n, H, W, C); returns cols."""
    n, H, W, C = x.shape
    _, Ho, Wo, kh, kw, _ = cols.shape
    kernel = elementwise_kernel(xp, _PARAMS, "T cols", _IM2COL, "minidiff_im2col")
    kernel(xp.ascontiguousarray(x), *(np.int32(v) for v in (H, W, C, Ho, Wo, kh, kw, stride, ph, pw)), cols)
    return cols
