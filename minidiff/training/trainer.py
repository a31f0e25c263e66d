"""The training loop: one TrainConfig -> a model trained by a hand-written optimizer, recorded in an HDF5 run file.

Each step: a batch from the seeded data order, t and noise from the seeded host generator, the loss and its gradient
w.r.t. the model output (`diffusion.training_loss`), the hand-derived backward, global-norm clipping, the optimizer
step, the EMA update. Everything random is drawn on the host in a fixed order, so the same config and seed give a
bitwise identical run on the CPU, and a run resumed from a checkpoint continues exactly as if never stopped.

The step never reads a number back from the device: losses and gradient norms are summed on the device and copied
to the host only at log and checkpoint steps, which is also where non-finite values are caught: the loss, the
gradient norm, the parameters, the EMA weights and the optimizer's buffers at a log step (minidiff.training.integrity),
the whole state before a checkpoint is written. A diverged run keeps its last good checkpoint, which was checked the
same way before it was written.
"""

from __future__ import annotations

import contextlib
import inspect
import signal
import threading
import time

import numpy as np

from minidiff.backend import get_backend, to_float, to_numpy
from minidiff.optim.clip import clip_grad_norm, global_norm
from minidiff.training.config import TrainConfig
from minidiff.training.plan import build_lr_schedule, build_momentum_schedule, build_timestep_sampler
from minidiff.datasets import load_dataset
from minidiff.datasets.batches import BatchIterator
from minidiff.diffusion.losses import LossAwareSampler, training_loss
from minidiff.optim.bucket_momentum import BucketMomentum
from minidiff.optim.ema import EMA
from minidiff.instruments.recorder import Instruments
from minidiff.optim.momentum_schedules import momentum_attribute, set_momentum
from minidiff.models import MODELS, build_model
from minidiff.execution import wrap
from minidiff.optim import build_optimizer
from minidiff.diffusion.samplers import ddim_sample, ddpm_sample
from minidiff.diffusion.schedules import make_schedule
from minidiff.runs.validate import nonfinite_leaf
from minidiff.training.integrity import nonfinite_part
from minidiff.training.sizes import check_run_fits, check_sampling_fits

# The run's `grad_norm` is the trainer's mean pre-clip norm over the logging window; the optimizer's diagnostic of the
# same name (|g_t| of the gradient it applied: clipped, at the logged step only) is logged under another name.
OPTIMIZER_RENAMES = {"grad_norm": "applied_grad_norm"}


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm, parameter, EMA weight or optimizer buffer; the run file keeps its last good
    checkpoint."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) or SIGTERM: a checkpoint was written at the last completed step."""


def model_spec(config: TrainConfig, dataset) -> tuple[str, dict]:
    """(registry name, constructor kwargs) of the model the config asks for, sized to the data."""
    name = config.model
    if name == "auto":
        name = "unet" if dataset.kind == "image" else "mlp"
    options = dict(config.model_options)
    if name == "unet":
        if dataset.kind != "image":
            raise ValueError(f"model 'unet' needs image data, but dataset {config.dataset!r} is 2-D points")
        options.setdefault("in_channels", dataset.shape[0])
    else:
        if dataset.kind != "points":
            raise ValueError(f"model 'mlp' needs 2-D point data, but dataset {config.dataset!r} is images")
        options.setdefault("data_dim", dataset.shape[0])
    accepted = inspect.signature(MODELS[name].__init__).parameters
    for key in options:
        if key not in accepted or key in ("self", "dtype", "seed", "device"):
            raise ValueError(f"model {name!r} has no option {key!r}")
    return name, options


@contextlib.contextmanager
def quiet_float_errors():
    """No NumPy overflow/invalid-value warnings: a diverging run says so in one line (non-finite values are caught at
    log and checkpoint steps anyway), and a sweep of many runs does not print pages of them. np.errstate is per
    thread, so runs in threads (a Dask worker) do not disturb each other; minidiff.execution.threads hands the
    setting on to its worker threads."""
    with np.errstate(all="ignore"):
        yield


