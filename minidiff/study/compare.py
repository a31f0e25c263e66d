"""Compare training runs: figures of what the run files recorded, and a Markdown report with the final numbers.

    report = compare_runs(["runs/adam.h5", "runs/sgd.h5"], "cmp")   # cmp/report.md, cmp/figures/*.png

Runs whose configs differ only by `seed` form one group: the curves show the mean over seeds with a band (+-1 std,
and a fainter min-max), the table gives mean +- sample std [min, max]. Diverged runs are drawn (up to where they
diverged) but left out of the final-number statistics, and counted in the table. A figure whose metrics no run
recorded (probes off, a file without those metrics, a very short run) is skipped and listed in the report with the
reason.

Runs are loaded, grouped and summarised by minidiff.study.groups and drawn by minidiff.study.figures; matplotlib is
an optional extra (`pip install 'minidiff[plots]'`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minidiff.study.figures import draw_figures
from minidiff.study.groups import (FINAL_ROWS, SUMMARY_METRICS, group_runs, load_run, momentum_setting, resolved_lr,
                                   summarize_groups)
from minidiff.training.config import TrainConfig


# --- the report -------------------------------------------------------------------------------------------------

def compare_runs(paths, out_dir, labels=None, target=None) -> Path:
    """Figures into out_dir/figures/ and out_dir/report.md embedding them (relative paths); returns the report path.

    paths: run files (.h5). labels: one per path (default: the file stems). target: the val_loss the table's steps
    and seconds to target are measured at (default: `default_target`, which every run reaches). Needs matplotlib.
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
    report.write_text(render_report(runs, groups, made, skipped, out_dir, target), encoding="utf-8")
    return report


def _unique_labels(paths) -> list:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(p.with_suffix("")) for p in paths]


def _fmt(x) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.4g}"


def fmt_stats(s: dict | None) -> str:
    """'m' for one value, 'm ± s [lo, hi]' for several (s: sample std), '—' for none; a NaN field prints '—'."""
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


def target_note(rows, given) -> str:
    """One line saying which val_loss target the steps/seconds columns use ("" when no run logged val_loss)."""
    target = next((r["target"] for r in rows if "target" in r), None)
    if target is None:
        return ""
    how = "given" if given is not None else "the largest of the runs' best val_loss, so every run reaches it"
    return f"Target val_loss {target:.6g} ({how}); steps and seconds to target are over the runs that reached it."


def target_cells(row) -> list:
    if "target" not in row:
        return ["—", "—"]
    n = len(row["seeds"]) - row["status"].get("diverged", 0)
    reached = f" ({row['reached_target']}/{n} reached)" if row["reached_target"] < n else ""
    return [fmt_stats(row["steps_to_target"]) + reached, fmt_stats(row["seconds_to_target"])]


def _final_table(runs, groups, target=None) -> tuple:
    rows = summarize_groups(groups, target)
    extra = _differing_keys(runs)
    quality = [f"{w}_{q}" for q in SUMMARY_METRICS for w in ("best", "final") if any(f"{w}_{q}" in r for r in rows)]
    head = ["run", "runs (status)", "optimizer", "lr", "β1 / μ"] + extra + ["steps reached", "wall time (s)",
                                                                           f"final loss (last {FINAL_ROWS} logs)"]
    head += [q.replace("_", " ") for q in quality]
    with_target = any("target" in r for r in rows)
    head += ["steps to target", "seconds to target"] if with_target else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, row in zip(groups, rows):
        c = g.runs[0].config
        status = ", ".join(f"{n} {s}" for s, n in row["status"].items())
        cells = [g.label, status, str(c.get("optimizer")), f"{resolved_lr(c):g}", momentum_setting(c)]
        cells += [json.dumps(c.get(k)) if isinstance(c.get(k), (dict, list)) else str(c.get(k)) for k in extra]
        cells += [fmt_stats(row["steps"]), fmt_stats(row["wall_time"]), fmt_stats(row["final_loss"])]
        cells += [fmt_stats(row.get(q)) for q in quality]
        cells += target_cells(row) if with_target else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines, target_note(rows, target)


def render_report(runs, groups, made, skipped, out_dir, target=None) -> str:
    """report.md: the table of final numbers, the figures with captions, what was not plotted and why, the runs."""
    seeds = sum(len(g.runs) > 1 for g in groups)
    table, note = _final_table(runs, groups, target)
    lines = ["# Run comparison", "",
             f"{len(runs)} run(s) in {len(groups)} group(s)"
             + (f"; {seeds} group(s) of seeds show mean ± sample std [min, max] over seeds, diverged runs excluded"
                if seeds else "") + ".", "",
             f"Common settings (others at their defaults): {_common_settings(runs)}", "",
             "## Final numbers", ""] + ([note, ""] if note else []) + table + [""]
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
