"""minidiff evaluate: a run's sample quality between its floor (real data) and ceiling (noise), and bad input."""

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from helpers.cli import assert_one_line_error
from minidiff.training.config import TrainConfig
from minidiff.study.run_tools import evaluate_run
from minidiff.runs.file import RunFile
from minidiff.training.session import start_run

pytestmark = pytest.mark.usefixtures("one_blas_thread")

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), groups=4)
# the run evaluates itself at its last step with these settings, so `evaluate` with its defaults must reproduce it
COMMON = dict(timesteps=100, batch_size=64, log_every=50, sample_every=1000, probe_every=0, eval_samples=128,
              eval_steps=10)


def _train(path, **config):
    config = TrainConfig(**{**COMMON, **config})
    trainer, run = start_run(config, path)
    trainer.train(run, config.steps)
    return path


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("moons") / "m.h5", dataset="moons", steps=200, eval_every=100)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("digits") / "d.h5", dataset="digits", model_options=TINY_UNET, steps=120,
                  eval_every=120)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _last_logged(path, metric):
    m = RunFile.open(path).metrics()
    return m[metric][np.isfinite(m[metric])][-1]


@pytest.mark.parametrize("run, metric", [("moons_run", "swd"), ("digits_run", "fd")])
def test_trained_run_scores_between_floor_and_ceiling_and_reproduces_its_own_last_evaluation(request, run, metric):
    path = request.getfixturevalue(run)
    r = evaluate_run(path)
    assert (r["metric"], r["n"], r["steps"], r["step"]) == (metric, 128, 10, RunFile.open(path).checkpoint_step)
    assert np.isfinite(r["value"]) and 0 < r["floor"] < r["ceiling"]
    # trained a little: far nearer the floor than the ceiling, yet not below what real data scores
    assert 0.9 * r["floor"] < r["value"] < r["floor"] + 0.5 * (r["ceiling"] - r["floor"]), r
    assert r["value"] == _last_logged(path, metric)  # same samples, same metric: bit for bit what training logged


@pytest.mark.parametrize("run", ["moons_run", "digits_run"])
def test_ema_and_raw_weights_give_different_numbers(request, run):
    path = request.getfixturevalue(run)
    ema, raw = evaluate_run(path), evaluate_run(path, use_ema=False)
    assert raw["ema"] is False and np.isfinite(raw["value"])
    assert ema["value"] != raw["value"]
    assert (ema["floor"], ema["ceiling"]) == (raw["floor"], raw["ceiling"])  # the references do not depend on it


def test_floor_and_ceiling_are_measured_at_the_requested_sample_count(moons_run):
    small, large = evaluate_run(moons_run, n=16, num_steps=5), evaluate_run(moons_run, n=400, num_steps=5)
    assert (small["n"], small["steps"]) == (16, 5)
    assert small["floor"] > large["floor"]  # fewer real points lie further from the held-out ones


def test_cli_prints_value_floor_and_ceiling_and_json(digits_run):
    result = invoke("evaluate", digits_run, "--n", 64, "--steps", 5, "--seed", 1)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "64 DDIM samples (5 steps, seed 1)" in lines[0] and "EMA" in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ["fd", "floor", "ceiling"]
    result = invoke("evaluate", digits_run, "--n", 64, "--steps", 5, "--seed", 1, "--no-ema", "--json")
    r = json.loads(result.output)
    assert (r["metric"], r["n"], r["ema"]) == ("fd", 64, False) and r["floor"] < r["ceiling"]


def test_strict_backend_run_evaluates_like_the_cpu_one(tmp_path):
    # the strict backend refuses implicit host conversions as CuPy does: evaluation must make none
    values = [evaluate_run(_train(tmp_path / f"{d}.h5", dataset="moons", steps=20, eval_every=0, device=d),
                           n=32, num_steps=4)["value"] for d in ("cpu", "strict")]
    assert values[0] == values[1]


def test_bad_input_is_one_line_exit_2(tmp_path, moons_run):
    (tmp_path / "garbage.h5").write_bytes(b"not an hdf5 file at all")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("garbage.h5", "other.h5", "notes.txt"):
        assert_one_line_error(invoke("evaluate", tmp_path / name), name)
    assert_one_line_error(invoke("evaluate", tmp_path / "absent.h5"), "absent.h5")
    assert_one_line_error(invoke("evaluate", moons_run, "--n", "1"), "--n")
    assert_one_line_error(invoke("evaluate", moons_run, "--steps", "500"), "steps", "100")


def test_data_without_a_quality_metric_says_so_in_one_line(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "mine.npy", images)  # 8x8 images, but not the digits: no classifier feature space for them
    path = _train(tmp_path / "u.h5", dataset=str(tmp_path / "mine.npy"), model_options=TINY_UNET, batch_size=8,
                  steps=1, eval_every=0, sample_every=1, sample_count=2, sample_steps=2)
    assert_one_line_error(invoke("evaluate", path), "no sample-quality metric", "mine.npy", "minidiff sample")


def test_run_without_a_checkpoint_says_so(tmp_path):
    RunFile.create(tmp_path / "new.h5", TrainConfig(dataset="moons").to_dict()).close()
    assert_one_line_error(invoke("evaluate", tmp_path / "new.h5"), "no checkpoint")


def test_samples_that_blow_up_are_one_line_not_a_nan_score(moons_run, monkeypatch):
    monkeypatch.setattr("minidiff.training.trainer.Trainer.sample", lambda self, n, **kw: np.full((n, 2), np.nan))
    assert_one_line_error(invoke("evaluate", moons_run), "NaN or Inf", "step 200")
