"""Sample-quality metrics (Frechet distance, sliced Wasserstein) and the digits classifier behind the FD."""

import numpy as np
import pytest

from minidiff.instruments import quality
from minidiff.backend import get_backend
from minidiff.instruments.classifier import DigitsClassifier, load_classifier, softmax_cross_entropy_backward, \
    softmax_cross_entropy_forward
from minidiff.datasets import load_dataset


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --- Frechet distance -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 3, 16])
def test_frechet_distance_matches_closed_form_for_diagonal_covariances(d, rng):
    for _ in range(3):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
        expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
        got = quality.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_distance_full_covariances_match_eigenvalues_of_the_product(rng):
    # an independent route to tr sqrt(C1 C2): the (real, non-negative) eigenvalues of the non-symmetric product
    for _ in range(3):
        c1, c2 = _random_spd(rng, 8), _random_spd(rng, 8)
        mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
        tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(c1 @ c2).real))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
        assert quality.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_and_zero_for_identical_stats(rng):
    c1, c2 = _random_spd(rng, 10), _random_spd(rng, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    assert quality.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(quality.frechet_distance(mu2, c2, mu1, c1),
                                                                       rel=1e-10)
    assert quality.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)
    singular = np.outer(mu1, mu1)  # rank 1: PSD square roots must survive zero eigenvalues
    assert quality.frechet_distance(mu1, singular, mu1, singular) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes disagree"):
        quality.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_stats_are_mean_and_unbiased_covariance(rng):
    f = rng.standard_normal((50, 4)) * [1, 2, 3, 4]
    mu, cov = quality.feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(cov, (f - f.mean(0)).T @ (f - f.mean(0)) / 49)
    with pytest.raises(ValueError):
        quality.feature_stats(f[:1])


# --- sliced Wasserstein ---------------------------------------------------------------------------------------------

def _directions(num, d, seed):
    theta = np.random.default_rng(seed).standard_normal((num, d))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def test_sliced_wasserstein_of_a_shifted_cloud_is_the_mean_projected_shift(rng):
    x = rng.standard_normal((300, 2))
    shift = np.array([0.7, -1.9])
    theta = _directions(64, 2, seed=5)
    sw1 = quality.sliced_wasserstein(x, x + shift, num_projections=64, seed=5, p=1)
    sw2 = quality.sliced_wasserstein(x, x + shift, num_projections=64, seed=5, p=2)
    assert sw1 == pytest.approx(np.mean(np.abs(theta @ shift)), rel=1e-10)
    assert sw2 == pytest.approx(np.sqrt(np.mean((theta @ shift) ** 2)), rel=1e-10)
    # many directions: E|<theta, s>| = 2|s|/pi and sqrt(E<theta, s>^2) = |s|/sqrt(2) on the circle
    many = quality.sliced_wasserstein(x, x + shift, num_projections=4000, seed=1, p=1)
    assert many == pytest.approx(2 * np.linalg.norm(shift) / np.pi, rel=0.02)


def test_sliced_wasserstein_is_zero_for_the_same_distribution_at_different_sizes(rng):
    x = rng.standard_normal((40, 2))
    y = rng.permutation(np.concatenate([x, x, x]))  # the same empirical distribution, 3x the points
    assert quality.sliced_wasserstein(x, y) == pytest.approx(0.0, abs=1e-12)
    assert quality.sliced_wasserstein(x, x[::-1]) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_unequal_sizes_match_cdf_integral(rng):
    # W1 in 1-D is the integral of |F - G|, an independent formula for the quantile sum used in the code
    x, y = rng.standard_normal((37, 2)), rng.standard_normal((53, 2)) + 0.3
    theta = _directions(8, 2, seed=3)
    expected = []
    for th in theta:
        px, py = np.sort(x @ th), np.sort(y @ th)
        z = np.sort(np.concatenate([px, py]))
        f = np.searchsorted(px, z[:-1], side="right") / len(px)
        g = np.searchsorted(py, z[:-1], side="right") / len(py)
        expected.append(np.sum(np.abs(f - g) * np.diff(z)))
    got = quality.sliced_wasserstein(x, y, num_projections=8, seed=3, p=1)
    assert got == pytest.approx(np.mean(expected), rel=1e-10)


# --- the classifier -------------------------------------------------------------------------------------------------

def test_softmax_cross_entropy_backward_matches_finite_differences(rng):
    z, y = rng.standard_normal((5, 10)) * 3, rng.integers(0, 10, 5)
    _, cache = softmax_cross_entropy_forward(z, y)
    dz = softmax_cross_entropy_backward(cache)
    num = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += 1e-6
        zm[idx] -= 1e-6
        num[idx] = (softmax_cross_entropy_forward(zp, y)[0] - softmax_cross_entropy_forward(zm, y)[0]) / 2e-6
    np.testing.assert_allclose(dz, num, atol=1e-8)
    big = softmax_cross_entropy_forward(np.array([[1000.0, 0.0]]), np.array([1]))[0]
    assert big == pytest.approx(1000.0)  # log-sum-exp does not overflow


def test_classifier_backward_matches_finite_differences_in_float64(rng):
    clf = DigitsClassifier(channels=(2, 3), feature_dim=5, image_size=4, seed=1, dtype="float64")
    x, y = rng.uniform(-1, 1, (3, 1, 4, 4)), np.array([0, 7, 3])

    def loss():
        return softmax_cross_entropy_forward(clf.forward(x), y)[0]

    _, cache = softmax_cross_entropy_forward(clf.forward(x), y)
    grads = clf.backward(softmax_cross_entropy_backward(cache))
    for name, p in clf.params.items():
        num = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + 1e-6
            lp = loss()
            p[idx] = old - 1e-6
            lm = loss()
            p[idx] = old
            num[idx] = (lp - lm) / 2e-6
        np.testing.assert_allclose(grads[name], num, rtol=1e-6, atol=1e-9, err_msg=name)


def test_classifier_features_agree_on_the_strict_backend(rng):
    x = rng.uniform(-1, 1, (4, 1, 8, 8))
    cpu = DigitsClassifier(seed=2, dtype="float64")
    strict = DigitsClassifier(seed=2, dtype="float64", device=get_backend("strict"))
    np.testing.assert_allclose(strict.features(x).get(), cpu.features(x), rtol=1e-12)
    np.testing.assert_array_equal(strict.predict(x), cpu.predict(x))


def test_shipped_classifier_loads_and_reaches_its_reported_heldout_accuracy():
    clf = load_classifier()
    ds = load_dataset("digits", seed=0)
    acc = clf.accuracy(ds.test, ds.test_labels)
    assert acc == pytest.approx(clf.meta["test_accuracy"], abs=1e-9)
    assert acc >= 0.9
    assert clf.meta["num_test"] == len(ds.test) and clf.meta["dataset_seed"] == 0


# --- digits FD and its reference levels -----------------------------------------------------------------------------

def test_digits_fd_is_zero_against_itself_and_noise_is_far_above_the_real_data_floor():
    ds = load_dataset("digits", seed=0)
    assert quality.digits_fd(ds.test) == pytest.approx(0.0, abs=1e-6)
    levels = quality.reference_levels(num_samples=400, seed=0)
    assert 0 < levels["floor"] <= levels["floor_subsample"] * 1.5
    assert levels["ceiling"] > 20 * levels["floor_subsample"]


def test_digits_fd_rejects_wrong_shapes_and_nan():
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        quality.digits_fd(np.zeros((4, 1, 16, 16)))
    with pytest.raises(ValueError, match="NaN"):
        quality.digits_fd(np.full((4, 1, 8, 8), np.nan))
