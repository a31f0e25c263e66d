"""The channels-last kernels the UNet runs on (minidiff.nn.conv, minidiff.nn.norm) and the CPU parallelism above them.

Each kernel is checked like every layer in test_layers: backward against central finite differences in float64 on
every backend (NumPy, strict, CuPy where present), forward against PyTorch. The chunked paths are forced with a tiny
chunk size, so the small test shapes go through several chunks too.
"""

import warnings

import numpy as np
import pytest

from helpers.gradcheck import check_gradients, randn
from minidiff.kernels import channels
from minidiff.kernels.chunks import batch_chunks
from minidiff.nn import conv
from minidiff.nn import norm
from minidiff.execution import threads as parallel
from minidiff.nn import layers as L
from minidiff.backend import to_numpy

NHWC_CONV_CASES = [  # N, H, W, C, O, (kh, kw), stride, padding
    (3, 5, 4, 2, 3, (3, 3), 1, 1),        # the UNet's 3x3 "same" conv, odd sizes, several chunks
    (2, 6, 7, 3, 2, (3, 3), 2, 1),        # stride 2 (the downsampler): col2im input gradient
    (3, 3, 4, 4, 5, (1, 1), 1, 0),        # 1x1 (skip, qkv and proj)
    (2, 4, 5, 2, 3, (3, 2), 1, (1, 0)),   # non-square kernel, per-axis padding
    (2, 3, 3, 2, 2, (1, 1), 1, 1),        # padding wider than the kernel: col2im
]


@pytest.fixture
def tiny_chunks(monkeypatch):
    """One image per conv and GroupNorm chunk (scratch reuse, weight gradients summed over chunks) and narrow
    GroupNorm rows."""
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
    monkeypatch.setattr(norm, "CHUNK_BYTES", 1)
    monkeypatch.setattr(channels, "WIDE", 12)   # GroupNorm rows a few pixels wide: 1 < k < H * W on test shapes


def _nhwc_to_nchw(a):
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


@pytest.mark.parametrize("case", NHWC_CONV_CASES)
def test_conv2d_nhwc_gradients_match_finite_differences(backend, tiny_chunks, case):
    N, H, W, C, O, (kh, kw), stride, padding = case
    rng = np.random.default_rng(N * H + W)
    inputs = {"x": randn(rng, N, H, W, C), "w": randn(rng, O, C, kh, kw), "b": randn(rng, O)}
    check_gradients(backend, conv.conv2d_nhwc_forward, conv.conv2d_nhwc_backward, inputs,
                    {"x": "dx", "w": "weight", "b": "bias"}, stride=stride, padding=padding)


