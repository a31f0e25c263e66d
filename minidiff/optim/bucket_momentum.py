r"""Per-bucket first moments: one momentum buffer (SGD) or first moment m (Adam, AdamW) per timestep bucket.

A diffusion model's gradient at small t and at large t point in different directions (the probes' bucket cosines
measure how far). Under `bucket_cycle` sampling every batch comes from one bucket, so a single momentum buffer mixes
directions that change from step to step. Here each bucket k keeps its own first moment m^(k), and the step of a
batch from bucket k reads and updates only m^(k); the second moment v (Adam) and the parameters stay shared:

    select(k):  the optimizer's first-moment state <- m^(k)   (the previous bucket's is put back first)
    step:       the optimizer's own step, unchanged, with t1 = n_k + 1 for the first moment:
      SGD:   b^(k) = g_t at the bucket's first step (n_k = 0), else μ b^(k) + (1 − τ) g_t
             θ -= γ b^(k)  (heavy ball)  or  γ (g_t + μ b^(k))  (Nesterov)
      Adam:  m^(k) = β1 m^(k) + (1 − β1) g_t,  v = β2 v + (1 − β2) g_t²  (shared, t = the global step count)
             u_t = −γ / (1 − β1^{n_k + 1}) · m^(k) / (√v / √(1 − β2^t) + ε)

Bias correction counts steps per bucket: m^(k) has absorbed n_k + 1 gradients (n_k counted in `steps`), so its
correction is 1 − β1^{n_k + 1}, while v, fed every step, keeps 1 − β2^t. With one bucket n_0 + 1 = t and this is the
plain optimizer, bit for bit; with B buckets each m^(k) evolves exactly as the first moment of a plain optimizer fed
only bucket k's gradients (tests/optim/test_bucket_momentum.py checks both). NAdam is not supported: its momentum
product Π_t runs over the global step count. Swapping costs two copies of the first moment per bucket change, on the
device.
"""

from __future__ import annotations

import numpy as np

from minidiff.backend import backend_of, to_numpy


class BucketMomentum:
    """BucketMomentum(optimizer, buckets): call `select(k)` before each `optimizer.step` with the batch's bucket."""

    def __init__(self, optimizer, buckets: int):
        names = [b for b in ("momentum_buffer", "exp_avg") if b in optimizer.buffer_names()]
        if not names or optimizer.name == "nadam":
            raise ValueError(f"per-bucket first moments need a momentum buffer or Adam's first moment; "
                             f"{type(optimizer).__name__} ({optimizer.name}) has none that can be split")
        if int(buckets) < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self.optimizer, self.buffer_name, self.buckets = optimizer, names[0], int(buckets)
        xp = optimizer.xp
        self.stored = [{name: xp.zeros_like(st[self.buffer_name]) for name, st in optimizer.state.items()}
                       for _ in range(self.buckets)]
        self.steps = np.zeros(self.buckets, dtype=np.int64)   # n_k: the updates each bucket's buffer has absorbed
        self.active = 0   # whose first moment the optimizer's state holds (all zeros alike at the start)

    def _live(self):
        """name -> the optimizer's first-moment array (written in place, never replaced)."""
        return {name: st[self.buffer_name] for name, st in self.optimizer.state.items()}

    def select(self, bucket: int) -> None:
        """Make bucket's first moment the optimizer's for the next step and set its step count n_k + 1."""
        k = int(bucket)
        if not 0 <= k < self.buckets:
            raise ValueError(f"bucket must be in [0, {self.buckets}), got {bucket}")
        if k != self.active:
            live = self._live()
            for name, arr in live.items():
                self.stored[self.active][name][...] = arr
                arr[...] = self.stored[k][name]
            self.active = k
        self.steps[k] += 1
        self.optimizer.first_moment_step_count = int(self.steps[k])

    def buffer(self, bucket: int) -> dict:
        """name -> bucket's first moment (the optimizer's live arrays for the active bucket)."""
        return self._live() if int(bucket) == self.active else self.stored[int(bucket)]

    def state_dict(self) -> dict:
        """Host copies of every bucket's first moment, the per-bucket counts and the active bucket."""
        return {"buckets": self.buckets, "active": self.active, "steps": self.steps.copy(),
                "buffers": [{name: np.array(to_numpy(a), copy=True) for name, a in self.buffer(k).items()}
                            for k in range(self.buckets)]}

    def load_state_dict(self, state: dict) -> None:
        if int(state["buckets"]) != self.buckets:
            raise ValueError(f"bucket_momentum state has {state['buckets']} buckets, the run {self.buckets}")
        backend = backend_of(next(iter(self.optimizer.params.values())))
        self.active = int(state["active"])
        self.steps = np.array(state["steps"], dtype=np.int64).reshape(self.buckets)
        for k in range(self.buckets):
            for name, arr in self.buffer(k).items():
                arr[...] = backend.asarray(state["buffers"][k][name], dtype=arr.dtype)
        self.optimizer.first_moment_step_count = int(self.steps[self.active]) if self.steps[self.active] else None
