"""Multi-head self-attention over the spatial positions of a feature map, and the DDPM attention block around it.

Channels-last like the rest of the UNet: a feature map (N, H, W, C) is a sequence of L = H*W tokens of C channels,
so q, k and v are strided views of the qkv projection and every product is a batched matmul over (image, head).
The same math written for reading (NCHW, einsum): minidiff.nn.reference.attention_forward.
"""

from __future__ import annotations

import math

from minidiff.backend import get_array_module
from minidiff.kernels.matmul import matmul
from minidiff.nn.conv import conv2d_nhwc_backward, conv2d_nhwc_forward
from minidiff.nn.tape import add_grads
from minidiff.nn.layers import conv2d_params, group_norm_params, named_specs
from minidiff.nn.norm import group_norm_nhwc_backward, group_norm_nhwc_forward


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


def _heads(a, num_heads):
    """(N, L, C) tokens -> (N, heads, L, d) view, d = C / heads."""
    N, L, C = a.shape
    return a.reshape(N, L, num_heads, C // num_heads).transpose(0, 2, 1, 3)


def attention_forward(qkv, num_heads):
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with the H*W positions of an image as tokens.

    qkv (N, H, W, 3C): channel blocks [q | k | v], each split into `num_heads` heads of d = C / num_heads channels.
    Per image and head, with q, k, v of shape (L, d), L = H*W: out = softmax(q k^T / sqrt(d)) v, shape (L, d).
    Returns out (N, H, W, C), heads side by side along channels, and the cache.
    """
    xp = get_array_module(qkv)
    N, H, W, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    tokens = qkv.reshape(N, H * W, C3)
    q, k, v = (_heads(tokens[:, :, i * C:(i + 1) * C], num_heads) for i in range(3))   # (N, heads, L, d) views
    scale = 1.0 / math.sqrt(d)
    s = matmul(q, k.transpose(0, 1, 3, 2))               # (N, heads, L, L): s[i, j] = q_i . k_j
    s *= scale
    p, _ = softmax_forward(s)                             # each query position i: weights over key positions j
    out = xp.empty((N, H * W, C), dtype=qkv.dtype)
    _heads(out, num_heads)[...] = matmul(p, v)            # out_i = sum_j p[i, j] v_j, heads side by side
    return out.reshape(N, H, W, C), (q, k, v, p, scale)


# With out = p v and s = scale q k^T: dv = p^T dout, dp = dout v^T, ds = softmax backward of dp,
# dq = scale ds k, dk = scale ds^T q -- all batched matmuls over (image, head), written into their qkv channels.
def attention_backward(dout, cache):
    """dout (N, H, W, C) -> dqkv (N, H, W, 3C), {}."""
    q, k, v, p, scale = cache
    xp = get_array_module(dout)
    N, H, W, C = dout.shape
    heads = q.shape[1]
    do = _heads(dout.reshape(N, H * W, C), heads)
    dqkv = xp.empty((N, H * W, 3 * C), dtype=dout.dtype)
    dq, dk, dv = (_heads(dqkv[:, :, i * C:(i + 1) * C], heads) for i in range(3))   # views into dqkv
    dv[...] = matmul(p.transpose(0, 1, 3, 2), do)
    ds, _ = softmax_backward(matmul(do, v.transpose(0, 1, 3, 2)), p)
    ds *= scale
    dq[...] = matmul(ds, k)
    dk[...] = matmul(ds.transpose(0, 1, 3, 2), q)
    return dqkv.reshape(N, H, W, 3 * C), {}


class AttnBlock:
    """DDPM's attention block: x + proj(attention(qkv(GroupNorm(x)))), qkv and proj 1x1 convs.

    Channels-last: (N, H, W, C) -> same. Parameters under `name`: norm.{weight,bias} (C,),
    qkv.{weight (3C, C, 1, 1), bias (3C,)}, proj.{weight (C, C, 1, 1), bias (C,)}.
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
        h, c_norm = group_norm_nhwc_forward(x, p[f"{n}.norm.weight"], p[f"{n}.norm.bias"], self.groups)
        qkv, c_qkv = conv2d_nhwc_forward(h, p[f"{n}.qkv.weight"], p[f"{n}.qkv.bias"])
        a, c_attn = attention_forward(qkv, self.num_heads)
        out, c_proj = conv2d_nhwc_forward(a, p[f"{n}.proj.weight"], p[f"{n}.proj.bias"])
        out += x
        tape.append((c_norm, c_qkv, c_attn, c_proj))
        return out

    def backward(self, dout, grads, tape):
        """dout (N, H, W, C) -> dx; parameter gradients are written into `grads`."""
        c_norm, c_qkv, c_attn, c_proj = tape.pop()
        n = self.name
        da, g = conv2d_nhwc_backward(dout, c_proj)
        add_grads(grads, f"{n}.proj", g)
        dqkv, _ = attention_backward(da, c_attn)
        dh, g = conv2d_nhwc_backward(dqkv, c_qkv)
        add_grads(grads, f"{n}.qkv", g)
        dx, g = group_norm_nhwc_backward(dh, c_norm)
        add_grads(grads, f"{n}.norm", g)
        dx += dout  # the residual path
        return dx
