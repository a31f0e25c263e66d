r"""Hand-written optimizers, identical step by step to `torch.optim`: a short course in what they compute.

Every optimizer here minimises f(θ) from gradients alone. It keeps explicit state — a step count t and a few arrays
per parameter — and each step turns the gradient g_t = ∇f(θ_{t-1}) into an update u_t, θ_t = θ_{t-1} + u_t:

- `SGD`: u_t = −γ g_t. Gradient descent on a quadratic with Hessian eigenvalues in [μ, L] converges at rate
  (κ − 1) / (κ + 1) per step at best (γ = 2 / (L + μ)), κ = L / μ the condition number: ~κ/2 steps per factor e.
- Heavy-ball momentum (`SGD(momentum=μ)`): b_t = μ b_{t-1} + g_t, u_t = −γ b_t. The buffer averages gradients, so
  directions where they agree accumulate speed (the steady step is γ g / (1 − μ)) and directions where they flip sign
  cancel. On the quadratic, with γ = 4 / (√L + √μ)² and μ = ((√κ − 1) / (√κ + 1))², the rate is (√κ − 1) / (√κ + 1):
  ~√κ/2 steps per factor e, √κ times fewer than gradient descent (`minidiff.study.optim_demo` measures it).
- Nesterov momentum (`SGD(nesterov=True)`): u_t = −γ (g_t + μ b_t), a step that looks one momentum step ahead.
  It damps heavy ball's overshoot, and its acceleration is guaranteed on every smooth (strongly) convex function,
  whereas heavy ball's √κ rate is a fact about quadratics: on other strongly convex functions its tuned setting can
  fail to converge at all (Lessard, Recht & Packard 2016).
- `Adam`: per-coordinate step sizes. m is an EMA of g (momentum), v an EMA of g²; the step −γ m̂ / (√v̂ + ε) is
  ~γ in every coordinate whose gradient sign is consistent, whatever its scale — a diagonal preconditioner that makes
  learning rates transferable between layers with very different gradient scales (why diffusion models use it).
- `AdamW`: Adam with weight decay applied to θ directly instead of added to g (decoupled). `NAdam`: Adam with a
  Nesterov look-ahead on m and a warmed-up momentum coefficient.

The docstring of each class gives its equations in the order and symbols its code uses, and `SGD`'s says how the other
common ways of writing momentum map onto PyTorch's — and that they stop agreeing once the learning rate changes during
a run. Around the optimizers: `minidiff.optim.clip` (global-norm clipping), `minidiff.optim.lr_schedules`,
`minidiff.optim.momentum_schedules`, `minidiff.optim.ema`.

Usage: `opt = build_optimizer("adam", model_params, lr=2e-4)`, then per batch `opt.step(grads)`; set `opt.lr`
between steps for a schedule; `opt.step(grads, diagnostics=True)` returns 0-d arrays (update norm, update-to-weight
ratio, gradient/momentum cosine, Adam's bias corrections and m̂/(√v̂+ε) RMS); `state_dict()` / `load_state_dict()`
checkpoint it.
"""

from __future__ import annotations

import functools
import inspect

from minidiff.optim.clip import clip_grad_norm
from minidiff.optim.adam import Adam, AdamW
from minidiff.optim.base import Optimizer
from minidiff.optim.nadam import NAdam
from minidiff.optim.sgd import SGD

OPTIMIZERS = {
    "sgd": SGD,
    "momentum": functools.partial(SGD, momentum=0.9),
    "nesterov": functools.partial(SGD, momentum=0.9, nesterov=True),
    "adam": Adam,
    "adamw": AdamW,
    "nadam": NAdam,
}


def build_optimizer(name: str, params: dict, **hyper) -> Optimizer:
    """OPTIMIZERS[name](params, **hyper); "momentum" and "nesterov" are SGD with momentum 0.9 unless given.

    An unknown name or a hyperparameter the optimizer does not take is a ValueError that names it.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    factory = OPTIMIZERS[name]
    cls = factory.func if isinstance(factory, functools.partial) else factory
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(hyper) - accepted)
    if unknown:
        raise ValueError(f"optimizer {name!r} has no hyperparameter(s) {unknown}; it takes {sorted(accepted)}")
    return factory(params, **hyper)


__all__ = ["SGD", "Adam", "AdamW", "NAdam", "Optimizer", "OPTIMIZERS", "build_optimizer", "clip_grad_norm"]
