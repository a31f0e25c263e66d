"""What every minidiff optimizer shares: the parameter dict, explicit state, scratch buffers, diagnostics, checkpoints.

An optimizer step has the same skeleton for SGD, Adam and NAdam:

    g_t = ±∇f(θ_{t-1}) + λ θ_{t-1}      effective gradient (sign flipped for `maximize`, coupled weight decay λ)
    u_t = U(g_t, state)                  the optimizer's rule; it also updates its state (buffers, step count)
    θ_t = θ_{t-1} + u_t                  in place, on the caller's arrays

Subclasses write U (`_update`, elementwise); this class does the rest. Nothing allocates during a step: the state
buffers are made once, at construction, and three scratch arrays (views into one flat buffer per dtype, sized for
the largest parameter or chunk) hold g_t, the update u_t and one temporary, so the step is a fixed sequence of `out=`
operations that runs unchanged on NumPy, CuPy and the strict backend. U runs on one parameter at a time, or on a chunk
of parameters laid end to end (`_lay_out_chunks`). Per-step coefficients (bias corrections, step sizes) are
Python floats computed on the host from the step count, so a step never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minidiff.backend import backend_of, get_array_module, is_cupy_module, to_numpy
from minidiff.kernels.flat import FlatArrays, chunks as flat_chunks
from minidiff.kernels import optim_cuda as fused
from minidiff.kernels.workspace import scratch_views


def check_nonnegative(name: str, value) -> None:
    if not value >= 0.0:  # `not >=` also refuses NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_beta(name: str, value) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_positive(name: str, value) -> None:
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


class Diagnostics:
    """Accumulates squared norms and dot products over parameters; every result stays a 0-d device array."""

    def __init__(self, xp, per_param: bool):
        self.xp = xp
        self.sums: dict = {}
        self.counts: dict = {}  # element counts for RMS entries (host ints)
        self.host: dict = {}  # numbers already on the host (bias corrections), returned as Python floats
        self.per_param = {} if per_param else None
        self._w2 = None

    def add(self, key: str, value) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def add_rms(self, key: str, x) -> None:
        """Accumulate x for the root mean square of all its elements over all parameters."""
        self.add(key, self.xp.vdot(x, x))
        self.counts[key] = self.counts.get(key, 0) + x.size

    def before_update(self, theta, g, buf) -> None:
        """theta: θ_{t-1}; g: effective gradient g_t; buf: momentum buffer / first moment before this step, or None."""
        xp = self.xp
        self._w2 = xp.vdot(theta, theta)
        self.add("w2", self._w2)
        self.add("g2", xp.vdot(g, g))
        if buf is not None:
            self.add("b2", xp.vdot(buf, buf))
            self.add("gb", xp.vdot(g, buf))

    def after_update(self, name: str, u) -> None:
        u2 = self.xp.vdot(u, u)
        self.add("u2", u2)
        if self.per_param is not None:
            self.per_param[name] = self.xp.sqrt(u2) / self.xp.maximum(self.xp.sqrt(self._w2), 1e-30)

    def result(self) -> dict:
        xp, s = self.xp, self.sums
        out = {"update_norm": xp.sqrt(s["u2"]), "weight_norm": xp.sqrt(s["w2"]), "grad_norm": xp.sqrt(s["g2"])}
        out["update_to_weight"] = out["update_norm"] / xp.maximum(out["weight_norm"], 1e-30)
        if "gb" in s:  # an all-zero buffer (the first step) gives cosine 0, not NaN
            out["cos_grad_momentum"] = s["gb"] / xp.maximum(xp.sqrt(s["g2"] * s["b2"]), 1e-30)
        for key, n in self.counts.items():
            out[key] = xp.sqrt(s[key] / n)
        out.update(self.host)
        if self.per_param is not None:
            out["update_to_weight_per_param"] = self.per_param
        return out


@dataclass
class _Chunk:
    """Consecutive parameters of a FlatArrays updated as one array: theta, its slice of the flat buffer; span, that
    slice's (start, stop) (where its gradient is in gradients laid out alike); members, (name, where that array's g_t
    goes in the chunk's scratch g) for gradients that are not; state, buffer name -> the chunk's slice of it."""
    key: tuple
    theta: object
    span: tuple
    members: list
    state: dict


class Optimizer:
    """Base class. Subclasses set `name`, `hyper_names`, `buffer_names()` and implement `_update`."""

    name = "optimizer"
    hyper_names: tuple = ("lr",)
    scalar_state_names: tuple = ("step",)  # host numbers that are state, not hyperparameters
    coupled_weight_decay = True  # λθ is added to the gradient (False: AdamW-style decay applied to θ directly)
    maximize = False
    weight_decay = 0.0

    def __init__(self, params: dict, lr: float):
        if not isinstance(params, dict) or not params:
            raise ValueError("params must be a non-empty dict name -> array (the model's parameters)")
        self.params = params
        self.lr = lr
        self.step_count = 0
        self._xp = get_array_module(*params.values())
        self.chunks = []   # set by _lay_out_chunks where the parameters are laid end to end (see there)
        if isinstance(params, FlatArrays) and params.intact() and self._update_is_elementwise():
            self._lay_out_chunks(params)
        else:
            self.state = {name: {b: self._xp.zeros_like(p) for b in self.buffer_names()} for name, p in params.items()}
            self._scratch = scratch_views(params, 3)

    # --- hyperparameters ---------------------------------------------------------------------------------------
    @property
    def xp(self):
        """The array module of the parameters (NumPy, CuPy or the strict backend's), which the state lives on."""
        return self._xp

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        check_nonnegative("lr", value)
        self._lr = float(value)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid hyperparameter (subclasses extend)."""
        check_nonnegative("weight_decay", self.weight_decay)

    def buffer_names(self) -> tuple:
        """Names of the per-parameter state arrays (PyTorch's names, so states compare key by key)."""
        return ()

    def direction_buffer(self, name: str):
        """The momentum buffer / first moment that diagnostics compare the gradient with, or None."""
        return None

    # Per-bucket first moments (minidiff.optim.bucket_momentum) set this to the count of the active bucket's buffer
    first_moment_step_count = None

    def first_moment_steps(self) -> int:
        """Updates the first moment (momentum buffer, Adam's m) has absorbed, this step's included: the step count,
        or under per-bucket first moments the count of the buffer this step uses."""
        return self.step_count if self.first_moment_step_count is None else self.first_moment_step_count

    # --- the step ----------------------------------------------------------------------------------------------
    def step(self, grads: dict, diagnostics: bool = False, per_param: bool = False):
        """One update of every parameter, in place. grads: dict keyed like params, arrays shaped like them.

        Returns None, or with `diagnostics=True` a dict of 0-d backend arrays (no host synchronisation):
        update_norm ||u_t||, weight_norm ||θ_{t-1}||, update_to_weight ||u_t|| / ||θ_{t-1}||, grad_norm ||g_t||,
        cos_grad_momentum cos(g_t, buffer_{t-1}) (optimizers with a momentum buffer / first moment; the buffer before
        it absorbs g_t, so a negative value means the new gradient opposes the accumulated direction), plus the
        optimizer's own entries; `per_param=True` adds update_to_weight_per_param: name -> 0-d array.
        """
        self._check_grads(grads)  # all of them before any update: a bad one must leave params and state untouched
        self.step_count += 1
        coef = self._coefficients()
        if not diagnostics and self._fused_update is not None and fused.available(self._xp):
            self._fused_update(self, grads, coef)   # one launch per chunk or parameter (minidiff.kernels.optim_cuda)
            return None
        if not diagnostics and self.chunks_apply():
            self._step_chunks(grads, coef)
            return None
        diag = Diagnostics(self._xp, per_param) if diagnostics else None
        for name, theta in self.params.items():
            g, tmp, u = self._scratch[name]
            self._effective_grad(theta, grads[name], g)
            if diag is not None:
                diag.before_update(theta, g, self.direction_buffer(name))
            self._update(self.state[name], theta, g, tmp, u, coef, diag)
            if diag is not None:
                diag.after_update(name, u)
            theta += u
        if diag is not None:
            self._diag_host(diag, coef)
            return diag.result()
        return None

    # Parameters laid end to end (minidiff.kernels.flat.FlatArrays, as a Denoiser makes them) are updated a chunk of
    # whole arrays at a time: the same operations on the same elements, so the same bits as one array at a time, in a
    # tenth of the calls. Chunks of CHUNK_SIZE elements keep the step's working set (θ, g, u, tmp and the state, a
    # chunk each) in the L2 cache. Diagnostics steps go one array at a time (their sums and per-parameter norms are
    # per array). Nothing else changes: `state` still holds an array per parameter (views of the chunks' state).
    # On a GPU a chunk is a launch, not a cache's worth: CHUNK_SIZE_GPU elements (all of a small model's parameters).
    CHUNK_SIZE = 1 << 15
    CHUNK_SIZE_GPU = 1 << 22
    elementwise_update = False   # set True by a class whose _update is elementwise (Adam, SGD, NAdam)

    def chunks_apply(self) -> bool:
        """Whether this step can go chunk by chunk: the parameters were laid out in chunks and still are."""
        return bool(self.chunks) and self.params.intact()

    def chunk_grads(self, grads) -> list | None:
        """Each chunk's gradient, a slice of grads.flat, where the gradients are laid out like the parameters (a
        model's backward); else None (the gradients go into a chunk array by array)."""
        if self.params.same_layout(grads):
            return [grads.flat[chunk.span[0]:chunk.span[1]] for chunk in self.chunks]
        return None

    def _update_is_elementwise(self) -> bool:
        """Whether the class that defines this optimizer's `_update` declared it elementwise: a subclass with its own
        rule (per-tensor norms, say) takes the one-array-at-a-time step unless it declares so itself."""
        owner = next(c for c in type(self).__mro__ if "_update" in c.__dict__)
        return owner.__dict__.get("elementwise_update", False)

    def _lay_out_chunks(self, params: FlatArrays) -> None:
        """State buffers laid out like the parameters (a chunk's state is then one slice too), the chunks, and
        scratch for a chunk or one array (diagnostics steps) at a time."""
        flat = {b: params.like(self._xp.zeros_like(params.flat)) for b in self.buffer_names()}
        self.state = {name: {b: flat[b][name] for b in flat} for name in params}
        bounds = flat_chunks(params, self.CHUNK_SIZE_GPU if is_cupy_module(self._xp) else self.CHUNK_SIZE)
        thetas = {("chunk", k): params.flat[start:stop] for k, (start, stop, _) in enumerate(bounds)}
        self._scratch = scratch_views({**params, **thetas}, 3)
        self.chunks = []
        for (key, theta), (start, stop, names) in zip(thetas.items(), bounds):
            g, members = self._scratch[key][0], []
            for name in names:   # where each array's g_t goes in the chunk's g
                a, b = params.spans[name]
                members.append((name, g[a - start:b - start].reshape(params[name].shape)))
            self.chunks.append(_Chunk(key, theta, (start, stop), members, {b: flat[b].flat[start:stop] for b in flat}))

    def _step_chunks(self, grads, coef) -> None:
        for chunk, grad in zip(self.chunks, self.chunk_grads(grads) or [None] * len(self.chunks)):
            g, tmp, u = self._scratch[chunk.key]
            if grad is not None:
                self._effective_grad(chunk.theta, grad, g)
            else:
                for name, g_slice in chunk.members:   # g_t of each array, into its place in the chunk
                    self._effective_grad(self.params[name], grads[name], g_slice)
            self._update(chunk.state, chunk.theta, g, tmp, u, coef, None)
            chunk.theta += u

    def _check_grads(self, grads: dict) -> None:
        """KeyError for a missing gradient, ValueError for a wrong shape, TypeError for another array module."""
        missing = [n for n in self.params if n not in grads]
        if missing:
            raise KeyError(f"grads has no entry for parameter(s) {missing}")
        for name, theta in self.params.items():
            grad = grads[name]
            if getattr(grad, "shape", None) != theta.shape:  # `out[...] = grad` would broadcast a wrong shape
                raise ValueError(f"gradient {name} has shape {getattr(grad, 'shape', None)}, parameter has "
                                 f"{theta.shape}")
            if get_array_module(grad) is not self._xp:  # a host gradient for device parameters, or the reverse
                raise TypeError(f"gradient {name} is a {type(grad).__name__}, parameter is a "
                                f"{type(theta).__name__}; move it with backend.asarray first")

    def _effective_grad(self, theta, grad, out) -> None:
        """out = ±grad + λθ (PyTorch: `grad = -grad if maximize`, then `grad = grad + weight_decay * param`)."""
        xp = self._xp
        if self.coupled_weight_decay and self.weight_decay != 0.0:
            xp.multiply(theta, self.weight_decay, out=out)
            (xp.subtract if self.maximize else xp.add)(out, grad, out=out)
        elif self.maximize:
            xp.negative(grad, out=out)
        else:
            out[...] = grad

    def _coefficients(self) -> dict:
        """Host floats this step needs (bias corrections, step sizes); computed once per step, not per parameter."""
        return {}

    @property
    def _fused_update(self):
        """The fused CuPy step for this configuration (minidiff.kernels.optim_cuda.adam or .sgd, called as
        f(optimizer, grads, coef): one launch per chunk, or per parameter where the gradients are not laid out like the
        parameters), or None."""
        return None

    def _update(self, st, theta, g, tmp, u, coef, diag) -> None:
        """Write u_t into `u` and advance the state `st` (buffer name -> array like theta) of `theta`, one parameter
        or a chunk of them (only where the class sets elementwise_update: a chunk must get the same bits). `g` and `tmp`
        may be overwritten. State arrays are written in place, never replaced: a chunk's state is a view of them."""
        raise NotImplementedError

    def _diag_host(self, diag: Diagnostics, coef: dict) -> None:
        """Add host-known diagnostics (bias-correction factors)."""

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain data: strings, Python numbers and host NumPy copies; round-trips through HDF5 bit for bit."""
        buffers = {}
        for pname, bufs in self.state.items():
            buffers[pname] = {b: np.array(to_numpy(a), copy=True) for b, a in bufs.items()}
        sd = {"optimizer": self.name, "hyper": {h: getattr(self, h) for h in self.hyper_names}, "buffers": buffers}
        sd.update({s: getattr(self, self._scalar_attr(s)) for s in self.scalar_state_names})
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore hyperparameters, step count and buffers (copied into the existing arrays, which keep identity)."""
        if str(sd["optimizer"]) != self.name:
            raise ValueError(f"state_dict is for optimizer {sd['optimizer']!r}, not {self.name!r}")
        if set(sd["buffers"]) != set(self.state):
            raise ValueError(f"state_dict parameters {sorted(sd['buffers'])} != optimizer's {sorted(self.state)}")
        for h in self.hyper_names:
            setattr(self, h, type(getattr(self, h))(sd["hyper"][h]))  # HDF5 hands back numpy scalars
        self.validate()
        backend = backend_of(next(iter(self.params.values())))
        for pname, bufs in self.state.items():
            for b, arr in bufs.items():
                host = sd["buffers"][pname][b]
                if tuple(host.shape) != arr.shape:
                    raise ValueError(f"state_dict buffer {pname}/{b} has shape {host.shape}, expected {arr.shape}")
                arr[...] = backend.asarray(host, dtype=arr.dtype)
        for s in self.scalar_state_names:
            attr = self._scalar_attr(s)
            setattr(self, attr, type(getattr(self, attr))(sd[s]))

    @staticmethod
    def _scalar_attr(name: str) -> str:
        return "step_count" if name == "step" else name

    def __repr__(self) -> str:
        hyper = ", ".join(f"{h}={getattr(self, h)!r}" for h in self.hyper_names)
        return f"{type(self).__name__}({hyper}; {len(self.params)} arrays, step {self.step_count})"
