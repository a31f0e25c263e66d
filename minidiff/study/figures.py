"""The figures of `minidiff compare`: one PNG per group of recorded metrics, drawn from the runs' RunData.

    made, skipped = draw_figures(groups, "cmp/figures")   # groups from minidiff.study.compare.group_runs

Each group of seeds is drawn as its mean with a +-1 sample-std band and a fainter min-max band. A figure whose
metrics no run recorded is skipped, with the reason, for the report to list. matplotlib is an optional extra: it is
imported only when a figure is drawn, on `Figure` objects with the Agg canvas, never through pyplot, so the caller's
(interactive) backend is left alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from minidiff.study.groups import QUALITY_METRICS, MissingExtra, series
from minidiff.datasets import make_grid


def _figure(n_panels, ncols=3, size=(4.4, 3.3)):
    """A Figure (Agg canvas, no pyplot) with n_panels axes in rows of ncols; -> (fig, axes list)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra("minidiff compare draws figures with matplotlib: pip install 'minidiff[plots]'") from None
    ncols = max(1, min(n_panels, ncols))
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _nan_stats(Y):
    """Mean, sample std (ddof=1, as the tables), min, max over axis 0; NaN where no run (std: fewer than two runs)
    has a value, without the all-NaN warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(Y, 0), np.nanstd(Y, 0, ddof=1), np.nanmin(Y, 0), np.nanmax(Y, 0)


def smooth(y, span):
    """Debiased exponential moving average over `span` rows (TensorBoard's smoothing); span <= 1 returns y."""
    if span <= 1:
        return y
    w = 1.0 - 2.0 / (span + 1.0)
    out, acc = np.empty_like(y), 0.0
    for i, v in enumerate(y):
        acc = w * acc + (1.0 - w) * v
        out[i] = acc / (1.0 - w ** (i + 1))
    return out


def stack(runs, name, smoothed=False):
    """Align one metric of several runs on the union of their steps.

    -> (steps (S,), values (n, S[, width]), wall (n, S)), NaN where a run has no value; None if no run has it.
    smoothed: each run's series is EMA-smoothed over len/20 of its rows before aligning.
    """
    got = [(r, series(r, name)) for r in runs]
    got = [(r, s) for r, s in got if s is not None]
    if not got:
        return None
    steps = np.unique(np.concatenate([s for _, (s, _) in got]))
    Y = np.full((len(got), len(steps)) + got[0][1][1].shape[1:], np.nan)
    W = np.full((len(got), len(steps)), np.nan)
    for i, (r, (s, y)) in enumerate(got):
        at = np.searchsorted(steps, s)
        Y[i, at] = smooth(y, len(y) // 20) if smoothed else y
        W[i, at] = r.metrics["wall_time"][np.searchsorted(r.metrics["step"], s)]
    return steps, Y, W


def _log_if_positive(ax, arrays):
    v = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0)
    v = v[np.isfinite(v)]
    if v.size and (v > 0).all() and v.max() / v.min() > 5:
        ax.set_yscale("log")


def _lone_marker(ok) -> dict:
    """A line needs two points: a series with one finite point is drawn as a marker, or it would not show at all."""
    return {"marker": "o", "ms": 4} if np.count_nonzero(ok) == 1 else {}


def _curves(ax, groups, name, x="step", smoothed=False):
    """Mean over each group's seeds with +-1 std and min-max bands; True if anything was drawn."""
    drawn = []
    for g in groups:
        st = stack(g.runs, name, smoothed)
        if st is None:
            continue
        steps, Y, W = st
        xv = steps.astype(np.float64) if x == "step" else _nan_stats(W)[0]
        mean, std, lo, hi = _nan_stats(Y)
        ok = np.isfinite(mean) & np.isfinite(xv)
        ax.plot(xv[ok], mean[ok], color=g.color, label=g.label, lw=1.4, **_lone_marker(ok))
        if len(Y) > 1:
            ax.fill_between(xv[ok], lo[ok], hi[ok], color=g.color, alpha=0.12, lw=0)
            ax.fill_between(xv[ok], np.maximum(mean - std, lo)[ok], (mean + std)[ok], color=g.color, alpha=0.25,
                            lw=0)
        drawn.append(Y)
    _log_if_positive(ax, drawn)
    ax.set(xlabel="step" if x == "step" else "wall time (s)", ylabel=METRIC_LABELS.get(name, name))
    ax.grid(alpha=0.3)
    return bool(drawn)


def _draw_scalars(groups, names):
    fig, axes = _figure(len(names), ncols=2, size=(5.2, 3.6))
    for ax, name in zip(axes, names):
        _curves(ax, groups, name)
        ax.set_title(name)
    axes[0].legend(fontsize="small")
    return fig


def _draw_loss(groups, names):
    fig, axes = _figure(2, ncols=2, size=(5.2, 3.8))
    _curves(axes[0], groups, "loss", smoothed=True)
    if not _curves(axes[1], groups, "loss", x="wall_time", smoothed=True):
        axes[1].set_title("no wall time recorded")
    axes[0].legend(fontsize="small")
    return fig


def _group_stacks(groups, name):
    items = [(g, stack(g.runs, name)) for g in groups]
    return [(g, st[0], _nan_stats(st[1])[0]) for g, st in items if st is not None]


def _edges(steps):
    s = steps.astype(np.float64)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[2 * s[0] - mid[0]], mid, [2 * s[-1] - mid[-1]]])


