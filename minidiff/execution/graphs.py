"""CUDA graphs for a model's forward and backward on CuPy: each pass's hundreds of launches replayed by one launch.

Why: on a GPU a training step of a small UNet is many short launches, and the host's time per launch, not the GPU,
sets the step's time (BENCHMARKS.md). A CUDA graph records the launches once and replays them without the host.

`CudaGraphs` wraps a model (or a wrapper with the same passes) and runs its forward_pass and backward_pass, with
tapes of its own, per input shape, dtype and cache flag (an `_Entry`):
1. the first call runs eagerly: CuPy compiles its kernels, the layers make their constants and scratch buffers;
2. the next captures the same code on a capture stream, reading its inputs from static device buffers and drawing
   every allocation from a memory pool of the entry's own: activations, caches and outputs then have the same
   addresses on every replay, and nothing outside the entry's graphs is ever handed that memory;
3. every later call copies its inputs into the static buffers, launches the graph on the current stream and returns
   a copy of the static output (a new array, like an eager call).
A forward with cache=True arms its entry's backward graph: the next backward(dout) copies dout in and replays it
(captured the first time, from the tape the forward's capture filled). Training needs one eager step to warm up.

What a graph must not see change: anything read from the host, or a host scalar, at capture. The network reads only
device arrays: the parameters (updated in place by the optimizer), the static inputs, t (its embedding is computed
on the device, `Denoiser.embed_timesteps`) and the layers' scratch and constant buffers, which each entry keeps alive
(`workspace.held_buffers`) so that a buffer replaced or dropped later is not freed under the graph. The products go
to cuBLAS through minidiff.kernels.cublas, since CuPy refuses cuBLAS calls during a capture.

Code that would make something lasting inside a capture (a scratch buffer, a constant: `workspace`) raises
CaptureNeedsWarmUp instead; the call then runs eagerly, which makes it, and the next call captures. A capture that
fails otherwise turns graphs off for that wrapper with a warning, and the call runs eagerly. The entry's pool never
returns memory to the device while the entry lives (not even when CuPy's pool, short of memory, frees its cached
blocks): a graph keeps the addresses it was captured with. Off for every wrapper made after ENABLED = False
(MINIDIFF_CUDA_GRAPHS=0); `CudaGraphs.set_cuda_graphs` turns one wrapper's graphs on or off.
"""

from __future__ import annotations

import os
import warnings
import weakref

import numpy as np

from minidiff.execution.wrapper import ModelWrapper
from minidiff.kernels.capture import CaptureNeedsWarmUp
from minidiff.kernels.workspace import held_buffers
from minidiff.nn.tape import make_tape

ENABLED = os.environ.get("MINIDIFF_CUDA_GRAPHS", "1") != "0"
MAX_ENTRIES = 4   # input signatures captured per wrapper (training, sampling, a probe's batch); others run eagerly
_LIVE = weakref.WeakSet()
_HIGH_WATER = [0]   # CuPy's pools' total just before a capture handed the default pool's cached blocks back


def pool_bytes() -> int:
    """Device memory held by the graphs' own pools (activations, caches, outputs), over every live wrapper."""
    return sum(entry.nbytes() for graphs in list(_LIVE) for entry in graphs.entries.values())


def reserved_bytes(xp) -> int:
    """Device memory CuPy's pools hold now: the default pool's and the graphs'."""
    return xp.get_default_memory_pool().total_bytes() + pool_bytes()


def peak_reserved_bytes(xp) -> int:
    """The most `reserved_bytes` held since `reset_peak`: now, or just before a capture freed the default pool's
    cached blocks (the pools only grow in between)."""
    return max(reserved_bytes(xp), _HIGH_WATER[0])


def reset_peak() -> None:
    """Start a new `peak_reserved_bytes` measurement."""
    _HIGH_WATER[0] = 0


def _lasting_pool(xp, blocks):
    """A CuPy memory pool whose device memory stays allocated while `blocks` lives: every chunk it gets is kept
    there, so the pool freeing its cached blocks (as CuPy's pools do when the device is short of memory) cannot hand
    a captured graph's addresses back to the device."""
    def allocate(size):
        memory = xp.cuda.Memory(size)
        blocks.append(memory)
        return xp.cuda.MemoryPointer(memory, 0)
    return xp.cuda.MemoryPool(allocate)


class _Entry:
    """The graphs of one input signature: static inputs, a private memory pool, the graphs and their outputs (all
    made at its first capture: a signature seen once costs nothing)."""

    def __init__(self):
        self.forward_warm = self.backward_warm = False
        self.forward_graph = self.backward_graph = None
        self.x = self.t = self.pool = None
        self.out = self.tape = self.dout = self.grads = None
        self.blocks, self.held = [], []

    def load(self, xp, x, t):
        """Copy a call's inputs into the static buffers the graphs read (t from the host or the device)."""
        if self.x is None:
            self.x, self.t = xp.empty_like(x), xp.empty(t.shape, dtype=t.dtype)
            self.pool = _lasting_pool(xp, self.blocks)
        self.x[...] = x
        if isinstance(t, np.ndarray):
            self.t.set(np.ascontiguousarray(t, dtype=self.t.dtype))
        else:
            self.t[...] = t

    def nbytes(self) -> int:
        return sum(m.size for m in self.blocks)


