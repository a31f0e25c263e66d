"""The command line's plumbing (cli.py holds the commands): the training options as a table, the exit statuses,
one-line errors, and training with progress. What each exit status means: `minidiff --help`."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import click
from click.core import ParameterSource

from minidiff.backend import BackendError
from minidiff.datasets import DATASETS, DataError
from minidiff.diffusion.losses import PREDICTIONS, WEIGHTINGS
from minidiff.diffusion.schedules import SCHEDULES
from minidiff.optim.lr_schedules import LR_SCHEDULES
from minidiff.optim.momentum_schedules import MOMENTUM_SCHEDULES
from minidiff.runs.file import RunFileError, StorageError
from minidiff.runs.layout import ENVIRONMENT_ERRNOS, storage_error
from minidiff.training.config import DEFAULT_LR, DEVICES, MODEL_NAMES, OPTIMIZER_NAMES, TIMESTEP_SAMPLING
from minidiff.training.progress import Progress
from minidiff.training.session import record_storage_failure
from minidiff.training.trainer import TrainingDiverged, TrainingInterrupted


class Interruptible(click.Group):
    """Ctrl-C or SIGTERM outside a training loop (which checkpoints first, minidiff.training.trainer): one line and
    exit 130, not click's "Aborted!" with exit 1 (which here means diverged), and not a silent death by SIGTERM."""

    def invoke(self, ctx):
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, raise_interrupt) if in_main else None
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nError: interrupted; a run file is left at its last complete write (minidiff resume "
                       "continues a run)", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


EX_IOERR = 74   # sysexits.h: an error while doing I/O on some file (here: any failure of the machine)
# a run file argument; whether it can be read is minidiff's to say: a denied read is the machine's failure (74)
RUN_FILE = click.Path(exists=True, dir_okay=False, readable=False)


class BadInput(click.ClickException):
    """Bad input found after parsing (a config value, an existing file): one line, exit code 2, like a usage error."""

    exit_code = 2


class RunDiverged(click.ClickException):
    """The run diverged (its file says so and keeps its last good checkpoint): one line, exit code 1."""

    exit_code = 1


class OneLineUsageErrors(click.Command):
    """Usage errors (bad option or value) as one line, exit code 2, no usage block and no traceback."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # without a context, click prints only "Error: <message>"
            raise click.UsageError(f"{exc.format_message()} (see '{ctx.command_path} --help')") from None


# --- training --------------------------------------------------------------------------------------------------------
def train_options(f):
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


def from_file(ctx, name, value, file_values, kind):
    """An option of `train` that is not a TrainConfig field (out, overwrite, quiet): the command line, else the
    --config file, else the default."""
    in_file = file_values.pop(name, None)
    if in_file is None or ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
        return value
    if not isinstance(in_file, kind):
        raise ValueError(f"{name} in the config file must be a {kind.__name__}, got {in_file!r}")
    return in_file


def on_terminal() -> bool:
    """Whether stderr is a terminal (a bar) or a log (plain progress lines)."""
    return sys.stderr.isatty()


def run_training(trainer, run, until, quiet):
    """Train with progress (minidiff.training.progress); every way it can end as its exit status (minidiff --help)."""
    with Progress("train", until, trainer.step, quiet, on_terminal()) as bar:
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


@contextlib.contextmanager
def friendly_errors():
    """Bad data, a damaged run file, a run another process writes or an unusable device: one line on stderr, exit
    code 2; the machine failing (a full disk, memory): one line, exit code 74. Never a traceback."""
    try:
        yield
    except StorageError as exc:
        fail(str(exc), EX_IOERR)
    except MemoryError:
        fail("out of memory (a size the checks let through did not fit after all)", EX_IOERR)
    except (DataError, RunFileError, BackendError, ValueError, KeyError) as exc:
        fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc), 2)
    except OSError as exc:
        code = EX_IOERR if exc.errno in ENVIRONMENT_ERRNOS else 2
        where = f"{exc.filename}: " if exc.filename else ""
        fail(where + (exc.strerror or str(exc)), code)


def fail(message: str, code: int):
    lines = str(message).splitlines()
    click.echo(f"Error: {lines[0] if lines else message}", err=True)
    sys.exit(code)
