"""minidiff compare: figures from tiny real runs, the report's table (seed groups), and the pieces it is built from."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from minidiff.study.compare import compare_runs, fmt_stats
from minidiff.study.groups import (FINAL_ROWS, Group, MissingExtra, RunData, group_runs, stats, summarize_groups,
                                   wall_times)
from minidiff.study.figures import FIGURES, smooth, stack
from minidiff.training.config import TrainConfig
from minidiff.runs.file import RunFile
from minidiff.training.session import start_run

pytest.importorskip("matplotlib", reason="compare figures need matplotlib (pip install 'minidiff[plots]')")
pytestmark = pytest.mark.usefixtures("one_blas_thread")

PNG = b"\x89PNG\r\n\x1a\n"
TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), groups=4)


def moons(**changes):
    base = dict(dataset="moons", timesteps=50, batch_size=64, steps=20, log_every=4, ckpt_every=10, sample_every=100,
                probe_every=10, probe_batch=32, eval_every=10, eval_samples=128, eval_steps=5)
    base.update(changes)
    return TrainConfig(**base)


def digits():
    return TrainConfig(dataset="digits", model="unet", model_options=TINY_UNET, timesteps=50, batch_size=16, steps=4,
                       log_every=2, ckpt_every=4, sample_every=4, sample_count=8, sample_steps=3, probe_every=4,
                       probe_batch=8, eval_every=4, eval_samples=32, eval_steps=3)


def _train(config, path):
    trainer, run = start_run(config, path)
    trainer.train(run, config.steps)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of Adam and one heavy-ball run on moons (probes and swd on), and a tiny UNet on digits (samples,
    fd). Training them takes a while: every test that uses them is marked slow."""
    d = tmp_path_factory.mktemp("runs")
    return [_train(moons(seed=0), d / "adam-seed=0.h5"), _train(moons(seed=1), d / "adam-seed=1.h5"),
            _train(moons(optimizer="momentum"), d / "heavy-ball.h5"), _train(digits(), d / "unet.h5")]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    return compare_runs(runs, out / "cmp"), runs


@pytest.mark.slow
def test_compare_draws_every_figure_as_a_nonempty_png_embedded_by_relative_path(report):
    path, _ = report
    text = path.read_text()
    for title, filename, *_ in FIGURES:  # these runs record every metric a figure needs
        png = path.parent / "figures" / filename
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 2000, filename
        assert f"![{title}](figures/{filename})" in text
    assert "## Not plotted" not in text
    for rel in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert not Path(rel).is_absolute() and (path.parent / rel).is_file()


@pytest.mark.slow
def test_report_table_groups_seeds_with_mean_std_and_range(report):
    path, runs = report
    text = path.read_text()
    table = text.split("## Final numbers")[1].split("## Figures")[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"adam (2 seeds)", "heavy-ball", "unet"} <= set(rows)
    losses = [RunFile.open(p).metrics()["loss"] for p in runs[:2]]
    finals = [np.mean(loss[np.isfinite(loss)][-FINAL_ROWS:]) for loss in losses]
    std = np.std(finals, ddof=1)  # the sample std
    assert f"{np.mean(finals):.4g} ± {std:.4g} [{min(finals):.4g}, {max(finals):.4g}]" in rows["adam (2 seeds)"]
    assert "μ=0.9" in rows["heavy-ball"] and "β1=0.9" in rows["adam (2 seeds)"]
    fd = RunFile.open(runs[3]).metrics()["fd"]
    assert f"{np.nanmin(fd):.4g}" in rows["unet"]  # best fd of the image run
    assert "swd" in text.split("## Figures")[0]


def test_figures_whose_metrics_no_run_recorded_are_skipped_and_listed(tmp_path):
    run = _train(moons(probe_every=0, eval_every=0, steps=8), tmp_path / "plain.h5")
    report = compare_runs([run], tmp_path / "cmp")
    text = report.read_text()
    skipped = text.split("## Not plotted")[1].split("## Runs")[0]
    for filename in ("probe_cosine.png", "noise_scale.png", "quality.png", "samples.png"):
        assert not (tmp_path / "cmp" / "figures" / filename).exists()
    assert "probe_cosine" in skipped and "fd / swd" in skipped and "2-D point runs store none" in skipped
    assert (tmp_path / "cmp" / "figures" / "loss.png").stat().st_size > 2000


