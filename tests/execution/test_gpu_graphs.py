"""CUDA graphs (minidiff.execution.graphs) and the cuBLAS products they capture (minidiff.kernels.cublas), on CuPy;
these run only where CuPy finds a usable GPU. The products are checked against cupy.matmul (to float32 rounding:
cuBLAS picks its own algorithms); everything a graph replays is checked bit for bit against the same code run eagerly,
since both make the same launches. The bookkeeping of which call captures or replays is test_graphs_logic.py's,
on the CPU.
"""

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from helpers.cublas_layouts import layout_cases
from minidiff.backend import BackendError, get_backend, to_numpy
from minidiff.optim import build_optimizer
from minidiff.diffusion.samplers import ddim_sample
from minidiff.diffusion.schedules import make_schedule
from minidiff.execution.graphs import CudaGraphs
from minidiff.models.unet import UNet

pytestmark = pytest.mark.gpu

try:
    GPU = get_backend("gpu")
except BackendError as exc:
    pytest.skip(f"no usable GPU for CuPy ({exc})", allow_module_level=True)

SMALL_UNET = dict(base_channels=16, groups=4, channel_mults=(1, 2), attention_levels=(1,), num_heads=2)


def test_direct_cublas_products_match_cupy_matmul_for_every_layout():
    import cupy
    from minidiff.kernels.cublas import matmul
    for dtype, rtol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        for name, a, b in layout_cases(np.random.default_rng(0), lambda h: cupy.asarray(h, dtype=dtype)):
            want = cupy.asnumpy(cupy.matmul(a, b))
            np.testing.assert_allclose(cupy.asnumpy(matmul(cupy, a, b)), want, rtol=rtol, atol=rtol, err_msg=name)
            out = cupy.full(want.shape[::-1], cupy.nan, dtype=dtype).T   # a non-contiguous out
            assert matmul(cupy, a, b, out=out) is out
            np.testing.assert_allclose(cupy.asnumpy(out), want, rtol=rtol, atol=rtol, err_msg=name)
    empty_k = matmul(cupy, cupy.ones((3, 0), dtype=np.float32), cupy.ones((0, 2), dtype=np.float32))
    assert empty_k.shape == (3, 2) and not cupy.asnumpy(empty_k).any()


