"""CuPy against NumPy on the same weights and inputs; these run only where CuPy finds a usable GPU.

Tolerances: in float64 both sides compute the same function to ~1e-15 relative, so 1e-10 leaves room only for
summation order. In float32 cuBLAS and OpenBLAS add the products of a convolution or matmul in different orders, and
nvcc fuses a * b + c into one rounding: each layer then differs by a few ulps (~1e-7 relative) of its largest terms,
and the UNet's ~40 layers (and a backward that differences nearly equal numbers in GroupNorm) grow that to ~1e-5 in
the norm of a gradient. 2e-4 is an order above what that predicts and three below what a wrong formula gives.
"""

import numpy as np
import pytest

from minidiff.backend import BackendError, get_backend, to_numpy
from minidiff.flat import FlatArrays, total_size
from minidiff.optim import build_optimizer, fused
from minidiff.samplers import ddim_sample
from minidiff.schedules import make_schedule
from minidiff.unet import UNet

try:
    GPU = get_backend("gpu")
except BackendError as exc:
    pytest.skip(f"no usable GPU for CuPy ({exc})", allow_module_level=True)

CPU = get_backend("cpu")
RTOL = {"float32": 2e-4, "float64": 1e-10}
SMALL_UNET = dict(base_channels=16, groups=4, channel_mults=(1, 2), attention_levels=(1,), num_heads=2)


def _rel(a, b) -> float:
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _forward_backward(backend, dtype, x, t, dout):
    model = UNet(**SMALL_UNET, dtype=dtype, seed=3, device=backend)
    out = model.forward(backend.asarray(x), t)
    grads = model.backward(backend.asarray(dout, dtype=dtype))
    assert model.params.same_layout(grads) and grads.flat.dtype == model.params.flat.dtype
    return to_numpy(out), {k: to_numpy(g) for k, g in grads.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unet_forward_and_gradients_on_the_gpu_match_numpy(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 16, 16)).astype(dtype)
    t = rng.integers(0, 1000, 8)
    dout = rng.standard_normal((8, 1, 16, 16))
    out_gpu, grads_gpu = _forward_backward(GPU, dtype, x, t, dout)
    out_cpu, grads_cpu = _forward_backward(CPU, dtype, x, t, dout)
    assert out_gpu.dtype == np.dtype(dtype)
    assert _rel(out_gpu, out_cpu) < RTOL[dtype]
    worst = max((_rel(grads_gpu[k], g), k) for k, g in grads_cpu.items())
    assert worst[0] < RTOL[dtype], worst


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_group_norm_on_the_gpu_matches_numpy(silu, dtype):
    from minidiff.norm import group_norm_nhwc_backward, group_norm_nhwc_forward
    rng = np.random.default_rng(7)
    x, dout = (rng.standard_normal((3, 5, 4, 12)) * 3 + 1 for _ in range(2))
    gamma, beta = rng.standard_normal(12), rng.standard_normal(12)
    results = {}
    for be in (GPU, CPU):
        args = [be.asarray(a, dtype=dtype) for a in (x, gamma, beta)]
        out, cache = group_norm_nhwc_forward(*args, groups=4, silu=silu)
        out_nocache, none = group_norm_nhwc_forward(*args, groups=4, silu=silu, cache=False)
        assert none is None and _rel(out_nocache, out) < RTOL[dtype] / 10
        dx, grads = group_norm_nhwc_backward(be.asarray(dout, dtype=dtype), cache)
        results[be.name] = [out, dx, grads["weight"], grads["bias"]]
    for got, want in zip(results["cupy"], results["numpy"]):
        assert to_numpy(got).shape == to_numpy(want).shape
        assert _rel(got, want) < RTOL[dtype] / 10


@pytest.mark.parametrize("kh,kw,stride,ph,pw", [(3, 3, 1, 1, 1), (3, 3, 2, 1, 1), (3, 3, 1, 2, 2), (3, 3, 1, 0, 0),
                                                (2, 3, 2, 0, 1), (3, 3, 1, 2, 1)])
