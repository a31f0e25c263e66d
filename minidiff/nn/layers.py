"""Layers as forward/backward pairs (CS231n style), written once for NumPy, CuPy and the strict backend.

`<name>_forward(...) -> (out, cache)` and `<name>_backward(dout, cache) -> (dx, grads)`, where `grads` is a dict keyed
like PyTorch's parameter names ("weight", "bias"; empty for layers without parameters). Backward functions never write
into `dout` (a module may hand the same gradient to two branches); they may return views of arrays they allocated.
Layouts follow PyTorch -- activations NCHW, conv weights OIHW, linear weights (out, in) -- except the `_nhwc` layers:
the UNet computes channels-last (N, H, W, C), where a convolution needs no transposes (minidiff.nn.conv,
minidiff.nn.norm).

Also here: the sinusoidal timestep embedding (host side, no gradient: t is an integer) and the parameter specs that
models use to initialise weights the way PyTorch does.
"""

from __future__ import annotations

import math

import numpy as np

from minidiff.backend import get_array_module
from minidiff.kernels.matmul import matmul
from minidiff.nn.conv import conv2d_nhwc_backward, conv2d_nhwc_forward
from minidiff.nn.norm import group_norm_nhwc_backward, group_norm_nhwc_forward


# --- Conv2d (NCHW) -------------------------------------------------------------------------------------------------
# The convolution itself is channels-last (minidiff.nn.conv: im2col + GEMM, the layout the UNet computes in); these
# NCHW forms transpose at the edges, for callers that hold NCHW arrays (the classifier, tests against PyTorch).

def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """torch.nn.functional.conv2d: x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> out (N, O, Ho, Wo), cache.

    Ho = (H + 2 ph - kh) // stride + 1; padding an int or (ph, pw), zeros. See `conv2d_nhwc_forward`.
    """
    xp = get_array_module(x)
    out, cache = conv2d_nhwc_forward(xp.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, b, stride, padding)
    return xp.ascontiguousarray(out.transpose(0, 3, 1, 2)), cache


def conv2d_backward(dout, cache):
    """dout (N, O, Ho, Wo) -> dx (N, C, H, W), {"weight": (O, C, kh, kw), "bias": (O,)}."""
    xp = get_array_module(dout)
    dx, grads = conv2d_nhwc_backward(xp.ascontiguousarray(dout.transpose(0, 2, 3, 1)), cache)
    return xp.ascontiguousarray(dx.transpose(0, 3, 1, 2)), grads


# --- Linear -----------------------------------------------------------------------------------------------------

def linear_forward(x, w, b=None):
    """x (N, in), w (out, in), b (out,) -> out = x w^T + b, (N, out)."""
    out = matmul(x, w.T)
    if b is not None:
        out += b
    return out, (x, w, b is not None)


# out = x W^T + b: dx = dout W, dW = dout^T x, db = sum over the batch of dout.
def linear_backward(dout, cache):
    """dout (N, out) -> dx (N, in), {"weight": (out, in), "bias": (out,)}."""
    x, w, has_bias = cache
    grads = {"weight": matmul(dout.T, x)}
    if has_bias:
        grads["bias"] = dout.sum(axis=0)
    return matmul(dout, w), grads


# --- GroupNorm (NCHW) ----------------------------------------------------------------------------------------------

def group_norm_forward(x, gamma, beta, groups, eps=1e-5):
    """torch.nn.GroupNorm: x (N, C, *spatial), gamma/beta (C,) -> out like x, cache.

    Each (image, group of C/groups channels) is normalised by its own mean and biased variance, then scaled and
    shifted per channel: out = x_hat * gamma + beta, x_hat = (x - mean) / sqrt(var + eps). Computed channels-last by
    `minidiff.nn.norm.group_norm_nhwc_forward` (the layout the UNet uses); this form moves the channel axis at the
    edges.
    """
    xp = get_array_module(x)
    out, cache = group_norm_nhwc_forward(xp.ascontiguousarray(xp.moveaxis(x, 1, -1)), gamma, beta, groups, eps)
    return xp.ascontiguousarray(xp.moveaxis(out, -1, 1)), cache


def group_norm_backward(dout, cache):
    """dout (N, C, *spatial) -> dx like dout, {"weight": dgamma (C,), "bias": dbeta (C,)}."""
    xp = get_array_module(dout)
    dx, grads = group_norm_nhwc_backward(xp.ascontiguousarray(xp.moveaxis(dout, 1, -1)), cache)
    return xp.ascontiguousarray(xp.moveaxis(dx, -1, 1)), grads


# --- SiLU -------------------------------------------------------------------------------------------------------

def silu_forward(x):
    """SiLU (swish): out = x * sigmoid(x), any shape. sigmoid(x) = (1 + tanh(x/2)) / 2 never overflows."""
    xp = get_array_module(x)
    sig = xp.tanh(x * 0.5)
    sig *= 0.5
    sig += 0.5
    return x * sig, (x, sig)


# d/dx [x s(x)] = s + x s (1 - s) = s (1 + x (1 - s)).
def silu_backward(dout, cache):
    """dout like x -> dx, {}."""
    x, sig = cache
    dx = 1.0 - sig
    dx *= x
    dx += 1.0
    dx *= sig
    dx *= dout
    return dx, {}


