"""Batch parts on the cores in worker processes: a model's forward and backward over its parts, without the GIL.

Why processes: the parts of a batch are independent (minidiff.execution.threads), but threads share the GIL, and every NumPy
call that releases it can hand it to the other thread. On this project's VMs a handoff costs tens of microseconds
(a waiting thread sleeps and its core idles): two threads making 1-3 us NumPy calls ran at 0.36-0.73x the speed of
one thread, and a 128-image digits step on 2 threads took 49-55 ms where two processes each running a 64-image step
side by side took 38-40 ms each. So on a multi-core CPU with the plain NumPy backend, part 0 runs in the calling
process and parts 1..W-1 run in W-1 forked worker processes, one per part, each with one BLAS thread.

What is shared and what travels:
  parameters   allocated in shared memory (`shared_arrays`) before the workers fork: the optimizer's in-place
               updates and load_params are seen by every worker with no copy;
  gradients    each worker writes its part's gradients into its own shared buffers, made before it forks;
  activations  stay in the process that made them: a worker keeps its part's tape from forward to backward;
  x, t, dout   and the worker's output part travel pickled over a pipe (a few KB to a few MB a step).
A worker computes its part exactly as a thread would (the same code, one BLAS thread) and the caller adds the
parts' gradients in part order, so results are bitwise those of threaded parts with the same split (the two
split from different batch sizes: minidiff.models.base's MIN_PART_ELEMENTS and MIN_PART_ELEMENTS_THREADS).

Lifetime: on a model's first split call, one worker per BLAS thread but one is forked (a call with fewer parts
uses the first ones), and they live as long as the model (weakref.finalize) or until `close`; if a later call needs
more parts (BLAS was given more threads), they are closed and a full new set is forked. A worker exits when its pipe
closes (also when the parent dies), ignores SIGINT (Ctrl-C is the parent's to handle) and takes SIGTERM's default
action. Any failure of the round trip other than an error raised by the part's own computation (which is re-raised
in the caller) closes the workers; the next split call forks new ones.
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

from minidiff.kernels.flat import FlatArrays, total_size
from minidiff.kernels.workspace import release_free_memory
from minidiff.nn.tape import NoTape, Tape
from minidiff.execution.threads import blas_held, enter_worker

# Linux only: elsewhere fork is missing, or (macOS) unsafe once system frameworks such as Accelerate have started
# threads. Set it to False before building a model to run its parts on threads (tests compare the two).
USE_PROCESSES = sys.platform.startswith("linux")


def shared_arrays(shapes: dict, dtype) -> FlatArrays:
    """{name: zero-filled NumPy array of shape}, laid end to end (minidiff.kernels.flat) in one block of anonymous shared
    memory (MAP_SHARED), which a forked child shares with its parent instead of copying it."""
    dtype = numpy.dtype(dtype)
    n = total_size(shapes)
    return FlatArrays(shapes, numpy.frombuffer(mmap.mmap(-1, max(n, 1) * dtype.itemsize), dtype=dtype, count=n))


class WorkerError(RuntimeError):
    """A worker process failed outside its part's computation (it died, or its pipe broke)."""


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
    """The worker's loop: run forward / backward requests on this process's part until the pipe closes."""
    enter_worker()
    tape = None
    while True:
        try:
            op, method, args, errstate = conn.recv()
        except (EOFError, OSError):
            return
        try:
            with numpy.errstate(**errstate):
                if op == "memory":
                    reply = ("ok", _private_mib())
                elif op == "forward":
                    x, t, cache = args
                    part_tape = Tape() if cache else NoTape()
                    reply = ("ok", getattr(model, method)(x, t, part_tape))
                    if cache:
                        tape = part_tape
                else:   # backward: the gradients go into the shared buffers
                    if tape is None:
                        raise RuntimeError("backward needs a forward with cache=True first")
                    part_grads = getattr(model, method)(args, tape)
                    if tape:
                        raise RuntimeError(f"backward left {len(tape)} caches unused: the tape is out of step")
                    tape = None
                    numpy.concatenate([part_grads[name].reshape(-1) for name in grads], out=grads.flat)
                    reply = ("ok", None)
        except Exception as exc:   # noqa: BLE001 -- the part's own error, raised again in the caller
            reply = ("error", exc)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
        except Exception as exc:   # noqa: BLE001 -- an exception that cannot be pickled
            conn.send(("error", RuntimeError(f"{type(exc).__name__} in a worker: {exc}")))


class PartWorkers:
    """W - 1 forked workers for parts 1..W-1 of a model's batch; part 0 stays with the caller."""

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
                self.request(k, "memory", None, None)
            return sum(self.reply(k) for k in range(self.count))
        except BaseException:   # a reply left unread would answer the next request
            self.close()
            raise

    def run_parts(self, local, op, method, worker_args):
        """Send (op, method, worker_args[k]) to worker k, run local() here meanwhile with BLAS on one thread, and
        return [local's result] + the workers' results. An error raised by a part is raised after every reply is
        in (part 0's first, as minidiff.execution.threads.map_parts does); anything else (a dead worker, Ctrl-C) closes
        the workers, since their replies can no longer be matched to requests."""
        try:
            for k, args in enumerate(worker_args):
                self.request(k, op, method, args)
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

    def request(self, k, op, method, args):
        """Send one request to worker k (its part is part k + 1)."""
        try:
            self.conns[k].send((op, method, args, numpy.geterr()))
        except (OSError, ValueError) as exc:
            raise WorkerError(f"worker process {k + 1} is gone: {exc}") from exc

    def reply(self, k):
        """Worker k's answer: its result, or the exception its part raised."""
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
