"""The readable layers (minidiff.nn.reference) held to the fast ones the UNet runs, to finite differences and to torch.

Three comparisons per layer, all in float64 on shapes that cover every path of the fast layer (stride 1 and 2, 1x1
and 3x3 kernels, padding 0 and 1, one and several groups or heads, odd spatial sizes), then random shapes:
- fast vs reference, forward and every gradient, relative error <= 1e-12: the fast layers are channels-last, so
  arrays are transposed at the edges; they run whole and in chunks of one image (the tiny chunks of
  test_fast_layers), the GroupNorm forward also without a cache;
- reference vs central finite differences of a random linear functional sum(out * dout) (test_layers' helpers);
- reference vs PyTorch, forward and autograd's gradients.
Errors are test_layers' `rel_error` (elementwise, the denominator floored at 1e-3 of the tensor's largest). Each
trial loop asserts how many trials it ran and that the trials reached every path the fast layer has.
"""

import math
from collections import Counter

import numpy as np
import pytest

from helpers.gradcheck import numeric_grad, rel_error
from minidiff.kernels import channels
from minidiff.nn import attention, conv, norm
from minidiff.nn import reference as R

pytestmark = pytest.mark.usefixtures("one_blas_thread")

FAST_BAR = 1e-12    # the same sums in another order: a few ulps of the largest term
FD_BAR = 1e-6       # test_layers' bar: central differences carry an absolute round-off near 1e-10
TORCH_BAR = 1e-12
N_RANDOM = 6        # random shapes per layer, after the fixed ones


def nchw(a):
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


@pytest.fixture(params=["whole", "chunks"])
def chunking(request, monkeypatch):
    """The fast layers as the program runs them, and one image per chunk with GroupNorm rows a few pixels wide."""
    if request.param == "chunks":
        monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
        monkeypatch.setattr(norm, "CHUNK_BYTES", 1)
        monkeypatch.setattr(channels, "WIDE", 12)
    return request.param


def assert_trials(ran, expected, seen, needed):
    """`ran` trials of `expected`, each path in `needed` taken at least once (`seen` counts them)."""
    assert ran == expected, f"{ran} trials ran, {expected} expected"
    missing = [path for path in needed if seen[path] == 0]
    assert not missing, f"no trial took {missing}: {dict(seen)}"


# --- trials ----------------------------------------------------------------------------------------------------------
# conv: N, C, H, W, O, (kh, kw), stride, padding
CONV_FIXED = [(2, 3, 5, 5, 4, (3, 3), 1, 1),      # the UNet's 3x3 "same" conv, odd size
              (2, 3, 7, 6, 2, (3, 3), 2, 1),      # the stride-2 downsampler, odd and even sizes
              (3, 4, 3, 5, 5, (1, 1), 1, 0),      # 1x1 (skip, qkv, proj)
              (1, 2, 5, 4, 3, (3, 3), 1, 0),      # 3x3 without padding
              (2, 2, 3, 3, 2, (1, 1), 1, 1),      # padding wider than the kernel
              (1, 2, 4, 5, 3, (3, 2), 1, (1, 0))]  # non-square kernel, per-axis padding
GN_FIXED = [((2, 6, 5, 3), 2), ((1, 4, 3, 3), 4), ((3, 4, 2, 2), 1), ((2, 6, 7), 3)]   # x (N, C, *spatial), groups
ATTN_FIXED = [(2, 4, 3, 5, 1), (1, 6, 3, 3, 2), (2, 6, 2, 3, 3), (1, 2, 1, 1, 2)]   # N, C, H, W, heads


def conv_trials():
    rng = np.random.default_rng(11)
    out = list(CONV_FIXED)
    for _ in range(N_RANDOM):
        kh, kw = (int(v) for v in rng.choice([1, 2, 3], 2))
        out.append((int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(kh, 8)),
                    int(rng.integers(kw, 8)), int(rng.integers(1, 5)), (kh, kw), int(rng.integers(1, 3)),
                    int(rng.integers(0, 2))))
    return out


def gn_trials():
    rng = np.random.default_rng(12)
    out = list(GN_FIXED)
    for _ in range(N_RANDOM):
        groups = int(rng.integers(1, 4))
        out.append(((int(rng.integers(1, 4)), groups * int(rng.integers(1, 4)), int(rng.integers(1, 6)),
                     int(rng.integers(1, 6))), groups))
    return out


