"""Sweeps: a grid of training configs, one run file per point, run in parallel processes or on a Dask cluster.

    points = expand_grid({"dataset": "moons", "steps": 2000},
                         {"optimizer": ["adam", "nesterov"], "beta1": [0.5, 0.9], "lr": [1e-3, 3e-3]}, seeds=3)
    results = run_sweep(points, "sweeps/moons", workers=2)           # or scheduler="tcp://host:8786"
    # -> sweeps/moons/<name>.h5 per point, report.md + figures/ (compare_runs), results.md / .csv / .json

Restarting a sweep is safe: a point whose run file is "finished" is skipped, a "diverged" one is kept as diverged
(recorded, not retried), a "running"/"interrupted" one with a checkpoint is resumed (bitwise as if never stopped), a
deleted one is run again. A point that fails for any other reason is recorded as "error" and the sweep goes on.

Locally the points run in `ProcessPoolExecutor` workers started with "spawn", each limited to one BLAS thread, so
K workers use K cores. With a scheduler address (or a `distributed.Client`) the same function runs on a Dask
cluster through `client.submit`; the workers need minidiff installed and `out_dir` on a shared file system.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import fields
from pathlib import Path

from minidiff.study.groups import ADAM_FAMILY, MOMENTUM_FAMILY, MissingExtra
from minidiff.study.sweep_results import write_results
from minidiff.training.config import OPTIMIZER_NAMES, TrainConfig, load_config_file
from minidiff.runs.file import RunFile
from minidiff.training.session import resume_run, start_run
from minidiff.training.trainer import TrainingDiverged, TrainingInterrupted

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                         "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_FIELDS = [f.name for f in fields(TrainConfig)]


# --- the grid ---------------------------------------------------------------------------------------------------

def applies(axis: str, optimizer: str) -> bool:
    """Whether a hyperparameter means anything to an optimizer (beta1 only to the Adam family, momentum only to
    heavy-ball and Nesterov, dampening only to heavy-ball, a momentum schedule to any optimizer with momentum, its lr
    compensation to heavy-ball and Nesterov, per-bucket first moments not to sgd or nadam); the others are kept at
    their base value, not multiplied."""
    if axis in ("beta1", "beta2", "eps"):
        return optimizer in ADAM_FAMILY
    if axis == "momentum":
        return optimizer in MOMENTUM_FAMILY
    if axis == "dampening":
        return optimizer == "momentum"
    if axis in ("momentum_schedule", "momentum_final", "bucket_momentum"):
        return optimizer != "sgd" and (axis != "bucket_momentum" or optimizer != "nadam")
    if axis == "momentum_lr_compensation":
        return optimizer in MOMENTUM_FAMILY
    return True


def _values(axis, values, optimizer):
    """An axis' values for one optimizer: a list, a scalar, or {optimizer: list} (e.g. a tuned lr per optimizer)."""
    if isinstance(values, dict):
        unknown = set(values) - set(OPTIMIZER_NAMES)
        if unknown:
            raise ValueError(f"axis {axis!r}: per-optimizer values name unknown optimizer(s) {sorted(unknown)}")
        values = values.get(optimizer)
        if values is None:
            return None
    return list(values) if isinstance(values, (list, tuple)) else [values]


def point_name(optimizer: str, combo: dict, seed: int) -> str:
    """'adam-lr=0.001-beta1=0.9-seed=0': the optimizer, each swept value in TrainConfig's field order (repr of floats,
    so distinct values give distinct names) and the seed; the run file is <name>.h5."""
    parts = [optimizer] + [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in combo.items()]
    name = "-".join(parts + [f"seed={seed}"])
    return "".join(ch if ch.isalnum() or ch in "._=+-" else "_" for ch in name)