def test_conv2d_nhwc_weight_gradient_without_input_gradient(cpu_backend, tiny_chunks, rng):
    """input_grad=False (the image into conv_in) takes the im2col-of-x path; its weight gradient must not change."""
    x, w, b = (cpu_backend.asarray(a) for a in (randn(rng, 3, 4, 4, 2), randn(rng, 3, 2, 3, 3), randn(rng, 3)))
    out, cache = conv.conv2d_nhwc_forward(x, w, b, 1, 1)
    dout = cpu_backend.asarray(randn(rng, *out.shape))
    dx_none, g_fast = conv.conv2d_nhwc_backward(dout, cache, input_grad=False)
    _, g_full = conv.conv2d_nhwc_backward(dout, cache)
    assert dx_none is None
    np.testing.assert_allclose(to_numpy(g_fast["weight"]), to_numpy(g_full["weight"]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", NHWC_CONV_CASES)
def test_conv2d_nhwc_forward_matches_torch(cpu_backend, torch, tiny_chunks, case):
    N, H, W, C, O, (kh, kw), stride, padding = case
    rng = np.random.default_rng(3)
    x, w, b = randn(rng, N, H, W, C), randn(rng, O, C, kh, kw), randn(rng, O)
    out, _ = conv.conv2d_nhwc_forward(*(cpu_backend.asarray(a) for a in (x, w, b)), stride=stride, padding=padding)
    ref = torch.nn.functional.conv2d(torch.from_numpy(_nhwc_to_nchw(x)), torch.from_numpy(w), torch.from_numpy(b),
                                     stride=stride, padding=padding)
    np.testing.assert_allclose(_nhwc_to_nchw(to_numpy(out)), ref.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", NHWC_CONV_CASES)
def test_conv2d_nhwc_ignores_what_earlier_calls_left_in_scratch(cpu_backend, tiny_chunks, case):
    """Padded inputs and column matrices live in scratch buffers shared by every shape: a call must write every
    element it reads (the zero border included), so buffers full of NaN from a larger call change nothing."""
    from minidiff.kernels import workspace
    N, H, W, C, O, (kh, kw), stride, padding = case
    rng = np.random.default_rng(5)
    x, w, b = (cpu_backend.asarray(randn(rng, *s)) for s in ((N, H, W, C), (O, C, kh, kw), (O,)))

    def run():
        out, cache = conv.conv2d_nhwc_forward(x, w, b, stride=stride, padding=padding)
        dx, g = conv.conv2d_nhwc_backward(out, cache)
        return [to_numpy(a) for a in (out, dx, g["weight"], g["bias"])]

    workspace.clear()
    fresh = run()
    big = cpu_backend.asarray(randn(rng, N + 1, H + 3, W + 3, C))
    conv.conv2d_nhwc_backward(*conv.conv2d_nhwc_forward(big, w, b, stride=stride, padding=padding))
    for buf in workspace._BUFFERS.values():
        buf[...] = np.nan
    for got, want in zip(run(), fresh):
        np.testing.assert_array_equal(got, want)


def test_inside_a_cuda_graph_capture_new_scratch_and_constants_are_refused_and_existing_ones_served(monkeypatch):
    from minidiff.kernels import workspace
    from minidiff.kernels.capture import CaptureNeedsWarmUp
    like = np.zeros(1, dtype=np.float32)
    kept = workspace.scratch("test.capture", (4, 4), like)
    ones = workspace.ones_row(5, like)
    monkeypatch.setattr(workspace, "is_capturing", lambda xp: True)   # as during minidiff.execution.graphs's capture
    assert workspace.scratch("test.capture", (2, 8), like).base is kept.base   # fits: the same buffer
    assert workspace.ones_row(5, like) is ones
    with pytest.raises(CaptureNeedsWarmUp, match="test.capture"):
        workspace.scratch("test.capture", (5, 5), like)                # would grow it
    with pytest.raises(CaptureNeedsWarmUp, match="scratch buffer"):
        workspace.scratch("test.capture.new", (1,), like)
    with pytest.raises(CaptureNeedsWarmUp, match="constant"):
        workspace.ones_row(6, like)
    assert workspace.scratch("test.capture", (2, 8), like).base is kept.base   # nothing was replaced


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_nhwc_of_a_transposed_view_equals_that_of_its_contiguous_copy(cpu_backend, tiny_chunks, silu):
    """A channels-last view of an NCHW array (not C-contiguous) normalises like its contiguous copy."""
    rng = np.random.default_rng(6)
    x_nchw, d_nchw = randn(rng, 3, 4, 5, 6), randn(rng, 3, 4, 5, 6)
    gamma, beta = (cpu_backend.asarray(randn(rng, 4)) for _ in range(2))
    results = []
    for make in (lambda a: a.transpose(0, 2, 3, 1), lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))):
        x, d = cpu_backend.asarray(make(x_nchw)), cpu_backend.asarray(make(d_nchw))
        out, cache = norm.group_norm_nhwc_forward(x, gamma, beta, 2, silu=silu)
        dx, g = norm.group_norm_nhwc_backward(d, cache)
        results.append([to_numpy(a) for a in (out, dx, g["weight"], g["bias"])])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv2d_nhwc_rezeroes_the_padded_border_for_the_same_padded_shape_with_another_padding(cpu_backend):
    """5x5 padded by 1 and 3x3 padded by 2 are both 7x7: the second must not take the first's border (one pixel
    wide) for its own (two)."""
    from minidiff.kernels import workspace
    rng = np.random.default_rng(7)
    w = cpu_backend.asarray(randn(rng, 2, 3, 3, 3))
    first, second = cpu_backend.asarray(randn(rng, 2, 5, 5, 3)), cpu_backend.asarray(randn(rng, 2, 3, 3, 3))
    workspace.clear()
    want = to_numpy(conv.conv2d_nhwc_forward(second, w, None, padding=2)[0])
    conv.conv2d_nhwc_forward(first, w, None, padding=1)
    np.testing.assert_array_equal(to_numpy(conv.conv2d_nhwc_forward(second, w, None, padding=2)[0]), want)


def test_scratch_kept_says_whether_the_last_use_had_the_same_tag_and_the_buffer_was_not_grown():
    from minidiff.kernels import workspace
    like = np.zeros(1, dtype=np.float32)
    a, kept = workspace.scratch_kept("test.kept", (2, 3), like, tag="a")
    a[...] = 5.0
    assert not kept
    b, kept = workspace.scratch_kept("test.kept", (2, 3), like, tag="a")
    assert kept and (b == 5.0).all()
    assert not workspace.scratch_kept("test.kept", (3, 2), like, tag="b")[1]
    assert not workspace.scratch_kept("test.kept", (3, 2), like, tag="a")[1]   # used under "b" in between
    assert workspace.scratch_kept("test.kept", (3, 2), like, tag="a")[1]
    assert not workspace.scratch_kept("test.kept", (4, 3), like, tag="a")[1]   # grown: a new, uninitialised buffer
    workspace.scratch("test.kept", (1,), like)                                  # an untagged use forgets the tag
    assert not workspace.scratch_kept("test.kept", (4, 3), like, tag="a")[1]


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,groups", [((2, 3, 4, 6), 2), ((3, 2, 2, 4), 4), ((2, 5, 4), 1)])
def test_group_norm_nhwc_gradients_match_finite_differences(backend, tiny_chunks, shape, groups, silu):
    rng = np.random.default_rng(len(shape) + groups)
    C = shape[-1]
    inputs = {"x": 3 * randn(rng, *shape) + 1, "gamma": randn(rng, C), "beta": randn(rng, C)}
    check_gradients(backend, norm.group_norm_nhwc_forward, norm.group_norm_nhwc_backward, inputs,
                    {"x": "dx", "gamma": "weight", "beta": "bias"}, groups=groups, silu=silu)


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_nhwc_forward_matches_torch(cpu_backend, torch, tiny_chunks, silu):
    rng = np.random.default_rng(4)
    x, g, b = 3 * randn(rng, 3, 4, 5, 6) + 2, randn(rng, 6), randn(rng, 6)
    out, _ = norm.group_norm_nhwc_forward(*(cpu_backend.asarray(a) for a in (x, g, b)), 3, silu=silu)
    F = torch.nn.functional
    ref = F.group_norm(torch.from_numpy(_nhwc_to_nchw(x)), 3, torch.from_numpy(g), torch.from_numpy(b), eps=1e-5)
    ref = F.silu(ref) if silu else ref
    np.testing.assert_allclose(_nhwc_to_nchw(to_numpy(out)), ref.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("wide", [12, 128])   # k = 2 and k = 20 pixels per wide row
def test_add_channels_equals_the_broadcast_add_bit_for_bit(cpu_backend, monkeypatch, rng, wide):
    """Per-channel (C,) and per-image (N, C) values added on wide rows: in place, the same bits as a broadcast add."""
    monkeypatch.setattr(channels, "WIDE", wide)
    a = randn(rng, 3, 4, 5, 6).astype(np.float32)
    v, w = randn(rng, 6).astype(np.float32), randn(rng, 3, 6).astype(np.float32)
    for value, ref in ((v, a + v), (w, a + w[:, None, None, :])):
        x = cpu_backend.asarray(a.copy())   # NumPy's asarray would not copy, and the add is in place
        assert channels.add_channels(x, cpu_backend.asarray(value)) is x
        np.testing.assert_array_equal(to_numpy(x), ref)
    with pytest.raises(ValueError, match="C-contiguous"):   # a reshape of a strided view would add into a copy
        channels.add_channels(cpu_backend.asarray(a)[:, :, ::2], cpu_backend.asarray(v))


def test_group_norm_silu_float32_saturates_without_overflow(backend):
    """Huge pre-activations h = +-1e4: SiLU's tails come out as 0 and h, the SiLU gradients as 0 and 1, no warnings
    (on CuPy, minidiff.kernels.norm_cuda's own tanh form: no errstate there, the values must still come out finite)."""
    x = backend.asarray(np.array([[[-3.0, 3.0]]]), dtype=np.float32)          # (1, 1, 2): x_hat = -1, +1
    g, b = (backend.asarray(np.array(v), dtype=np.float32) for v in ([1e4, 1e4], [0.0, 0.0]))
    with np.errstate(all="raise"):
        out, cache = norm.group_norm_nhwc_forward(x, g, b, 1, silu=True)
        _, grads = norm.group_norm_nhwc_backward(backend.asarray(np.ones((1, 1, 2)), dtype=np.float32), cache)
    np.testing.assert_allclose(to_numpy(out).ravel(), [0.0, 1e4], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_numpy(grads["bias"]), [0.0, 1.0], atol=1e-6)    # dL/dbeta = SiLU'(h)


@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (2, 2, 3, 1)])
def test_upsample2x_nhwc_gradient_matches_finite_differences_and_torch(backend, torch, shape):
    x = randn(np.random.default_rng(shape[0]), *shape)
    check_gradients(backend, L.upsample2x_nhwc_forward, L.upsample2x_nhwc_backward, {"x": x}, {"x": "dx"})
    out, _ = L.upsample2x_nhwc_forward(backend.asarray(x))
    ref = torch.nn.functional.interpolate(torch.from_numpy(_nhwc_to_nchw(x)), scale_factor=2, mode="nearest")
    np.testing.assert_array_equal(_nhwc_to_nchw(to_numpy(out)), ref.numpy())