def test_one_kernel_im2col_on_the_gpu_copies_what_numpy_copies(kh, kw, stride, ph, pw):
    """minidiff.conv_gpu writes the columns from the input directly; they must be the NumPy form's, bit for bit
    (the last geometry is the stride-1 backward's padding k - 1 - p, uneven here), also from a non-contiguous input."""
    from minidiff.conv import im2col
    x = np.random.default_rng(8).standard_normal((3, 7, 6, 5)).astype(np.float32)
    want = im2col(x, kh, kw, stride, ph, pw).copy()
    for gx in (GPU.asarray(x), GPU.asarray(x.transpose(0, 2, 1, 3).copy()).transpose(0, 2, 1, 3)):
        np.testing.assert_array_equal(to_numpy(im2col(gx, kh, kw, stride, ph, pw)), want)


OPTIMIZERS = [
    ("adam", {}), ("adam", dict(weight_decay=0.1, maximize=True)), ("adam", dict(bias_correction=False)),
    ("adamw", dict(weight_decay=0.1)), ("adamw", dict(weight_decay=0.1, maximize=True)),
    ("sgd", dict(lr=0.1)), ("sgd", dict(lr=0.1, weight_decay=0.01, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)), ("sgd", dict(lr=0.1, momentum=0.5,
                                                                                         maximize=True)),
    ("nesterov", dict(lr=0.1, momentum=0.9)), ("nesterov", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adam", dict(amsgrad=True)), ("nadam", {}),
]


def _run_optimizer(backend, name, hyper, dtype, steps=6, grad_dtype=None, flat=False, flat_grads=False):
    """flat: the parameters laid end to end, as a model's are (minidiff.flat): the generic step then goes by runs;
    flat_grads: the gradients too, as a model's backward returns them (the fused step then launches once per run)."""
    rng = np.random.default_rng(1)
    shapes = {"w": (16, 8, 3, 3), "b": (16,), "s": ()}
    host = {k: rng.standard_normal(s) for k, s in shapes.items()}
    if flat:
        params = FlatArrays(shapes, backend.xp.zeros(total_size(shapes), dtype=dtype))
        for k, v in host.items():
            params[k][...] = backend.asarray(v, dtype=dtype)
    else:
        params = {k: backend.asarray(v, dtype=dtype) for k, v in host.items()}
    opt = build_optimizer(name, params, **hyper)
    assert bool(opt._runs) == flat
    for step in range(steps):
        if step == 3:
            opt.lr = opt.lr * 0.7   # a schedule changes the rate mid-run
        grads = {k: backend.asarray(rng.standard_normal(s), dtype=grad_dtype or dtype) for k, s in shapes.items()}
        if flat_grads:   # in the gradients' own dtype (gather would cast them to the parameters')
            grads = FlatArrays(shapes, backend.xp.concatenate([g.reshape(-1) for g in grads.values()]))
        opt.step(grads, diagnostics=step % 3 == 2)   # training's log steps ask for diagnostics: the generic path
    return {k: to_numpy(p) for k, p in params.items()}, opt.state_dict()["buffers"]


@pytest.mark.parametrize("name,hyper", OPTIMIZERS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_optimizer_steps_on_the_gpu_match_numpy_fused_or_not(name, hyper, dtype, monkeypatch):
    calls, launches = [], []
    for fn in ("adam", "sgd"):
        real = getattr(fused, fn)
        monkeypatch.setattr(fused, fn, lambda *a, _real=real: calls.append(1) or _real(*a))
    kernel = fused._kernel
    monkeypatch.setattr(fused, "_kernel", lambda *a: lambda *args: launches.append(1) or kernel(*a)(*args))
    cpu_params, cpu_bufs = _run_optimizer(CPU, name, hyper, dtype)
    for enabled in (True, False):
        for flat, flat_grads in ((False, False), (True, False), (True, True)):
            monkeypatch.setattr(fused, "ENABLED", enabled)
            calls.clear()
            launches.clear()
            gpu_params, gpu_bufs = _run_optimizer(GPU, name, hyper, dtype, flat=flat, flat_grads=flat_grads)
            has_kernel = name in ("sgd", "nesterov", "adamw") or (name == "adam" and not hyper.get("amsgrad"))
            assert bool(calls) == (enabled and has_kernel)
            # 4 fused steps (2 ask for diagnostics): one launch each over the run, else one per array (3)
            assert len(launches) == (4 * (1 if flat_grads else 3) if calls else 0)
            case = (enabled, flat, flat_grads)
            for k, p in cpu_params.items():
                assert _rel(gpu_params[k], p) < RTOL[dtype] / 10, (case, k)  # six steps, no deep network
                for b, arr in cpu_bufs[k].items():
                    assert _rel(gpu_bufs[k][b], arr) < RTOL[dtype] / 10, (case, k, b)


@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "end-to-end"])
def test_fused_step_casts_gradients_of_another_dtype_like_the_generic_path(flat):
    want, _ = _run_optimizer(CPU, "adam", {}, "float32", grad_dtype="float64")
    got, _ = _run_optimizer(GPU, "adam", {}, "float32", grad_dtype="float64", flat=flat, flat_grads=flat)
    for k, p in want.items():
        assert got[k].dtype == np.float32 and _rel(got[k], p) < RTOL["float32"] / 10


