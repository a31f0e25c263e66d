"""Optimizer cases that the reference-free optimizer tests and the chunked-step tests both run: every optimizer, and
the options that change its update (weight decay, dampening, AMSGrad, no bias correction); and the pair of ours and
torch.optim's that the step-by-step reference tests drive side by side."""

import numpy as np

CONFIGS = {  # case id -> (optimizer name, hyperparameters)
    "sgd": ("sgd", {"lr": 0.05, "weight_decay": 0.01}),
    "momentum": ("momentum", {"lr": 0.02, "momentum": 0.9, "dampening": 0.1}),
    "nesterov": ("nesterov", {"lr": 0.02, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.01, "weight_decay": 0.01}),
    "adam-amsgrad": ("adam", {"lr": 0.01, "amsgrad": True}),
    "adam-no-bias-correction": ("adam", {"lr": 0.01, "bias_correction": False}),
    "adamw": ("adamw", {"lr": 0.01}),
    "nadam": ("nadam", {"lr": 0.01, "weight_decay": 0.01}),
}


def on_backend(backend, grads, dtype=np.float64):
    """{name: host array} -> {name: the array on `backend` in `dtype`}."""
    return {k: backend.asarray(v, dtype=dtype) for k, v in grads.items()}


def torch_twins(torch, ours_cls, torch_name, hyper, shapes, rng):
    """Our optimizer and its torch.optim namesake on the same float64 starting parameters, drawn from `rng`.

    Returns (ours, params, theirs, tparams): `params` are the arrays ours updates in place, `tparams` torch's leaves in
    the same order. torch runs its single-tensor loop (foreach=False), whose rounding ours follows."""
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    params = {k: v.copy() for k, v in init.items()}
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    theirs = getattr(torch.optim, torch_name)(list(tparams.values()), **hyper, foreach=False)
    return ours_cls(params, **hyper), params, theirs, tparams
