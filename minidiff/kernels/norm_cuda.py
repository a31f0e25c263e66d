"""GroupNorm (+ SiLU) for CuPy: the same function as `minidiff.nn.norm`, in a handful of fused kernels.

Why a second form: `minidiff.nn.norm` is arranged for NumPy on a CPU (group sums as small matrix products with 0/1
matrices, wide rows, scratch buffers), which costs some thirty array operations for a forward and forty for a
backward. On a GPU each operation is a kernel launch that costs the host time (BENCHMARKS.md), and at this model's
sizes those launches, not the arithmetic, set the step's time. Here the elementwise work is one kernel per pass
(normalise + scale + shift + SiLU + SiLU's derivative in the forward, the whole dx in the backward) and the group
statistics are CuPy reductions over the (N, S, G, Cg) view of x, where a group's channels are contiguous.

The equations are `minidiff.nn.norm`'s, written the same way (the folded affine map h = x a + b, SiLU through tanh(h/2),
the stored 2 SiLU'(h), dx = dh A + x B + D; see the comments there); results agree to float32 rounding (the sums run
in another order). The cache has `minidiff.nn.norm`'s layout, so either backward can read it.
"""

from __future__ import annotations

from minidiff.kernels.cuda import elementwise_kernel, reduction_kernel

_AFFINE = "T a = inv_std * gamma; T b = beta - mean * a;"
_HALF_H = _AFFINE + "T hh = x * (a * (T)0.5) + b * (T)0.5; T t = tanh(hh); T ht = hh * t;"
_STATS_IN = "T x, T mean, T inv_std, T gamma, T beta"
_FORWARD = {   # (silu, cache) -> (out_params, body)
    (False, False): ("T out", _AFFINE + "out = x * a + b;"),
    (False, True): ("T out", _AFFINE + "out = x * a + b;"),
    (True, False): ("T out", _HALF_H + "out = hh + ht;"),
    (True, True): ("T out, T dsilu", _HALF_H + "out = hh + ht; dsilu = (hh - ht + (T)1) * (t + (T)1);"),
}


def _per_group(a, N, G):
    """(N, G) -> (N, 1, G, 1), broadcasting against the (N, S, G, Cg) view."""
    return a.reshape(N, 1, G, 1)


def group_norm_forward(xp, x, gamma, beta, groups, eps, silu, cache):
    """As `minidiff.nn.norm.group_norm_nhwc_forward`, on CuPy arrays: 4 launches (mean, the centred sum of squares,
    inv_std, the fused elementwise pass)."""
    N, C = x.shape[0], x.shape[-1]
    x4 = x.reshape(N, -1, groups, C // groups)
    count = x4.shape[1] * x4.shape[3]
    mean = x4.mean(axis=(1, 3))                                                   # (N, G), sum / count in one kernel
    sum_sq = reduction_kernel(xp, "T x, T mean", "T y", "(x - mean) * (x - mean)", "minidiff_gn_centred_sq")(
        x4, _per_group(mean, N, groups), axis=(1, 3))
    inv_std = elementwise_kernel(xp, "T s, T n, T eps", "T inv", "inv = (T)1 / sqrt(s / n + eps)",
                                 "minidiff_gn_inv_std")(sum_sq, x.dtype.type(count), x.dtype.type(eps))
    out_params, body = _FORWARD[(bool(silu), bool(cache))]
    g4, b4 = gamma.reshape(1, 1, groups, -1), beta.reshape(1, 1, groups, -1)
    name = f"minidiff_gn_fwd_{int(silu)}{int(silu and cache)}"   # without SiLU the cache changes nothing here
    outs = elementwise_kernel(xp, _STATS_IN, out_params, body, name)(
        x4, _per_group(mean, N, groups), _per_group(inv_std, N, groups), g4, b4)
    out, dsilu = outs if isinstance(outs, tuple) else (outs, None)
    return out.reshape(x.shape), ((x, mean, inv_std, gamma, groups, dsilu) if cache else None)


def group_norm_backward(xp, dout, cache):
    """As `minidiff.nn.norm.group_norm_nhwc_backward` (see the derivation there), on CuPy arrays: 7 launches. With SiLU,
    2 dh = dout * dsilu is formed inside the kernels that read it, never stored."""
    x, mean, inv_std, gamma, groups, dsilu = cache
    N, C = x.shape[0], x.shape[-1]
    Cg = C // groups
    x3, shape4 = x.reshape(N, -1, C), (N, -1, groups, Cg)
    count = x3.shape[1] * Cg
    d3 = dout.reshape(x3.shape)
    if dsilu is not None:
        s3, half = dsilu.reshape(x3.shape), 0.5
        sum_q = reduction_kernel(xp, "T d, T s", "T y", "d * s", "minidiff_gn_sum_q")(d3, s3, axis=1)
        sum_qx = reduction_kernel(xp, "T d, T s, T x", "T y", "d * s * x", "minidiff_gn_sum_qx")(d3, s3, x3, axis=1)
    else:
        half = 1.0
        sum_q = d3.sum(axis=1)
        sum_qx = reduction_kernel(xp, "T q, T x", "T y", "q * x", "minidiff_sum_product")(d3, x3, axis=1)
    # per (image, channel): sum_s dh, sum_s dh x_hat, both times gamma, and A; then per (image, group): B, D.
    # The four per-channel sums share one buffer, so the group sums and the parameter sums are a reduction each.
    per_channel = xp.empty((4, N, groups, Cg), dtype=x.dtype)
    A = elementwise_kernel(
        xp, "T sum_q, T sum_qx, T mean, T inv, T gamma, T scale", "T sd, T sdxhat, T gd, T gdx, T A",
        "sd = sum_q * scale; sdxhat = (sum_qx * scale - mean * sd) * inv; gd = sd * gamma; gdx = sdxhat * gamma; "
        "A = inv * gamma * scale;", "minidiff_gn_bwd_channels")(
        sum_q.reshape(N, groups, Cg), sum_qx.reshape(N, groups, Cg), mean[:, :, None], inv_std[:, :, None],
        gamma.reshape(groups, Cg), x.dtype.type(half), *per_channel, xp.empty((N, groups, Cg), dtype=x.dtype))[4]
    group_sums = per_channel[2:].sum(axis=3)                                        # (2, N, G): sum gd, sum gdx
    B, D = elementwise_kernel(
        xp, "T inv, T mean, T sum_gx, T sum_g, T n", "T B, T D",
        "T mgx = sum_gx / n; B = -inv * inv * mgx; D = inv * (mean * inv * mgx - sum_g / n);",
        "minidiff_gn_bwd_groups")(inv_std, mean, group_sums[1], group_sums[0], x.dtype.type(count))
    A, B, D = A.reshape(N, 1, groups, Cg), _per_group(B, N, groups), _per_group(D, N, groups)
    if dsilu is not None:
        dx = elementwise_kernel(xp, "T d, T s, T x, T A, T B, T D", "T dx", "dx = d * s * A + (x * B + D)",
                                "minidiff_gn_silu_dx")(d3.reshape(shape4), s3.reshape(shape4), x3.reshape(shape4),
                                                       A, B, D)
    else:
        dx = elementwise_kernel(xp, "T q, T x, T A, T B, T D", "T dx", "dx = q * A + (x * B + D)",
                                "minidiff_gn_dx")(d3.reshape(shape4), x3.reshape(shape4), A, B, D)
    dbeta, dgamma = per_channel[:2].reshape(2, N, C).sum(axis=1)                    # sums over the images
    return dx.reshape(dout.shape), {"weight": dgamma, "bias": dbeta}
