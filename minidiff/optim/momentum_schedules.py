r"""Momentum schedules: step -> momentum coefficient (β1 of the Adam family, μ of heavy ball and Nesterov), set on an
optimizer between steps like a learning rate (`set_momentum(opt, s(k))`), and the learning-rate compensation.

`step` counts optimizer steps already taken, 0-based, as in minidiff.optim.lr_schedules: s(0) is the coefficient of
the first update, and the schedule reaches its final value on the last step, total_steps − 1.

    constant   μ_0
    linear     μ_0 + (μ_f − μ_0) p                      p = step / (total_steps − 1), clipped to [0, 1]
    cosine     μ_0 + (μ_f − μ_0) · ½ (1 − cos(π p))     (written so that s(0) is exactly μ_0)

Xu et al. 2024 (arXiv 2404.07946) decay the momentum during training ("momentum decay with learning rate
compensation", MDLRC): a large momentum slows convergence and makes it oscillate on the smooth loss landscape of a
diffusion model. Their exact decay curve is not reproduced here (linear and cosine are the common forms).

Compensation (`lr_factor`): with PyTorch's SGD momentum b_t = μ b_{t-1} + g_t the step under a steady gradient is
γ g / (1 − μ) (γ (1 − τ) g / (1 − μ) with dampening τ; Nesterov's g + μ b_t gives the same limit), so lowering μ
shrinks the effective step. Keeping γ_t / (1 − μ_t) = γ / (1 − μ_0) means

    γ_t = γ · (1 − μ_t) / (1 − μ_0),

the learning rate rising as the momentum falls. The Adam family needs none: its first moment is a normalised
average (m̂ = m / (1 − β1^t), weights summing to 1), so its steady step is γ whatever β1 — there is no 1 / (1 − β1)
to keep constant. (What a lower β1 does change is the noise: m̂ of white noise has RMS √((1 − β1)/(1 + β1)) σ,
larger as β1 falls. That is not a step size, and `TrainConfig` refuses compensation for these optimizers rather than
invent a factor for it.)

Changing β1 or μ between steps has PyTorch's semantics: torch.optim reads `param_group['betas']` / `['momentum']` at
every step, and our optimizers read `beta1` / `momentum` at every step the same way — the buffers keep what they
hold, the new coefficient weighs the next gradient, and Adam's bias correction 1 − β1^t uses the current β1
(tests/optim/test_momentum_schedule.py checks every step against torch.optim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MOMENTUM_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class MomentumSchedule:
    """A step -> momentum coefficient callable; `lr_factor(step)` the SGD-form compensation (1 − μ_t) / (1 − μ_0)."""

    name: str
    initial: float
    final: float
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.name == "constant":
            return self.initial
        p = min(max(step / max(self.total_steps - 1, 1), 0.0), 1.0)
        shape = p if self.name == "linear" else 0.5 * (1.0 - math.cos(math.pi * p))
        return self.initial + (self.final - self.initial) * shape

    def lr_factor(self, step: int) -> float:
        """γ_t / γ = (1 − μ_t) / (1 − μ_0): keeps heavy ball's and Nesterov's steady step γ / (1 − μ) constant."""
        return (1.0 - self(step)) / (1.0 - self.initial)


def make_momentum_schedule(name: str, initial: float, final: float | None, total_steps: int) -> MomentumSchedule:
    """Build a schedule; ValueError naming the parameter for an unknown name or a value outside [0, 1)."""
    if name not in MOMENTUM_SCHEDULES:
        raise ValueError(f"unknown momentum schedule {name!r}; choose one of {', '.join(MOMENTUM_SCHEDULES)}")
    if name != "constant" and final is None:
        raise ValueError(f"momentum schedule {name!r} needs momentum_final (the value it ends at)")
    final = initial if final is None else final
    for what, value in (("initial momentum", initial), ("momentum_final", final)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    return MomentumSchedule(name, float(initial), float(final), int(total_steps))


def momentum_attribute(optimizer) -> str:
    """The optimizer's momentum coefficient: "beta1" (Adam, AdamW, NAdam) or "momentum" (SGD). ValueError for
    plain SGD, which has no momentum buffer to weigh."""
    if hasattr(optimizer, "beta1"):
        return "beta1"
    if getattr(optimizer, "momentum", 0.0) > 0.0:
        return "momentum"
    raise ValueError(f"{type(optimizer).__name__} without momentum has no momentum coefficient to schedule")


def set_momentum(optimizer, value: float, attribute: str | None = None) -> None:
    """Set β1 or μ for the next step (the optimizer reads it at every step, as torch.optim reads its param_group).
    attribute: `momentum_attribute` of the optimizer as it was built; a schedule that brings μ to 0 passes it, since
    an SGD at μ = 0 no longer tells heavy ball from plain SGD (its step is then plain SGD's, as torch.optim's is)."""
    setattr(optimizer, attribute or momentum_attribute(optimizer), float(value))
