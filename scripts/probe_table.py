"""The probe table of docs/momentum-study.md, from a study's final/ run files.

    python scripts/probe_table.py study/final

Per setting, the mean over its 3 seeds (light-vs-heavy cosine: mean ± sample std) of each seed's probes at steps
600 and 800 (late training), except the last two columns, which average all probes (200-800):
  cos(light b0, heavy b2-b4)  mean cosine between bucket 0's gradient (t < 200) and buckets 2-4's
  cos among heavy b2-b4       mean cosine among buckets 2, 3, 4
  |g| b0 / |g| b4             ratio of the two buckets' mean gradient norms
  B_simple b0 / b4            gradient noise scale of bucket 0 and bucket 4
  cos(g_t, g_t-1), cos(g, momentum)
"""

import sys
from pathlib import Path

import numpy as np

from minidiff.study.groups import load_run

SETTINGS = [("SGD", "sgd-lr=0.3"), ("heavy ball", "momentum-lr=0.1"), ("Nesterov", "nesterov-lr=0.1"),
            ("Adam beta1 0", "adam-lr=0.001-beta1=0.0"), ("Adam beta1 0.5", "adam-lr=0.003-beta1=0.5"),
            ("Adam beta1 0.9", "adam-lr=0.003-beta1=0.9"), ("Adam beta1 0.99", "adam-lr=0.003-beta1=0.99")]
LATE, ALL = {600, 800}, {200, 400, 600, 800}


def rows(metrics, name, steps):
    """The metric's rows logged at `steps` with finite values."""
    s, v = metrics["step"], metrics[name]
    ok = np.isin(s, list(steps)) & (np.isfinite(v) if v.ndim == 1 else np.isfinite(v).all(1))
    return v[ok]


def seed_numbers(metrics, buckets=5):
    cos = rows(metrics, "probe_cosine", LATE).reshape(-1, buckets, buckets)
    norms, noise = rows(metrics, "probe_grad_norm", LATE), rows(metrics, "noise_scale_bucket", LATE)
    align = rows(metrics, "momentum_alignment", ALL).mean() if "momentum_alignment" in metrics else np.nan
    return [cos[:, 0, 2:].mean(), np.mean([cos[:, a, b].mean() for a, b in ((2, 3), (2, 4), (3, 4))]),
            norms[:, 0].mean() / norms[:, -1].mean(), noise[:, 0].mean(), noise[:, -1].mean(),
            rows(metrics, "grad_cos_consecutive", ALL).mean(), align]


def main(final_dir):
    print("| setting | cos(light b0, heavy b2–b4) | cos among heavy b2–b4 | \\|g\\| b0 / \\|g\\| b4 "
          "| B_simple b0 / b4 | cos(g_t, g_t−1) | cos(g, momentum) |")
    print("|---|---|---|---|---|---|---|")
    for label, stem in SETTINGS:
        per_seed = np.array([seed_numbers(load_run(Path(final_dir) / f"{stem}-seed={seed}.h5").metrics)
                             for seed in (0, 1, 2)])
        mu, sd = per_seed.mean(0), per_seed.std(0, ddof=1)
        align = "—" if np.isnan(mu[6]) else f"{mu[6]:+.2f}"
        line = (f"| {label} | {mu[0]:+.2f} ± {sd[0]:.2f} | {mu[1]:.2f} | {mu[2]:.1f} | {mu[3]:.0f} / {mu[4]:.1f} "
                f"| {mu[5]:+.2f} | {align} |")
        print(line.replace("-", "\u2212"))   # the doc's minus sign


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "study/final")
