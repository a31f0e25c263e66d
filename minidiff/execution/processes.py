"""Chunks of a batch on the cores in worker processes: a model's forward and backward over chunks, without the GIL.

Why processes: the chunks of a batch are independent (minidiff.execution.threads), but threads share the GIL, and
every NumPy call that releases it can hand it to the other thread. A handoff (a waiting thread sleeps and its core
idles) can cost more than the short NumPy calls of a small model's step, so threads can run slower than one thread
alone (BENCHMARKS.md). So on a multi-core CPU with the plain NumPy backend, chunk 0 runs in the calling process and
chunks 1..W-1 in W-1 forked worker processes, one per chunk, each with one BLAS thread.

What is shared and what travels:
  parameters   in shared memory (`shared_buffer`, minidiff.execution.data_parallel moves them there) before the
               workers fork: the optimizer's in-place updates and load_params are seen by every worker with no copy;
  gradients    each worker writes its chunk's gradients into its own shared buffers, made before it forks;
  activations  stay in the process that made them: a worker keeps its chunk's tape from forward to backward;
  x, t, dout   and the worker's output chunk travel pickled over a pipe (a few KB to a few MB a step).
A worker computes its chunk exactly as a thread would (the same code, one BLAS thread) and the caller adds the
chunks' gradients in chunk order, so results are bitwise those of threaded chunks with the same split (the two split
from different batch sizes: minidiff.execution.data_parallel's MIN_CHUNK_ELEMENTS and MIN_CHUNK_ELEMENTS_THREADS).

Lifetime: on the first call that needs them, one worker per BLAS thread but one is forked (a call with fewer chunks
uses the first ones), and they live as long as their owner holds them (weakref.finalize) or until `close`; if a
later call needs more chunks (BLAS was given more threads), they are closed and a full new set is forked. A worker
exits when its pipe closes (also when the parent dies), ignores SIGINT (Ctrl-C is the parent's to handle) and takes
SIGTERM's default action. Any failure of the round trip other than an error raised by the chunk's own computation
(which is re-raised in the caller) closes the workers; the next call forks new ones.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import warnings
import weakref
from multiprocessing.connection import Pipe

import numpy

from minidiff.execution.threads import blas_held, enter_worker
from minidiff.kernels.flat import FlatArrays, total_size
from minidiff.kernels.workspace import release_free_memory
from minidiff.nn.tape import make_tape

# Linux only: elsewhere fork is missing, or (macOS) unsafe once system frameworks such as Accelerate have started
# threads. Set it to False before wrapping a model to run its chunks on threads (tests compare the two).
USE_PROCESSES = sys.platform.startswith("linux")


def shared_buffer(size: int, dtype):
    """A zero-filled 1-D NumPy array in a block of anonymous shared memory (MAP_SHARED), which a forked child shares
    with its parent instead of copying it."""
    dtype = numpy.dtype(dtype)
    return numpy.frombuffer(mmap.mmap(-1, max(size, 1) * dtype.itemsize), dtype=dtype, count=size)


def shared_arrays(shapes: dict, dtype) -> FlatArrays:
    """{name: zero-filled NumPy array of shape}, laid end to end (minidiff.kernels.flat) in one `shared_buffer`."""
    return FlatArrays(shapes, shared_buffer(total_size(shapes), dtype))


class WorkerError(RuntimeError):
    """A worker process failed outside its chunk's computation (it died, or its pipe broke)."""


