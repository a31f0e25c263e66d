"""The `minidiff` command line: parses options and calls into the package; no logic lives here."""

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

import click
from click.core import ParameterSource

from minidiff import __version__
from minidiff.bench import benchmark as bench
from minidiff.study import optim_demo
from minidiff.backend import BackendError
from minidiff.study.compare import compare_runs
from minidiff.study.groups import MissingExtra
from minidiff.training.config import (DEFAULT_LR, DEVICES, MODEL_NAMES, OPTIMIZER_NAMES, TIMESTEP_SAMPLING, default_run_path,
                             load_config_file)
from minidiff.datasets import DATASETS, DataError
from minidiff.diffusion.losses import PREDICTIONS, WEIGHTINGS
from minidiff.optim.lr_schedules import LR_SCHEDULES
from minidiff.optim.momentum_schedules import MOMENTUM_SCHEDULES
from minidiff.study.run_tools import (config_from_options, evaluate_run, format_evaluation, sample_png, summarize,
                                     summary_json, write_latest_samples_png)
from minidiff.runs.file import RunFile, RunFileError, StorageError
from minidiff.runs.layout import ENVIRONMENT_ERRNOS, storage_error
from minidiff.diffusion.schedules import SCHEDULES
from minidiff.study.sweep import run_sweep, sweep_points
from minidiff.training.progress import Progress, describe_final, final_numbers
from minidiff.training.session import (grid_png, grid_png_is_the_runs, record_storage_failure, resume_run, start_run,
                                       thread_count_note)
from minidiff.training.trainer import TrainingDiverged, TrainingInterrupted


