"""Momentum schedules: the coefficients, PyTorch's semantics when β1 / μ change between steps (against torch.optim),
the learning-rate compensation, and how a run applies, logs, refuses and resumes them."""

import math

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal, untimed
from helpers.optim_cases import torch_twins
from minidiff.optim import SGD, Adam, AdamW, NAdam
from minidiff.optim.momentum_schedules import make_momentum_schedule, momentum_attribute, set_momentum
from minidiff.runs.file import RunFile
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import Trainer
from minidiff.training.session import resume_run, start_run

SHAPES = {"w": (4, 3, 3), "b": (4,), "gain": ()}
STEPS = 60
RTOL = 1e-10


def test_schedules_start_at_the_value_and_end_at_the_final_one_on_the_last_step():
    lin = make_momentum_schedule("linear", 0.9, 0.5, 11)
    cos = make_momentum_schedule("cosine", 0.9, 0.5, 11)
    assert lin(0) == 0.9 and cos(0) == 0.9   # exactly: a run's first step is the configured optimizer
    assert lin(10) == pytest.approx(0.5) and cos(10) == pytest.approx(0.5) and lin(50) == pytest.approx(0.5)
    assert lin(5) == pytest.approx(0.7) and cos(5) == pytest.approx(0.7)
    assert cos(2) == pytest.approx(0.9 - 0.4 * 0.5 * (1 - math.cos(math.pi * 0.2)))
    assert make_momentum_schedule("constant", 0.9, None, 11)(7) == 0.9
    assert lin.lr_factor(0) == 1.0 and lin.lr_factor(10) == pytest.approx(0.5 / 0.1)


@pytest.mark.parametrize("args, match", [(("step", 0.9, 0.5, 10), "unknown momentum schedule"),
                                         (("linear", 0.9, None, 10), "momentum_final"),
                                         (("linear", 0.9, 1.0, 10), "momentum_final"),
                                         (("linear", 0.9, 0.5, 0), "total_steps")])
def test_bad_schedules_name_what_is_wrong(args, match):
    with pytest.raises(ValueError, match=match):
        make_momentum_schedule(*args)


CASES = [("adam", Adam, "Adam", {"lr": 0.01, "betas": (0.95, 0.99)}),
         ("adamw", AdamW, "AdamW", {"lr": 0.01, "betas": (0.95, 0.999), "weight_decay": 0.1}),
         ("nadam", NAdam, "NAdam", {"lr": 0.01, "betas": (0.95, 0.999)}),
         ("momentum", SGD, "SGD", {"lr": 0.01, "momentum": 0.95}),
         ("momentum-damp-wd", SGD, "SGD", {"lr": 0.01, "momentum": 0.95, "dampening": 0.3, "weight_decay": 0.05}),
         ("nesterov", SGD, "SGD", {"lr": 0.01, "momentum": 0.95, "nesterov": True})]


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_changing_the_momentum_every_step_matches_torch_optim(torch64, case, shape):
    """torch.optim reads betas / momentum from the param group at every step (Adam's bias correction 1 - beta1^t with
    the CURRENT beta1, the buffers keeping what they hold); ours reads beta1 / momentum the same way."""
    torch = torch64
    _, ours_cls, torch_name, hyper = case
    rng = np.random.default_rng(2)
    opt, params, topt, tparams = torch_twins(torch, ours_cls, torch_name, hyper, SHAPES, rng)
    attr = momentum_attribute(opt)
    start = opt.beta1 if attr == "beta1" else opt.momentum
    schedule = make_momentum_schedule(shape, start, 0.3, STEPS)
    compensate = ours_cls is SGD
    for step in range(STEPS):
        mu = schedule(step)
        set_momentum(opt, mu)
        group = topt.param_groups[0]
        if attr == "beta1":
            group["betas"] = (mu, group["betas"][1])
        else:
            group["momentum"] = mu
        if compensate:   # lr_t = lr (1 - mu_t) / (1 - mu_0), set on both
            opt.lr = group["lr"] = hyper["lr"] * schedule.lr_factor(step)
        grads = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])
        opt.step(grads)
        topt.step()
        for k, p in tparams.items():
            ref = p.detach().numpy()
            err = np.max(np.abs(params[k] - ref) / np.maximum(np.abs(ref), 1e-300), initial=0.0)
            assert err <= RTOL, f"step {step} ({attr} {mu:.4f}) param {k}: relative error {err:.3g}"
            for name, arr in opt.state[k].items():
                tref = topt.state[p][name].numpy()
                np.testing.assert_allclose(arr, tref, rtol=1e-9, atol=1e-300, err_msg=f"step {step} {k} {name}")
    assert schedule(STEPS - 1) == pytest.approx(0.3)