def attn_trials():
    rng = np.random.default_rng(13)
    out = list(ATTN_FIXED)
    for _ in range(N_RANDOM):
        heads = int(rng.integers(1, 4))
        out.append((int(rng.integers(1, 3)), heads * int(rng.integers(1, 4)), int(rng.integers(1, 5)),
                    int(rng.integers(1, 5)), heads))
    return out


def conv_paths(case):
    """The fast backward's path for this case (conv2d_nhwc_backward), and the features the case has."""
    _, _, _, _, _, (kh, kw), stride, padding = case
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    fast = "one im2col of dout" if stride == 1 and ph < kh and pw < kw else "col2im"
    return [fast, f"stride {stride}", f"{kh}x{kw}", f"padding {max(ph, pw)}"]


CONV_NEEDED = ["one im2col of dout", "col2im", "stride 1", "stride 2", "1x1", "3x3", "padding 0", "padding 1"]


def conv_inputs(case, seed):
    N, C, H, W, O, (kh, kw), stride, padding = case
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((O, C, kh, kw)), rng.standard_normal(O)
    return {"x": x, "w": w, "b": b}, dict(stride=stride, padding=padding)


def gn_inputs(shape, seed):
    rng = np.random.default_rng(seed)
    C = shape[1]
    return {"x": 3 * rng.standard_normal(shape) + 1, "gamma": rng.standard_normal(C), "beta": rng.standard_normal(C)}


def attn_inputs(case, seed):
    N, C, H, W, _ = case
    return {"qkv": np.random.default_rng(seed).standard_normal((N, 3 * C, H, W))}


def errors(got, want):
    """{name: rel_error} over the names of `want`."""
    return {k: rel_error(np.asarray(got[k]), np.asarray(want[k])) for k in want}


# --- each comparison, one case: {what: relative error} ----------------------------------------------------------------

def conv_fast_vs_reference(case, seed=0):
    inputs, kw = conv_inputs(case, seed)
    x, w, b = inputs["x"], inputs["w"], inputs["b"]
    out, cache = R.conv2d_forward(x, w, b, **kw)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape)
    dx, g = R.conv2d_backward(dout, cache)
    f_out, f_cache = conv.conv2d_nhwc_forward(nhwc(x), w, b, **kw)
    f_dx, f_g = conv.conv2d_nhwc_backward(nhwc(dout), f_cache)
    _, f_g_alone = conv.conv2d_nhwc_backward(nhwc(dout), f_cache, input_grad=False)   # the image's path: no dx
    return errors({"out": nchw(f_out), "dx": nchw(f_dx), "weight": f_g["weight"], "bias": f_g["bias"],
                   "weight, no dx": f_g_alone["weight"]},
                  {"out": out, "dx": dx, "weight": g["weight"], "bias": g["bias"], "weight, no dx": g["weight"]})


def gn_fast_vs_reference(shape, groups, silu, seed=0):
    inputs = gn_inputs(shape, seed)
    x, gamma, beta = inputs["x"], inputs["gamma"], inputs["beta"]
    out, cache = R.group_norm_forward(x, gamma, beta, groups, silu=silu)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape)
    dx, g = R.group_norm_backward(dout, cache)
    f_out, f_cache = norm.group_norm_nhwc_forward(nhwc(x), gamma, beta, groups, silu=silu)
    f_out_nocache, none = norm.group_norm_nhwc_forward(nhwc(x), gamma, beta, groups, silu=silu, cache=False)
    assert none is None
    f_dx, f_g = norm.group_norm_nhwc_backward(nhwc(dout), f_cache)
    return errors({"out": nchw(f_out), "out, cache=False": nchw(f_out_nocache), "dx": nchw(f_dx),
                   "weight": f_g["weight"], "bias": f_g["bias"]},
                  {"out": out, "out, cache=False": out, "dx": dx, "weight": g["weight"], "bias": g["bias"]})


def attn_fast_vs_reference(case, seed=0):
    qkv, heads = attn_inputs(case, seed)["qkv"], case[-1]
    out, cache = R.attention_forward(qkv, heads)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape)
    dqkv, _ = R.attention_backward(dout, cache)
    f_out, f_cache = attention.attention_forward(nhwc(qkv), heads)
    f_dqkv, _ = attention.attention_backward(nhwc(dout), f_cache)
    return errors({"out": nchw(f_out), "dqkv": nchw(f_dqkv)}, {"out": out, "dqkv": dqkv})