def test_fused_step_with_diagnostics_falls_back_to_the_generic_path(monkeypatch):
    rng = np.random.default_rng(2)
    params = {"w": GPU.asarray(rng.standard_normal(50), dtype="float32")}
    opt = build_optimizer("adam", params)
    monkeypatch.setattr(fused, "adam", lambda *a: pytest.fail("diagnostics need u_t: no fused kernel"))
    diag = opt.step({"w": GPU.asarray(rng.standard_normal(50), dtype="float32")}, diagnostics=True)
    assert float(to_numpy(diag["update_norm"])) > 0


def test_ddim_sampling_on_the_gpu_matches_numpy():
    schedule, outs = make_schedule("linear", 1000), {}
    for backend in (GPU, CPU):
        model = UNet(**SMALL_UNET, dtype="float32", seed=4, device=backend)
        outs[backend.name] = to_numpy(ddim_sample(lambda x, t, m=model: m.forward(x, t, cache=False), schedule,
                                                  (4, 1, 16, 16), num_steps=10, seed=5, backend=backend))
    assert _rel(outs["cupy"], outs["numpy"]) < RTOL["float32"]


def test_training_steps_on_the_gpu_track_numpy():
    from minidiff.config import TrainConfig
    from minidiff.train import Trainer
    losses = {}
    for device in ("gpu", "cpu"):
        trainer = Trainer(TrainConfig(dataset="digits", batch_size=32, steps=5, eval_every=0, log_every=5,
                                      sample_every=100, device=device))
        sums = []
        for _ in range(5):
            trainer.train_step()
            sums.append(float(to_numpy(trainer._acc["loss"])))   # the running sum of the step losses
        losses[device] = np.diff([0.0] + sums)
        assert type(trainer.model.params["time_embed.0.weight"]).__module__.split(".")[0] == (
            "cupy" if device == "gpu" else "numpy")
    np.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=RTOL["float32"])   # each step's own loss


# --- cuBLAS called directly (minidiff.cublas_gpu) and CUDA graphs (minidiff.graphs_gpu) -----------------------------

def test_direct_cublas_products_match_cupy_matmul_for_every_layout():
    import cupy
    from minidiff.cublas_gpu import matmul
    from test_cublas_plan import layout_cases
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
    from minidiff.cublas_gpu import matmul
    rng = np.random.default_rng(1)
    a, b = (cupy.asarray(rng.standard_normal(s), dtype=np.float32) for s in ((64, 32), (48, 32)))
    c = cupy.empty((64, 48), dtype=np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(NotImplementedError):   # why cublas_gpu exists (cupy/cupy#6290)
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
    model = UNet(**SMALL_UNET, dtype=dtype, seed=3, device=GPU)
    model.set_cuda_graphs(graphs)
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


def _graphed(model):
    return [key for key, e in model._graphs.entries.items() if e.forward_graph is not None]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_graph_training_steps_give_the_eager_steps_bits(dtype):
    from minidiff import graphs_gpu
    model, outs, grads, params = _train_steps(True, dtype)
    assert _graphed(model) and all(e.backward_graph is not None for e in model._graphs.entries.values())
    assert graphs_gpu.pool_bytes() > 0
    _, outs0, grads0, params0 = _train_steps(False, dtype)
    for step, (a, b, ga, gb) in enumerate(zip(outs, outs0, grads, grads0)):
        np.testing.assert_array_equal(a, b, err_msg=f"output, step {step}")
        np.testing.assert_array_equal(ga, gb, err_msg=f"gradients, step {step}")
    np.testing.assert_array_equal(params, params0)


def test_cuda_graphs_survive_the_scratch_buffers_being_dropped_and_reused():
    import cupy
    from minidiff import workspace
    junk = []

    def churn(step):   # once captured (step 1), drop every scratch buffer and take its memory for other arrays
        if step >= 1:
            sizes = [buf.size for buf in workspace._BUFFERS.values() if isinstance(buf, cupy.ndarray)]
            workspace.clear()
            junk.extend(cupy.full(n, 7.0, dtype=np.float32) for n in sizes)   # the sizes the pool just got back

    model, outs, grads, params = _train_steps(True, steps=5, between=churn)
    assert model._graphs is not None and all(e.backward_graph is not None for e in model._graphs.entries.values())
    _, outs0, grads0, params0 = _train_steps(False, steps=5)
    assert junk and all(bool((j == 7.0).all()) for j in junk)   # no replay wrote into memory handed on
    np.testing.assert_array_equal(params, params0)
    for a, b, ga, gb in zip(outs, outs0, grads, grads0):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ga, gb)


