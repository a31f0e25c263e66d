"""CPU parallelism: independent chunks of a batch on the cores, each chunk single-threaded.

NumPy runs elementwise work and copies on one core; only its BLAS is multi-threaded, and two BLAS threads sharing one
of a chunked convolution's small products scale poorly. But the images of a batch are independent in a UNet (no
batch statistics), so the forward and backward of each chunk of a batch can run on a core of its own: `map_chunks`
hands the chunks to a pool of Python threads, BLAS held to one thread meanwhile. NumPy releases the GIL inside its
copies, ufunc loops and BLAS calls, so all the work of a step -- products, GroupNorm, attention, copies -- runs side
by side; only the Python between NumPy calls takes turns. (scikit-learn drives BLAS threads with threadpoolctl the
same way.) Used by minidiff.execution.data_parallel where worker processes are not (minidiff.execution.processes: the
plain NumPy backend on Linux runs its chunks in processes, because those turns can cost far more than the Python
itself; the strict test backend and other systems use the threads here).

The number of workers is NumPy's BLAS thread count at the time of the call, read through threadpoolctl: whatever
limits BLAS (threadpool_limits, OPENBLAS_NUM_THREADS) limits minidiff as well, and the PyTorch comparison in the
benchmark gives torch that same count. Without threadpoolctl, on CuPy (a GPU wants one large launch), or inside a
chunk, chunks run one after another on the calling thread. Each chunk writes only its own rows and `map_chunks`
returns the chunks' results in chunk order, so for a given number of workers every result is reproducible bit for
bit.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import concurrent.futures
from concurrent.futures import ThreadPoolExecutor

import numpy

from minidiff.backend import is_cupy_module

_LOCAL = threading.local()   # .in_worker: set on pool threads, so nested calls run serially
_POOL: dict = {}
_HELD = {"workers": None}    # set while `blas_held` keeps BLAS on one thread: the worker count it found


@functools.lru_cache(maxsize=None)
def _blas_controller():
    """threadpoolctl's controller of NumPy's BLAS, or None (threadpoolctl missing, or no BLAS found)."""
    try:   # numpy (imported above) has loaded BLAS before threadpoolctl looks for it
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    return libs[0] if libs else None


def cpu_workers(xp) -> int:
    """How many threads `map_chunks` uses for arrays of module `xp`: BLAS's thread count on the CPU, else 1."""
    if is_cupy_module(xp) or getattr(_LOCAL, "in_worker", False):
        return 1
    if _HELD["workers"] is not None:
        return _HELD["workers"]
    blas = _blas_controller()
    return max(1, int(blas.num_threads)) if blas is not None else 1


@contextlib.contextmanager
def blas_held(workers):
    """BLAS on one thread while the chunks run, `cpu_workers` answering `workers` meanwhile (restored after, also on
    errors); nested uses are no-ops."""
    if _HELD["workers"] is not None:
        yield
        return
    blas = _blas_controller()
    before = blas.num_threads
    blas.set_num_threads(1)
    _HELD["workers"] = workers
    try:
        yield
    finally:
        _HELD["workers"] = None
        blas.set_num_threads(before)


def enter_worker():
    """In a worker process (minidiff.execution.processes): nested map_chunks calls run serially and BLAS keeps one
    thread."""
    _LOCAL.in_worker = True
    _HELD["workers"] = None
    blas = _blas_controller()
    if blas is not None:
        blas.set_num_threads(1)


def _pool(workers):
    if workers not in _POOL:
        _POOL[workers] = ThreadPoolExecutor(workers - 1, thread_name_prefix="minidiff",
                                            initializer=lambda: setattr(_LOCAL, "in_worker", True))
    return _POOL[workers]


def map_chunks(fn, chunks, xp):
    """[fn(chunk) for chunk in chunks], computed by up to `cpu_workers(xp)` threads (worker k takes chunks k, k + w,
    ...).

    fn must touch only its own chunk's outputs and use per-thread scratch (minidiff.kernels.workspace keys by thread).
    """
    chunks = list(chunks)
    workers = min(cpu_workers(xp), len(chunks))
    if workers <= 1:
        return [fn(c) for c in chunks]

    errstate = numpy.geterr()   # threads start with NumPy's default error handling: use the caller's

    def run(k):  # in a chunk, nested map_chunks calls run serially: the cores are busy with the chunks already
        nested = getattr(_LOCAL, "in_worker", False)
        _LOCAL.in_worker = True
        try:
            with numpy.errstate(**errstate):
                return [fn(c) for c in chunks[k::workers]]
        finally:
            _LOCAL.in_worker = nested

    with blas_held(cpu_workers(xp)):
        futures = [_pool(workers).submit(run, k) for k in range(1, workers)]
        try:
            groups = [run(0)]
        finally:   # wait for every worker, even if this thread's chunks failed (then its error is the one raised)
            concurrent.futures.wait(futures)
        groups += [f.result() for f in futures]
    results = [None] * len(chunks)
    for k, group in enumerate(groups):
        results[k::workers] = group
    return results
