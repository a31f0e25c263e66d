"""The cuBLAS call plan of minidiff.kernels.cublas, checked on the CPU: the arguments it computes are run through a
NumPy model of column-major gemm (cublas<t>gemm / gemmStridedBatched reading raw strided memory) and must give a @ b.
The call itself needs a GPU (tests/test_gpu_graphs.py); the layout reasoning, which is where a product goes wrong,
does not."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from minidiff.kernels.cublas import OP_N, OP_T, batch_stride, gemm_args, matrix_layout


def _op_view(x, op, ld, rows, cols, bstride, count):
    """op(X') (count, rows, cols) for the column-major X' that starts at x's first element with leading dim ld."""
    isz = x.itemsize
    inner = (isz, ld * isz) if op == OP_N else (ld * isz, isz)
    return as_strided(x, shape=(count, rows, cols), strides=(bstride * isz, *inner), writeable=False)


def emulated_matmul(a, b):
    """c = a @ b the way cublas_gpu.matmul asks cuBLAS for it: C^T (n x m) = op(B') op(A') in column-major."""
    shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    c = np.full(shape, np.nan, dtype=a.dtype)
    args = gemm_args(a, b, c)
    if args[0] is None:
        b = np.ascontiguousarray(np.broadcast_to(b, (*shape[:-2], *b.shape[-2:])))
    if args[1] is None:
        a = np.ascontiguousarray(np.broadcast_to(a, (*shape[:-2], *a.shape[-2:])))
    (opb, ldb, sb), (opa, lda, sa), n, m, k, ldc, sc, count = gemm_args(a, b, c)
    assert ldb >= max(1, n if opb == OP_N else k) and lda >= max(1, k if opa == OP_N else m) and ldc >= max(1, n)
    product = _op_view(b, opb, ldb, n, k, sb, count) @ _op_view(a, opa, lda, k, m, sa, count)
    isz = c.itemsize
    as_strided(c, shape=(count, n, m), strides=(sc * isz, isz, ldc * isz))[...] = product
    return c


def layout_cases(rng, put=lambda a: a):
    """(name, a, b): operands in every layout the layers make, as views of arrays made by put(host array)."""
    r = lambda *s: put(rng.standard_normal(s))   # noqa: E731
    wide = r(9, 12)
    tokens = r(2, 16, 3 * 8)                   # attention's qkv tokens (N, L, 3C), C = 8
    heads = lambda blk, h: tokens[:, :, blk * 8:(blk + 1) * 8].reshape(2, 16, h, 8 // h).transpose(0, 2, 1, 3)  # noqa
    yield "row-major", r(5, 4), r(4, 3)
    yield "a transposed", r(4, 5).T, r(4, 3)
    yield "b transposed", r(5, 4), r(3, 4).T
    yield "both transposed", r(4, 5).T, r(3, 4).T
    yield "column slices (ld > cols)", wide[:5, 2:6], wide[1:5, 7:10]
    yield "row slice of a transpose", wide.T[3:8, :4], r(4, 2)
    yield "m = 1", r(1, 4), r(4, 3)
    yield "n = 1", r(5, 4), r(4, 1)
    yield "k = 1", r(5, 1), r(1, 3)
    yield "1 x 1 result", r(1, 4), r(4, 1)
    yield "column of a transpose", r(1, 5).T, r(1, 3)
    yield "batched", r(3, 5, 4), r(3, 4, 2)
    yield "batched, b shared", r(3, 5, 4), r(4, 2)
    yield "batched, a shared", r(5, 4), r(3, 4, 2)
    yield "batch broadcast both ways", r(2, 1, 5, 4), r(1, 3, 4, 2)
    yield "attention q k^T, one head", heads(0, 1), heads(1, 1).transpose(0, 1, 3, 2)
    yield "attention p v, one head", r(2, 1, 16, 16), heads(2, 1)
    yield "attention q k^T, two heads", heads(0, 2), heads(1, 2).transpose(0, 1, 3, 2)
    yield "attention ds^T q, two heads", r(2, 2, 16, 16).transpose(0, 1, 3, 2), heads(0, 2)
    yield "channel sums: a ones row against images", r(1, 12), r(3, 12, 4)          # channels.channel_sums
    yield "channel sums: channels-last view", r(1, 12), r(3, 4, 12).transpose(0, 2, 1)
    yield "channel sums: one long image", r(1, 40), r(1, 40, 5)                      # a conv's bias gradient
    yield "negative stride", r(5, 4)[::-1], r(4, 3)
    yield "every other row", r(10, 4)[::2], r(4, 3)
    yield "every other column", r(5, 8)[:, ::2], r(4, 3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_call_plan_computes_a_at_b_for_every_layout(dtype):
    rng = np.random.default_rng(0)
    for name, a, b in layout_cases(rng, lambda h: h.astype(dtype)):   # views of arrays of this dtype
        assert a.dtype == b.dtype == dtype
        got, want = emulated_matmul(a, b), np.matmul(a, b)
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, err_msg=name)


def test_views_whose_layout_cublas_can_read_are_not_copied():
    assert matrix_layout(6, 4, 10, 1) == (OP_N, 10)         # a column slice: row-major, leading dim 10
    assert matrix_layout(4, 6, 1, 10) == (OP_T, 10)         # its transpose
    assert matrix_layout(6, 5, 20, 2) is None               # every other column: neither
    assert batch_stride((2, 3), (24, 8)) == 8               # (2, 3) batch of 8-element matrices, C order
    assert batch_stride((2, 3), (48, 8)) is None            # a gap between the outer steps
    assert batch_stride((1, 3), (999, 8)) == 8              # a size-1 dim's stride is never used
    assert batch_stride((4,), (0,)) == 0                    # broadcast: every matrix is the same one
    c = np.empty((2, 1, 16, 16), dtype=np.float32)
    tokens = np.zeros((2, 16, 24), dtype=np.float32)        # one head's q and k: strided views of the tokens
    q, k = (tokens[:, :, i:i + 8].reshape(2, 16, 1, 8).transpose(0, 2, 1, 3) for i in (0, 8))
    pb, pa, *_ = gemm_args(q, k.transpose(0, 1, 3, 2), c)
    assert pb == (OP_T, 24, 16 * 24) and pa == (OP_N, 24, 16 * 24)   # no copy for attention's operands