class CudaGraphs(ModelWrapper):
    """A model whose forward and backward replay as CUDA graphs on CuPy (eagerly elsewhere, or once turned off).

    entries: input signature -> _Entry; armed: (entry, "eager" | "graph") of the last forward with cache=True, which
    the next backward differentiates (an eager one from this wrapper's tape, a graphed one from its entry's graph).
    """

    def __init__(self, model, enabled=True):
        super().__init__(model)
        self.xp = model.backend.xp
        self.entries = {}
        self.armed = None
        self.stream = None
        self.enabled = False
        self.set_cuda_graphs(enabled)

    def set_cuda_graphs(self, enabled: bool) -> None:
        """Replay forward and backward as CUDA graphs (on CuPy only); turning it off drops the graphs, and a forward
        replayed from a graph and not yet differentiated runs again, eagerly, on its static inputs, so that the eager
        backward finds its tape (with the parameters as they are now: the same gradients unless they changed)."""
        on = bool(enabled) and self.backend.name == "cupy"
        if on and not self.enabled:
            self.enabled = True
            _LIVE.add(self)
        elif not on and self.enabled:
            armed, self.armed = self.armed, None
            self.enabled = False
            _LIVE.discard(self)
            if armed is not None and armed[1] == "graph":
                tape = make_tape(True)
                self.model.forward_pass(armed[0].x, armed[0].t, tape)
                self._tape = tape
            self.entries = {}

    def graph_count(self) -> int:
        """How many signatures have a forward graph."""
        return sum(e.forward_graph is not None for e in self.entries.values())

    def forward(self, x, t, cache=True):
        """The forward: eager until the signature is warm, then from its graph."""
        if not self.enabled:
            return super().forward(x, t, cache)
        self.check_input(x, t)
        if cache:   # until this forward has succeeded, a backward has nothing to run, eager or graphed
            self.armed, self._tape = None, None
        key = (tuple(x.shape), x.dtype.str, tuple(t.shape), np.dtype(t.dtype).str, bool(cache))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry()
        warm = entry.forward_warm and (entry.backward_warm or not cache)
        if not warm or (entry.forward_graph is None and self.graph_count() >= MAX_ENTRIES):
            return self._eager_forward(entry, x, t, cache)
        entry.load(self.xp, x, t)
        if entry.forward_graph is None:
            tape = make_tape(cache)   # filled by the capture with arrays only its graph fills: the backward graph's
            try:
                out, graph = self._capture(entry, lambda: self.model.forward_pass(entry.x, entry.t, tape))
            except BaseException as exc:
                if isinstance(exc, CaptureNeedsWarmUp):
                    return self._eager_forward(entry, x, t, cache)
                if not isinstance(exc, Exception):   # an interrupt
                    raise
                self._give_up(exc)   # any other refusal: fall back, say why
                return super().forward(x, t, cache)
            entry.out, entry.forward_graph = out, graph
            if cache:   # the backward's capture takes it from here
                entry.tape = tape
        entry.forward_graph.launch()
        if cache:
            self.armed = (entry, "graph")
        return entry.out.copy()

    def _eager_forward(self, entry, x, t, cache):
        out = super().forward(x, t, cache)
        entry.forward_warm = True
        if cache:
            self.armed = (entry, "eager")
        return out

    def backward(self, dout):
        """The backward of the armed forward: from its entry's graph after a graphed forward, where dout is taken in
        the dtype of the first dout the graph was captured with (the model's, in practice); else eagerly."""
        if not self.enabled:
            return super().backward(dout)
        armed, self.armed = self.armed, None
        if armed is None or armed[1] == "eager":
            grads = super().backward(dout)   # with nothing armed, this says what is missing
            if armed is not None:
                armed[0].backward_warm = True
            return grads
        entry = armed[0]
        if tuple(dout.shape) != tuple(entry.out.shape):
            raise ValueError(f"dout has shape {dout.shape}, the forward's output {entry.out.shape}")
        if entry.dout is None:
            entry.dout = self.xp.empty(entry.out.shape, dtype=dout.dtype)
        entry.dout[...] = dout
        if entry.backward_graph is None:
            tape, entry.tape = entry.tape, None
            try:
                entry.grads, entry.backward_graph = self._capture(
                    entry, lambda: self.model.backward_pass(entry.dout, tape))
            except Exception as exc:   # noqa: BLE001
                if not isinstance(exc, CaptureNeedsWarmUp):
                    self._give_up(exc)
                # the tape is spent: the forward runs again, eagerly, on its static inputs (and is captured anew)
                tape = make_tape(True)
                self.model.forward_pass(entry.x, entry.t, tape)
                return self.model.backward_pass(dout, tape)
            finally:
                if entry.backward_graph is None:   # also on an interrupt: its tape is gone, recapture the forward
                    entry.forward_graph = None
        entry.backward_graph.launch()
        return entry.grads.like(entry.grads.flat.copy())

    def _capture(self, entry, fn):
        """(fn(), the CUDA graph of the launches fn made) with fn's allocations from the entry's pool."""
        xp = self.xp
        if self.stream is None:
            self.stream = xp.cuda.Stream(non_blocking=True)
        # what the eager warm-up left cached goes back to the device first, so that the graph's pool does not add to
        # it: the peak stays the larger of the eager step's and the graphs'
        _HIGH_WATER[0] = max(_HIGH_WATER[0], reserved_bytes(xp))
        xp.get_default_memory_pool().free_all_blocks()
        with xp.cuda.using_allocator(entry.pool.malloc), self.stream:
            self.stream.begin_capture()
            try:
                result = fn()
            finally:
                graph = self.stream.end_capture()
        entry.held.append(held_buffers())
        return result, graph

    def _give_up(self, exc):
        warnings.warn(f"CUDA graphs are off for this model: a capture failed ({type(exc).__name__}: {exc}); "
                      "running eagerly", RuntimeWarning, stacklevel=3)
        self.set_cuda_graphs(False)
