"""Channels-last (NHWC) 2-D convolution, forward and backward, as im2col + GEMM over chunks of the batch.

The UNet keeps its activations channels-last, so a convolution needs no transposes: the column matrix of an image
is built by one strided copy (a window view of the zero-padded input, rows (ho, wo), columns (i, j, c)) and the
convolution is `cols @ w2t`, with w2t the (kh*kw*C, O) matrix of the OIHW weight re-laid out per call (weights are
small; a copy made per call can never go stale when the optimizer updates the parameters in place).

Why chunks: the column matrix is kh*kw times the size of the input. Built for a few images at a time into a scratch
buffer of about `CHUNK_BYTES`, it is written and read back while it still sits in the cache, and it is never kept:
the backward builds the column matrix of the output gradient instead (which serves both of its products, see there),
so the forward stores no more than its input -- PyTorch's memory, not kh*kw times it. On a GPU the "chunk" is the
whole batch, and the column matrix is one kernel (minidiff.kernels.conv_cuda). (Multi-core CPUs are used from outside
the model: minidiff.execution.data_parallel splits the batch.)

Layouts: x (N, H, W, C), w (O, C, kh, kw) as PyTorch's OIHW, b (O,), out (N, Ho, Wo, O).
The same math written for reading (NCHW, a loop over the kernel offsets): minidiff.nn.reference.conv2d_forward.
"""

from __future__ import annotations

from minidiff.backend import get_array_module, is_cupy_module
from minidiff.kernels import conv_cuda as conv_gpu
from minidiff.kernels.channels import add_channels, channel_sums
from minidiff.kernels.chunks import batch_chunks
from minidiff.kernels.matmul import matmul
from minidiff.kernels.workspace import scratch, scratch_kept

# column-matrix bytes per chunk on the CPU (see the module docstring): small enough to stay in the cache, and larger
# chunks step no faster while each holds larger work buffers (BENCHMARKS.md)
CHUNK_BYTES = 1 << 20


