"""The momentum study, second edition (docs/momentum-study.md): every stage a resumable command on a 2-core CPU.

    python scripts/momentum_study.py tune   [--out study]   # learning rates on a tuning seed, grids widened until
                                                            # each setting's best rate is interior
    python scripts/momentum_study.py main   [--out study]   # every setting at its rate, 5 reporting seeds
    python scripts/momentum_study.py shift  [--out study]   # timestep sampling x beta1 (claim d)
    python scripts/momentum_study.py batch  [--out study]   # batch size at equal samples seen (claim a)
    python scripts/momentum_study.py probes [--out study]   # bucket gradients with split-half ceilings (claim c)
    python scripts/momentum_study.py timing [--out study]   # step time and optimizer memory (claim e)
    python scripts/momentum_study.py collect [--out study]  # run files -> docs/momentum-study/runs.csv, series.npz
    python scripts/momentum_study.py report                 # tables and figures from the shipped data only

A stage killed at any point continues where it stopped when run again: its points go through `minidiff sweep`'s
machinery, which skips finished runs and resumes interrupted ones. Runs train with one BLAS thread each, two at a
time; each run's `command` in runs.csv (`OPENBLAS_NUM_THREADS=1 minidiff train ...`) reproduces it bit for bit at
its commit. The tuning seed (100) is never reported; reporting seeds are 0-4.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

from minidiff.runs.file import RunFile, RunFileError
from minidiff.study.sweep import run_sweep
from minidiff.training.config import TrainConfig

import study_data
import study_report

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "momentum-study"
TUNE_SEEDS = (100,)
SEEDS = (0, 1, 2, 3, 4)
SHIFT_SEEDS = (0, 1, 2)
BATCH_SEEDS = (0, 1)
MAX_GRID = 9        # rates per setting at most; a best rate still on the edge then is reported as such

# Every digits run: the default UNet, batch 128, 1,500 steps; validation loss every 50 steps on 1,024 fixed held-out
# triples; FD at 1,000 samples only at the end; probes off except in the probes stage.
DIGITS = dict(dataset="digits", model_options={"base_channels": 16}, steps=1500, batch_size=128, log_every=25,
              ckpt_every=500, sample_every=1500, probe_every=0, eval_every=1500, eval_samples=1000, val_every=50,
              val_samples=1024)
TUNE = dict(DIGITS, eval_every=0)   # tuning needs the validation loss only

# setting -> (options, initial learning-rate grid as indices k of the 1-3 ladder: lr = (1 or 3) x 10^(k // 2))
SETTINGS = {
    "sgd": ({"optimizer": "sgd"}, range(-3, 2)),                                   # 0.03 .. 3
    "heavy ball": ({"optimizer": "momentum", "momentum": 0.9}, range(-4, 1)),       # 0.01 .. 1
    "nesterov": ({"optimizer": "nesterov", "momentum": 0.9}, range(-4, 1)),
    "adam b1=0": ({"optimizer": "adam", "beta1": 0.0}, range(-7, -2)),             # 3e-4 .. 3e-2
    "adam b1=0.5": ({"optimizer": "adam", "beta1": 0.5}, range(-7, -2)),
    "adam b1=0.9": ({"optimizer": "adam", "beta1": 0.9}, range(-7, -2)),
    "adam b1=0.99": ({"optimizer": "adam", "beta1": 0.99}, range(-7, -2)),
    "adam b1=0.9 b2=0.99": ({"optimizer": "adam", "beta1": 0.9, "beta2": 0.99}, range(-7, -2)),
}


def ladder(k: int) -> float:
    """The k-th rate of the half-decade ladder ..., 1e-3, 3e-3, 1e-2, ...: (1 or 3) x 10^floor(k / 2)."""
    return float(f"{1 if k % 2 == 0 else 3}e{k // 2}")


def rung(lr: float) -> int:
    """The ladder index of a rate (inverse of `ladder`)."""
    e = math.floor(math.log10(lr) + 1e-9)
    return 2 * e + (1 if lr / 10 ** e > 2 else 0)


# --- points ---------------------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".=+-" else "_" for ch in text.replace(" ", "-"))


def point(setting: str, base: dict, options: dict, lr: float, seed: int):
    """(name, TrainConfig, setting) of one run; the name carries the setting, rate and seed."""
    config = TrainConfig.from_dict({**base, **options, "lr": lr, "seed": seed})
    return f"{slug(setting)}-lr={lr:g}-seed={seed}", config, setting


def sweep(stage: str, out: Path, points, workers: int) -> list:
    """Bring every point to its end in out/<stage>/ (finished runs are skipped, interrupted ones resumed)."""
    folder = out / stage
    manifest = folder / "manifest.json"
    folder.mkdir(parents=True, exist_ok=True)
    known = json.loads(manifest.read_text()) if manifest.exists() else {}
    commit = git_commit()
    for name, config, setting in points:
        entry = known.setdefault(name, {"config": config.to_dict(), "commit": commit, "setting": setting})
        if entry["config"] != config.to_dict():
            raise SystemExit(f"{folder / name}.h5: the stage now asks for another config; use another --out")
    manifest.write_text(json.dumps(known, indent=1))
    t0 = time.time()
    results = run_sweep([(name, config) for name, config, _ in points], folder, workers=workers, progress=progress)
    print(f"{stage}: {len(points)} runs, {time.time() - t0:.0f} s this call", flush=True)
    return results


def progress(done, total, r):
    print(f"[{done}/{total}] {r['name']}: {r['status']} ({r['action']}, {r['seconds']:.0f} s)", flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def score(path: Path) -> float:
    """What tuning minimises: the EMA weights' validation loss at the run's end (inf for a diverged run)."""
    try:
        run = RunFile.open(path)
    except RunFileError:
        return math.inf
    if run.status != "finished":
        return math.inf
    values = run.metrics().get("val_loss_ema")
    if values is None or not len(values) or not math.isfinite(values[-1]):
        return math.inf
    return float(values[-1])


# --- stages ---------------------------------------------------------------------------------------------------------

def tune_grid(stage, out, workers, settings, base, seeds):
    """Each setting on its rate ladder: run the grid, and while the best rate (by `score`, mean over the tuning seeds)
    sits on an edge, add the next rate beyond it and run again. -> {setting: (best lr, {lr: score})}."""
    grids = {name: list(ks) for name, (_, ks) in settings.items()}
    while True:
        points = [point(name, base, opts, ladder(k), s) for name, (opts, _) in settings.items()
                  for k in grids[name] for s in seeds]
        sweep(stage, out, points, workers)
        best, grown = {}, False
        for name, (opts, _) in settings.items():
            scores = {k: sum(score(out / stage / f"{point(name, base, opts, ladder(k), s)[0]}.h5")
                             for s in seeds) / len(seeds) for k in grids[name]}
            k_best = min(grids[name], key=lambda k: (scores[k], k))
            best[name] = (ladder(k_best), {ladder(k): v for k, v in scores.items()})
            if len(grids[name]) >= MAX_GRID:
                continue
            if k_best == min(grids[name]):
                grids[name].insert(0, k_best - 1)
                grown = True
            elif k_best == max(grids[name]):
                grids[name].append(k_best + 1)
                grown = True
        if not grown:
            return best


def tuned_rates(out: Path) -> dict:
    path = out / "tune" / "best.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the tune stage first")
    return {k: v[0] for k, v in json.loads(path.read_text()).items()}


def stage_tune(out, workers):
    best = tune_grid("tune", out, workers, SETTINGS, TUNE, TUNE_SEEDS)
    (out / "tune" / "best.json").write_text(json.dumps(best, indent=1))
    for name, (lr, scores) in best.items():
        print(f"{name}: best lr {lr:g} of " + ", ".join(f"{k:g}: {v:.5f}" for k, v in sorted(scores.items())))


def stage_main(out, workers):
    rates = tuned_rates(out)
    points = [point(name, DIGITS, opts, rates[name], s) for name, (opts, _) in SETTINGS.items()
              for s in SEEDS]
    sweep("main", out, points, workers)


# Claim (d): does a lower beta1 help where the gradient distribution shifts from step to step? Adam at each beta1's
# tuned rate (uniform sampling), under three timestep samplings, plus a beta1 decay (Xu et al.) and per-bucket
# first moments. Uniform sampling with a constant beta1 is the main stage's runs (the same configs: not rerun).
SHIFT_BETAS = ("adam b1=0", "adam b1=0.5", "adam b1=0.9", "adam b1=0.99")
SAMPLINGS = ("uniform", "bucket_cycle", "curriculum")


def shift_points(rates):
    points = []
    for sampling in SAMPLINGS:
        for name in SHIFT_BETAS + ("adam b1=0.9->0",):
            opts = dict(SETTINGS[name][0]) if name in SETTINGS else \
                {"optimizer": "adam", "beta1": 0.9, "momentum_schedule": "cosine", "momentum_final": 0.0}
            if sampling == "uniform" and name in SETTINGS:
                continue   # the main stage's runs
            lr = rates[name] if name in rates else rates["adam b1=0.9"]
            for s in SHIFT_SEEDS:
                points.append(point(f"{name} {sampling}", DIGITS, {**opts, "timestep_sampling": sampling}, lr, s))
    for name in ("adam b1=0.9", "adam b1=0.99"):
        opts = {**SETTINGS[name][0], "timestep_sampling": "bucket_cycle", "bucket_momentum": True}
        points += [point(f"{name} bucket_cycle per-bucket", DIGITS, opts, rates[name], s)
                   for s in SHIFT_SEEDS]
    return points


def stage_shift(out, workers):
    sweep("shift", out, shift_points(tuned_rates(out)), workers)


# Claim (a): momentum's gain against batch size at equal samples seen. Each (optimizer, batch) gets its own rate,
# tuned on the tuning seed around the batch-128 rate scaled (linearly for SGD's step, as the square root for Adam's).
BATCH_OPTS = {"sgd": SETTINGS["sgd"][0], "heavy ball": SETTINGS["heavy ball"][0],
              "adam b1=0": SETTINGS["adam b1=0"][0], "adam b1=0.9": SETTINGS["adam b1=0.9"][0]}
DIGIT_BATCHES = (32, 128, 512)
DIGIT_SAMPLES = 128 * 1500
POINT_BATCHES = (8, 32, 128, 512, 2048)
POINT_SAMPLES = 128 * 2000
POINTS = dict(dataset="moons", probe_every=0, eval_samples=1000, val_samples=1024)


def batch_base(base, batch, samples):
    """`base` at this batch size and the step count that sees `samples` samples: 30 validations, FD/SWD at the end."""
    steps = samples // batch
    return {**base, "batch_size": batch, "steps": steps, "log_every": max(1, min(25, steps // 30)),
            "val_every": max(1, steps // 30), "eval_every": steps, "ckpt_every": steps, "sample_every": steps}


def stage_batch(out, workers):
    rates = tuned_rates(out)
    for dataset, batches, samples, base, ref in (("moons", POINT_BATCHES, POINT_SAMPLES, POINTS, None),
                                                 ("digits", DIGIT_BATCHES, DIGIT_SAMPLES, DIGITS, 128)):
        for batch in batches:
            if batch == ref:
                continue   # the main stage's runs
            b = batch_base(base, batch, samples)
            settings = {}
            for name, opts in BATCH_OPTS.items():
                if dataset == "digits":
                    scale = batch / 128 if opts["optimizer"] != "adam" else math.sqrt(batch / 128)
                    center = rung(rates[name] * scale)
                    ks = range(center - 1, center + 2)       # three rates, widened until the best is interior
                else:
                    ks = range(-6, -1) if opts["optimizer"] == "adam" else range(-4, 1)
                settings[f"{name} {dataset} b={batch}"] = (opts, ks)
            stage = f"batch-tune-{dataset}"
            best = tune_grid(stage, out, workers, settings, b, TUNE_SEEDS)
            (out / stage / f"best-b{batch}.json").write_text(json.dumps(best, indent=1))
            seeds = BATCH_SEEDS if dataset == "digits" else SEEDS[:3]
            sweep(f"batch-{dataset}", out, [point(name, b, opts, best[name][0], s)
                                           for name, (opts, _) in settings.items() for s in seeds], workers)


# Claim (c): gradients at heavy- and light-noise timesteps, read against the probe's own noise: 10 buckets, a
# 512-sample probe batch, split-half ceilings, across predictions and weightings. Adam beta1 0.9 at its tuned rate.
def stage_probes(out, workers):
    rate = tuned_rates(out)["adam b1=0.9"]
    points = []
    for prediction in ("epsilon", "v", "x0"):
        for weighting in ("uniform", "min_snr"):
            opts = {**SETTINGS["adam b1=0.9"][0], "prediction": prediction, "weighting": weighting,
                    "probe_every": min(250, DIGITS["steps"] // 3), "probe_buckets": 10, "probe_batch": 512}
            points.append(point(f"adam b1=0.9 {prediction} {weighting}", DIGITS, opts, rate, 0))
    sweep("probes", out, points, workers)


def stage_timing(out, workers):
    import study_timing
    study_timing.main(DOCS / "timing.csv")


def stage_collect(out, workers):
    study_data.collect(out, DOCS, SETTINGS)


def stage_report(out, workers):
    study_report.main(DOCS)


STAGES = {"tune": stage_tune, "main": stage_main, "shift": stage_shift, "batch": stage_batch,
          "probes": stage_probes, "timing": stage_timing, "collect": stage_collect, "report": stage_report}


def shrink() -> None:
    """--smoke: every stage end to end in a few minutes (tiny runs, two seeds), to check the machinery, not to
    measure anything; its data goes to --docs, never over the shipped data."""
    global SEEDS, SHIFT_SEEDS, BATCH_SEEDS, DIGIT_SAMPLES, POINT_SAMPLES, DIGIT_BATCHES, POINT_BATCHES
    tiny = dict(steps=12, log_every=4, ckpt_every=6, sample_every=12, eval_every=12, eval_samples=16, val_every=4,
                val_samples=32)
    DIGITS.update(tiny)
    TUNE.update(tiny, eval_every=0)
    POINTS.update(eval_samples=16, val_samples=32)
    SEEDS, SHIFT_SEEDS, BATCH_SEEDS = (0, 1), (0, 1), (0, 1)
    DIGIT_BATCHES, POINT_BATCHES = (32, 128), (32, 128)
    DIGIT_SAMPLES, POINT_SAMPLES = 128 * 12, 128 * 12


def main(argv=None):
    global DOCS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--out", default="study", help="folder for the run files (not shipped)")
    parser.add_argument("--docs", default=str(DOCS), help="folder of the shipped data, tables and figures")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help=shrink.__doc__.split(":")[0])
    args = parser.parse_args(argv)
    DOCS = Path(args.docs).resolve()
    if args.smoke:
        shrink()
    t0 = time.time()
    STAGES[args.stage](Path(args.out).resolve(), args.workers)
    print(f"{args.stage}: done in {time.time() - t0:.0f} s at commit {git_commit()}", flush=True)


if __name__ == "__main__":
    main()
