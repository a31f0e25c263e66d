"""Optimizer cases that the reference-free optimizer tests and the chunked-step tests both run: every optimizer, and
the options that change its update (weight decay, dampening, AMSGrad, no bias correction)."""

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
