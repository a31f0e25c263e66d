"""The optimizers without a reference: closed-form behaviour, checkpoints, validation, allocation, strict backend."""

import tracemalloc

import h5py
import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from helpers.optim_cases import CONFIGS, on_backend
from minidiff.backend import get_backend, to_numpy
from minidiff.optim import OPTIMIZERS, SGD, Adam, AdamW, NAdam, build_optimizer

SHAPES = {"w": (6, 5), "b": (5,), "k": (2, 3, 3)}


def _params(backend, rng, dtype=np.float64):
    return {k: backend.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}


def _grad_sequence(n, seed=3):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(n)]


# --- closed-form behaviour -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum_step_tends_to_lr_g_over_one_minus_mu(dampening):
    g = np.random.default_rng(0).standard_normal(7)
    theta = np.zeros(7)
    opt = SGD({"x": theta}, lr=0.1, momentum=0.9, dampening=dampening)
    for _ in range(400):
        before = theta.copy()
        opt.step({"x": g})
    expected = -0.1 * (1 - dampening) * g / (1 - 0.9)
    np.testing.assert_allclose(theta - before, expected, rtol=1e-10)


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_adam_first_step_is_minus_lr_sign_g_whatever_the_gradient_scale(cls):
    rng = np.random.default_rng(0)
    g = rng.choice([-1.0, 1.0], 50) * 10.0 ** rng.uniform(-4, 4, 50)
    theta = np.zeros(50)
    cls({"x": theta}, lr=1e-3, weight_decay=0.0).step({"x": g})
    np.testing.assert_allclose(theta, -1e-3 * np.sign(g), rtol=1.01e-4)  # exactly −lr g / (|g| + eps)


def test_adam_without_bias_correction_first_step_is_larger_by_one_minus_beta1_over_sqrt_one_minus_beta2():
    rng = np.random.default_rng(1)
    g = rng.choice([-1.0, 1.0], 20) * 10.0 ** rng.uniform(-2, 2, 20)
    theta = np.zeros(20)
    Adam({"x": theta}, lr=1e-3, bias_correction=False).step({"x": g})
    np.testing.assert_allclose(theta, -1e-3 * 0.1 / np.sqrt(0.001) * np.sign(g), rtol=1e-5)


def _quadratic_grad(theta):
    return np.array([1.0, 30.0]) * theta  # f = (θ0² + 30 θ1²) / 2


def test_velocity_momentum_form_agrees_at_constant_lr_and_parts_when_lr_changes():
    """v = μv − γg, θ += v equals PyTorch's b = μb + g, θ −= γb only while γ is constant (SGD docstring, form 1)."""
    for change in (False, True):
        theta, theta_v, v = np.array([1.0, 1.0]), np.array([1.0, 1.0]), np.zeros(2)
        opt = SGD({"x": theta}, lr=0.02, momentum=0.9)
        gap = []
        for step in range(60):
            lr = 0.002 if change and step >= 30 else 0.02
            opt.lr = lr
            opt.step({"x": _quadratic_grad(theta)})
            v = 0.9 * v - lr * _quadratic_grad(theta_v)
            theta_v = theta_v + v
            gap.append(np.max(np.abs(theta - theta_v)))
        if change:
            assert max(gap[:30]) < 1e-14 and gap[30] > 1e-3, "the forms must part at the first step after the change"
        else:
            assert max(gap) < 1e-13


def test_ema_momentum_form_is_undampened_sgd_with_lr_times_one_minus_beta_even_under_a_schedule():
    """v = βv + (1 − β)g, θ −= γv equals b = βb + g, θ −= γ(1 − β)b exactly (SGD docstring, form 3)."""
    beta, theta, theta_v, v = 0.9, np.array([1.0, 1.0]), np.array([1.0, 1.0]), np.zeros(2)
    opt = SGD({"x": theta}, lr=1.0, momentum=beta)
    for step in range(60):
        lr = 0.05 if step < 30 else 0.01
        opt.lr = lr * (1 - beta)
        opt.step({"x": _quadratic_grad(theta)})
        v = beta * v + (1 - beta) * _quadratic_grad(theta_v)
        theta_v = theta_v - lr * v
    np.testing.assert_allclose(theta, theta_v, rtol=1e-12, atol=1e-15)


