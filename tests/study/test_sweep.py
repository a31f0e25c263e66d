"""minidiff sweep: the grid, local processes, restart-skipping and resuming, divergence, and the Dask path."""

import csv
import json
import sys

import numpy as np
import pytest

from minidiff.study.groups import MissingExtra
from minidiff.runs.file import RunFile
from minidiff.study.sweep import expand_grid, load_grid, run_point, run_sweep, sweep_points
from minidiff.training.session import start_run

# Probes and evaluation off: the sweep machinery is under test here, and every figure costs time.
BASE = dict(dataset="moons", timesteps=50, batch_size=64, steps=12, log_every=4, ckpt_every=6, sample_every=100,
            probe_every=0, eval_every=0)

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture
def no_figures(monkeypatch):
    """The report is tested once (local_sweep) and in test_compare.py; elsewhere its figures would only cost time."""
    calls = []
    monkeypatch.setattr("minidiff.study.sweep_results.compare_runs", lambda paths, out_dir: calls.append(list(paths)))
    return calls


def _statuses(results):
    return {r["name"]: (r["action"], r["status"]) for r in results}


# --- the grid ---------------------------------------------------------------------------------------------------

def test_grid_multiplies_beta1_only_for_adam_and_momentum_only_for_sgd_momentum():
    axes = {"optimizer": ["sgd", "momentum", "nesterov", "adam"], "beta1": [0.5, 0.9], "momentum": [0.0, 0.9],
            "lr": [0.01, 0.1]}
    points = dict(expand_grid(BASE, axes, seeds=2))
    # sgd: lr x seeds; momentum: momentum x lr x seeds; nesterov: its momentum 0 is undefined and skipped; adam: beta1
    assert len(points) == 4 + 8 + 4 + 8
    assert {c.optimizer for c in points.values()} == {"sgd", "momentum", "nesterov", "adam"}
    assert {c.beta1 for c in points.values() if c.optimizer != "adam"} == {0.9}  # base value, not multiplied
    assert {c.momentum for c in points.values() if c.optimizer in ("sgd", "adam")} == {0.9}
    assert "adam-lr=0.01-beta1=0.5-seed=1" in points and "sgd-lr=0.1-seed=0" in points
    assert not any("beta1" in n for n, c in points.items() if c.optimizer != "adam")
    assert all(c.steps == 12 and c.dataset == "moons" for c in points.values())


def test_grid_takes_per_optimizer_values_and_rejects_bad_axes():
    points = expand_grid(BASE, {"optimizer": ["sgd", "adam"], "lr": {"sgd": [0.1, 0.3], "adam": [1e-3]}}, [7])
    assert [(c.optimizer, c.lr, c.seed) for _, c in points] == [("sgd", 0.1, 7), ("sgd", 0.3, 7), ("adam", 1e-3, 7)]
    with pytest.raises(ValueError, match="unknown config option"):
        expand_grid(BASE, {"betta1": [0.9]}, 1)
    with pytest.raises(ValueError, match="seeds"):
        expand_grid(BASE, {"seed": [0, 1]}, 1)
    with pytest.raises(ValueError, match="sweep point adam-lr=-1.0-seed=0: lr"):
        expand_grid(BASE, {"lr": [-1.0]}, 1)


