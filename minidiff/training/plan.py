"""A run's plan over its steps: the learning rate, the momentum and the timestep sampler, as a TrainConfig sets them.

Each depends on the planned total `config.steps` in its own way (a cosine lr, a momentum schedule, a curriculum
without curriculum_steps), which is what `plan_dependence` checks before a resume extends a run's plan.
"""

from __future__ import annotations

from minidiff.diffusion.timesteps import make_timestep_sampler
from minidiff.optim.lr_schedules import make_lr_schedule
from minidiff.optim.momentum_schedules import make_momentum_schedule
from minidiff.training.config import TrainConfig


def build_lr_schedule(config: TrainConfig):
    """The learning rate at each step of a run planned for config.steps steps (the warm-up capped at the plan)."""
    return make_lr_schedule(config.lr_schedule, config.resolved_lr, config.steps,
                            warmup_steps=min(config.warmup_steps, config.steps))


def build_momentum_schedule(config: TrainConfig):
    """β1 (Adam family) or μ (momentum, nesterov) at each step of the planned run; None for a constant schedule,
    which leaves the optimizer's coefficient alone."""
    if config.momentum_schedule == "constant":
        return None
    initial = config.momentum if config.optimizer in ("momentum", "nesterov") else config.beta1
    return make_momentum_schedule(config.momentum_schedule, initial, config.momentum_final, config.steps)


def build_timestep_sampler(config: TrainConfig):
    """The sampler `timestep_sampling` names, over the config's timesteps and timestep buckets."""
    return make_timestep_sampler(config.timestep_sampling, config.timesteps, config.timestep_buckets,
                                 config.resolved_curriculum_steps)


def plan_dependence(config: TrainConfig, extended: TrainConfig, done: int) -> str | None:
    """What of the first `done` steps would differ in the longer plan `extended` (the lr schedule, the momentum
    schedule, the curriculum's range), as words for a message; None when nothing does."""
    old, new = build_lr_schedule(config), build_lr_schedule(extended)
    if any(old(k) != new(k) for k in range(done)):
        return f"lr schedule {config.lr_schedule!r}"
    old, new = build_momentum_schedule(config), build_momentum_schedule(extended)
    if old is not None and any(old(k) != new(k) for k in range(done)):
        return f"momentum schedule {config.momentum_schedule!r}"
    if config.timestep_sampling == "curriculum":
        old, new = build_timestep_sampler(config), build_timestep_sampler(extended)
        if any(old.low_end(k) != new.low_end(k) for k in range(done)):
            return "curriculum (curriculum_steps unset: half the run)"
    return None
