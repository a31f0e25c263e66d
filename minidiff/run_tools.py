"""What the CLI does with an existing run file: rebuild its model, sample a PNG from it, summarise it as text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .data import save_image_grid
from .runs import RunFile
from .train import Trainer

_SPARKS = "▁▂▃▄▅▆▇█"


def load_trainer(path) -> tuple[Trainer, RunFile]:
    """A Trainer at the run's checkpoint, read-only (for sampling and evaluation)."""
    run = RunFile.open(path, mode="r")
    state = run.load_checkpoint() if run.checkpoint_step is not None else None
    if state is None:
        raise ValueError(f"{path}: the run has no checkpoint yet (nothing to sample from)")
    trainer = Trainer(TrainConfig.from_dict(run.config))
    trainer.load_state_dict(state)
    return trainer, run


def sample_png(path, out, n=64, sampler="ddim", num_steps=50, eta=0.0, use_ema=True, seed=0, progress=None,
               overwrite=False) -> dict:
    """Draw n samples from the run at `path` and write them to the PNG `out`; returns a summary dict."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    trainer, run = load_trainer(path)
    x = trainer.sample(n, num_steps=num_steps, sampler=sampler, eta=eta, seed=seed, use_ema=use_ema,
                       progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    if trainer.dataset.kind == "image":
        save_image_grid(x, out)
    else:
        save_point_scatter(x, trainer.dataset.test, out)
    return {"step": run.checkpoint_step, "n": n, "sampler": sampler, "out": str(out)}


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
    lines = [f"run        {path}",
             f"status     {attrs.get('status')}" + (f" — {attrs['status_message']}" if attrs.get("status_message")
                                                    else ""),
             f"created    {attrs.get('created')}  minidiff {attrs.get('minidiff_version')}  "
             f"backend {attrs.get('backend')}",
             f"steps      {int(steps[-1]) if len(steps) else 0} logged / {config.get('steps')} planned; "
             f"checkpoint at step {run.checkpoint_step}",
             f"samples    at steps {run.sample_steps() or 'none'}",
             "config     " + json.dumps({k: v for k, v in config.items() if v not in ({}, None)}, sort_keys=True)]
    if len(steps):
        last = {k: v[-1] for k, v in metrics.items() if k != "step" and v.ndim == 1}
        lines.append("last       " + "  ".join(f"{k}={_fmt(v)}" for k, v in sorted(last.items())))
        loss = metrics.get("loss")
        if loss is not None:
            lines.append(f"loss       {_fmt(loss[0])} {sparkline(loss)} {_fmt(loss[-1])}")
        if "timestep_loss" in metrics:
            tl = metrics["timestep_loss"][-1]
            lines.append("loss by t  " + " ".join(_fmt(x) for x in tl) + "  (buckets, t = 0 -> T-1)")
    return "\n".join(lines)


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