# --- nearest 2x upsampling and channel concatenation --------------------------------------------------------------

def upsample2x_nhwc_forward(x):
    """Nearest 2x upsampling, channels-last: (N, H, W, C) -> (N, 2H, 2W, C)."""
    xp = get_array_module(x)
    N, H, W, C = x.shape
    out = xp.empty((N, H, 2, W, 2, C), dtype=x.dtype)
    out[...] = x[:, :, None, :, None, :]
    return out.reshape(N, 2 * H, 2 * W, C), x.shape


def upsample2x_nhwc_backward(dout, cache):
    """dout (N, 2H, 2W, C) -> dx (N, H, W, C) = the sum over each 2x2 block, as three adds of strided views (NumPy
    reduces over two strided axes far more slowly), {}."""
    N, H, W, C = cache
    d = dout.reshape(N, H, 2, W, 2, C)
    dx = d[:, :, 0, :, 0] + d[:, :, 0, :, 1]
    dx += d[:, :, 1, :, 0]
    dx += d[:, :, 1, :, 1]
    return dx, {}


def concat_forward(a, b, axis=1):
    """Concatenate along the channel axis (a UNet skip): axis 1 for NCHW, -1 for channels-last."""
    xp = get_array_module(a, b)
    return xp.concatenate((a, b), axis=axis), (a.shape[axis], axis)


# Concatenation routes values unchanged, so the gradient is split back at the same channel.
def concat_backward(dout, cache):
    """dout (..., Ca + Cb, ...) -> (da, db) (views of dout), {}."""
    ca, axis = cache
    index = [slice(None)] * dout.ndim
    index[axis] = slice(None, ca)
    da = dout[tuple(index)]
    index[axis] = slice(ca, None)
    return (da, dout[tuple(index)]), {}


# --- timestep embedding ------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of integer timesteps, as in DDPM (Ho et al. 2020, `get_timestep_embedding`).

    t: int array (N,), 0-based -> float64 array (N, dim) on t's device:
    emb[:, k] = sin(t * f_k), emb[:, half + k] = cos(t * f_k), f_k = max_period^(-k / (half - 1)), half = dim // 2;
    an odd dim gets a zero last column. Computed in float64 so every dtype sees the same numbers; the caller casts it
    with `backend.asarray(emb, dtype)`. A host t gives the same numbers on every backend; a device t (CuPy) keeps the
    computation on the device, where a CUDA graph can replay it (minidiff.execution.graphs), and may differ from the
    host's in the last bit of float64. No backward: t is not differentiable.
    """
    if dim < 4:
        raise ValueError(f"timestep embedding needs dim >= 4, got {dim}")
    xp = get_array_module(t)
    t = xp.asarray(t)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"t must be an integer array of shape (N,), got {t.dtype} {t.shape}")
    half = dim // 2
    freqs = xp.exp(-math.log(max_period) / (half - 1) * xp.arange(half, dtype=np.float64))
    args = t.astype(np.float64)[:, None] * freqs[None, :]
    emb = xp.concatenate([xp.sin(args), xp.cos(args)], axis=1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros((t.shape[0], 1), dtype=np.float64)], axis=1)
    return emb


# --- parameter specs: PyTorch's default initialisation ----------------------------------------------------------
# A spec maps a parameter suffix to (shape, init) with init ("uniform", bound) | ("ones",) | ("zeros",). Conv and
# Linear weights use kaiming_uniform(a=sqrt(5)), whose bound gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + 5))
# simplifies to 1 / sqrt(fan_in) -- the same bound PyTorch uses for their biases.

def conv2d_params(cin, cout, k, bias=True, zero=False):
    """Spec of an nn.Conv2d(cin, cout, k): weight (cout, cin, k, k), bias (cout,); zero=True for DDPM's output conv."""
    init = ("zeros",) if zero else ("uniform", 1.0 / math.sqrt(cin * k * k))
    spec = {"weight": ((cout, cin, k, k), init)}
    if bias:
        spec["bias"] = ((cout,), init)
    return spec


def linear_params(fin, fout, bias=True, zero=False):
    """Spec of an nn.Linear(fin, fout): weight (fout, fin), bias (fout,)."""
    init = ("zeros",) if zero else ("uniform", 1.0 / math.sqrt(fin))
    spec = {"weight": ((fout, fin), init)}
    if bias:
        spec["bias"] = ((fout,), init)
    return spec


def group_norm_params(channels):
    """Spec of an affine nn.GroupNorm over `channels`: weight (gamma) ones, bias (beta) zeros."""
    return {"weight": ((channels,), ("ones",)), "bias": ((channels,), ("zeros",))}


def init_param(rng, shape, init):
    """One parameter on the host in float64, drawn from `rng` (np.random.Generator) as `init` says."""
    if init[0] == "uniform":
        return rng.uniform(-init[1], init[1], size=shape)
    if init[0] == "ones":
        return np.ones(shape)
    if init[0] == "zeros":
        return np.zeros(shape)
    raise ValueError(f"unknown init {init!r}")


def named_specs(prefix, spec):
    """{"weight": (shape, init), ...} -> [("prefix.weight", shape, init), ...] in order."""
    return [(f"{prefix}.{k}", shape, init) for k, (shape, init) in spec.items()]