def test_cuda_graph_sampling_gives_the_eager_samples_bits():
    schedule = make_schedule("linear", 1000)
    samples = []
    for graphs in (True, False):
        model = UNet(**SMALL_UNET, seed=3, device=GPU)
        model.set_cuda_graphs(graphs)
        fn = lambda x, t: model.forward(x, t, cache=False)  # noqa: E731
        samples.append(to_numpy(ddim_sample(fn, schedule, (4, 1, 16, 16), num_steps=6, backend=GPU, seed=2)))
        assert bool(_graphed(model)) == graphs if graphs else model._graphs is None
    np.testing.assert_array_equal(*samples)


def test_a_graphed_backward_runs_once_per_forward():
    model, *_ = _train_steps(True, steps=3)
    assert _graphed(model)
    with pytest.raises(RuntimeError, match="backward needs a forward"):
        model.backward(GPU.xp.zeros((8, 1, 16, 16), dtype=np.float32))


def test_a_failed_capture_turns_graphs_off_and_the_step_runs_eagerly(monkeypatch):
    import cupy
    from minidiff import backend
    monkeypatch.setattr(backend.cublas_gpu, "matmul", lambda xp, a, b, out=None: cupy.matmul(a, b, out=out))
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off"):
        model, outs, grads, params = _train_steps(True)
    assert model._graphs is None
    _, outs0, grads0, params0 = _train_steps(False)
    np.testing.assert_allclose(params, params0, rtol=1e-5, atol=1e-6)   # cupy.matmul's products, not ours


def test_training_with_cuda_graphs_gives_the_eager_runs_bits(monkeypatch, tmp_path):
    from minidiff import graphs_gpu
    from minidiff.config import TrainConfig
    from minidiff.train import Trainer
    config = TrainConfig(dataset="digits", model="unet", batch_size=16, steps=5, timesteps=100, device="gpu",
                         model_options=dict(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4))
    params = []
    for enabled in (True, False):
        monkeypatch.setattr(graphs_gpu, "ENABLED", enabled)
        trainer = Trainer(config)
        for _ in range(5):
            trainer.train_step()
        assert (trainer.model._graphs is not None and bool(_graphed(trainer.model))) == enabled
        params.append(to_numpy(trainer.model.params.flat))
    np.testing.assert_array_equal(*params)


def test_the_memory_peak_counts_what_the_eager_warm_up_held_before_a_capture_freed_it():
    from minidiff import graphs_gpu
    GPU.xp.get_default_memory_pool().free_all_blocks()
    graphs_gpu.reset_peak()
    model = UNet(**SMALL_UNET, seed=3, device=GPU)
    x = GPU.asarray(np.ones((8, 1, 16, 16)), dtype=np.float32)
    model.forward(x, np.arange(8), cache=False)        # eager: its activations stay cached in the default pool
    eager = GPU.xp.get_default_memory_pool().total_bytes()
    model.forward(x, np.arange(8), cache=False)        # the capture hands them back first
    assert _graphed(model)
    assert GPU.xp.get_default_memory_pool().total_bytes() < eager   # so the reading now no longer sees them
    assert graphs_gpu._HIGH_WATER[0] >= eager   # ... but the peak does: the total just before the release
    assert graphs_gpu.peak_reserved_bytes(GPU.xp) >= graphs_gpu._HIGH_WATER[0]


def test_a_failed_backward_capture_reruns_the_forward_eagerly_and_turns_graphs_off(monkeypatch):
    from minidiff import flat
    monkeypatch.setattr(flat, "is_capturing", lambda xp: False)   # the backward's gather then needs the host
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off"):
        model, outs, grads, params = _train_steps(True)
    assert model._graphs is None
    _, outs0, grads0, params0 = _train_steps(False)
    np.testing.assert_array_equal(params, params0)
    np.testing.assert_array_equal(grads[1], grads0[1])   # the step whose backward capture failed


