"""CUDA graphs for a model's forward and backward on CuPy: each pass's ~450 launches replayed by one graph launch.

Why: on a GPU a training step of the digits UNet is ~900 launches carrying ~3 ms of device work, and the host's
25-30 us per launch, not the GPU, sets the step's time (BENCHMARKS.md). A CUDA graph records the launches once and
replays them without the host.

How, per input shape, dtype and cache flag (an `_Entry`):
1. the first call runs eagerly: CuPy compiles its kernels, the layers make their constants and scratch buffers;
2. the next captures the same code on a capture stream, reading its inputs from static device buffers and drawing
   every allocation from a memory pool of the entry's own: activations, caches and outputs then have the same
   addresses on every replay, and nothing outside the entry's graphs is ever handed that memory;
3. every later call copies its inputs into the static buffers, launches the graph on the current stream and returns
   a copy of the static output (a new array, like an eager call).
A forward with cache=True arms its entry's backward graph: the next model.backward(dout) copies dout in and replays
it (captured the first time, from the tape the forward's capture left). Training needs one eager step to warm up.

What a graph must not see change: anything read from the host, or a host scalar, at capture. The network reads only
device arrays: the parameters (updated in place by the optimizer), the static inputs, t (its embedding is computed
on the device, `Denoiser._timesteps`) and the layers' scratch and constant buffers, which each entry keeps alive
(`workspace.held_buffers`) so that a buffer replaced or dropped later is not freed under the graph. The products go
to cuBLAS through minidiff.kernels.cublas, since CuPy refuses cuBLAS calls during a capture.

Code that would make something lasting inside a capture (a scratch buffer, a constant: `workspace`) raises
CaptureNeedsWarmUp instead; the call then runs eagerly, which makes it, and the next call captures. A capture that
fails otherwise turns graphs off for that model with a warning, and the call runs eagerly. The entry's pool never
returns memory to the device while the entry lives (not even when CuPy's pool, short of memory, frees its cached
blocks): a graph keeps the addresses it was captured with. Off everywhere with MINIDIFF_CUDA_GRAPHS=0 (or
graphs_gpu.ENABLED = False before a model is built); `Denoiser.set_cuda_graphs`.
"""

from __future__ import annotations

import inspect
import os
import warnings
import weakref

import numpy as np

from minidiff.kernels.capture import CaptureNeedsWarmUp
from minidiff.kernels.flat import FlatArrays
from minidiff.kernels.workspace import held_buffers

ENABLED = os.environ.get("MINIDIFF_CUDA_GRAPHS", "1") != "0"
MAX_ENTRIES = 4   # input signatures captured per model (training, sampling, a probe's batch); others run eagerly
_LIVE = weakref.WeakSet()
_HIGH_WATER = [0]   # CuPy's pools' total just before a capture handed the default pool's cached blocks back


def pool_bytes() -> int:
    """Device memory held by the graphs' own pools (activations, caches, outputs), over every live model."""
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

    def __init__(self, forward_images):
        # no reference back to the model (a plain function is held as is)
        self.forward_images = weakref.WeakMethod(forward_images) if inspect.ismethod(forward_images) else \
            (lambda: forward_images)
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


class ModelGraphs:
    """The CUDA graphs of one model; Denoiser routes forward and backward through `forward` and `backward`."""

    def __init__(self, model):
        self._model = weakref.ref(model)   # the model owns this object; no cycle, so its pools go with it
        self.xp = model.backend.xp
        self.entries = {}
        self.armed = None    # (entry, "eager" | "graph"): the last forward with cache=True, for backward
        self.stream = None
        _LIVE.add(self)

    def forward(self, x, t, cache, forward_images):
        """The model's forward (`Denoiser._forward_parts`): eager until the signature is warm, then from a graph."""
        model = self._model()
        if cache:   # until this forward has succeeded, a backward has nothing to run, eager or graphed
            self.armed, model._tape = None, None
        key = (tuple(x.shape), x.dtype.str, tuple(t.shape), np.dtype(t.dtype).str, bool(cache))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry(forward_images)
        warm = entry.forward_warm and (entry.backward_warm or not cache)
        if not warm or (entry.forward_graph is None and self._graph_count() >= MAX_ENTRIES):
            return self._eager_forward(model, entry, x, t, cache, forward_images)
        entry.load(self.xp, x, t)
        if entry.forward_graph is None:
            try:
                out, graph = self._capture(entry, lambda: model._forward_parts(entry.x, entry.t, cache, forward_images))
            except BaseException as exc:
                model._tape = None   # a capture's tape holds arrays only its graph fills: never the eager backward's
                if isinstance(exc, CaptureNeedsWarmUp):
                    return self._eager_forward(model, entry, x, t, cache, forward_images)
                if not isinstance(exc, Exception):   # an interrupt
                    raise
                self._give_up(exc)   # any other refusal: fall back, say why
                return model._forward_parts(x, t, cache, forward_images)
            entry.out, entry.forward_graph = out, graph
            if cache:   # the backward's capture takes it from here
                entry.tape, model._tape = model._tape, None
        entry.forward_graph.launch()
        if cache:
            self.armed = (entry, "graph")
        return entry.out.copy()

    def _graph_count(self) -> int:
        return sum(e.forward_graph is not None for e in self.entries.values())

    def _eager_forward(self, model, entry, x, t, cache, forward_images):
        out = model._forward_parts(x, t, cache, forward_images)
        entry.forward_warm = True
        if cache:
            self.armed = (entry, "eager")
        return out

    def backward(self, dout, backward_images):
        """The model's backward (`Denoiser._backward_parts`), from the armed entry's graph after a graphed forward.
        There dout is taken in the dtype of the first dout the graph was captured with (the model's, in practice)."""
        model = self._model()
        armed, self.armed = self.armed, None
        if armed is None or armed[1] == "eager":
            grads = model._backward_parts(dout, backward_images)   # with nothing armed, this says what is missing
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
            model._tape, entry.tape = entry.tape, None
            try:
                entry.grads, entry.backward_graph = self._capture(
                    entry, lambda: model._backward_parts(entry.dout, backward_images))
            except Exception as exc:   # noqa: BLE001
                if not isinstance(exc, CaptureNeedsWarmUp):
                    self._give_up(exc)
                # the tape is spent: the forward runs again, eagerly, on its static inputs (and is captured anew)
                model._forward_parts(entry.x, entry.t, True, entry.forward_images())
                return model._backward_parts(dout, backward_images)
            finally:
                model._tape = None
                if entry.backward_graph is None:   # also on an interrupt: its tape is gone, recapture the forward
                    entry.forward_graph = None
        entry.backward_graph.launch()
        grads = entry.grads
        if isinstance(grads, FlatArrays):
            return grads.like(grads.flat.copy())
        return {name: g.copy() for name, g in grads.items()}

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

    def close(self) -> None:
        """Drop the graphs. A forward replayed from a graph and not yet differentiated runs again, eagerly, on its
        static inputs, so that the model's eager backward finds its tape (with the parameters as they are now: the
        same gradients unless they changed in between)."""
        armed, self.armed = self.armed, None
        _LIVE.discard(self)
        model = self._model()
        if model is not None and armed is not None and armed[1] == "graph":
            entry = armed[0]
            model._forward_parts(entry.x, entry.t, True, entry.forward_images())
        self.entries = {}

    def _give_up(self, exc):
        warnings.warn(f"CUDA graphs are off for this model: a capture failed ({type(exc).__name__}: {exc}); "
                      "running eagerly", RuntimeWarning, stacklevel=5)
        model = self._model()
        model._graphs = None
        self.close()
