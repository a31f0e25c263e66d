"""The bookkeeping of minidiff.execution.graphs, on the CPU: which call runs eagerly, which is captured, which replays,
and which tape a backward uses, through sequences of calls a real GPU would take long to walk.

A stand-in for CuPy (NumPy arrays; a capture records the "kernels" the model launches instead of running them, and a
graph's launch runs the recorded kernels again, reading the static buffers and the weight as they are then, as a
replay does without the model's Python) drives a one-weight model with the pass interface a CudaGraphs wrapper
uses. What the graphs compute on a real GPU is test_gpu_graphs.py's business."""

import contextlib
import types

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from minidiff.execution import graphs as graphs_gpu
from minidiff.execution.graphs import CudaGraphs
from minidiff.kernels.capture import CaptureNeedsWarmUp
from minidiff.kernels.flat import FlatArrays


class DevArray(np.ndarray):
    def set(self, host):   # cupy.ndarray.set: the host -> device copy
        self[...] = host


class FakeGraph:
    def __init__(self, kernels):
        self.kernels = kernels

    def launch(self, stream=None):
        FAKE.mode = "replay"
        try:
            for kernel in self.kernels:
                kernel()
        finally:
            FAKE.mode = "eager"


class FakeStream:
    def __init__(self, non_blocking=False):
        pass

    def begin_capture(self):
        FAKE.mode, FAKE.recorded = "capture", []

    def end_capture(self):
        FAKE.mode = "eager"
        return FakeGraph(FAKE.recorded)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakePool:
    def __init__(self, allocator=None):
        pass

    def malloc(self, size):
        raise AssertionError("the stand-in allocates nothing through a pool")

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


def launch(kernel):
    """Run a kernel now, or record it for the graph being captured (a capture alone computes nothing)."""
    if FAKE.mode == "capture":
        FAKE.recorded.append(kernel)
    else:
        kernel()


FAKE = types.SimpleNamespace(
    mode="eager", recorded=[], empty_like=lambda x: np.empty_like(x).view(DevArray),
    empty=lambda shape, dtype: np.empty(shape, dtype=dtype).view(DevArray), get_default_memory_pool=FakePool,
    cuda=types.SimpleNamespace(Stream=FakeStream, MemoryPool=FakePool,
                               using_allocator=lambda allocator: contextlib.nullcontext()))


class OneWeight:
    """out = w x + t (per row), tape [x]; dw = sum(dout * x): forward_pass and backward_pass with explicit tapes, as a
    model has them. The arithmetic is a kernel, so a replay recomputes it with the weight as it is then; calls
    records ("forward" | "backward", "eager" | "capture" | "replay"); `fail[kind]` is what a capture of that pass
    raises (once), after the tape is made."""

    def __init__(self):
        self.backend = types.SimpleNamespace(name="cupy", xp=FAKE)
        self.w, self.fail, self.calls = 1.5, {}, []
        self.params = FlatArrays({"w": (1,)}, np.zeros(1))

    def check_input(self, x, t):
        pass

    def _run(self, kind, kernel):
        if FAKE.mode == "capture":
            self.calls.append((kind, "capture"))
        launch(lambda: (self.calls.append((kind, FAKE.mode)), kernel()))
        if FAKE.mode == "capture" and kind in self.fail:
            raise self.fail.pop(kind)

    def forward_pass(self, x, t, tape):
        out = FAKE.empty(x.shape, x.dtype)
        tape.append(x)   # in a capture x is the static input, which every replay rewrites

        def kernel():
            out[...] = self.w * x + t[:, None]
        self._run("forward", kernel)
        return out

    def backward_pass(self, dout, tape):
        x = tape.pop()
        tape.check_spent()
        grads = self.params.like(FAKE.empty((1,), np.float64))

        def kernel():
            grads.flat[0] = (dout * x).sum()
        self._run("backward", kernel)
        return grads


def batch(step, n=4):
    rng = np.random.default_rng(step)
    return rng.standard_normal((n, 3)), rng.integers(0, 100, n)


def train(model, steps, n=4, first=0):
    """forward, backward, w -= 0.1 dw for `steps` batches -> [(output, dw)]."""
    got = []
    for step in range(first, first + steps):
        x, t = batch(step, n)
        out = model.forward(x, t)
        dw = model.backward(out - 1.0)["w"]
        model.model.w -= 0.1 * float(dw[0])
        got.append((np.array(out), float(dw[0])))
    return got


def graphed(enabled=True):
    return CudaGraphs(OneWeight(), enabled=enabled)


