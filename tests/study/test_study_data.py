"""The momentum study's data collection (scripts/study_data.py): what a run file becomes in runs.csv, and that a
collect made while stages still train tabulates only the runs that have ended."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from minidiff.runs.file import RunFile
from minidiff.training.config import TrainConfig
from minidiff.training.session import start_run

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def study_data(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("study_data", None)
    import study_data
    return study_data


def _config(seed):
    return TrainConfig(dataset="moons", steps=6, timesteps=40, batch_size=32, log_every=2, ckpt_every=2,
                       sample_every=100, probe_every=0, eval_every=0, val_every=2, val_samples=64, seed=seed)


def test_collect_keeps_the_runs_that_ended_and_leaves_out_one_still_training(tmp_path, study_data, capsys):
    stage = tmp_path / "runs" / "batch-moons"
    stage.mkdir(parents=True)
    manifest = {}
    for seed, until in ((0, 6), (1, 6), (2, 4)):   # seed 2 stops part way, as a run does while its stage trains
        config = _config(seed)
        trainer, run = start_run(config, stage / f"s{seed}.h5")
        trainer.train(run, until)
        if until < config.steps:
            run.set_status("interrupted", "stopped part way")
        manifest[f"s{seed}"] = {"config": config.to_dict(), "setting": "sgd", "commit": "abc"}
    (stage / "manifest.json").write_text(json.dumps(manifest))
    assert RunFile.open(stage / "s2.h5").status != "finished"

    study_data.collect(tmp_path / "runs", tmp_path / "docs")

    with open(tmp_path / "docs" / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["seed"] for r in rows] == ["0", "1"] and {r["status"] for r in rows} == {"finished"}
    assert "left out 1 runs that have not ended: batch-moons/s2" in capsys.readouterr().out
    best = []
    for r in rows:
        m = RunFile.open(stage / f"s{r['seed']}.h5").metrics()
        val = m["val_loss"][np.isfinite(m["val_loss"])]
        assert float(r["val_loss"]) == val[-1]
        best.append(val.min())
    # the target: the worse of the two best raw validation losses, rounded up at the third digit; both reach it
    assert max(best) <= float(rows[0]["target"]) <= max(best) * 1.01
    assert all(r["steps_to_target"] != "" for r in rows)
    loaded, series = study_data.load(tmp_path / "docs")
    assert len(loaded) == 2 and sorted(series) == [0, 1]
