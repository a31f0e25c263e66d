"""TrainConfig: everything that defines a training run, as data. Saved (as JSON) in the run file; rebuilds the run.

Validation lives here, once, so the CLI, `--config` files and Python callers all get the same one-line ValueError that
names the offending option.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from minidiff.diffusion.timesteps import TIMESTEP_SAMPLERS
from minidiff.optim.momentum_schedules import MOMENTUM_SCHEDULES

# Learning rates used when --lr is not given, for the default model (UNet, base_channels 16) on the digits at batch
# 128. Adam's 3e-3 and SGD's 0.3 are the best rates of the momentum study's tuning (docs/momentum-study.md), interior
# to their grids; AdamW and NAdam, not in the study, take Adam's. Momentum's and Nesterov's 0.1 are the first
# edition's; the second edition's tuning puts both at 0.3. They stay at 0.1 because a run file keeps lr = None when
# --lr was not given and resolves it here on every resume: changing an entry would change the rate of such runs
# mid-run. SGD needs a far larger step than Adam: its step is lr * g, Adam's is ~lr per coordinate.
DEFAULT_LR = {"adam": 3e-3, "adamw": 3e-3, "nadam": 3e-3, "sgd": 0.3, "momentum": 0.1, "nesterov": 0.1}
OPTIMIZER_NAMES = tuple(DEFAULT_LR)
MODEL_NAMES = ("auto", "unet", "mlp")
TIMESTEP_SAMPLING = TIMESTEP_SAMPLERS
DEVICES = ("cpu", "gpu", "auto", "strict")
CAPPED_DEFAULTS = {"sample_steps": 25, "timestep_buckets": 10, "probe_buckets": 5, "eval_steps": 25}


@dataclass
class TrainConfig:
    """One training run. `lr=None` means the optimizer's entry in DEFAULT_LR; `model="auto"` picks the UNet for image
    data and the MLP denoiser for 2-D points; `model_options` go to the model's constructor (e.g. base_channels)."""

    # data
    dataset: str = "digits"
    dataset_options: dict = field(default_factory=dict)
    holdout: float = 0.1
    # model
    model: str = "auto"
    model_options: dict = field(default_factory=dict)
    # diffusion
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "epsilon"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    timestep_sampling: str = "uniform"
    curriculum_steps: int | None = None   # curriculum sampling: the step that sees every t (None: half the run)
    # optimizer
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    dampening: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    # momentum over the run (minidiff.optim.momentum_schedules): beta1 (Adam family) or mu (momentum, nesterov)
    momentum_schedule: str = "constant"
    momentum_final: float | None = None
    momentum_lr_compensation: bool = False
    bucket_momentum: bool = False         # one first moment per timestep bucket (needs bucket_cycle sampling)
    # loop
    batch_size: int = 128
    steps: int = 1500
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 500
    sample_count: int = 64
    sample_steps: int | None = None       # None: 25, or timesteps if fewer (so is every None below)
    timestep_buckets: int | None = None   # None: 10
    # study instruments (minidiff.instruments.recorder); 0 turns a kind off
    probe_every: int = 250
    probe_buckets: int | None = None      # None: 5
    probe_batch: int = 64
    noise_scale_micro_batches: int = 4
    eval_every: int = 500
    eval_samples: int = 256
    eval_steps: int | None = None         # None: 25
    val_every: int | None = None          # held-out denoising loss; None: every eval_every steps
    val_samples: int = 1024

    # --- derived ---------------------------------------------------------------------------------------------------
    def __post_init__(self):
        # counts that may not exceed `timesteps` default to their usual value capped at it, so `--timesteps 10`
        # works without also lowering four other options; a value given explicitly is checked, not capped
        t = self.timesteps if isinstance(self.timesteps, int) and self.timesteps >= 2 else None
        for name, default in CAPPED_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default if t is None else min(default, t))

    @property
    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)

    def optimizer_hyperparameters(self) -> dict:
        """The keyword arguments `minidiff.optim.build_optimizer` takes for this optimizer."""
        hyper = {"lr": self.resolved_lr, "weight_decay": self.weight_decay}
        if self.optimizer in ("sgd", "momentum", "nesterov"):
            if self.optimizer != "sgd":
                hyper["momentum"] = self.momentum
            if self.optimizer == "momentum":
                hyper["dampening"] = self.dampening
        else:
            hyper.update(betas=(self.beta1, self.beta2), eps=self.eps)
        return hyper

    # --- (de)serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config option(s) {unknown}")
        return cls(**d).validated()

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes).validated()

    # --- validation ------------------------------------------------------------------------------------------------
    def validated(self) -> "TrainConfig":
        """Return self after checking every option; ValueError naming the first bad one."""
        _choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        _choice("model", self.model, MODEL_NAMES)
        _choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, ("float32", "float64"))
        if self.lr is not None:
            _number("lr", self.lr, lo=0.0, lo_open=True)
        _number("momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        _number("dampening", self.dampening, lo=0.0, hi=1.0)
        _number("beta1", self.beta1, lo=0.0, hi=1.0, hi_open=True)
        _number("beta2", self.beta2, lo=0.0, hi=1.0, hi_open=True)
        _number("eps", self.eps, lo=0.0, lo_open=True)
        _number("weight_decay", self.weight_decay, lo=0.0)
        _number("holdout", self.holdout, lo=0.0, hi=1.0, hi_open=True)
        _number("min_snr_gamma", self.min_snr_gamma, lo=0.0, lo_open=True)
        _number("ema_decay", self.ema_decay, lo=0.0, hi=1.0)
        if self.grad_clip is not None:
            _number("grad_clip", self.grad_clip, lo=0.0, lo_open=True)
        _integer("timesteps", self.timesteps, 2)
        for name in ("batch_size", "steps", "log_every", "ckpt_every", "sample_every", "sample_count",
                     "sample_steps", "timestep_buckets"):
            _integer(name, getattr(self, name), 1)
        for name in ("warmup_steps", "probe_every", "eval_every"):
            _integer(name, getattr(self, name), 0)
        for name in ("probe_buckets", "probe_batch", "eval_samples", "eval_steps"):
            _integer(name, getattr(self, name), 1)
        _integer("noise_scale_micro_batches", self.noise_scale_micro_batches, 2)
        if self.probe_buckets > self.timesteps or self.eval_steps > self.timesteps:
            raise ValueError("probe_buckets and eval_steps must not exceed timesteps")
        _integer("seed", self.seed, 0)
        if self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps ({self.sample_steps}) must not exceed timesteps ({self.timesteps})")
        if self.timestep_buckets > self.timesteps:
            raise ValueError(f"timestep_buckets ({self.timestep_buckets}) must not exceed timesteps "
                             f"({self.timesteps})")
        if self.optimizer == "nesterov" and self.momentum <= 0:
            raise ValueError("momentum must be > 0 for the nesterov optimizer")
        for name in ("dataset_options", "model_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        self._validate_study_options()
        return self

    def _validate_study_options(self) -> None:
        """Validation, curriculum, momentum schedule and per-bucket first moments: each refusal one line."""
        if self.val_every is not None:
            _integer("val_every", self.val_every, 0)
        _integer("val_samples", self.val_samples, 1)
        if self.curriculum_steps is not None:
            _integer("curriculum_steps", self.curriculum_steps, 1)
        _choice("momentum_schedule", self.momentum_schedule, MOMENTUM_SCHEDULES)
        if self.momentum_final is not None:
            _number("momentum_final", self.momentum_final, lo=0.0, hi=1.0, hi_open=True)
        for name in ("momentum_lr_compensation", "bucket_momentum"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        scheduled = self.momentum_schedule != "constant"
        if scheduled and self.optimizer == "sgd":
            raise ValueError("momentum_schedule needs an optimizer with momentum; plain sgd has none (use momentum, "
                             "nesterov or the Adam family)")
        if scheduled and self.momentum_final is None:
            raise ValueError(f"momentum_schedule {self.momentum_schedule!r} needs momentum_final (its last value)")
        if scheduled and self.optimizer in ("momentum", "nesterov") and self.momentum <= 0:
            raise ValueError("momentum_schedule needs momentum > 0 to start from (the buffer exists only then)")
        if self.momentum_lr_compensation and self.optimizer not in ("momentum", "nesterov"):
            raise ValueError(f"momentum_lr_compensation keeps heavy ball's and Nesterov's step lr/(1 - mu) constant; "
                             f"{self.optimizer} has no such factor to compensate (Adam's first moment is a normalised "
                             f"average)")
        if self.bucket_momentum and self.optimizer == "sgd":
            raise ValueError("bucket_momentum needs a momentum buffer or Adam's first moment; plain sgd has none")
        if self.bucket_momentum and self.optimizer == "nadam":
            raise ValueError("bucket_momentum does not support nadam (its momentum product runs over all steps)")
        if self.bucket_momentum and self.timestep_sampling != "bucket_cycle":
            raise ValueError(f"bucket_momentum needs timestep_sampling 'bucket_cycle' (one bucket per batch), "
                             f"got {self.timestep_sampling!r}")

    @property
    def resolved_val_every(self) -> int:
        """Steps between held-out validation losses: val_every, or eval_every when it is None; 0 = off."""
        return self.eval_every if self.val_every is None else self.val_every

    @property
    def resolved_curriculum_steps(self) -> int:
        """The curriculum's S: curriculum_steps, or half the run (at least 1)."""
        return self.curriculum_steps if self.curriculum_steps is not None else max(self.steps // 2, 1)


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _number(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        if hi is None:
            raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {span}, got {value!r}")


def _integer(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def load_config_file(path) -> dict:
    """Options from a JSON or TOML file (by extension; keys may use dashes or underscores)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text.decode("utf-8"))
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def default_run_path(config: TrainConfig, folder="runs"):
    """runs/<dataset>-<optimizer>-<UTC time>.h5: a new name every time, so a default run never clobbers another."""
    stem = Path(str(config.dataset)).stem if ("/" in str(config.dataset) or "." in str(config.dataset)) \
        else config.dataset
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(folder) / f"{stem}-{config.optimizer}-{stamp}.h5"
    n = 1
    while path.exists() or os.path.exists(str(path) + ".tmp"):
        n += 1
        path = Path(folder) / f"{stem}-{config.optimizer}-{stamp}-{n}.h5"
    return path
