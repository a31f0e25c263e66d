"""Every table and figure of the momentum study from its shipped data (docs/momentum-study/runs.csv, series.npz,
timing.csv): `python scripts/momentum_study.py report` writes docs/momentum-study/tables.md and the figures beside
it. No training, no run files.

Statistics: a cell is mean ± sample std (ddof 1) over seeds, with n; a difference between two settings is paired by
seed (the same seed means the same initialisation, data order, timesteps and noise), reported as the mean difference
with a 95% t interval over the seeds' differences.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

import study_data
import study_figures
from study_stats import (BATCH_PAIRS, MAIN_ORDER, METRICS, PAIRS, batch_rows, by_seed, cell, mean_sd, paired,
                         probe_summary, select, value_at)

def table(head, body) -> list:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


# --- sections -------------------------------------------------------------------------------------------------------

def tuning_section(rows) -> list:
    out = ["## Tuning (seed 100; score: the EMA weights' validation loss at the end; ✓ = a worse rate on each side)",
           ""]
    body = []
    for stage in sorted({r["stage"] for r in rows if r["stage"].startswith(("tune", "batch-tune"))},
                        key=lambda s: (s != "tune", s)):
        for setting in dict.fromkeys(r["setting"] for r in select(rows, stage)):
            rs = sorted(select(rows, stage, setting=setting), key=lambda r: r["lr"])
            scores = [r["val_loss_ema"] if r["status"] == "finished" else math.inf for r in rs]
            i = int(np.argmin(scores))
            interior = 0 < i < len(rs) - 1 and scores[i - 1] > scores[i] < scores[i + 1]
            grid = ", ".join((f"**{r['lr']:g}**" if j == i else f"{r['lr']:g}") + ":"
                             + (f"{s:.4f}" if math.isfinite(s) else "div") for j, (r, s) in enumerate(zip(rs, scores)))
            body.append([stage, setting, f"{rs[i]['lr']:g}", "✓" if interior else "EDGE", grid])
    return out + table(["stage", "setting", "chosen lr", "interior", "lr: score"], body) + [""]


def main_section(rows) -> list:
    main = select(rows, "main")
    target = main[0]["target"] if main else float("nan")
    out = [f"## Main comparison (digits, batch 128, 1,500 steps, seeds 0-4; target val loss {target:g})", ""]
    body = []
    for s in MAIN_ORDER:
        rs = select(main, setting=s)
        if rs:
            div = sum(r["status"] == "diverged" for r in rs)
            body.append([s, f"{rs[0]['lr']:g}"] + [cell([r[m] for r in rs], f) for m, _, f in METRICS]
                        + [str(div)])
    out += table(["setting", "lr"] + [h for _, h, _ in METRICS] + ["diverged"], body) + [""]
    out += ["### Paired differences (first minus second, by seed; 95% t interval)", ""]
    body = []
    for a, b in PAIRS:
        ra, rb = select(main, setting=a), select(main, setting=b)
        if ra and rb:
            cells = []
            for m, _, f in METRICS[:4]:
                d, lo, hi, n = paired(by_seed(ra, m), by_seed(rb, m))
                cells.append(f"{f.format(d)} [{f.format(lo)}, {f.format(hi)}]" if n > 1 else "—")
            body.append([f"{a} − {b}"] + cells)
    return out + table(["pair"] + [h for _, h, _ in METRICS[:4]], body) + [""]


def ranking_section(rows, series) -> list:
    """The settings' order by mean raw validation loss at several steps: has it stopped moving by the end?"""
    main = select(rows, "main")
    checkpoints = (300, 600, 900, 1200, 1500)
    ranks = {}
    for k in checkpoints:
        means = {}
        for s in MAIN_ORDER:
            vals = [value_at(series[rows.index(r)], "val_loss_ema", k) for r in select(main, setting=s)]
            if vals:
                means[s] = mean_sd(vals)[0]
        ranks[k] = {s: i + 1 for i, s in enumerate(sorted(means, key=lambda s: means[s]))}
    out = ["### Ranking by mean EMA validation loss over training", ""]
    body = [[s] + [str(ranks[k].get(s, "—")) for k in checkpoints] for s in MAIN_ORDER if s in ranks[checkpoints[-1]]]
    return out + table(["setting"] + [f"step {k}" for k in checkpoints], body) + [""]


