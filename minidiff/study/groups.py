"""Training runs read back for comparison: loading run files, grouping them by config (seeds apart), their series,
final numbers, statistics over seeds, and steps to a validation-loss target.

    runs = [load_run(p) for p in paths]; groups = group_runs(runs); rows = summarize_groups(groups)

Needs only NumPy: a sweep's results table is written from these without matplotlib. minidiff.study.figures draws
from them and minidiff.study.compare writes the report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minidiff.training.config import DEFAULT_LR
from minidiff.runs.file import RunFile

QUALITY_METRICS = ("fd", "swd")     # images: Frechet distance on classifier features; points: sliced Wasserstein
SUMMARY_METRICS = QUALITY_METRICS + ("val_loss", "val_loss_ema")   # best_ and final_ values in the tables
FINAL_ROWS = 5                      # the final loss is the mean of the last this-many logged rows
ADAM_FAMILY = ("adam", "adamw", "nadam")
MOMENTUM_FAMILY = ("momentum", "nesterov")
_SEED_SUFFIX = re.compile(r"[-_.]?(seed|s)[-_=]?\d+$")


class MissingExtra(RuntimeError):
    """An optional dependency (matplotlib, dask.distributed) is not installed; the message says what to install."""


@dataclass
class RunData:
    """One run file read into memory. metrics: RunFile.metrics() plus "wall_time" (seconds, per row)."""

    path: Path
    label: str
    config: dict
    status: str
    message: str
    metrics: dict
    samples: tuple | None       # (step, uint8 images (N, C, H, W)) of the last samples/<step>, or None
    layer_names: list | None


@dataclass
class Group:
    """Runs whose configs are equal except for the seed."""

    label: str
    runs: list
    color: str = "C0"


def load_run(path, label=None) -> RunData:
    run = RunFile.open(path, mode="r")
    metrics = run.metrics()
    metrics["wall_time"] = wall_times(metrics)
    steps = run.sample_steps()
    samples = (steps[-1], run.load_samples(steps[-1])[0]) if steps else None
    attrs = run.attrs
    try:
        layer_names = json.loads(attrs["layer_names"]) if "layer_names" in attrs else None
    except (TypeError, ValueError):
        layer_names = None
    return RunData(Path(path), label or Path(path).stem, run.config, run.status, attrs.get("status_message", ""),
                   metrics, samples, layer_names)


def wall_times(metrics: dict) -> np.ndarray:
    """Seconds since the run started at every row: the logged `wall_time` where present, otherwise the cumulative
    mean step time x the steps since the previous log row; rows in between (probe/eval rows) are interpolated."""
    steps = np.asarray(metrics.get("step", np.zeros(0)), dtype=np.float64)
    if "wall_time" in metrics and np.isfinite(metrics["wall_time"]).any():
        logged = np.asarray(metrics["wall_time"], dtype=np.float64)
    elif "step_time" in metrics:
        st = np.asarray(metrics["step_time"], dtype=np.float64)
        ok = np.isfinite(st)
        logged = np.full(len(steps), np.nan)
        logged[ok] = np.cumsum(st[ok] * np.diff(np.concatenate([[0.0], steps[ok]])))
    else:
        return np.full(len(steps), np.nan)
    ok = np.isfinite(logged)
    if not ok.any():
        return logged
    # the run's clock reads 0 before its first step: rows before the first logged time interpolate from there
    return np.interp(steps, np.concatenate([[0.0], steps[ok]]), np.concatenate([[0.0], logged[ok]]))


def _config_key(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def group_runs(runs) -> list:
    """Group runs that differ only by seed, in order of first appearance; labels lose a trailing seed suffix."""
    by_key = {}
    for r in runs:
        by_key.setdefault(_config_key(r.config), []).append(r)
    groups = []
    for members in by_key.values():
        if len(members) == 1:
            groups.append(Group(members[0].label, members))
            continue
        stripped = {_SEED_SUFFIX.sub("", r.label) for r in members}
        label = stripped.pop() if len(stripped) == 1 and "" not in stripped else describe(members[0].config)
        groups.append(Group(f"{label} ({len(members)} seeds)", members))
    for i, g in enumerate(groups):
        g.color = f"C{i % 10}"
    return groups


def resolved_lr(config: dict) -> float:
    lr = config.get("lr")
    return DEFAULT_LR.get(config.get("optimizer"), float("nan")) if lr is None else float(lr)


def momentum_setting(config: dict) -> str:
    """The optimizer's momentum hyperparameter as text: beta1 for the Adam family, mu for heavy-ball/Nesterov."""
    opt = config.get("optimizer")
    if opt in ADAM_FAMILY:
        return f"β1={config.get('beta1', 0.9):g}"
    if opt in MOMENTUM_FAMILY:
        return f"μ={config.get('momentum', 0.9):g}"
    return "—"


def describe(config: dict) -> str:
    setting = momentum_setting(config)
    return f"{config.get('optimizer')} lr={resolved_lr(config):g}" + ("" if setting == "—" else f" {setting}")


