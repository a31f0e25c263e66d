"""The bookkeeping of minidiff.execution.graphs, on the CPU: which call runs eagerly, which is captured, which replays, and
which tape a backward uses, through sequences of calls a real GPU run would take minutes of lent time to walk.

A stand-in for CuPy (NumPy arrays; a capture that records the captured call, and a launch that reruns it into the
captured outputs, the way a graph's replay rewrites them without the model's Python) drives a one-weight model whose
tape follows Denoiser's rules. What the graphs compute on a real GPU is tests/test_gpu_graphs.py's business."""

import contextlib
import types

import numpy as np
import pytest

from minidiff.execution import graphs as graphs_gpu
from minidiff.kernels.capture import CaptureNeedsWarmUp
from minidiff.nn.tape import Tape


class DevArray(np.ndarray):
    def set(self, host):   # cupy.ndarray.set: the host -> device copy
        self[...] = host


class FakeGraph:
    def __init__(self):
        self.replay = None

    def launch(self, stream=None):
        self.replay()


class FakeStream:
    def __init__(self, non_blocking=False):
        pass

    def begin_capture(self):
        FAKE.mode = "capture"

    def end_capture(self):
        FAKE.mode = "eager"
        return FakeGraph()

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


FAKE = types.SimpleNamespace(
    mode="eager", empty_like=lambda x: np.empty_like(x).view(DevArray),
    empty=lambda shape, dtype: np.empty(shape, dtype=dtype).view(DevArray), get_default_memory_pool=FakePool,
    cuda=types.SimpleNamespace(Stream=FakeStream, MemoryPool=FakePool,
                               using_allocator=lambda allocator: contextlib.nullcontext()))


class OneWeight:
    """out = w x + t (per row), tape [x]; dw = sum(dout * x). Like Denoiser: a forward with cache=True replaces the
    tape, backward pops it once, and `fail[kind]` is what a capture of that pass raises (once)."""

    def __init__(self, graphs=True):
        self.backend = types.SimpleNamespace(xp=FAKE)
        self.w, self._tape, self.fail, self.calls = 1.5, None, {}, []
        self._graphs = graphs_gpu.ModelGraphs(self) if graphs else None

    def _forward_images(self, x, t, tape):   # Denoiser hands its graphs a bound method; this one is never called
        raise AssertionError

    def _backward_images(self, dout, tape):
        raise AssertionError

    def _forward_parts(self, x, t, cache, forward_images):
        self.calls.append(("forward", FAKE.mode))
        if cache:
            self._tape = Tape([x])   # in a capture x is the static input, which every replay rewrites
        if FAKE.mode == "capture" and "forward" in self.fail:
            raise self.fail.pop("forward")   # after the tape is made, as a failing layer would
        return self.w * x + t[:, None]

    def _backward_parts(self, dout, backward_images):
        self.calls.append(("backward", FAKE.mode))
        if not self._tape:
            raise RuntimeError("backward needs a forward(x, t) with cache=True first")
        if FAKE.mode == "capture" and "backward" in self.fail:
            raise self.fail.pop("backward")
        x = self._tape.pop()
        self._tape = None
        return {"w": np.array([(dout * x).sum()])}

    def forward(self, x, t, cache=True):
        if self._graphs is None:
            return self._forward_parts(x, t, cache, self._forward_images)
        return self._graphs.forward(x, t, cache, self._forward_images)

    def backward(self, dout):
        if self._graphs is None:
            return self._backward_parts(dout, self._backward_images)
        return self._graphs.backward(dout, self._backward_images)

    def set_cuda_graphs(self, enabled):   # Denoiser.set_cuda_graphs, for graphs on
        if not enabled and self._graphs is not None:
            graphs, self._graphs = self._graphs, None
            graphs.close()


@pytest.fixture(autouse=True)
def replayable(monkeypatch):
    """Captures whose graphs replay: rerun the captured call into the captured outputs, with the tape it was captured
    with (a backward's), leaving the model's own tape alone."""
    real = graphs_gpu.ModelGraphs._capture

    def capture(self, entry, fn):
        model = self._model()
        tape = list(model._tape) if model._tape else None
        result, graph = real(self, entry, fn)

        def replay():
            saved, FAKE.mode = model._tape, "replay"
            model._tape = Tape(tape) if tape is not None else None
            try:
                new = fn()
            finally:
                model._tape, FAKE.mode = saved, "eager"
            for a, b in ((result, new),) if isinstance(result, np.ndarray) else zip(result.values(), new.values()):
                a[...] = b
        graph.replay = replay
        return result, graph
    monkeypatch.setattr(graphs_gpu.ModelGraphs, "_capture", capture)
    FAKE.mode = "eager"


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
        model.w -= 0.1 * float(dw[0])
        got.append((np.array(out), float(dw[0])))
    return got