def reference_vs_fd(forward, backward, inputs, wrt, seed=0, **kwargs):
    """Reference gradients against central differences of sum(out * dout); wrt: input name -> "dx" | grads key."""
    out, cache = forward(**inputs, **kwargs)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape)
    dx, grads = backward(dout, cache)
    f = lambda: forward(**inputs, **kwargs)[0]   # noqa: E731 -- reads the inputs numeric_grad perturbs in place
    return {name: rel_error(dx if key == "dx" else grads[key], numeric_grad(f, inputs[name], dout))
            for name, key in wrt.items()}


def against_torch(torch, torch_forward, forward, backward, inputs, wrt, seed=0, **kwargs):
    """Reference forward and gradients against torch_forward(**tensors) and autograd; wrt as in reference_vs_fd."""
    out, cache = forward(**inputs, **kwargs)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape)
    dx, grads = backward(dout, cache)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    t_out = torch_forward(**tensors)
    t_out.backward(torch.from_numpy(dout))
    errs = {"out": rel_error(out, t_out.detach().numpy())}
    errs.update({name: rel_error(dx if key == "dx" else grads[key], tensors[name].grad.numpy())
                 for name, key in wrt.items()})
    return errs


CONV_WRT = {"x": "dx", "w": "weight", "b": "bias"}
GN_WRT = {"x": "dx", "gamma": "weight", "beta": "bias"}
ATTN_WRT = {"qkv": "dx"}


def torch_attention(torch, qkv, num_heads):
    """softmax(q k^T / sqrt(d)) v per image and head in plain torch ops, head h on channels [h d, (h+1) d) of each
    of the q, k, v blocks, tokens the H*W positions."""
    N, C3, H, W = qkv.shape
    C = C3 // 3
    d = C // num_heads
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(N, num_heads, d, H * W).transpose(2, 3) for i in range(3))
    p = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d), dim=-1)
    return (p @ v).transpose(2, 3).reshape(N, C, H, W)


# --- fast vs reference -----------------------------------------------------------------------------------------------

def test_fast_conv2d_computes_the_reference_convolution_and_gradients(chunking):
    seen, ran, trials = Counter(), 0, conv_trials()
    for i, case in enumerate(trials):
        errs = conv_fast_vs_reference(case, seed=i)
        assert max(errs.values()) <= FAST_BAR, f"{case}: {errs}"
        seen.update(conv_paths(case))
        ran += 1
    assert_trials(ran, len(CONV_FIXED) + N_RANDOM, seen, CONV_NEEDED)


def test_reference_conv2d_without_bias_returns_no_bias_gradient_and_the_fast_result():
    inputs, kw = conv_inputs(CONV_FIXED[1], seed=0)
    out, cache = R.conv2d_forward(inputs["x"], inputs["w"], None, **kw)
    dx, g = R.conv2d_backward(np.ones(out.shape), cache)
    f_out, f_cache = conv.conv2d_nhwc_forward(nhwc(inputs["x"]), inputs["w"], None, **kw)
    f_dx, f_g = conv.conv2d_nhwc_backward(np.ones(f_out.shape), f_cache)
    assert set(g) == set(f_g) == {"weight"}
    errs = errors({"out": nchw(f_out), "dx": nchw(f_dx), "weight": f_g["weight"]}, {"out": out, "dx": dx, **g})
    assert max(errs.values()) <= FAST_BAR, errs


@pytest.mark.parametrize("silu", [False, True])
def test_fast_group_norm_computes_the_reference_group_norm_and_gradients(chunking, silu):
    seen, ran, trials = Counter(), 0, gn_trials()
    for i, (shape, groups) in enumerate(trials):
        errs = gn_fast_vs_reference(shape, groups, silu, seed=i)
        assert max(errs.values()) <= FAST_BAR, f"{shape}, {groups} groups: {errs}"
        seen.update(["one group" if groups == 1 else "groups > 1",
                     "odd spatial" if any(s % 2 for s in shape[2:]) else "even spatial"])
        ran += 1
    assert_trials(ran, len(GN_FIXED) + N_RANDOM, seen, ["one group", "groups > 1", "odd spatial"])


def test_fast_attention_computes_the_reference_attention_with_the_same_heads():
    seen, ran, trials = Counter(), 0, attn_trials()
    for i, case in enumerate(trials):
        errs = attn_fast_vs_reference(case, seed=i)
        assert max(errs.values()) <= FAST_BAR, f"{case}: {errs}"
        seen.update(["one head" if case[-1] == 1 else "heads > 1", "odd spatial" if case[2] * case[3] % 2 else "even"])
        ran += 1
    assert_trials(ran, len(ATTN_FIXED) + N_RANDOM, seen, ["one head", "heads > 1", "odd spatial"])