def test_grid_file_is_read_and_command_line_axes_override_it(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('seeds = 3\n[base]\ndataset = "moons"\nbatch-size = 32\n'
                    '[axes]\noptimizer = ["adam", "momentum"]\nbeta1 = [0.0, 0.9]\n')
    assert load_grid(grid)["base"] == {"dataset": "moons", "batch_size": 32}
    points = sweep_points(grid, base={"steps": 5}, axes={"optimizer": ["adam"]})
    assert len(points) == 2 * 3 and all(c.batch_size == 32 and c.steps == 5 for _, c in points)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grid": {}}))
    with pytest.raises(ValueError, match="unknown key"):
        load_grid(bad)


# --- running it -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """2 optimizers x 2 seeds in 2 local worker processes."""
    out = tmp_path_factory.mktemp("sweep")
    points = expand_grid(BASE, {"optimizer": ["adam", "nesterov"]}, seeds=2)
    seen = []
    results = run_sweep(points, out, workers=2, progress=lambda done, total, r: seen.append((done, total)))
    return points, out, results, seen


def test_local_sweep_runs_every_point_in_worker_processes_and_writes_the_tables(local_sweep):
    points, out, results, seen = local_sweep
    assert [r["name"] for r in results] == [n for n, _ in points]
    assert all(r["status"] == "finished" and r["action"] == "ran" for r in results), results
    assert sorted(seen) == [(i, 4) for i in range(1, 5)]
    for name, config in points:
        run = RunFile.open(out / f"{name}.h5")
        assert run.status == "finished" and run.config["seed"] == config.seed
        assert run.metrics()["step"][-1] == 12
    with open(out / "results.csv", newline="") as fh:
        rows = {r["config"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"adam (2 seeds)", "nesterov (2 seeds)"}
    for r in rows.values():
        assert r["seeds"] == "2" and np.isfinite(float(r["final_loss_mean"])) and float(r["final_loss_std"]) > 0
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["configs"]) == 2 and len(summary["points"]) == 4
    assert "adam (2 seeds)" in (out / "results.md").read_text()
    assert (out / "report.md").exists() and (out / "figures" / "loss.png").stat().st_size > 2000


def test_restarted_sweep_skips_finished_points_and_reruns_a_deleted_one(local_sweep, no_figures):
    points, out, _, _ = local_sweep
    files = sorted(out.glob("*.h5"))
    before = {p.name: p.stat().st_mtime_ns for p in files}
    results = run_sweep(points, out, workers=2)
    assert set(_statuses(results).values()) == {("skipped", "finished")}
    assert {p.name: p.stat().st_mtime_ns for p in files} == before  # finished run files untouched
    files[0].unlink()
    results = run_sweep(points, out, workers=1)
    assert _statuses(results)[files[0].stem] == ("ran", "finished")
    assert sum(a == "skipped" for a, _ in _statuses(results).values()) == 3
    assert {p.name: p.stat().st_mtime_ns for p in files[1:]} == {k: before[k] for k in sorted(before)[1:]}
    assert len(no_figures) == 2 and len(no_figures[-1]) == 4  # the report covers every run in the folder


def test_interrupted_point_resumes_from_its_checkpoint_to_the_same_end(tmp_path):
    (name, config), = expand_grid(BASE, {"optimizer": ["adam"]}, 1)
    straight = run_point(name, config.to_dict(), tmp_path / "straight.h5")
    trainer, run = start_run(config, tmp_path / "cut.h5")
    trainer.train(run, 6)
    run.set_status("interrupted", "killed")
    resumed = run_point(name, config.to_dict(), tmp_path / "cut.h5")
    assert (straight["action"], resumed["action"], resumed["status"]) == ("ran", "resumed", "finished")
    a, b = RunFile.open(tmp_path / "straight.h5").metrics(), RunFile.open(tmp_path / "cut.h5").metrics()
    assert a["step"].tolist() == b["step"].tolist() and a["loss"].tobytes() == b["loss"].tobytes()


def test_diverged_point_is_recorded_and_not_retried_while_the_sweep_goes_on(tmp_path, no_figures):
    points = expand_grid({**BASE, "grad_clip": None}, {"optimizer": ["sgd"], "lr": [0.05, 1e6]}, 1)
    results = run_sweep(points, tmp_path, workers=1)
    assert _statuses(results) == {"sgd-lr=0.05-seed=0": ("ran", "finished"),
                                  "sgd-lr=1000000.0-seed=0": ("ran", "diverged")}
    diverged = tmp_path / "sgd-lr=1000000.0-seed=0.h5"
    assert RunFile.open(diverged).status == "diverged"
    mtime = diverged.stat().st_mtime_ns
    again = run_sweep(points, tmp_path, workers=1)
    assert _statuses(again)["sgd-lr=1000000.0-seed=0"] == ("skipped", "diverged")
    assert diverged.stat().st_mtime_ns == mtime
    assert "| 0 | 1 |" in (tmp_path / "results.md").read_text()  # 0 finished, 1 diverged for the huge lr


def test_existing_file_with_another_config_is_an_error_not_overwritten(tmp_path):
    (name, config), = expand_grid(BASE, {"optimizer": ["adam"]}, 1)
    trainer, run = start_run(config.replace(steps=4), tmp_path / f"{name}.h5")
    trainer.train(run, 4)
    result = run_point(name, config.to_dict(), tmp_path / f"{name}.h5")
    assert result["status"] == "error" and "different config" in result["message"]
    assert RunFile.open(tmp_path / f"{name}.h5").config["steps"] == 4


def test_dask_local_cluster_runs_the_same_points(tmp_path, no_figures):
    distributed = pytest.importorskip("distributed", reason="the Dask path needs pip install 'minidiff[distributed]'")
    points = expand_grid(BASE, {"optimizer": ["adam", "sgd"]}, seeds=1)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        results = run_sweep(points, tmp_path, scheduler=client)
        assert _statuses(results) == {"adam-seed=0": ("ran", "finished"), "sgd-seed=0": ("ran", "finished")}
        again = run_sweep(points, tmp_path, scheduler=client)
    assert set(_statuses(again).values()) == {("skipped", "finished")}
    assert RunFile.open(tmp_path / "sgd-seed=0.h5").metrics()["step"][-1] == 12


def test_missing_dask_raises_one_line_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(MissingExtra, match=r"pip install 'minidiff\[distributed\]'"):
        run_sweep(expand_grid(BASE, {}, 1), tmp_path, scheduler="tcp://127.0.0.1:1")