def test_nesterov_matches_sutskever_form_at_the_look_ahead_point():
    """PyTorch's Nesterov parameters are Sutskever's θ + μv (SGD docstring, form 4)."""
    mu, lr = 0.9, 0.02
    phi, theta, v = np.array([1.0, -2.0]), np.array([1.0, -2.0]), np.zeros(2)
    opt = SGD({"x": phi}, lr=lr, momentum=mu, nesterov=True)
    for _ in range(80):
        opt.step({"x": _quadratic_grad(phi)})
        v = mu * v - lr * _quadratic_grad(theta + mu * v)
        theta = theta + v
        np.testing.assert_allclose(phi, theta + mu * v, rtol=1e-12, atol=1e-15)


# --- checkpoints ---------------------------------------------------------------------------------------------------
def _write_h5(group, d):
    for k, v in d.items():
        if isinstance(v, dict):
            _write_h5(group.create_group(k), v)
        elif isinstance(v, np.ndarray):
            group.create_dataset(k, data=v)
        else:
            group.attrs[k] = v


def _read_h5(group):
    out = dict(group.attrs)
    for k, v in group.items():
        out[k] = _read_h5(v) if isinstance(v, h5py.Group) else v[()]
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("via_hdf5", [False, True], ids=["in-memory", "hdf5"])
def test_state_dict_round_trip_mid_run_continues_bit_identically(cpu_backend, config, via_hdf5, tmp_path):
    name, hyper = CONFIGS[config]
    grads = _grad_sequence(30)
    params = _params(cpu_backend, np.random.default_rng(0))
    opt = build_optimizer(name, params, **hyper)
    for g in grads[:15]:
        opt.step(on_backend(cpu_backend, g))
    saved_params = {k: to_numpy(v).copy() for k, v in params.items()}
    sd = opt.state_dict()
    if via_hdf5:
        with h5py.File(tmp_path / "opt.h5", "w") as f:
            _write_h5(f, sd)
        with h5py.File(tmp_path / "opt.h5", "r") as f:
            sd = _read_h5(f)
    for g in grads[15:]:
        opt.step(on_backend(cpu_backend, g))

    resumed = {k: cpu_backend.asarray(v) for k, v in saved_params.items()}
    opt2 = build_optimizer(name, resumed, **{**hyper, "lr": 123.0})  # lr comes back from the state_dict
    opt2.load_state_dict(sd)
    for g in grads[15:]:
        opt2.step(on_backend(cpu_backend, g))
    assert opt2.lr == opt.lr and opt2.step_count == opt.step_count == 30
    assert_bitwise_equal({k: to_numpy(v) for k, v in resumed.items()}, {k: to_numpy(v) for k, v in params.items()})
    assert_bitwise_equal(opt2.state_dict()["buffers"], opt.state_dict()["buffers"])


def test_load_state_dict_refuses_another_optimizers_state():
    p = {"x": np.zeros(3)}
    with pytest.raises(ValueError, match="adam"):
        SGD(p, lr=0.1).load_state_dict(Adam({"x": np.zeros(3)}).state_dict())