def expand_grid(base_config: dict, axes: dict, seeds) -> list:
    """Every meaningful point of optimizers x hyperparameter axes x seeds -> [(name, TrainConfig)], in a fixed order.

    base_config: TrainConfig options shared by all points. axes: {option: [values] | {optimizer: [values]}};
    "optimizer" defaults to the base's. An axis that does not apply to an optimizer (see `applies`) is not
    multiplied for it, and Nesterov with momentum 0 (undefined) is skipped. seeds: a count N (0..N-1) or a list.
    """
    base = {k.replace("-", "_"): v for k, v in dict(base_config).items()}
    axes = {k.replace("-", "_"): v for k, v in dict(axes).items()}
    unknown = sorted((set(base) | set(axes)) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown config option(s) {unknown}")
    if "seed" in axes:
        raise ValueError("give seeds with seeds=/--seeds, not as an axis")
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("a sweep needs at least one seed")
    if isinstance(axes.get("optimizer"), dict):
        raise ValueError("the optimizer axis is a list of optimizer names")
    optimizers = _values("optimizer", axes.get("optimizer", base.get("optimizer", "adam")), None)
    ordered = [k for k in _FIELDS if k in axes and k != "optimizer"]
    points = {}
    for opt in optimizers:
        lists = {k: _values(k, axes[k], opt) for k in ordered if applies(k, opt)}
        lists = {k: v for k, v in lists.items() if v is not None}
        for combo_values in itertools.product(*lists.values()):
            combo = dict(zip(lists, combo_values))
            if opt == "nesterov" and combo.get("momentum", base.get("momentum", 0.9)) == 0:
                continue
            for seed in seeds:
                name = point_name(opt, combo, seed)
                try:
                    points[name] = TrainConfig.from_dict({**base, "optimizer": opt, **combo, "seed": seed})
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"sweep point {name}: {exc}") from None
    return list(points.items())


def load_grid(path) -> dict:
    """A grid file (JSON or TOML): {"base": {options}, "axes": {option: values}, "seeds": N or [..]} -> that dict."""
    grid = load_config_file(path)
    unknown = sorted(set(grid) - {"base", "axes", "seeds"})
    if unknown:
        raise ValueError(f"grid file {path}: unknown key(s) {unknown}; use base, axes and seeds")
    for part in ("base", "axes"):
        if not isinstance(grid.get(part, {}), dict):
            raise ValueError(f"grid file {path}: {part!r} must be a table of option names to values")
        grid[part] = {k.replace("-", "_"): v for k, v in grid.get(part, {}).items()}
    return grid


def sweep_points(grid_file=None, base=None, axes=None, seeds=None) -> list:
    """expand_grid over a grid file's settings overridden by the caller's (the CLI's options): base options are
    merged, an axis given here replaces the file's, seeds given here win (default 1)."""
    grid = load_grid(grid_file) if grid_file else {}
    merged_base = {**grid.get("base", {}), **(base or {})}
    merged_axes = {**grid.get("axes", {}), **(axes or {})}
    return expand_grid(merged_base, merged_axes, seeds if seeds is not None else grid.get("seeds", 1))


# --- one point --------------------------------------------------------------------------------------------------

def _canonical(config: dict) -> str:
    return json.dumps(TrainConfig.from_dict(config).to_dict(), sort_keys=True)


def _bring_to_end(name: str, config: dict, path: Path):
    """Skip, resume, or start the point's run and train it to its last step -> (action, status, message)."""
    cfg = TrainConfig.from_dict(config)
    action = "ran"
    if path.exists():
        run = RunFile.open(path)  # a damaged file raises: it is recorded as an error and left for the user
        if _canonical(run.config) != _canonical(config):
            raise ValueError(f"{path.name} exists with a different config; delete it or sweep into another folder")
        if run.status in ("finished", "diverged"):
            return "skipped", run.status, run.attrs.get("status_message", "")
        if run.checkpoint_step is not None:
            trainer, run = resume_run(path)
            action = "resumed"
        else:
            action = "restarted"
    if action != "resumed":
        trainer, run = start_run(cfg, path, command_line=f"minidiff sweep (point {name})", overwrite=path.exists())
    try:
        trainer.train(run, cfg.steps)
    except TrainingDiverged as exc:
        return action, "diverged", str(exc)
    except TrainingInterrupted as exc:
        return action, "interrupted", str(exc)
    return action, "finished", run.attrs.get("status_message", "")


def run_point(name: str, config: dict, path, limit_threads: bool = False) -> dict:
    """Bring one sweep point to its end; what a worker process or Dask task runs. Never raises for a failed point.

    -> {"name", "path", "status": finished | diverged | interrupted | error, "action": ran | resumed | restarted |
    skipped | failed, "message", "seconds"}. limit_threads: at most one BLAS thread while it trains.
    """
    t0 = time.perf_counter()
    limit = _blas_limit() if limit_threads else contextlib.nullcontext()
    try:
        with limit:
            action, status, message = _bring_to_end(name, config, Path(path))
    except Exception as exc:  # noqa: BLE001 — one bad point must not end the sweep; its error is recorded
        action, status, message = "failed", "error", f"{type(exc).__name__}: {exc}"
    return {"name": name, "path": str(path), "status": status, "action": action, "message": message,
            "seconds": time.perf_counter() - t0}