def _draw_heatmaps(groups, names):
    from matplotlib.colors import LogNorm

    items = _group_stacks(groups, names[0])
    fig, axes = _figure(len(items))
    for ax, (g, steps, M) in zip(axes, items):
        v = M[np.isfinite(M)]
        norm = LogNorm(v.min(), v.max()) if v.size and (v > 0).all() and v.max() > v.min() else None
        mesh = ax.pcolormesh(_edges(steps), np.arange(M.shape[1] + 1) - 0.5, M.T, norm=norm, cmap="magma")
        fig.colorbar(mesh, ax=ax, label=METRIC_LABELS.get(names[0], names[0]))
        ax.set(title=g.label, xlabel="step", ylabel="t bucket (0 = least noise)")
    return fig


def _draw_bucket_lines(groups, names):
    from matplotlib import colormaps

    items = _group_stacks(groups, names[0])
    fig, axes = _figure(len(items))
    for ax, (g, steps, M) in zip(axes, items):
        B = M.shape[1]
        for b in range(B):
            ok = np.isfinite(M[:, b])
            ax.plot(steps[ok], M[ok, b], color=colormaps["viridis"](b / max(B - 1, 1)), label=str(b),
                    **_lone_marker(ok))
        _log_if_positive(ax, [M])
        ax.set(title=g.label, xlabel="step", ylabel=METRIC_LABELS.get(names[0], names[0]))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small", title="t bucket", ncols=2)
    return fig


