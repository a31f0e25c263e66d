"""What the CLI does beyond parsing: build a TrainConfig from options, rebuild a run's model, sample a PNG from it,
evaluate its sample quality, summarise it as text."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from minidiff.instruments import quality
from minidiff.training.config import TrainConfig
from minidiff.instruments.recorder import eval_seed
from minidiff.datasets import save_image_grid
from minidiff.runs.file import RunFile
from minidiff.runs.lock import holder as writer_of
from minidiff.training.session import open_trainer
from minidiff.training.trainer import Trainer

_SPARKS = "▁▂▃▄▅▆▇█"


def load_trainer(path) -> tuple[Trainer, RunFile]:
    """A Trainer at the run's checkpoint, read-only (for sampling and evaluation), every part of the run checked
    (minidiff.training.session.open_trainer)."""
    return open_trainer(path)


def config_from_options(file_values: dict, options: dict) -> TrainConfig:
    """TrainConfig defaults <- a --config file's values <- the options given on the command line (None = not given).

    base_channels is a shortcut for model_options["base_channels"]; grad_clip 0 means no clipping; the device
    defaults to $MINIDIFF_DEVICE, else cpu. ValueError or TypeError when a value is invalid.
    """
    values, options = dict(file_values), dict(options)
    base_channels = options.pop("base_channels", None)
    if base_channels is None:
        base_channels = values.get("base_channels")
    values.pop("base_channels", None)
    values.update({k: v for k, v in options.items() if v is not None})
    if base_channels is not None:
        values["model_options"] = dict(values.get("model_options", {}), base_channels=base_channels)
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    if values.get("device") is None:
        values["device"] = os.environ.get("MINIDIFF_DEVICE", "cpu")
    return TrainConfig.from_dict(values)


def sample_png(path, out, n=64, sampler="ddim", num_steps=None, eta=0.0, use_ema=True, seed=0, progress=None,
               overwrite=False) -> dict:
    """Draw n samples from the run at `path` and write them to the PNG `out`; returns a summary dict.
    num_steps None: 50 DDIM steps, or the run's timesteps if it has fewer."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    trainer, run = load_trainer(path)
    num_steps = min(50, trainer.config.timesteps) if num_steps is None else num_steps
    x = trainer.sample(n, num_steps=num_steps, sampler=sampler, eta=eta, seed=seed, use_ema=use_ema,
                       progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    if trainer.dataset.kind == "image":
        save_image_grid(x, out)
    else:
        save_point_scatter(x, trainer.dataset.test, out)
    return {"step": run.checkpoint_step, "n": n, "sampler": sampler, "out": str(out)}


def evaluate_run(path, n=None, num_steps=None, seed=None, use_ema=True) -> dict:
    """Sample quality of the run at `path`, with the levels it is read against at the same sample count.

    n DDIM samples (num_steps steps, eta 0) from the checkpoint's EMA (or raw) weights; n, num_steps and seed default
    to the run's own evaluations (eval_samples, eval_steps, its seed + 3000), so a finished run's last logged value is
    reproduced exactly. Returns metric ("fd": Frechet distance to the held-out digits in the shipped classifier's
    feature space, or "swd": sliced Wasserstein distance to the held-out points), value, floor (n real training
    samples: a perfect generator), ceiling (n noise samples: N(0, 1) clipped to [-1, 1] for images, N(0, I) for
    the standardised points) and the settings. ValueError when the data has no metric.
    """
    trainer, run = load_trainer(path)
    c, ds = trainer.config, trainer.dataset
    metric = quality.metric_for(ds)
    if metric is None:
        raise ValueError(f"{path}: no sample-quality metric for dataset {c.dataset!r} ({ds.kind} of shape "
                         f"{ds.shape}); evaluate measures the bundled 8x8 digits (Frechet distance) and point "
                         f"sets (sliced Wasserstein) -- use minidiff sample to look at the samples")
    n = c.eval_samples if n is None else int(n)
    num_steps = c.eval_steps if num_steps is None else int(num_steps)
    seed = eval_seed(c) if seed is None else int(seed)
    if n < 2 or not 1 <= num_steps <= c.timesteps:
        raise ValueError(f"need n >= 2 and 1 <= steps <= {c.timesteps} (the run's timesteps), got n={n}, "
                         f"steps={num_steps}")
    x = trainer.sample(n, num_steps=num_steps, seed=seed, use_ema=use_ema)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: samples from the {'EMA' if use_ema else 'raw'} weights at step "
                         f"{run.checkpoint_step} hold NaN or Inf values; there is no quality to measure")
    if metric == "fd":
        levels = quality.reference_levels(num_samples=n, seed=0)
        value, floor, ceiling, held_out = (quality.digits_fd(x), levels["floor_subsample"], levels["ceiling"],
                                           levels["num_heldout"])
    else:
        value, floor, ceiling = _point_levels(x, ds)
        held_out = len(ds.test)
    return {"run": str(path), "step": run.checkpoint_step, "dataset": c.dataset, "metric": metric, "value": value,
            "floor": floor, "ceiling": ceiling, "n": n, "steps": num_steps, "seed": seed, "ema": bool(use_ema),
            "held_out": held_out}


def _point_levels(x, ds) -> tuple[float, float, float]:
    """(SWD of x, of len(x) training points, of len(x) N(0, I) points) to the held-out points; projections seed 0,
    as minidiff.instruments.recorder uses."""
    if len(ds.test) == 0:
        raise ValueError(f"dataset {ds.name!r} has no held-out points to compare with (holdout is 0)")
    rng = np.random.default_rng(0)
    n = len(x)
    real = ds.train[rng.choice(len(ds.train), size=n, replace=n > len(ds.train))]
    noise = rng.standard_normal((n,) + ds.shape)
    return tuple(quality.sliced_wasserstein(a, ds.test, seed=0) for a in (x, real, noise))