# --- final numbers ----------------------------------------------------------------------------------------------

def series(run: RunData, name: str):
    """(steps, values) of the rows where `name` is finite (all entries finite for a vector metric); None if absent."""
    values = run.metrics.get(name)
    if values is None or len(values) == 0:
        return None
    ok = np.isfinite(values) if values.ndim == 1 else np.isfinite(values).any(axis=1)
    if not ok.any():
        return None
    return run.metrics["step"][ok], values[ok]


def final_numbers(run: RunData) -> dict:
    """steps, wall_time, final_loss (mean of the last FINAL_ROWS logged losses; NaN for a diverged run) and, for each
    quality metric and validation loss present (SUMMARY_METRICS), best_<q> (the lowest) and final_<q> (the last)."""
    m = run.metrics
    out = {"steps": int(m["step"][-1]) if len(m["step"]) else 0,
           "wall_time": float(m["wall_time"][-1]) if len(m["wall_time"]) else float("nan"),
           "final_loss": float("nan")}
    loss = series(run, "loss")
    if loss is not None and run.status != "diverged":
        out["final_loss"] = float(np.mean(loss[1][-FINAL_ROWS:]))
    for q in SUMMARY_METRICS:
        s = series(run, q)
        if s is not None:
            out[f"best_{q}"], out[f"final_{q}"] = float(np.min(s[1])), float(s[1][-1])
    return out


def steps_to_target(metrics: dict, target: float, key: str = "val_loss"):
    """(step, seconds) of the first logged row whose `key` is <= target, or (None, NaN) when no row reaches it.

    metrics: RunFile.metrics() (plus "wall_time" from `wall_times`, as `load_run` gives). seconds is the run's
    training time at that step: the logged wall_time of the row where the run logged one, else (a validation row off
    the log grid) linearly interpolated between the logged rows around it (`wall_times`); NaN if none were logged.
    """
    values = metrics.get(key)
    if values is None or len(values) == 0 or not np.isfinite(target):
        return None, float("nan")
    with np.errstate(invalid="ignore"):
        hit = np.flatnonzero(np.isfinite(values) & (np.asarray(values, dtype=np.float64) <= target))
    if hit.size == 0:
        return None, float("nan")
    row = int(hit[0])
    wall = metrics["wall_time"] if "wall_time" in metrics else wall_times(metrics)
    seconds = float(wall[row]) if len(wall) > row else float("nan")
    return int(metrics["step"][row]), seconds


def default_target(runs, key: str = "val_loss") -> float:
    """The largest of the runs' best (lowest) `key`, diverged runs left out: a target every such run reaches. NaN
    when no run logged the metric."""
    best = [float(np.min(s[1])) for r in runs if r.status != "diverged" and (s := series(r, key)) is not None]
    return max(best) if best else float("nan")


def stats(values) -> dict:
    """mean, sample std, min, max and n of the finite values (None, NaN and inf are dropped).

    std is the sample standard deviation s = sqrt(sum (v_i - mean)^2 / (n - 1)) (ddof=1): with the few seeds a
    study affords, the population std (divide by n) understates the spread by sqrt((n - 1) / n), 18% at n = 3.
    n = 1 gives std NaN (one value has no spread); n = 0 gives NaN everywhere.
    """
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def summarize_groups(groups, target: float | None = None) -> list:
    """One dict per group: label, config (of its first run, seed removed), seeds, status counts, and stats() of
    steps, wall_time, final_loss and best/final quality over the group's non-diverged runs; where any run logged
    val_loss also target (the given one, or `default_target` over all the groups' runs), steps_to_target and
    seconds_to_target (stats over the runs that reached it) and reached_target (how many did)."""
    if target is None:
        target = default_target([r for g in groups for r in g.runs])
    rows = []
    for g in groups:
        finals = [final_numbers(r) for r in g.runs]
        kept = [f for f, r in zip(finals, g.runs) if r.status != "diverged"]
        counts = {}
        for r in g.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        row = {"label": g.label, "config": {k: v for k, v in g.runs[0].config.items() if k != "seed"},
               "seeds": [r.config.get("seed") for r in g.runs], "status": counts,
               "paths": [str(r.path) for r in g.runs]}
        names = ["steps", "wall_time", "final_loss"] + [f"{w}_{q}" for q in SUMMARY_METRICS for w in ("best", "final")]
        for name in names:
            if name in ("steps", "wall_time", "final_loss") or any(name in f for f in finals):
                row[name] = stats([f.get(name) for f in (finals if name in ("steps", "wall_time") else kept)])
        if np.isfinite(target):
            hits = [steps_to_target(r.metrics, target) for r in g.runs if r.status != "diverged"]
            row.update(target=float(target), reached_target=sum(h[0] is not None for h in hits),
                       steps_to_target=stats([h[0] for h in hits]), seconds_to_target=stats([h[1] for h in hits]))
        rows.append(row)
    return rows
