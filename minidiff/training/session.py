"""A training session around a run file: start a new run, resume one, open one to read, and record a failure of the
file system; and say when a resume cannot be bit for bit (another CPU thread count).

The Trainer (minidiff.training.trainer) holds a run's state and advances it; this module pairs it with its RunFile.
Everything is checked before anything is written: start_run builds the Trainer (data, sizes, model) before the file
exists, and resume_run takes the writer lock, then checks the whole file, the stored config, the data and the
checkpoint against the rebuilt Trainer, and only then changes the file. A damaged or unusable run is a RunFileError
of one line naming the file and the part, and its bytes are as they were.
"""

from __future__ import annotations

from pathlib import Path

from minidiff.datasets import DataError
from minidiff.execution.threads import cpu_workers
from minidiff.datasets.png import encode_png, make_grid
from minidiff.runs.file import RunFile, RunFileError, RunFileExistsError
from minidiff.training.config import TrainConfig
from minidiff.training.integrity import load_checked
from minidiff.training.plan import plan_dependence
from minidiff.training.trainer import Trainer


def start_run(config: TrainConfig, path, command_line: str = "", overwrite: bool = False, grid_png=None):
    """Create the run file for a new Trainer; returns (trainer, run).

    grid_png: the PNG the caller will write the run's samples to (image data only); like the run file itself, an
    existing one is refused (RunFileExistsError, nothing written) unless overwrite."""
    trainer = Trainer(config)
    try:
        if grid_png is not None and trainer.dataset.kind == "image" and Path(grid_png).exists() and not overwrite:
            raise RunFileExistsError(f"{grid_png} already exists (the run's sample grid goes there); pass "
                                     "--overwrite to replace it and the run, or --out to choose another name")
        run = RunFile.create(path, config.to_dict(), command_line=command_line, overwrite=overwrite,
                             backend=trainer.backend.name)
    except BaseException:
        trainer.model.stop_workers()
        raise
    _record_model(run, trainer)
    return trainer, run


def _record_model(run, trainer) -> None:
    run.set_attrs(layer_names=trainer.instruments.layer_names(), model_name=trainer.model_name,
                  num_params=trainer.model.num_params(), cpu_threads=cpu_workers(trainer.backend.xp))


def thread_count_note(run, trainer) -> str | None:
    """One line for a resume with a CPU thread count other than the run's (None when they agree, or unrecorded).

    A CPU batch is split into up to that many chunks (minidiff.execution.data_parallel) whose gradients are added in
    chunk order, so a continuation with another count matches an uninterrupted run to rounding, not bit for bit. (The
    split also depends on whether chunks run in processes or on threads, which is the same on the same system.)"""
    before, now = run.attrs.get("cpu_threads"), cpu_workers(trainer.backend.xp)
    if before is None or int(before) == now:
        return None
    return (f"note: {run.path.name} was trained with {int(before)} CPU thread(s) and resumes with {now}; the batch "
            f"chunks' gradients then add up in another order, so the continuation matches an uninterrupted run to "
            f"rounding, not bit for bit (OPENBLAS_NUM_THREADS={int(before)} gives the same count on a machine with at "
            f"least {int(before)} cores)")