def image_chunks(xp, n, bytes_per_image):
    """(start, stop) ranges of images, about CHUNK_BYTES of columns each; the whole batch on a GPU."""
    if is_cupy_module(xp):
        return [(0, n)]
    return batch_chunks(n, -(-n * bytes_per_image // CHUNK_BYTES))


def out_size(h, w, kh, kw, stride, ph, pw):
    return (h + 2 * ph - kh) // stride + 1, (w + 2 * pw - kw) // stride + 1


def _windows(a, kh, kw, stride, Ho, Wo):
    """a (n, Hp, Wp, C) -> view (n, Ho, Wo, kh, kw, C) of every kh x kw patch, `stride` apart. No copy.

    A strided view (element [n, ho, wo, i, j, c] is a[n, ho * stride + i, wo * stride + j, c]) whose patches
    overlap: it is only ever read (CuPy's as_strided has no `writeable=False` to enforce that).
    """
    xp = get_array_module(a)
    sn, sh, sw, sc = a.strides
    return xp.lib.stride_tricks.as_strided(a, (a.shape[0], Ho, Wo, kh, kw, a.shape[3]),
                                           (sn, stride * sh, stride * sw, sh, sw, sc))


def im2col(x, kh, kw, stride, ph, pw, name="im2col"):
    """The column matrix of x (n, H, W, C): (n * Ho * Wo, kh * kw * C) in a scratch buffer (this thread's `name`).

    Row (i_n, ho, wo) holds the zero-padded patch x[i_n, ho*stride - ph + i, wo*stride - pw + j, c] in (i, j, c) order.
    """
    n, H, W, C = x.shape
    Ho, Wo = out_size(H, W, kh, kw, stride, ph, pw)
    cols = scratch(name + ".cols", (n, Ho, Wo, kh, kw, C), x)
    xp = get_array_module(x)
    if is_cupy_module(xp):   # one launch, no padded copy (minidiff.kernels.conv_cuda)
        return conv_gpu.im2col(xp, x, cols, stride, ph, pw).reshape(n * Ho * Wo, kh * kw * C)
    src = x
    if ph or pw:
        # one padded buffer for every shape, not a zeroed one per shape (which kept a few images of every layer's
        # padded input alive between calls): its border is zeroed when the last use had another geometry
        padded = (n, H + 2 * ph, W + 2 * pw, C)
        src, kept = scratch_kept(name + ".pad", padded, x, tag=(padded, ph, pw))
        if not kept:
            src[:, :ph] = 0
            src[:, ph + H:] = 0
            src[:, ph:ph + H, :pw] = 0
            src[:, ph:ph + H, pw + W:] = 0
        src[:, ph:ph + H, pw:pw + W] = x
    cols[...] = _windows(src, kh, kw, stride, Ho, Wo)
    return cols.reshape(n * Ho * Wo, kh * kw * C)


def _is_pointwise(kh, kw, stride, ph, pw):
    return kh == kw == 1 and stride == 1 and ph == pw == 0


def conv2d_nhwc_forward(x, w, b=None, stride=1, padding=0):
    """Cross-correlation as torch.nn.functional.conv2d, channels-last.

    x (N, H, W, C), w (O, C, kh, kw), b (O,) or None -> out (N, Ho, Wo, O), Ho = (H + 2 ph - kh) // stride + 1;
    padding an int or (ph, pw), zeros. out[n, ho, wo] = cols[n, ho, wo] @ w2t + b, chunk by chunk (`im2col`).
    """
    xp = get_array_module(x)
    N, H, W, C = x.shape
    O, _, kh, kw = w.shape
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    Ho, Wo = out_size(H, W, kh, kw, stride, ph, pw)
    w2t = xp.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(kh * kw * C, O)
    out = xp.empty((N, Ho, Wo, O), dtype=x.dtype)
    pointwise = _is_pointwise(kh, kw, stride, ph, pw)

    for n0, n1 in image_chunks(xp, N, Ho * Wo * kh * kw * C * x.dtype.itemsize):
        cols = x[n0:n1].reshape(-1, C) if pointwise else im2col(x[n0:n1], kh, kw, stride, ph, pw)
        matmul(cols, w2t, out=out[n0:n1].reshape(-1, O))
        if b is not None:
            add_channels(out[n0:n1], b)  # while the chunk is still in the cache
    return out, (x, w2t, b is not None, (kh, kw), stride, (ph, pw))


# With out2 = cols @ w2t + b (out2 = out as (N*Ho*Wo, O)): db = column sums of dout2, and by case
# - stride 1 (the UNet's 3x3 convs): dx is the "full" correlation of dout, padded by k - 1 - p, with the kernel flipped
#   in space: dx2 = cols_d @ w_flip, cols_d the im2col of the padded dout (rows: the input's pixels, columns
#   (i', j', o)) and w_flip[(i', j', o), c] = w[o, c, k-1-i', k-1-j']. Substituting i = k-1-i' in
#   dw[o, c, i, j] = sum_{n, y, x} dout[n, y + p - i, x + p - j, o] x[n, y, x, c] gives dw_flip = cols_d^T @ x2: one
#   column matrix serves both products, and the input's is never rebuilt;
# - 1x1: dx2 = dout2 @ w2t^T, dw = dout2^T @ x2;
# - otherwise (stride 2, or no input gradient): dw2 = dout2^T @ cols, cols rebuilt from the cached input, and
#   dcols = dout2 @ w2t^T, which col2im adds back onto the input pixels each column came from.
def conv2d_nhwc_backward(dout, cache, input_grad=True):
    """dout (N, Ho, Wo, O) -> dx (N, H, W, C), {"weight": (O, C, kh, kw), "bias": (O,)}.

    input_grad=False skips dx (returned as None): the gradient of an input that needs none (the image).
    """
    x, w2t, has_bias, (kh, kw), stride, (ph, pw) = cache
    O = dout.shape[3]
    if input_grad and stride == 1 and ph < kh and pw < kw:
        dx, dw = _backward_stride1(dout, x, w2t, kh, kw, ph, pw)
    else:
        dw = _weight_grad(dout, x, kh, kw, stride, ph, pw)
        dx = _input_grad_col2im(dout, w2t, x.shape, kh, kw, stride, ph, pw) if input_grad else None
    grads = {"weight": dw}
    if has_bias:
        grads["bias"] = channel_sums(dout.reshape(1, -1, O))[0]
    return dx, grads


def _accumulate(total, a, b):
    """total + a @ b (a @ b when total is None): the sum of a weight gradient over chunks, in chunk order."""
    if total is None:
        return matmul(a, b)
    total += matmul(a, b)
    return total


def _backward_stride1(dout, x, w2t, kh, kw, ph, pw):
    """Stride-1 conv: (dx (N, H, W, C), dw (O, C, kh, kw)) from one im2col of dout; see the comment above."""
    xp = get_array_module(dout)
    N, H, W, C = x.shape
    O = dout.shape[3]
    w_flip = xp.ascontiguousarray(w2t.reshape(kh, kw, C, O)[::-1, ::-1].transpose(0, 1, 3, 2))
    w_flip = w_flip.reshape(kh * kw * O, C)
    dx = xp.empty(x.shape, dtype=dout.dtype)
    dw_flip = None
    for n0, n1 in image_chunks(xp, N, H * W * kh * kw * O * dout.dtype.itemsize):
        cols = im2col(dout[n0:n1], kh, kw, 1, kh - 1 - ph, kw - 1 - pw)
        matmul(cols, w_flip, out=dx[n0:n1].reshape(-1, C))
        dw_flip = _accumulate(dw_flip, cols.T, x[n0:n1].reshape(-1, C))
    return dx, xp.ascontiguousarray(dw_flip.reshape(kh, kw, O, C)[::-1, ::-1].transpose(2, 3, 0, 1))


def _weight_grad(dout, x, kh, kw, stride, ph, pw):
    """dw (O, C, kh, kw) from dw2 = sum over chunks of dout2[rows]^T @ cols[rows], cols rebuilt from x."""
    xp = get_array_module(dout)
    N, H, W, C = x.shape
    _, Ho, Wo, O = dout.shape
    dw2 = None
    for n0, n1 in image_chunks(xp, N, Ho * Wo * kh * kw * C * x.dtype.itemsize):
        cols = x[n0:n1].reshape(-1, C) if _is_pointwise(kh, kw, stride, ph, pw) else \
            im2col(x[n0:n1], kh, kw, stride, ph, pw)
        dw2 = _accumulate(dw2, dout[n0:n1].reshape(-1, O).T, cols)
    return xp.ascontiguousarray(dw2.reshape(O, kh, kw, C).transpose(0, 3, 1, 2))


def _input_grad_col2im(dout, w2t, x_shape, kh, kw, stride, ph, pw):
    """dx (N, H, W, C): dcols = dout2 @ w2t^T, each kernel offset's slice added back where it was copied from."""
    xp = get_array_module(dout)
    N, H, W, C = x_shape
    _, Ho, Wo, O = dout.shape
    dx = xp.empty(x_shape, dtype=dout.dtype)
    for n0, n1 in image_chunks(xp, N, Ho * Wo * kh * kw * C * dout.dtype.itemsize):
        if _is_pointwise(kh, kw, stride, ph, pw):
            matmul(dout[n0:n1].reshape(-1, O), w2t.T, out=dx[n0:n1].reshape(-1, C))
            continue
        dcols = matmul(dout[n0:n1].reshape(-1, O), w2t.T).reshape(n1 - n0, Ho, Wo, kh, kw, C)
        dxpad = xp.zeros((n1 - n0, H + 2 * ph, W + 2 * pw, C), dtype=dout.dtype)
        for i in range(kh):
            for j in range(kw):
                dxpad[:, i:i + stride * Ho:stride, j:j + stride * Wo:stride] += dcols[:, :, :, i, j]
        dx[n0:n1] = dxpad[:, ph:ph + H, pw:pw + W]
    return dx
