"""Schedules against published numbers and against their formulas written out independently, step by step."""

import math

import numpy as np
import pytest

from minidiff.backend import get_backend
from minidiff.diffusion.schedules import ABAR_FLOOR, SCHEDULES, extract, make_schedule

TABLE_T = [0, 99, 249, 499, 749, 999]
LINEAR_ABAR = [0.9999, 0.897018, 0.524085, 0.0785872, 0.00335055, 4.03583e-5]
COSINE_ABAR = [0.999959, 0.972093, 0.847012, 0.493844, 0.144272, 2.42877e-9]


def test_linear_and_cosine_alphas_cumprod_match_published_table():
    np.testing.assert_allclose(make_schedule("linear").alphas_cumprod[TABLE_T], LINEAR_ABAR, rtol=2e-6)
    np.testing.assert_allclose(make_schedule("cosine").alphas_cumprod[TABLE_T], COSINE_ABAR, rtol=2e-6)


def test_linear_posterior_variance_matches_published_values():
    pv = make_schedule("linear").posterior_variance
    assert pv[0] == 0.0
    np.testing.assert_allclose(pv[[487, 999]], [0.0097916, 0.02], rtol=1e-5)


def test_sigmoid_and_scaled_linear_match_reference():
    np.testing.assert_allclose(make_schedule("sigmoid").alphas_cumprod[999], 3.968e-5, rtol=1e-3)
    betas = make_schedule("scaled_linear").betas
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), (math.sqrt(0.02) - 1e-2) / 999, rtol=1e-9)


def test_only_cosine_last_beta_reaches_the_clip():
    betas = make_schedule("cosine").betas
    assert betas[-1] == 0.999
    assert betas[:-1].max() < 0.999
    np.testing.assert_allclose(betas[-3:-1], [0.555554, 0.749999], atol=1e-6)
    for name in ("linear", "scaled_linear", "sigmoid"):
        assert make_schedule(name).betas.max() < 0.999, name


def _reference_betas(name, T):
    """The published formulas, one timestep at a time (improved DDPM's 1000/T scaling for the beta ranges)."""
    if name == "cosine":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    out = []
    for i in range(T):
        frac = i / (T - 1)
        if name == "linear":
            b = lo + frac * (hi - lo)
        elif name == "scaled_linear":
            b = (math.sqrt(lo) + frac * (math.sqrt(hi) - math.sqrt(lo))) ** 2
        else:
            b = 1 / (1 + math.exp(-(-6 + 12 * frac))) * (hi - lo) + lo
        out.append(min(b, 0.999))
    return out


