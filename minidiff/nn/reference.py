"""The fast layers' math written for reading: convolution, GroupNorm (+ SiLU) and multi-head attention, NCHW.

CS231n ships a naive `layers.py` beside `fast_layers.py` and tests one against the other; this module is the naive
one. The UNet runs minidiff.nn.conv (channels-last im2col + GEMM over chunks of the batch), minidiff.nn.norm
(GroupNorm fused with SiLU on wide rows, scratch buffers) and minidiff.nn.attention (channels-last heads); each
function here computes the same function as its twin, named in its docstring, with nothing but NumPy, einsum and a
loop over the kernel offsets: no im2col, no scratch buffers, no chunks. Nothing imports this module at run time;
tests/nn/test_reference_layers.py holds it to the fast layers, to central finite differences and to PyTorch.

Pairs follow minidiff.nn.layers: `<name>_forward(...) -> (out, cache)`, `<name>_backward(dout, cache) ->
(dx, grads)`, grads keyed like PyTorch's parameters. Layouts are PyTorch's: activations (N, C, H, W), conv
weights (O, C, kh, kw).
"""

from __future__ import annotations

import math

import numpy as np


# --- Conv2d -------------------------------------------------------------------------------------------------------

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _tap(a, i, j, stride, Ho, Wo):
    """The (N, C, Ho, Wo) view of a padded (N, C, Hp, Wp) array that kernel offset (i, j) sees: a[..., i + stride*y,
    j + stride*x] for output pixel (y, x)."""
    return a[:, :, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """Cross-correlation as torch.nn.functional.conv2d. Twin: minidiff.nn.conv.conv2d_nhwc_forward (channels-last).

    x (N, C, H, W), w (O, C, kh, kw), b (O,) or None, padding an int or (ph, pw) of zeros
    -> out (N, O, Ho, Wo), Ho = (H + 2 ph - kh) // stride + 1, Wo likewise, and the cache.

        out[n, o, y, x] = b[o] + sum_{c, i, j} w[o, c, i, j] * xpad[n, c, stride*y + i, stride*x + j]

    written as one sum over the kh*kw kernel offsets, each a channel-mixing product of a strided view.
    """
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    ph, pw = _pair(padding)
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho, Wo = (H + 2 * ph - kh) // stride + 1, (W + 2 * pw - kw) // stride + 1
    out = np.zeros((N, O, Ho, Wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("oc,nchw->nohw", w[:, :, i, j], _tap(xpad, i, j, stride, Ho, Wo))
    if b is not None:
        out += b[None, :, None, None]
    return out, (xpad, w, b is not None, stride, (ph, pw))


# Each kernel offset (i, j) contributes out += w[:, :, i, j] . xpad_ij, with xpad_ij the strided view it reads. So
# dw[:, :, i, j] = sum_{n, y, x} dout xpad_ij^T, and dxpad_ij += w[:, :, i, j]^T . dout: the gradient flows back to
# the very pixels each offset read (where views of two offsets overlap, both add). dx is dxpad without its border;
# db[o] = sum_{n, y, x} dout[n, o, y, x].
def conv2d_backward(dout, cache):
    """dout (N, O, Ho, Wo) -> dx (N, C, H, W), {"weight": (O, C, kh, kw), "bias": (O,)} ("bias" only with a bias).

    Twin: minidiff.nn.conv.conv2d_nhwc_backward."""
    xpad, w, has_bias, stride, (ph, pw) = cache
    _, _, Ho, Wo = dout.shape
    _, _, kh, kw = w.shape
    dxpad = np.zeros_like(xpad)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dout, _tap(xpad, i, j, stride, Ho, Wo))
            _tap(dxpad, i, j, stride, Ho, Wo)[...] += np.einsum("oc,nohw->nchw", w[:, :, i, j], dout)
    Hp, Wp = xpad.shape[2:]
    grads = {"weight": dw}
    if has_bias:
        grads["bias"] = dout.sum(axis=(0, 2, 3))
    return dxpad[:, :, ph:Hp - ph, pw:Wp - pw], grads


# --- GroupNorm, optionally followed by SiLU -----------------------------------------------------------------------

def _per_channel(v, ndim):
    """(C,) -> (1, C, 1, ..., 1), to broadcast over an (N, C, *spatial) array of `ndim` dimensions."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def group_norm_forward(x, gamma, beta, groups, eps=1e-5, silu=False):
    """torch.nn.GroupNorm, then SiLU if `silu`. Twin: minidiff.nn.norm.group_norm_nhwc_forward (fused, channels-last).

    x (N, C, *spatial), gamma/beta (C,) -> out like x, cache. Group g of an image holds the C/groups consecutive
    channels g*C/groups, ..., (g+1)*C/groups - 1 at every position: its M = (C/groups) * prod(spatial) values share
        mean = sum x / M,   var = sum (x - mean)^2 / M  (biased),   x_hat = (x - mean) / sqrt(var + eps),
    then h = gamma[c] * x_hat + beta[c]; out = h, or out = h * sigmoid(h) with silu.
    """
    N, C = x.shape[:2]
    xg = x.reshape(N, groups, -1)                          # (N, G, M): one row per (image, group)
    mean = xg.mean(axis=2, keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=2, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)                     # (N, G, 1)
    x_hat = ((xg - mean) * inv_std).reshape(x.shape)
    h = x_hat * _per_channel(gamma, x.ndim) + _per_channel(beta, x.ndim)
    if not silu:
        return h, (x_hat, inv_std, gamma, groups, None)
    sig = 0.5 * (1.0 + np.tanh(0.5 * h))                  # sigmoid(h), in a form that never overflows
    return h * sig, (x_hat, inv_std, gamma, groups, (h, sig))


# SiLU first: d/dh [h s(h)] = s + h s (1 - s), so dh = dout * s (1 + h (1 - s)).
# Then per channel: dgamma = sum over (n, spatial) of dh * x_hat, dbeta = sum of dh. Into the normalisation, with
# g = dh * gamma: x_hat_j = (x_j - mean) r, r = (var + eps)^(-1/2), d mean/d x_i = 1/M, d var/d x_i = 2 (x_i - mean)/M,
# so d x_hat_j / d x_i = r (delta_ij - 1/M - x_hat_i x_hat_j / M) and, summed against g over the group,
#     dx = r * (g - mean(g) - x_hat * mean(g * x_hat)),   means over the group's M values.
def group_norm_backward(dout, cache):
    """dout like x -> dx, {"weight": dgamma (C,), "bias": dbeta (C,)}.

    Twin: minidiff.nn.norm.group_norm_nhwc_backward."""
    x_hat, inv_std, gamma, groups, silu_cache = cache
    dh = dout
    if silu_cache is not None:
        h, sig = silu_cache
        dh = dout * sig * (1.0 + h * (1.0 - sig))
    N = dout.shape[0]
    other_axes = (0,) + tuple(range(2, dout.ndim))
    grads = {"weight": (dh * x_hat).sum(axis=other_axes), "bias": dh.sum(axis=other_axes)}
    g = (dh * _per_channel(gamma, dout.ndim)).reshape(N, groups, -1)
    xh = x_hat.reshape(N, groups, -1)
    dx = inv_std * (g - g.mean(axis=2, keepdims=True) - xh * (g * xh).mean(axis=2, keepdims=True))
    return dx.reshape(dout.shape), grads


# --- multi-head self-attention over the positions of a feature map ------------------------------------------------

def _split_heads(a, num_heads):
    """(N, C, H, W) -> (N, heads, d, L), d = C / heads, L = H*W: head h owns channels h*d, ..., (h+1)*d - 1 and each
    position (y, x) is token y*W + x."""
    N, C, H, W = a.shape
    return a.reshape(N, num_heads, C // num_heads, H * W)


def attention_forward(qkv, num_heads):
    """Scaled dot-product attention over the H*W positions. Twin: minidiff.nn.attention.attention_forward (NHWC).

    qkv (N, 3C, H, W): channels [0, C) are the queries, [C, 2C) the keys, [2C, 3C) the values; each block splits into
    `num_heads` heads of d = C / num_heads consecutive channels. Per image and head, tokens i, j over the L = H*W
    positions:
        s[i, j] = q_i . k_j / sqrt(d),   p[i, :] = softmax(s[i, :]),   out_i = sum_j p[i, j] v_j,
    and the heads' outputs sit side by side in channels: out (N, C, H, W), and the cache.
    """
    N, C3, H, W = qkv.shape
    C = C3 // 3
    q, k, v = (_split_heads(qkv[:, n * C:(n + 1) * C], num_heads) for n in range(3))   # (N, heads, d, L)
    scale = 1.0 / math.sqrt(C // num_heads)
    s = scale * np.einsum("nhdi,nhdj->nhij", q, k)         # (N, heads, L, L)
    p = np.exp(s - s.max(axis=3, keepdims=True))           # the row maximum out first: exp never overflows
    p /= p.sum(axis=3, keepdims=True)
    out = np.einsum("nhij,nhdj->nhdi", p, v)               # (N, heads, d, L)
    return out.reshape(N, C, H, W), (q, k, v, p, scale)


# out_i = sum_j p_ij v_j gives dv_j = sum_i p_ij dout_i and dp_ij = dout_i . v_j. A softmax row has Jacobian
# diag(p) - p p^T, so ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij'). With s_ij = scale q_i . k_j:
# dq_i = scale sum_j ds_ij k_j and dk_j = scale sum_i ds_ij q_i.
def attention_backward(dout, cache):
    """dout (N, C, H, W) -> dqkv (N, 3C, H, W) in qkv's [q | k | v] blocks, {}.

    Twin: minidiff.nn.attention.attention_backward."""
    q, k, v, p, scale = cache
    N, C, H, W = dout.shape
    do = _split_heads(dout, q.shape[1])
    dv = np.einsum("nhij,nhdi->nhdj", p, do)
    dp = np.einsum("nhdi,nhdj->nhij", do, v)
    ds = p * (dp - (p * dp).sum(axis=3, keepdims=True))
    dq = scale * np.einsum("nhij,nhdj->nhdi", ds, k)
    dk = scale * np.einsum("nhij,nhdi->nhdj", ds, q)
    return np.concatenate([a.reshape(N, C, H, W) for a in (dq, dk, dv)], axis=1), {}