class _Interruptible(click.Group):
    """Ctrl-C or SIGTERM outside a training loop (which checkpoints first, minidiff.training.trainer): one line and
    exit 130, not click's "Aborted!" with exit 1 (which here means diverged), and not a silent death by SIGTERM."""

    def invoke(self, ctx):
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nError: interrupted; a run file is left at its last complete write (minidiff resume "
                       "continues a run)", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@click.group(cls=_Interruptible, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minidiff")
def main():
    """minidiff: diffusion models from scratch on NumPy/CuPy, no autograd.

    \b
    Exit status of train and resume (evaluate, sample, inspect, compare: 0, 2 or 74):
      0    the run reached its steps (status "finished")
      1    the run diverged: one line says so; the file is marked "diverged" and keeps its last good checkpoint
      2    bad input (an option, a --config file, data, a damaged run file, a run another process is writing, a
           size this machine cannot hold): one line, nothing written
      74   the machine failed (disk full, read-only, permission, a lost mount, memory): one line; the run file
           keeps its last checkpoint (status "interrupted" when that could still be written); resume continues
      130  interrupted (Ctrl-C, SIGTERM): a checkpoint was written; continue with minidiff resume
    """


EX_IOERR = 74   # sysexits.h: an error while doing I/O on some file (here: any failure of the machine)
# a run file argument; whether it can be read is minidiff's to say: a denied read is the machine's failure (74)
RUN_FILE = click.Path(exists=True, dir_okay=False, readable=False)


class BadInput(click.ClickException):
    """Bad input found after parsing (a config value, an existing file): one line, exit code 2, like a usage error."""

    exit_code = 2


class RunDiverged(click.ClickException):
    """The run diverged (its file says so and keeps its last good checkpoint): one line, exit code 1."""

    exit_code = 1


class _OneLineUsageErrors(click.Command):
    """Usage errors (bad option or value) as one line, exit code 2, no usage block and no traceback."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # without a context, click prints only "Error: <message>"
            raise click.UsageError(f"{exc.format_message()} (see '{ctx.command_path} --help')") from None


@main.command("optim-demo", cls=_OneLineUsageErrors)
@click.option("--optimizer", "-o", "optimizers", multiple=True, type=click.Choice(optim_demo.DEMO_OPTIMIZERS),
              help="Repeat to choose several (default: all).")
@click.option("--problem", "-p", "problems", multiple=True, type=click.Choice(optim_demo.PROBLEMS),
              help="Repeat to choose several (default: both).")
@click.option("--kappa", type=click.FloatRange(min=1.0), default=100.0, show_default=True,
              help="Condition number of the quadratic.")
@click.option("--tol", type=click.FloatRange(min=0.0, min_open=True), default=1e-6, show_default=True,
              help="Converged when ||x - x*|| <= tol.")
@click.option("--max-steps", type=click.IntRange(min=1), default=40000, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Save a PNG of the trajectories here (needs matplotlib).")
def optim_demo_command(optimizers, problems, kappa, tol, max_steps, out):
    """Run the optimizers on a quadratic and on Rosenbrock; print steps to reach the tolerance."""
    try:
        table = optim_demo.run_demo(optimizers or optim_demo.DEMO_OPTIMIZERS, problems or optim_demo.PROBLEMS,
                                    kappa=kappa, tol=tol, max_steps=max_steps, out=out)
    except (ValueError, RuntimeError, OSError) as exc:
        raise BadInput(str(exc)) from None
    click.echo(table)
    if out:
        click.echo(f"trajectories written to {out}")


# --- training runs --------------------------------------------------------------------------------------------------
def _train_options(f):
    """Every TrainConfig field as an option; None means 'not given' so --config files and defaults show through."""
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="JSON or TOML file setting any option below, or any other TrainConfig field (e.g. "
                          "eval_every); options given on the command line win."),
        click.option("--dataset", help=f"Built-in data set ({', '.join(DATASETS)}) or a path to .npy/.npz/.h5/IDX "
                                       "images. [default: digits]"),
        click.option("--model", type=click.Choice(MODEL_NAMES), help="Denoiser; auto = UNet for images, MLP for "
                                                                     "points. [default: auto]"),
        click.option("--base-channels", type=click.IntRange(min=1), help="UNet width (model option)."),
        click.option("--optimizer", type=click.Choice(OPTIMIZER_NAMES), help="[default: adam]"),
        click.option("--lr", type=float, help="Learning rate, > 0. [default: per optimizer: "
                     + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + "]"),
        click.option("--momentum", type=float, help="Momentum for momentum/nesterov, in [0, 1). [default: 0.9]"),
        click.option("--dampening", type=float, help="SGD dampening (heavy-ball only), in [0, 1]. [default: 0]"),
        click.option("--beta1", type=float, help="Adam-family beta1, in [0, 1). [default: 0.9]"),
        click.option("--beta2", type=float, help="Adam-family beta2, in [0, 1). [default: 0.999]"),
        click.option("--eps", type=float, help="Adam-family eps, > 0. [default: 1e-8]"),
        click.option("--weight-decay", type=float, help="Weight decay, >= 0. [default: 0]"),
        click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), help="[default: constant]"),
        click.option("--warmup-steps", type=int, help="Linear warm-up steps for warmup schedules. [default: 0]"),
        click.option("--grad-clip", type=float, help="Clip the global gradient norm at this value; 0 disables. "
                                                     "[default: 1.0]"),
        click.option("--ema-decay", type=float, help="EMA decay of the weights used for samples. [default: 0.999]"),
        click.option("--batch-size", type=int, help="[default: 128]"),
        click.option("--steps", type=int, help="Optimizer steps. [default: 1500]"),
        click.option("--seed", type=int, help="Seeds data order, init, t and noise. [default: 0]"),
        click.option("--schedule", type=click.Choice(SCHEDULES), help="Noise schedule. [default: linear]"),
        click.option("--timesteps", type=int, help="Diffusion steps T. [default: 1000]"),
        click.option("--prediction", type=click.Choice(PREDICTIONS), help="What the model predicts. "
                                                                          "[default: epsilon]"),
        click.option("--weighting", type=click.Choice(WEIGHTINGS), help="Loss weighting over t. [default: uniform]"),
        click.option("--timestep-sampling", type=click.Choice(TIMESTEP_SAMPLING), help="How t is drawn: uniform, "
                     "loss_aware (improved DDPM), stratified (every timestep bucket in every batch), bucket_cycle "
                     "(batch k from bucket k mod K), curriculum (from the high-noise end widening to all t). "
                     "[default: uniform]"),
        click.option("--curriculum-steps", type=click.IntRange(min=1), help="Curriculum sampling: the step from "
                     "which every t is drawn. [default: half the run]"),
        click.option("--momentum-schedule", type=click.Choice(MOMENTUM_SCHEDULES), help="Move beta1 (Adam family) "
                     "or momentum (momentum/nesterov) from its value to --momentum-final over the run. "
                     "[default: constant]"),
        click.option("--momentum-final", type=float, help="The momentum schedule's last value, in [0, 1)."),
        click.option("--momentum-lr-compensation/--no-momentum-lr-compensation", default=None,
                     help="momentum/nesterov with a momentum schedule: lr_t = lr (1 - mu_t) / (1 - mu_0), keeping the "
                          "step lr / (1 - mu) constant. [default: off]"),
        click.option("--bucket-momentum/--no-bucket-momentum", default=None,
                     help="One momentum buffer / Adam first moment per timestep bucket (needs --timestep-sampling "
                          "bucket_cycle). [default: off]"),
        click.option("--device", type=click.Choice(DEVICES), help="cpu (NumPy), gpu (CuPy), auto. "
                                                                  "[default: $MINIDIFF_DEVICE or cpu]"),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), help="[default: float32]"),
        click.option("--log-every", type=int, help="Log metrics every N steps. [default: 50]"),
        click.option("--ckpt-every", type=int, help="Checkpoint every N steps. [default: 500]"),
        click.option("--sample-every", type=int, help="Save EMA samples every N steps. [default: 500]"),
        click.option("--probe-every", type=click.IntRange(min=0), help="Run the study's probes (per-timestep-bucket "
                     "gradients and their cosines, noise scale, momentum alignment) every N steps; 0 = off. "
                     "[default: 250]"),
        click.option("--probe-buckets", type=click.IntRange(min=1), help="Timestep buckets the probes split t into. "
                                                                         "[default: 5]"),
        click.option("--probe-batch", type=click.IntRange(min=1), help="Samples in the probes' fixed batch (its "
                     "halves give the split-half noise ceiling). [default: 64]"),
        click.option("--eval-every", type=click.IntRange(min=0), help="Measure sample quality from the EMA weights "
                     "every N steps (as minidiff evaluate does); 0 = off. [default: 500]"),
        click.option("--eval-samples", type=click.IntRange(min=2), help="Samples per evaluation (FD grows as they "
                     "shrink: compare runs at equal counts). [default: 256]"),
        click.option("--val-every", type=click.IntRange(min=0), help="Denoising loss of the raw and EMA weights on "
                     "fixed held-out (x0, t, noise) triples every N steps; 0 = off. [default: --eval-every]"),
        click.option("--val-samples", type=click.IntRange(min=1), help="Held-out triples for the validation loss "
                     "(held-out images repeated to reach it). [default: 1024]"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _from_file(ctx, name, value, file_values, kind):
    """An option of `train` that is not a TrainConfig field (out, overwrite, quiet): the command line, else the
    --config file, else the default."""
    in_file = file_values.pop(name, None)
    if in_file is None or ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
        return value
    if not isinstance(in_file, kind):
        raise ValueError(f"{name} in the config file must be a {kind.__name__}, got {in_file!r}")
    return in_file


@main.command("train", cls=_OneLineUsageErrors)
@_train_options
@click.option("--dataset-key", help="The array to train on when --dataset is an .npz or HDF5 file holding several "
                                    "(an HDF5 path such as group/images). [default: the file's only array]")
@click.option("--out", type=click.Path(dir_okay=False), help="Run file to write. [default: runs/<dataset>-"
                                                              "<optimizer>-<time>.h5]")
@click.option("--overwrite", is_flag=True, help="Replace an existing run file (and the sample grid beside it).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def train_command(ctx, config_file, dataset_key, out, overwrite, quiet, **options):
    """Train a diffusion model and record the run in an HDF5 file (default: UNet on the bundled digits, Adam).

    Exit status: 0 finished, 1 diverged, 2 bad input, 74 machine failure, 130 interrupted (see minidiff --help).
    """
    try:
        file_values = load_config_file(config_file) if config_file else {}
        out = _from_file(ctx, "out", out, file_values, str)
        overwrite = _from_file(ctx, "overwrite", overwrite, file_values, bool)
        quiet = _from_file(ctx, "quiet", quiet, file_values, bool)
        for name in ("model_options", "dataset_options"):
            if not isinstance(file_values.get(name, {}), dict):
                raise ValueError(f"{name} in {config_file} must be a mapping (a table), got {file_values[name]!r}")
        if dataset_key is not None:
            file_values["dataset_options"] = dict(file_values.get("dataset_options", {}), key=dataset_key)
        config = config_from_options(file_values, options)
    except (ValueError, TypeError) as exc:
        raise BadInput(str(exc)) from None
    out = Path(out or default_run_path(config))
    if out.exists() and not overwrite:
        raise BadInput(f"{out} already exists; pass --overwrite to replace it or --out to choose another")
    with _friendly_errors():
        trainer, run = start_run(config, out, command_line=" ".join(sys.argv), overwrite=overwrite,
                                 grid_png=grid_png(out))
    click.echo(f"training {trainer.model_name} ({trainer.model.num_params():,} parameters) on {config.dataset} "
               f"with {config.optimizer} lr={config.resolved_lr:g} for {config.steps} steps on "
               f"{trainer.backend.name} -> {out}", err=True)
    _run_training(trainer, run, config.steps, quiet)
    _report_done(out, write_grid=True)


def _report_done(out, write_grid: bool):
    """The done: line (final loss and sample quality) and where the samples are. The grid beside the run is
    written when train created it or it is the run's own earlier grid (never someone else's file)."""
    with _friendly_errors():
        png = write_latest_samples_png(out) if write_grid else None
        numbers = final_numbers(RunFile.open(out).metrics())
    grid = Path(out).with_name(Path(out).stem + "-grid.png")
    final = describe_final(numbers)
    kept = "" if write_grid or not grid_png(out).exists() else \
        f"\n  samples:             {grid_png(out)} is not this run's grid, so it was left as it is"
    click.echo(f"done: {out}" + (f": {final}" if final else "") + (f"\n  samples (EMA, DDIM): {png}" if png else "")
               + kept
               + f"\n  more samples:        minidiff sample {out} --n 64 --out {grid}"
               + f"\n  inspect the run:     minidiff inspect {out}")


@main.command("resume", cls=_OneLineUsageErrors)
@click.argument("run_file", type=RUN_FILE)
@click.option("--steps", type=click.IntRange(min=1), help="Continue to this many steps in total. "
                                                          "[default: the run's planned steps]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def resume_command(run_file, steps, quiet):
    """Continue a run from its checkpoint; bitwise identical to an uninterrupted run on the CPU.

    --steps past the run's planned steps extends the plan: the model and optimizer state equal a run planned that
    long, bit for bit; the file keeps the log, sample and evaluation rows of the old end. Refused when the
    learning-rate schedule depends on the total (cosine, warmup_cosine, a warm-up longer than the plan).

    Exit status: 0 finished, 1 diverged, 2 bad input, 74 machine failure, 130 interrupted (see minidiff --help).
    """
    with _friendly_errors():
        trainer, run = resume_run(run_file, steps)
        until = steps or trainer.config.steps
        if trainer.step >= until:
            run.set_status("finished", f"trained to step {trainer.step}")
            run.close()
            click.echo(f"{run_file} is already at step {trainer.step} (>= {until}); nothing to do")
            return
        write_grid = grid_png_is_the_runs(run_file)
    click.echo(f"resuming {run_file} at step {trainer.step} -> {until}", err=True)
    note = thread_count_note(run, trainer)
    if note:
        click.echo(note, err=True)
    _run_training(trainer, run, until, quiet)
    _report_done(run_file, write_grid)


def _on_terminal() -> bool:
    """Whether stderr is a terminal (a bar) or a log (plain progress lines)."""
    return sys.stderr.isatty()


def _run_training(trainer, run, until, quiet):
    """Train with progress (minidiff.training.progress); every way it can end as its exit status (minidiff --help)."""
    with Progress("train", until, trainer.step, quiet, _on_terminal()) as bar:
        try:
            trainer.train(run, until, progress=lambda step, metrics: bar.update(step, (metrics or {}).get("loss")))
        except TrainingDiverged as exc:
            raise RunDiverged(str(exc)) from None
        except TrainingInterrupted as exc:
            click.echo(f"\n{exc}; continue with: minidiff resume {run.path}", err=True)
            sys.exit(130)
        except (OSError, MemoryError) as exc:   # the machine failed; the run file holds its last good checkpoint
            reason = "out of memory" if isinstance(exc, MemoryError) else storage_error(run.path, exc)
            click.echo(f"\nError: {record_storage_failure(run, trainer, reason)}", err=True)
            sys.exit(EX_IOERR)
    run.close()


@main.command("sample", cls=_OneLineUsageErrors)
@click.argument("run_file", type=RUN_FILE)
@click.option("--n", "n", type=click.IntRange(min=1), default=64, show_default=True, help="Number of samples.")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), help="DDIM steps. [default: 50, or the run's timesteps if fewer]")
@click.option("--eta", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="DDIM eta.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Sample from the EMA weights.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write. [default: RUN_FILE with .png]")
@click.option("--overwrite", is_flag=True, help="Replace an existing PNG.")
def sample_command(run_file, n, sampler, steps, eta, ema, seed, out, overwrite):
    """Sample from a run's checkpoint and write a PNG grid (images) or scatter (2-D points)."""
    out = Path(out or Path(run_file).with_suffix(".png"))
    if out.exists() and not overwrite:
        raise BadInput(f"{out} already exists; pass --overwrite to replace it or --out to choose another")
    with _friendly_errors(), Progress(sampler, steps or 50, on_terminal=_on_terminal()) as bar:
        def progress(i, count):
            if i == 0:  # DDPM runs all T steps, known only once sampling starts
                bar.set_total(count)
            bar.update(i + 1)
        info = sample_png(run_file, out, n=n, sampler=sampler, num_steps=steps, eta=eta, use_ema=ema, seed=seed,
                          progress=progress, overwrite=overwrite)
    click.echo(f"{info['n']} samples from step {info['step']} ({sampler}) -> {out}")


@main.command("inspect", cls=_OneLineUsageErrors)
@click.argument("run_file", type=RUN_FILE)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: config, status, steps and the last finite "
                                                      "value of every metric (vectors as lists).")