def test_a_scratch_buffer_missing_at_capture_time_defers_the_capture_to_the_next_call():
    import warnings
    from minidiff import workspace

    def clear(step):   # before the forward's capture (step 1) and, below, between a forward and its backward
        if step == 0:
            workspace.clear()

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # graphs must stay on
        model, outs, grads, params = _train_steps(True, steps=5, between=clear)
        assert _graphed(model)
        model2 = UNet(**SMALL_UNET, seed=3, device=GPU)
        x = GPU.asarray(np.ones((8, 1, 16, 16)), dtype=np.float32)
        results = []
        for step in range(4):
            out = model2.forward(x, np.arange(8))
            if step == 1:
                workspace.clear()   # the backward's capture finds no scratch: it runs eagerly, the forward again
            results.append(to_numpy(model2.backward(out).flat))
        assert _graphed(model2) and all(e.backward_graph is not None for e in model2._graphs.entries.values())
    _, outs0, grads0, params0 = _train_steps(False, steps=5)
    np.testing.assert_array_equal(params, params0)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_forwards_of_other_shapes_between_a_forward_and_its_backward_leave_its_graph_intact():
    models = [UNet(**SMALL_UNET, seed=3, device=GPU) for _ in range(2)]
    models[1].set_cuda_graphs(False)
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
        np.testing.assert_array_equal(a, b)


def test_more_input_shapes_than_entries_run_eagerly_with_the_same_results():
    from minidiff import graphs_gpu
    models = [UNet(**SMALL_UNET, seed=3, device=GPU) for _ in range(2)]
    models[1].set_cuda_graphs(False)
    outs = [[], []]
    for n in (1, 2, 3, 4, 5, 6) * 2:
        x = GPU.asarray(np.full((n, 1, 16, 16), 0.1 * n), dtype=np.float32)
        for model, o in zip(models, outs):
            o.append(to_numpy(model.forward(x, np.arange(n), cache=False)))
    assert len(models[0]._graphs.entries) == graphs_gpu.MAX_ENTRIES == len(_graphed(models[0]))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_turning_graphs_off_between_a_replayed_forward_and_its_backward_keeps_the_backward():
    model, *_ = _train_steps(True, steps=3)
    x = GPU.asarray(np.ones((8, 1, 16, 16)), dtype=np.float32)
    out = model.forward(x, np.arange(8))               # replayed from its graph
    model.set_cuda_graphs(False)
    got = to_numpy(model.backward(out).flat)
    out_eager = model.forward(x, np.arange(8))
    np.testing.assert_array_equal(got, to_numpy(model.backward(out_eager).flat))


def test_a_full_training_run_with_probes_samples_and_evaluation_gives_the_eager_runs_bits(monkeypatch, tmp_path):
    from minidiff import graphs_gpu
    from minidiff.config import TrainConfig
    from minidiff.train import start_run
    config = TrainConfig(dataset="digits", model="unet", batch_size=16, steps=6, timesteps=100, device="gpu",
                         log_every=2, ckpt_every=3, sample_every=3, sample_count=4, sample_steps=3, probe_every=2,
                         probe_batch=8, eval_every=3, eval_samples=16, eval_steps=3,
                         model_options=dict(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4))
    states = []
    for enabled in (True, False):
        monkeypatch.setattr(graphs_gpu, "ENABLED", enabled)
        trainer, run = start_run(config, tmp_path / f"run{enabled}.h5")
        trainer.train(run, config.steps)
        assert (trainer.model._graphs is not None and bool(_graphed(trainer.model))) == enabled
        states.append(to_numpy(trainer.model.params.flat))
    np.testing.assert_array_equal(*states)


def test_a_product_into_an_out_that_overlaps_an_operand_is_computed_from_the_operands_before():
    import cupy
    from minidiff.cublas_gpu import matmul
    a = cupy.asarray(np.random.default_rng(5).standard_normal((6, 6)), dtype=np.float32)
    want = cupy.asnumpy(a @ a)
    assert matmul(cupy, a, a, out=a) is a
    np.testing.assert_allclose(cupy.asnumpy(a), want, rtol=1e-5, atol=1e-5)


def test_a_dropped_model_takes_its_graphs_and_their_memory_with_it():
    import gc
    import weakref
    from minidiff import graphs_gpu
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
