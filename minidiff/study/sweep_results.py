"""The results of a sweep: compare_runs over its run files, plus results.md / .csv / .json (per config: mean, std,
min and max over seeds, steps and seconds to the validation-loss target; and each point's outcome)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from minidiff.runs.file import RunFileError
from minidiff.study.compare import compare_runs, fmt_stats, target_cells, target_note
from minidiff.study.groups import (ADAM_FAMILY, MOMENTUM_FAMILY, SUMMARY_METRICS, MissingExtra, group_runs, load_run,
                                   resolved_lr, summarize_groups)


def _csv_row(row: dict) -> dict:
    c = row["config"]
    out = {"config": row["label"], "optimizer": c.get("optimizer"), "lr": resolved_lr(c),
           "beta1": c.get("beta1") if c.get("optimizer") in ADAM_FAMILY else "",
           "momentum": c.get("momentum") if c.get("optimizer") in MOMENTUM_FAMILY else "",
           "seeds": len(row["seeds"]), "finished": row["status"].get("finished", 0),
           "diverged": row["status"].get("diverged", 0)}
    for name in ["final_loss"] + [f"{w}_{q}" for q in SUMMARY_METRICS for w in ("best", "final")] + ["wall_time"]:
        if name in row:
            out.update({f"{name}_{k}": row[name][k] for k in ("mean", "std", "min", "max")})
    if "target" in row:
        out.update(target=row["target"], reached_target=row["reached_target"])
        for name in ("steps_to_target", "seconds_to_target"):
            out.update({f"{name}_{k}": row[name][k] for k in ("mean", "std", "min", "max")})
    return out


def _results_markdown(rows, results, note) -> str:
    names = [f"{w}_{q}" for q in SUMMARY_METRICS for w in ("best", "final")]
    quality = [q for q in names if any(q in r for r in rows)]
    with_target = any("target" in r for r in rows)
    head = ["config", "seeds", "finished", "diverged", "final loss"] + [q.replace("_", " ") for q in quality]
    head += ["wall time (s)"] + (["steps to target", "seconds to target"] if with_target else [])
    lines = ["# Sweep results", "", "Per config: mean ± sample std [min, max] over seeds; diverged runs are counted, "
             "not averaged. Figures: [report.md](report.md).", ""]
    for line in (target_note(rows, None), note):
        if line:
            lines += [line, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(len(r["seeds"])), str(r["status"].get("finished", 0)),
                 str(r["status"].get("diverged", 0)), fmt_stats(r["final_loss"])]
        cells += [fmt_stats(r.get(q)) for q in quality] + [fmt_stats(r["wall_time"])]
        if with_target:
            cells += target_cells(r)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Points", "", "| point | status | action | seconds | message |", "|---|---|---|---|---|"]
    for p in results:
        message = str(p["message"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {p['name']} | {p['status']} | {p['action']} | {p['seconds']:.1f} | {message} |")
    return "\n".join(lines) + "\n"


def _jsonable(x):
    """NaN/inf -> null (JSON has no NaN), tuples -> lists, paths -> strings."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x if x is None or isinstance(x, (str, int, bool)) else str(x)


def write_results(out_dir, results) -> dict:
    """compare_runs over every run file in out_dir (report.md, figures/) plus results.md, results.csv and
    results.json (per config: mean/std/min/max over seeds; and each point's outcome). -> {what: path}."""
    out_dir = Path(out_dir)
    runs, note = [], ""
    for path in sorted(out_dir.glob("*.h5")):
        try:
            runs.append(load_run(path))
        except RunFileError as exc:
            note += f"Left out (unreadable): {exc}. "
    rows = summarize_groups(group_runs(runs)) if runs else []
    written = {}
    if runs:
        try:
            written["report"] = compare_runs([r.path for r in runs], out_dir)
        except MissingExtra as exc:
            note += f"No figures: {exc}."
    table = [_csv_row(r) for r in rows]
    columns = list(dict.fromkeys(k for r in table for k in r))
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(table)
    (out_dir / "results.json").write_text(json.dumps(_jsonable({"configs": rows, "points": results}), indent=1),
                                          encoding="utf-8")
    (out_dir / "results.md").write_text(_results_markdown(rows, results, note.strip()), encoding="utf-8")
    written.update({k: out_dir / f"results.{k}" for k in ("md", "csv", "json")})
    return written