def inspect_command(run_file, as_json):
    """Print a run's config, status, progress, last metrics and a loss sparkline."""
    with _friendly_errors():
        click.echo(json.dumps(summary_json(run_file), indent=1) if as_json else summarize(run_file))


@main.command("evaluate", cls=_OneLineUsageErrors)
@click.argument("run_file", type=RUN_FILE)
@click.option("--n", "n", type=click.IntRange(min=2), help="Samples. [default: the run's eval_samples, 256]")
@click.option("--steps", type=click.IntRange(min=1), help="DDIM steps. [default: the run's eval_steps, 25]")
@click.option("--seed", type=click.IntRange(min=0), help="Sampling seed. [default: the run's seed + 3000, as its "
                                                         "own evaluations]")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Sample from the EMA weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate_command(run_file, n, steps, seed, ema, as_json):
    """Sample quality of a run's checkpoint, between its floor (real data) and ceiling (noise) at the same count.

    Digits: Frechet distance in the shipped classifier's feature space; 2-D points: sliced Wasserstein distance.
    The defaults reproduce the run's own last evaluation (metrics fd / swd in the run file).
    """
    with _friendly_errors():
        result = evaluate_run(run_file, n=n, num_steps=steps, seed=seed, use_ema=ema)
    click.echo(json.dumps(result, indent=1) if as_json else format_evaluation(result))


