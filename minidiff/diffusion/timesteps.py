"""Timestep samplers that follow the timestep buckets or the course of a run: stratified, bucket_cycle, curriculum.

Beside `UniformSampler` and `LossAwareSampler` (minidiff.diffusion.losses) and with the same interface:
`sample(n, rng) -> (t host int64 (n,), importance weights host float64 (n,))`, `update`, `state_dict`,
`load_state_dict`. Every draw comes from the rng the caller passes (the trainer's host generator), in the order each
docstring gives, and the weights are all ones: these samplers change which t a batch sees, not what the loss means.
Samplers that depend on the batch index count the batches they have drawn (`batches`, in their state), so a run
resumed from a checkpoint draws exactly what an uninterrupted one does.

Buckets are those of the trainer's `timestep_loss` metric: with K buckets over T timesteps, bucket k holds the t with
floor(t K / T) = k (`timestep_bucket_edges`).
"""

from __future__ import annotations

import numpy as np

from minidiff.diffusion.losses import LossAwareSampler, UniformSampler

TIMESTEP_SAMPLERS = ("uniform", "loss_aware", "stratified", "bucket_cycle", "curriculum")


def timestep_bucket_edges(num_timesteps, buckets) -> np.ndarray:
    """Edges (K + 1,) host int64 of the K buckets {t : floor(t K / T) = k}: bucket k is edges[k] <= t < edges[k + 1],
    edges[k] = ceil(k T / K). Every bucket is non-empty when K <= T."""
    T, K = int(num_timesteps), int(buckets)
    if not 1 <= K <= T:
        raise ValueError(f"buckets must be in [1, {T}], got {buckets}")
    return -((-np.arange(K + 1, dtype=np.int64) * T) // K)


class StratifiedSampler(UniformSampler):
    """Every bucket in every batch: n // K samples per bucket, the remainder r = n mod K to r distinct buckets drawn
    at random (so no bucket is favoured over a run), t uniform within its bucket.

    Draws, in order: the remainder's buckets rng.choice(K, r, replace=False) (only when r > 0), then every t at once
    with rng.integers(lo, hi) over the samples sorted by bucket. With K dividing T each t has probability 1/T, as under
    uniform sampling, and a batch's per-bucket counts no longer vary: the step-to-step noise from how many samples
    land in each bucket is gone.
    """

    def __init__(self, num_timesteps, buckets):
        super().__init__(num_timesteps)
        self.edges = timestep_bucket_edges(num_timesteps, buckets)
        self.buckets = int(buckets)

    def bucket_counts(self, n, rng) -> np.ndarray:
        """Samples per bucket (K,) int64 for a batch of n, drawing the remainder's buckets from rng."""
        base, extra = divmod(int(n), self.buckets)
        counts = np.full(self.buckets, base, dtype=np.int64)
        if extra:
            counts[rng.choice(self.buckets, size=extra, replace=False)] += 1
        return counts

    def sample(self, n, rng):
        counts = self.bucket_counts(n, rng)
        lo, hi = np.repeat(self.edges[:-1], counts), np.repeat(self.edges[1:], counts)
        return rng.integers(lo, hi, dtype=np.int64), np.ones(n, dtype=np.float64)

    def state_dict(self):
        return {"num_timesteps": self.num_timesteps, "buckets": self.buckets}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if int(state["buckets"]) != self.buckets:
            raise ValueError(f"buckets mismatch: state has {state['buckets']}, sampler {self.buckets}")


class BucketCycleSampler(StratifiedSampler):
    """Batch k (0-based) draws all its t from bucket k mod K, uniform within it: t = rng.integers(lo, hi, n).

    The strongest step-to-step shift of the gradient's distribution a sampler can make while still covering every t
    equally over K steps; `last_bucket` is the bucket of the batch drawn last (per-bucket first moments,
    minidiff.optim.bucket_momentum, select their buffer with it).
    """

    def __init__(self, num_timesteps, buckets):
        super().__init__(num_timesteps, buckets)
        self.batches = 0
        self.last_bucket = None

    def bucket_of_batch(self, k) -> int:
        return int(k) % self.buckets

    def sample(self, n, rng):
        b = self.bucket_of_batch(self.batches)
        t = rng.integers(self.edges[b], self.edges[b + 1], size=n, dtype=np.int64)
        self.batches += 1
        self.last_bucket = b
        return t, np.ones(n, dtype=np.float64)

    def state_dict(self):
        return {**super().state_dict(), "batches": self.batches}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.batches = int(state["batches"])
        self.last_bucket = None


class CurriculumSampler(UniformSampler):
    """A timestep range that widens from the high-noise end to all of [0, T) over `full_range_at` batches.

    Batch k draws t = rng.integers(lo_k, T, n) with lo_k = round(lo_0 (1 - min(k / S, 1))), S = full_range_at and
    lo_0 = the first t of the top bucket (ceil((K - 1) T / K)): the first batch sees only the top bucket, batch S and
    every later one see every t.

    Direction, after Xu et al. 2024 ("Towards Faster Training of Diffusion Models: An Inspiration of A Consistency
    Phenomenon"): for a noise-predicting model the task is easiest as t -> T, where x_t is almost the noise itself and
    the output's coarse structure is decided; the small-t tasks (fine detail) are the hard ones. Their curriculum
    starts from the easy, high-noise end and lowers the share of easy timesteps as training goes on; this sampler
    does the same with a hard range rather than their reweighting of p(t).
    """

    def __init__(self, num_timesteps, buckets, full_range_at):
        super().__init__(num_timesteps)
        if int(full_range_at) < 1:
            raise ValueError(f"full_range_at must be >= 1, got {full_range_at}")
        self.lo_start = int(timestep_bucket_edges(num_timesteps, buckets)[-2])
        self.full_range_at = int(full_range_at)
        self.batches = 0

    def low_end(self, k) -> int:
        """lo_k: the smallest t batch k may draw."""
        return int(round(self.lo_start * (1.0 - min(int(k) / self.full_range_at, 1.0))))

    def probabilities(self):
        """p_t of the next batch, host float64 (T,): uniform over [lo_k, T)."""
        lo = self.low_end(self.batches)
        p = np.zeros(self.num_timesteps)
        p[lo:] = 1.0 / (self.num_timesteps - lo)
        return p

    def sample(self, n, rng):
        t = rng.integers(self.low_end(self.batches), self.num_timesteps, size=n, dtype=np.int64)
        self.batches += 1
        return t, np.ones(n, dtype=np.float64)

    def state_dict(self):
        return {"num_timesteps": self.num_timesteps, "lo_start": self.lo_start, "full_range_at": self.full_range_at,
                "batches": self.batches}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if int(state["lo_start"]) != self.lo_start or int(state["full_range_at"]) != self.full_range_at:
            raise ValueError(f"curriculum mismatch: state starts at t >= {state['lo_start']} and reaches the full "
                             f"range at batch {state['full_range_at']}, sampler at {self.lo_start} and "
                             f"{self.full_range_at}")
        self.batches = int(state["batches"])


def make_timestep_sampler(name, num_timesteps, buckets, full_range_at=None):
    """The sampler `TrainConfig.timestep_sampling` names; full_range_at: the curriculum's S (required for it)."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss_aware":
        return LossAwareSampler(num_timesteps)
    if name == "stratified":
        return StratifiedSampler(num_timesteps, buckets)
    if name == "bucket_cycle":
        return BucketCycleSampler(num_timesteps, buckets)
    if name == "curriculum":
        if full_range_at is None:
            raise ValueError("the curriculum sampler needs full_range_at")
        return CurriculumSampler(num_timesteps, buckets, full_range_at)
    raise ValueError(f"unknown timestep sampling {name!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")