def _private_mib():
    """This process's private memory (Private_Clean + Private_Dirty of /proc/self/smaps_rollup), MiB; 0.0 where
    that file is missing. For a forked worker that is what it added: the pages it allocated, and the pre-fork pages
    it still holds after its parent wrote to them (copy on write); the shared parameters and gradient buffers, and
    pages both still share, are the parent's (its resident set counts them)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            private = [line for line in f if line.startswith(("Private_Clean:", "Private_Dirty:"))]
        return sum(int(line.split()[1]) for line in private) / 1024
    except (OSError, ValueError, IndexError):
        return 0.0


def _serve(conn, model, grads):
    """The worker's loop: run forward / backward requests on this process's chunk until the pipe closes."""
    enter_worker()
    tape = None
    while True:
        try:
            op, args, errstate = conn.recv()
        except (EOFError, OSError):
            return
        try:
            with numpy.errstate(**errstate):
                if op == "memory":
                    reply = ("ok", _private_mib())
                elif op == "forward":
                    x, t, cache = args
                    chunk_tape = make_tape(cache)
                    reply = ("ok", model.forward_pass(x, t, chunk_tape))
                    if cache:
                        tape = chunk_tape
                else:   # backward: the gradients go into the shared buffers
                    if tape is None:
                        raise RuntimeError("backward needs a forward with cache=True first")
                    chunk_tape, tape = tape, None
                    model.backward_pass(args, chunk_tape, out=grads)
                    reply = ("ok", None)
        except Exception as exc:   # noqa: BLE001 -- the chunk's own error, raised again in the caller
            reply = ("error", exc)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
        except Exception as exc:   # noqa: BLE001 -- an exception that cannot be pickled
            conn.send(("error", RuntimeError(f"{type(exc).__name__} in a worker: {exc}")))


class ChunkWorkers:
    """W - 1 forked workers for chunks 1..W-1 of a model's batch; chunk 0 stays with the caller. The model's
    parameters must be in shared memory already (`shared_buffer`)."""

    def __init__(self, model, count):
        self.grads = [shared_arrays({n: p.shape for n, p in model.params.items()}, model.dtype)
                      for _ in range(count)]
        self.conns, self.pids = [], []
        for k in range(count):
            mine, theirs = Pipe()
            with warnings.catch_warnings():
                # Python >= 3.12 warns about forking a process with threads (OpenBLAS's): the child only runs
                # this module's loop, and OpenBLAS re-creates its pool after a fork (pthread_atfork)
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:   # the worker: serve, then leave without running the parent's exit handlers
                code = 0
                try:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)   # first: a Ctrl-C now is the parent's alone
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not training's "stop after this step" flag
                    for conn in self.conns + [mine]:   # the parent's ends, so only the parent holds them
                        conn.close()
                    release_free_memory()   # before the parent reuses its free blocks (see there)
                    _serve(theirs, model, self.grads[k])
                except BaseException:   # noqa: BLE001
                    code = 1
                finally:
                    os._exit(code)
            theirs.close()
            self.conns.append(mine)
            self.pids.append(pid)
        self._finalizer = weakref.finalize(self, _close, self.conns, self.pids, os.getpid())

    @property
    def count(self):
        return len(self.conns)

    @property
    def closed(self):
        return not self._finalizer.alive

    def peak_memory_mib(self):
        """The memory the workers added (each its private memory now, see `_private_mib`; freed blocks up to 32 MiB
        stay with the process, minidiff.kernels.workspace, so that is its peak), MiB, summed."""
        try:
            for k in range(self.count):
                self.request(k, "memory", None)
            return sum(self.reply(k) for k in range(self.count))
        except BaseException:   # a reply left unread would answer the next request
            self.close()
            raise

    def run_chunks(self, local, op, worker_args):
        """Send (op, worker_args[k]) to worker k, run local() here meanwhile with BLAS on one thread, and return
        [local's result] + the workers' results. An error raised by a chunk is raised after every reply is in
        (chunk 0's first, as minidiff.execution.threads.map_chunks does); anything else (a dead worker, Ctrl-C)
        closes the workers, since their replies can no longer be matched to requests."""
        try:
            for k, args in enumerate(worker_args):
                self.request(k, op, args)
            results, errors = [], []
            try:
                with blas_held(self.count + 1):
                    results.append(local())
            except Exception as exc:   # noqa: BLE001 -- raised below, once the workers have answered
                errors.append(exc)
            for k in range(len(worker_args)):
                try:
                    results.append(self.reply(k))
                except WorkerError:
                    raise
                except Exception as exc:   # noqa: BLE001
                    errors.append(exc)
        except BaseException:
            self.close()
            raise
        if errors:
            raise errors[0]
        return results

    def request(self, k, op, args):
        """Send one request to worker k (its chunk is chunk k + 1)."""
        try:
            self.conns[k].send((op, args, numpy.geterr()))
        except (OSError, ValueError) as exc:
            raise WorkerError(f"worker process {k + 1} is gone: {exc}") from exc

    def reply(self, k):
        """Worker k's answer: its result, or the exception its chunk raised."""
        try:
            status, value = self.conns[k].recv()
        except (EOFError, OSError) as exc:
            raise WorkerError(f"worker process {k + 1} died") from exc
        if status == "error":
            raise value
        return value

    def close(self):
        self._finalizer()


def _close(conns, pids, owner):
    if os.getpid() != owner:   # a finalizer inherited by a forked child: these workers are not its own
        return
    for conn in conns:
        conn.close()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