@pytest.mark.slow
def test_missing_matplotlib_raises_one_line_install_hint(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now fails as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'minidiff\[plots\]'"):
        compare_runs(runs[:1], tmp_path)


@pytest.mark.slow
def test_labels_must_match_the_run_files(runs, tmp_path):
    with pytest.raises(ValueError, match="labels"):
        compare_runs(runs[:2], tmp_path, labels=["one"])


# --- the pieces, on synthetic runs ------------------------------------------------------------------------------

def _fake(label, seed=0, status="finished", loss=(1.0, 0.5, 0.25), **config):
    steps = np.arange(1, len(loss) + 1) * 10
    metrics = {"step": steps, "loss": np.array(loss, dtype=float), "step_time": np.full(len(loss), 0.1)}
    metrics["wall_time"] = wall_times(metrics)
    return RunData(Path(f"{label}.h5"), label, {"optimizer": "adam", "lr": 1e-3, "seed": seed, **config}, status, "",
                   metrics, None, None)


def test_runs_differing_only_by_seed_share_a_group_and_others_do_not():
    groups = group_runs([_fake("a-seed=0", 0), _fake("b", lr=0.01), _fake("a-seed=1", 1)])
    assert [g.label for g in groups] == ["a (2 seeds)", "b"]
    assert [len(g.runs) for g in groups] == [2, 1]
    assert groups[0].color != groups[1].color


def test_diverged_runs_are_counted_but_left_out_of_the_final_loss():
    row, = summarize_groups([Group("g", [_fake("x", 0, loss=[1.0, 0.5]), _fake("y", 1, "diverged", [1.0, np.inf])])])
    assert row["status"] == {"finished": 1, "diverged": 1}
    assert row["final_loss"]["n"] == 1 and row["final_loss"]["mean"] == pytest.approx(0.75)
    assert row["steps"]["n"] == 2


def test_stats_reports_the_sample_std_not_the_population_std():
    s = stats([1.0, 2.0, 3.0])
    assert s["std"] == pytest.approx(1.0)  # population std would be sqrt(2/3) = 0.816
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert stats([1.0, 2.0])["std"] == pytest.approx(np.sqrt(0.5))


def test_stats_drops_missing_and_nonfinite_values_before_counting():
    s = stats([1.0, None, np.nan, 2.0, np.inf, 3.0])
    assert s["n"] == 3 and s["std"] == pytest.approx(1.0)
    empty = stats([None, np.nan])
    assert empty["n"] == 0 and all(np.isnan(empty[k]) for k in ("mean", "std", "min", "max"))


def test_one_value_has_nan_std_and_the_table_prints_no_nan():
    s = stats([0.25])
    assert s["n"] == 1 and np.isnan(s["std"]) and s["mean"] == 0.25
    assert fmt_stats(s) == "0.25"
    assert fmt_stats(stats([])) == "—"
    assert fmt_stats({"mean": 1.0, "std": float("nan"), "min": 0.5, "max": 1.5, "n": 2}) == "1 ± — [0.5, 1.5]"
    assert fmt_stats(stats([1.0, 2.0, 3.0])) == "2 ± 1 [1, 3]"


def test_wall_time_uses_the_logged_metric_or_sums_step_time_between_log_rows():
    m = {"step": np.array([5, 10, 12, 20]), "step_time": np.array([0.1, 0.2, np.nan, 0.1])}
    # rows 5, 10, 20 are log rows; row 12 (a probe row) is interpolated
    assert wall_times(m) == pytest.approx([0.5, 1.5, 1.7, 2.5])
    m["wall_time"] = np.array([1.0, 2.0, np.nan, 4.0])
    assert wall_times(m) == pytest.approx([1.0, 2.0, 2.4, 4.0])


def test_stack_aligns_runs_on_the_union_of_steps_with_nan_gaps():
    a, b = _fake("a", loss=(3.0, 2.0, 1.0)), _fake("b", loss=(4.0, np.nan, 2.0))
    steps, Y, W = stack([a, b], "loss")
    assert steps.tolist() == [10, 20, 30]
    np.testing.assert_array_equal(Y, [[3.0, 2.0, 1.0], [4.0, np.nan, 2.0]])
    assert np.isnan(W[1, 1]) and W[0, 2] == pytest.approx(3.0)


def test_smoothing_keeps_a_constant_series_constant_from_the_first_row():
    np.testing.assert_allclose(smooth(np.full(50, 2.0), 10), 2.0)
    y = np.arange(5.0)
    assert smooth(y, 1) is y