def shift_section(rows) -> list:
    out = ["## Claim (d): timestep sampling x beta1 (seeds 0-2; EMA validation loss at step 1,500)", ""]
    samplings = ("uniform", "bucket_cycle", "curriculum")
    settings = ("adam b1=0", "adam b1=0.5", "adam b1=0.9", "adam b1=0.99", "adam b1=0.9->0")
    grid = {}
    for sampling in samplings:
        for s in settings:
            rs = [r for r in rows if r["stage"] in ("main", "shift") and r["timestep_sampling"] == sampling
                  and r["setting"] in (s, f"{s} {sampling}") and r["seed"] in (0, 1, 2) and not r["bucket_momentum"]]
            grid[sampling, s] = rs
    body = [[s] + [cell([r["val_loss_ema"] for r in grid[smp, s]], "{:.5f}") for smp in samplings] for s in settings]
    out += table(["beta1"] + list(samplings), body) + [""]
    out += ["Interaction (paired by seed, 95% interval): [L(beta1) − L(0.9)] under a sampling minus the same under "
            "uniform. Negative: that beta1 gains (relative to 0.9) where the timestep mix shifts.", ""]
    body = []
    for s in settings:
        if s == "adam b1=0.9":
            continue
        cells = []
        for sampling in samplings[1:]:
            shifted = {k: by_seed(grid[sampling, s], "val_loss_ema").get(k, math.nan)
                       - by_seed(grid[sampling, "adam b1=0.9"], "val_loss_ema").get(k, math.nan) for k in (0, 1, 2)}
            base = {k: by_seed(grid["uniform", s], "val_loss_ema").get(k, math.nan)
                    - by_seed(grid["uniform", "adam b1=0.9"], "val_loss_ema").get(k, math.nan) for k in (0, 1, 2)}
            d, lo, hi, n = paired(shifted, base)
            cells.append(f"{d:+.5f} [{lo:+.5f}, {hi:+.5f}]" if n > 1 else "—")
        body.append([s] + cells)
    out += table(["beta1", "bucket_cycle", "curriculum"], body) + [""]
    body = []
    for s in ("adam b1=0.9", "adam b1=0.99"):
        per = [r for r in rows if r["stage"] == "shift" and r["setting"] == f"{s} bucket_cycle per-bucket"]
        d, lo, hi, n = paired(by_seed(per, "val_loss_ema"), by_seed(grid["bucket_cycle", s], "val_loss_ema"))
        body.append([s, cell([r["val_loss_ema"] for r in per], "{:.5f}"),
                     cell([r["val_loss_ema"] for r in grid["bucket_cycle", s]], "{:.5f}"),
                     f"{d:+.5f} [{lo:+.5f}, {hi:+.5f}]" if n > 1 else "—"])
    out += ["Per-bucket first moments under bucket_cycle:", ""]
    return out + table(["beta1", "per-bucket moments", "shared", "per-bucket − shared"], body) + [""]


def batch_section(rows) -> list:
    out = ["## Claim (a): momentum's gain against batch size, at equal samples seen", "",
           "Gain = loss without momentum minus loss with it (EMA validation loss at the end), paired by seed, 95% "
           "interval; each (optimizer, batch) at its own tuned rate.", ""]
    body = []
    for dataset in ("moons", "digits"):
        batches = sorted({r["batch_size"] for r in rows if r["stage"] == f"batch-{dataset}"} |
                         ({128} if dataset == "digits" else set()))
        for b in batches:
            cells = []
            for no, yes in BATCH_PAIRS:
                d, lo, hi, n = paired(by_seed(batch_rows(rows, dataset, b, no), "val_loss_ema"),
                                      by_seed(batch_rows(rows, dataset, b, yes), "val_loss_ema"))
                cells.append(f"{d:+.5f} [{lo:+.5f}, {hi:+.5f}] (n={n})" if n > 1 else "—")
            rates = " / ".join(f"{(batch_rows(rows, dataset, b, k) or [{'lr': math.nan}])[0]['lr']:g}"
                               for k in ("sgd", "heavy ball", "adam b1=0", "adam b1=0.9"))
            body.append([dataset, str(b)] + cells + [rates])
    return out + table(["data", "batch", "SGD − heavy ball", "Adam b1 0 − b1 0.9", "lr sgd / hb / a0 / a.9"],
                       body) + [""]