def format_evaluation(r: dict) -> str:
    """The text `minidiff evaluate` prints: the value between its floor and ceiling, each saying what it is."""
    h = r["held_out"]
    what = (f"Frechet distance to the {h} held-out digits in the digits classifier's feature space"
            if r["metric"] == "fd" else f"sliced Wasserstein distance to the {h} held-out points")
    real, noise = ("digits", "noise images") if r["metric"] == "fd" else ("points", "N(0, I) points")
    return "\n".join([
        f"{r['run']} at step {r['step']}, {'EMA' if r['ema'] else 'raw'} weights: {r['n']} DDIM samples "
        f"({r['steps']} steps, seed {r['seed']})",
        f"  {r['metric']:<8}{_fmt(r['value']):>9}  {what}",
        f"  {'floor':<8}{_fmt(r['floor']):>9}  {r['n']} real training {real} (a perfect generator at this count)",
        f"  {'ceiling':<8}{_fmt(r['ceiling']):>9}  {r['n']} {noise}"])


def save_point_scatter(points, reference, out) -> None:
    """Scatter of generated 2-D points over held-out ones (needs matplotlib: pip install 'minidiff[plots]')."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting 2-D samples needs matplotlib: pip install 'minidiff[plots]'") from None
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.7", label="held-out data")
    ax.scatter(points[:, 0], points[:, 1], s=2, c="C3", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def sparkline(values, width: int = 60) -> str:
    """A one-line text picture of a series (log-scaled when it spans more than a decade)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return ""
    if v.size > width:  # mean over equal chunks, so a long run still fits one line
        v = np.array([c.mean() for c in np.array_split(v, width)])
    if v.min() > 0 and v.max() / v.min() > 10:
        v = np.log10(v)
    lo, hi = v.min(), v.max()
    idx = np.zeros(v.size, dtype=int) if hi == lo else np.round((v - lo) / (hi - lo) * (len(_SPARKS) - 1))
    return "".join(_SPARKS[int(i)] for i in idx)


def summarize(path) -> str:
    """The text `minidiff inspect` prints: status, config, progress, last metrics and a loss sparkline."""
    run = RunFile.open(path, mode="r")
    attrs, config, metrics = run.attrs, run.config, run.metrics()
    steps = metrics.get("step", np.zeros(0))
    status = attrs.get("status")
    if status == "running" and writer_of(path) is None:   # killed, or its last status write failed
        status += " (but no process is writing it: it stopped without recording why; minidiff resume continues it)"
    lines = [f"run        {path}",
             f"status     {status}" + (f" — {attrs['status_message']}" if attrs.get("status_message") else ""),
             f"created    {attrs.get('created')}  minidiff {attrs.get('minidiff_version')}  "
             f"backend {attrs.get('backend')}",
             f"steps      {int(steps[-1]) if len(steps) else 0} logged / {config.get('steps')} planned; "
             f"checkpoint at step {run.checkpoint_step}",
             f"samples    at steps {run.sample_steps() or 'none'}",
             "config     " + json.dumps({k: v for k, v in config.items() if v not in ({}, None)}, sort_keys=True)]
    if len(steps):   # a metric the last row did not record (a probe, off its step) is left out, not shown as nan
        last = {k: v[-1] for k, v in metrics.items() if k != "step" and v.ndim == 1 and not np.isnan(v[-1])}
        lines.append("last       " + "  ".join(f"{k}={_fmt(v)}" for k, v in sorted(last.items())))
        loss = metrics.get("loss")
        if loss is not None:
            lines.append(f"loss       {_fmt(loss[0])} {sparkline(loss)} {_fmt(loss[-1])}")
        if "timestep_loss" in metrics:
            tl = metrics["timestep_loss"][-1]
            lines.append("loss by t  " + " ".join(_fmt(x) for x in tl) + "  (buckets, t = 0 -> T-1)")
    return "\n".join(lines)


def last_finite(values: np.ndarray):
    """The last finite value of a metric column: a float for (R,), a list for (R, K) (the last row with any finite
    entry; its non-finite entries as None); None when there is none."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) if values.ndim == 1 else np.isfinite(values).any(axis=1)
    if not ok.any():
        return None
    last = values[np.flatnonzero(ok)[-1]]
    if values.ndim == 1:
        return float(last)
    return [float(x) if math.isfinite(x) else None for x in last.tolist()]


def summary_json(path) -> dict:
    """What `minidiff inspect --json` prints: run, status, status_message, config, steps (planned, checkpoint, last
    logged) and metrics: the last finite value of every logged metric (scalars as numbers, vectors as lists)."""
    run = RunFile.open(path, mode="r")
    attrs, metrics = run.attrs, run.metrics()
    steps = metrics.get("step", np.zeros(0))
    return {"run": str(path), "status": attrs.get("status"), "status_message": attrs.get("status_message", ""),
            "config": run.config,
            "step": {"planned": run.config.get("steps"), "checkpoint": run.checkpoint_step,
                     "last_logged": int(steps[-1]) if len(steps) else None},
            "metrics": {k: last_finite(v) for k, v in sorted(metrics.items()) if k != "step"}}


def _fmt(x) -> str:
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def write_latest_samples_png(path, out=None):
    """Write the run's most recent stored sample grid (taken from the EMA weights during training) as a PNG beside
    the run file; returns the PNG path, or None when the run holds no image samples."""
    run = RunFile.open(path)
    steps = run.sample_steps()
    if not steps:
        return None
    images, _ = run.load_samples(steps[-1])
    out = Path(out) if out else Path(path).with_suffix(".png")
    save_image_grid(images, out)
    return out