def test_one_eager_step_then_captures_then_replays_with_the_eager_results():
    model, eager = graphed(), graphed(False)
    assert_bitwise_equal(train(model, 5), train(eager, 5))
    modes = [mode for _, mode in model.model.calls]
    # step 1 eager; step 2 captures each pass and launches it (a capture alone computes nothing); then replays
    assert modes == ["eager", "eager", "capture", "replay", "capture", "replay"] + ["replay"] * 6


def test_a_backward_after_a_graphed_one_raises_even_when_an_older_forward_was_never_differentiated():
    for turn_off in (False, True):
        model = graphed()
        train(model, 3)
        model.forward(*batch(99, n=2))        # eager (a new shape), never differentiated: its tape must not resurface
        x, t = batch(7)
        out = model.forward(x, t)             # replayed
        model.backward(out)
        if turn_off:
            model.set_cuda_graphs(False)
        with pytest.raises(RuntimeError, match="backward needs a forward"):
            model.backward(out)


def test_forwards_without_cache_in_between_leave_the_pending_backward_alone():
    model, eager = graphed(), graphed(False)
    for m in (model, eager):
        m.got = []
        for step in range(5):
            x, t = batch(step)
            out = m.forward(x, t)
            m.forward(*batch(50 + step, n=2), cache=False)
            m.forward(x[::-1].copy(), t[::-1].copy(), cache=False)   # the same shape as the cached forward
            m.got.append((np.array(out), float(m.backward(out * 2.0)["w"][0])))
    assert_bitwise_equal(model.got, eager.got)
    assert len(model.entries) == 3 and model.graph_count() == 3


def test_a_capture_that_needs_a_warm_up_runs_eagerly_and_captures_the_next_time():
    for kind in ("forward", "backward"):
        model, eager = graphed(), graphed(False)
        train(model, 1)
        model.model.fail[kind] = CaptureNeedsWarmUp("a new scratch buffer")
        assert_bitwise_equal(train(model, 4, first=1), train(eager, 5)[1:])
        assert model.enabled and not model.model.fail
        entry, = model.entries.values()
        assert entry.forward_graph is not None and entry.backward_graph is not None


def test_a_failed_capture_turns_graphs_off_with_a_warning_and_the_step_is_still_right():
    for kind in ("forward", "backward"):
        model, eager = graphed(), graphed(False)
        model.model.fail[kind] = RuntimeError("operation not permitted when stream is capturing")
        with pytest.warns(RuntimeWarning, match="CUDA graphs are off"):
            got = train(model, 4)
        assert not model.enabled
        assert_bitwise_equal(got, train(eager, 4))


def test_an_interrupted_capture_leaves_no_tape_of_its_own_behind():
    model = graphed()
    train(model, 1)
    model.model.fail["forward"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        model.forward(*batch(1))
    with pytest.raises(RuntimeError, match="backward needs a forward"):   # not the capture's half-made tape
        model.backward(np.zeros((4, 3)))
    model.model.fail["backward"] = KeyboardInterrupt()
    out = model.forward(*batch(2))
    with pytest.raises(KeyboardInterrupt):
        model.backward(out)
    eager = graphed(False)
    eager.model.w = model.model.w
    assert_bitwise_equal(train(model, 3, first=3), train(eager, 3, first=3))   # the forward is captured anew
    assert model.enabled


def test_turning_graphs_off_between_a_replayed_forward_and_its_backward_keeps_the_backward():
    model, eager = graphed(), graphed(False)
    train(model, 3)
    train(eager, 3)
    x, t = batch(3)
    out = model.forward(x, t)
    model.set_cuda_graphs(False)
    assert model.backward(out)["w"][0] == eager.backward(eager.forward(x, t))["w"][0]


def test_at_most_max_entries_signatures_are_captured_and_the_rest_run_eagerly():
    model, eager = graphed(), graphed(False)
    sizes = list(range(1, graphs_gpu.MAX_ENTRIES + 3))
    for m in (model, eager):
        m.got = [train(m, 1, n=n, first=r)[0] for r in range(3) for n in sizes]
    assert_bitwise_equal(model.got, eager.got)
    assert model.graph_count() == graphs_gpu.MAX_ENTRIES
    unused = [e for e in model.entries.values() if e.forward_graph is None]
    assert len(unused) == 2 and all(e.x is None for e in unused)   # no static buffers where nothing was captured



def test_wrap_replays_graphs_on_cupy_unless_they_are_turned_off(monkeypatch):
    from minidiff.execution import wrap
    for enabled in (True, False):
        monkeypatch.setattr(graphs_gpu, "ENABLED", enabled)
        runner = wrap(OneWeight())
        assert isinstance(runner, CudaGraphs) and runner.enabled == enabled
        assert_bitwise_equal(train(runner, 3), train(graphed(False), 3))