# --- one BLAS thread per worker ---------------------------------------------------------------------------------

def _blas_limit():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _worker_init():
    """Pool worker start: one BLAS thread (env vars for libraries not loaded yet, threadpoolctl for loaded ones), and
    Ctrl-C ignored between points, so an idle worker survives it (Trainer.train handles it while a point trains)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in BLAS_THREAD_VARIABLES:
        os.environ[var] = "1"
    _blas_limit()  # called, not entered: the limit stays for the worker's life


@contextlib.contextmanager
def _one_thread_env():
    """Workers spawned inside inherit one-thread BLAS settings before they import NumPy; the parent's are restored."""
    saved = {var: os.environ.get(var) for var in BLAS_THREAD_VARIABLES}
    os.environ.update({var: "1" for var in BLAS_THREAD_VARIABLES})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


# --- the sweep --------------------------------------------------------------------------------------------------

def _failed(job, exc) -> dict:
    return {"name": job[0], "path": job[2], "status": "error", "action": "failed",
            "message": f"{type(exc).__name__}: {exc}", "seconds": float("nan")}


def _run_local(jobs, workers, progress) -> list:
    """At most `workers` points in flight, one per worker, and the next submitted only when one ends: after Ctrl-C
    (which reaches the workers too: each running point checkpoints and returns "interrupted") nothing new starts."""
    results, todo, running = [None] * len(jobs), iter(range(len(jobs))), {}
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)

    def submit_next():
        i = next(todo, None)
        if i is not None:
            running[pool.submit(run_point, *jobs[i])] = i

    try:
        with _one_thread_env():  # a spawn pool starts a worker per submit until it has max_workers
            for _ in range(min(workers, len(jobs))):
                submit_next()
        while running:
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                i = running.pop(future)
                try:
                    results[i] = future.result()
                except Exception as exc:  # noqa: BLE001 — a worker died (e.g. killed for memory)
                    results[i] = _failed(jobs[i], exc)
                if progress is not None:
                    progress(sum(r is not None for r in results), len(jobs), results[i])
                submit_next()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _run_dask(jobs, scheduler, progress) -> list:
    try:
        from distributed import Client, as_completed as dask_as_completed
    except ImportError:
        raise MissingExtra("a sweep on a Dask cluster needs dask.distributed: "
                           "pip install 'minidiff[distributed]'") from None
    client = Client(scheduler) if isinstance(scheduler, str) else scheduler
    results = [None] * len(jobs)
    try:
        futures = {client.submit(run_point, *job, limit_threads=True, pure=False): i for i, job in enumerate(jobs)}
        for done, future in enumerate(dask_as_completed(list(futures)), 1):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as exc:  # noqa: BLE001 — a lost worker or a task that could not run
                results[i] = _failed(jobs[i], exc)
            if progress is not None:
                progress(done, len(jobs), results[i])
    finally:
        if isinstance(scheduler, str):
            client.close()
    return results


def run_sweep(points, out_dir, workers: int = 2, scheduler=None, progress=None) -> list:
    """Run every point (from expand_grid) into out_dir/<name>.h5, then write the report and the results table.

    workers: local processes (1 runs the points one after another in this process). scheduler: "tcp://host:port"
    or a distributed.Client to run on a Dask cluster instead. progress(done, total, result) after each point.
    -> one result dict per point, in the points' order (see run_point). Ctrl-C checkpoints the running points and
    raises KeyboardInterrupt; running the same sweep again resumes them.
    """
    out_dir = Path(out_dir).resolve()  # absolute: workers and Dask tasks do not share our working directory
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(name, config.to_dict(), str(out_dir / f"{name}.h5")) for name, config in points]
    if not jobs:
        raise ValueError("the sweep has no points")
    if scheduler is not None:
        results = _run_dask(jobs, scheduler, progress)
    elif workers <= 1:
        results = []
        for done, job in enumerate(jobs, 1):
            results.append(run_point(*job))
            if progress is not None:
                progress(done, len(jobs), results[-1])
            if results[-1]["status"] == "interrupted":  # the Trainer caught Ctrl-C: stop here, as a pool does
                raise KeyboardInterrupt(results[-1]["message"])
    else:
        results = _run_local(jobs, workers, progress)
    write_results(out_dir, results)
    return results