def _draw_cosines(groups, names):
    items = _group_stacks(groups, "probe_cosine")
    fig, axes = _figure(3 * len(items), ncols=3, size=(3.3, 3.0))
    for i, (g, steps, M) in enumerate(items):
        B = int(round(np.sqrt(M.shape[1])))
        picks = sorted({0, len(steps) // 2, len(steps) - 1})  # early, middle, late
        for j, ax in enumerate(axes[3 * i:3 * i + 3]):
            if j >= len(picks):
                ax.set_visible(False)
                continue
            im = ax.imshow(M[picks[j]].reshape(B, B), vmin=-1, vmax=1, cmap="RdBu_r", origin="lower")
            ax.set_title(f"{g.label}\nstep {steps[picks[j]]}", fontsize="small")
            ax.set(xlabel="t bucket", ylabel="t bucket")
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine of bucket gradients")
    return fig


def _draw_layers(groups, names):
    items = _group_stacks(groups, "layer_update_to_weight")
    width = max(M.shape[1] for _, _, M in items)
    fig, (ax,) = _figure(1, ncols=1, size=(max(6.0, 0.3 * width), 4.2))
    for g, steps, M in items:
        late = _nan_stats(M[len(M) * 2 // 3:])[0]  # the last third of training
        ax.plot(np.arange(len(late)), late, "o-", ms=3, color=g.color, label=g.label)
        layer_names = g.runs[0].layer_names
        if layer_names and len(layer_names) == len(late):
            ax.set_xticks(np.arange(len(late)), layer_names, rotation=90, fontsize="x-small")
    _log_if_positive(ax, [M for _, _, M in items])
    ax.set(xlabel="layer", ylabel="|Δθ| / |θ| (mean over the last third)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _draw_samples(groups, names):

    runs = [r for g in groups for r in g.runs if r.samples is not None]
    fig, axes = _figure(len(runs), ncols=4, size=(3.2, 3.5))
    for ax, r in zip(axes, runs):
        step, images = r.samples
        grid = make_grid(images[:64])
        ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(f"{r.label}\nstep {step}", fontsize="small")
        ax.axis("off")
    return fig


METRIC_LABELS = {"loss": "training loss (EMA-smoothed)", "timestep_loss": "loss", "probe_grad_norm": "|g_bucket|",
                 "noise_scale": "B_simple", "noise_scale_bucket": "B_simple", "grad_norm": "|g| before clipping",
                 "cos_grad_momentum": "cos(g, momentum)", "momentum_alignment": "cos(g, buffer) (probe)",
                 "grad_cos_consecutive": "cos(g_t, g_t-1)", "update_to_weight": "|Δθ| / |θ|",
                 "fd": "Frechet distance (lower is better)", "swd": "sliced Wasserstein (lower is better)"}
ALIGNMENT = ("grad_norm", "cos_grad_momentum", "momentum_alignment", "grad_cos_consecutive", "update_to_weight",
             "momentum")

# (title, file, metrics it draws (any present suffices), drawer, caption)
FIGURES = (
    ("Loss", "loss.png", ("loss",), _draw_loss,
     "Training loss against step and against wall time, EMA-smoothed over 1/20 of each run's log rows."),
    ("Loss per timestep bucket", "timestep_loss.png", ("timestep_loss",), _draw_heatmaps,
     "Mean training loss in each t bucket over training (mean over seeds; bucket 0 = lowest t, least noise)."),
    ("Gradient norm per timestep bucket", "probe_grad_norm.png", ("probe_grad_norm",), _draw_bucket_lines,
     "Probe: the gradient norm of each t bucket's loss on the fixed probe batch."),
    ("Cosine between timestep buckets' gradients", "probe_cosine.png", ("probe_cosine",), _draw_cosines,
     "Probe: cosine similarity of the buckets' gradients early, midway and late (blue: opposing directions)."),
    ("Split-half ceiling per timestep bucket", "probe_split_half.png", ("probe_split_half",), _draw_bucket_lines,
     "Probe: cosine between each bucket's gradient on the two halves of the probe batch, the ceiling its cosines with "
     "other buckets are read against (near 0: the bucket's gradient is mostly noise at this batch size)."),
    ("Gradient noise scale", "noise_scale.png", ("noise_scale",), _draw_scalars,
     "B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) from micro-batches at the same weights."),
    ("Noise scale per timestep bucket", "noise_scale_bucket.png", ("noise_scale_bucket",), _draw_bucket_lines,
     "B_simple of each t bucket's gradient."),
    ("Optimizer dynamics", "alignment.png", ALIGNMENT, _draw_scalars,
     "Pre-clip gradient norm, cosine between the gradient and the momentum buffer (Adam: first moment), between "
     "consecutive gradients, the global update-to-weight ratio, and the scheduled momentum (β1 or μ) if any."),
    ("Update-to-weight ratio per layer", "layer_update_to_weight.png", ("layer_update_to_weight",), _draw_layers,
     "|Δθ|/|θ| of each layer, averaged over the last third of training and over seeds."),
    ("Validation loss", "val_loss.png", ("val_loss", "val_loss_ema"), _draw_scalars,
     "Denoising loss of the raw and the EMA weights on fixed held-out (x0, t, noise) triples, t stratified over the "
     "timestep buckets."),
    ("Validation loss per timestep bucket", "val_loss_bucket.png", ("val_loss_bucket",), _draw_heatmaps,
     "The raw weights' held-out loss in each t bucket over training (mean over seeds; bucket 0 = lowest t)."),
    ("Sample quality", "quality.png", QUALITY_METRICS, _draw_scalars,
     "Quality of EMA samples during training (lower is better)."),
    ("Samples", "samples.png", ("samples",), _draw_samples, "The last stored samples of each run (EMA weights)."),
)


def _present(groups, name) -> bool:
    runs = [r for g in groups for r in g.runs]
    if name == "samples":
        return any(r.samples is not None for r in runs)
    return any(series(r, name) is not None for r in runs)


def draw_figures(groups, fig_dir):
    """Draw every figure the runs' data supports into fig_dir.

    -> (made [(title, "figures/<file>", caption)], skipped [(title, reason)]).
    """
    _figure(1)  # fail early, with the install hint, when matplotlib is missing
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    made, skipped = [], []
    for title, filename, needs, draw, caption in FIGURES:
        present = [n for n in needs if _present(groups, n)]
        if not present:
            what = "image samples (2-D point runs store none)" if needs == ("samples",) else " / ".join(needs)
            skipped.append((title, f"no run records {what}"))
            continue
        fig = draw(groups, present)
        fig.savefig(fig_dir / filename, dpi=100)
        made.append((title, f"{fig_dir.name}/{filename}", caption))
    return made, skipped
