"""Steps and seconds to a validation-loss target, in compare's report and table, in the sweep's results, and on the
command line; and `minidiff inspect --json`."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from helpers.cli import assert_one_line_error
from minidiff.study.compare import render_report
from minidiff.study.groups import Group, RunData, default_target, steps_to_target, summarize_groups, wall_times
from minidiff.study.run_tools import summary_json
from minidiff.study.sweep import write_results
from minidiff.training.config import TrainConfig
from minidiff.training.session import start_run


def _fake(label, val, seed=0, status="finished", wall=None):
    """Rows at steps 10, 20, ...; val_loss on every other row (15, 25, ... are validation rows off the log grid)."""
    steps = np.arange(1, 2 * len(val) + 1) * 5
    values = np.full(len(steps), np.nan)
    values[::2] = val
    metrics = {"step": steps, "val_loss": values, "loss": np.where(np.isnan(values), np.nan, 1.0)}
    metrics["wall_time"] = np.where(np.isnan(values), np.nan, steps * 0.1) if wall is None else wall
    metrics["wall_time"] = wall_times(metrics)
    return RunData(Path(f"{label}.h5"), label, {"optimizer": "adam", "seed": seed}, status, "", metrics, None, None)


def test_steps_to_target_is_the_first_logged_step_at_or_below_it():
    run = _fake("a", [1.0, 0.6, 0.55, 0.7, 0.4])
    assert steps_to_target(run.metrics, 0.6) == (15, pytest.approx(1.5))
    assert steps_to_target(run.metrics, 0.56) == (25, pytest.approx(2.5))
    assert steps_to_target(run.metrics, 0.4) == (45, pytest.approx(4.5))
    step, seconds = steps_to_target(run.metrics, 0.1)
    assert step is None and np.isnan(seconds)
    assert steps_to_target(run.metrics, 0.6, key="nothing")[0] is None


def test_seconds_at_a_row_without_a_logged_wall_time_are_interpolated_between_the_logged_rows():
    m = {"step": np.array([10, 15, 20]), "val_loss": np.array([np.nan, 0.5, np.nan]),
         "wall_time": np.array([1.0, np.nan, 3.0])}
    m["wall_time"] = wall_times(m)
    assert steps_to_target(m, 0.5) == (15, pytest.approx(2.0))


def test_the_default_target_is_reached_by_every_run_and_ignores_diverged_ones():
    runs = [_fake("a", [1.0, 0.5, 0.3]), _fake("b", [1.0, 0.8, 0.6]), _fake("c", [1.0, 0.9, 0.95], status="diverged")]
    assert default_target(runs) == 0.6
    assert np.isnan(default_target([_fake("d", [np.nan])]))


def test_groups_report_steps_and_seconds_to_target_over_the_seeds_that_reached_it():
    a0, a1, b = _fake("a", [1.0, 0.5], seed=0), _fake("a", [1.0, 0.9, 0.7], seed=1), _fake("b", [1.0, 0.6])
    rows = summarize_groups([Group("a", [a0, a1]), Group("b", [b])], target=0.6)
    assert rows[0]["target"] == 0.6 and rows[0]["reached_target"] == 1
    assert rows[0]["steps_to_target"]["mean"] == 15 and rows[0]["steps_to_target"]["n"] == 1
    assert rows[1]["steps_to_target"]["mean"] == 15 and rows[1]["seconds_to_target"]["mean"] == pytest.approx(1.5)
    default = summarize_groups([Group("a", [a0, a1]), Group("b", [b])])
    assert default[0]["target"] == 0.7 and default[0]["reached_target"] == 2 and default[1]["reached_target"] == 1
    assert "target" not in summarize_groups([Group("c", [_fake("c", [np.nan])])])[0]


def test_the_report_says_which_target_it_used(tmp_path):
    runs = [_fake("a", [1.0, 0.5]), _fake("b", [1.0, 0.7])]
    groups = [Group("a", runs[:1]), Group("b", runs[1:])]
    text = render_report(runs, groups, [], [], tmp_path)
    assert "Target val_loss 0.7 (the largest of the runs' best val_loss, so every run reaches it)" in text
    assert "| steps to target | seconds to target |" in text
    given = render_report(runs, groups, [], [], tmp_path, target=0.5)
    assert "Target val_loss 0.5 (given)" in given and "(0/1 reached)" in given


# --- with real run files ---------------------------------------------------------------------------------------------

def _moons(**changes):
    base = dict(dataset="moons", timesteps=40, batch_size=32, steps=8, log_every=4, ckpt_every=8, sample_every=100,
                probe_every=0, eval_every=0, val_every=4, val_samples=64)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    for name, changes in (("adam-seed=0", {}), ("adam-seed=1", {"seed": 1}), ("nesterov", {"optimizer": "nesterov"})):
        trainer, run = start_run(_moons(**changes), d / f"{name}.h5")
        trainer.train(run, 8)
        run.close()
    return d


def test_sweep_results_carry_steps_and_seconds_to_target(run_files, monkeypatch):
    monkeypatch.setattr("minidiff.study.sweep_results.compare_runs", lambda paths, out_dir: None)
    write_results(run_files, [])
    text = (run_files / "results.md").read_text()
    assert "Target val_loss" in text and "steps to target" in text
    with open(run_files / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(int(r["reached_target"]) == int(r["seeds"]) for r in rows)   # the default target
    assert all(4.0 <= float(r["steps_to_target_mean"]) <= 8.0 for r in rows)


def test_compare_target_option_is_used_and_reported(run_files, tmp_path, monkeypatch):
    def no_figures(groups, folder):   # the figures are tested in test_compare.py; this is about the table
        folder.mkdir(parents=True)
        return [], []

    monkeypatch.setattr("minidiff.study.figures.draw_figures", no_figures)
    files = sorted(str(p) for p in run_files.glob("*.h5"))
    result = CliRunner().invoke(main, ["compare", *files, "--out", str(tmp_path / "c"), "--target", "1e9"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "c" / "report.md").read_text()
    assert "Target val_loss 1e+09 (given)" in text and "| 4 | " in text


def test_inspect_json_gives_config_status_steps_and_the_last_finite_metrics(run_files):
    path = run_files / "nesterov.h5"
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d == json.loads(json.dumps(summary_json(path)))
    assert d["status"] == "finished" and d["config"]["optimizer"] == "nesterov"
    assert d["step"] == {"planned": 8, "checkpoint": 8, "last_logged": 8}
    m = d["metrics"]
    assert isinstance(m["loss"], float) and isinstance(m["val_loss_bucket"], list) and len(m["val_loss_bucket"]) == 10
    assert "step" not in m and all(v is not None for v in m.values())


def test_inspect_json_skips_non_finite_rows_and_writes_none_for_missing_entries(tmp_path):
    from minidiff.runs.file import RunFile

    run = RunFile.create(tmp_path / "r.h5", TrainConfig().to_dict())
    run.log(1, loss=0.5, v=np.array([1.0, np.nan]))
    run.log(2, loss=float("nan"), v=np.array([np.nan, np.nan]), never=float("inf"))
    run.flush()
    m = summary_json(tmp_path / "r.h5")["metrics"]
    assert m == {"loss": 0.5, "v": [1.0, None], "never": None}
    json.dumps(m, allow_nan=False)


# --- the new train options -------------------------------------------------------------------------------------------

FAST = ["--dataset", "moons", "--steps", "6", "--timesteps", "40", "--batch-size", "32", "--log-every", "2",
        "--ckpt-every", "3", "--sample-every", "100", "--probe-every", "0", "--eval-every", "0", "-q"]


def test_study_options_reach_the_run_config_and_its_metrics(tmp_path):
    from minidiff.runs.file import RunFile

    out = tmp_path / "r.h5"
    result = CliRunner().invoke(main, ["train", *FAST, "--optimizer", "nesterov", "--timestep-sampling",
                                       "bucket_cycle", "--bucket-momentum", "--momentum-schedule", "cosine",
                                       "--momentum-final", "0.5", "--momentum-lr-compensation", "--val-every", "3",
                                       "--val-samples", "40", "--probe-batch", "12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = RunFile.open(out)
    c = run.config
    assert (c["timestep_sampling"], c["bucket_momentum"], c["momentum_schedule"], c["momentum_final"],
            c["momentum_lr_compensation"], c["val_every"], c["val_samples"], c["probe_batch"]) == \
        ("bucket_cycle", True, "cosine", 0.5, True, 3, 40, 12)
    m = run.metrics()
    assert np.isfinite(m["val_loss"][m["step"] == 3]).all() and m["momentum"][m["step"] == 6][0] == pytest.approx(0.5)
    result = CliRunner().invoke(main, ["train", *FAST, "--timestep-sampling", "curriculum", "--curriculum-steps", "4",
                                       "--out", str(tmp_path / "c.h5")])
    assert result.exit_code == 0 and RunFile.open(tmp_path / "c.h5").config["curriculum_steps"] == 4


@pytest.mark.parametrize("args, fragment", [(["--bucket-momentum"], "bucket_cycle"),
                                            (["--momentum-schedule", "linear"], "momentum_final"),
                                            (["--momentum-lr-compensation"], "normalised average"),
                                            (["--timestep-sampling", "sideways"], "--timestep-sampling"),
                                            (["--val-every", "-1"], "--val-every")])
def test_bad_study_options_are_one_line_errors(tmp_path, args, fragment):
    out = tmp_path / "r.h5"
    assert_one_line_error(CliRunner().invoke(main, ["train", *FAST, *args, "--out", str(out)]), fragment)
    assert not out.exists()
