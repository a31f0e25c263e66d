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
"""

from __future__ import annotations

from .backend import get_array_module
from .workspace import scratch


def channel_sums(a):
    """a (N, S, C) -> (N, C), sums over S as a batched matrix-vector product."""
    xp = get_array_module(a)
    return xp.matmul(xp.ones((1, a.shape[1]), dtype=a.dtype), a).reshape(a.shape[0], a.shape[2])


def _per_channel(v, cg):
    """(N, G) per-group values -> (N, 1, G * cg), each repeated over its group's channels (broadcasts over S)."""
    xp = get_array_module(v)
    return xp.repeat(v, cg, axis=1)[:, None, :]


def _group_means(per_channel_sums, groups, count):
    """(N, C) per-channel sums -> (N, groups) means over `count` elements per group."""
    N, C = per_channel_sums.shape
    return per_channel_sums.reshape(N, groups, C // groups).sum(axis=2) / count


def group_norm_nhwc_forward(x, gamma, beta, groups, eps=1e-5, silu=False):
    """GroupNorm (then SiLU if `silu`): x (N, *spatial, C), gamma/beta (C,) -> out like x, cache.

    mean, var = mean and biased variance of each (image, group), two-pass (the variance of x - mean);
    h = x_hat * gamma + beta with x_hat = (x - mean) / sqrt(var + eps); out = h, or h * sigmoid(h) with silu.
    """
    xp = get_array_module(x)
    N, C = x.shape[0], x.shape[-1]
    x3 = x.reshape(N, -1, C)
    cg, count = C // groups, x3.shape[1] * (C // groups)
    out = xp.empty_like(x3)
    dsilu = xp.empty_like(x3) if silu else None   # 2 SiLU'(h), for the backward
    tmp = scratch("gn.tmp", x3.shape, x3)
    mean = _group_means(channel_sums(x3), groups, count)                    # (N, G)
    xp.subtract(x3, _per_channel(mean, cg), out=tmp)
    tmp *= tmp
    inv_std = 1.0 / xp.sqrt(_group_means(channel_sums(tmp), groups, count) + eps)   # (N, G)
    a = _per_channel(inv_std, cg) * gamma                                   # h = x * a + b
    b = beta - _per_channel(mean, cg) * a
    if silu:
        half_h = xp.multiply(x3, a * 0.5, out=tmp)
        half_h += b * 0.5
        t = xp.tanh(half_h, out=scratch("gn.t", x3.shape, x3))
        xp.multiply(half_h, t, out=dsilu)
        xp.add(half_h, dsilu, out=out)                                      # h s = h/2 + (h/2) t
        xp.subtract(half_h, dsilu, out=dsilu)                               # 2 SiLU'(h) = (1 + t)(1 + (h/2)(1 - t))
        dsilu += 1.0
        t += 1.0
        dsilu *= t
    else:
        xp.multiply(x3, a, out=out)
        out += b
    return out.reshape(x.shape), (x, mean, inv_std, gamma, groups, dsilu)


# Let h = x_hat * gamma + beta and dh = dL/dh. With SiLU, out = h s, s = sigmoid(h) = (1 + t) / 2, t = tanh(h/2):
# dh = dout * s (1 + h (1 - s)) = dout * (1 + t)(1 + (h/2)(1 - t)) / 2; the forward stores twice that factor, the
# backward forms q = 2 dh and halves the sums.
# GroupNorm: with g = dh * gamma and M elements per group, dx = inv_std * (g - mean_grp(g) - x_hat * mean_grp(g x_hat)).
# Both group means come from the per-channel sums sum_s dh and sum_s dh * x_hat (which are also dbeta and dgamma),
# and x_hat = (x - mean) * inv_std, so dx = dh * A + x * B + D with per-(image, channel) coefficients
# A = inv_std * gamma, B = -inv_std^2 * mean_grp(g x_hat), D = inv_std * (mean * inv_std * mean_grp(g x_hat) - mean_grp(g)).
def group_norm_nhwc_backward(dout, cache):
    """dout like x -> dx, {"weight": dgamma (C,), "bias": dbeta (C,)}."""
    x, mean, inv_std, gamma, groups, dsilu = cache
    xp = get_array_module(dout)
    N, C = x.shape[0], x.shape[-1]
    x3, d3 = x.reshape(N, -1, C), dout.reshape(N, -1, C)
    cg, count = C // groups, x3.shape[1] * (C // groups)
    dx = xp.empty_like(x3)
    mean_c, inv_c = _per_channel(mean, cg), _per_channel(inv_std, cg)        # (N, 1, C)
    a = inv_c * gamma
    if dsilu is not None:
        q = xp.multiply(d3, dsilu, out=dx)                                   # 2 dh
        half = 0.5
    else:
        q, half = d3, 1.0
    tmp = xp.multiply(q, x3, out=scratch("gn.tmp", x3.shape, x3))
    sum_d, sum_dx = channel_sums(q) * half, channel_sums(tmp) * half       # sum_s dh, sum_s dh * x   (N, C)
    sum_dxhat = (sum_dx - mean_c[:, 0] * sum_d) * inv_c[:, 0]                # sum_s dh * x_hat
    mean_g = _group_means(sum_d * gamma, groups, count)                      # (N, G)
    mean_gx = _group_means(sum_dxhat * gamma, groups, count)
    xp.multiply(x3, _per_channel(-inv_std * inv_std * mean_gx, cg), out=tmp)   # x * B
    tmp += _per_channel(inv_std * (mean * inv_std * mean_gx - mean_g), cg)     # + D
    xp.multiply(q, a * half, out=dx)                                           # dh * A (q may be dx itself)
    dx += tmp
    return dx.reshape(dout.shape), {"weight": sum_dxhat.sum(axis=0), "bias": sum_d.sum(axis=0)}
