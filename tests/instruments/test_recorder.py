"""minidiff.instruments.recorder across a checkpoint: a resumed run logs at its first probe what an uninterrupted run
does."""

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from minidiff.backend import to_numpy
from minidiff.training.config import TrainConfig
from minidiff.runs.file import RunFile
from minidiff.training.session import resume_run, start_run
from minidiff.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_blas_thread")

PROBE = 4  # probes at steps 4, 8, ...; the checkpoint at step 3 is the one that must carry g_3


def _config(device):
    return TrainConfig(dataset="moons", timesteps=50, batch_size=16, steps=8, probe_every=PROBE, probe_batch=16,
                       noise_scale_micro_batches=2, eval_every=0, log_every=2, ckpt_every=3, sample_every=100,
                       device=device)


def _steps(trainer, n):
    pending = {}
    for _ in range(n):
        pending = trainer.train_step()[1]
    return pending


@pytest.mark.parametrize("device", ["cpu", "strict"])
def test_instruments_state_through_hdf5_gives_the_first_probe_its_consecutive_gradient_cosine(device, tmp_path):
    straight = Trainer(_config(device))
    expected = _steps(straight, PROBE)["grad_cos_consecutive"]

    first = Trainer(_config(device))
    _steps(first, PROBE - 1)
    run = RunFile.create(tmp_path / "r.h5", {})
    run.save_checkpoint({"step": first.step, "trainer": first.state_dict(),
                         "instruments": first.instruments.state_dict()})
    saved = RunFile.open(tmp_path / "r.h5").load_checkpoint()
    for k, g in first.instruments._previous_grads.items():  # host copies, bit for bit through HDF5
        assert_bitwise_equal(saved["instruments"]["previous_grads"][k], to_numpy(g), k)

    trainer_state = {k: v for k, v in saved["trainer"].items() if k != "instruments"}  # a checkpoint without them
    without = Trainer(_config(device))
    without.load_state_dict(trainer_state)
    assert "grad_cos_consecutive" not in _steps(without, 1)  # without the previous gradients: nothing to log

    resumed = Trainer(_config(device))
    resumed.load_state_dict(trainer_state)
    resumed.instruments.load_state_dict(saved["instruments"])
    got = _steps(resumed, 1)["grad_cos_consecutive"]
    assert type(got) is type(expected)  # stays on the run's device
    assert to_numpy(got) == to_numpy(expected)


def test_instruments_state_off_the_step_before_a_probe_is_none_and_loads_as_none():
    trainer = Trainer(_config("cpu"))
    _steps(trainer, 1)
    assert trainer.instruments.state_dict() == {"previous_grads": None}
    trainer.instruments._previous_grads = {"w": np.zeros(1)}
    trainer.instruments.load_state_dict({"previous_grads": None})
    assert trainer.instruments._previous_grads is None
    with pytest.raises(ValueError, match="instruments state"):
        trainer.instruments.load_state_dict({"previous_grads": {"nosuch": np.zeros(1)}})


def test_resumed_run_logs_the_same_consecutive_gradient_cosine_at_its_first_probe(tmp_path):
    config = _config("cpu")
    straight_trainer, straight = start_run(config, tmp_path / "straight.h5")
    straight_trainer.train(straight, PROBE)
    trainer, run = start_run(config, tmp_path / "split.h5")
    trainer.train(run, PROBE - 1)
    trainer, run = resume_run(tmp_path / "split.h5")
    trainer.train(run, PROBE)
    a, b = (RunFile.open(tmp_path / f"{name}.h5").metrics() for name in ("straight", "split"))
    a, b = (m["grad_cos_consecutive"][list(m["step"]).index(PROBE)] for m in (a, b))
    assert np.isfinite(a) and a == b
