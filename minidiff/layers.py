"""Layers as forward/backward pairs (CS231n style), written once for NumPy, CuPy and the strict backend.

`<name>_forward(...) -> (out, cache)` and `<name>_backward(dout, cache) -> (dx, grads)`, where `grads` is a dict keyed
like PyTorch's parameter names ("weight", "bias"; empty for layers without parameters). Backward functions never write
into `dout` (a module may hand the same gradient to two branches); they may return views of arrays they allocated.
Layouts follow PyTorch: activations NCHW, conv weights OIHW, linear weights (out, in).

Also here: the sinusoidal timestep embedding (host side, no gradient: t is an integer) and the parameter specs that
models use to initialise weights the way PyTorch does.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module


# --- Conv2d -----------------------------------------------------------------------------------------------------

def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """Cross-correlation as in torch.nn.functional.conv2d, through one matrix product (im2col).

    x (N, C, H, W), w (O, C, kh, kw), b (O,) or None -> out (N, O, Ho, Wo), Ho = (H + 2 ph - kh) // stride + 1;
    padding is an int or (ph, pw), zeros.
    The column matrix has rows (n, ho, wo) and columns (i, j, c), so out = cols @ w2^T with w2 = w in (O, kh, kw, C)
    order is a single GEMM. It is built channels-last, by one strided slice copy per kernel offset (kh*kw copies,
    never a loop over pixels or images), so every copy moves runs of C contiguous values rather than runs of Wo.
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    Ho, Wo = (H + 2 * ph - kh) // stride + 1, (W + 2 * pw - kw) // stride + 1
    xpad = (xp.zeros if ph or pw else xp.empty)((N, H + 2 * ph, W + 2 * pw, C), dtype=x.dtype)
    xpad[:, ph:ph + H, pw:pw + W] = x.transpose(0, 2, 3, 1)
    if kh == kw == 1 and stride == 1 and ph == pw == 0:
        cols = xpad.reshape(N * H * W, C)
    else:
        cols = xp.empty((N, Ho, Wo, kh, kw, C), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, :, i, j] = xpad[:, i:i + stride * Ho:stride, j:j + stride * Wo:stride]
        cols = cols.reshape(N * Ho * Wo, kh * kw * C)
    w2 = w.transpose(0, 2, 3, 1).reshape(O, kh * kw * C)
    out = xp.matmul(cols, w2.T)
    if b is not None:
        out += b
    out = xp.ascontiguousarray(out.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2))
    return out, (x.shape, w.shape, w2, b is not None, stride, (ph, pw), cols)


# out2 = cols @ w2^T with out2 = dout as (N*Ho*Wo, O): dw2 = dout2^T @ cols (the forward's cols reused), db = column
# sums. dx: for stride 1 it is the "full" convolution of dout (padded by k - 1 - p) with the kernel flipped in space
# and transposed to (C, O, kh, kw) -- one more im2col + GEMM, cheaper than scattering. Otherwise dcols = dout2 @ w2
# and col2im adds each kernel offset's slice back onto the input pixels it was copied from, then cuts the padding.
def conv2d_backward(dout, cache):
    """dout (N, O, Ho, Wo) -> dx (N, C, H, W), {"weight": (O, C, kh, kw), "bias": (O,)}."""
    (N, C, H, W), w_shape, w2, has_bias, stride, (ph, pw), cols = cache
    xp = get_array_module(dout)
    O, _, kh, kw = w_shape
    Ho, Wo = dout.shape[2], dout.shape[3]
    dout2 = xp.ascontiguousarray(dout.transpose(0, 2, 3, 1)).reshape(N * Ho * Wo, O)
    dw2 = xp.matmul(dout2.T, cols)
    grads = {"weight": xp.ascontiguousarray(dw2.reshape(O, kh, kw, C).transpose(0, 3, 1, 2))}
    if has_bias:
        grads["bias"] = dout2.sum(axis=0)
    if stride == 1 and (kh > 1 or kw > 1 or ph or pw) and ph < kh and pw < kw:
        w_flip = xp.ascontiguousarray(w2.reshape(O, kh, kw, C)[:, ::-1, ::-1].transpose(3, 0, 1, 2))
        return conv2d_forward(dout, w_flip, None, 1, (kh - 1 - ph, kw - 1 - pw))[0], grads
    dcols = xp.matmul(dout2, w2)
    if kh == kw == 1 and stride == 1 and ph == pw == 0:
        dx = dcols.reshape(N, H, W, C)
    else:
        dcols = dcols.reshape(N, Ho, Wo, kh, kw, C)
        dxpad = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=dout.dtype)
        for i in range(kh):
            for j in range(kw):
                dxpad[:, i:i + stride * Ho:stride, j:j + stride * Wo:stride] += dcols[:, :, :, i, j]
        dx = dxpad[:, ph:ph + H, pw:pw + W]
    return xp.ascontiguousarray(dx.transpose(0, 3, 1, 2)), grads


# --- Linear -----------------------------------------------------------------------------------------------------

def linear_forward(x, w, b=None):
    """x (N, in), w (out, in), b (out,) -> out = x w^T + b, (N, out)."""
    out = x @ w.T
    if b is not None:
        out += b
    return out, (x, w, b is not None)


