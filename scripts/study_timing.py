"""Claim (e) of the momentum study: what momentum costs, measured directly. Per optimizer and model width: the
training step's time, the optimizer step's time alone, and the optimizer state's memory; the configurations
interleaved round by round (so a busy machine slows them alike), medians reported. One BLAS thread, as the study's
runs train."""

from __future__ import annotations

import csv
import statistics
import time

import numpy as np

from minidiff.diffusion.losses import training_loss
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import Trainer

OPTIMIZERS = {"sgd": {"optimizer": "sgd", "lr": 0.1}, "heavy ball": {"optimizer": "momentum", "lr": 0.1},
              "nesterov": {"optimizer": "nesterov", "lr": 0.1}, "adam": {"optimizer": "adam", "lr": 1e-3}}
WIDTHS = (8, 16, 32)
ROUNDS = 7


def trainer_for(width, options):
    config = TrainConfig.from_dict({"model_options": {"base_channels": width}, "probe_every": 0, "eval_every": 0,
                                    "val_every": 0, **options})
    trainer = Trainer(config)
    for _ in range(3):
        trainer.train_step()
    return trainer


def grads_of(trainer):
    x0 = trainer.backend.asarray(trainer.dataset.train[:trainer.config.batch_size], dtype=trainer.model.dtype)
    out = training_loss(trainer.model.forward, x0, trainer.schedule, np.random.default_rng(0))
    return trainer.model.backward(out.dout)


def state_bytes(optimizer) -> int:
    def walk(v):
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return int(getattr(v, "nbytes", 0))
    return walk(optimizer.state_dict())


def main(out_csv) -> None:
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        units = {(w, name): trainer_for(w, opts) for w in WIDTHS for name, opts in OPTIMIZERS.items()}
        grads = {key: grads_of(t) for key, t in units.items()}
        step_ms, opt_ms = {k: [] for k in units}, {k: [] for k in units}
        for r in range(ROUNDS):
            for key, t in units.items():
                t0 = time.perf_counter()
                for _ in range(3):
                    t.train_step()
                step_ms[key].append((time.perf_counter() - t0) / 3 * 1e3)
                t0 = time.perf_counter()
                for _ in range(20):
                    t.optimizer.step(grads[key])
                opt_ms[key].append((time.perf_counter() - t0) / 20 * 1e3)
            print(f"round {r + 1}/{ROUNDS}", flush=True)
    with open(out_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["width", "optimizer", "params", "step_ms", "optimizer_ms", "optimizer_share", "state_mib"])
        for (width, name), t in units.items():
            s, o = statistics.median(step_ms[width, name]), statistics.median(opt_ms[width, name])
            w.writerow([width, name, t.model.num_params(), f"{s:.2f}", f"{o:.3f}", f"{o / s:.1%}",
                        f"{state_bytes(t.optimizer) / 2**20:.2f}"])
    print(f"-> {out_csv}")