@pytest.mark.parametrize("T", [10, 1000])
@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_array_matches_its_formula(name, T):
    s = make_schedule(name, T)
    betas = _reference_betas(name, T)
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        abar.append(prod)
    abar_prev = [1.0] + abar[:-1]
    np.testing.assert_allclose(s.betas, betas, rtol=1e-12)
    np.testing.assert_allclose(s.alphas, [1 - b for b in betas], rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-10)
    np.testing.assert_allclose(s.alphas_cumprod_prev, abar_prev, rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod, [math.sqrt(a) for a in abar], rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, [math.sqrt(1 - a) for a in abar], rtol=1e-10)
    np.testing.assert_allclose(s.snr, [a / (1 - a) for a in abar], rtol=1e-9)
    pv = [b * (1 - ap) / (1 - a) for b, a, ap in zip(betas, abar, abar_prev)]
    np.testing.assert_allclose(s.posterior_variance, pv, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(s.posterior_log_variance_clipped, np.log([pv[1]] + pv[1:]), rtol=1e-9)
    coef1 = [b * math.sqrt(ap) / (1 - a) for b, a, ap in zip(betas, abar, abar_prev)]
    coef2 = [(1 - ap) * math.sqrt(1 - b) / (1 - a) for b, a, ap in zip(betas, abar, abar_prev)]
    np.testing.assert_allclose(s.posterior_mean_coef1, coef1, rtol=1e-9)
    np.testing.assert_allclose(s.posterior_mean_coef2, coef2, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(s.sqrt_recip_alphas_cumprod, [1 / math.sqrt(a) for a in abar], rtol=1e-9)
    assert s.num_train_timesteps == T == len(s)
    assert all(a.dtype == np.float64 and a.shape == (T,) for a in (s.betas, s.snr, s.posterior_variance))


def test_beta_ranges_scale_by_1000_over_T_and_clip():
    np.testing.assert_allclose(make_schedule("linear", 4000).betas, np.linspace(2.5e-5, 5e-3, 4000), rtol=1e-12)
    np.testing.assert_allclose(make_schedule("linear", 10).betas, np.minimum(np.linspace(0.01, 2.0, 10), 0.999))
    unscaled = {T: make_schedule("linear", T, scale_with_T=False).sqrt_alphas_cumprod[-1] for T in (50, 250, 1000)}
    np.testing.assert_allclose([unscaled[50], unscaled[250], unscaled[1000]], [0.78, 0.28, 0.0064], atol=0.005)
    for T in (50, 250, 4000):  # scaling keeps the terminal signal near the T = 1000 value
        assert make_schedule("linear", T).sqrt_alphas_cumprod[-1] < 0.01, T


@pytest.mark.parametrize("T", [10, 1000])
@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr_rescale_is_finite_and_keeps_first_abar(name, T):
    old = make_schedule(name, T)
    new = make_schedule(name, T, rescale_zero_terminal_snr=True)
    assert new.alphas_cumprod[-1] == 0.0 and new.snr[-1] == 0.0 and new.betas[-1] == 1.0
    np.testing.assert_allclose(new.alphas_cumprod[0], old.alphas_cumprod[0], rtol=1e-12)
    # Lin et al. Algorithm 1: sqrt(abar) is shifted and scaled, i.e. an affine function of the old one
    a, b = np.polyfit(old.sqrt_alphas_cumprod, new.sqrt_alphas_cumprod, 1)
    np.testing.assert_allclose(a * old.sqrt_alphas_cumprod + b, new.sqrt_alphas_cumprod, atol=1e-12)
    for key in ("posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                "posterior_mean_coef2", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "snr"):
        assert np.isfinite(getattr(new, key)).all(), key
    assert new.sqrt_recip_alphas_cumprod[-1] == pytest.approx(ABAR_FLOOR ** -0.5)


def test_schedule_arrays_are_read_only():
    with pytest.raises(ValueError):
        make_schedule("linear", 10).betas[0] = 0.5


def test_extract_broadcasts_on_the_backend_of_x(cpu_backend):
    s = make_schedule("cosine", 10)
    x = cpu_backend.asarray(np.zeros((3, 2, 4, 4)), dtype=np.float32)
    out = extract(s.alphas_cumprod, np.array([0, 9, 4]), x)
    assert type(out) is type(x) and out.dtype == np.float32 and out.shape == (3, 1, 1, 1)
    np.testing.assert_allclose(cpu_backend.asnumpy(out).ravel(), s.alphas_cumprod[[0, 9, 4]], rtol=1e-7)


@pytest.mark.parametrize("bad_t, match", [(np.array([0, 10]), "lie in"), (np.array([-1, 0]), "lie in"),
                                          (np.array([0.0, 1.0]), "integer"), (np.array([0, 1, 2]), "shape")])
def test_extract_rejects_bad_timesteps(bad_t, match):
    s = make_schedule("linear", 10)
    with pytest.raises(ValueError, match=match):
        extract(s.betas, bad_t, get_backend("cpu").asarray(np.zeros((2, 3))))


@pytest.mark.parametrize("args, kwargs, match", [
    (("quadratic",), {}, "name 'quadratic'"),
    (("linear", 1), {}, "num_train_timesteps"),
    (("cosine", 10.5), {}, "num_train_timesteps"),
    (("linear",), {"bogus": 1}, "option 'bogus'"),
    (("cosine",), {"beta_start": 1e-3}, "option 'beta_start'"),
    (("cosine",), {"max_beta": 1.5}, "max_beta"),
    (("linear",), {"beta_start": 0.1, "beta_end": 0.01}, "beta_start"),
])
def test_bad_schedule_options_raise_value_error_naming_them(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(*args, **kwargs)
