r"""Exponential moving average of the weights: the weights diffusion models are sampled with.

    θ̄_0 = θ_0   (a copy at construction)
    d_n = decay                                    or, with warmup, d_n = min(decay, (1 + n) / (10 + n))
    θ̄_n = θ̄_{n-1} + (1 − d_n)(θ_n − θ̄_{n-1})     = d_n θ̄_{n-1} + (1 − d_n) θ_n,   n = 1, 2, ... updates

An EMA with decay d averages over an effective window of 1 / (1 − d) steps (10 000 for DDPM's 0.9999) and forgets
half of what it holds in ln 0.5 / ln d steps (6 931). Early in training that window reaches back to the random
initialisation; the warmup (Stable Diffusion's, n counted from 1 at the first update, so d_1 = 2/11, d_10 = 0.55,
d_100 ≈ 0.92) keeps the average short until the run is long enough to fill it.
"""

from __future__ import annotations

import numpy as np

from minidiff.backend import backend_of, get_array_module, is_cupy_module, to_numpy
from minidiff.kernels.flat import FlatArrays
from minidiff.kernels.workspace import scratch_views

CHUNK_SIZE = 1 << 15   # elements per call of a flat update: long calls, and a working set that stays in the L2 cache
_CHUNK_KEY = ("chunk",)


class EMA:
    """EMA(params, decay=0.9999, warmup=False); `.update(params)` after each optimizer step; `.params` the average.

    params: dict name -> array (the model's); `.params` holds same-shaped copies on the same backend. Updates are in
    place with one scratch buffer, no host synchronisation.
    """

    def __init__(self, params: dict, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self._xp = get_array_module(*params.values())
        if isinstance(params, FlatArrays) and params.intact():   # a model's: one flat average, updated in chunks
            self.params = params.like(params.flat.copy())
            n = params.flat.shape[0]
            chunk = n if is_cupy_module(self._xp) else CHUNK_SIZE   # a GPU has no cache to fit, only launches to save
            self._chunks = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
            self._scratch = scratch_views({**params, _CHUNK_KEY: params.flat[:chunk]}, 1)   # one buffer, shared
        else:
            self.params = {name: p.copy() for name, p in params.items()}
            self._chunks = None
            self._scratch = scratch_views(params, 1)

    def decay_at(self, n: int) -> float:
        """d_n for the n-th update (n >= 1)."""
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    def update(self, params: dict) -> float:
        """θ̄ ← θ̄ + (1 − d_n)(θ − θ̄) for every array; returns d_n."""
        self.num_updates += 1
        d = self.decay_at(self.num_updates)
        if self._chunks is not None and self.params.intact() and self.params.same_layout(params):
            # the same elementwise operations on the same elements, in a few long calls
            (buf,) = self._scratch[_CHUNK_KEY]
            for a, b in self._chunks:
                tmp = buf[:b - a]
                self._xp.subtract(params.flat[a:b], self.params.flat[a:b], out=tmp)
                tmp *= 1.0 - d
                self.params.flat[a:b] += tmp
            return d
        for name, avg in self.params.items():
            (tmp,) = self._scratch[name]
            self._xp.subtract(params[name], avg, out=tmp)
            tmp *= 1.0 - d
            avg += tmp
        return d

    def copy_to(self, params: dict) -> None:
        """Write the averaged weights into `params` (e.g. a sampling copy of the model), in place."""
        for name, avg in self.params.items():
            params[name][...] = avg

    def state_dict(self) -> dict:
        """Plain numbers and host NumPy copies; round-trips through HDF5 bit for bit."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "params": {k: np.array(to_numpy(v), copy=True) for k, v in self.params.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd["params"]) != set(self.params):
            raise ValueError(f"state_dict arrays {sorted(sd['params'])} != EMA's {sorted(self.params)}")
        self.decay, self.warmup, self.num_updates = float(sd["decay"]), bool(sd["warmup"]), int(sd["num_updates"])
        backend = backend_of(next(iter(self.params.values())))
        for name, avg in self.params.items():
            host = sd["params"][name]
            if tuple(host.shape) != avg.shape:
                raise ValueError(f"state_dict array {name} has shape {host.shape}, expected {avg.shape}")
            avg[...] = backend.asarray(host, dtype=avg.dtype)