def test_channels_last_concat_gradient_matches_finite_differences(backend, rng):
    inputs = {"a": randn(rng, 2, 3, 2, 3), "b": randn(rng, 2, 3, 2, 1)}
    check_gradients(backend, L.concat_forward, L.concat_backward, inputs, {"a": 0, "b": 1}, axis=-1)


# --- the parallel machinery ------------------------------------------------------------------------------------------

def test_unet_on_two_threads_matches_one_thread(cpu_backend, monkeypatch):
    """The batch split over two workers: the same output (per-image work is untouched) and the same gradients up
    to the order in which the chunks' gradients are summed."""
    threadpool_limits = pytest.importorskip("threadpoolctl").threadpool_limits
    from minidiff.execution import data_parallel
    from minidiff.models.unet import UNet
    monkeypatch.setattr(data_parallel, "MIN_CHUNK_ELEMENTS", 1)   # split even this small batch
    monkeypatch.setattr(data_parallel, "MIN_CHUNK_ELEMENTS_THREADS", 1)
    model = data_parallel.DataParallel(UNet(base_channels=8, groups=4, channel_mults=(1, 2), attention_levels=(1,),
                                            num_heads=2, dtype="float64", device=cpu_backend))
    rng = np.random.default_rng(6)
    x = cpu_backend.asarray(rng.standard_normal((5, 1, 8, 8)))
    t, dout = rng.integers(0, 1000, 5), cpu_backend.asarray(rng.standard_normal((5, 1, 8, 8)))
    runs = {}
    for threads in (2, 1):
        with threadpool_limits(threads, user_api="blas"):
            assert parallel.cpu_workers(np) == threads
            out = to_numpy(model.forward(x, t))
            runs[threads] = out, {k: to_numpy(g) for k, g in model.backward(dout).items()}
    np.testing.assert_allclose(runs[2][0], runs[1][0], rtol=0, atol=1e-13)
    for name, g in runs[1][1].items():
        np.testing.assert_allclose(runs[2][1][name], g, rtol=1e-10, atol=1e-13, err_msg=name)