# out = x W^T + b: dx = dout W, dW = dout^T x, db = sum over the batch of dout.
def linear_backward(dout, cache):
    """dout (N, out) -> dx (N, in), {"weight": (out, in), "bias": (out,)}."""
    x, w, has_bias = cache
    grads = {"weight": dout.T @ x}
    if has_bias:
        grads["bias"] = dout.sum(axis=0)
    return dout @ w, grads


# --- GroupNorm --------------------------------------------------------------------------------------------------

def group_norm_forward(x, gamma, beta, groups, eps=1e-5):
    """torch.nn.GroupNorm: x (N, C, *spatial), gamma/beta (C,) -> out like x.

    Each (image, group of C/groups channels) is normalised by its own mean and biased variance, then scaled and
    shifted per channel: out = x_hat * gamma + beta, x_hat = (x - mean) / sqrt(var + eps).
    """
    xp = get_array_module(x)
    N, C = x.shape[0], x.shape[1]
    xg = x.reshape(N, groups, -1)
    mean = xg.mean(axis=2, keepdims=True)
    x_hat = xg - mean
    var = xp.mean(x_hat * x_hat, axis=2, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    x_hat *= inv_std
    x_hat = x_hat.reshape(N, C, -1)
    out = x_hat * gamma[:, None]
    out += beta[:, None]
    return out.reshape(x.shape), (x_hat, inv_std, gamma, groups)


# With g = dout * gamma and M elements per group: dx = inv_std * (g - mean_grp(g) - x_hat * mean_grp(g * x_hat)).
# Both group means are formed from the per-channel sums sum_s dout and sum_s dout * x_hat, which are also dbeta and
# dgamma, so g * x_hat is never formed at full size.
def group_norm_backward(dout, cache):
    """dout (N, C, *spatial) -> dx like dout, {"weight": dgamma (C,), "bias": dbeta (C,)}."""
    x_hat, inv_std, gamma, groups = cache
    N, C, S = x_hat.shape
    d = dout.reshape(N, C, S)
    sum_d = d.sum(axis=2)                    # (N, C)
    sum_dx = (d * x_hat).sum(axis=2)         # (N, C)
    M = (C // groups) * S
    mean_g = (sum_d * gamma).reshape(N, groups, -1).sum(axis=2) / M       # (N, G)
    mean_gx = (sum_dx * gamma).reshape(N, groups, -1).sum(axis=2) / M     # (N, G)
    dx = d * gamma[:, None]
    dx = dx.reshape(N, groups, -1)
    dx -= mean_g[:, :, None]
    dx -= x_hat.reshape(N, groups, -1) * mean_gx[:, :, None]
    dx *= inv_std
    return dx.reshape(dout.shape), {"weight": sum_dx.sum(axis=0), "bias": sum_d.sum(axis=0)}


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

def upsample2x_forward(x):
    """Nearest 2x upsampling, as F.interpolate(scale_factor=2, mode="nearest"): (N, C, H, W) -> (N, C, 2H, 2W)."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    out = xp.empty((N, C, H, 2, W, 2), dtype=x.dtype)
    out[...] = x[:, :, :, None, :, None]
    return out.reshape(N, C, 2 * H, 2 * W), x.shape


# Each input pixel feeds a 2x2 block of the output, so its gradient is the sum over that block.
def upsample2x_backward(dout, cache):
    """dout (N, C, 2H, 2W) -> dx (N, C, H, W), {}."""
    N, C, H, W = cache
    return dout.reshape(N, C, H, 2, W, 2).sum(axis=(3, 5)), {}


def concat_forward(a, b):
    """Concatenate along channels (a UNet skip): a (N, Ca, ...), b (N, Cb, ...) -> (N, Ca + Cb, ...)."""
    xp = get_array_module(a, b)
    return xp.concatenate((a, b), axis=1), a.shape[1]


# Concatenation routes values unchanged, so the gradient is split back at the same channel.
def concat_backward(dout, cache):
    """dout (N, Ca + Cb, ...) -> (da, db) (views of dout), {}."""
    ca = cache
    return (dout[:, :ca], dout[:, ca:]), {}


# --- timestep embedding ------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of integer timesteps, as in DDPM (Ho et al. 2020, `get_timestep_embedding`).

    t: host NumPy int array (N,), 0-based -> host float64 array (N, dim):
    emb[:, k] = sin(t * f_k), emb[:, half + k] = cos(t * f_k), f_k = max_period^(-k / (half - 1)), half = dim // 2;
    an odd dim gets a zero last column. Computed on the host in float64 so every backend and dtype sees the same
    numbers; the caller moves it with `backend.asarray(emb, dtype)`. No backward: t is not differentiable.
    """
    if dim < 4:
        raise ValueError(f"timestep embedding needs dim >= 4, got {dim}")
    t = np.asarray(t)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"t must be a host NumPy integer array of shape (N,), got {t.dtype} {t.shape}")
    half = dim // 2
    freqs = np.exp(-math.log(max_period) / (half - 1) * np.arange(half, dtype=np.float64))
    args = t.astype(np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros((t.shape[0], 1))], axis=1)
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
