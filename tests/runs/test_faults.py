"""Fault injection, part 1: the trainer and its sessions against damaged checkpoints, non-finite state, sizes the
machine cannot hold and runs that stopped before their first checkpoint. Each case asserts the contract (README,
"Exit status"): a refusal is one line naming the file and the part, raised before a byte of the run file changes;
a divergence names a checkpoint only when it is finite; a resumed run is the uninterrupted run, bit for bit.
Part 2 (test_faults_cli.py) drives the command line: every reading command against damaged files, sizes,
decompression bombs; part 3 (test_faults_env.py) kills, two writers, a full disk. The trials of all three are
tallied per family (tests/helpers/faults.py) and printed at the end of each file."""

import json

import h5py
import numpy as np
import pytest

from helpers.bitwise import bitwise_problem, untimed
from helpers.faults import count, edit, metrics_problem, replace_leaf, set_leaf, tally_problem
from minidiff.runs.file import RunFile, RunFileError
from minidiff.runs import lock
from minidiff.runs.tree import crc32_of
from minidiff.training.config import TrainConfig
from minidiff.training.session import open_trainer, resume_run, start_run
from minidiff.training.sizes import SizeError
from minidiff.training.trainer import Trainer, TrainingDiverged

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), groups=4)


def tiny(**changes):
    base = dict(dataset="digits", model="unet", model_options=TINY_UNET, batch_size=16, steps=8, timesteps=50,
                log_every=2, ckpt_every=4, sample_every=4, sample_count=4, sample_steps=3, probe_every=0,
                eval_every=0)
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step digits run (checkpoints at 4 and 8) whose bytes each case copies and damages."""
    path = tmp_path_factory.mktemp("finished") / "r.h5"
    trainer, run = start_run(tiny(), path)
    trainer.train(run, 8)
    run.close()
    return path.read_bytes()


def _copy(finished, tmp_path, name="r.h5"):
    path = tmp_path / name
    path.write_bytes(finished)
    return path


# --- checkpoints that cannot continue the run: refused before anything changes ---------------------------------------
def _nan_ema(f):
    set_leaf(f, "checkpoint/state/ema/params/conv_in.weight", np.nan)


def _inf_moment(f):
    set_leaf(f, "checkpoint/state/optimizer/buffers/conv_in.weight/exp_avg_sq", np.inf)


def _nan_param(f):
    set_leaf(f, "checkpoint/state/params/conv_in.bias", np.nan)


CHECKPOINT_CASES = [
    ("NaN EMA", _nan_ema, "checkpoint/state/ema/params/conv_in.weight holds NaN"),
    ("Inf exp_avg_sq", _inf_moment, "checkpoint/state/optimizer/buffers/conv_in.weight/exp_avg_sq holds Inf"),
    ("NaN parameter", _nan_param, "checkpoint/state/params/conv_in.bias holds NaN"),
    ("parameter of another shape", lambda f: replace_leaf(f, "checkpoint/state/params/conv_in.bias",
                                                          np.zeros(5, np.float32)),
     "checkpoint/state/params/conv_in.bias is float32 (5,), this run needs float32 (8,)"),
    ("parameter of another dtype", lambda f: replace_leaf(f, "checkpoint/state/params/conv_in.bias",
                                                          np.zeros(8, np.float64)),
     "checkpoint/state/params/conv_in.bias is float64 (8,), this run needs float32 (8,)"),
    ("permutation out of range", lambda f: set_leaf(f, "checkpoint/state/data_order/permutation",
                                                    np.arange(f["checkpoint/state/data_order/permutation"].size) + 7),
     "checkpoint/state/data_order/permutation is not a permutation"),
    ("optimizer step disagrees", lambda f: _json_leaf(f, "checkpoint/state/optimizer/step", 3),
     "checkpoint/state/optimizer/step (3) disagrees with checkpoint/state/step (8)"),
    ("a missing part", lambda f: f.__delitem__("checkpoint/state/ema"), "checkpoint/state lacks ema"),
    ("rng state garbage", lambda f: _json_leaf(f, "checkpoint/state/rng/state/state", "abc"),
     "checkpoint/state/rng/state/state is a str, this run needs a int"),
    ("batch size 1e12", lambda f: _config(f, batch_size=10 ** 12), "batch_size 1000000000000 needs ~"),
    ("dataset is another file", lambda f: _config(f, dataset=str(f.filename)), "its data cannot be used"),
    ("config not a run config", lambda f: _config(f, lr="fast"), "'config' is not a usable run config"),
    ("model_options not a mapping", lambda f: _config(f, model_options=5), "model_options must be a mapping"),
]


def _json_leaf(f, name, value):
    """Replace a JSON checkpoint leaf (a number, a string) by another value, with a valid checksum."""
    del f[name]
    text = json.dumps(value)
    ds = f.create_dataset(name, data=text, dtype=h5py.string_dtype())
    ds.attrs.update(type="json", crc32=crc32_of(text.encode()))


def _config(f, **changes):
    config = json.loads(f.attrs["config"])
    config.update(changes)
    f.attrs["config"] = json.dumps(config)


@pytest.mark.parametrize("name, damage, fragment", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_checkpoint_that_cannot_continue_the_run_is_refused_before_a_byte_changes(finished, tmp_path, name,
                                                                                    damage, fragment):
    path = _copy(finished, tmp_path)
    edit(path, damage)
    before = path.read_bytes()
    for what, call in (("resume", lambda: resume_run(path, 12)), ("open_trainer", lambda: open_trainer(path))):
        with pytest.raises(RunFileError) as err:
            call()
        message = str(err.value)
        held = (message.startswith(f"{path}: ") and fragment in message and "\n" not in message
                and path.read_bytes() == before and lock.holder(path) is None)
        assert count("checkpoint content (API)", held), (what, message)
    assert not (tmp_path / "r.h5.lock").exists() and not (tmp_path / "r.h5.tmp").exists()


def test_a_sound_checkpoint_still_resumes_to_the_uninterrupted_run(finished, tmp_path):
    path = _copy(finished, tmp_path)
    trainer, run = resume_run(path, 12)
    trainer.train(run, 12)
    straight, run2 = start_run(tiny(steps=12), tmp_path / "straight.h5")
    straight.train(run2, 12)
    problem = bitwise_problem(untimed(straight.state_dict()), untimed(trainer.state_dict()))
    assert count("checkpoint content (API)", problem is None), problem


# --- divergence means any non-finite state -------------------------------------------------------------------------
def _divergence_message(tmp_path, config, poison=None):
    trainer, run = start_run(config, tmp_path / "d.h5")
    if poison is not None:
        trainer.train(run, 4)   # a finite checkpoint at step 4
        poison(trainer)
    with pytest.raises(TrainingDiverged) as err:
        trainer.train(run, config.steps)
    return str(err.value), RunFile.open(tmp_path / "d.h5")


# Parts that feed the loss (parameters, moments) make it non-finite by the next log, and the loss is named first;
# the EMA and Adam's second moment under a huge weight decay leave the loss finite, and only the state check sees them.
@pytest.mark.parametrize("whats, config, poison", [
    (["optimizer state (exp_avg_sq)"], tiny(weight_decay=1e30), None),
    (["EMA weights"], tiny(), lambda t: t.ema.params["conv_in.weight"].fill(np.nan)),
    (["loss", "optimizer state (exp_avg)"], tiny(),
     lambda t: t.optimizer.state["conv_in.bias"]["exp_avg"].fill(np.inf)),
    (["loss", "parameters"], tiny(), lambda t: t.model.params["conv_in.bias"].fill(np.nan)),
    (["loss", "optimizer state (momentum_buffer)"], tiny(optimizer="nesterov"),
     lambda t: t.optimizer.state["conv_in.bias"]["momentum_buffer"].fill(np.nan)),
    (["state (ema/params/conv_in.weight holds NaN"], tiny(log_every=10, ckpt_every=4, steps=12),
     lambda t: t.ema.params["conv_in.weight"].fill(np.nan)),   # found by the checkpoint at 8, before the log at 10
], ids=["weight decay 1e30", "NaN EMA", "Inf exp_avg", "NaN parameter", "NaN momentum", "at a checkpoint"])
def test_any_non_finite_state_stops_the_run_as_diverged_keeping_a_finite_checkpoint(tmp_path, whats, config, poison):
    message, run = _divergence_message(tmp_path, config, poison)
    kept = run.checkpoint_step
    held = (any(f"non-finite {what}" in message for what in whats) and run.status == "diverged"
            and (f"checkpoint (step {kept})" in message if kept is not None else "no checkpoint" in message))
    if kept is not None:   # the checkpoint it names opens (every leaf finite) and continues
        held = held and kept == 4 and open_trainer(tmp_path / "d.h5")[0].step == 4
    assert count("divergence", held), (message, kept)


# --- a run killed before its first checkpoint --------------------------------------------------------------------
def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0_as_the_uninterrupted_run(tmp_path):
    config = tiny(ckpt_every=6, steps=8)
    path = tmp_path / "early.h5"
    trainer, run = start_run(config, path)
    trainer.train(run, 3)   # logs at step 2 and a checkpoint at 3, the end of this call: drop it, as a kill would
    edit(path, lambda f: [f["checkpoint"].__delitem__("state"), f["checkpoint"].attrs.__delitem__("step")])
    run.close()
    del trainer, run
    assert RunFile.open(path).checkpoint_step is None and len(RunFile.open(path).metrics()["step"]) > 0
    resumed, run = resume_run(path)
    assert resumed.step == 0 and RunFile.open(path).status == "running"
    resumed.train(run, 8)
    straight, run2 = start_run(config, tmp_path / "straight.h5")
    straight.train(run2, 8)
    problems = [bitwise_problem(untimed(straight.state_dict()), untimed(resumed.state_dict())),
                metrics_problem(RunFile.open(tmp_path / "straight.h5").metrics(), RunFile.open(path).metrics())]
    assert count("kill before the first checkpoint (API)", problems == [None, None]), problems


def test_resuming_a_run_without_a_checkpoint_past_its_plan_is_a_run_planned_that_long(tmp_path):
    path = tmp_path / "early.h5"
    trainer, run = start_run(tiny(steps=8, lr_schedule="cosine"), path)   # cosine: the total matters
    run.close()
    del trainer, run
    resumed, run = resume_run(path, 10)
    resumed.train(run, 10)
    straight, run2 = start_run(tiny(steps=10, lr_schedule="cosine"), tmp_path / "straight.h5")
    straight.train(run2, 10)
    problems = [RunFile.open(path).config["steps"] == 10 or "plan not extended",
                bitwise_problem(untimed(straight.state_dict()), untimed(resumed.state_dict()))]
    assert count("kill before the first checkpoint (API)", problems == [True, None]), problems


# --- sizes refused before allocation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, fragment", [
    (dict(timesteps=10 ** 12, sample_steps=25), "timesteps 1000000000000 needs ~"),
    (dict(eval_every=4, eval_samples=10 ** 12), "eval_samples 1000000000000 needs ~"),
    (dict(batch_size=10 ** 12), "batch_size 1000000000000 needs ~"),
    (dict(model_options=dict(TINY_UNET, base_channels=2 ** 20, groups=4)), "model_options"),
    (dict(sample_count=10 ** 12), "sample_count 1000000000000 needs ~"),
], ids=["timesteps", "eval_samples", "batch_size", "base_channels", "sample_count"])
def test_a_size_the_machine_cannot_hold_is_refused_before_anything_exists(tmp_path, changes, fragment):
    path = tmp_path / "big.h5"
    with pytest.raises(SizeError) as err:
        start_run(tiny(**changes), path)
    message = str(err.value)
    held = fragment in message and "this machine has" in message and not path.exists()
    assert count("sizes (API)", held), message


def test_sampling_more_than_fits_is_refused_before_it_allocates(finished, tmp_path):
    trainer, _ = open_trainer(_copy(finished, tmp_path))
    with pytest.raises(SizeError, match="1000000000000 samples needs ~") as err:
        trainer.sample(10 ** 12, num_steps=2)
    assert count("sizes (API)", "this machine has" in str(err.value))


@pytest.mark.parametrize("shape", [(6, 7, 9), (6, 1, 1), (6, 3, 10, 7)], ids=["7x9", "1x1", "rgb 10x7"])
def test_images_the_unet_cannot_halve_are_refused_before_any_file_exists(tmp_path, shape):
    data = tmp_path / "odd.npy"
    np.save(data, np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8))
    path = tmp_path / "odd.h5"
    with pytest.raises(SizeError) as err:
        start_run(tiny(dataset=str(data), batch_size=2), path)
    held = "multiples of 2" in str(err.value) and f"{shape[-2]}x{shape[-1]}" in str(err.value) and not path.exists()
    assert count("sizes (API)", held), str(err.value)


def test_trainer_refuses_the_same_sizes_for_readers(tmp_path):
    with pytest.raises(SizeError, match="timesteps"):
        Trainer(tiny(timesteps=10 ** 12, sample_steps=25), start_workers=False)


def test_zz_print_the_tally_of_trials_per_family():
    """Last in the file (pytest keeps file order): every family's trials so far, and how many held the contract."""
    assert not tally_problem()
