"""The training loop: determinism, resume equivalence, divergence, interruption, and the run file it leaves."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal, untimed
from minidiff.training.config import TrainConfig
from minidiff.runs.file import RunFile
from minidiff.training.session import resume_run, start_run
from minidiff.training.trainer import Trainer, TrainingDiverged

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), groups=4)


def tiny(**changes):
    base = dict(dataset="digits", model="unet", model_options=TINY_UNET, batch_size=16, steps=12, timesteps=100,
                log_every=3, ckpt_every=4, sample_every=6, sample_count=4, sample_steps=3)
    base.update(changes)
    return TrainConfig(**base)


def _state(trainer):
    s = trainer.state_dict()
    return s["params"], s["optimizer"], s["ema"]["params"]


@pytest.mark.parametrize("optimizer", ["adam", "nesterov"])
def test_same_config_and_seed_give_a_bitwise_identical_run(tmp_path, optimizer):
    runs = []
    for i in range(2):
        trainer, run = start_run(tiny(optimizer=optimizer), tmp_path / f"r{i}.h5")
        trainer.train(run, 8)
        runs.append((trainer, run))
    assert_bitwise_equal(_state(runs[0][0]), _state(runs[1][0]))
    assert_bitwise_equal(runs[0][1].metrics()["loss"], runs[1][1].metrics()["loss"])


def test_different_seeds_give_different_runs(tmp_path):
    a, ra = start_run(tiny(seed=0), tmp_path / "a.h5")
    b, rb = start_run(tiny(seed=1), tmp_path / "b.h5")
    a.train(ra, 3)
    b.train(rb, 3)
    assert not np.array_equal(a.state_dict()["params"]["conv_in.weight"], b.state_dict()["params"]["conv_in.weight"])


@pytest.mark.parametrize("config", [
    pytest.param(tiny(), id="unet-adam", marks=pytest.mark.slow),
    pytest.param(tiny(optimizer="momentum", timestep_sampling="loss_aware", prediction="v", weighting="min_snr"),
                 id="unet-momentum-lossaware-v", marks=pytest.mark.slow),
    pytest.param(tiny(dataset="moons", model="auto", model_options={}, batch_size=64), id="mlp-moons")])
def test_resume_continues_bitwise_identically(tmp_path, config):
    straight, run = start_run(config, tmp_path / "straight.h5")
    straight.train(run, 12)
    half, run = start_run(config, tmp_path / "half.h5")
    half.train(run, 5)  # stops off the checkpoint and log grid: the last checkpoint is written at the stop
    run.close()
    resumed, run = resume_run(tmp_path / "half.h5")
    assert resumed.step == 5
    resumed.train(run, 12)
    assert_bitwise_equal(untimed(straight.state_dict()), untimed(resumed.state_dict()))
    m_straight, m_resumed = (RunFile.open(tmp_path / f"{name}.h5").metrics() for name in ("straight", "half"))
    assert_bitwise_equal({k: m_resumed[k] for k in ("step", "loss")}, {k: m_straight[k] for k in ("step", "loss")})


def test_logged_grad_norm_is_the_pre_clip_mean_and_the_applied_norm_is_clipped(tmp_path):
    """`grad_norm` is the trainer's mean pre-clip norm, not the optimizer's diagnostic (the clipped norm at the log
    step, exactly 1e-3 at every log with grad_clip 1e-3); the clipped norm has its own name."""
    trainer, run = start_run(tiny(grad_clip=1e-3, probe_every=0, eval_every=0), tmp_path / "r.h5")
    trainer.train(run, 12)
    m = RunFile.open(tmp_path / "r.h5").metrics()
    assert np.all(m["grad_norm"] > 1e-2)                                    # an untrained net's gradient is large
    np.testing.assert_allclose(m["applied_grad_norm"], 1e-3, rtol=1e-4)     # what the optimizer was handed


def test_run_file_records_metrics_checkpoint_samples_and_status(tmp_path):
    trainer, run = start_run(tiny(), tmp_path / "r.h5", command_line="minidiff train --test")
    trainer.train(run, 12)
    run = RunFile.open(tmp_path / "r.h5")
    m = run.metrics()
    assert list(m["step"]) == [3, 6, 9, 12]
    for key in ("loss", "lr", "grad_norm", "applied_grad_norm", "step_time", "update_to_weight",
                "cos_grad_momentum"):
        assert np.all(np.isfinite(m[key])), key
    assert m["timestep_loss"].shape == (4, 10)
    assert run.status == "finished" and run.checkpoint_step == 12
    assert run.sample_steps() == [6, 12]
    images, attrs = run.load_samples(12)
    assert images.dtype == np.uint8 and images.shape == (4, 1, 8, 8) and attrs["sampler"] == "ddim"
    assert run.config == tiny().to_dict() | {"model_options": {**TINY_UNET, "channel_mults": [1, 2],
                                                                "attention_levels": [1]}}
    assert run.attrs["command_line"] == "minidiff train --test"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer, run = start_run(tiny(log_every=2, ckpt_every=2), tmp_path / "r.h5")
    trainer.train(run, 4)
    good = trainer.state_dict()["params"]
    trainer.model.params["conv_in.weight"][...] = np.nan
    with pytest.raises(TrainingDiverged, match="diverged"):
        trainer.train(run, 8)
    run = RunFile.open(tmp_path / "r.h5")
    assert run.status == "diverged" and run.checkpoint_step == 4
    assert_bitwise_equal(run.load_checkpoint()["params"], good)


def test_diverging_run_trained_from_python_raises_no_floating_point_warnings(tmp_path):
    # a sweep calls Trainer.train directly: a diverging point must not print pages of NumPy overflow warnings
    config = tiny(dataset="moons", model="auto", model_options={}, optimizer="sgd", lr=1e6, grad_clip=None,
                  log_every=2, probe_every=0, eval_every=0)
    trainer, run = start_run(config, tmp_path / "r.h5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingDiverged):
            trainer.train(run, config.steps)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


def test_resume_to_more_steps_extends_the_plan_unless_the_lr_schedule_depends_on_it(tmp_path):
    for schedule, extended in (("constant", True), ("cosine", False)):
        path = tmp_path / f"{schedule}.h5"
        trainer, run = start_run(tiny(dataset="moons", model="auto", model_options={}, steps=4,
                                      lr_schedule=schedule), path)
        trainer.train(run, 4)
        if extended:
            trainer, run = resume_run(path, steps=8)
            assert trainer.config.steps == 8 and RunFile.open(path).config["steps"] == 8
        else:
            before = path.read_bytes()
            with pytest.raises(ValueError, match="at most 4 steps"):
                resume_run(path, steps=8)
            assert path.read_bytes() == before


def test_model_option_the_model_does_not_take_is_a_clear_error():
    with pytest.raises(ValueError, match="model 'mlp' has no option 'base_channels'"):
        Trainer(tiny(dataset="moons", model="mlp"))


def test_unet_for_points_is_a_clear_error():
    with pytest.raises(ValueError, match="needs image data"):
        Trainer(tiny(dataset="moons", model="unet"))


def test_bad_config_values_name_the_option():
    for changes, name in [({"lr": -1.0}, "lr"), ({"beta1": 1.0}, "beta1"), ({"optimizer": "rmsprop"}, "optimizer"),
                          ({"batch_size": 0}, "batch_size"), ({"momentum": -0.1}, "momentum")]:
        with pytest.raises(ValueError, match=name):
            tiny(**changes).validated()


# A long run in a subprocess; argv: the run file, then the TrainConfig as JSON
_LONG_RUN = dict(dataset="moons", batch_size=32, steps=100000, timesteps=50, log_every=2, ckpt_every=3,
                 sample_every=100000, sample_steps=2)
_KILL_SCRIPT = """
import json, sys
from minidiff.training.config import TrainConfig
from minidiff.training.session import start_run
trainer, run = start_run(TrainConfig(**json.loads(sys.argv[2])), sys.argv[1])
print("started", flush=True)
trainer.train(run, 100000)
"""


def _start_long_run(path, **changes):
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(path), json.dumps(_LONG_RUN | changes)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started", proc.stderr.read()
    return proc


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_file_that_opens_and_resumes(tmp_path):
    """Kills at random moments in runs that checkpoint every step (a kill often lands inside a checkpoint write), and
    one in a run that never checkpoints, so its kill comes before the first checkpoint: every file opens, and resumes
    at its checkpoint, or at step 0. The delays leave time for the first step, so most trials resume a checkpoint."""
    rng = np.random.default_rng(0)
    trials = [({"ckpt_every": 1}, 1.0 + rng.uniform(0, 1.5)) for _ in range(4)] + [({"ckpt_every": 10**6}, 1.0)]
    resumed_at = []
    for trial, (changes, delay) in enumerate(trials):
        path = tmp_path / f"k{trial}.h5"
        proc = _start_long_run(path, **changes)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        run = RunFile.open(path)
        checkpoint = run.checkpoint_step
        run.close()
        trainer, run = resume_run(path)
        assert trainer.step == (checkpoint or 0), (trial, checkpoint)
        trainer.train(run, trainer.step + 2)
        run = RunFile.open(path)
        assert run.status == "finished"
        logged = run.metrics()["step"]
        assert np.all(np.diff(logged) > 0), logged   # the rows the killed run wrote past its checkpoint are gone
        resumed_at.append(checkpoint)
    print(f"\nSIGKILL trials resumed at checkpoints {resumed_at} (None: at step 0)")
    from_checkpoint = sum(step is not None for step in resumed_at[:-1])
    assert resumed_at[-1] is None and from_checkpoint >= 3, resumed_at   # both paths were taken, each really resumed


def test_sigint_checkpoints_the_step_it_stopped_at_and_resume_continues_bitwise_from_it(tmp_path):
    # no periodic checkpoints: the only one in the file is the one the interrupt wrote
    path, changes = tmp_path / "i.h5", {"ckpt_every": 10**6}
    proc = _start_long_run(path, **changes)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "TrainingInterrupted" in err, err
    stopped = int(re.search(r"interrupted at step (\d+)", err).group(1))
    run = RunFile.open(path)
    assert run.status == "interrupted" and f"at step {stopped}" in run.attrs["status_message"]
    assert stopped >= 1 and run.checkpoint_step == stopped
    m = run.metrics()
    assert m["step"][np.isfinite(m["loss"])][-1] == stopped - stopped % 2  # every log (every 2 steps) was flushed
    run.close()

    resumed, run = resume_run(path)
    assert resumed.step == stopped
    resumed.train(run, stopped + 5)
    straight, run2 = start_run(TrainConfig(**(_LONG_RUN | changes)), tmp_path / "straight.h5")
    straight.train(run2, stopped + 5)
    assert_bitwise_equal(untimed(straight.state_dict()), untimed(resumed.state_dict()))
    assert_bitwise_equal(RunFile.open(path).metrics()["loss"], RunFile.open(tmp_path / "straight.h5").metrics()["loss"])


def test_divergence_before_the_first_checkpoint_says_no_checkpoint_was_written(tmp_path):
    trainer, run = start_run(tiny(log_every=2, ckpt_every=4), tmp_path / "r.h5")
    trainer.model.params["conv_in.weight"][...] = np.nan
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet") as info:
        trainer.train(run, 8)
    assert "step None" not in str(info.value)
    run = RunFile.open(tmp_path / "r.h5")
    assert run.status == "diverged" and run.checkpoint_step is None


@pytest.mark.slow
def test_probes_and_evaluation_are_recorded_and_do_not_change_the_run(tmp_path):
    probed, run = start_run(tiny(probe_every=3, probe_buckets=3, probe_batch=8, eval_every=6, eval_samples=32,
                                 eval_steps=3), tmp_path / "p.h5")
    probed.train(run, 12)
    plain, run2 = start_run(tiny(probe_every=0, eval_every=0), tmp_path / "q.h5")
    plain.train(run2, 12)
    assert_bitwise_equal(_state(probed), _state(plain))
    run = RunFile.open(tmp_path / "p.h5")
    m = run.metrics()
    rows = np.isin(m["step"], [3, 6, 9, 12])
    assert m["probe_grad_norm"].shape[1] == 3 and np.all(m["probe_grad_norm"][rows] > 0)
    cos = m["probe_cosine"][-1].reshape(3, 3)
    np.testing.assert_allclose(np.diag(cos), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cos, cos.T, rtol=1e-6)
    for key in ("noise_scale", "momentum_alignment", "grad_cos_consecutive", "wall_time"):
        assert np.all(np.isfinite(m[key][rows])), key
    split = m["probe_split_half"][rows]   # the ceiling of each of the 3 buckets, a cosine
    assert split.shape == (4, 3) and np.all(np.abs(split) <= 1)
    assert np.all(np.diff(m["wall_time"][rows]) > 0)
    layers = json.loads(run.attrs["layer_names"])
    assert m["layer_update_to_weight"].shape[1] == len(layers) and "conv_in" in layers
    fd_rows = np.isfinite(m["fd"])
    assert list(m["step"][fd_rows]) == [6, 12] and np.all(m["fd"][fd_rows] > 0)
    assert not np.any(np.isfinite(RunFile.open(tmp_path / "q.h5").metrics().get("fd", np.array([np.nan]))))
