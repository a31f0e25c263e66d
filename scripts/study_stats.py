"""What the momentum study's tables and figures share: selecting rows of runs.csv, seed-paired statistics, reading
a run's curves (see scripts/study_report.py)."""

from __future__ import annotations

import math

import numpy as np

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
MAIN_ORDER = ("sgd", "heavy ball", "nesterov", "adam b1=0", "adam b1=0.5", "adam b1=0.9", "adam b1=0.99",
              "adam b1=0.9 b2=0.99")
REFERENCE = "adam b1=0.9"
PAIRS = (("heavy ball", "sgd"), ("nesterov", "heavy ball"), ("adam b1=0.9", "adam b1=0"),
         ("adam b1=0.5", "adam b1=0"), ("adam b1=0.9", "adam b1=0.5"), ("adam b1=0.99", "adam b1=0.9"),
         ("adam b1=0.9 b2=0.99", "adam b1=0.9"), ("adam b1=0.9", "heavy ball"), ("adam b1=0.9", "nesterov"))
METRICS = (("val_loss_ema", "val loss (EMA)", "{:.5f}"), ("val_loss", "val loss (raw)", "{:.5f}"),
           ("fd", "FD@1000", "{:.1f}"), ("steps_to_target", "steps to target", "{:.0f}"),
           ("seconds_to_target", "s to target", "{:.0f}"))


def mean_sd(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def cell(values, fmt) -> str:
    m, s, n = mean_sd(values)
    if n == 0:
        return "—"
    return f"{fmt.format(m)} ± {fmt.format(s)} (n={n})" if n > 1 else f"{fmt.format(m)} (n=1)"


def paired(a: dict, b: dict) -> tuple[float, float, float, int]:
    """(mean of a[s] - b[s] over the seeds both have, the 95% interval's ends, n) for {seed: value} dicts."""
    d = np.asarray([a[s] - b[s] for s in sorted(set(a) & set(b)) if math.isfinite(a[s] - b[s])])
    if d.size < 2:
        return (float(d.mean()) if d.size else float("nan")), float("nan"), float("nan"), int(d.size)
    half = T975.get(d.size - 1, 1.96) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), int(d.size)


def by_seed(rows, metric) -> dict:
    return {r["seed"]: r[metric] for r in rows}


def select(rows, stage=None, **eq):
    return [r for r in rows if (stage is None or r["stage"] == stage) and all(r[k] == v for k, v in eq.items())]


def value_at(s: dict, name: str, step: int) -> float:
    steps, values = s.get(f"{name}.step"), s.get(name)
    if steps is None or not len(steps):
        return float("nan")
    i = int(np.searchsorted(steps, step))
    return float(values[min(i, len(values) - 1)])


BATCH_PAIRS = (("sgd", "heavy ball"), ("adam b1=0", "adam b1=0.9"))


def batch_rows(rows, dataset, batch, name):
    if dataset == "digits" and batch == 128:
        return select(rows, "main", setting=name, batch_size=128)
    return [r for r in rows if r["stage"] == f"batch-{dataset}" and r["setting"] == f"{name} {dataset} b={batch}"]


def probe_summary(s: dict, late: int = 500):
    """Mean over probes at steps >= late of: the bucket cosine matrix, the split-half ceilings."""
    steps = s.get("probe_cosine.step")
    if steps is None:
        return None, None
    keep = steps >= late
    cos = s["probe_cosine"][keep].mean(axis=0)
    b = int(round(math.sqrt(cos.size)))
    half = s["probe_split_half"][s["probe_split_half.step"] >= late].mean(axis=0) if "probe_split_half" in s else None
    return cos.reshape(b, b), half
