"""Channels-last GroupNorm, optionally fused with the SiLU that follows it in every DDPM block.

x (N, *spatial, C): each image's C channels form `groups` groups of Cg = C / groups consecutive channels, normalised
over (spatial, Cg) as torch.nn.GroupNorm does. Written for speed on NumPy without losing the reference form:
- per-(image, channel) sums are one batched matrix-vector product (`channel_sums`): one BLAS call, where NumPy's
  reduction over a strided axis walks memory out of order (BENCHMARKS.md has the timings);
- normalise, scale and shift fold into one multiply and one add with per-(image, channel) coefficients a, b:
  h = x_hat * gamma + beta = x * a + b, a = inv_std * gamma, b = beta - mean * a;
- SiLU is written as h * sigmoid(h) = h/2 + (h/2) tanh(h/2) (sigmoid = (1 + tanh(h/2)) / 2 never overflows), and
  h/2 comes straight out of the folded affine map with a/2, b/2;
- fused with SiLU, the cache is the input x (alive anyway: it is the block's input), two (N, groups) arrays and
  SiLU's derivative at h, formed in the forward from the h/2 and tanh(h/2) it has at hand (PyTorch keeps h instead:
  the same memory, but its backward must recompute the sigmoid); the backward never recomputes a tanh;
- temporaries live in reused scratch buffers (minidiff.kernels.workspace); only the output is a new array.
- the per-(image, channel) coefficients are applied on "wide rows": x (N, S, C) seen as (N, S / k, k C) with the
  coefficients tiled k times, so NumPy's inner loop runs over k C elements instead of C (a broadcast over a few
  channels pays the loop's overhead every C elements; see minidiff.kernels.channels);
- per-group and per-channel values move between (N, G), (N, C) and the tiled (N, k C) by products with constant
  0/1 matrices (`_maps`): one small matmul instead of a reshape-sum, a repeat and a concatenate. Each output of a
  spreading or tiling product is one value times 1 plus zeros, so it is exact for finite values (an inf turns the
  other columns' 0 * inf into NaN: a diverged run is non-finite either way); a group sum is a BLAS product, whose
  float32 rounding can differ from a plain reduction's (reference.py's GroupNorm sums the plain way).
On CuPy all of this is launches, not arithmetic: `minidiff.kernels.norm_cuda` computes the same function in fused
kernels.
The same math written for reading (NCHW, unfused, no scratch): minidiff.nn.reference.group_norm_forward.
"""

from __future__ import annotations

import functools

from minidiff.backend import get_array_module, is_cupy_module
from minidiff.kernels import norm_cuda as norm_gpu
from minidiff.kernels.channels import channel_sums, tiled, wide_factor
from minidiff.kernels.chunks import batch_chunks
from minidiff.kernels.workspace import constant, scratch


