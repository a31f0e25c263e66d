"""The cuBLAS call plan of minidiff.kernels.cublas, checked on the CPU: the arguments it computes are run through a
NumPy model of column-major gemm (cublas<t>gemm / gemmStridedBatched reading raw strided memory) and must give a @ b.
The call itself needs a GPU (tests/execution/test_gpu_graphs.py); the layout reasoning, which is where a product
goes wrong, does not."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from helpers.cublas_layouts import layout_cases
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