# --- comparison and sweeps ------------------------------------------------------------------------------------------

@main.command("compare", cls=_OneLineUsageErrors)
@click.argument("run_files", nargs=-1, required=True, type=RUN_FILE)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for report.md and figures/.")
@click.option("--label", "labels", multiple=True, help="One per run file, in order. [default: the file names]")
@click.option("--target", type=float, help="val_loss at which the table's steps and seconds to target are read. "
                                           "[default: the largest of the runs' best val_loss: every run reaches it]")
def compare_command(run_files, out, labels, target):
    """Figures and a Markdown report comparing runs (runs differing only by seed are grouped: mean and spread)."""
    with _friendly_errors():
        try:
            report = compare_runs(run_files, out, labels=list(labels) or None, target=target)
        except MissingExtra as exc:
            raise BadInput(str(exc)) from None
    click.echo(f"report: {report}")


@main.command("sweep", cls=_OneLineUsageErrors)
@click.option("--grid", "grid_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON/TOML grid: [base] options, [axes] option = [values] (or {optimizer = [values]}), seeds = N. "
                   "Options below override it.")
@click.option("--optimizer", "optimizers", multiple=True, type=click.Choice(OPTIMIZER_NAMES), help="Repeat to sweep.")
@click.option("--lr", "lrs", multiple=True, type=float, help="Repeat to sweep. [default: per optimizer]")
@click.option("--beta1", "beta1s", multiple=True, type=float, help="Repeat to sweep (Adam family only).")
@click.option("--momentum", "momenta", multiple=True, type=float, help="Repeat to sweep (momentum/nesterov only).")
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds 0..N-1 per point. [default: 1, or the grid's]")
@click.option("--steps", type=click.IntRange(min=1), help="Steps per run.")
@click.option("--dataset", help="Data set for every run.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the run files and reports.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Local processes.")
@click.option("--scheduler", help="Dask scheduler address (tcp://host:8786): run the points on that cluster.")
def sweep_command(grid_file, optimizers, lrs, beta1s, momenta, seeds, steps, dataset, out, workers, scheduler):
    """Train a grid of runs (optimizers x lr x beta1/momentum x seeds), skipping finished ones; report and table."""
    axes = {k: list(v) for k, v in (("optimizer", optimizers), ("lr", lrs), ("beta1", beta1s),
                                    ("momentum", momenta)) if v}
    base = {k: v for k, v in (("steps", steps), ("dataset", dataset)) if v is not None}
    base.setdefault("device", os.environ.get("MINIDIFF_DEVICE", "cpu"))
    with _friendly_errors():
        points = sweep_points(grid_file, base=base, axes=axes, seeds=seeds)  # ValueError: one line, exit 2
        click.echo(f"sweep: {len(points)} runs -> {out}", err=True)

        def progress(done, total, r):
            click.echo(f"[{done}/{total}] {r['name']}: {r['status']} ({r['action']}, {r['seconds']:.0f} s)"
                       + (f" — {r['message']}" if r["status"] not in ("finished",) else ""), err=True)
        try:
            results = run_sweep(points, out, workers=workers, scheduler=scheduler, progress=progress)
        except MissingExtra as exc:
            raise BadInput(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted; run the same command again to resume", err=True)
            sys.exit(130)
    failed = [r for r in results if r["status"] == "error"]
    click.echo(f"done: {out}/results.md, {out}/report.md" + (f" ({len(failed)} point(s) failed)" if failed else ""))


@main.command("bench", cls=_OneLineUsageErrors)
@click.option("--config", "configs", multiple=True, type=click.Choice(list(bench.CONFIGS)),
              help="Repeat to choose several (default: all).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--quick", is_flag=True, help="2 timed repeats after 1 warm-up.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="BLAS and torch threads (default: NumPy's BLAS setting).")
@click.option("--no-torch", is_flag=True, help="Time ours only.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench_command(configs, repeats, warmup, quick, device, threads, no_torch, no_memory, as_json):
    """Time the UNet training step and DDIM sampling side by side with the PyTorch twin."""
    if quick:
        repeats, warmup = bench.QUICK["repeats"], bench.QUICK["warmup"]
    try:
        rows = bench.run_benchmarks(list(configs) or None, repeats=repeats, warmup=warmup, threads=threads,
                                    with_torch=not no_torch, device=device, memory=not no_memory,
                                    progress=lambda msg: click.echo(msg, err=True))
    except (RuntimeError, ValueError) as exc:  # BackendError is a RuntimeError
        raise BadInput(str(exc)) from None
    click.echo(json.dumps(rows, indent=1) if as_json else bench.format_table(rows))


@contextlib.contextmanager
def _friendly_errors():
    """Bad data, a damaged run file, a run another process writes or an unusable device: one line on stderr, exit
    code 2; the machine failing (a full disk, memory): one line, exit code 74. Never a traceback."""
    try:
        yield
    except StorageError as exc:
        _fail(str(exc), EX_IOERR)
    except MemoryError:
        _fail("out of memory (a size the checks let through did not fit after all)", EX_IOERR)
    except (DataError, RunFileError, BackendError, ValueError, KeyError) as exc:
        _fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc), 2)
    except OSError as exc:
        code = EX_IOERR if exc.errno in ENVIRONMENT_ERRNOS else 2
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(where + (exc.strerror or str(exc)), code)


def _fail(message: str, code: int):
    lines = str(message).splitlines()
    click.echo(f"Error: {lines[0] if lines else message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