def _maps(like, C, groups, k):
    """Constant 0/1 matrices for C channels in `groups` groups on wide rows of k pixels (per-channel values are
    tiled by `tiled`): R (C, G) sums each group's channels, E1 (G, C) spreads a group's value over its channels,
    E (G, k C) does so tiled k times."""
    def build(xp, dtype):
        chan = xp.arange(k * C) % C                                    # the channel of each wide-row column
        E = (chan[None, :] // (C // groups) == xp.arange(groups)[:, None]).astype(dtype)
        return xp.ascontiguousarray(E[:, :C].T), xp.ascontiguousarray(E[:, :C]), E
    return constant(("group_norm", C, groups, k), like, build)


def _group_means(per_channel_sums, R, count):
    """(N, C) per-channel sums -> (N, G) means over `count` elements per group."""
    return (per_channel_sums @ R) / count


CHUNK_BYTES = 2 << 20   # bytes of images per call of the NumPy path: see group_norm_nhwc_forward


def _by_chunks(xp, x, fn, *per_image):
    """fn(*per_image) on chunks of about CHUNK_BYTES of x's images (None entries stay None), its per-image results
    joined in order; a small x (most calls) goes whole, with no slicing or joining."""
    if x.nbytes <= CHUNK_BYTES:
        return fn(*per_image)
    results = [fn(*(None if a is None else a[lo:hi] for a in per_image))
               for lo, hi in batch_chunks(x.shape[0], -(-x.nbytes // CHUNK_BYTES))]
    return tuple(xp.concatenate(r) for r in zip(*results))


def group_norm_nhwc_forward(x, gamma, beta, groups, eps=1e-5, silu=False, cache=True):
    """GroupNorm (then SiLU if `silu`): x (N, *spatial, C), gamma/beta (C,) -> out like x, cache.

    mean, var = mean and biased variance of each (image, group), two-pass (the variance of x - mean);
    h = x_hat * gamma + beta with x_hat = (x - mean) / sqrt(var + eps); out = h, or h * sigmoid(h) with silu.
    cache=False (a forward that will not be differentiated: sampling, evaluation) skips SiLU's derivative, three
    of the forward's passes, and returns None for the cache.
    Every value is per image, so on NumPy a large x goes a few images at a time (the same function; the last bits
    can depend on the chunk, as the per-image sums are batched matrix products): each chunk's ten-odd passes then
    stay in the cache, and the scratch buffers are a chunk's size (CHUNK_BYTES: the size that steps fastest,
    BENCHMARKS.md).
    """
    xp = get_array_module(x)
    if is_cupy_module(xp):
        return norm_gpu.group_norm_forward(xp, x, gamma, beta, groups, eps, silu, cache)
    out = xp.empty(x.shape, dtype=x.dtype)   # C-contiguous whatever x's layout: the chunks write through reshapes
    dsilu = xp.empty(x.shape, dtype=x.dtype) if silu and cache else None   # 2 SiLU'(h), for the backward
    mean, inv_std = _by_chunks(xp, x, functools.partial(_forward_chunk, xp, gamma, beta, groups, eps, silu),
                               x, out, dsilu)
    return out, ((x, mean, inv_std, gamma, groups, dsilu) if cache else None)


def _forward_chunk(xp, gamma, beta, groups, eps, silu, x, out, dsilu):
    """The forward on images x, into out and dsilu (None: no cache) -> their (n, G) mean and inv_std."""
    N, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(N, -1, C)
    count, k = x3.shape[1] * (C // groups), wide_factor(*x3.shape[1:])
    R, _, E = _maps(x, C, groups, k)
    xw = x3.reshape(N, -1, k * C)                                            # wide rows (see the module doc)
    out, tmp = out.reshape(xw.shape), scratch("gn.tmp", xw.shape, xw)
    mean = _group_means(channel_sums(x3), R, count)                         # (N, G)
    mean_t = mean @ E                                                        # (N, k C), tiled like a wide row
    xp.subtract(xw, mean_t[:, None], out=tmp)
    tmp *= tmp
    inv_std = 1.0 / xp.sqrt(_group_means(channel_sums(tmp.reshape(x3.shape)), R, count) + eps)   # (N, G)
    a = (inv_std @ E) * tiled(gamma, k)                                      # h = x * a + b, a and b (N, k C)
    b = tiled(beta, k) - mean_t * a
    if silu:
        half_h = xp.multiply(xw, (a * 0.5)[:, None], out=tmp)
        half_h += (b * 0.5)[:, None]
        t = xp.tanh(half_h, out=scratch("gn.t", xw.shape, xw))
        if dsilu is None:   # the same two operations as below, so both forwards agree bit for bit
            t *= half_h
            xp.add(half_h, t, out=out)
            return mean, inv_std
        dsilu = dsilu.reshape(xw.shape)
        xp.multiply(half_h, t, out=dsilu)
        xp.add(half_h, dsilu, out=out)                                      # h s = h/2 + (h/2) t
        xp.subtract(half_h, dsilu, out=dsilu)                               # 2 SiLU'(h) = (1 + t)(1 + (h/2)(1 - t))
        dsilu += 1.0
        t += 1.0
        dsilu *= t
    else:
        xp.multiply(xw, a[:, None], out=out)
        out += b[:, None]
    return mean, inv_std


# Let h = x_hat * gamma + beta and dh = dL/dh. With SiLU, out = h s, s = sigmoid(h) = (1 + t) / 2, t = tanh(h/2):
# dh = dout * s (1 + h (1 - s)) = dout * (1 + t)(1 + (h/2)(1 - t)) / 2; the forward stores twice that factor, the
# backward forms q = 2 dh and halves the sums.
# GroupNorm: with g = dh * gamma and M elements per group, dx = inv_std * (g - mean_grp(g) - x_hat * mean_grp(g x_hat)).
# Both group means come from the per-channel sums sum_s dh and sum_s dh * x_hat (which are also dbeta and dgamma),
# and x_hat = (x - mean) * inv_std, so dx = dh * A + x * B + D with per-(image, channel) coefficients
# A = inv_std * gamma, B = -inv_std^2 * mean_grp(g x_hat),
# D = inv_std * (mean * inv_std * mean_grp(g x_hat) - mean_grp(g)).
def group_norm_nhwc_backward(dout, cache):
    """dout like x -> dx, {"weight": dgamma (C,), "bias": dbeta (C,)}. In chunks of images like the forward."""
    x, mean, inv_std, gamma, groups, dsilu = cache
    xp = get_array_module(dout)
    if is_cupy_module(xp):
        return norm_gpu.group_norm_backward(xp, dout, cache)
    dx = xp.empty(dout.shape, dtype=dout.dtype)
    sum_dxhat, sum_d = _by_chunks(xp, x, functools.partial(_backward_chunk, xp, gamma, groups),
                                  dout, x, mean, inv_std, dsilu, dx)
    return dx, {"weight": sum_dxhat.sum(axis=0), "bias": sum_d.sum(axis=0)}   # image sums added as one, in order


def _backward_chunk(xp, gamma, groups, dout, x, mean, inv_std, dsilu, dx):
    """The backward on images x, into dx -> the per-image (n, C) sums of dh * x_hat and dh."""
    N, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(N, -1, C)
    count, k = x3.shape[1] * (C // groups), wide_factor(*x3.shape[1:])
    R, E1, E = _maps(x, C, groups, k)
    xw, dw = x3.reshape(N, -1, k * C), dout.reshape(N, -1, k * C)            # wide rows (see the module doc)
    dx = dx.reshape(xw.shape)
    mean_c, inv_c = mean @ E1, inv_std @ E1                                  # (N, C)
    if dsilu is not None:
        q = xp.multiply(dw, dsilu.reshape(xw.shape), out=dx)                # 2 dh
        half = 0.5
    else:
        q, half = dw, 1.0
    tmp = xp.multiply(q, xw, out=scratch("gn.tmp", xw.shape, xw))
    q3, tmp3 = q.reshape(x3.shape), tmp.reshape(x3.shape)
    sum_d, sum_dx = channel_sums(q3) * half, channel_sums(tmp3) * half     # sum_s dh, sum_s dh * x   (N, C)
    sum_dxhat = (sum_dx - mean_c * sum_d) * inv_c                            # sum_s dh * x_hat
    mean_g = _group_means(sum_d * gamma, R, count)                           # (N, G)
    mean_gx = _group_means(sum_dxhat * gamma, R, count)
    xp.multiply(xw, ((-inv_std * inv_std * mean_gx) @ E)[:, None], out=tmp)        # x * B
    tmp += ((inv_std * (mean * inv_std * mean_gx - mean_g)) @ E)[:, None]           # + D
    xp.multiply(q, tiled(inv_c * gamma * half, k)[:, None], out=dx)                # dh * A (q may be dx itself)
    dx += tmp
    return sum_dxhat, sum_d
