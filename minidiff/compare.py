"""Compare training runs: figures of what the run files recorded, and a Markdown report with the final numbers.

    report = compare_runs(["runs/adam.h5", "runs/sgd.h5"], "cmp")   # cmp/report.md, cmp/figures/*.png

Runs whose configs differ only by `seed` form one group: the curves show the mean over seeds with a band (+-1 std,
and a fainter min-max), the table gives mean +- std [min, max]. Diverged runs are drawn (up to where they diverged)
but left out of the final-number statistics, and counted in the table. A figure whose metrics no run recorded (probes
off, an older or very short run) is skipped and listed in the report with the reason.

matplotlib is an optional extra (`pip install 'minidiff[plots]'`); `summarize_groups` and the loading/grouping
helpers need only NumPy, so a sweep's results table is written without it. Figures are drawn on `Figure` objects
with the Agg canvas, never through pyplot, so the caller's (interactive) backend is left alone.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DEFAULT_LR, TrainConfig
from .runs import RunFile

QUALITY_METRICS = ("fd", "swd")     # images: Frechet distance on classifier features; points: sliced Wasserstein
FINAL_ROWS = 5                      # the final loss is the mean of the last this-many logged rows
ADAM_FAMILY = ("adam", "adamw", "nadam")
MOMENTUM_FAMILY = ("momentum", "nesterov")
_SEED_SUFFIX = re.compile(r"[-_.]?(seed|s)[-_=]?\d+$")


class MissingExtra(RuntimeError):
    """An optional dependency (matplotlib, dask.distributed) is not installed; the message says what to install."""


@dataclass
class RunData:
    """One run file read into memory. metrics: RunFile.metrics() plus "wall_time" (seconds, per row)."""

    path: Path
    label: str
    config: dict
    status: str
    message: str
    metrics: dict
    samples: tuple | None       # (step, uint8 images (N, C, H, W)) of the last samples/<step>, or None
    layer_names: list | None


@dataclass
class Group:
    """Runs whose configs are equal except for the seed."""

    label: str
    runs: list
    color: str = "C0"


def load_run(path, label=None) -> RunData:
    run = RunFile.open(path, mode="r")
    metrics = run.metrics()
    metrics["wall_time"] = wall_times(metrics)
    steps = run.sample_steps()
    samples = (steps[-1], run.load_samples(steps[-1])[0]) if steps else None
    attrs = run.attrs
    try:
        layer_names = json.loads(attrs["layer_names"]) if "layer_names" in attrs else None
    except (TypeError, ValueError):
        layer_names = None
    return RunData(Path(path), label or Path(path).stem, run.config, run.status, attrs.get("status_message", ""),
                   metrics, samples, layer_names)


def wall_times(metrics: dict) -> np.ndarray:
    """Seconds since the run started at every row: the logged `wall_time` where present, otherwise the cumulative
    mean step time x the steps since the previous log row; rows in between (probe/eval rows) are interpolated."""
    steps = np.asarray(metrics.get("step", np.zeros(0)), dtype=np.float64)
    if "wall_time" in metrics and np.isfinite(metrics["wall_time"]).any():
        logged = np.asarray(metrics["wall_time"], dtype=np.float64)
    elif "step_time" in metrics:
        st = np.asarray(metrics["step_time"], dtype=np.float64)
        ok = np.isfinite(st)
        logged = np.full(len(steps), np.nan)
        logged[ok] = np.cumsum(st[ok] * np.diff(np.concatenate([[0.0], steps[ok]])))
    else:
        return np.full(len(steps), np.nan)
    ok = np.isfinite(logged)
    if not ok.any():
        return logged
    return np.interp(steps, steps[ok], logged[ok])


def _config_key(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def group_runs(runs) -> list:
    """Group runs that differ only by seed, in order of first appearance; labels lose a trailing seed suffix."""
    by_key = {}
    for r in runs:
        by_key.setdefault(_config_key(r.config), []).append(r)
    groups = []
    for members in by_key.values():
        if len(members) == 1:
            groups.append(Group(members[0].label, members))
            continue
        stripped = {_SEED_SUFFIX.sub("", r.label) for r in members}
        label = stripped.pop() if len(stripped) == 1 and "" not in stripped else describe(members[0].config)
        groups.append(Group(f"{label} ({len(members)} seeds)", members))
    for i, g in enumerate(groups):
        g.color = f"C{i % 10}"
    return groups


def resolved_lr(config: dict) -> float:
    lr = config.get("lr")
    return DEFAULT_LR.get(config.get("optimizer"), float("nan")) if lr is None else float(lr)


def momentum_setting(config: dict) -> str:
    """The optimizer's momentum hyperparameter as text: beta1 for the Adam family, mu for heavy-ball/Nesterov."""
    opt = config.get("optimizer")
    if opt in ADAM_FAMILY:
        return f"β1={config.get('beta1', 0.9):g}"
    if opt in MOMENTUM_FAMILY:
        return f"μ={config.get('momentum', 0.9):g}"
    return "—"


