"""The study's instruments: timestep-bucket gradients, gradient noise scale, momentum / gradient alignment."""

import numpy as np
import pytest

from minidiff.instruments import probes
from minidiff.backend import get_backend, to_float, to_numpy
from minidiff.diffusion.losses import training_loss
from minidiff.models import MLPDenoiser
from minidiff.optim import SGD, Adam
from minidiff.diffusion.schedules import make_schedule
from minidiff.models.unet import UNet

SCHEDULE = make_schedule("linear", 100)


def _mlp(backend, dtype="float64"):
    return MLPDenoiser(data_dim=2, hidden=16, num_blocks=2, temb_dim=8, dtype=dtype, seed=3, device=backend)


def _randomise(model, rng, scale=0.3):
    # the zero-initialised output layer would make most gradients vanish; give every weight a value
    model.load_params({k: rng.standard_normal(v.shape) * scale for k, v in model.params.items()})
    return model


def _full_batch_grad(model, x0, t, noise):
    x0 = model.backend.asarray(x0, dtype=model.dtype)
    out = training_loss(model.forward, x0, SCHEDULE, None, t=t, noise=noise)
    return to_numpy(probes.flatten(model.backward(out.dout)))


# --- buckets --------------------------------------------------------------------------------------------------------

def test_bucket_edges_cover_all_timesteps_and_reject_bad_edges():
    np.testing.assert_array_equal(probes.bucket_edges(100, 4), [0, 25, 50, 75, 100])
    np.testing.assert_array_equal(probes.bucket_edges(10, [0, 1, 10]), [0, 1, 10])
    np.testing.assert_array_equal(probes.bucket_index([0, 24, 25, 99], probes.bucket_edges(100, 4)), [0, 0, 1, 3])
    for bad in ([0, 5, 5, 10], [1, 10], [0, 9]):
        with pytest.raises(ValueError):
            probes.bucket_edges(10, bad)
    with pytest.raises(ValueError):
        probes.bucket_edges(10, 11)


def test_bucket_sums_match_a_host_groupby(backend, rng):
    values, t = rng.uniform(size=20), rng.integers(0, 100, 20)
    edges = probes.bucket_edges(100, 3)
    sums, counts = probes.bucket_sums(backend.asarray(values, np.float64), t, edges)
    idx = probes.bucket_index(t, edges)
    np.testing.assert_allclose(to_numpy(sums), [values[idx == b].sum() for b in range(3)])
    np.testing.assert_array_equal(counts, np.bincount(idx, minlength=3))


# --- the timestep probe ---------------------------------------------------------------------------------------------

def test_timestep_probe_cosines_are_symmetric_unit_diagonal_and_repeatable(backend, rng):
    model = _randomise(_mlp(backend), rng)
    x0 = rng.standard_normal((16, 2))
    probe = probes.timestep_bucket_gradients(model, SCHEDULE, x0, buckets=4, rng_seed=7)
    assert probe.cosine.shape == (4, 4) and probe.grad_norms.shape == (4,) and probe.losses.shape == (4,)
    np.testing.assert_allclose(probe.cosine, probe.cosine.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(probe.cosine), 1.0)
    assert np.all(np.abs(probe.cosine) <= 1.0) and np.all(probe.grad_norms > 0)
    assert not np.allclose(probe.cosine, 1.0)  # different buckets do point in different directions
    for b in range(4):
        assert np.all((probe.t[b] >= probe.edges[b]) & (probe.t[b] < probe.edges[b + 1]))
    again = probes.timestep_bucket_gradients(model, SCHEDULE, x0, buckets=4, rng_seed=7)
    np.testing.assert_array_equal(again.cosine, probe.cosine)  # a function of the weights only


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_timestep_probe_bucket_gradients_average_to_the_full_batch_gradient(kind, rng):
    cpu = get_backend("cpu")
    if kind == "mlp":
        model, x0 = _randomise(_mlp(cpu), rng), rng.standard_normal((6, 2))
    else:  # GroupNorm normalises per sample, so the UNet has no batch coupling either
        model = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4,
                     dtype="float64", seed=0)
        model, x0 = _randomise(model, rng, 0.2), rng.uniform(-1, 1, (3, 1, 8, 8))
    probe = probes.timestep_bucket_gradients(model, SCHEDULE, x0, buckets=3, rng_seed=1, keep_grads=True)
    mean = np.mean([to_numpy(probes.flatten(g)) for g in probe.grads], axis=0)
    noise = np.random.default_rng(1).standard_normal(x0.shape)  # the probe draws the noise first, as documented
    full = _full_batch_grad(model, np.concatenate([x0] * 3), probe.t.reshape(-1), np.concatenate([noise] * 3))
    np.testing.assert_allclose(mean, full, rtol=1e-9, atol=1e-12)
    gram = np.array([[to_numpy(probes.flatten(a)) @ to_numpy(probes.flatten(b)) for b in probe.grads]
                     for a in probe.grads])
    np.testing.assert_allclose(probe.grad_norms, np.sqrt(np.diag(gram)), rtol=1e-10)
    np.testing.assert_allclose(probe.cosine, gram / np.outer(probe.grad_norms, probe.grad_norms), atol=1e-10)