def test_direct_cublas_products_replay_in_a_cuda_graph_that_cupy_matmul_cannot_enter():
    import cupy
    from minidiff.kernels.cublas import matmul
    rng = np.random.default_rng(1)
    a, b = (cupy.asarray(rng.standard_normal(s), dtype=np.float32) for s in ((64, 32), (48, 32)))
    c = cupy.empty((64, 48), dtype=np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(NotImplementedError):   # why cublas_gpu exists
                cupy.matmul(a, b.T)
        finally:
            stream.end_capture()
        stream.begin_capture()
        matmul(cupy, a, b.T, out=c)
        graph = stream.end_capture()
    a[...] = cupy.asarray(rng.standard_normal((64, 32)), dtype=np.float32)
    graph.launch()
    np.testing.assert_allclose(cupy.asnumpy(c), cupy.asnumpy(a @ b.T), rtol=1e-5, atol=1e-5)


def _train_steps(graphs, dtype="float32", steps=4, between=None):
    """Forward, backward and Adam for `steps` batches; -> (model, outputs, flat gradients, final parameters)."""
    model = graphed_unet(graphs, dtype=dtype)
    opt = build_optimizer("adam", model.params, lr=1e-2)
    rng = np.random.default_rng(1)
    outs, grads = [], []
    for step in range(steps):
        x = GPU.asarray(rng.standard_normal((8, 1, 16, 16)), dtype=dtype)
        t = rng.integers(0, 1000, 8)
        out = model.forward(x, t)
        g = model.backward(out * 0.5 - x)
        opt.step(g)
        outs.append(to_numpy(out))
        grads.append(to_numpy(g.flat))
        if between is not None:
            between(step)
    return model, outs, grads, to_numpy(model.params.flat)


def graphed_unet(graphs=True, dtype="float32"):
    return CudaGraphs(UNet(**SMALL_UNET, dtype=dtype, seed=3, device=GPU), enabled=graphs)


def _graphed(model):
    return [key for key, e in model.entries.items() if e.forward_graph is not None]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_graph_training_steps_give_the_eager_steps_bits(dtype):
    from minidiff.execution import graphs as graphs_gpu
    model, outs, grads, params = _train_steps(True, dtype)
    assert _graphed(model) and all(e.backward_graph is not None for e in model.entries.values())
    assert graphs_gpu.pool_bytes() > 0
    _, outs0, grads0, params0 = _train_steps(False, dtype)
    for step, (a, b, ga, gb) in enumerate(zip(outs, outs0, grads, grads0)):
        assert_bitwise_equal(a, b, f"output, step {step}")
        assert_bitwise_equal(ga, gb, f"gradients, step {step}")
    assert_bitwise_equal(params, params0)


def test_cuda_graphs_survive_the_scratch_buffers_being_dropped_and_reused():
    import cupy
    from minidiff.kernels import workspace
    junk = []

    def churn(step):   # once captured (step 1), drop every scratch buffer and take its memory for other arrays
        if step >= 1:
            sizes = [buf.size for buf in workspace._BUFFERS.values() if isinstance(buf, cupy.ndarray)]
            workspace.clear()
            junk.extend(cupy.full(n, 7.0, dtype=np.float32) for n in sizes)   # the sizes the pool just got back

    model, outs, grads, params = _train_steps(True, steps=5, between=churn)
    assert model.enabled and all(e.backward_graph is not None for e in model.entries.values())
    _, outs0, grads0, params0 = _train_steps(False, steps=5)
    assert junk and all(bool((j == 7.0).all()) for j in junk)   # no replay wrote into memory handed on
    assert_bitwise_equal(params, params0)
    for a, b, ga, gb in zip(outs, outs0, grads, grads0):
        assert_bitwise_equal(a, b)
        assert_bitwise_equal(ga, gb)


def test_cuda_graph_sampling_gives_the_eager_samples_bits():
    schedule = make_schedule("linear", 1000)
    samples = []
    for graphs in (True, False):
        model = graphed_unet(graphs)
        fn = lambda x, t: model.forward(x, t, cache=False)  # noqa: E731
        samples.append(to_numpy(ddim_sample(fn, schedule, (4, 1, 16, 16), num_steps=6, backend=GPU, seed=2)))
        assert bool(_graphed(model)) == graphs == model.enabled
    assert_bitwise_equal(*samples)


def test_a_graphed_backward_runs_once_per_forward():
    model, *_ = _train_steps(True, steps=3)
    assert _graphed(model)
    with pytest.raises(RuntimeError, match="backward needs a forward"):
        model.backward(GPU.xp.zeros((8, 1, 16, 16), dtype=np.float32))


def test_a_failed_capture_turns_graphs_off_and_the_step_runs_eagerly(monkeypatch):
    import cupy
    from minidiff.kernels import matmul
    monkeypatch.setattr(matmul.cublas_gpu, "matmul", lambda xp, a, b, out=None: cupy.matmul(a, b, out=out))
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off"):
        model, outs, grads, params = _train_steps(True)
    assert not model.enabled
    _, outs0, grads0, params0 = _train_steps(False)
    np.testing.assert_allclose(params, params0, rtol=1e-5, atol=1e-6)   # cupy.matmul's products, not ours


def test_training_with_cuda_graphs_gives_the_eager_runs_bits(monkeypatch, tmp_path):
    from minidiff.execution import graphs as graphs_gpu
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import Trainer
    config = TrainConfig(dataset="digits", model="unet", batch_size=16, steps=5, timesteps=100, device="gpu",
                         model_options=dict(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4))
    params = []
    for enabled in (True, False):
        monkeypatch.setattr(graphs_gpu, "ENABLED", enabled)
        trainer = Trainer(config)
        for _ in range(5):
            trainer.train_step()
        assert (trainer.model.enabled and bool(_graphed(trainer.model))) == enabled
        params.append(to_numpy(trainer.model.params.flat))
    assert_bitwise_equal(*params)


def test_the_memory_peak_counts_what_the_eager_warm_up_held_before_a_capture_freed_it():
    from minidiff.execution import graphs as graphs_gpu
    GPU.xp.get_default_memory_pool().free_all_blocks()
    graphs_gpu.reset_peak()
    model = graphed_unet()
    x = GPU.asarray(np.ones((8, 1, 16, 16)), dtype=np.float32)
    model.forward(x, np.arange(8), cache=False)        # eager: its activations stay cached in the default pool
    eager = GPU.xp.get_default_memory_pool().total_bytes()
    model.forward(x, np.arange(8), cache=False)        # the capture hands them back first
    assert _graphed(model)
    assert GPU.xp.get_default_memory_pool().total_bytes() < eager   # so the reading now no longer sees them
    assert graphs_gpu._HIGH_WATER[0] >= eager   # ... but the peak does: the total just before the release


def test_a_failed_backward_capture_reruns_the_forward_eagerly_and_turns_graphs_off(monkeypatch):
    from minidiff.kernels import flat
    monkeypatch.setattr(flat, "is_capturing", lambda xp: False)   # the backward's gather then needs the host
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off"):
        model, outs, grads, params = _train_steps(True)
    assert not model.enabled
    _, outs0, grads0, params0 = _train_steps(False)
    assert_bitwise_equal(params, params0)
    assert_bitwise_equal(grads[1], grads0[1])   # the step whose backward capture failed


def test_a_scratch_buffer_missing_at_capture_time_defers_the_capture_to_the_next_call():
    import warnings
    from minidiff.kernels import workspace

    def clear(step):   # before the forward's capture (step 1) and, below, between a forward and its backward
        if step == 0:
            workspace.clear()

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # graphs must stay on
        model, outs, grads, params = _train_steps(True, steps=5, between=clear)
        assert _graphed(model)
        model2 = graphed_unet()
        x = GPU.asarray(np.ones((8, 1, 16, 16)), dtype=np.float32)
        results = []
        for step in range(4):
            out = model2.forward(x, np.arange(8))
            if step == 1:
                workspace.clear()   # the backward's capture finds no scratch: it runs eagerly, the forward again
            results.append(to_numpy(model2.backward(out).flat))
        assert _graphed(model2) and all(e.backward_graph is not None for e in model2.entries.values())
    _, outs0, grads0, params0 = _train_steps(False, steps=5)
    assert_bitwise_equal(params, params0)
    for r in results[1:]:
        assert_bitwise_equal(r, results[0])


def test_forwards_of_other_shapes_between_a_forward_and_its_backward_leave_its_graph_intact():
    models = [graphed_unet(graphs) for graphs in (True, False)]
    rng = np.random.default_rng(4)
    got = [[], []]
    for step in range(4):
        x = rng.standard_normal((8, 1, 16, 16)).astype(np.float32)
        small = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
        t = rng.integers(0, 1000, 8)
        for model, out in zip(models, got):
            y = model.forward(GPU.asarray(x), t)
            model.forward(GPU.asarray(small), t[:4], cache=False)
            model.forward(GPU.asarray(x[::-1].copy()), t[::-1].copy(), cache=False)   # the same shape, no cache
            out.append(to_numpy(model.backward(y * 2.0).flat))
    assert len(_graphed(models[0])) == 3
    for a, b in zip(*got):
        assert_bitwise_equal(a, b)


def test_more_input_shapes_than_entries_run_eagerly_with_the_same_results():
    from minidiff.execution import graphs as graphs_gpu
    models = [graphed_unet(graphs) for graphs in (True, False)]
    outs = [[], []]
    for n in (1, 2, 3, 4, 5, 6) * 2:
        x = GPU.asarray(np.full((n, 1, 16, 16), 0.1 * n), dtype=np.float32)
        for model, o in zip(models, outs):
            o.append(to_numpy(model.forward(x, np.arange(n), cache=False)))
    assert len(models[0].entries) == graphs_gpu.MAX_ENTRIES == len(_graphed(models[0]))
    for a, b in zip(*outs):
        assert_bitwise_equal(a, b)


def test_turning_graphs_off_between_a_replayed_forward_and_its_backward_keeps_the_backward():
    model, *_ = _train_steps(True, steps=3)
    x = GPU.asarray(np.ones((8, 1, 16, 16)), dtype=np.float32)
    out = model.forward(x, np.arange(8))               # replayed from its graph
    model.set_cuda_graphs(False)
    got = to_numpy(model.backward(out).flat)
    out_eager = model.forward(x, np.arange(8))
    assert_bitwise_equal(got, to_numpy(model.backward(out_eager).flat))


def test_a_full_training_run_with_probes_samples_and_evaluation_gives_the_eager_runs_bits(monkeypatch, tmp_path):
    from minidiff.execution import graphs as graphs_gpu
    from minidiff.training.config import TrainConfig
    from minidiff.training.session import start_run
    config = TrainConfig(dataset="digits", model="unet", batch_size=16, steps=6, timesteps=100, device="gpu",
                         log_every=2, ckpt_every=3, sample_every=3, sample_count=4, sample_steps=3, probe_every=2,
                         probe_batch=8, eval_every=3, eval_samples=16, eval_steps=3,
                         model_options=dict(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4))
    states = []
    for enabled in (True, False):
        monkeypatch.setattr(graphs_gpu, "ENABLED", enabled)
        trainer, run = start_run(config, tmp_path / f"run{enabled}.h5")
        trainer.train(run, config.steps)
        assert (trainer.model.enabled and bool(_graphed(trainer.model))) == enabled
        states.append(to_numpy(trainer.model.params.flat))
    assert_bitwise_equal(*states)


def test_a_product_into_an_out_that_overlaps_an_operand_is_computed_from_the_operands_before():
    import cupy
    from minidiff.kernels.cublas import matmul
    a = cupy.asarray(np.random.default_rng(5).standard_normal((6, 6)), dtype=np.float32)
    want = cupy.asnumpy(a @ a)
    assert matmul(cupy, a, a, out=a) is a
    np.testing.assert_allclose(cupy.asnumpy(a), want, rtol=1e-5, atol=1e-5)


def test_a_dropped_wrapper_takes_its_graphs_and_their_memory_with_it():
    import gc
    import weakref
    from minidiff.execution import graphs as graphs_gpu
    gc.collect()
    before = graphs_gpu.pool_bytes()
    gc.disable()   # no cycle may hold the model (and its graphs' pools) until a collection
    try:
        model, *_ = _train_steps(True, steps=3)
        assert graphs_gpu.pool_bytes() > before
        ref = weakref.ref(model)
        del model
        assert ref() is None and graphs_gpu.pool_bytes() == before
    finally:
        gc.enable()
