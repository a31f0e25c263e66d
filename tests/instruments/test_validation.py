"""The held-out validation loss: the logged numbers are diffusion.training_loss on the fixed triples, the triples are
the same for every seed, and a run with validation trains exactly like one without."""

import numpy as np
import pytest

from minidiff.datasets import load_dataset
from minidiff.diffusion.losses import training_loss
from minidiff.diffusion.timesteps import timestep_bucket_edges
from minidiff.instruments.validation import validation_set
from minidiff.models import build_model
from minidiff.runs.file import RunFile
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import Trainer
from minidiff.training.session import start_run

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), groups=4)


def tiny(**changes):
    base = dict(dataset="digits", model="unet", model_options=TINY_UNET, batch_size=16, steps=8, timesteps=100,
                log_every=4, ckpt_every=8, sample_every=100, probe_every=0, eval_every=0, val_every=4,
                val_samples=50, timestep_buckets=4, prediction="v", weighting="min_snr")
    return TrainConfig(**{**base, **changes})


def test_the_validation_set_is_stratified_over_the_buckets_and_repeats_the_held_out_images():
    test = load_dataset("digits", seed=0).test
    vs = validation_set(test, 1000, 10, 1024)
    counts = np.bincount(vs.bucket, minlength=10)
    assert set(counts.tolist()) == {102, 103} and counts.sum() == 1024
    edges = timestep_bucket_edges(1000, 10)
    assert np.all(edges[vs.bucket] <= vs.t) and np.all(vs.t < edges[vs.bucket + 1])
    assert vs.x0.shape == (1024, 1, 8, 8) and vs.x0[len(test)].tobytes() == test[0].tobytes()
    assert vs.noise.dtype == np.float64 and abs(vs.noise.std() - 1.0) < 0.02
    # the t are shuffled over the samples: the buckets are not in blocks of consecutive images
    assert len(set(vs.bucket[:50].tolist())) > 5


def test_the_validation_set_is_the_same_for_every_seed_of_the_digits():
    a = validation_set(load_dataset("digits", seed=0).test, 100, 4, 300)
    b = validation_set(load_dataset("digits", seed=5).test, 100, 4, 300)
    for x, y in zip(a[:4], b[:4]):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    c = validation_set(load_dataset("digits", seed=5).test, 100, 4, 300, seed=1)
    assert c.noise.tobytes() != a.noise.tobytes()


def test_logged_values_are_training_loss_on_the_same_triples(tmp_path):
    config = tiny()
    trainer, run = start_run(config, tmp_path / "r.h5")
    trainer.train(run, 8)
    m = RunFile.open(tmp_path / "r.h5").metrics()
    assert m["step"].tolist() == [4, 8] and np.all(np.isfinite(m["val_loss"]))
    vs = validation_set(trainer.dataset.test, config.timesteps, config.timestep_buckets, config.val_samples)
    for suffix, params in (("", trainer.model.params), ("_ema", trainer.ema.params)):
        model = build_model(trainer.model_name, **trainer.model.config)
        model.load_params(params)
        out = training_loss(lambda x, t: model.forward(x, t, cache=False), vs.x0.astype(np.float32), trainer.schedule,
                            None, prediction="v", weighting="min_snr", t=vs.t, noise=vs.noise)
        per_sample = out.per_sample_loss.astype(np.float64)
        assert m[f"val_loss{suffix}"][-1] == pytest.approx(per_sample.mean(), rel=1e-6)
        direct = [per_sample[vs.bucket == b].mean() for b in range(4)]
        np.testing.assert_allclose(m[f"val_loss{suffix}_bucket"][-1], direct, rtol=1e-6)
    assert m["val_loss"][-1] != m["val_loss_ema"][-1]


def test_a_run_with_validation_is_bitwise_the_run_without(tmp_path):
    runs = []
    for i, val_every in enumerate((2, 0)):
        trainer, run = start_run(tiny(val_every=val_every), tmp_path / f"{i}.h5")
        trainer.train(run, 8)
        runs.append(trainer.state_dict())
    a, b = runs
    for k in a["params"]:
        assert a["params"][k].tobytes() == b["params"][k].tobytes()
        for name, arr in a["optimizer"]["buffers"][k].items():
            assert arr.tobytes() == b["optimizer"]["buffers"][k][name].tobytes()
    assert a["rng"] == b["rng"]
    assert "val_loss" not in RunFile.open(tmp_path / "1.h5").metrics()


def test_val_every_defaults_to_eval_every_and_needs_held_out_data():
    assert tiny(val_every=None, eval_every=7).resolved_val_every == 7
    assert Trainer(tiny(val_every=None, eval_every=7, holdout=0.0)).instruments.val_every == 0
    with pytest.raises(ValueError, match="no held-out samples"):
        Trainer(tiny(val_every=3, holdout=0.0))
    with pytest.raises(ValueError, match="val_samples"):
        tiny(val_samples=0).validated()