# --- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs, param", [
    (SGD, {"lr": -0.1}, "lr"),
    (SGD, {"lr": 0.1, "momentum": -0.5}, "momentum"),
    (SGD, {"lr": 0.1, "weight_decay": -1e-4}, "weight_decay"),
    (SGD, {"lr": 0.1, "nesterov": True}, "nesterov"),
    (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov"),
    (Adam, {"lr": -1e-3}, "lr"),
    (Adam, {"betas": (1.0, 0.999)}, r"betas\[0\]"),
    (Adam, {"betas": (0.9, -0.1)}, r"betas\[1\]"),
    (Adam, {"eps": 0.0}, "eps"),
    (Adam, {"weight_decay": -0.1}, "weight_decay"),
    (AdamW, {"betas": (0.9, 1.5)}, r"betas\[1\]"),
    (NAdam, {"eps": -1e-8}, "eps"),
    (NAdam, {"momentum_decay": -1.0}, "momentum_decay"),
    (NAdam, {"lr": float("nan")}, "lr"),
])
def test_invalid_hyperparameter_raises_value_error_naming_it(cls, kwargs, param):
    with pytest.raises(ValueError, match=param):
        cls({"x": np.zeros(3)}, **kwargs)


def test_negative_lr_set_between_steps_is_refused():
    opt = Adam({"x": np.zeros(3)})
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0


def test_missing_gradient_is_a_key_error_naming_the_parameter():
    with pytest.raises(KeyError, match="b"):
        SGD({"a": np.zeros(2), "b": np.zeros(2)}, lr=0.1).step({"a": np.ones(2)})


def test_gradient_of_the_wrong_shape_is_refused_not_broadcast():
    with pytest.raises(ValueError, match="shape"):
        SGD({"w": np.zeros((4, 5))}, lr=0.1).step({"w": np.ones(5)})


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("bad, error", [("shape", ValueError), ("missing", KeyError), ("host", TypeError)])
def test_bad_last_gradient_leaves_every_parameter_and_all_state_untouched(config, bad, error):
    name, hyper = CONFIGS[config]
    be = get_backend("strict")  # its arrays refuse a host gradient, as CuPy's do
    params = _params(be, np.random.default_rng(0))
    opt = build_optimizer(name, params, **hyper)
    good, bad_step = _grad_sequence(2)
    opt.step(on_backend(be, good))  # non-zero buffers, step_count 1
    before = (opt.state_dict(), {k: to_numpy(v).copy() for k, v in params.items()})
    grads = on_backend(be, bad_step)
    # "k" is the last parameter: the earlier ones were already updated when the step found it
    grads["k"] = {"shape": be.asarray(np.ones(3)), "host": bad_step["k"]}.get(bad)
    if bad == "missing":
        del grads["k"]
    with pytest.raises(error, match="k"):
        opt.step(grads, diagnostics=True)
    after = opt.state_dict()
    assert opt.step_count == before[0]["step"] == 1
    assert_bitwise_equal({k: to_numpy(v) for k, v in params.items()}, before[1])
    assert_bitwise_equal(after["buffers"], before[0]["buffers"])


