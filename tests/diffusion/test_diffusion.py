"""The forward process, target conversions, loss weights, timestep samplers, and the loss gradient."""

import numpy as np
import pytest

from minidiff.backend import get_backend
from minidiff.diffusion.losses import (PREDICTIONS, WEIGHTINGS, LossAwareSampler, UniformSampler, loss_weights,
                                model_output_to_x0_eps, predict_eps_from_x0, predict_v, predict_x0_from_eps,
                                q_posterior_mean_variance, q_sample, training_loss, x0_eps_from_v)
from minidiff.diffusion.schedules import make_schedule
from minidiff.backend.strict import StrictArray

CPU = get_backend("cpu")


def test_q_sample_is_ddpm_eq4_on_every_backend(cpu_backend, rng):
    s = make_schedule("linear", 1000)
    x0_h, noise_h = rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 3, 2))
    t = np.array([0, 999, 500, 0])
    x0, noise = cpu_backend.asarray(x0_h, np.float32), cpu_backend.asarray(noise_h, np.float32)
    x_t = q_sample(s, x0, t, noise)
    assert type(x_t) is type(x0) and x_t.dtype == np.float32
    a = s.alphas_cumprod[t][:, None, None]
    np.testing.assert_allclose(cpu_backend.asnumpy(x_t), np.sqrt(a) * x0_h + np.sqrt(1 - a) * noise_h, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("rescale", [False, True])
def test_target_conversions_invert_each_other_at_every_boundary(rescale, rng):
    s = make_schedule("cosine", 1000, rescale_zero_terminal_snr=rescale)
    t = np.array([0, 1, 500, 998, 999])
    x0, eps = CPU.asarray(rng.standard_normal((5, 3)), np.float64), CPU.asarray(rng.standard_normal((5, 3)), np.float64)
    x_t = q_sample(s, x0, t, eps)
    v = predict_v(s, x0, t, eps)
    x0_v, eps_v = x0_eps_from_v(s, x_t, t, v)
    np.testing.assert_allclose(x0_v, x0, atol=1e-12)
    np.testing.assert_allclose(eps_v, eps, atol=1e-12)
    np.testing.assert_allclose(predict_eps_from_x0(s, x_t, t, x0), eps, atol=1e-9)
    ok = slice(None, -1) if rescale else slice(None, -2)  # x0 from eps loses digits as abar -> 0 (and at abar = 0)
    np.testing.assert_allclose(predict_x0_from_eps(s, x_t, t, eps)[ok], x0[ok], atol=1e-6)
    for prediction, out in (("epsilon", eps), ("x0", x0), ("v", v)):
        got_x0, got_eps = model_output_to_x0_eps(s, x_t, t, out, prediction)
        assert np.isfinite(got_x0).all() and np.isfinite(got_eps).all()
        np.testing.assert_allclose(got_eps, eps, atol=1e-9)


def test_posterior_mean_is_consistent_with_forward_marginals():
    """Mixing q(x_{t-1} | x_t, x0) over q(x_t | x0) gives back q(x_{t-1} | x0): its mean and variance, DDPM eq. 6-7."""
    s = make_schedule("linear", 1000)
    t = np.array([1, 487, 999])
    x0 = CPU.asarray(np.array([[0.7], [0.7], [0.7]]), np.float64)
    ab, abp = s.alphas_cumprod[t][:, None], s.alphas_cumprod_prev[t][:, None]
    # mean = c1 x0 + c2 x_t is linear in x_t ~ N(sqrt(ab) x0, 1 - ab)
    mean_at_mean, var, _ = q_posterior_mean_variance(s, x0, np.sqrt(ab) * x0, t)
    np.testing.assert_allclose(mean_at_mean, np.sqrt(abp) * x0, rtol=1e-12)
    c2 = s.posterior_mean_coef2[t][:, None]
    np.testing.assert_allclose(c2 ** 2 * (1 - ab) + var, 1 - abp, rtol=1e-10)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_follow_hang_et_al(prediction):
    s = make_schedule("cosine", 1000, rescale_zero_terminal_snr=True)
    t = np.arange(1000)
    snr = s.snr
    w = loss_weights(s, t, prediction, "min_snr", 5.0)
    assert np.isfinite(w).all()
    expected = {"epsilon": np.minimum(snr[:-1], 5) / snr[:-1], "x0": np.minimum(snr[:-1], 5),
                "v": np.minimum(snr[:-1], 5) / (snr[:-1] + 1)}[prediction]
    np.testing.assert_allclose(w[:-1], expected, rtol=1e-12)
    assert w[-1] == {"epsilon": 1.0, "x0": 0.0, "v": 0.0}[prediction]  # SNR = 0: the limits, not 0/0
    np.testing.assert_array_equal(loss_weights(s, t, prediction, "uniform"), 1.0)


def _fixed_output_loss(s, out_h, x0_h, noise_h, t, prediction, weighting, sampler=None, seed=None):
    out = CPU.asarray(out_h, np.float64)
    rng = np.random.default_rng(seed) if seed is not None else None
    kwargs = {"t": t} if sampler is None else {"timestep_sampler": sampler}
    return training_loss(lambda x_t, tt: out, CPU.asarray(x0_h, np.float64), s, rng, prediction=prediction,
                         weighting=weighting, noise=noise_h, **kwargs)


def _check_gradient(loss_of, out_h, dout):
    h = 1e-3  # the loss is quadratic in the output, so central differences have no truncation error, only rounding
    num = np.zeros_like(out_h)
    for idx in np.ndindex(out_h.shape):
        plus, minus = out_h.copy(), out_h.copy()
        plus[idx] += h
        minus[idx] -= h
        num[idx] = (loss_of(plus) - loss_of(minus)) / (2 * h)
    np.testing.assert_allclose(dout, num, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_gradient_matches_finite_differences(prediction, weighting, rng):
    s = make_schedule("linear", 1000)
    t = np.array([0, 999, 10, 400])  # both boundaries; small t has SNR >> gamma, large t SNR << gamma
    x0_h, noise_h, out_h = (rng.standard_normal((4, 2, 3)) for _ in range(3))
    res = _fixed_output_loss(s, out_h, x0_h, noise_h, t, prediction, weighting)
    target = {"epsilon": noise_h, "x0": x0_h,
              "v": predict_v(s, CPU.asarray(x0_h), t, CPU.asarray(noise_h))}[prediction]
    w = loss_weights(s, t, prediction, weighting)
    np.testing.assert_allclose(res.loss, np.mean(w * ((out_h - target) ** 2).mean(axis=(1, 2))), rtol=1e-12)
    np.testing.assert_allclose(res.per_sample_loss, w * ((out_h - target) ** 2).mean(axis=(1, 2)), rtol=1e-12)
    _check_gradient(lambda o: _fixed_output_loss(s, o, x0_h, noise_h, t, prediction, weighting).loss, out_h, res.dout)


def test_loss_gradient_includes_importance_weights(rng):
    s = make_schedule("cosine", 20)
    sampler = LossAwareSampler(20, history=2)
    sampler.update(np.repeat(np.arange(20), 2), np.repeat(np.linspace(0.1, 3.0, 20), 2))
    x0_h, noise_h, out_h = (rng.standard_normal((5, 3)) for _ in range(3))
    res = _fixed_output_loss(s, out_h, x0_h, noise_h, None, "v", "min_snr", sampler=sampler, seed=1)
    importance = 1.0 / (20 * sampler.probabilities()[res.t])
    assert np.ptp(importance) > 0.1  # the weights really differ
    np.testing.assert_allclose(res.loss, np.mean(importance * res.per_sample_loss), rtol=1e-12)
    _check_gradient(lambda o: _fixed_output_loss(s, o, x0_h, noise_h, None, "v", "min_snr", sampler, 1).loss,
                    out_h, res.dout)


def test_linear_model_parameter_gradient_through_dout_matches_finite_differences(rng):
    """dout is what a model's backward receives: dL/dW = x_t^T dout for out = x_t W must match finite differences."""
    s = make_schedule("linear", 100)
    W = rng.standard_normal((4, 4)) * 0.3
    x0 = CPU.asarray(rng.standard_normal((6, 4)), np.float64)

    def run(weights):
        seen = {}
        def model_fn(x_t, t):
            seen["x_t"] = x_t
            return x_t @ weights
        return training_loss(model_fn, x0, s, np.random.default_rng(7), prediction="x0", weighting="min_snr"), seen

    res, seen = run(W)
    _check_gradient(lambda w: run(w)[0].loss, W, seen["x_t"].T @ res.dout)


def test_training_loss_draws_t_then_noise_from_the_host_rng(rng):
    s = make_schedule("linear", 50)
    x0 = CPU.asarray(rng.standard_normal((8, 3)), np.float32)
    seen = {}
    def model_fn(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return x_t * 0
    res = training_loss(model_fn, x0, s, np.random.default_rng(3))
    ref = np.random.default_rng(3)
    t = ref.integers(0, 50, size=8)
    noise = ref.standard_normal((8, 3)).astype(np.float32)
    np.testing.assert_array_equal(res.t, t)
    assert isinstance(res.t, np.ndarray) and res.t.dtype == np.int64 and seen["t"] is res.t
    np.testing.assert_allclose(seen["x_t"], q_sample(s, x0, t, noise), rtol=1e-6)
    assert res.loss.dtype == np.float32 and res.dout.dtype == np.float32
    again = training_loss(model_fn, x0, s, np.random.default_rng(3))
    np.testing.assert_array_equal(again.dout, res.dout)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_loss_under_strict_backend_never_converts_to_host(prediction, rng):
    s = make_schedule("cosine", 100)
    x0_h = rng.standard_normal((4, 2, 3))
    outs = {}
    for name in ("cpu", "strict"):
        be = get_backend(name)
        res = training_loss(lambda x_t, t: x_t * 0.5, be.asarray(x0_h, np.float32), s, np.random.default_rng(2),
                            prediction=prediction, weighting="min_snr", timestep_sampler=LossAwareSampler(100))
        outs[name] = res
    strict = outs["strict"]
    assert all(isinstance(a, StrictArray) for a in (strict.loss, strict.dout, strict.per_sample_loss))
    assert strict.loss.shape == () and strict.per_sample_loss.shape == (4,)
    np.testing.assert_array_equal(strict.dout.get(), outs["cpu"].dout)
    assert strict.loss.item() == float(outs["cpu"].loss)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_loss_is_finite_at_t0_and_zero_terminal_snr(prediction, weighting, rng):
    s = make_schedule("linear", 1000, rescale_zero_terminal_snr=True)
    x0 = CPU.asarray(rng.standard_normal((2, 3)), np.float32)
    with np.errstate(all="raise"):
        res = training_loss(lambda x_t, t: x_t, x0, s, rng, prediction=prediction, weighting=weighting,
                            t=np.array([0, 999]))
    assert np.isfinite(res.dout).all() and np.isfinite(res.loss) and np.isfinite(res.per_sample_loss).all()


def test_loss_aware_sampler_follows_improved_ddpm():
    sampler = LossAwareSampler(4, history=3, uniform_prob=0.1)
    np.testing.assert_allclose(sampler.probabilities(), 0.25)  # uniform until warmed up
    losses = {0: [1.0, 1.0, 1.0, 9.0], 1: [2.0] * 3, 2: [0.5] * 3, 3: [4.0] * 3}
    for t, values in losses.items():
        sampler.update(np.full(len(values), t), np.array(values))
    assert sampler.warmed_up()
    np.testing.assert_array_equal(sampler.loss_history[0], [1.0, 1.0, 9.0])  # oldest dropped
    rms = np.array([np.sqrt(np.mean(np.square([1.0, 1.0, 9.0]))), 2.0, 0.5, 4.0])
    p = 0.9 * rms / rms.sum() + 0.1 / 4
    np.testing.assert_allclose(sampler.probabilities(), p, rtol=1e-12)
    t, w = sampler.sample(20000, np.random.default_rng(0))
    np.testing.assert_allclose(w, 1.0 / (4 * p[t]), rtol=1e-12)
    np.testing.assert_allclose(np.bincount(t, minlength=4) / 20000, p, atol=0.01)
    np.testing.assert_allclose(np.mean(w * np.array([1.0, 2.0, 3.0, 4.0])[t]), 2.5, rtol=0.02)  # unbiased


def test_sampler_state_dict_resumes_exactly():
    a = LossAwareSampler(5, history=2)
    a.update(np.arange(10) % 5, np.linspace(0.1, 1.0, 10))
    b = LossAwareSampler(5, history=2)
    b.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.state_dict().items()})
    for sampler in (a, b):
        sampler.update(np.array([1, 1]), np.array([5.0, 6.0]))
    ta, wa = a.sample(16, np.random.default_rng(4))
    tb, wb = b.sample(16, np.random.default_rng(4))
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(wa, wb)
    with pytest.raises(ValueError, match="history"):
        LossAwareSampler(5, history=3).load_state_dict(a.state_dict())
    u = UniformSampler(5)
    u.load_state_dict(u.state_dict())
    t, w = u.sample(100, np.random.default_rng(0))
    assert t.min() >= 0 and t.max() <= 4 and (w == 1).all()


@pytest.mark.parametrize("kwargs, match", [({"prediction": "score"}, "prediction"), ({"weighting": "p2"}, "weighting"),
                                           ({"weighting": "min_snr", "min_snr_gamma": 0.0}, "min_snr_gamma")])
def test_bad_loss_options_raise_value_error_naming_them(kwargs, match):
    s = make_schedule("linear", 10)
    with pytest.raises(ValueError, match=match):
        training_loss(lambda x, t: x, CPU.asarray(np.zeros((2, 3))), s, np.random.default_rng(0), **kwargs)


def test_model_output_of_wrong_shape_is_rejected():
    s = make_schedule("linear", 10)
    with pytest.raises(ValueError, match="model output shape"):
        training_loss(lambda x, t: x[:, :2], CPU.asarray(np.zeros((2, 3))), s, np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, match", [({"history": 0}, "history"), ({"uniform_prob": 1.5}, "uniform_prob")])
def test_bad_sampler_options_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossAwareSampler(10, **kwargs)
