"""Every layer's backward against central finite differences in float64, and every forward against PyTorch.

The gradients are held to a relative error of 1e-6 (helpers.gradcheck says why that measure and that bar). The
checks run on every backend of the `backend` fixture (NumPy, strict, and CuPy where a GPU exists).
"""

import numpy as np
import pytest

from helpers.gradcheck import check_gradients, randn
from minidiff.nn import layers as L
from minidiff.nn.attention import attention_backward, attention_forward, softmax_backward, softmax_forward
from minidiff.backend import to_numpy

CONV_CASES = [  # N, C, H, W, O, (kh, kw), stride, padding
    (1, 1, 5, 5, 2, (3, 3), 1, 1),        # batch 1, odd size, 3x3 same
    (2, 3, 7, 6, 4, (3, 3), 2, 1),        # stride 2 on odd/even sizes (the downsampler)
    (2, 3, 4, 4, 5, (1, 1), 1, 0),        # 1x1 (skip and attention projections)
    (1, 2, 6, 6, 3, (3, 3), 2, 1),        # stride 2, even size
    (2, 2, 5, 7, 3, (2, 2), 1, 0),        # even kernel, no padding, non-square image
    (2, 2, 4, 5, 3, (3, 2), 1, (1, 0)),   # non-square kernel, per-axis padding
    (1, 2, 3, 3, 2, (1, 1), 1, 1),        # padding wider than the kernel (input gradient by col2im)
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradients_match_finite_differences(backend, case):
    N, C, Hh, W, O, (kh, kw), stride, padding = case
    rng = np.random.default_rng(N + C + Hh + W)
    inputs = {"x": randn(rng, N, C, Hh, W), "w": randn(rng, O, C, kh, kw), "b": randn(rng, O)}
    check_gradients(backend, L.conv2d_forward, L.conv2d_backward, inputs, {"x": "dx", "w": "weight", "b": "bias"},
                    stride=stride, padding=padding)


def test_conv2d_without_bias_has_no_bias_gradient(cpu_backend, rng):
    inputs = {"x": randn(rng, 2, 2, 4, 3), "w": randn(rng, 3, 2, 3, 3)}
    check_gradients(cpu_backend, L.conv2d_forward, L.conv2d_backward, inputs, {"x": "dx", "w": "weight"}, padding=1)
    _, cache = L.conv2d_forward(cpu_backend.asarray(inputs["x"]), cpu_backend.asarray(inputs["w"]), padding=1)
    assert "bias" not in L.conv2d_backward(cpu_backend.asarray(np.ones((2, 3, 4, 3))), cache)[1]


@pytest.mark.parametrize("shape", [(1, 3, 4), (5, 7, 2)])
def test_linear_gradients_match_finite_differences(backend, shape):
    n, fin, fout = shape
    rng = np.random.default_rng(n)
    inputs = {"x": randn(rng, n, fin), "w": randn(rng, fout, fin), "b": randn(rng, fout)}
    check_gradients(backend, L.linear_forward, L.linear_backward, inputs, {"x": "dx", "w": "weight", "b": "bias"})


@pytest.mark.parametrize("shape,groups", [((1, 4, 3, 3), 4),     # groups == channels, batch 1
                                          ((2, 6, 5, 3), 2),     # odd spatial sizes
                                          ((3, 4, 2, 2), 1),     # one group (LayerNorm over C, H, W)
                                          ((2, 4, 5), 2)])       # any trailing shape
def test_group_norm_gradients_match_finite_differences(backend, shape, groups):
    rng = np.random.default_rng(len(shape) + groups)
    C = shape[1]
    inputs = {"x": 3 * randn(rng, *shape) + 1, "gamma": randn(rng, C), "beta": randn(rng, C)}
    check_gradients(backend, L.group_norm_forward, L.group_norm_backward, inputs,
                    {"x": "dx", "gamma": "weight", "beta": "bias"}, groups=groups)


def test_silu_gradient_matches_finite_differences(backend, rng):
    check_gradients(backend, L.silu_forward, L.silu_backward, {"x": 3 * randn(rng, 2, 3, 4, 5)}, {"x": "dx"})


def test_silu_saturates_without_overflow_in_float32(backend):
    # Where the derivative is ~1e-16 finite differences only measure round-off, so the tails are checked in closed form.
    x = backend.asarray(np.array([-1e4, -100.0, -40.0, 40.0, 100.0, 1e4]), dtype=np.float32)
    with np.errstate(all="raise"):
        out, cache = L.silu_forward(x)
        dx, _ = L.silu_backward(backend.asarray(np.ones(6), dtype=np.float32), cache)
    np.testing.assert_allclose(to_numpy(out), [0, 0, 0, 40, 100, 1e4], atol=1e-12)
    np.testing.assert_allclose(to_numpy(dx), [0, 0, 0, 1, 1, 1], atol=1e-12)


def test_concat_gradient_matches_finite_differences(backend, rng):
    inputs = {"a": randn(rng, 2, 3, 3, 2), "b": randn(rng, 2, 1, 3, 2)}
    check_gradients(backend, L.concat_forward, L.concat_backward, inputs, {"a": 0, "b": 1})


def test_softmax_gradient_matches_finite_differences(backend, rng):
    check_gradients(backend, softmax_forward, softmax_backward, {"s": 2 * randn(rng, 2, 3, 5)}, {"s": "dx"})


@pytest.mark.parametrize("shape,heads", [((2, 3, 3, 12), 2), ((1, 2, 3, 6), 1), ((2, 1, 2, 12), 4)])  # (N, H, W, 3C)
def test_attention_gradient_matches_finite_differences(backend, shape, heads):
    qkv = randn(np.random.default_rng(heads), *shape)
    check_gradients(backend, attention_forward, attention_backward, {"qkv": qkv}, {"qkv": "dx"}, num_heads=heads)


# --- forwards against PyTorch ---------------------------------------------------------------------------------------

def _close(ours, ref, tol=1e-12):
    ref = ref.detach().numpy()
    assert np.max(np.abs(to_numpy(ours) - ref)) <= tol * max(1.0, np.max(np.abs(ref)))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_matches_torch(cpu_backend, torch, case):
    N, C, Hh, W, O, (kh, kw), stride, padding = case
    rng = np.random.default_rng(1)
    x, w, b = randn(rng, N, C, Hh, W), randn(rng, O, C, kh, kw), randn(rng, O)
    out, _ = L.conv2d_forward(*(cpu_backend.asarray(a) for a in (x, w, b)), stride=stride, padding=padding)
    ref = torch.nn.functional.conv2d(*(torch.from_numpy(a) for a in (x, w, b)), stride=stride, padding=padding)
    _close(out, ref)


def test_group_norm_silu_linear_forwards_match_torch(cpu_backend, torch, rng):
    F, T = torch.nn.functional, torch.from_numpy
    x, g, b = randn(rng, 2, 6, 3, 5), randn(rng, 6), randn(rng, 6)
    a = cpu_backend.asarray
    _close(L.group_norm_forward(a(x), a(g), a(b), 3)[0], F.group_norm(T(x), 3, T(g), T(b), eps=1e-5))
    _close(L.silu_forward(a(x))[0], F.silu(T(x)))
    w, x2 = randn(rng, 4, 5), randn(rng, 3, 5)
    _close(L.linear_forward(a(x2), a(w), a(b[:4]))[0], F.linear(T(x2), T(w), T(b[:4])))


def test_attention_forward_matches_torch_scaled_dot_product(cpu_backend, torch, rng):
    N, C, heads, Hh, W = 2, 8, 2, 3, 2
    qkv = randn(rng, N, Hh, W, 3 * C)   # channels-last, channel blocks [q | k | v], each heads x d
    out, _ = attention_forward(cpu_backend.asarray(qkv), heads)
    q, k, v = (torch.from_numpy(qkv).reshape(N, Hh * W, 3, heads, C // heads)[:, :, i].transpose(1, 2)
               for i in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)      # (N, heads, L, d)
    _close(out, ref.transpose(1, 2).reshape(N, Hh, W, C))


# --- timestep embedding and initialisation --------------------------------------------------------------------------

def test_timestep_embedding_is_ddpm_sinusoid():
    t = np.array([0, 1, 999])
    emb = L.timestep_embedding(t, 8)
    freqs = 10000.0 ** (-np.arange(4) / 3)
    np.testing.assert_allclose(emb, np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], 1),
                               rtol=0, atol=1e-12)
    np.testing.assert_array_equal(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    odd = L.timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and np.all(odd[:, -1] == 0) and np.array_equal(odd[:, :8], emb)


def test_timestep_embedding_rejects_float_timesteps_and_stays_on_the_device_of_t(cpu_backend):
    with pytest.raises(TypeError, match="integer"):
        L.timestep_embedding(np.array([0.5]), 8)
    with pytest.raises(ValueError, match="dim >= 4"):
        L.timestep_embedding(np.array([1]), 2)
    t = np.array([0, 7, 999])
    on_device = L.timestep_embedding(cpu_backend.asarray(t), 9)   # computed there, never pulled to the host
    assert type(on_device) is type(cpu_backend.asarray(t))
    np.testing.assert_array_equal(cpu_backend.asnumpy(on_device), L.timestep_embedding(t, 9))


def test_init_follows_pytorch_defaults():
    rng = np.random.default_rng(0)
    (shape, init), = [L.conv2d_params(16, 8, 3)["weight"]]
    w = L.init_param(rng, shape, init)
    bound = 1 / np.sqrt(16 * 9)
    assert w.shape == (8, 16, 3, 3) and np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert init == L.conv2d_params(16, 8, 3)["bias"][1]        # PyTorch's bias bound is 1/sqrt(fan_in) too
    assert L.linear_params(10, 4)["weight"] == ((4, 10), ("uniform", 1 / np.sqrt(10)))
    assert L.conv2d_params(4, 2, 3, zero=True)["weight"][1] == ("zeros",)
    gn = L.group_norm_params(6)
    assert np.all(L.init_param(rng, *gn["weight"]) == 1) and np.all(L.init_param(rng, *gn["bias"]) == 0)