def test_build_optimizer_maps_names_and_refuses_unknown_ones():
    p = {"x": np.zeros(3)}
    assert set(OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adam", "adamw", "nadam"}
    mom = build_optimizer("momentum", p, lr=0.1)
    assert isinstance(mom, SGD) and mom.momentum == 0.9 and not mom.nesterov
    nes = build_optimizer("nesterov", p, lr=0.1, momentum=0.5)
    assert nes.nesterov and nes.momentum == 0.5
    assert type(build_optimizer("adamw", p)) is AdamW and build_optimizer("adamw", p).weight_decay == 1e-2
    with pytest.raises(ValueError, match="lion"):
        build_optimizer("lion", p)
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer("adam", p, momentum=0.9)


# --- no allocation, strict backend, diagnostics --------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_step_keeps_its_buffers_and_makes_no_parameter_sized_temporaries(config):
    name, hyper = CONFIGS[config]
    rng = np.random.default_rng(0)
    params = {"big": rng.standard_normal(100_000), "small": rng.standard_normal(10)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    opt = build_optimizer(name, params, **hyper)
    ids = {k: id(v) for k, v in params.items()} | {(k, b): id(a) for k, s in opt.state.items() for b, a in s.items()}
    opt.step(grads)
    tracemalloc.start()
    try:
        opt.step(grads)
        opt.step(grads, diagnostics=True, per_param=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.05 * params["big"].nbytes, f"step allocated {peak} bytes"
    assert ids == {k: id(v) for k, v in params.items()} | {(k, b): id(a) for k, s in opt.state.items()
                                                          for b, a in s.items()}


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_strict_backend_runs_without_host_conversion_and_matches_numpy(config):
    name, hyper = CONFIGS[config]
    results = {}
    for device in ("cpu", "strict"):
        be = get_backend(device)
        params = _params(be, np.random.default_rng(0), dtype=np.float32)
        opt = build_optimizer(name, params, **hyper)
        for g in _grad_sequence(5):
            diag = opt.step(on_backend(be, g, np.float32), diagnostics=True, per_param=True)
        assert all(params[k].dtype == np.float32 for k in params)
        results[device] = ({k: to_numpy(v) for k, v in params.items()},
                           {k: float(to_numpy(v)) for k, v in diag.items() if not isinstance(v, dict)})
    assert_bitwise_equal(results["strict"], results["cpu"])


def test_diagnostics_equal_their_definitions():
    rng = np.random.default_rng(5)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    opt = Adam(params, lr=0.01)
    grads = _grad_sequence(4)
    for g in grads[:3]:
        opt.step(g)
    before = {k: v.copy() for k, v in params.items()}
    m_before = {k: opt.state[k]["exp_avg"].copy() for k in params}
    d = opt.step(grads[3], diagnostics=True, per_param=True)
    flat = lambda dct: np.concatenate([np.ravel(v) for v in dct.values()])  # noqa: E731
    u = flat(params) - flat(before)
    g, m0 = flat(grads[3]), flat(m_before)
    np.testing.assert_allclose(d["update_norm"], np.linalg.norm(u), rtol=1e-10)
    np.testing.assert_allclose(d["update_to_weight"], np.linalg.norm(u) / np.linalg.norm(flat(before)), rtol=1e-10)
    np.testing.assert_allclose(d["cos_grad_momentum"], g @ m0 / np.linalg.norm(g) / np.linalg.norm(m0), rtol=1e-10)
    assert d["bias_correction1"] == pytest.approx(1 - 0.9 ** 4)
    assert d["bias_correction2"] == pytest.approx(1 - 0.999 ** 4)
    m_hat = flat({k: opt.state[k]["exp_avg"] for k in params}) / (1 - 0.9 ** 4)
    v_hat = flat({k: opt.state[k]["exp_avg_sq"] for k in params}) / (1 - 0.999 ** 4)
    ratio = m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(d["adam_ratio_rms"], np.sqrt(np.mean(ratio ** 2)), rtol=1e-10)
    w = "w"
    np.testing.assert_allclose(d["update_to_weight_per_param"][w],
                               np.linalg.norm(params[w] - before[w]) / np.linalg.norm(before[w]), rtol=1e-10)


def test_mixed_dtype_parameters_share_scratch_per_dtype():
    params = {"a": np.ones(4, np.float32), "b": np.ones(9, np.float64)}
    opt = Adam(params, lr=0.1)
    opt.step({"a": np.ones(4, np.float32), "b": -np.ones(9)})
    assert params["a"].dtype == np.float32 and params["b"].dtype == np.float64
    np.testing.assert_allclose(params["a"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(params["b"], 1.1, rtol=1e-8)


def test_the_fused_gpu_kernels_are_chosen_only_where_they_compute_the_same_rule():
    from minidiff.kernels import optim_cuda as fused
    params = {"w": np.zeros(3, dtype=np.float32)}

    class Clipped(Adam):   # a subclass with its own rule must not inherit Adam's kernel
        def _update(self, *args):
            super()._update(*args)

    assert build_optimizer("adam", params)._fused_update is fused.adam
    assert build_optimizer("adamw", params)._fused_update is fused.adam
    assert build_optimizer("adam", params, amsgrad=True)._fused_update is None
    assert build_optimizer("nadam", params)._fused_update is None
    assert Clipped(params)._fused_update is None
    for name in ("sgd", "momentum", "nesterov"):
        assert build_optimizer(name, params, lr=0.1)._fused_update is fused.sgd
    assert not fused.available(np)   # NumPy (and the strict backend) always take the generic path


def _emulated_kernels(xp, name):
    """NumPy stand-ins for minidiff.kernels.optim_cuda's CUDA kernels, term for term (each line is the kernel's line),
    so the CPU can check what the GPU path hands them: the argument order and every per-step scalar."""
    def grad_of(grad, sign, wd, theta):
        return wd * theta + sign * grad if wd != 0 else sign * grad

    def adam(grad, sign, wd, omb1, beta2, omb2, sqrt_c2, eps, neg_step, neg_lr_wd, theta, m, v):
        g = grad_of(grad, sign, wd, theta)
        m[...] = m + (g - m) * omb1
        v[...] = v * beta2 + (g * omb2) * g
        u = m / (np.sqrt(v) / sqrt_c2 + eps) * neg_step
        if neg_lr_wd != 0:
            u = u + theta * neg_lr_wd
        theta[...] = theta + u

    def sgd_momentum(grad, sign, wd, mu, omd, neg_lr, first, nesterov, theta, b):
        g = grad_of(grad, sign, wd, theta)
        b[...] = g if first else b * mu + g * omd
        theta[...] = theta + (b * mu + g if nesterov else b) * neg_lr

    def sgd(grad, sign, wd, neg_lr, theta):
        theta[...] = theta + grad_of(grad, sign, wd, theta) * neg_lr

    return {"adam": adam, "sgd_momentum": sgd_momentum, "sgd": sgd}[name]


@pytest.mark.parametrize("name,hyper", [
    ("adam", {}), ("adam", dict(weight_decay=0.1, maximize=True)), ("adam", dict(bias_correction=False)),
    ("adamw", dict(weight_decay=0.1)), ("sgd", dict(lr=0.1, weight_decay=0.01, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)), ("nesterov", dict(lr=0.1))])
@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "end-to-end"])
def test_the_fused_step_hands_its_kernels_the_generic_steps_numbers(name, hyper, flat, monkeypatch):
    """With NumPy stand-ins for the kernels, the fused path must give the generic path's parameters and state bit
    for bit: the kernels do the same float32 operations in the same order, so any difference is in the plumbing.
    end-to-end: parameters and gradients laid out alike (a model's), one launch per chunk instead of per array, against
    the generic step on separate arrays."""
    from minidiff.kernels.flat import FlatArrays, gather, total_size
    from minidiff.kernels import optim_cuda as fused
    rng = np.random.default_rng(4)
    shapes = {"w": (6, 3, 3, 3), "b": (6,)}
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(5)]
    results, launches = [], []
    for emulate in (False, True):
        if emulate:
            monkeypatch.setattr(fused, "available", lambda xp: True)
            monkeypatch.setattr(fused, "_kernel", lambda xp, kname: lambda *a: (launches.append(1),
                                                                               _emulated_kernels(xp, kname)(*a)))
        if flat and emulate:
            params = FlatArrays(shapes, np.zeros(total_size(shapes), dtype=np.float32))
            for k, v in start.items():
                params[k][...] = v
        else:
            params = {k: v.copy() for k, v in start.items()}
        opt = build_optimizer(name, params, **hyper)
        for step, g in enumerate(grads):
            if step == 2:
                opt.lr = opt.lr * 0.5
            opt.step(gather(params, g, np) if flat and emulate else g)
        results.append((params, opt.state_dict()["buffers"]))
    assert len(launches) == len(grads) * (1 if flat else len(shapes))
    (want, want_bufs), (got, got_bufs) = results
    assert_bitwise_equal(dict(got), dict(want))
    assert_bitwise_equal(got_bufs, want_bufs)