def test_a_batch_is_split_only_when_each_chunk_gets_enough_work(cpu_backend):
    threadpool_limits = pytest.importorskip("threadpoolctl").threadpool_limits
    from minidiff.execution import data_parallel
    from minidiff.models.unet import UNet
    from minidiff.nn.tape import Tape
    model = data_parallel.DataParallel(UNet(base_channels=8, groups=4, device=cpu_backend))
    # chunks in worker processes pay from smaller chunks than chunks on threads (the strict backend's)
    min_chunk = data_parallel.MIN_CHUNK_ELEMENTS if model.in_processes else data_parallel.MIN_CHUNK_ELEMENTS_THREADS
    per_image = 64   # 1 x 8 x 8
    with threadpool_limits(2, user_api="blas"):
        for n, count in ((2 * min_chunk // per_image - 1, 1), (2 * min_chunk // per_image, 2)):
            x = cpu_backend.asarray(np.zeros((n, 1, 8, 8)), dtype=np.float32)
            tape = Tape()
            model.forward_pass(x, np.zeros(n, dtype=np.int64), tape)
            (chunks, _, _), = tape
            assert len(chunks) == count, n


def test_map_chunks_keeps_order_propagates_errors_and_restores_blas_threads():
    threadpool_limits = pytest.importorskip("threadpoolctl").threadpool_limits
    with threadpool_limits(2, user_api="blas"):
        assert parallel.map_chunks(lambda p: p * p, range(7), np) == [p * p for p in range(7)]
        assert parallel.map_chunks(lambda p: parallel.cpu_workers(np), range(2), np) == [1, 1]  # nested: serial

        def boom(p):
            if p == 3:
                raise ValueError("chunk 3")
            return p
        with pytest.raises(ValueError, match="chunk 3"):
            parallel.map_chunks(boom, range(6), np)
        assert parallel.cpu_workers(np) == 2   # BLAS is back to two threads after the error


def test_batch_chunks_cover_the_batch_once():
    assert batch_chunks(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert batch_chunks(2, 8) == [(0, 1), (1, 2)]
    assert batch_chunks(5, 0) == [(0, 5)]


def test_map_chunks_workers_use_the_callers_floating_point_error_handling():
    """NumPy threads start with the default error handling; the chunks must follow the caller's np.errstate (the
    trainer silences overflow warnings with it, a test may turn them into errors)."""
    threadpool_limits = pytest.importorskip("threadpoolctl").threadpool_limits
    overflow = lambda p: np.float32(3e38) * np.float32(10)   # noqa: E731
    with threadpool_limits(2, user_api="blas"):
        with np.errstate(over="raise"), pytest.raises(FloatingPointError):
            parallel.map_chunks(overflow, range(2), np)
        with np.errstate(over="ignore"), warnings.catch_warnings():
            warnings.simplefilter("error")
            assert all(np.isinf(parallel.map_chunks(overflow, range(2), np)))
