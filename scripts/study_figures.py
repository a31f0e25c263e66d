"""The momentum study's figures, drawn from its shipped data (see scripts/study_report.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import study_stats as R


def _figure(w, h):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=110)


def main_curves(rows, series, ax):
    for i, s in enumerate(R.MAIN_ORDER):
        rs = R.select(rows, "main", setting=s)
        curves = [series[rows.index(r)] for r in rs]
        curves = [c for c in curves if "val_loss_ema" in c]
        if not curves:
            continue
        steps = curves[0]["val_loss_ema.step"]
        n = min(len(c["val_loss_ema"]) for c in curves)
        v = np.array([c["val_loss_ema"][:n] for c in curves])
        ax.plot(steps[:n], v.mean(axis=0), color=f"C{i}", label=f"{s} (lr {rs[0]['lr']:g})")
        ax.fill_between(steps[:n], v.min(axis=0), v.max(axis=0), color=f"C{i}", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss, EMA weights")
    ax.set_title("main comparison: mean over seeds 0-4, band min-max")
    ax.legend(fontsize=7)


def paired_forest(rows, ax):
    main = R.select(rows, "main")
    labels, ds, los, his = [], [], [], []
    for a, b in R.PAIRS:
        d, lo, hi, n = R.paired(R.by_seed(R.select(main, setting=a), "val_loss_ema"),
                                R.by_seed(R.select(main, setting=b), "val_loss_ema"))
        if n > 1:
            labels.append(f"{a} − {b}")
            ds.append(d), los.append(lo), his.append(hi)
    y = np.arange(len(labels))
    ax.errorbar(ds, y, xerr=[np.subtract(ds, los), np.subtract(his, ds)], fmt="o", capsize=3)
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("difference in EMA validation loss (negative: first is better)")
    ax.set_title("paired by seed, 95% interval")


def shift_lines(rows, ax):
    settings = ("adam b1=0", "adam b1=0.5", "adam b1=0.9", "adam b1=0.99", "adam b1=0.9->0")
    for j, sampling in enumerate(("uniform", "bucket_cycle", "curriculum")):
        means, sds = [], []
        for s in settings:
            rs = [r for r in rows if r["stage"] in ("main", "shift") and r["timestep_sampling"] == sampling
                  and r["setting"] in (s, f"{s} {sampling}") and r["seed"] in (0, 1, 2) and not r["bucket_momentum"]]
            m, sd, _ = R.mean_sd([r["val_loss_ema"] for r in rs])
            means.append(m), sds.append(sd)
        ax.errorbar(np.arange(len(settings)) + 0.05 * j, means, yerr=sds, fmt="o-", capsize=3, label=sampling)
    ax.set_xticks(range(len(settings)), [s.replace("adam ", "") for s in settings], fontsize=8)
    ax.set_ylabel("EMA validation loss at the end")
    ax.set_title("claim (d): beta1 under three timestep samplings (seeds 0-2, ±1 sd)")
    ax.legend(fontsize=8)


def batch_gain(rows, axes):
    for ax, dataset in zip(axes, ("moons", "digits")):
        batches = sorted({r["batch_size"] for r in rows if r["stage"] == f"batch-{dataset}"} |
                         ({128} if dataset == "digits" else set()))
        for j, (no, yes) in enumerate(R.BATCH_PAIRS):
            pts = [(b, *R.paired(R.by_seed(R.batch_rows(rows, dataset, b, no), "val_loss_ema"),
                                 R.by_seed(R.batch_rows(rows, dataset, b, yes), "val_loss_ema"))) for b in batches]
            pts = [p for p in pts if p[4] > 1]
            if pts:
                b, d, lo, hi, _ = map(np.array, zip(*pts))
                ax.errorbar(b * (1 + 0.05 * j), d, yerr=[d - lo, hi - d], fmt="o-", capsize=3,
                            label=f"{no} − {yes}")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (equal samples seen)")
        if dataset == "moons":
            ax.set_ylabel("momentum's gain in EMA val loss (> 0: helps)")
        ax.set_title(f"claim (a): {dataset}")
        ax.legend(fontsize=7)


def probe_matrices(rows, series, fig):
    probes, im = R.select(rows, "probes"), None
    for k, r in enumerate(probes):
        cos, half = R.probe_summary(series[rows.index(r)])
        if cos is None:
            continue
        ax = fig.add_subplot(2, max(1, math.ceil(len(probes) / 2)), k + 1)
        im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
        if half is not None:
            for i, h in enumerate(half):
                ax.text(i, i, f"{h:.2f}", ha="center", va="center", fontsize=5)
        ax.set_title(f"{r['prediction']} / {r['weighting']}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.6, label="cosine (diagonal: split-half ceiling)")


def draw(rows, series, docs: Path) -> list:
    made = []
    jobs = (("main_curves.png", (8, 5), lambda f: main_curves(rows, series, f.add_subplot())),
            ("paired.png", (8, 4), lambda f: paired_forest(rows, f.add_subplot())),
            ("shift.png", (8, 4.5), lambda f: shift_lines(rows, f.add_subplot())),
            ("batch.png", (10, 4), lambda f: batch_gain(rows, f.subplots(1, 2))),
            ("probes.png", (10, 6), lambda f: probe_matrices(rows, series, f)))
    for name, size, body in jobs:
        fig = _figure(*size)
        body(fig)
        fig.savefig(docs / name, bbox_inches="tight")
        made.append(name)
    return made