def test_attention_heads_take_consecutive_channels_of_each_block():
    """A head reads only its own d channels of q, k and v: zeroing head 0's values zeroes exactly output channels
    [0, d), in the fast layer and the reference alike (a mix-up of heads that both shared would pass the twin test)."""
    N, C, H, W, heads = 1, 6, 2, 3, 3
    qkv = np.random.default_rng(3).standard_normal((N, 3 * C, H, W))
    qkv[:, 2 * C:2 * C + C // heads] = 0.0
    for out in (R.attention_forward(qkv, heads)[0], nchw(attention.attention_forward(nhwc(qkv), heads)[0])):
        assert not out[:, :C // heads].any() and np.abs(out[:, C // heads:]).min() > 0


# --- reference vs finite differences ---------------------------------------------------------------------------------

def test_reference_conv2d_gradients_match_finite_differences():
    seen, ran = Counter(), 0
    for i, case in enumerate(CONV_FIXED):
        inputs, kw = conv_inputs(case, seed=i)
        errs = reference_vs_fd(R.conv2d_forward, R.conv2d_backward, inputs, CONV_WRT, seed=i, **kw)
        assert max(errs.values()) <= FD_BAR, f"{case}: {errs}"
        seen.update(conv_paths(case))
        ran += 1
    assert_trials(ran, len(CONV_FIXED), seen, CONV_NEEDED)


@pytest.mark.parametrize("silu", [False, True])
def test_reference_group_norm_gradients_match_finite_differences(silu):
    ran = 0
    for i, (shape, groups) in enumerate(GN_FIXED):
        errs = reference_vs_fd(R.group_norm_forward, R.group_norm_backward, gn_inputs(shape, seed=i), GN_WRT,
                               seed=i, groups=groups, silu=silu)
        assert max(errs.values()) <= FD_BAR, f"{shape}, {groups} groups: {errs}"
        ran += 1
    assert ran == len(GN_FIXED) == 4


def test_reference_attention_gradient_matches_finite_differences():
    ran = 0
    for i, case in enumerate(ATTN_FIXED):
        errs = reference_vs_fd(R.attention_forward, R.attention_backward, attn_inputs(case, seed=i), ATTN_WRT,
                               seed=i, num_heads=case[-1])
        assert max(errs.values()) <= FD_BAR, f"{case}: {errs}"
        ran += 1
    assert ran == len(ATTN_FIXED) == 4


# --- reference vs PyTorch --------------------------------------------------------------------------------------------

def test_reference_conv2d_matches_torch_forward_and_autograd(torch):
    seen, ran, trials = Counter(), 0, conv_trials()
    for i, case in enumerate(trials):
        inputs, kw = conv_inputs(case, seed=i)
        errs = against_torch(torch, lambda x, w, b: torch.nn.functional.conv2d(x, w, b, **kw),
                             R.conv2d_forward, R.conv2d_backward, inputs, CONV_WRT, seed=i, **kw)
        assert max(errs.values()) <= TORCH_BAR, f"{case}: {errs}"
        seen.update(conv_paths(case))
        ran += 1
    assert_trials(ran, len(CONV_FIXED) + N_RANDOM, seen, CONV_NEEDED)


@pytest.mark.parametrize("silu", [False, True])
def test_reference_group_norm_matches_torch_forward_and_autograd(torch, silu):
    F = torch.nn.functional

    def torch_gn(x, gamma, beta):
        h = F.group_norm(x, groups, gamma, beta, eps=1e-5)
        return F.silu(h) if silu else h

    ran = 0
    for i, (shape, groups) in enumerate(gn_trials()):
        errs = against_torch(torch, torch_gn, R.group_norm_forward, R.group_norm_backward, gn_inputs(shape, seed=i),
                             GN_WRT, seed=i, groups=groups, silu=silu)
        assert max(errs.values()) <= TORCH_BAR, f"{shape}, {groups} groups: {errs}"
        ran += 1
    assert ran == len(GN_FIXED) + N_RANDOM


def test_reference_attention_matches_torch_forward_and_autograd(torch):
    ran = 0
    for i, case in enumerate(attn_trials()):
        heads = case[-1]
        errs = against_torch(torch, lambda qkv: torch_attention(torch, qkv, heads), R.attention_forward,
                             R.attention_backward, attn_inputs(case, seed=i), ATTN_WRT, seed=i, num_heads=heads)
        assert max(errs.values()) <= TORCH_BAR, f"{case}: {errs}"
        ran += 1
    assert ran == len(ATTN_FIXED) + N_RANDOM
