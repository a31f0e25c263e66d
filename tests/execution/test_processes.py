"""Chunks of a batch in worker processes (minidiff.execution.processes): the same bits as the threaded chunks, a
chunk's error raised in the caller, dead workers reported and replaced, and workers that leave with their wrapper."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from minidiff.execution import data_parallel
from minidiff.execution import processes as procs
from minidiff.execution.data_parallel import DataParallel
from minidiff.models.unet import UNet
from minidiff.nn.tape import Tape
from minidiff.optim import build_optimizer

threadpoolctl = pytest.importorskip("threadpoolctl")
pytestmark = pytest.mark.skipif(not procs.USE_PROCESSES, reason="worker processes run on Linux only")


@pytest.fixture
def two_chunks(monkeypatch):
    """Two BLAS threads, so two chunks, even for a few images."""
    monkeypatch.setattr(data_parallel, "MIN_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(data_parallel, "MIN_CHUNK_ELEMENTS_THREADS", 1)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        yield


def _model(monkeypatch, use_processes):
    monkeypatch.setattr(procs, "USE_PROCESSES", use_processes)
    return DataParallel(UNet(base_channels=8, groups=4, channel_mults=(1, 2), attention_levels=(1,), seed=3))


def _batch(seed, n=6):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 1000, n)


def test_process_chunks_train_bit_for_bit_like_thread_chunks(two_chunks, monkeypatch):
    """Three Adam steps: the workers see the optimizer's in-place updates (shared parameters), a forward without
    cache between forward and backward leaves the workers' tapes alone, and every number is the threads' number."""
    runs = {}
    for use_processes in (True, False):
        model = _model(monkeypatch, use_processes)
        opt = build_optimizer("adam", model.params, lr=1e-2)
        outs = []
        for step in range(3):
            x, t = _batch(step)
            out = model.forward(x, t)
            outs += [out, model.forward(x[:4], t[:4], cache=False)]
            opt.step(model.backward(out - x))
        assert (model.workers is not None) == use_processes == model.in_processes
        runs[use_processes] = outs, {k: v.copy() for k, v in model.params.items()}
    assert_bitwise_equal(runs[True], runs[False])


def test_an_error_in_a_worker_chunk_is_raised_in_the_caller(two_chunks, monkeypatch):
    model = _model(monkeypatch, True)
    x, t = _batch(0, 4)
    bad = x.copy()
    bad[3] = np.inf   # in chunk 1, the worker's: inf - inf in its GroupNorm
    with np.errstate(all="raise"), pytest.raises(FloatingPointError):   # the caller's errstate reaches the worker
        model.forward(bad, t)
    workers = model.workers
    assert not workers.closed   # the chunk's own error: the workers carry on
    with np.errstate(all="raise"):
        out = model.forward(x, t, cache=False)
    assert model.workers is workers and np.isfinite(out).all()


def test_a_dead_worker_is_reported_and_replaced(two_chunks, monkeypatch):
    model = _model(monkeypatch, True)
    x, t = _batch(1, 4)
    ref = model.forward(x, t, cache=False)
    pid = model.workers.pids[0]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(procs.WorkerError):
        model.forward(x, t, cache=False)
    assert model.workers.closed
    np.testing.assert_array_equal(model.forward(x, t, cache=False), ref)   # new workers, the same numbers
    assert model.workers.pids[0] != pid


def test_a_backward_after_its_workers_closed_says_so(two_chunks, monkeypatch):
    model = _model(monkeypatch, True)
    x, t = _batch(2, 4)
    out = model.forward(x, t)
    model.workers.close()
    with pytest.raises(RuntimeError, match="run the forward again"):
        model.backward(out)


def test_workers_leave_with_their_wrapper(two_chunks, monkeypatch):
    model = _model(monkeypatch, True)
    model.forward(*_batch(3, 4), cache=False)
    pids = list(model.workers.pids)
    del model
    gc.collect()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class FakeBlas:
    """Stands in for threadpoolctl's controller of NumPy's BLAS: a 4-core machine on this 2-core one."""

    def __init__(self, threads):
        self.num_threads = threads

    def set_num_threads(self, n):
        self.num_threads = n


def test_fewer_chunks_reuse_the_workers_and_blas_gets_its_threads_back(monkeypatch):
    """With 4 BLAS threads: 3 workers at the first split; a 2-chunk forward between a 4-chunk forward and its backward
    uses the first worker and leaves the others' tapes alone; BLAS ends at 4 threads, not at a chunk count."""
    from minidiff.execution import threads as parallel
    blas = FakeBlas(4)
    monkeypatch.setattr(parallel, "_blas_controller", lambda: blas)
    monkeypatch.setattr(data_parallel, "MIN_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(data_parallel, "MIN_CHUNK_ELEMENTS_THREADS", 1)
    model = _model(monkeypatch, True)
    x, t = _batch(4, 8)
    tape = Tape()
    out = model.forward_pass(x, t, tape)
    (chunks, _, workers), = tape
    assert workers is model.workers and workers.count == 3 and len(chunks) == 4
    small = model.forward(x[:2], t[:2], cache=False)
    assert model.workers is workers and blas.num_threads == 4
    grads = model.backward_pass(out - x, tape)
    monkeypatch.setattr(procs, "USE_PROCESSES", False)   # the same model on threads: the same bits
    threaded = _model(monkeypatch, False)
    threaded.load_params(model.params)
    assert_bitwise_equal(threaded.forward(x[:2], t[:2], cache=False), small)
    assert_bitwise_equal(threaded.forward(x, t), out)
    assert_bitwise_equal(threaded.backward(out - x), grads)
    assert blas.num_threads == 4


def _exited(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:")).split()[1] == "Z"   # a zombie has exited
    except FileNotFoundError:
        return True


def test_workers_exit_when_their_parent_is_killed():
    """SIGKILL gives the parent no chance to close anything: each worker must see its pipe close and leave."""
    code = textwrap.dedent("""
        import time
        import numpy as np
        from minidiff.execution import data_parallel, threads as parallel
        from minidiff.execution.data_parallel import DataParallel
        from minidiff.models.unet import UNet

        class Blas:   # three workers, whatever this machine has
            num_threads = 4
            def set_num_threads(self, n):
                self.num_threads = n

        blas = Blas()
        parallel._blas_controller = lambda: blas
        data_parallel.MIN_CHUNK_ELEMENTS = 1
        model = DataParallel(UNet(base_channels=8, groups=4))
        model.forward(np.zeros((8, 1, 8, 8), np.float32), np.zeros(8, int), cache=False)
        print(*model.workers.pids, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 3
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while not all(_exited(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_exited(pid) for pid in pids)


def test_shared_arrays_are_shared_with_a_forked_child():
    arrays = procs.shared_arrays({"a": (3, 2), "b": (5,)}, np.float32)
    assert arrays["a"].shape == (3, 2) and arrays["b"].dtype == np.float32 and not arrays["a"].any()
    assert arrays.intact() and arrays["b"].ctypes.data == arrays["a"].ctypes.data + 6 * 4   # end to end
    pid = os.fork()
    if pid == 0:
        arrays["b"][:] = 7.0
        os._exit(0)
    os.waitpid(pid, 0)
    np.testing.assert_array_equal(arrays["b"], 7.0)


def test_workers_started_before_the_optimizer_do_not_keep_copies_of_its_state(two_chunks, monkeypatch):
    """Forked after Adam allocates, a worker keeps the original of each state page the parent then writes
    (copy-on-write): 2 x the parameters. start_workers forks first, so the state is the parent's alone. Nor does a
    worker keep copies of the heap blocks the parent had freed before the fork and reuses after it: it hands them
    back first (without that, the blocks freed below add to the early worker's memory and the test fails)."""
    from minidiff.kernels.workspace import retain_freed_memory
    monkeypatch.setattr(procs, "USE_PROCESSES", True)
    retain_freed_memory()
    junk = [np.ones(100_000) for _ in range(150)]   # freed heap blocks, as a long-running process has them
    del junk
    x, t = _batch(0)
    memory = {}
    for early in (True, False):
        model = DataParallel(UNet(base_channels=64, groups=8, channel_mults=(1, 2), attention_levels=(), seed=3))
        model.start_workers((1, 1, 8, 8))    # one image: one chunk, nothing to fork
        assert model.workers is None
        if early:
            model.start_workers(x.shape)
            assert model.workers is not None and model.workers.count == 1
        workers = model.workers
        opt = build_optimizer("adam", model.params, lr=1e-3)
        for _ in range(2):
            opt.step(model.backward(model.forward(x, t) - x))
        assert workers is None or model.workers is workers   # the early workers ran the chunks
        memory[early] = model.worker_memory_mib()
        model.stop_workers()
    adam_state_mib = 2 * model.num_params() * 4 / 2 ** 20
    assert memory[False] - memory[True] > 0.8 * adam_state_mib, (memory, adam_state_mib)


def test_trainer_sampling_forks_workers_per_call_and_leaves_none_behind(two_chunks, monkeypatch):
    """The sampling model's workers are closed after each sample (between samples they would fill with copies of
    what training rewrites); forked anew, they give the same samples."""
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import Trainer
    monkeypatch.setattr(procs, "USE_PROCESSES", True)
    forks = []
    init = procs.ChunkWorkers.__init__
    monkeypatch.setattr(procs.ChunkWorkers, "__init__", lambda self, *a: (forks.append(1), init(self, *a))[1])
    trainer = Trainer(TrainConfig(dataset="digits", batch_size=8, steps=2, eval_every=0, probe_every=0))
    trainer.train_step()
    first = trainer.sample(4, num_steps=2, seed=1)
    assert trainer._sampling_model.workers is None
    trainer.train_step()
    a = trainer.sample(4, num_steps=2, seed=1)
    b = trainer.sample(4, num_steps=2, seed=1)
    assert trainer._sampling_model.workers is None and first.shape == a.shape
    np.testing.assert_array_equal(a, b)
    assert len(forks) == 4   # the training model's workers (start_workers) and one set per sample call


def test_models_that_never_split_and_read_only_trainers_fork_no_workers(two_chunks, monkeypatch):
    from minidiff.execution import wrap
    from minidiff.models import MLPDenoiser
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import Trainer
    monkeypatch.setattr(procs, "USE_PROCESSES", True)
    forks = []
    init = procs.ChunkWorkers.__init__
    monkeypatch.setattr(procs.ChunkWorkers, "__init__", lambda self, *a: (forks.append(1), init(self, *a))[1])
    mlp = wrap(MLPDenoiser())   # its forward takes the whole batch: workers would idle all run
    mlp.start_workers((4096, 2))
    assert not isinstance(mlp, DataParallel) and mlp.worker_memory_mib() == 0.0 and not forks
    with pytest.raises(ValueError, match="batch cannot be split"):
        DataParallel(MLPDenoiser())
    config = TrainConfig(dataset="digits", batch_size=8, steps=2, eval_every=0, probe_every=0)
    assert Trainer(config, start_workers=False).model.workers is None
    assert Trainer(config).model.workers is not None
