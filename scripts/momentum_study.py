"""The first momentum study (docs/momentum-study.md), reproducible end to end on a 2-core CPU.

    python scripts/momentum_study.py [OUT_DIR]          # default OUT_DIR: study/

Stage 1 tunes the learning rate of each optimizer setting on seed 0 (a small grid, 800 steps each); stage 2 reruns
every setting at its best rate (lowest final training loss) with seeds 0, 1, 2 -- seed 0 is the tuning run itself,
copied across, which the sweep recognises (same config) and skips. Both stages write run files, a compare report and
a results table (mean and spread over seeds) into OUT_DIR/tune and OUT_DIR/final.
"""

import shutil
import sys
from pathlib import Path

from minidiff.study.compare import final_numbers, load_run
from minidiff.training.config import TrainConfig
from minidiff.study.sweep import point_name, run_sweep

# Every run: the default UNet width for the digits, the default batch, an equal step budget.
BASE = dict(dataset="digits", model_options={"base_channels": 16}, steps=800, batch_size=128, log_every=25,
            ckpt_every=400, sample_every=400, probe_every=200, eval_every=400, eval_samples=256)
# (optimizer, extra options) -> learning rates tried. Momentum coefficients are 0.9 for heavy ball and Nesterov.
SETTINGS = {("sgd", ()): [0.03, 0.1, 0.3],
            ("momentum", ()): [0.01, 0.03, 0.1],
            ("nesterov", ()): [0.01, 0.03, 0.1],
            **{("adam", (("beta1", b1),)): [1e-3, 3e-3] for b1 in (0.0, 0.5, 0.9, 0.99)}}
SEEDS = (0, 1, 2)


def points_for(optimizer, extra, lrs, seeds):
    out = []
    for lr in lrs:
        combo = {"lr": lr, **dict(extra)}
        for seed in seeds:
            config = TrainConfig.from_dict({**BASE, "optimizer": optimizer, **combo, "seed": seed})
            out.append((point_name(optimizer, combo, seed), config))
    return out


def progress(done, total, r):
    print(f"[{done}/{total}] {r['name']}: {r['status']} ({r['action']}, {r['seconds']:.0f} s)", flush=True)


def main(out="study"):
    out = Path(out)
    tune = [p for (opt, extra), lrs in SETTINGS.items() for p in points_for(opt, extra, lrs, (0,))]
    run_sweep(tune, out / "tune", workers=2, progress=progress)
    final = []
    (out / "final").mkdir(parents=True, exist_ok=True)
    for (opt, extra), lrs in SETTINGS.items():
        losses = {lr: final_numbers(load_run(out / "tune" / f"{points_for(opt, extra, [lr], (0,))[0][0]}.h5"))
                  ["final_loss"] for lr in lrs}
        best = min(lrs, key=lambda lr: losses[lr] if losses[lr] == losses[lr] else float("inf"))  # NaN: diverged
        print(f"{opt} {dict(extra)}: final loss by lr {losses} -> lr {best}", flush=True)
        points = points_for(opt, extra, [best], SEEDS)
        seed0 = out / "final" / f"{points[0][0]}.h5"
        if not seed0.exists():
            shutil.copy2(out / "tune" / seed0.name, seed0)
        final += points
    run_sweep(final, out / "final", workers=2, progress=progress)


if __name__ == "__main__":
    main(*sys.argv[1:])