# --- gradient noise scale -------------------------------------------------------------------------------------------

def test_noise_scale_estimators_recover_known_trace_and_gradient_norm():
    # per-sample gradients g_i = G + e_i, Cov(e) = diag(s2): |G|^2 and tr(Sigma) = sum(s2) are known exactly
    rng = np.random.default_rng(0)
    d, b_small, k, trials = 20, 8, 4, 4000
    G, s2 = rng.standard_normal(d) * 0.3, rng.uniform(0.5, 2.0, d)
    samples = G + rng.standard_normal((trials, k, b_small, d)) * np.sqrt(s2)
    micro = samples.mean(axis=2)                                   # (trials, K, d) micro-batch gradients
    g_small_sq = np.mean(np.sum(micro ** 2, axis=-1), axis=1)      # mean_k |g_k|^2
    g_big_sq = np.sum(micro.mean(axis=1) ** 2, axis=-1)            # |mean_k g_k|^2
    est = probes.noise_scale_from_norms(g_small_sq, g_big_sq, b_small, k * b_small)
    # unbiased: averaged over trials, within 5% of the truth (the standard errors here are ~1%)
    assert np.mean(est.grad_sq) == pytest.approx(G @ G, rel=0.05)
    assert np.mean(est.trace_sigma) == pytest.approx(s2.sum(), rel=0.05)
    ratio = np.mean(est.trace_sigma) / np.mean(est.grad_sq)
    assert ratio == pytest.approx(s2.sum() / (G @ G), rel=0.08)
    # the naive |G_big|^2 is biased upwards by tr(Sigma) / B_big; the estimator removes that
    assert np.mean(g_big_sq) == pytest.approx(G @ G + s2.sum() / (k * b_small), rel=0.05)


def test_noise_scale_from_norms_is_exact_on_noiseless_expectations_and_flags_unresolved_signal():
    g2, tr, bs, bb = 2.0, 30.0, 4, 16
    est = probes.noise_scale_from_norms(g2 + tr / bs, g2 + tr / bb, bs, bb)
    assert est.grad_sq == pytest.approx(g2) and est.trace_sigma == pytest.approx(tr)
    assert est.b_simple == pytest.approx(tr / g2)
    assert probes.noise_scale_from_norms(1.0, 0.2, 2, 8).b_simple == np.inf  # |G|^2 estimate < 0
    with pytest.raises(ValueError):
        probes.noise_scale_from_norms(1.0, 0.5, 8, 8)


def test_noise_scale_on_a_model_uses_micro_batch_and_full_batch_gradients(backend, rng):
    model = _randomise(_mlp(backend), rng)
    x0 = rng.standard_normal((13, 2))  # 4 micro-batches of 3; the 13th sample is dropped
    ns = probes.noise_scale(model, SCHEDULE, x0, micro_batches=4, buckets=2, rng_seed=5)
    assert (ns.b_small, ns.b_big) == (3, 12)
    draws = np.random.default_rng(5)
    noise, t = draws.standard_normal((12, 2)), draws.integers(0, 100, size=12)
    full = _full_batch_grad(model, x0[:12], t, noise)
    assert ns.overall.g_big_sq == pytest.approx(full @ full, rel=1e-9)
    micro = [_full_batch_grad(model, x0[i:i + 3], t[i:i + 3], noise[i:i + 3]) for i in range(0, 12, 3)]
    assert ns.overall.g_small_sq == pytest.approx(np.mean([g @ g for g in micro]), rel=1e-9)
    assert ns.overall.trace_sigma > 0
    assert np.shape(ns.per_bucket.b_simple) == (2,) and np.all(np.isfinite(ns.per_bucket.trace_sigma))
    np.testing.assert_array_equal(ns.edges, [0, 50, 100])


# --- alignment ------------------------------------------------------------------------------------------------------

def test_cosine_of_parallel_opposite_orthogonal_and_zero_dicts(backend):
    a = {"w": backend.asarray(np.array([[1.0, 2.0]])), "b": backend.asarray(np.array([3.0]))}
    neg = {k: -2 * v for k, v in a.items()}
    orth = {"w": backend.asarray(np.array([[2.0, -1.0]])), "b": backend.asarray(np.array([0.0]))}
    zero = {k: 0 * v for k, v in a.items()}
    assert to_float(probes.cosine(a, neg)) == pytest.approx(-1.0)
    assert to_float(probes.cosine(a, {k: 3 * v for k, v in a.items()})) == pytest.approx(1.0)
    assert to_float(probes.cosine(a, orth)) == pytest.approx(0.0, abs=1e-12)
    assert to_float(probes.cosine(a, zero)) == 0.0
    with pytest.raises(KeyError):
        probes.cosine(a, {"w": a["w"]})


