"""Chunks of each batch on the CPU cores: a model's forward and backward over chunks of its batch, side by side.

Where a model's images are independent (no batch statistics: `images_independent`), a forward over a batch is the
forwards over its chunks, and the parameter gradient is the sum of the chunks' gradients. `DataParallel` (named after
torch.nn.DataParallel, which splits a batch over devices the same way) runs one chunk per core, each single-threaded:
in forked worker processes with the parameters in shared memory on the plain NumPy backend on Linux
(minidiff.execution.processes), else on threads (minidiff.execution.threads). The chunks' gradients are added in
chunk order, so for a given number of chunks every result is reproducible bit for bit; only that order depends on
the core count. On a GPU, or with one BLAS thread, there is one chunk.
"""

from __future__ import annotations

import math

from minidiff.execution import processes as procs
from minidiff.execution.threads import cpu_workers, map_chunks
from minidiff.execution.wrapper import ModelWrapper
from minidiff.kernels.chunks import batch_chunks
from minidiff.nn.tape import make_tape

# A chunk must hold enough work to pay for running the network's Python once more and for the trip to a worker
# process: about 16 digits (8x8) (BENCHMARKS.md). Chunks on threads, which share the GIL, pay only from about 48
# digits a chunk.
MIN_CHUNK_ELEMENTS = 16 * 64
MIN_CHUNK_ELEMENTS_THREADS = 48 * 64


class DataParallel(ModelWrapper):
    """A model whose images are independent, its batches split into chunks that run on the CPU cores.

    forward_pass(x, t, tape) runs the model's forward_pass on each chunk with a tape of its own and puts one entry on
    `tape`: (the chunks' (start, stop), their tapes, the worker processes that hold chunks 1.. or None);
    backward_pass(dout, tape) runs each chunk's backward_pass where its forward ran and sums the gradients.
    """

    def __init__(self, model):
        super().__init__(model)
        if not model.images_independent:
            raise ValueError(f"{type(model).__name__} mixes the images of a batch: its batch cannot be split")
        self.in_processes = model.backend.name == "numpy" and procs.USE_PROCESSES
        if self.in_processes:   # the workers must see the optimizer's in-place updates
            model.move_params(procs.shared_buffer(model.params.flat.size, model.dtype))
        self._workers = None

    @property
    def workers(self):
        """The worker processes (minidiff.execution.processes.ChunkWorkers) forked so far, or None."""
        return self._workers

    def batch_chunks(self, shape) -> list:
        """The (start, stop) chunks a batch of `shape` runs in: one per core, where each gets enough work."""
        min_chunk = MIN_CHUNK_ELEMENTS if self.in_processes else MIN_CHUNK_ELEMENTS_THREADS
        return batch_chunks(shape[0], min(cpu_workers(self.backend.xp), max(1, math.prod(shape) // min_chunk)))

    def forward_pass(self, x, t, tape):
        model, xp = self.model, self.backend.xp
        x = x.astype(self.dtype, copy=False)
        chunks = self.batch_chunks(x.shape)
        tapes = [make_tape(tape.keeps) for _ in chunks]
        workers = self._chunk_workers(len(chunks))
        if workers is None:
            outs = map_chunks(lambda k: model.forward_pass(x[chunks[k][0]:chunks[k][1]], t[chunks[k][0]:chunks[k][1]],
                                                           tapes[k]), range(len(chunks)), xp)
        else:
            stop = chunks[0][1]
            outs = workers.run_chunks(lambda: model.forward_pass(x[:stop], t[:stop], tapes[0]), "forward",
                                      [(x[a:b], t[a:b], tape.keeps) for a, b in chunks[1:]])
        tape.append((chunks, tapes, workers))
        return outs[0] if len(outs) == 1 else xp.concatenate(outs, axis=0)

    def backward_pass(self, dout, tape):
        chunks, tapes, workers = tape.pop()
        tape.check_spent()

        def chunk(k):
            a, b = chunks[k]
            return self.model.backward_pass(dout[a:b], tapes[k])

        if workers is None:
            grads = map_chunks(chunk, range(len(chunks)), self.backend.xp)
        else:
            if workers.closed:
                raise RuntimeError("the worker processes of this forward are gone: run the forward again")
            grads = workers.run_chunks(lambda: chunk(0), "backward", [dout[a:b] for a, b in chunks[1:]])[:1] + \
                workers.grads[:len(chunks) - 1]
        total = grads[0]
        for other in grads[1:]:   # laid out alike: the chunks' sums, element by element in chunk order
            total.flat += other.flat
        return total

    def start_workers(self, batch_shape) -> None:
        """Fork now the worker processes that a batch of `batch_shape` runs its chunks in (if any), instead of at the
        first call. Memory the caller allocates afterwards (optimizer state, an EMA) is then the parent's alone:
        allocated before the fork, each worker would keep the original of every page the parent then writes
        (copy-on-write), 2 x the parameters for Adam's state."""
        self._chunk_workers(len(self.batch_chunks(batch_shape)))

    def stop_workers(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def worker_memory_mib(self) -> float:
        workers = self._workers
        return 0.0 if workers is None or workers.closed else workers.peak_memory_mib()

    def _chunk_workers(self, n_chunks):
        """The processes that run chunks 1..n_chunks-1, or None: the chunks run on threads (or there is one chunk).
        Forked on first use, one per BLAS thread but one, so that later calls with fewer chunks reuse them."""
        if n_chunks < 2 or not self.in_processes:
            return None
        workers = self._workers
        if workers is None or workers.closed or workers.count < n_chunks - 1:
            if workers is not None:
                workers.close()
            workers = self._workers = procs.ChunkWorkers(self.model, max(n_chunks, cpu_workers(self.backend.xp)) - 1)
        return workers
