"""Sample-quality metrics: a Frechet distance in a digits classifier's feature space, and sliced Wasserstein for points.

    fd = digits_fd(samples)                      # samples (N, 1, 8, 8) in [-1, 1] -> FD to the held-out real digits
    sw = sliced_wasserstein(samples, held_out)   # 2-D points (N, 2) vs (M, 2)
    reference_levels()                           # the floor and ceiling an FD should be read against

The Frechet distance (Heusel et al. 2017, the FID formula) between Gaussians fitted to two feature sets is
    FD = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)),
here in the 64-d penultimate layer of `minidiff.instruments.classifier.DigitsClassifier` instead of Inception's
pool3. Like FID it is biased upwards by small sample sizes, so compare numbers computed with the same number of
samples, and read them against `reference_levels()`: the floor (training digits vs the held-out digits: what a
perfect generator would score) and the ceiling (Gaussian noise images vs the held-out digits). data/README.md gives
both for the shipped classifier at the sample counts the project uses.

Everything here runs on the host in float64 (the inputs are copied with `to_numpy`): these are evaluation numbers,
computed rarely, on small arrays; the classifier's forward is the only array work and it is tiny.
"""

from __future__ import annotations

import functools

import numpy as np

from minidiff.backend import to_numpy
from minidiff.instruments.classifier import load_classifier
from minidiff.datasets import load_dataset


def metric_for(dataset) -> str | None:
    """The sample-quality metric a data set has: "fd" for the bundled 8x8 digits, "swd" for point sets, None for
    anything else (no feature space to measure other images in). Training (minidiff.instruments.recorder) and `minidiff
    evaluate` both ask here."""
    if dataset.kind == "points":
        return "swd"
    if dataset.name == "digits" and dataset.shape == (1, 8, 8):
        return "fd"
    return None


# --- the Frechet distance -------------------------------------------------------------------------------------------

