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
from minidiff.kernels.flat import FlatArrays, total_size
from minidiff.optim import build_optimizer
from minidiff.kernels import optim_cuda as fused
from minidiff.diffusion.samplers import ddim_sample
from minidiff.diffusion.schedules import make_schedule
from minidiff.models.unet import UNet

pytestmark = pytest.mark.gpu

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
    from minidiff.nn.norm import group_norm_nhwc_backward, group_norm_nhwc_forward
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
    """minidiff.kernels.conv_cuda writes the columns from the input directly; they must be the NumPy form's, bit for bit
    (the last geometry is the stride-1 backward's padding k - 1 - p, uneven here), also from a non-contiguous input."""
    from minidiff.nn.conv import im2col
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
    """flat: the parameters laid end to end, as a model's are (minidiff.kernels.flat): the generic step then goes by
    chunks; flat_grads: the gradients too, as a model's backward returns them (the fused step then launches once per
    chunk)."""
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
    assert bool(opt.chunks) == flat
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
            # 4 fused steps (2 ask for diagnostics): one launch each over the chunk, else one per array (3)
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
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import Trainer
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
