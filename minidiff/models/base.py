"""What every minidiff model shares: seeded PyTorch-style parameters on a backend, the tape, and weight loading.

The model interface (UNet, MLPDenoiser):
  model.params            dict name -> backend array, PyTorch names and layouts, insertion-ordered
  model.forward(x, t)     x a backend array, t a host NumPy int array (N,); returns an array shaped like x and keeps
                          the caches for backward; forward(x, t, cache=False) keeps nothing (sampling, evaluation)
  model.backward(dout)    gradients after a forward: same keys, shapes and dtype as params (laid end to end in a
                          new buffer, minidiff.kernels.flat.FlatArrays, where the parameters are)
  model.config            JSON-serialisable constructor kwargs (without device): build_model(name, **config)
  model.backend, model.dtype, model.load_params(arrays)

On the CPU a model may split its batch over the cores (`_forward_in_parts`): images are independent, so only the
order in which the parts' gradients are summed depends on the thread count.
"""

from __future__ import annotations

import math

import numpy as np

from minidiff.backend import Backend, get_backend, resolve_dtype
from minidiff.kernels.flat import FlatArrays, gather, total_size
from minidiff.nn.layers import init_param
from minidiff.execution.threads import cpu_workers, map_parts
from minidiff.kernels.chunks import batch_chunks as batch_parts
from minidiff.nn.tape import NoTape, Tape
from minidiff.execution import graphs as graphs_gpu
from minidiff.execution import processes as procs
from minidiff.kernels.workspace import retain_freed_memory


# A part must hold enough work to pay for running the network's Python once more and for the trip to a worker
# process (minidiff.execution.processes): about 16 digits (8x8). Measured on 2 cores with worker processes, interleaved (median of
# 15 rounds, 2026-11-25): 32 images, forward 9.6 ms in 2 parts vs 12.0 in one, training step 20.4 vs 33.2; 16 images,
# forward 7.6 vs 5.1, step 14.4 vs 13.6. Parts on threads (where worker processes are not used) break even only at
# ~48 digits a part, since the threads share the GIL (64 images: a step 5% and a forward 16% slower in 2 parts).
MIN_PART_ELEMENTS = 16 * 64
MIN_PART_ELEMENTS_THREADS = 48 * 64


