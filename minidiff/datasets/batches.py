"""BatchIterator: seeded epoch shuffling over a host array, resumable bit for bit from its state_dict."""

from __future__ import annotations

import numpy as np

from minidiff.datasets.base import DataError


class BatchIterator:
    """Endless batches of `data` (host (N, ...)), reshuffled every epoch by a host np.random.Generator.

    Each epoch draws a permutation of range(N) and yields its consecutive slices of batch_size; the last
    N % batch_size samples of an epoch are dropped so every batch has the same shape (and every sample still
    appears each epoch with the same probability). `state_dict()` holds the epoch, the position in it, the
    permutation and the generator's state, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seed=0):
        n = len(data)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > n:
            raise DataError(f"batch_size {batch_size} is larger than the {n} training samples")
        self.data = data
        self.batch_size = int(batch_size)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.epoch = 0
        self.position = 0
        self.permutation = self.rng.permutation(n)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def next_indices(self) -> np.ndarray:
        """The indices (into data) of the next batch, (batch_size,) int64; advances the iterator."""
        if self.position + self.batch_size > len(self.permutation):
            self.epoch += 1
            self.position = 0
            self.permutation = self.rng.permutation(len(self.data))
        idx = self.permutation[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        """The next batch, data[indices] (a new host array of shape (batch_size, ...))."""
        return self.data[self.next_indices()]

    def state_dict(self) -> dict:
        """Plain data for the run file: ints, an int64 array and the bit generator's state dict (copies)."""
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "permutation": self.permutation.astype(np.int64, copy=True),
                "rng": _copy_state(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        perm = np.asarray(state["permutation"], dtype=np.int64)
        if len(perm) != len(self.data) or int(state["batch_size"]) != self.batch_size:
            raise DataError(f"data-order state is for {len(perm)} samples in batches of {state['batch_size']}, "
                            f"but the data has {len(self.data)} samples in batches of {self.batch_size}")
        rng_state = state["rng"]
        if rng_state.get("bit_generator") != type(self.rng.bit_generator).__name__:
            raise DataError(f"data-order state uses bit generator {rng_state.get('bit_generator')!r}, "
                            f"this iterator {type(self.rng.bit_generator).__name__!r}")
        self.rng.bit_generator.state = _copy_state(rng_state)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.permutation = perm.copy()


def _copy_state(state):
    """Deep copy of a bit-generator state (nested dicts of ints, and arrays for MT19937)."""
    if isinstance(state, dict):
        return {k: _copy_state(v) for k, v in state.items()}
    return state.copy() if isinstance(state, np.ndarray) else state