def test_compensation_keeps_the_steady_heavy_ball_step_at_lr_over_one_minus_mu():
    """A constant gradient g: after the buffer settles the step is lr_t g / (1 - mu_t) = lr g / (1 - mu_0)."""
    g = np.ones(3)
    for mu_t in (0.9, 0.6, 0.0):
        schedule = make_momentum_schedule("linear", 0.9, mu_t, 2)
        params = {"x": np.zeros(3)}
        opt = SGD(params, lr=0.01 * schedule.lr_factor(1), momentum=mu_t)
        for _ in range(400):
            before = params["x"].copy()
            opt.step({"x": g})
        np.testing.assert_allclose(before - params["x"], 0.01 / (1 - 0.9), rtol=1e-12)


def test_plain_sgd_has_no_momentum_to_set():
    with pytest.raises(ValueError, match="no momentum"):
        set_momentum(SGD({"x": np.zeros(2)}, lr=0.1), 0.5)


# --- in a run ------------------------------------------------------------------------------------------------------

def _moons(**changes):
    base = dict(dataset="moons", steps=12, timesteps=40, batch_size=32, log_every=3, ckpt_every=4, sample_every=100,
                probe_every=0, eval_every=0)
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("changes, match", [
    (dict(optimizer="sgd", momentum_schedule="linear", momentum_final=0.5), "plain sgd"),
    (dict(momentum_schedule="cosine"), "momentum_final"),
    (dict(momentum_final=1.5, momentum_schedule="linear"), "momentum_final"),
    (dict(momentum_schedule="exp", momentum_final=0.5), "momentum_schedule"),
    (dict(optimizer="momentum", momentum=0.0, momentum_schedule="linear", momentum_final=0.5), "momentum > 0"),
    (dict(optimizer="adam", momentum_lr_compensation=True), "normalised average"),
    (dict(optimizer="momentum", momentum_lr_compensation=1), "true or false"),
])
def test_meaningless_momentum_settings_are_refused_in_one_line(changes, match):
    with pytest.raises(ValueError, match=match) as info:
        _moons(**changes).validated()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("optimizer, attr", [("adam", "beta1"), ("nesterov", "momentum")])
def test_a_run_follows_the_schedule_and_logs_the_momentum(tmp_path, optimizer, attr):
    config = _moons(optimizer=optimizer, momentum_schedule="linear", momentum_final=0.5,
                    momentum_lr_compensation=optimizer == "nesterov")
    trainer, run = start_run(config, tmp_path / "r.h5")
    trainer.train(run, 12)
    m = RunFile.open(tmp_path / "r.h5").metrics()
    expected = 0.9 + (0.5 - 0.9) * (m["step"] - 1) / 11   # the coefficient of the logged step (0-based index k - 1)
    np.testing.assert_allclose(m["momentum"], expected, rtol=1e-12)
    assert getattr(trainer.optimizer, attr) == pytest.approx(0.5)
    if optimizer == "nesterov":   # compensated: lr (1 - mu_t) / (1 - mu_0)
        np.testing.assert_allclose(m["lr"], config.resolved_lr * (1 - expected) / (1 - 0.9), rtol=1e-12)
    else:
        assert np.all(m["lr"] == config.resolved_lr)


@pytest.mark.parametrize("optimizer", ["momentum", "nesterov"])
def test_momentum_scheduled_down_to_zero_finishes_with_plain_sgd_steps_at_the_end(tmp_path, optimizer):
    """mu_t reaches 0 at the last step: that step is SGD's (as torch.optim.SGD's with momentum 0), logged, and the
    run finishes."""
    trainer, run = start_run(_moons(optimizer=optimizer, momentum_schedule="linear", momentum_final=0.0),
                             tmp_path / "r.h5")
    trainer.train(run, 12)
    m = RunFile.open(tmp_path / "r.h5").metrics()
    assert RunFile.open(tmp_path / "r.h5").status == "finished"
    assert m["step"][-1] == 12 and m["momentum"][-1] == 0.0 and trainer.optimizer.momentum == 0.0


def test_a_constant_schedule_leaves_the_optimizer_alone_and_logs_no_momentum(tmp_path):
    trainer = Trainer(_moons(momentum_final=0.3))
    assert trainer.momentum_schedule is None
    trainer.train_step()
    assert trainer.optimizer.beta1 == 0.9 and "momentum" not in trainer.collect_metrics(None)


def test_a_scheduled_run_resumes_bitwise_and_refuses_a_longer_plan(tmp_path):
    config = _moons(optimizer="momentum", momentum_schedule="cosine", momentum_final=0.2,
                    momentum_lr_compensation=True)
    straight, run = start_run(config, tmp_path / "s.h5")
    straight.train(run, 12)
    half, run = start_run(config, tmp_path / "h.h5")
    half.train(run, 7)
    run.close()
    with pytest.raises(ValueError, match="momentum schedule"):
        resume_run(tmp_path / "h.h5", steps=24)
    resumed, run = resume_run(tmp_path / "h.h5")
    resumed.train(run, 12)
    assert_bitwise_equal(untimed(resumed.state_dict()), untimed(straight.state_dict()))