def test_momentum_alignment_reads_the_optimizer_buffer(backend, rng):
    params = {"w": backend.asarray(rng.standard_normal((3, 2)))}
    g1 = {"w": backend.asarray(rng.standard_normal((3, 2)))}
    assert probes.momentum_alignment(g1, SGD(params, lr=0.1)) is None  # no buffer without momentum
    for opt in (SGD(params, lr=0.1, momentum=0.9), Adam(params, lr=0.1)):
        assert to_float(probes.momentum_alignment(g1, opt)) == 0.0     # the buffer starts at zero
        opt.step(g1)
        assert to_float(probes.momentum_alignment(g1, opt)) == pytest.approx(1.0)  # buffer ∝ g1 after one step
        assert to_float(probes.momentum_alignment({"w": -g1["w"]}, opt)) == pytest.approx(-1.0)


def test_consecutive_gradient_cosine_keeps_a_copy_not_a_reference(backend):
    tracker = probes.GradientCosine()
    g = {"w": backend.asarray(np.array([1.0, 0.0]))}
    assert tracker.update(g) is None
    g["w"][...] = backend.asarray(np.array([1.0, 1.0]))  # the trainer reuses its gradient arrays in place
    assert to_float(tracker.update(g)) == pytest.approx(np.sqrt(0.5))
    assert to_float(tracker.update({"w": backend.asarray(np.array([-1.0, -1.0]))})) == pytest.approx(-1.0)


def test_update_to_weight_groups_weight_and_bias_by_layer(backend):
    before = {"a.weight": backend.asarray(np.array([3.0, 0.0])), "a.bias": backend.asarray(np.array([4.0])),
              "b.weight": backend.asarray(np.array([0.0, 0.0]))}
    snap = probes.snapshot(before)
    before["a.weight"] += backend.asarray(np.array([0.0, 0.5]))  # updated in place, as optimizers do
    ratios = probes.update_to_weight(snap, before)
    assert set(ratios) == {"a", "b"}
    assert to_float(ratios["a"]) == pytest.approx(0.5 / 5.0)
    assert to_float(ratios["b"]) == 0.0
    per_param = probes.update_to_weight(snap, before, per="param")
    assert to_float(per_param["a.weight"]) == pytest.approx(0.5 / 3.0) and to_float(per_param["a.bias"]) == 0.0


# --- split-half ceiling -----------------------------------------------------------------------------------------------

class _BiasModel:
    """out = b for every sample (D,): dL/db of the eps-MSE is (2 / (N D)) sum_i (b - eps_i), so the gradient of a
    half is (2 / D)(b - mean of its noise) and the split-half cosine is known from the noise alone."""

    def __init__(self, bias):
        self.params = {"bias": np.asarray(bias, dtype=np.float64)}
        self.backend, self.dtype, self.tape = get_backend("cpu"), np.float64, []

    def forward(self, x, t, cache=True):
        if cache:
            self.tape.append(x.shape)
        return np.broadcast_to(self.params["bias"], x.shape).copy()

    def backward(self, dout):
        assert self.tape.pop() == dout.shape
        return {"bias": dout.sum(axis=0)}


def test_split_half_cosine_is_the_cosine_of_the_two_halves_gradients():
    D, N = 50, 20
    bias = np.linspace(-1.0, 1.0, D)
    probe = probes.timestep_bucket_gradients(_BiasModel(bias), SCHEDULE, np.zeros((N, D)), buckets=3, rng_seed=4,
                                             split_half=True)
    noise = np.random.default_rng(4).standard_normal((N, D))   # the probe's first draw
    a, b = bias - noise[:10].mean(axis=0), bias - noise[10:].mean(axis=0)
    expected = a @ b / np.sqrt((a @ a) * (b @ b))
    np.testing.assert_allclose(probe.split_half, expected, rtol=1e-12)   # same x0 and noise in every bucket
    assert probe.split_half.shape == (3,)
    plain = probes.timestep_bucket_gradients(_BiasModel(bias), SCHEDULE, np.zeros((N, D)), buckets=3, rng_seed=4)
    assert plain.split_half is None
    for x, y in ((plain.grad_norms, probe.grad_norms), (plain.cosine, probe.cosine), (plain.losses, probe.losses)):
        assert x.tobytes() == y.tobytes()   # the halves change none of the other numbers


@pytest.mark.parametrize("signal, expected", [(0.0, 0.0), (1.0, 0.5), (30.0, 1.0)])
def test_split_half_cosine_reads_signal_against_noise(signal, expected):
    """Halves of h samples: cos ~ |b|^2 / (|b|^2 + D / h). With |b|^2 = signal * D / h: 0 for no signal, 1/2 when
    signal and noise are equal, ~1 when the signal dominates."""
    D, N = 4000, 64
    bias = np.full(D, np.sqrt(signal / (N // 2)))
    probe = probes.timestep_bucket_gradients(_BiasModel(bias), SCHEDULE, np.zeros((N, D)), buckets=1, rng_seed=0,
                                             split_half=True)
    assert probe.split_half[0] == pytest.approx(expected, abs=0.05)