class Denoiser:
    """Base class: builds `params` from specs with a seeded host RNG and keeps the forward's tape for backward."""

    splits_batch = False   # True where forward and backward go through _forward_in_parts / _backward_in_parts

    def __init__(self, config, dtype="float32", seed=0, device=None):
        self.config = dict(config, dtype=np.dtype(resolve_dtype(dtype)).name, seed=int(seed))
        self.dtype = resolve_dtype(dtype)
        self.backend = device if isinstance(device, Backend) else get_backend(device)
        if self.backend.name != "cupy":
            retain_freed_memory()  # a CPU step reallocates what the last one freed: keep it (see minidiff.kernels.workspace)
        self.params = {}
        self._tape = None
        self._workers = None   # minidiff.execution.processes.PartWorkers, forked on the first split call
        self._params_shared = False   # parameters in shared memory (set by _init_params), which workers need
        self._graphs = None
        self.set_cuda_graphs(graphs_gpu.ENABLED)

    def set_cuda_graphs(self, enabled: bool) -> None:
        """On CuPy, replay forward and backward as CUDA graphs after a warm-up call (minidiff.execution.graphs; on by
        default, MINIDIFF_CUDA_GRAPHS=0 turns it off); elsewhere nothing changes. Turning it off drops the graphs."""
        on = enabled and self.backend.name == "cupy" and self.splits_batch
        if not on and self._graphs is not None:
            graphs, self._graphs = self._graphs, None
            graphs.close()   # a replayed forward awaiting its backward is run again eagerly
        elif on and self._graphs is None:
            self._graphs = graphs_gpu.ModelGraphs(self)

    def _init_params(self, specs):
        """specs: iterable of (name, shape, init), in registration order; drawn on the host in that order."""
        rng = np.random.default_rng(self.config["seed"])
        specs = list(specs)
        shapes = {name: shape for name, shape, _ in specs}
        # end to end in one buffer (minidiff.kernels.flat: an optimizer step then runs on a few long arrays), in shared
        # memory where worker processes must see the optimizer's in-place updates
        self._params_shared = self.backend.name == "numpy" and procs.USE_PROCESSES
        if self._params_shared:
            self.params = procs.shared_arrays(shapes, self.dtype)
        else:
            self.params = FlatArrays(shapes, self.backend.xp.zeros(total_size(shapes), dtype=self.dtype))
        for name, shape, init in specs:
            self.params[name][...] = self.backend.asarray(init_param(rng, shape, init), dtype=self.dtype)

    def _timesteps(self, t):
        """t for the timestep embedding: on CuPy a device array, so that the embedding is computed on the device
        (where a CUDA graph replays it, minidiff.execution.graphs); elsewhere as given (the host array)."""
        return self.backend.xp.asarray(t) if self.backend.name == "cupy" else t

    def _start(self, x, cache):
        """Cast the input to the model dtype and open a tape (or a NoTape) for this forward."""
        x = x.astype(self.dtype, copy=False)
        if not cache:
            return x, NoTape()  # an earlier forward's tape stays, so its backward can still run
        self._tape = Tape()
        return x, self._tape

    # Images are independent in these models (no batch statistics): a forward over a batch is the forwards over its
    # parts, and the parameter gradient is the sum of the parts' gradients. On the CPU the parts run on the cores,
    # each single-threaded: in worker processes (minidiff.execution.processes) with the NumPy backend, else on threads
    # (minidiff.execution.threads); on a GPU, or with one BLAS thread, there is one part.
    def _forward_in_parts(self, x, t, cache, forward_images):
        """forward_images(x_part, t_part, tape_part) -> output part, over parts of the batch; the outputs joined.
        Replayed from a CUDA graph where the model has them (set_cuda_graphs)."""
        if self._graphs is not None:
            return self._graphs.forward(x, t, cache, forward_images)
        return self._forward_parts(x, t, cache, forward_images)

    def _forward_parts(self, x, t, cache, forward_images):
        xp = self.backend.xp
        x, tape = self._start(x, cache)
        parts = self._batch_parts(x.shape)
        tapes = [Tape() if cache else NoTape() for _ in parts]
        workers = self._part_workers(len(parts))
        if workers is None:
            outs = map_parts(lambda k: forward_images(x[parts[k][0]:parts[k][1]], t[parts[k][0]:parts[k][1]],
                                                      tapes[k]), range(len(parts)), xp)
        else:
            outs = workers.run_parts(lambda: forward_images(x[:parts[0][1]], t[:parts[0][1]], tapes[0]), "forward",
                                     forward_images.__name__, [(x[a:b], t[a:b], cache) for a, b in parts[1:]])
        tape.append((parts, tapes, workers))
        return outs[0] if len(outs) == 1 else xp.concatenate(outs, axis=0)

    def _backward_in_parts(self, dout, backward_images):
        """backward_images(dout_part, tape_part) -> {name: gradient} per part, summed in part order. Replayed from
        a CUDA graph where the model has them."""
        if self._graphs is not None:
            return self._graphs.backward(dout, backward_images)
        return self._backward_parts(dout, backward_images)

    def _backward_parts(self, dout, backward_images):
        parts, tapes, workers = self._tape_for_backward().pop()

        def part(k):
            grads = backward_images(dout[parts[k][0]:parts[k][1]], tapes[k])
            if tapes[k]:
                raise RuntimeError(f"backward left {len(tapes[k])} caches unused: the tape is out of step")
            return grads

        if workers is None:
            grads = map_parts(part, range(len(parts)), self.backend.xp)
        else:
            if workers.closed:
                raise RuntimeError("the worker processes of this forward are gone: run the forward again")
            grads = workers.run_parts(lambda: part(0), "backward", backward_images.__name__,
                                      [dout[a:b] for a, b in parts[1:]])[:1] + workers.grads[:len(parts) - 1]
        total = self._finish_backward(grads[0])
        for other in grads[1:]:   # the parts' sums, element by element in part order, as array by array
            if total.same_layout(other):
                total.flat += other.flat
            else:
                for name, g in other.items():
                    total[name] += g
        return total

    def _batch_parts(self, shape):
        """The (start, stop) parts a batch of `shape` runs in: one per core, where each gets enough work."""
        min_part = MIN_PART_ELEMENTS if self._parts_in_processes() else MIN_PART_ELEMENTS_THREADS
        return batch_parts(shape[0], min(cpu_workers(self.backend.xp), max(1, math.prod(shape) // min_part)))

    def start_workers(self, batch_shape) -> None:
        """Fork now the worker processes that a batch of `batch_shape` runs its parts in (if any), instead of at the
        first split call. Memory the caller allocates afterwards (optimizer state, an EMA) is then the parent's
        alone: allocated before the fork, each worker would keep the original of every page the parent then writes
        (copy-on-write), 2 x the parameters for Adam's state. A model whose forward never splits forks nothing."""
        if self.splits_batch:
            self._part_workers(len(self._batch_parts(batch_shape)))

    def stop_workers(self) -> None:
        """Close the worker processes (if any); the next split call forks new ones."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def worker_memory_mib(self) -> float:
        """Peak memory (MiB) that this model's worker processes added since they forked; 0.0 without workers."""
        workers = self._workers
        return 0.0 if workers is None or workers.closed else workers.peak_memory_mib()

    def _parts_in_processes(self) -> bool:
        """Whether split calls run in worker processes: parameters in shared memory (NumPy backend) and
        procs.USE_PROCESSES still on."""
        return self._params_shared and procs.USE_PROCESSES

    def _part_workers(self, n_parts):
        """The processes that run parts 1..n_parts-1, or None: the parts run on threads (or there is one part).
        Forked on first use, one per BLAS thread but one, so that later calls with fewer parts reuse them."""
        if n_parts < 2 or not self._parts_in_processes():
            return None
        workers = self._workers
        if workers is None or workers.closed or workers.count < n_parts - 1:
            if workers is not None:
                workers.close()
            workers = self._workers = procs.PartWorkers(self, max(n_parts, cpu_workers(self.backend.xp)) - 1)
        return workers

    def _finish_backward(self, grads):
        """Check the tape was consumed and return the gradients in parameter order, laid end to end in a new buffer
        like the parameters (minidiff.kernels.flat.gather): a norm, a clip or an optimizer step then reads one array."""
        if self._tape:
            raise RuntimeError(f"backward left {len(self._tape)} caches unused: the tape is out of step")
        self._tape = None
        if isinstance(self.params, FlatArrays):
            return gather(self.params, grads, self.backend.xp)
        return {name: grads[name] for name in self.params}

    def _tape_for_backward(self):
        if self._tape is None:
            raise RuntimeError("backward needs a forward(x, t) with cache=True first (and runs once per forward)")
        return self._tape

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
