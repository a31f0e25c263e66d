"""Multi-head self-attention over the spatial positions of a feature map, and the DDPM attention block around it."""

from __future__ import annotations

import math

from .backend import get_array_module
from .denoiser import add_grads
from .layers import (conv2d_backward, conv2d_forward, conv2d_params, group_norm_backward, group_norm_forward,
                     group_norm_params, named_specs)


def softmax_forward(s):
    """Softmax over the last axis, any leading shape; the row maximum is subtracted first so exp never overflows."""
    xp = get_array_module(s)
    p = s - s.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p, p


# The Jacobian of a softmax row is diag(p) - p p^T, so ds_i = p_i (dp_i - sum_j p_j dp_j).
def softmax_backward(dp, cache):
    """dp like p -> ds, {}."""
    p = cache
    ds = dp * p
    ds -= p * ds.sum(axis=-1, keepdims=True)
    return ds, {}


def attention_forward(qkv, num_heads):
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with the H*W positions of an image as tokens.

    qkv (N, 3C, H, W): channel blocks [q | k | v], each split into `num_heads` heads of d = C / num_heads channels.
    Per image and head, with q, k, v of shape (d, L), L = H*W: out = v softmax(q^T k / sqrt(d))^T, shape (d, L).
    Returns out (N, C, H, W), heads stacked back along channels, and the cache.
    """
    xp = get_array_module(qkv)
    N, C3, H, W = qkv.shape
    C = C3 // 3
    d = C // num_heads
    qkv = qkv.reshape(N, 3, num_heads, d, H * W)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]            # (N, heads, d, L) views
    scale = 1.0 / math.sqrt(d)
    s = xp.matmul(q.transpose(0, 1, 3, 2), k)             # (N, heads, L, L): s[i, j] = q_i . k_j
    s *= scale
    p, _ = softmax_forward(s)                             # each query position i: weights over key positions j
    out = xp.matmul(v, p.transpose(0, 1, 3, 2))           # out[:, i] = sum_j p[i, j] v[:, j]
    return out.reshape(N, C, H, W), (q, k, v, p, scale)


# With out = v p^T and s = scale q^T k: dv = dout p, dp = dout^T v, ds = softmax backward of dp,
# dq = scale k ds^T, dk = scale q ds -- all batched matmuls over (image, head).
def attention_backward(dout, cache):
    """dout (N, C, H, W) -> dqkv (N, 3C, H, W), {}."""
    q, k, v, p, scale = cache
    xp = get_array_module(dout)
    N, C, H, W = dout.shape
    do = dout.reshape(q.shape)
    dv = xp.matmul(do, p)
    dp = xp.matmul(do.transpose(0, 1, 3, 2), v)
    ds, _ = softmax_backward(dp, p)
    ds *= scale
    dq = xp.matmul(k, ds.transpose(0, 1, 3, 2))
    dk = xp.matmul(q, ds)
    return xp.stack((dq, dk, dv), axis=1).reshape(N, 3 * C, H, W), {}


class AttnBlock:
    """DDPM's attention block: x + proj(attention(qkv(GroupNorm(x)))), qkv and proj 1x1 convs. (N, C, H, W) -> same.

    Parameters under `name`: norm.{weight,bias} (C,), qkv.{weight (3C, C, 1, 1), bias (3C,)},
    proj.{weight (C, C, 1, 1), bias (C,)}.
    """

    def __init__(self, name, channels, groups, num_heads=1):
        if channels % num_heads:
            raise ValueError(f"{name}: {channels} channels do not split into {num_heads} heads")
        self.name, self.channels, self.groups, self.num_heads = name, channels, groups, num_heads

    def param_specs(self):
        c, n = self.channels, self.name
        return (named_specs(f"{n}.norm", group_norm_params(c)) + named_specs(f"{n}.qkv", conv2d_params(c, 3 * c, 1))
                + named_specs(f"{n}.proj", conv2d_params(c, c, 1)))

    def forward(self, p, x, tape):
        n = self.name
        h, c_norm = group_norm_forward(x, p[f"{n}.norm.weight"], p[f"{n}.norm.bias"], self.groups)
        qkv, c_qkv = conv2d_forward(h, p[f"{n}.qkv.weight"], p[f"{n}.qkv.bias"])
        a, c_attn = attention_forward(qkv, self.num_heads)
        out, c_proj = conv2d_forward(a, p[f"{n}.proj.weight"], p[f"{n}.proj.bias"])
        out += x
        tape.append((c_norm, c_qkv, c_attn, c_proj))
        return out

    def backward(self, dout, grads, tape):
        """dout (N, C, H, W) -> dx; parameter gradients are written into `grads`."""
        c_norm, c_qkv, c_attn, c_proj = tape.pop()
        n = self.name
        da, g = conv2d_backward(dout, c_proj)
        add_grads(grads, f"{n}.proj", g)
        dqkv, _ = attention_backward(da, c_attn)
        dh, g = conv2d_backward(dqkv, c_qkv)
        add_grads(grads, f"{n}.qkv", g)
        dx, g = group_norm_backward(dh, c_norm)
        add_grads(grads, f"{n}.norm", g)
        dx += dout  # the residual path
        return dx
