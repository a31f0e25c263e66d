"""Channels-last GroupNorm, optionally fused with the SiLU that follows it in every DDPM block.

x (N, *spatial, C): each image's C channels form `groups` groups of Cg = C / groups consecutive channels, normalised
over (spatial, Cg) as torch.nn.GroupNorm does. Written for speed on NumPy without losing the reference form:
- per-(image, channel) sums are one batched matrix-vector product (`channel_sums`), an order of magnitude faster in
  NumPy than a reduction over a strided axis;
- normalise, scale and shift fold into one multiply and one add with per-(image, channel) coefficients a, b:
  h = x_hat * gamma + beta = x * a + b, a = inv_std * gamma, b = beta - mean * a;
- SiLU is written as h * sigmoid(h) = h/2 + (h/2) tanh(h/2) (sigmoid = (1 + tanh(h/2)) / 2 never overflows), and
  h/2 comes straight out of the folded affine map with a/2, b/2;
- fused with SiLU, the cache is the input x (alive anyway: it is the block's input), two (N, groups) arrays and
  SiLU's derivative at h, formed in the forward from the h/2 and tanh(h/2) it has at hand (PyTorch keeps h instead:
  the same memory, but its backward must recompute the sigmoid); the backward never recomputes a tanh;
- temporaries live in reused scratch buffers (minidiff.workspace); only the output is a new array.
- the per-(image, channel) coefficients are applied on "wide rows": x (N, S, C) seen as (N, S / k, k C) with the
  coefficients tiled k times, so NumPy's inner loop runs over k C elements instead of C (a broadcast over 16
  channels runs ~3x slower per element than a flat loop; see `_wide`).
"""

from __future__ import annotations

import functools

from .backend import get_array_module
from .workspace import ones_row, scratch


def channel_sums(a):
    """a (N, S, C) -> (N, C), sums over S as a batched matrix-vector product (far faster in NumPy than
    a.sum(axis=1), a reduction over a strided axis). Also the conv bias gradient and the UNet's timestep gradient."""
    xp = get_array_module(a)
    return xp.matmul(ones_row(a.shape[1], a), a).reshape(a.shape[0], a.shape[2])


WIDE = 128   # target inner-loop length (elements) of the broadcast products; tests lower it to exercise 1 < k < S


def _wide(x3):
    """k = the largest divisor of S with k * C <= WIDE (at least 1), for x3 (N, S, C) seen as (N, S / k, k * C)."""
    return _wide_factor(x3.shape[1], x3.shape[2], WIDE)


@functools.lru_cache(maxsize=None)
def _wide_factor(S, C, wide):
    return max(k for k in range(1, S + 1) if S % k == 0 and (k * C <= wide or k == 1))


def _per_channel(v, cg, k):
    """(N, G) per-group values -> (N, 1, k * G * cg): each repeated over its group's channels, then tiled k times."""
    xp = get_array_module(v)
    return _tiled(xp.repeat(v, cg, axis=1), k)


def _tiled(v, k):
    """(N, C) per-channel values -> (N, 1, k * C), matching a wide row of k pixels."""
    xp = get_array_module(v)
    return (xp.concatenate([v] * k, axis=1) if k > 1 else v)[:, None, :]


