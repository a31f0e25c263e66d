"""The held-out denoising loss: the training objective on a fixed set of (x0, t, noise) triples never trained on.

    vs = validation_set(dataset.test, T, buckets=10, n=1024)       # the same triples for every run of a data set
    loss, per_bucket = validation_loss(model_fn, schedule, vs, batch_size=128, backend=be, dtype=np.float32)

The triples: x0 are the data's held-out split (`Dataset.test`) in order, repeated to reach n; t is stratified over
the K timestep buckets (floor(t K / T) = k, minidiff.diffusion.timesteps) -- n // K per bucket, the remainder one more
in r buckets drawn at random, t uniform within its bucket, the t then shuffled over the samples; the noise is
standard normal. Every draw comes from numpy.random.default_rng(VALIDATION_SEED), a fixed seed that no run's own seed
enters, in this order: the remainder's buckets, the t, the shuffle, the noise. So every run of a data set is measured
on the same triples where its held-out split is the same: the fixed data (the bundled digits, a user's file) split
the same way whatever the seed; procedural sets (shapes, the point sets) are generated from the run's seed, so their
x0 differ between seeds while t and the noise do not.

The loss is `diffusion.training_loss` on each triple (the run's prediction target and weighting, no importance
weights: t is given), evaluated forward only, in batches; means in float64 on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minidiff.backend import to_numpy
from minidiff.diffusion.losses import training_loss
from minidiff.diffusion.timesteps import StratifiedSampler, timestep_bucket_edges

VALIDATION_SEED = 7_777   # fixed: every run of a data set is measured on the same triples


class ValidationSet(NamedTuple):
    x0: np.ndarray       # host (n, ...) in the data's dtype
    t: np.ndarray        # host int64 (n,)
    noise: np.ndarray    # host float64 (n, ...)
    bucket: np.ndarray   # host int64 (n,): the timestep bucket of each t
    buckets: int         # K


def validation_set(held_out, num_timesteps, buckets, n, seed=VALIDATION_SEED) -> ValidationSet:
    """n triples from the held-out samples (host (M, ...), M >= 1); see the module docstring for the draws."""
    held_out = np.asarray(held_out)
    if held_out.shape[0] == 0:
        raise ValueError("the data has no held-out samples to validate on (holdout is 0)")
    n = int(n)
    rng = np.random.default_rng(seed)
    t = StratifiedSampler(num_timesteps, buckets).sample(n, rng)[0]
    t = t[rng.permutation(n)]
    x0 = held_out[np.arange(n) % held_out.shape[0]]
    noise = rng.standard_normal(x0.shape)
    edges = timestep_bucket_edges(num_timesteps, buckets)
    bucket = np.searchsorted(edges, t, side="right").astype(np.int64) - 1
    return ValidationSet(x0, t, noise, bucket, int(buckets))


def per_sample_losses(model_fn, schedule, vs: ValidationSet, batch_size, backend, dtype, prediction="epsilon",
                      weighting="uniform", min_snr_gamma=5.0) -> np.ndarray:
    """`training_loss(...).per_sample_loss` of every triple (weighting factor x MSE), host float64 (n,), in batches of
    batch_size. model_fn(x_t, t) -> the model's output (forward only)."""
    out = []
    for a in range(0, len(vs.t), int(batch_size)):
        b = a + int(batch_size)
        x0 = backend.asarray(vs.x0[a:b], dtype=dtype)
        res = training_loss(model_fn, x0, schedule, None, prediction=prediction, weighting=weighting,
                            min_snr_gamma=min_snr_gamma, t=vs.t[a:b], noise=vs.noise[a:b])
        out.append(np.asarray(to_numpy(res.per_sample_loss), dtype=np.float64))
    return np.concatenate(out)


def validation_loss(model_fn, schedule, vs: ValidationSet, batch_size, backend, dtype, **loss_kw):
    """-> (mean loss over all triples, per-bucket means host float64 (K,), NaN for a bucket without triples)."""
    losses = per_sample_losses(model_fn, schedule, vs, batch_size, backend, dtype, **loss_kw)
    sums = np.bincount(vs.bucket, weights=losses, minlength=vs.buckets)
    counts = np.bincount(vs.bucket, minlength=vs.buckets)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_bucket = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return float(losses.mean()), per_bucket
