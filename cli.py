"""The `minidiff` command line: parses options and calls into the package; no logic lives here."""

import json
import os
import sys
from pathlib import Path

import click

from minidiff import __version__
from minidiff.bench import benchmark as bench
from minidiff.console import (RUN_FILE, BadInput, Interruptible, OneLineUsageErrors, friendly_errors, from_file,
                              on_terminal, run_training, train_options)
from minidiff.runs.file import RunFile
from minidiff.study import optim_demo
from minidiff.study.compare import compare_runs
from minidiff.study.groups import MissingExtra
from minidiff.study.run_tools import (config_from_options, evaluate_run, format_evaluation, sample_png, summarize,
                                     summary_json, write_latest_samples_png)
from minidiff.study.sweep import run_sweep, sweep_points
from minidiff.training.config import OPTIMIZER_NAMES, default_run_path, load_config_file
from minidiff.training.progress import Progress, describe_final, final_numbers
from minidiff.training.session import grid_png, grid_png_is_the_runs, resume_run, start_run, thread_count_note


@click.group(cls=Interruptible, context_settings={"help_option_names": ["-h", "--help"]})
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


@main.command("optim-demo", cls=OneLineUsageErrors)
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
@main.command("train", cls=OneLineUsageErrors)
@train_options
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
        out = from_file(ctx, "out", out, file_values, str)
        overwrite = from_file(ctx, "overwrite", overwrite, file_values, bool)
        quiet = from_file(ctx, "quiet", quiet, file_values, bool)
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
    with friendly_errors():
        trainer, run = start_run(config, out, command_line=" ".join(sys.argv), overwrite=overwrite,
                                 grid_png=grid_png(out))
    click.echo(f"training {trainer.model_name} ({trainer.model.num_params():,} parameters) on {config.dataset} "
               f"with {config.optimizer} lr={config.resolved_lr:g} for {config.steps} steps on "
               f"{trainer.backend.name} -> {out}", err=True)
    run_training(trainer, run, config.steps, quiet)
    _report_done(out, write_grid=True)


def _report_done(out, write_grid: bool):
    """The done: line (final loss and sample quality) and where the samples are. The grid beside the run is
    written when train created it or it is the run's own earlier grid (never someone else's file)."""
    with friendly_errors():
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


@main.command("resume", cls=OneLineUsageErrors)
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
    with friendly_errors():
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
    run_training(trainer, run, until, quiet)
    _report_done(run_file, write_grid)


@main.command("sample", cls=OneLineUsageErrors)
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
    with friendly_errors(), Progress(sampler, steps or 50, on_terminal=on_terminal()) as bar:
        def progress(i, count):
            if i == 0:  # DDPM runs all T steps, known only once sampling starts
                bar.set_total(count)
            bar.update(i + 1)
        info = sample_png(run_file, out, n=n, sampler=sampler, num_steps=steps, eta=eta, use_ema=ema, seed=seed,
                          progress=progress, overwrite=overwrite)
    click.echo(f"{info['n']} samples from step {info['step']} ({sampler}) -> {out}")


@main.command("inspect", cls=OneLineUsageErrors)
@click.argument("run_file", type=RUN_FILE)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: config, status, steps and the last finite "
                                                      "value of every metric (vectors as lists).")
def inspect_command(run_file, as_json):
    """Print a run's config, status, progress, last metrics and a loss sparkline."""
    with friendly_errors():
        click.echo(json.dumps(summary_json(run_file), indent=1) if as_json else summarize(run_file))


@main.command("evaluate", cls=OneLineUsageErrors)
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
    with friendly_errors():
        result = evaluate_run(run_file, n=n, num_steps=steps, seed=seed, use_ema=ema)
    click.echo(json.dumps(result, indent=1) if as_json else format_evaluation(result))


# --- comparison and sweeps ------------------------------------------------------------------------------------------

@main.command("compare", cls=OneLineUsageErrors)
@click.argument("run_files", nargs=-1, required=True, type=RUN_FILE)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for report.md and figures/.")
@click.option("--label", "labels", multiple=True, help="One per run file, in order. [default: the file names]")
@click.option("--target", type=float, help="val_loss at which the table's steps and seconds to target are read. "
                                           "[default: the largest of the runs' best val_loss: every run reaches it]")
def compare_command(run_files, out, labels, target):
    """Figures and a Markdown report comparing runs (runs differing only by seed are grouped: mean and spread)."""
    with friendly_errors():
        try:
            report = compare_runs(run_files, out, labels=list(labels) or None, target=target)
        except MissingExtra as exc:
            raise BadInput(str(exc)) from None
    click.echo(f"report: {report}")


@main.command("sweep", cls=OneLineUsageErrors)
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
    with friendly_errors():
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


@main.command("bench", cls=OneLineUsageErrors)
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


if __name__ == "__main__":
    main()