def _group_means(per_channel_sums, groups, count):
    """(N, C) per-channel sums -> (N, groups) means over `count` elements per group."""
    N, C = per_channel_sums.shape
    return per_channel_sums.reshape(N, groups, C // groups).sum(axis=2) / count


def group_norm_nhwc_forward(x, gamma, beta, groups, eps=1e-5, silu=False, cache=True):
    """GroupNorm (then SiLU if `silu`): x (N, *spatial, C), gamma/beta (C,) -> out like x, cache.

    mean, var = mean and biased variance of each (image, group), two-pass (the variance of x - mean);
    h = x_hat * gamma + beta with x_hat = (x - mean) / sqrt(var + eps); out = h, or h * sigmoid(h) with silu.
    cache=False (a forward that will not be differentiated: sampling, evaluation) skips SiLU's derivative, three
    of the forward's passes, and returns None for the cache.
    """
    xp = get_array_module(x)
    N, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(N, -1, C)
    cg, count, k = C // groups, x3.shape[1] * (C // groups), _wide(x3)
    xw = x3.reshape(N, -1, k * C)                                            # wide rows (see the module doc)
    out = xp.empty_like(xw)
    dsilu = xp.empty_like(xw) if silu and cache else None   # 2 SiLU'(h), for the backward
    tmp = scratch("gn.tmp", xw.shape, xw)
    mean = _group_means(channel_sums(x3), groups, count)                    # (N, G)
    mean_c = xp.repeat(mean, cg, axis=1)                                     # (N, C)
    xp.subtract(xw, _tiled(mean_c, k), out=tmp)
    tmp *= tmp
    inv_std = 1.0 / xp.sqrt(_group_means(channel_sums(tmp.reshape(x3.shape)), groups, count) + eps)   # (N, G)
    a = xp.repeat(inv_std, cg, axis=1) * gamma                               # h = x * a + b, a and b (N, C)
    b = beta - mean_c * a
    if silu:
        half_h = xp.multiply(xw, _tiled(a * 0.5, k), out=tmp)
        half_h += _tiled(b * 0.5, k)
        t = xp.tanh(half_h, out=scratch("gn.t", xw.shape, xw))
        if not cache:   # the same two operations as below, so both forwards agree bit for bit
            t *= half_h
            return xp.add(half_h, t, out=out).reshape(x.shape), None
        xp.multiply(half_h, t, out=dsilu)
        xp.add(half_h, dsilu, out=out)                                      # h s = h/2 + (h/2) t
        xp.subtract(half_h, dsilu, out=dsilu)                               # 2 SiLU'(h) = (1 + t)(1 + (h/2)(1 - t))
        dsilu += 1.0
        t += 1.0
        dsilu *= t
    else:
        xp.multiply(xw, _tiled(a, k), out=out)
        out += _tiled(b, k)
    return out.reshape(x.shape), ((x, mean, inv_std, gamma, groups, dsilu) if cache else None)


# Let h = x_hat * gamma + beta and dh = dL/dh. With SiLU, out = h s, s = sigmoid(h) = (1 + t) / 2, t = tanh(h/2):
# dh = dout * s (1 + h (1 - s)) = dout * (1 + t)(1 + (h/2)(1 - t)) / 2; the forward stores twice that factor, the
# backward forms q = 2 dh and halves the sums.
# GroupNorm: with g = dh * gamma and M elements per group, dx = inv_std * (g - mean_grp(g) - x_hat * mean_grp(g x_hat)).
# Both group means come from the per-channel sums sum_s dh and sum_s dh * x_hat (which are also dbeta and dgamma),
# and x_hat = (x - mean) * inv_std, so dx = dh * A + x * B + D with per-(image, channel) coefficients
# A = inv_std * gamma, B = -inv_std^2 * mean_grp(g x_hat),
# D = inv_std * (mean * inv_std * mean_grp(g x_hat) - mean_grp(g)).
def group_norm_nhwc_backward(dout, cache):
    """dout like x -> dx, {"weight": dgamma (C,), "bias": dbeta (C,)}."""
    x, mean, inv_std, gamma, groups, dsilu = cache
    xp = get_array_module(dout)
    N, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(N, -1, C)
    cg, count, k = C // groups, x3.shape[1] * (C // groups), _wide(x3)
    xw, dw = x3.reshape(N, -1, k * C), dout.reshape(N, -1, k * C)            # wide rows (see the module doc)
    dx = xp.empty_like(xw)
    mean_c, inv_c = xp.repeat(mean, cg, axis=1), xp.repeat(inv_std, cg, axis=1)   # (N, C)
    if dsilu is not None:
        q = xp.multiply(dw, dsilu.reshape(xw.shape), out=dx)                # 2 dh
        half = 0.5
    else:
        q, half = dw, 1.0
    tmp = xp.multiply(q, xw, out=scratch("gn.tmp", xw.shape, xw))
    q3, tmp3 = q.reshape(x3.shape), tmp.reshape(x3.shape)
    sum_d, sum_dx = channel_sums(q3) * half, channel_sums(tmp3) * half     # sum_s dh, sum_s dh * x   (N, C)
    sum_dxhat = (sum_dx - mean_c * sum_d) * inv_c                            # sum_s dh * x_hat
    mean_g = _group_means(sum_d * gamma, groups, count)                      # (N, G)
    mean_gx = _group_means(sum_dxhat * gamma, groups, count)
    xp.multiply(xw, _per_channel(-inv_std * inv_std * mean_gx, cg, k), out=tmp)   # x * B
    tmp += _per_channel(inv_std * (mean * inv_std * mean_gx - mean_g), cg, k)     # + D
    xp.multiply(q, _tiled(inv_c * gamma * half, k), out=dx)                        # dh * A (q may be dx itself)
    dx += tmp
    return dx.reshape(dout.shape), {"weight": sum_dxhat.sum(axis=0), "bias": sum_d.sum(axis=0)}
