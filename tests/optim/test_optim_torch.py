"""Every optimizer and hyperparameter combination against torch.optim, step by step, and clipping against torch."""

import numpy as np
import pytest

from helpers.optim_cases import torch_twins
from minidiff.optim.clip import clip_grad_norm
from minidiff.kernels.flat import FlatArrays
from minidiff.optim import SGD, Adam, AdamW, NAdam

SHAPES = {"conv.w": (4, 3, 3, 3), "conv.b": (4,), "dense.w": (5, 7), "gain": ()}
STEPS = 120
RTOL = 1e-10

CASES = [
    ("sgd", SGD, "SGD", {"lr": 0.05}),
    ("sgd-wd-max", SGD, "SGD", {"lr": 0.05, "weight_decay": 0.1, "maximize": True}),
    ("momentum", SGD, "SGD", {"lr": 0.01, "momentum": 0.9}),
    ("momentum-damp", SGD, "SGD", {"lr": 0.01, "momentum": 0.9, "dampening": 0.5}),
    ("momentum-damp-wd-max", SGD, "SGD", {"lr": 0.01, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.05,
                                          "maximize": True}),
    ("nesterov", SGD, "SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    ("nesterov-wd-max", SGD, "SGD", {"lr": 0.01, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1,
                                     "maximize": True}),
    ("adam", Adam, "Adam", {"lr": 0.01}),
    ("adam-betas-eps", Adam, "Adam", {"lr": 0.01, "betas": (0.3, 0.9), "eps": 1e-3}),
    ("adam-wd", Adam, "Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("adam-amsgrad", Adam, "Adam", {"lr": 0.01, "amsgrad": True}),
    ("adam-max", Adam, "Adam", {"lr": 0.01, "maximize": True}),
    ("adam-amsgrad-wd-max", Adam, "Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05, "maximize": True}),
    ("adamw", AdamW, "AdamW", {"lr": 0.01}),
    ("adamw-wd-amsgrad-max", AdamW, "AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True}),
    ("nadam", NAdam, "NAdam", {"lr": 0.01}),
    ("nadam-wd-decay", NAdam, "NAdam", {"lr": 0.01, "weight_decay": 0.1, "momentum_decay": 1e-2}),
    ("nadam-decoupled-max", NAdam, "NAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True,
                                             "maximize": True}),
]


def _assert_close(ours, ref, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    err = np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-300), initial=0.0)
    assert err <= RTOL, f"{what}: max relative error {err:.3g}"
    return err


@pytest.mark.parametrize("change_lr", [False, True], ids=["const-lr", "lr-changed-mid-run"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_optim_every_step(torch64, case, change_lr):
    torch = torch64
    _, ours_cls, torch_name, hyper = case
    rng = np.random.default_rng(1)
    opt, params, topt, tparams = torch_twins(torch, ours_cls, torch_name, hyper, SHAPES, rng)
    worst = 0.0
    for step in range(STEPS):
        if change_lr and step in (STEPS // 3, 2 * STEPS // 3):
            new_lr = opt.lr * (0.1 if step == STEPS // 3 else 30.0)
            opt.lr = new_lr
            topt.param_groups[0]["lr"] = new_lr
        grads = {k: rng.standard_normal(s) * 10.0 ** rng.uniform(-2, 1) for k, s in SHAPES.items()}
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])
        opt.step(grads)
        topt.step()
        for k, p in tparams.items():
            worst = max(worst, _assert_close(params[k], p.detach().numpy(), f"step {step} param {k}"))
            tstate = topt.state[p]
            assert set(opt.state[k]) == set(tstate) - {"step", "mu_product"}
            for name, buf in opt.state[k].items():
                worst = max(worst, _assert_close(buf, tstate[name].numpy(), f"step {step} {k}/{name}"))
            if "step" in tstate:
                assert opt.step_count == int(tstate["step"])
            if "mu_product" in tstate:
                _assert_close(opt.mu_product, float(tstate["mu_product"]), f"step {step} mu_product")
    print(f"{case[0]} lr_change={change_lr}: worst relative error over {STEPS} steps {worst:.2e}")


@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "end-to-end"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "not-clipped"])
def test_clip_grad_norm_matches_torch(torch, max_norm, flat, cpu_backend):
    """Gradients as separate arrays, or laid end to end as a model's backward returns them (then one norm and one
    scaling over the flat buffer, which every array must see)."""
    rng = np.random.default_rng(2)
    host = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    if flat:
        grads = FlatArrays(SHAPES, cpu_backend.asarray(np.concatenate([v.ravel() for v in host.values()]),
                                                          dtype=np.float64))
    else:
        grads = {k: cpu_backend.asarray(v, dtype=np.float64) for k, v in host.items()}
    tparams = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES.values()]
    for p, v in zip(tparams, host.values()):
        p.grad = torch.tensor(v)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    norm = clip_grad_norm(grads, max_norm)
    _assert_close(norm.item(), tnorm.item(), "total norm")
    for p, g in zip(tparams, grads.values()):
        _assert_close(g.get() if hasattr(g, "get") else g, p.grad.numpy(), "clipped gradient")
    after = np.sqrt(sum(np.sum((g.get() if hasattr(g, "get") else g) ** 2) for g in grads.values()))
    assert after == pytest.approx(min(max_norm, np.sqrt(sum(np.sum(v ** 2) for v in host.values()))), rel=1e-5)
