"""The momentum study's shipped data: every run file of a study folder -> runs.csv (a row a run) and series.npz (each
run's logged curves), from which scripts/study_report.py draws every table and figure without training.

runs.csv columns: stage, setting, optimizer, lr, momentum, beta1, beta2, momentum_schedule, momentum_final,
bucket_momentum, timestep_sampling, prediction, weighting, batch_size, dataset, seed, steps, status, val_loss and
val_loss_ema (the last validation, raw and EMA weights), fd (digits) or swd (points) at the end, target,
steps_to_target and seconds_to_target (the first validation at or under `target` with the raw weights; the training
wall time there), wall_s (training wall time of the whole run), commit, command (reproduces the run bit for bit at
its commit). series.npz holds, under "<row>/<name>", the curves of row <row> (0-based, runs.csv order).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from minidiff.runs.file import RunFile
from minidiff.study.groups import steps_to_target, wall_times
from minidiff.training.config import TrainConfig

COLUMNS = ["stage", "setting", "optimizer", "lr", "momentum", "beta1", "beta2", "momentum_schedule", "momentum_final",
           "bucket_momentum", "timestep_sampling", "prediction", "weighting", "batch_size", "dataset", "seed", "steps",
           "status", "val_loss", "val_loss_ema", "fd", "swd", "target", "steps_to_target", "seconds_to_target",
           "wall_s", "commit", "command"]
SERIES = ("loss", "val_loss", "val_loss_ema", "val_loss_bucket", "val_loss_ema_bucket", "fd", "swd", "probe_cosine",
          "probe_split_half", "probe_grad_norm", "probe_loss", "momentum")
STAGE_ORDER = ("tune", "main", "shift", "batch-tune-moons", "batch-moons", "batch-tune-digits", "batch-digits",
               "probes")
TARGET_STAGE = {"digits": "main", "moons": "batch-moons"}


def train_command(config: dict) -> str:
    """The `minidiff train` line that trains this config: every option that differs from the default, one BLAS
    thread (the study's runs train on one core each, and the thread count sets how a batch is split)."""
    default = TrainConfig().to_dict()
    args = []
    for key, value in config.items():
        if key in ("device",) or value == default.get(key):
            continue
        if key == "model_options":
            extra = {k: v for k, v in value.items() if k != "base_channels"}
            if extra:
                raise ValueError(f"model option(s) {sorted(extra)} have no command-line flag")
            args.append(f"--base-channels {value['base_channels']}")
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            args.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return "OPENBLAS_NUM_THREADS=1 minidiff train " + " ".join(args) + " --out run.h5"


def _last(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values[-1]) if values.size and math.isfinite(values[-1]) else float("nan")


def read_run(path: Path) -> tuple[dict, dict]:
    """(the row's measured columns, the run's curves) of one run file."""
    run = RunFile.open(path)
    m = run.metrics()
    steps = m["step"]
    series = {"wall_time": wall_times(m), "step": steps}
    for name in SERIES:
        if name in m:
            rows = np.isfinite(m[name]) if m[name].ndim == 1 else np.isfinite(m[name]).all(axis=1)
            series[f"{name}.step"], series[name] = steps[rows], m[name][rows]
    row = {"status": run.status, "val_loss": _last(series.get("val_loss", [])),
           "val_loss_ema": _last(series.get("val_loss_ema", [])), "fd": _last(series.get("fd", [])),
           "swd": _last(series.get("swd", [])), "wall_s": _last(series["wall_time"])}
    return row, series


def targets(rows) -> dict:
    """The validation-loss target of each data set: the largest of the best raw validation losses of its comparison
    stage's finished runs (TARGET_STAGE), rounded up at the third significant digit, so that every such run reaches
    it; runs of other stages are read against the same number and may never reach it."""
    best = {}
    for r in rows:
        if r["status"] == "finished" and r["stage"] == TARGET_STAGE.get(r["dataset"]):
            best.setdefault(r["dataset"], []).append(r["_best"])
    out = {}
    for dataset, values in best.items():
        worst = max(v for v in values if math.isfinite(v))
        scale = 10 ** (math.floor(math.log10(worst)) - 2)
        out[dataset] = float(f"{math.ceil(worst / scale) * scale:.3g}")
    return out


def collect(out: Path, docs: Path, settings=None) -> None:
    """runs.csv and series.npz from every run that has ended (finished or diverged); a run still training or stopped
    part way is left out, so a collect while stages run tabulates only complete runs."""
    rows, curves, unfinished = [], [], []
    for stage in STAGE_ORDER:
        manifest = out / stage / "manifest.json"
        if not manifest.exists():
            continue
        for name, entry in json.loads(manifest.read_text()).items():
            path = out / stage / f"{name}.h5"
            if not path.exists():
                continue
            c = entry["config"]
            measured, series = read_run(path)
            if measured["status"] not in ("finished", "diverged"):
                unfinished.append(f"{stage}/{name}")
                continue
            val = series.get("val_loss", np.zeros(0))
            row = {"stage": stage, "setting": entry["setting"], "optimizer": c["optimizer"], "lr": c["lr"],
                   "momentum": c["momentum"] if c["optimizer"] in ("momentum", "nesterov") else "",
                   "beta1": c["beta1"] if c["optimizer"].startswith(("adam", "nadam")) else "",
                   "beta2": c["beta2"] if c["optimizer"].startswith(("adam", "nadam")) else "",
                   "momentum_schedule": c.get("momentum_schedule", "constant"),
                   "momentum_final": "" if c.get("momentum_final") is None else c["momentum_final"],
                   "bucket_momentum": bool(c.get("bucket_momentum", False)),
                   "timestep_sampling": c["timestep_sampling"], "prediction": c["prediction"],
                   "weighting": c["weighting"], "batch_size": c["batch_size"], "dataset": c["dataset"],
                   "seed": c["seed"], "steps": c["steps"], **measured, "commit": entry["commit"],
                   "command": train_command(c), "_best": float(np.nanmin(val)) if len(val) else float("nan"),
                   "_metrics": series}
            rows.append(row)
    goal = targets(rows)
    for row in rows:
        row["target"] = goal.get(row["dataset"], float("nan"))
        s = row.pop("_metrics")
        step, seconds = steps_to_target({"step": s["step"], "val_loss": _aligned(s, "val_loss"),
                                         "wall_time": s["wall_time"]}, row["target"])
        row["steps_to_target"], row["seconds_to_target"] = ("" if step is None else step), seconds
        row.pop("_best")
        curves.append(s)
    docs.mkdir(parents=True, exist_ok=True)
    with open(docs / "runs.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    flat = {f"{i}/{k}": np.asarray(v) for i, s in enumerate(curves) for k, v in s.items()}
    np.savez_compressed(docs / "series.npz", **flat)
    print(f"{len(rows)} runs -> {docs / 'runs.csv'}, {docs / 'series.npz'} "
          f"({(docs / 'series.npz').stat().st_size / 2**20:.1f} MiB); targets {goal}")
    if unfinished:
        print(f"left out {len(unfinished)} runs that have not ended: {', '.join(unfinished)}")


def _aligned(series: dict, name: str) -> np.ndarray:
    """A metric on the run's full step grid (NaN where it was not logged), as RunFile.metrics() gives it."""
    out = np.full(len(series["step"]), np.nan)
    if name in series:
        out[np.searchsorted(series["step"], series[f"{name}.step"])] = series[name]
    return out


def load(docs: Path) -> tuple[list, dict]:
    """(runs.csv rows with numbers parsed, {row index: {name: array}}) from the shipped files."""
    with open(docs / "runs.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("lr", "momentum", "beta1", "beta2", "momentum_final", "val_loss", "val_loss_ema", "fd", "swd",
                  "target", "steps_to_target", "seconds_to_target", "wall_s"):
            r[k] = float(r[k]) if r[k] not in ("", "None") else float("nan")
        for k in ("batch_size", "seed", "steps"):
            r[k] = int(r[k])
        r["bucket_momentum"] = r["bucket_momentum"] == "True"
    series: dict = {}
    with np.load(docs / "series.npz") as z:
        for key in z.files:
            i, name = key.split("/", 1)
            series.setdefault(int(i), {})[name] = z[key]
    return rows, series