def assert_same(got, want):
    assert len(got) == len(want)
    for (a, da), (b, db) in zip(got, want):
        np.testing.assert_array_equal(a, b)
        assert da == db


def test_one_eager_step_then_captures_then_replays_with_the_eager_results():
    model, eager = OneWeight(), OneWeight(graphs=False)
    assert_same(train(model, 5), train(eager, 5))
    modes = [mode for _, mode in model.calls]
    # step 1 eager; step 2 captures each pass and launches it (a capture alone computes nothing); then replays
    assert modes == ["eager", "eager", "capture", "replay", "capture", "replay"] + ["replay"] * 6


def test_a_backward_after_a_graphed_one_raises_even_when_an_older_forward_was_never_differentiated():
    for turn_off in (False, True):
        model = OneWeight()
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
    model, eager = OneWeight(), OneWeight(graphs=False)
    for m in (model, eager):
        m.got = []
        for step in range(5):
            x, t = batch(step)
            out = m.forward(x, t)
            m.forward(*batch(50 + step, n=2), cache=False)
            m.forward(x[::-1].copy(), t[::-1].copy(), cache=False)   # the same shape as the cached forward
            m.got.append((np.array(out), float(m.backward(out * 2.0)["w"][0])))
    assert_same(model.got, eager.got)
    assert len(model._graphs.entries) == 3 and model._graphs._graph_count() == 3


def test_a_capture_that_needs_a_warm_up_runs_eagerly_and_captures_the_next_time():
    for kind in ("forward", "backward"):
        model, eager = OneWeight(), OneWeight(graphs=False)
        train(model, 1)
        model.fail[kind] = CaptureNeedsWarmUp("a new scratch buffer")
        assert_same(train(model, 4, first=1), train(eager, 5)[1:])
        assert model._graphs is not None and not model.fail
        entry, = model._graphs.entries.values()
        assert entry.forward_graph is not None and entry.backward_graph is not None


def test_a_failed_capture_turns_graphs_off_with_a_warning_and_the_step_is_still_right():
    for kind in ("forward", "backward"):
        model, eager = OneWeight(), OneWeight(graphs=False)
        model.fail[kind] = RuntimeError("operation not permitted when stream is capturing")
        with pytest.warns(RuntimeWarning, match="CUDA graphs are off"):
            got = train(model, 4)
        assert model._graphs is None
        assert_same(got, train(eager, 4))


def test_an_interrupted_capture_leaves_no_tape_of_its_own_behind():
    model = OneWeight()
    train(model, 1)
    model.fail["forward"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        model.forward(*batch(1))
    with pytest.raises(RuntimeError, match="backward needs a forward"):   # not the capture's half-made tape
        model.backward(np.zeros((4, 3)))
    model.fail["backward"] = KeyboardInterrupt()
    out = model.forward(*batch(2))
    with pytest.raises(KeyboardInterrupt):
        model.backward(out)
    eager = OneWeight(graphs=False)
    eager.w = model.w
    assert_same(train(model, 3, first=3), train(eager, 3, first=3))   # the forward is captured anew
    assert model._graphs is not None


def test_turning_graphs_off_between_a_replayed_forward_and_its_backward_keeps_the_backward():
    model, eager = OneWeight(), OneWeight(graphs=False)
    train(model, 3)
    train(eager, 3)
    x, t = batch(3)
    out = model.forward(x, t)
    model.set_cuda_graphs(False)
    assert model.backward(out)["w"][0] == eager.backward(eager.forward(x, t))["w"][0]


def test_at_most_max_entries_signatures_are_captured_and_the_rest_run_eagerly():
    model, eager = OneWeight(), OneWeight(graphs=False)
    sizes = list(range(1, graphs_gpu.MAX_ENTRIES + 3))
    for m in (model, eager):
        m.got = [train(m, 1, n=n, first=r)[0] for r in range(3) for n in sizes]
    assert_same(model.got, eager.got)
    assert model._graphs._graph_count() == graphs_gpu.MAX_ENTRIES
    unused = [e for e in model._graphs.entries.values() if e.forward_graph is None]
    assert len(unused) == 2 and all(e.x is None for e in unused)   # no static buffers where nothing was captured