class Trainer:
    """Holds every piece of a run's state; `train(run, until_step)` advances it and records it."""

    def __init__(self, config: TrainConfig, start_workers: bool = True):
        """start_workers=False: a Trainer only read from (sampling, evaluation) forks no worker processes up front."""
        self.config = config = config.validated()
        self.backend = get_backend(config.device)
        self.dataset = load_dataset(config.dataset, seed=config.seed, holdout=config.holdout,
                                    **config.dataset_options)
        self.model_name, self.model_config = model_spec(config, self.dataset)
        check_run_fits(config, self.dataset.shape, self.model_name, self.model_config, self.backend)
        self.model = wrap(build_model(self.model_name, **self.model_config, dtype=config.dtype, seed=config.seed,
                                      device=self.backend))   # before the optimizer and the EMA take its params
        if start_workers:   # before the optimizer and the EMA allocate (DataParallel.start_workers)
            self.model.start_workers((config.batch_size, *self.dataset.train.shape[1:]))
        self.schedule = make_schedule(config.schedule, config.timesteps)
        T = config.timesteps
        self.timestep_sampler = build_timestep_sampler(config)
        self.optimizer = build_optimizer(config.optimizer, self.model.params, **config.optimizer_hyperparameters())
        self.lr_schedule = build_lr_schedule(config)
        self.momentum_schedule = build_momentum_schedule(config)
        # which coefficient the schedule moves, read while it is still the configured (nonzero) one
        self._momentum_attr = momentum_attribute(self.optimizer) if self.momentum_schedule is not None else None
        self.bucket_momentum = BucketMomentum(self.optimizer, config.timestep_buckets) if config.bucket_momentum \
            else None
        self.ema = EMA(self.model.params, decay=config.ema_decay, warmup=config.ema_warmup)
        # Separate streams: data order, and (t, noise). Sampling for figures uses its own fixed seed.
        self.batches = BatchIterator(self.dataset.train, config.batch_size, seed=config.seed)
        self.rng = np.random.default_rng([config.seed, 1])
        self.step = 0
        self._reset_accumulators()
        self._bucket_of_t = (np.arange(T) * config.timestep_buckets) // T
        self._sampling_model = None
        self.train_time = 0.0  # seconds spent in training steps (not probes, samples or checkpoints), over resumes
        self.instruments = Instruments(self)

    # --- one step --------------------------------------------------------------------------------------------------
    def train_step(self, diagnostics: bool = False):
        """Advance one optimizer step; returns (the optimizer's diagnostics when asked, the instruments' pending
        per-step values), both 0-d device arrays."""
        c, xp = self.config, self.backend.xp
        x0 = self.backend.asarray(next(self.batches), dtype=self.model.dtype)
        self.optimizer.lr = self.lr_schedule(self.step)
        if self.momentum_schedule is not None:
            self._schedule_momentum(self.step)
        out = training_loss(self.model.forward, x0, self.schedule, self.rng, prediction=c.prediction,
                            weighting=c.weighting, min_snr_gamma=c.min_snr_gamma,
                            timestep_sampler=self.timestep_sampler)
        if self.bucket_momentum is not None:   # before the instruments read the buffer the step will use
            self.bucket_momentum.select(self.timestep_sampler.last_bucket)
        grads = self.model.backward(out.dout)
        grad_norm = clip_grad_norm(grads, c.grad_clip) if c.grad_clip else global_norm(grads)
        pending = self.instruments.before_step(self.step + 1, grads)
        diag = self.optimizer.step(grads, diagnostics=diagnostics)
        self.ema.update(self.model.params)
        if isinstance(self.timestep_sampler, LossAwareSampler):  # needs the losses on the host: one sync a step
            self.timestep_sampler.update(out.t, to_numpy(out.per_sample_loss))
        onehot = np.zeros((len(out.t), c.timestep_buckets), dtype=self.model.dtype)
        onehot[np.arange(len(out.t)), self._bucket_of_t[out.t]] = 1.0
        acc = self._acc
        acc["loss"] = acc["loss"] + out.loss
        acc["grad_norm"] = acc["grad_norm"] + grad_norm
        acc["bucket_loss"] = acc["bucket_loss"] + xp.matmul(out.per_sample_loss, self.backend.asarray(onehot))
        acc["bucket_count"] += onehot.sum(axis=0)
        acc["steps"] += 1
        self.step += 1
        return diag, pending

    def _schedule_momentum(self, step: int) -> None:
        """β1 or μ of this step from the momentum schedule; with compensation, the scheduled lr times
        (1 − μ_t) / (1 − μ_0)."""
        set_momentum(self.optimizer, self.momentum_schedule(step), self._momentum_attr)
        if self.config.momentum_lr_compensation:
            self.optimizer.lr = self.optimizer.lr * self.momentum_schedule.lr_factor(step)

    def _reset_accumulators(self):
        xp, dt = self.backend.xp, self.model.dtype
        self._acc = {"loss": xp.zeros((), dtype=dt), "grad_norm": xp.zeros((), dtype=dt),
                     "bucket_loss": xp.zeros(self.config.timestep_buckets, dtype=dt),
                     "bucket_count": np.zeros(self.config.timestep_buckets), "steps": 0,
                     "time": 0.0}

    def collect_metrics(self, diag) -> dict:
        """Host copies of the means since the last collection (this is where the device is synchronised)."""
        acc = self._acc
        n = max(acc["steps"], 1)
        metrics = {"loss": to_float(acc["loss"]) / n, "grad_norm": to_float(acc["grad_norm"]) / n,
                   "lr": float(self.optimizer.lr), "step_time": acc["time"] / n}
        if self.momentum_schedule is not None:
            metrics["momentum"] = float(getattr(self.optimizer, self._momentum_attr))
        counts = acc["bucket_count"]
        with np.errstate(invalid="ignore", divide="ignore"):
            metrics["timestep_loss"] = np.where(counts > 0, to_numpy(acc["bucket_loss"]) / counts, np.nan)
        for key, value in (diag or {}).items():
            if not isinstance(value, dict):   # the optimizer's |g_t| is the applied (clipped) gradient's, at this step
                metrics[OPTIMIZER_RENAMES.get(key, key)] = to_float(value)
        self._reset_accumulators()
        return metrics

    # --- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: host copies, plain numbers, RNG states."""
        acc = self._acc
        return {"step": self.step,
                "params": {k: np.array(to_numpy(v), copy=True) for k, v in self.model.params.items()},
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                "data_order": self.batches.state_dict(), "rng": self.rng.bit_generator.state,
                "timestep_sampler": self.timestep_sampler.state_dict(), "train_time": self.train_time,
                "instruments": self.instruments.state_dict(),
                **({"bucket_momentum": self.bucket_momentum.state_dict()} if self.bucket_momentum else {}),
                "accumulators": {"loss": to_numpy(acc["loss"]), "grad_norm": to_numpy(acc["grad_norm"]),
                                 "bucket_loss": to_numpy(acc["bucket_loss"]),
                                 "bucket_count": acc["bucket_count"].copy(), "steps": acc["steps"],
                                 "time": acc["time"]}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.model.load_params(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.bucket_momentum is not None:
            self.bucket_momentum.load_state_dict(state["bucket_momentum"])
        self.ema.load_state_dict(state["ema"])
        self.batches.load_state_dict(state["data_order"])
        self.rng.bit_generator.state = state["rng"]
        self.timestep_sampler.load_state_dict(state["timestep_sampler"])
        self.train_time = float(state["train_time"])
        if "instruments" in state:  # optional in the run format (training/integrity.OPTIONAL)
            self.instruments.load_state_dict(state["instruments"])
        acc, be = state["accumulators"], self.backend
        self._acc = {"loss": be.asarray(acc["loss"]), "grad_norm": be.asarray(acc["grad_norm"]),
                     "bucket_loss": be.asarray(acc["bucket_loss"]),
                     "bucket_count": np.array(acc["bucket_count"], dtype=np.float64),
                     "steps": int(acc["steps"]), "time": float(acc["time"])}

    # --- sampling --------------------------------------------------------------------------------------------------
    def weights_model(self, use_ema: bool = True):
        """The sampling model (a second model, built on first use) holding the EMA or the raw weights: for forward
        passes outside training (samples, validation) that leave the training model and its tape alone."""
        if self._sampling_model is None:
            self._sampling_model = wrap(build_model(self.model_name, **self.model.config, device=self.backend))
        self._sampling_model.load_params(self.ema.params if use_ema else self.model.params)
        return self._sampling_model

    def sample(self, n: int, num_steps: int = 25, sampler: str = "ddim", eta: float = 0.0, seed: int = 0,
               use_ema: bool = True, progress=None):
        """Samples from the EMA (or raw) weights as a host array in the data's range.

        sampler "ddim" (num_steps steps, eta) or "ddpm" (all T steps, posterior variance); images have x0 clipped to
        [-1, 1] at every step, as DDPM's sampler does.
        """
        check_sampling_fits(n, self.model_name, self.model.config, self.dataset.shape, self.model.dtype, self.backend)
        model = self.weights_model(use_ema)
        common = dict(seed=seed, prediction=self.config.prediction, backend=self.backend, dtype=self.model.dtype,
                      clip_x0=1.0 if self.dataset.kind == "image" else None, progress=progress)
        model_fn = lambda x_t, t: model.forward(x_t, t, cache=False)  # noqa: E731
        shape = (n,) + self.dataset.shape
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ddpm")
        try:
            with quiet_float_errors():
                if sampler == "ddpm":
                    x = ddpm_sample(model_fn, self.schedule, shape, **common)
                else:
                    x = ddim_sample(model_fn, self.schedule, shape, num_steps=num_steps, eta=eta, **common)
                return to_numpy(x)
        finally:
            # between samples its workers would fill with copies of the pages training rewrites (Adam's state,
            # the work buffers): 7.6 -> 12.8 MiB over 40 digits steps. A fork per sampling call costs far less.
            model.stop_workers()

    # --- the loop --------------------------------------------------------------------------------------------------
    def train(self, run, until_step: int, progress=None) -> None:
        """Train to `until_step`, logging, checkpointing and sampling into `run` (a writable RunFile).

        progress(step, metrics_or_None) is called after every step. Raises TrainingDiverged or TrainingInterrupted
        after recording them in the run file; on success the status is "finished". NumPy's floating-point warnings
        are silenced while it runs (quiet_float_errors).
        """
        stop = {"signal": None}

        def handler(signum, frame):
            stop["signal"] = signum  # finish the step in flight: a half-applied optimizer update cannot be saved

        # Python allows handlers only in the main thread (a Dask worker thread gets no signals anyway)
        in_main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        try:
            with quiet_float_errors():
                self._train_until(run, until_step, progress, stop)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        run.set_status("finished", f"trained to step {self.step}")

    def _train_until(self, run, until_step, progress, stop) -> None:
        """The loop of `train`; stop["signal"] is set by its signal handler."""
        c = self.config
        while self.step < until_step:
            t0 = time.perf_counter()
            # Logs and samples follow the run's grid (and its planned end), not where this call stops, so a
            # resumed run records exactly what an uninterrupted one does; the accumulators carry over.
            log_now = (self.step + 1) % c.log_every == 0 or self.step + 1 == c.steps
            diag, pending = self.train_step(diagnostics=log_now)
            elapsed = time.perf_counter() - t0  # CPU wall time; on a GPU the log's sync settles it
            self._acc["time"] += elapsed
            self.train_time += elapsed
            metrics = self.instruments.after_step(self.step, pending)
            if log_now:
                metrics.update(self.collect_metrics(diag), wall_time=self.train_time)
            diverged = nonfinite_part(self, metrics) if log_now else None
            if c.eval_every and not diverged and (self.step % c.eval_every == 0 or self.step == c.steps):
                metrics.update(self.instruments.evaluate())
            val_every = self.instruments.val_every
            if val_every and not diverged and (self.step % val_every == 0 or self.step == c.steps):
                metrics.update(self.instruments.validate())
            if metrics:
                run.log(self.step, **metrics)
                if log_now:  # a rewrite is cheap next to a window of steps: `inspect` and a crash see every log
                    run.flush()
            if diverged:
                self._diverged(run, diverged)
            if self.step % c.sample_every == 0 or self.step == c.steps:
                self._add_samples(run)
            if self.step % c.ckpt_every == 0 or self.step == until_step:
                self.checkpoint(run)
            if progress is not None:
                progress(self.step, metrics if log_now else None)
            if stop["signal"] is not None:
                self.checkpoint(run)
                run.set_status("interrupted", f"stopped by signal {stop['signal']} at step {self.step}")
                raise TrainingInterrupted(f"interrupted at step {self.step}; a checkpoint was written")

    def checkpoint(self, run) -> None:
        state = self.state_dict()
        bad = nonfinite_leaf(state)   # the check every reader makes (minidiff.runs.validate): never write what fails it
        if bad is not None:
            self._diverged(run, f"state ({bad[0]} holds {bad[1]})")
        run.save_checkpoint(state, step=self.step)

    def _add_samples(self, run) -> None:
        if self.dataset.kind != "image":
            return
        images = self.sample(self.config.sample_count, self.config.sample_steps)
        u8 = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
        run.add_samples(self.step, u8, sampler="ddim", num_steps=self.config.sample_steps, eta=0.0, ema=True,
                        seed=0)

    def _diverged(self, run, what: str) -> None:
        kept = (f"the run keeps its last good checkpoint (step {run.checkpoint_step})"
                if run.checkpoint_step is not None else "no checkpoint was written yet, so there is nothing to resume")
        message = (f"training diverged: non-finite {what} by step {self.step}; {kept}. "
                   f"Try a smaller --lr or --grad-clip.")
        run.set_status("diverged", message)
        raise TrainingDiverged(message)