def describe(config: dict) -> str:
    setting = momentum_setting(config)
    return f"{config.get('optimizer')} lr={resolved_lr(config):g}" + ("" if setting == "—" else f" {setting}")


# --- final numbers ----------------------------------------------------------------------------------------------

def series(run: RunData, name: str):
    """(steps, values) of the rows where `name` is finite (all entries finite for a vector metric); None if absent."""
    values = run.metrics.get(name)
    if values is None or len(values) == 0:
        return None
    ok = np.isfinite(values) if values.ndim == 1 else np.isfinite(values).any(axis=1)
    if not ok.any():
        return None
    return run.metrics["step"][ok], values[ok]


def final_numbers(run: RunData) -> dict:
    """steps, wall_time, final_loss (mean of the last FINAL_ROWS logged losses; NaN for a diverged run) and, for each
    quality metric present, best_<q> (the lowest) and final_<q> (the last)."""
    m = run.metrics
    out = {"steps": int(m["step"][-1]) if len(m["step"]) else 0,
           "wall_time": float(m["wall_time"][-1]) if len(m["wall_time"]) else float("nan"),
           "final_loss": float("nan")}
    loss = series(run, "loss")
    if loss is not None and run.status != "diverged":
        out["final_loss"] = float(np.mean(loss[1][-FINAL_ROWS:]))
    for q in QUALITY_METRICS:
        s = series(run, q)
        if s is not None:
            out[f"best_{q}"], out[f"final_{q}"] = float(np.min(s[1])), float(s[1][-1])
    return out


def stats(values) -> dict:
    """mean, std (population), min, max and n of the finite values (NaN and n=0 when there are none)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def summarize_groups(groups) -> list:
    """One dict per group: label, config (of its first run, seed removed), seeds, status counts, and stats() of
    steps, wall_time, final_loss and best/final quality over the group's non-diverged runs."""
    rows = []
    for g in groups:
        finals = [final_numbers(r) for r in g.runs]
        kept = [f for f, r in zip(finals, g.runs) if r.status != "diverged"]
        counts = {}
        for r in g.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        row = {"label": g.label, "config": {k: v for k, v in g.runs[0].config.items() if k != "seed"},
               "seeds": [r.config.get("seed") for r in g.runs], "status": counts,
               "paths": [str(r.path) for r in g.runs]}
        names = ["steps", "wall_time", "final_loss"] + [f"{w}_{q}" for q in QUALITY_METRICS for w in ("best", "final")]
        for name in names:
            if name in ("steps", "wall_time", "final_loss") or any(name in f for f in finals):
                row[name] = stats([f.get(name) for f in (finals if name in ("steps", "wall_time") else kept)])
        rows.append(row)
    return rows


# --- the report -------------------------------------------------------------------------------------------------