def probes_section(rows, series) -> list:
    out = ["## Claim (c): bucket gradients against their noise (10 buckets, probe batch 512, probes at steps >= 500)",
           "", "cos(a, b): cosine between bucket a's and bucket b's probe gradients (each on the whole probe batch). "
           "Ceilings: the split-half cosine rho of a bucket's gradient with itself (two disjoint halves of its probe "
           "batch), then 2 rho / (1 + rho), the Spearman-Brown step from half to the whole batch: what a bucket's "
           "gradient would reach against an independent draw of itself at the probe's batch size. Corrected: "
           "cos(b0, b9) / sqrt(c0 c9) with c the whole-batch ceilings, Spearman's correction for attenuation: the "
           "cosine the two buckets' expected gradients would have without the probe's sampling noise. It assumes the "
           "two buckets' noise independent, but the probe gives every bucket the same x0 and noise (only t "
           "differs), so nearby buckets share noise and their raw cosines can exceed the ceilings; the correction is "
           "given for the farthest pair only, and is approximate there too.", ""]
    body = []
    for r in select(rows, "probes"):
        cos, half = probe_summary(series[rows.index(r)])
        if cos is None:
            continue
        b = cos.shape[0]
        adjacent = np.mean([cos[i, i + 1] for i in range(b - 1)])
        whole = None if half is None else 2 * half / (1 + half)
        measured = whole is not None and whole[0] > 0 and whole[-1] > 0
        corrected = f"{cos[0, -1] / math.sqrt(whole[0] * whole[-1]):+.2f}" if measured else "—"
        body.append([f"{r['prediction']} / {r['weighting']}", f"{cos[0, -1]:+.2f}", corrected, f"{cos[0, 1]:+.2f}",
                     f"{adjacent:+.2f}", f"{cos[-2, -1]:+.2f}",
                     " ".join(f"{h:.2f}" for h in half) if half is not None else "—",
                     " ".join(f"{c:.2f}" for c in whole) if whole is not None else "—"])
    return out + table(["prediction / weighting", "cos(b0, b9)", "corrected", "cos(b0, b1)", "mean adjacent",
                        "cos(b8, b9)", "split-half b0..b9", "whole-batch ceiling b0..b9"], body) + [""]


def timing_section(docs: Path) -> list:
    path = docs / "timing.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = ["## Claim (e): what momentum costs (median of interleaved rounds)", ""]
    body = [[r["width"], r["optimizer"], r["params"], r["step_ms"], r["optimizer_ms"], r["optimizer_share"],
             r["state_mib"]] for r in rows]
    return out + table(["base channels", "optimizer", "parameters", "step (ms)", "optimizer step (ms)",
                        "share of step", "optimizer state (MiB)"], body) + [""]


def main(docs: Path) -> None:
    rows, series = study_data.load(docs)
    lines = ["# Momentum study, second edition: tables", "",
             "Generated by `python scripts/momentum_study.py report` from runs.csv, series.npz and timing.csv in this "
             "folder. Mean ± sample std over seeds (n); paired differences with 95% t intervals.", ""]
    lines += tuning_section(rows) + main_section(rows) + ranking_section(rows, series) + shift_section(rows)
    lines += batch_section(rows) + probes_section(rows, series) + timing_section(docs)
    (docs / "tables.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    made = study_figures.draw(rows, series, docs)
    print(f"{docs / 'tables.md'}; figures: {', '.join(made)}")
