"""Learning-rate schedules: step -> learning rate, host floats, set on an optimizer between steps (`opt.lr = s(k)`).

`step` counts optimizer steps already taken, 0-based: s(0) is the rate of the first update. With warmup_steps = W,
the warmup reaches the full rate at step W − 1 (the first update already moves, at lr / W — unlike schedules that
start at exactly 0 and waste a step); the cosine decay ends at min_lr on the last step, total_steps − 1, and stays
there beyond it.

    constant        lr
    warmup          lr · min(1, (step + 1) / W)                   (W = 0: constant)
    cosine          min_lr + (lr − min_lr) · ½ (1 + cos(π p)),   p = step / (total_steps − 1), clipped to [0, 1]
    warmup_cosine   warmup to lr at step W − 1, then cosine with p = (step − W + 1) / (total_steps − W)

DDPM warms up linearly over 5000 steps and then holds the rate; Stable Diffusion over 10k; the diffusers example
uses warmup then cosine (see /work/shared/REFERENCES.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "warmup", "cosine", "warmup_cosine")


@dataclass(frozen=True)
class LRSchedule:
    """A picklable step -> lr callable (a frozen dataclass, so it can be saved with a run's config)."""

    name: str
    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        lr, w = self.lr, self.warmup_steps
        if self.name in ("warmup", "warmup_cosine") and step < w:
            return lr * (step + 1) / w
        if self.name in ("constant", "warmup"):
            return lr
        start = max(w - 1, 0) if self.name == "warmup_cosine" else 0  # the step at which the cosine is at lr
        span = max(self.total_steps - 1 - start, 1)
        p = min(max((step - start) / span, 0.0), 1.0)
        return self.min_lr + (lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def make_lr_schedule(name: str, lr: float, total_steps: int, warmup_steps: int = 0,
                     min_lr: float = 0.0) -> LRSchedule:
    """Build a schedule; ValueError naming the parameter for an unknown name or inconsistent numbers."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr], got {min_lr!r} with lr={lr!r}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if int(warmup_steps) != warmup_steps or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps], got {warmup_steps!r}")
    return LRSchedule(name, float(lr), int(total_steps), int(warmup_steps), float(min_lr))