def resume_run(path, steps: int | None = None):
    """Reopen a run file and rebuild its Trainer at the checkpoint; returns (trainer, run).

    A run that stopped before its first checkpoint starts again at step 0 with its stored config (what it logged is
    dropped), so the continuation is the run it would have been. steps: the total the caller will train to. Past the
    run's planned steps, the plan is extended first (the file's config then says `steps`), so logs, samples and the
    end follow the new total: the state then evolves exactly as in a run planned that long (its metrics differ only
    by the rows already written at the old end, and the log window after it). ValueError, file untouched, when the
    learning rates of the steps already taken depend on the total (cosine, warmup_cosine, a warm-up longer than the
    plan), or their momentum (a momentum schedule) or timesteps (a curriculum without curriculum_steps): they would
    not match a run planned that long. RunFileError (another writer holds the run, or the file,
    its config, its data or its checkpoint is unusable) and StorageError leave the file untouched too.
    """
    run = RunFile.open(path, mode="a")   # the writer lock, then every part of the file checked
    trainer = None
    try:
        config = stored_config(run)
        done = run.checkpoint_step
        extended = None
        if steps is not None and steps > config.steps:   # without a checkpoint no step was taken: any plan fits
            extended = config.replace(steps=steps)
            changed = plan_dependence(config, extended, done or 0)
            if changed:
                raise ValueError(f"--steps {steps} is past the {config.steps} steps {path} was planned for, and its "
                                 f"{changed} depends on the total, so the steps already taken would not match a "
                                 f"{steps}-step run; resume to at most {config.steps} steps, or start a new run with "
                                 f"minidiff train --steps {steps}")
            config = extended
        trainer = build_trainer(run, config)
        state = run.load_checkpoint() if done is not None else None
        if state is not None:
            load_checked(trainer, state, run.path)
        # every check passed: the first write
        run.resume(state, config=None if extended is None else extended.to_dict())
        if state is None:
            _record_model(run, trainer)
    except BaseException:
        if trainer is not None:
            trainer.model.stop_workers()
        run.close()
        raise
    return trainer, run


def open_trainer(path):
    """(a Trainer at the run's checkpoint, the read-only RunFile), every part checked as resume_run checks it; for
    sampling and evaluation (no worker processes are forked up front: sampling uses another model)."""
    run = RunFile.open(path, mode="r")
    if run.checkpoint_step is None:
        raise RunFileError(f"{path}: the run has no checkpoint yet (nothing to sample from)")
    trainer = build_trainer(run, stored_config(run), start_workers=False)
    load_checked(trainer, run.load_checkpoint(), run.path)
    return trainer, run


def stored_config(run) -> TrainConfig:
    """The run's TrainConfig; RunFileError naming the file when the stored one is not a valid config."""
    try:
        return TrainConfig.from_dict(run.config)
    except (ValueError, TypeError) as exc:
        raise RunFileError(f"{run.path}: root attribute 'config' is not a usable run config: {exc}") from None


def build_trainer(run, config: TrainConfig, start_workers: bool = True) -> Trainer:
    """Trainer(config) for the run in `run`; its data, sizes or model refused as a RunFileError naming the file."""
    try:
        return Trainer(config, start_workers=start_workers)
    except DataError as exc:
        raise RunFileError(f"{run.path}: its data cannot be used: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise RunFileError(f"{run.path}: its config cannot build the run: {message}") from None


def record_storage_failure(run, trainer, exc: OSError) -> str:
    """After the file system refused a write during training (the previous file is intact): mark the run
    "interrupted" with the reason if the file system still takes that write, and return the one line to print."""
    kept = (f"the file keeps its checkpoint at step {run.checkpoint_step}" if run.checkpoint_step is not None
            else "the file holds no checkpoint yet, so resume starts again at step 0")
    reason = f"{exc} at step {trainer.step}"
    try:
        run.discard_pending()   # rows after the checkpoint: resume drops them anyway, and space is short
        run.set_status("interrupted", f"stopped by the file system: {reason}")
    except OSError:
        kept += " (its status still says running: the file system refused that write too)"
    return f"{reason}; {kept}; once the file system is writable again, continue with: minidiff resume {run.path}"


def grid_png(path) -> Path:
    """Where `train` and `resume` write a run's latest sample grid: beside it, <name>.png."""
    return Path(path).with_suffix(".png")


def grid_png_is_the_runs(path) -> bool:
    """Whether <name>.png may be replaced by the run's next grid: it does not exist, or it is byte for byte the grid
    of the run's latest stored samples (written by train or resume, not by someone else)."""
    png = grid_png(path)
    if not png.exists():
        return True
    run = RunFile.open(path)
    steps = run.sample_steps()
    if not steps:
        return False
    images, _ = run.load_samples(steps[-1])
    try:
        return png.read_bytes() == encode_png(make_grid(images))
    except OSError:
        return False