def compare_runs(paths, out_dir, labels=None) -> Path:
    """Figures into out_dir/figures/ and out_dir/report.md embedding them (relative paths); returns the report path.

    paths: run files (.h5). labels: one per path (default: the file stems). Needs matplotlib.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("compare needs at least one run file")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} run files")
    labels = list(labels) if labels else _unique_labels(paths)
    runs = [load_run(p, lab) for p, lab in zip(paths, labels)]
    groups = group_runs(runs)
    out_dir = Path(out_dir)
    made, skipped = draw_figures(groups, out_dir / "figures")
    report = out_dir / "report.md"
    report.write_text(render_report(runs, groups, made, skipped, out_dir), encoding="utf-8")
    return report


def _unique_labels(paths) -> list:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(p.with_suffix("")) for p in paths]


def _fmt(x) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.4g}"


def fmt_stats(s: dict | None) -> str:
    """'m' for one value, 'm ± s [lo, hi]' for several, '—' for none."""
    if not s or s["n"] == 0:
        return "—"
    if s["n"] == 1:
        return _fmt(s["mean"])
    return f"{_fmt(s['mean'])} ± {_fmt(s['std'])} [{_fmt(s['min'])}, {_fmt(s['max'])}]"


def _differing_keys(runs) -> list:
    own_columns = {"seed", "optimizer", "lr", "beta1", "momentum"}
    keys = []
    for k in runs[0].config:
        values = {json.dumps(r.config.get(k), sort_keys=True) for r in runs}
        if k not in own_columns and len(values) > 1:
            keys.append(k)
    return keys


def _common_settings(runs) -> str:
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    always = ("dataset", "model", "steps", "batch_size", "timesteps")
    parts = []
    for k, v in runs[0].config.items():
        same = all(json.dumps(r.config.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for r in runs)
        if same and k != "seed" and (k in always or defaults.get(k, object()) != v):
            parts.append(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return ", ".join(parts)


def _final_table(runs, groups) -> list:
    rows = summarize_groups(groups)
    extra = _differing_keys(runs)
    quality = [f"{w}_{q}" for q in QUALITY_METRICS for w in ("best", "final") if any(f"{w}_{q}" in r for r in rows)]
    head = ["run", "runs (status)", "optimizer", "lr", "β1 / μ"] + extra + ["steps reached", "wall time (s)",
                                                                           f"final loss (last {FINAL_ROWS} logs)"]
    head += [q.replace("_", " ") for q in quality]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, row in zip(groups, rows):
        c = g.runs[0].config
        status = ", ".join(f"{n} {s}" for s, n in row["status"].items())
        cells = [g.label, status, str(c.get("optimizer")), f"{resolved_lr(c):g}", momentum_setting(c)]
        cells += [json.dumps(c.get(k)) if isinstance(c.get(k), (dict, list)) else str(c.get(k)) for k in extra]
        cells += [fmt_stats(row["steps"]), fmt_stats(row["wall_time"]), fmt_stats(row["final_loss"])]
        cells += [fmt_stats(row.get(q)) for q in quality]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(runs, groups, made, skipped, out_dir) -> str:
    """report.md: the table of final numbers, the figures with captions, what was not plotted and why, the runs."""
    seeds = sum(len(g.runs) > 1 for g in groups)
    lines = ["# Run comparison", "",
             f"{len(runs)} run(s) in {len(groups)} group(s)"
             + (f"; {seeds} group(s) of seeds show mean ± std [min, max] over seeds, diverged runs excluded"
                if seeds else "") + ".", "",
             f"Common settings (others at their defaults): {_common_settings(runs)}", "",
             "## Final numbers", ""] + _final_table(runs, groups) + [""]
    lines += ["## Figures", ""]
    for title, rel, caption in made:
        lines += [f"### {title}", "", f"![{title}]({rel})", "", caption, ""]
    if skipped:
        lines += ["## Not plotted", ""] + [f"- {title}: {reason}" for title, reason in skipped] + [""]
    lines += ["## Runs", "", "| label | file | status | steps | message |", "|---|---|---|---|---|"]
    for r in runs:
        rel = os.path.relpath(r.path.resolve(), Path(out_dir).resolve())
        steps = int(r.metrics["step"][-1]) if len(r.metrics["step"]) else 0
        message = r.message.replace("|", "\\|")
        lines.append(f"| {r.label} | [{rel}]({rel}) | {r.status} | {steps} | {message} |")
    return "\n".join(lines) + "\n"


# --- figures -------------------------------------------------------------------------------------------------------

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
    """Mean, std, min, max over axis 0, NaN where no run has a value (without the all-NaN warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(Y, 0), np.nanstd(Y, 0), np.nanmin(Y, 0), np.nanmax(Y, 0)


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
        ax.plot(xv[ok], mean[ok], color=g.color, label=g.label, lw=1.4)
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
            ax.plot(steps[ok], M[ok, b], color=colormaps["viridis"](b / max(B - 1, 1)), label=str(b))
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
    from .data import make_grid

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
ALIGNMENT = ("grad_norm", "cos_grad_momentum", "momentum_alignment", "grad_cos_consecutive", "update_to_weight")

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
    ("Gradient noise scale", "noise_scale.png", ("noise_scale",), _draw_scalars,
     "B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) from micro-batches at the same weights."),
    ("Noise scale per timestep bucket", "noise_scale_bucket.png", ("noise_scale_bucket",), _draw_bucket_lines,
     "B_simple of each t bucket's gradient."),
    ("Optimizer dynamics", "alignment.png", ALIGNMENT, _draw_scalars,
     "Pre-clip gradient norm, cosine between the gradient and the momentum buffer (Adam: first moment), between "
     "consecutive gradients, and the global update-to-weight ratio."),
    ("Update-to-weight ratio per layer", "layer_update_to_weight.png", ("layer_update_to_weight",), _draw_layers,
     "|Δθ|/|θ| of each layer, averaged over the last third of training and over seeds."),
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