def feature_stats(features):
    """features (N, D), N >= 2 -> (mu (D,), cov (D, D)) host float64; cov unbiased (N - 1), as in FID."""
    f = np.asarray(to_numpy(features), dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(c):
    """Symmetric PSD matrix -> its symmetric square root, eigenvalues rounded below zero clipped to 0."""
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """FD between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982): |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    tr((C1 C2)^(1/2)) is the sum of square roots of the eigenvalues of C1 C2, which are those of the symmetric PSD
    matrix C1^(1/2) C2 C1^(1/2); so two `eigh` calls replace scipy's sqrtm and no complex parts appear. A result
    rounded below zero (identical statistics) is returned as 0.
    """
    mu1, mu2 = (np.asarray(to_numpy(m), dtype=np.float64).ravel() for m in (mu1, mu2))
    c1, c2 = (np.atleast_2d(np.asarray(to_numpy(c), dtype=np.float64)) for c in (cov1, cov2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(f"shapes disagree: mu1 {mu1.shape}, mu2 {mu2.shape}, cov1 {c1.shape}, cov2 {c2.shape}")
    s1 = _sqrt_psd((c1 + c1.T) / 2)
    m = s1 @ c2 @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt), 0.0)


def frechet_distance_features(features1, features2) -> float:
    """FD between Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


# --- digits ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def default_classifier():
    """The shipped classifier (data/digits_classifier.npz) on the host, loaded once."""
    return load_classifier()


@functools.lru_cache(maxsize=1)
def _heldout_digits():
    ds = load_dataset("digits", seed=0)
    return ds.train, ds.test


def digits_features(images, classifier=None, batch_size=512):
    """images (N, 1, 8, 8) in [-1, 1], host or device -> classifier features, host float64 (N, feature_dim)."""
    clf = classifier or default_classifier()
    images = np.asarray(to_numpy(images))
    if images.ndim != 4 or images.shape[1:] != (1, 8, 8):
        raise ValueError(f"digits_fd needs images shaped (N, 1, 8, 8), got {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("images hold NaN or Inf values")
    out = [to_numpy(clf.features(images[i:i + batch_size])) for i in range(0, images.shape[0], batch_size)]
    return np.concatenate(out).astype(np.float64)


def digits_fd(images, classifier=None, reference=None) -> float:
    """FD between images (N, 1, 8, 8) in [-1, 1] and the held-out real digits (the test split of
    `load_dataset("digits", seed=0)`, 180 images) in the classifier's feature space (default: the shipped one).

    reference: other real images to compare against instead of the held-out split. Values outside [-1, 1] are not
    clipped: a sampler's clipping is part of what is being measured.
    """
    real = _heldout_digits()[1] if reference is None else reference
    return frechet_distance_features(digits_features(images, classifier), digits_features(real, classifier))


def reference_levels(num_samples=1000, seed=0, classifier=None) -> dict:
    """The numbers a digits FD is read against, measured now with the given (default: shipped) classifier.

    floor: all training digits (1617) vs the held-out ones (180) — two samples of the real distribution.
    floor_subsample: `num_samples` training digits (drawn without replacement, at most all) vs held-out — the floor
        at the sample size the generated set has, since FD grows as N shrinks.
    ceiling: `num_samples` images of N(0, 1) noise clipped to [-1, 1] (a sampler's output range) vs held-out.
    Host floats; the draws come from numpy.random.default_rng(seed).
    """
    train, test = _heldout_digits()
    rng = np.random.default_rng(seed)
    n = min(int(num_samples), train.shape[0])
    subset = train[np.sort(rng.choice(train.shape[0], size=n, replace=False))]
    noise = np.clip(rng.standard_normal((int(num_samples),) + test.shape[1:]), -1.0, 1.0)
    return {"floor": digits_fd(train, classifier), "floor_subsample": digits_fd(subset, classifier),
            "ceiling": digits_fd(noise, classifier), "num_samples": int(num_samples), "num_heldout": test.shape[0]}


# --- 2-D points -----------------------------------------------------------------------------------------------------

def _quantile_gaps(px, py):
    """Sorted projections px (P, N), py (P, M) -> (|F^-1(u) - G^-1(u)| on each piece (P, K), piece lengths (K,)).

    Both empirical quantile functions are constant on the pieces between the breakpoints {i/N} U {j/M}; each piece
    is evaluated at its midpoint, so the 1-D Wasserstein integral over u in (0, 1) is an exact finite sum.
    """
    n, m = px.shape[1], py.shape[1]
    u = np.unique(np.concatenate([np.arange(n + 1) / n, np.arange(m + 1) / m]))
    mid, width = (u[1:] + u[:-1]) / 2, np.diff(u)
    ix = np.minimum((mid * n).astype(np.int64), n - 1)
    iy = np.minimum((mid * m).astype(np.int64), m - 1)
    return np.abs(px[:, ix] - py[:, iy]), width


def sliced_wasserstein(x, y, num_projections=128, seed=0, p=2) -> float:
    """Sliced Wasserstein distance SW_p(x, y) = (mean_k W_p(<theta_k, x>, <theta_k, y>)^p)^(1/p) (Bonneel et al. 2015).

    x (N, D), y (M, D) point clouds (host or device); theta_k uniform on the unit sphere from
    numpy.random.default_rng(seed) (the same seed gives the same directions, so runs compare on equal terms).
    Each 1-D W_p between the projected empirical distributions is exact (quantile functions, `_quantile_gaps`),
    N and M may differ. Shifting a cloud by s gives W_p = |<theta_k, s>| on every projection.
    """
    x, y = (np.asarray(to_numpy(a), dtype=np.float64) for a in (x, y))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) == 0:
        raise ValueError(f"need non-empty point clouds (N, D) and (M, D), got {x.shape} and {y.shape}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    theta = np.random.default_rng(seed).standard_normal((int(num_projections), x.shape[1]))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    gaps, width = _quantile_gaps(np.sort(theta @ x.T, axis=1), np.sort(theta @ y.T, axis=1))
    per_projection = (gaps ** p) @ width
    return float(np.mean(per_projection) ** (1.0 / p))
