"""A training session around a run file: start a new run, resume one at its checkpoint, and say when a resume
cannot be bit for bit (another CPU thread count).

The Trainer (minidiff.training.trainer) holds a run's state and advances it; this module pairs it with its RunFile.
"""

from __future__ import annotations

from minidiff.execution.threads import cpu_workers
from minidiff.runs.file import RunFile
from minidiff.training.config import TrainConfig
from minidiff.training.plan import plan_dependence
from minidiff.training.trainer import Trainer


def start_run(config: TrainConfig, path, command_line: str = "", overwrite: bool = False):
    """Create the run file for a new Trainer; returns (trainer, run)."""
    trainer = Trainer(config)
    run = RunFile.create(path, config.to_dict(), command_line=command_line, overwrite=overwrite,
                         backend=trainer.backend.name)
    run.set_attrs(layer_names=trainer.instruments.layer_names(), model_name=trainer.model_name,
                  num_params=trainer.model.num_params(), cpu_threads=cpu_workers(trainer.backend.xp))
    return trainer, run


def thread_count_note(run, trainer) -> str | None:
    """One line for a resume with a CPU thread count other than the run's (None when they agree, or unrecorded).

    A CPU batch is split into up to that many parts (minidiff.models.base) whose gradients are added in part order,
    so a continuation with another count matches an uninterrupted run to rounding, not bit for bit. (The split also
    depends on whether parts run in processes or on threads, which is the same on the same system.)"""
    before, now = run.attrs.get("cpu_threads"), cpu_workers(trainer.backend.xp)
    if before is None or int(before) == now:
        return None
    return (f"note: {run.path.name} was trained with {int(before)} CPU thread(s) and resumes with {now}; the batch "
            f"parts' gradients then add up in another order, so the continuation matches an uninterrupted run to "
            f"rounding, not bit for bit (OPENBLAS_NUM_THREADS={int(before)} gives the same count on a machine with at "
            f"least {int(before)} cores)")


def resume_run(path, steps: int | None = None):
    """Reopen a run file and rebuild its Trainer at the checkpoint; returns (trainer, run).

    steps: the total the caller will train to. Past the run's planned steps, the plan is extended first (the file's
    config then says `steps`), so logs, samples and the end follow the new total: the state then evolves exactly as
    in a run planned that long (its metrics differ only by the rows already written at the old end, and the log
    window after it). ValueError, file untouched, when the learning rates of the steps already taken depend on the
    total (cosine, warmup_cosine, a warm-up longer than the plan), or their momentum (a momentum schedule) or
    timesteps (a curriculum without curriculum_steps): they would not match a run planned that long.
    """
    run = RunFile.open(path, mode="a")
    config = TrainConfig.from_dict(run.config)
    done = run.checkpoint_step
    if steps is not None and steps > config.steps and done is not None:  # no checkpoint: resume() says so below
        extended = config.replace(steps=steps)
        changed = plan_dependence(config, extended, done)
        if changed:
            raise ValueError(f"--steps {steps} is past the {config.steps} steps {path} was planned for, and its "
                             f"{changed} depends on the total, so the steps already taken would "
                             f"not match a {steps}-step run; resume to at most {config.steps} steps, or start a new "
                             f"run with minidiff train --steps {steps}")
        run.set_config(extended.to_dict())
        config = extended
    state = run.resume()  # RunFileError when the file is damaged or holds no checkpoint
    trainer = Trainer(config)
    trainer.load_state_dict(state)
    return trainer, run
