"""Sizes refused before anything is allocated: what a run's config will need against what the machine has, and image
sizes the UNet cannot halve.

Each estimate is a lower bound of what the program allocates (measured, then rounded down: a training step holds
~75 activations per pixel and base channel of each sample, sampling ~14), so a refusal is certain: a run refused here
could not have fitted, while a run let through may still be tight. The largest part names the option to change:

    batch_size 1000000000000 needs ~2.1 PiB of memory; this machine has 21.4 GiB available
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from minidiff.backend.memory import available_bytes, device_bytes, format_bytes
from minidiff.models import MODELS

TRAIN_ACTIVATIONS = 40    # elements kept per pixel and base channel of a training sample (measured ~75)
SAMPLE_ACTIVATIONS = 8    # elements per pixel and base channel of a sample being drawn (measured ~14)
MLP_TRAIN, MLP_SAMPLE = 8, 4   # elements per hidden unit of a point (measured ~16 and ~9)
SCHEDULE_ARRAYS = 16      # float64 arrays of length T: the schedule's, their temporaries, the t-bucket map
STATE_COPIES = 6          # parameters, gradients, EMA, two optimizer moments, a sampling copy


class SizeError(ValueError):
    """A size this machine cannot hold, or images the model cannot take; one line naming the option."""


def _option(config, name, model_name):
    """A model option as the model will see it (the config's, else the constructor's default)."""
    defaults = {k: p.default for k, p in inspect.signature(MODELS[model_name].__init__).parameters.items()}
    return config.get(name, defaults.get(name))


def check_images_fit_model(model_name: str, model_options: dict, shape) -> None:
    """A UNet halves height and width at every level but the last: they must be multiples of 2 ** (levels - 1).
    Refused rather than padded: a padded image trains a model on a border that the data never had."""
    if model_name != "unet":
        return
    levels = len(tuple(_option(model_options, "channel_mults", model_name)))
    factor = 2 ** (levels - 1)
    h, w = shape[1:]
    if h % factor or w % factor:
        raise SizeError(f"images of {h}x{w} cannot be halved {levels - 1} time(s) by the UNet (channel_mults has "
                        f"{levels} levels): height and width must be multiples of {factor}; crop or pad the images, "
                        f"or use fewer levels")


# the model options whose values the estimates read, and what each must be
_INT_OPTIONS = ("base_channels", "num_res_blocks", "groups", "num_heads", "hidden", "num_blocks", "temb_dim",
                "in_channels", "data_dim")
_LIST_OPTIONS = ("channel_mults", "attention_levels")


def check_model_options(model_options: dict) -> None:
    """SizeError naming a model option of the wrong type (the constructors would fail deep inside with a message
    that names nothing): counts are positive integers, channel_mults and attention_levels lists of integers."""
    for name, value in model_options.items():
        if name in _INT_OPTIONS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SizeError(f"model_options {name} must be a positive integer, got {value!r}")
        if name in _LIST_OPTIONS and (not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
                or (name == "channel_mults" and not value)):
            raise SizeError(f"model_options {name} must be a list of integers >= 0 (channel_mults: not empty), "
                            f"got {value!r}")
        if name == "mid_attention" and not isinstance(value, bool):
            raise SizeError(f"model_options mid_attention must be true or false, got {value!r}")


def _per_sample(model_name, model_options, shape, train: bool) -> float:
    """Elements one sample needs in a training step (train) or while it is drawn."""
    if model_name == "unet":
        pixels = math.prod(shape[1:])
        base = _option(model_options, "base_channels", model_name)
        return pixels * base * (TRAIN_ACTIVATIONS if train else SAMPLE_ACTIVATIONS)
    hidden = _option(model_options, "hidden", model_name)
    return hidden * (MLP_TRAIN if train else MLP_SAMPLE)


def _param_count(model_name, model_options, shape) -> float:
    """A lower bound of the parameter count (a UNet: ~600 base^2 per unit of sum(mult^2) / 5 and res-block depth)."""
    if model_name == "unet":
        base = _option(model_options, "base_channels", model_name)
        mults = tuple(_option(model_options, "channel_mults", model_name))
        depth = _option(model_options, "num_res_blocks", model_name)
        return 600.0 * base * base * sum(m * m for m in mults) / 5.0 * (2 * depth + 1) / 3.0
    hidden = _option(model_options, "hidden", model_name)
    return float(hidden * hidden * _option(model_options, "num_blocks", model_name))


def run_needs(config, shape, model_name, model_options) -> dict:
    """Option description -> bytes it needs at least, for a run of `config` on samples of `shape`."""
    item = np.dtype(config.dtype).itemsize
    per_train = _per_sample(model_name, model_options, shape, True) * item
    per_sample = _per_sample(model_name, model_options, shape, False) * item
    needs = {f"timesteps {config.timesteps}": config.timesteps * 8.0 * SCHEDULE_ARRAYS,
             f"batch_size {config.batch_size}": config.batch_size * per_train,
             f"model_options {model_options}": _param_count(model_name, model_options, shape) * item * STATE_COPIES,
             f"sample_count {config.sample_count}": config.sample_count * per_sample}
    if config.timestep_sampling == "loss_aware":
        needs[f"timesteps {config.timesteps}"] *= 1.5
    if config.eval_every:
        needs[f"eval_samples {config.eval_samples}"] = config.eval_samples * per_sample
    if config.probe_every:
        needs[f"probe_batch {config.probe_batch}"] = config.probe_batch * per_train
    return needs


def _refuse_if_over(needs: dict, backend=None) -> None:
    total = sum(needs.values())
    have = device_bytes(backend)
    have = available_bytes() if have is None else have
    if have is None or total <= have:
        return
    what, most = max(needs.items(), key=lambda kv: kv[1])
    share = "" if most >= 0.9 * total else f" (of ~{format_bytes(total)} in all)"
    raise SizeError(f"{what} needs ~{format_bytes(most)} of memory{share}; this machine has {format_bytes(have)} "
                    "available")


def check_run_fits(config, shape, model_name, model_options, backend=None) -> None:
    """SizeError, before anything of the run is allocated, when the run cannot fit, its images cannot be halved or a
    model option has the wrong type."""
    check_model_options(model_options)
    try:
        if len(shape) == 3:
            check_images_fit_model(model_name, model_options, shape)
        needs = run_needs(config, shape, model_name, model_options)
    except (TypeError, ValueError) as exc:   # malformed model options: the model's constructor names them
        if isinstance(exc, SizeError):
            raise
        return
    _refuse_if_over(needs, backend)


def check_sampling_fits(n: int, model_name, model_config: dict, shape, dtype, backend=None) -> None:
    """SizeError when drawing n samples of `shape` at once cannot fit."""
    per = _per_sample(model_name, model_config, shape, False) * np.dtype(dtype).itemsize
    _refuse_if_over({f"{n} samples": n * (per + 8.0 * math.prod(shape))}, backend)
