"""What every minidiff model shares: seeded PyTorch-style parameters on a backend, the tape, and weight loading.

The model interface (UNet, MLPDenoiser, and the wrappers of minidiff.execution around them):
  model.params            dict name -> backend array, PyTorch names and layouts, insertion-ordered, laid end to end
                          in one buffer (minidiff.kernels.flat.FlatArrays)
  model.forward(x, t)     x a backend array, t a host NumPy int array (N,); returns an array shaped like x and keeps
                          the tape for backward; forward(x, t, cache=False) keeps nothing (sampling, evaluation)
  model.backward(dout)    gradients after a forward: same keys, shapes and dtype as params, laid end to end in a new
                          buffer like the parameters
  model.config            JSON-serialisable constructor kwargs (without device): build_model(name, **config)
  model.backend, model.dtype, model.load_params(arrays), model.num_params()

What a wrapper (minidiff.execution) uses besides: the same passes with a tape it owns, over one batch, with no state
kept on the model:
  model.check_input(x, t)                 ValueError unless x and t fit the model
  model.forward_pass(x, t, tape) -> out   x of any float dtype (cast to the model's); the caches go onto `tape`
  model.backward_pass(dout, tape, out=None) -> gradients laid out like params (into `out` when given), popping
                                          every cache of `tape`
  model.images_independent                whether the images of a batch never meet (no batch statistics): a batch's
                                          forward is then its chunks' forwards, its gradient the sum of theirs
  model.move_params(flat)                 the parameters copied into another buffer (shared memory) and used there
"""

from __future__ import annotations

import numpy as np

from minidiff.backend import Backend, get_backend, resolve_dtype
from minidiff.kernels.flat import FlatArrays, gather, total_size
from minidiff.nn.layers import init_param, timestep_embedding
from minidiff.nn.tape import make_tape


class OwnTape:
    """forward(x, t, cache) and backward(dout) over check_input, forward_pass and backward_pass: the tape of the last
    forward with cache=True is kept for the next backward, which consumes it. Models and wrappers alike."""

    _tape = None

    def forward(self, x, t, cache=True):
        """The output for x, t; with cache=True the tape is kept for backward (an earlier forward's is dropped),
        with cache=False nothing is kept and an earlier forward's tape stays, so its backward can still run."""
        self.check_input(x, t)
        if not cache:
            return self.forward_pass(x, t, make_tape(False))
        self._tape = None
        tape = make_tape(True)
        out = self.forward_pass(x, t, tape)
        self._tape = tape
        return out

    def backward(self, dout):
        """Gradients of the last forward with cache=True, laid out like the parameters; once per forward."""
        tape, self._tape = self._tape, None
        if tape is None:
            raise RuntimeError("backward needs a forward(x, t) with cache=True first (and runs once per forward)")
        return self.backward_pass(dout, tape)


class Denoiser(OwnTape):
    """Base class: builds `params` from specs with a seeded host RNG; a subclass writes check_input and the network's
    two halves, forward_layers(x, t, tape) -> out and backward_layers(dout, tape) -> {name: gradient}."""

    images_independent = False

    def __init__(self, config, dtype="float32", seed=0, device=None):
        self.config = dict(config, dtype=np.dtype(resolve_dtype(dtype)).name, seed=int(seed))
        self.dtype = resolve_dtype(dtype)
        self.backend = device if isinstance(device, Backend) else get_backend(device)
        self.params = {}

    def init_params(self, specs):
        """specs: iterable of (name, shape, init), in registration order; drawn on the host in that order, laid end
        to end in one buffer (minidiff.kernels.flat: an optimizer step then runs on a few long arrays)."""
        rng = np.random.default_rng(self.config["seed"])
        specs = list(specs)
        shapes = {name: shape for name, shape, _ in specs}
        self.params = FlatArrays(shapes, self.backend.xp.zeros(total_size(shapes), dtype=self.dtype))
        for name, shape, init in specs:
            self.params[name][...] = self.backend.asarray(init_param(rng, shape, init), dtype=self.dtype)

    def move_params(self, flat) -> None:
        """Copy the parameters into `flat` (1-D, their total size, the model's dtype) and keep them there from now on.
        Arrays taken from `params` before (an optimizer's) stay with the old buffer: move first."""
        moved = self.params.like(flat)
        moved.flat[...] = self.params.flat
        self.params = moved

    def embed_timesteps(self, t, dim):
        """The sinusoidal embedding of t, (N, dim), in the model's dtype. On CuPy t goes to the device first, so that
        the embedding is computed there (where a CUDA graph replays it, minidiff.execution.graphs)."""
        if self.backend.name == "cupy":
            t = self.backend.xp.asarray(t)
        return self.backend.asarray(timestep_embedding(t, dim), dtype=self.dtype)

    def check_input(self, x, t):
        raise NotImplementedError

    def forward_layers(self, x, t, tape):
        raise NotImplementedError

    def backward_layers(self, dout, tape):
        raise NotImplementedError

    def forward_pass(self, x, t, tape):
        """The network on x (cast to the model's dtype), t; its caches go onto `tape` (a NoTape keeps none)."""
        return self.forward_layers(x.astype(self.dtype, copy=False), t, tape)

    def backward_pass(self, dout, tape, out=None) -> FlatArrays:
        """The gradients of the forward_pass that filled `tape`, laid end to end like the parameters in a new buffer
        (or in `out`, a FlatArrays laid out like them): a norm, a clip or an optimizer step then reads one array."""
        grads = self.backward_layers(dout, tape)
        tape.check_spent()
        return gather(self.params, grads, self.backend.xp, out=out)

    def load_params(self, arrays):
        """Copy host or device arrays into the existing parameter arrays, in place; names and shapes must match."""
        missing, extra = set(self.params) - set(arrays), set(arrays) - set(self.params)
        if missing or extra:
            raise KeyError(f"parameter names differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, p in self.params.items():
            value = arrays[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not match {tuple(p.shape)}")
            p[...] = self.backend.asarray(value, dtype=self.dtype)

    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))
