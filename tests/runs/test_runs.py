"""minidiff.runs.file: exact checkpoints, metrics, no clobbering and damage reports. Writers, storage failures and
kills: test_run_file_writes.py."""

import json

import h5py
import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from helpers.run_files import new_run
from minidiff.runs.file import RunFile, RunFileError, RunFileExistsError
from minidiff.backend.strict import StrictArray


def _state(seed=0):
    """A state tree with every kind of leaf; finite, as a run file's checkpoint must be."""
    rng = np.random.default_rng(seed)
    rng.standard_normal(7)  # move the PCG64 state away from its seed-derived start
    return {
        "step": 123,
        "params": {"conv1": {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                             "b": rng.standard_normal(4)},
                   "embed": np.arange(12, dtype=np.int32).reshape(3, 4),
                   "odd": np.array([-0.0, 1e-45, 3e38], dtype=np.float32)},  # signed zero, subnormal, near max
        "optimizer": {"t": np.int64(41), "m": [rng.standard_normal(5), rng.standard_normal((2, 2))],
                      "beta1": 0.9, "amsgrad": False, "fortran": np.asfortranarray(rng.standard_normal((3, 2)))},
        "rng": rng.bit_generator.state,
        "mt": np.random.MT19937(5).state,
        "data": {"epoch": 3, "permutation": rng.permutation(10), "empty": np.zeros((0, 4)), "flags": np.array([True])},
        "name": "unet — ε-prediction", "nothing": None, "pair": (1, "a", np.float16(2.5)), "scalar0d": np.array(2.0),
        "huge": 2 ** 127 + 5, "tiny": 5e-324, "z": np.complex64(1 + 2j),
    }


def test_checkpoint_round_trip_is_bit_exact_including_128bit_rng_state(tmp_path):
    run = new_run(tmp_path)
    state = _state()
    run.save_checkpoint(state)
    assert_bitwise_equal(state, RunFile.open(tmp_path / "run.h5").load_checkpoint())
    run.log(124, loss=0.5)
    run.flush()  # the checkpoint is now copied into a rebuilt file: still exact, order kept
    back = RunFile.open(tmp_path / "run.h5").load_checkpoint()
    assert_bitwise_equal(state, back)
    restored, original = np.random.default_rng(), np.random.default_rng()
    restored.bit_generator.state, original.bit_generator.state = back["rng"], state["rng"]
    assert restored.standard_normal(5).tobytes() == original.standard_normal(5).tobytes()


def test_the_tree_store_keeps_nan_payloads_and_infinities_that_a_checkpoint_refuses(tmp_path):
    from minidiff.runs.tree import read_tree, write_tree

    nan_payload = np.array([np.nan, -0.0, np.inf], dtype=np.float32)
    nan_payload.view(np.uint32)[0] = 0x7FC01234  # a NaN with a payload: must survive bit for bit
    tree = {"odd": nan_payload, "inf": float("-inf"), "nan": float("nan"), "n": np.float64(np.nan)}
    with h5py.File(tmp_path / "t.h5", "w") as f:
        write_tree(f, "t", tree)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert_bitwise_equal(tree, read_tree(f["t"]))
    run = new_run(tmp_path)
    for where, bad in [("params/w", np.array([1.0, np.nan])), ("lr", float("inf")), ("m/0", np.float32(-np.inf))]:
        path = where.split("/")
        state = {"step": 1}
        node = state
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = bad
        with pytest.raises(ValueError, match=f"checkpoint/state/{where} holds (NaN|Inf)"):
            run.save_checkpoint(state)
    assert run.checkpoint_step is None and RunFile.open(tmp_path / "run.h5").checkpoint_step is None


def test_device_arrays_in_a_checkpoint_come_back_as_equal_host_arrays(tmp_path):
    w = np.random.default_rng(1).standard_normal((3, 3))
    run = new_run(tmp_path)
    run.save_checkpoint({"params": {"w": StrictArray(w)}}, step=5)
    run.log(5, loss=StrictArray(np.array(0.25, np.float32)), tl=StrictArray(np.ones(2)))
    assert run.metrics()["loss"][0] == 0.25 and run.metrics()["tl"].shape == (1, 2)
    back = run.load_checkpoint()["params"]["w"]
    assert type(back) is np.ndarray and back.tobytes() == w.tobytes() and run.checkpoint_step == 5


def test_batch_order_resumed_through_a_run_file_checkpoint_is_identical(tmp_path):
    from minidiff.datasets import BatchIterator

    data = np.arange(30.0)
    straight = BatchIterator(data, 4, seed=3)
    ref = [next(straight) for _ in range(16)]
    it = BatchIterator(data, 4, seed=3)
    for _ in range(5):
        next(it)
    new_run(tmp_path).save_checkpoint({"step": 5, "data": it.state_dict()})
    again = BatchIterator(data, 4, seed=0)
    again.load_state_dict(RunFile.open(tmp_path / "run.h5").load_checkpoint()["data"])
    np.testing.assert_array_equal(np.stack([next(again) for _ in range(11)]), np.stack(ref[5:]))


def test_unstorable_checkpoint_leaf_is_a_type_error_naming_its_path(tmp_path):
    run = new_run(tmp_path)
    with pytest.raises(TypeError, match="/state/opt/fn"):
        run.save_checkpoint({"step": 1, "opt": {"fn": print}})
    with pytest.raises(TypeError, match="keys must be non-empty strings"):
        run.save_checkpoint({"step": 1, 3: 1})
    assert run.checkpoint_step is None and not (tmp_path / "run.h5.tmp").exists()


def test_metrics_append_across_flushes_fill_gaps_with_nan_and_merge_same_step(tmp_path):
    run = new_run(tmp_path)
    for s in range(0, 50, 10):
        run.log(s, loss=1.0 / (s + 1), lr=1e-3)
    run.flush()
    run.log(50, loss=0.02)
    run.log(50, timestep_loss=np.arange(4.0), grad_norm=np.float32(2.0))  # same step: same row
    run.log(60, loss=0.01)
    run.flush()
    run.log(60, lr=5e-4)  # fills in the row already on disk
    run.close()
    m = RunFile.open(tmp_path / "run.h5").metrics()
    np.testing.assert_array_equal(m["step"], [0, 10, 20, 30, 40, 50, 60])
    np.testing.assert_array_equal(m["loss"], [1.0, 1 / 11, 1 / 21, 1 / 31, 1 / 41, 0.02, 0.01])
    assert np.isnan(m["lr"][5]) and m["lr"][6] == 5e-4
    assert m["timestep_loss"].shape == (7, 4) and np.isnan(m["timestep_loss"][[0, 6]]).all()
    np.testing.assert_array_equal(m["timestep_loss"][5], np.arange(4.0))
    with h5py.File(tmp_path / "run.h5", "r") as f:  # chunked and resizable, as documented
        assert f["metrics/loss"].chunks is not None and f["metrics/loss"].maxshape == (None,)
        assert f["metrics/timestep_loss"].maxshape == (None, 4)


def test_metrics_reject_steps_going_back_and_changing_widths(tmp_path):
    run = new_run(tmp_path)
    run.log(10, loss=1.0, tl=np.zeros(3))
    with pytest.raises(ValueError, match="went back from 10 to 9"):
        run.log(9, loss=1.0)
    with pytest.raises(ValueError, match="'tl' must stay"):
        run.log(11, tl=np.zeros(4))
    with pytest.raises(ValueError, match="'loss' must stay"):
        run.log(11, loss=np.zeros(2))


def test_existing_run_is_never_overwritten_without_the_flag(tmp_path):
    run = new_run(tmp_path)
    run.save_checkpoint({"step": 1})
    before = (tmp_path / "run.h5").read_bytes()
    with pytest.raises(RunFileExistsError, match="already exists; pass overwrite=True"):
        new_run(tmp_path)
    assert (tmp_path / "run.h5").read_bytes() == before
    fresh = new_run(tmp_path, overwrite=True)
    assert fresh.checkpoint_step is None and RunFile.open(tmp_path / "run.h5").checkpoint_step is None


def test_root_attributes_record_identity_versions_and_status(tmp_path):
    run = new_run(tmp_path, backend="cupy", versions={"cupy": "13.3.0"})
    run.set_status("diverged", "loss is NaN at step 7")
    a = RunFile.open(tmp_path / "run.h5").attrs
    assert a["format"] == "minidiff-run" and a["format_version"] == 1 and a["status"] == "diverged"
    assert a["status_message"] == "loss is NaN at step 7" and a["command_line"] == "minidiff train --lr 1e-3"
    assert json.loads(a["config"]) == {"lr": 1e-3, "optimizer": "adam"} and a["backend"] == "cupy"
    assert a["numpy_version"] == np.__version__ and a["cupy_version"] == "13.3.0" and a["created"].startswith("20")
    with pytest.raises(ValueError, match="status must be one of"):
        run.set_status("paused")


def test_samples_are_stored_per_step_with_sampler_attributes(tmp_path):
    run = new_run(tmp_path)
    imgs = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    run.add_samples(100, imgs, sampler="ddim", steps=20, ema=True)
    run.add_samples(200, imgs[::-1], sampler="ddpm", steps=1000, ema=False)
    ro = RunFile.open(tmp_path / "run.h5")
    assert ro.sample_steps() == [100, 200]
    got, attrs = ro.load_samples(100)
    np.testing.assert_array_equal(got, imgs)
    assert attrs == {"sampler": "ddim", "steps": 20, "ema": True, "step": 100}
    with pytest.raises(TypeError, match="uint8"):
        run.add_samples(300, imgs.astype(np.float32))


def test_resume_drops_metrics_and_samples_after_the_checkpoint_step(tmp_path):
    run = new_run(tmp_path)
    for s in range(1, 11):
        run.log(s, loss=float(s))
        if s == 6:
            run.save_checkpoint({"step": s, "w": np.full(3, s)})
            run.add_samples(6, np.zeros((1, 1, 2, 2), np.uint8))
    run.add_samples(9, np.zeros((1, 1, 2, 2), np.uint8))
    run.set_status("interrupted")
    again = RunFile.open(tmp_path / "run.h5", mode="a")
    state = again.resume()
    assert state["step"] == 6 and again.status == "running"
    np.testing.assert_array_equal(again.metrics()["step"], [1, 2, 3, 4, 5, 6])
    again.log(7, loss=70.0)  # the continued run logs step 7 once, not twice
    again.close()
    ro = RunFile.open(tmp_path / "run.h5")
    np.testing.assert_array_equal(ro.metrics()["loss"], [1, 2, 3, 4, 5, 6, 70])
    assert ro.sample_steps() == [6]


def test_set_config_replaces_the_stored_config_and_keeps_the_checkpoint(tmp_path):
    run = new_run(tmp_path)
    run.save_checkpoint(_state())
    run.set_config({"steps": 12, "seed": 0})
    reopened = RunFile.open(tmp_path / "run.h5")
    assert reopened.config == {"steps": 12, "seed": 0} and reopened.checkpoint_step == run.checkpoint_step
    assert_bitwise_equal(reopened.load_checkpoint(), _state())
    with pytest.raises(RunFileError, match="read-only"):
        reopened.set_config({"steps": 1})
    with pytest.raises(ValueError, match="JSON"):
        run.set_config({"steps": object()})


def test_read_only_run_refuses_writes_and_resume_without_a_checkpoint_starts_over(tmp_path):
    run = new_run(tmp_path)
    run.log(1, loss=1.0)
    run.add_samples(1, np.zeros((1, 1, 2, 2), np.uint8))
    run.set_status("interrupted", "killed")
    run.close()
    ro = RunFile.open(tmp_path / "run.h5")
    with pytest.raises(RunFileError, match="read-only"):
        ro.log(2, loss=1.0)
    with pytest.raises(RunFileError, match="holds no checkpoint"):
        ro.load_checkpoint()
    assert len(ro.metrics()["step"]) == 1 and ro.sample_steps() == [1]
    again = RunFile.open(tmp_path / "run.h5", mode="a")
    assert again.resume() is None  # nothing to continue from: step 0, with the stored config
    back = RunFile.open(tmp_path / "run.h5")
    assert back.status == "running" and len(back.metrics()["step"]) == 0 and back.sample_steps() == []
    assert back.config == {"lr": 1e-3, "optimizer": "adam"}


def test_leftover_tmp_from_a_killed_flush_is_ignored_then_removed(tmp_path):
    run = new_run(tmp_path)
    run.save_checkpoint({"step": 3})
    (tmp_path / "run.h5.tmp").write_bytes(b"\x89HDF\r\n\x1a\n half a file")
    assert RunFile.open(tmp_path / "run.h5").checkpoint_step == 3 and (tmp_path / "run.h5.tmp").exists()
    RunFile.open(tmp_path / "run.h5", mode="a")
    assert not (tmp_path / "run.h5.tmp").exists()


def _flip_bytes(path, offset, n=4):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def test_damaged_files_give_one_clear_error_naming_the_damaged_part(tmp_path):
    run = new_run(tmp_path)
    for s in range(5):
        run.log(s, loss=float(s))
    run.save_checkpoint({"step": 4, "params": {"w": np.ones(1000, np.float32)}})
    good = (tmp_path / "run.h5").read_bytes()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        w_at = f["checkpoint/state/params/w"].id.get_offset()
        loss_at = f["metrics/loss"].id.get_chunk_info(0).byte_offset
    cases = {"garbage": (b"not hdf5 at all" * 10, "not an HDF5 file"),
             "empty": (b"", "not an HDF5 file"),
             "truncated": (good[: len(good) // 2], "HDF5 structure is damaged or the file is truncated")}
    for what, (raw, problem) in cases.items():
        p = tmp_path / f"{what}.h5"
        p.write_bytes(raw)
        with pytest.raises(RunFileError, match=problem) as err:
            RunFile.open(p)
        assert str(p) in str(err.value) and "\n" not in str(err.value)
    for what, offset, part in [("ckpt", w_at, "checkpoint is damaged: /checkpoint/state/params/w: checksum"),
                               ("metric", loss_at, r"metrics/loss is damaged \(checksum mismatch\)")]:
        p = tmp_path / f"{what}.h5"
        p.write_bytes(good)
        _flip_bytes(p, offset + 8)
        with pytest.raises(RunFileError, match=part):
            RunFile.open(p)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(RunFileError, match="not a minidiff run file"):
        RunFile.open(tmp_path / "other.h5")
    with pytest.raises(RunFileError, match="run file not found"):
        RunFile.open(tmp_path / "missing.h5")


def _edit(path, fn):
    """Change a run file in place with h5py, as a tool or a hand would: checksums stay valid where fn updates them."""
    with h5py.File(path, "r+") as f:
        fn(f)


def _set_leaf(f, name, value):
    """Replace a checkpoint leaf and its checksum: damage that only the content checks can see."""
    from minidiff.runs.tree import crc32_of

    ds = f[name]
    value = np.asarray(value, dtype=ds.dtype).reshape(ds.shape)
    ds[...] = value
    ds.attrs["crc32"] = crc32_of(value)


def _edited_cases():
    """(name, edit, fragment of the one-line error) for damage that keeps every checksum valid."""
    nan_w = lambda f: _set_leaf(f, "checkpoint/state/params/w", np.full(1000, np.nan))  # noqa: E731
    inf_m = lambda f: _set_leaf(f, "checkpoint/state/optimizer/exp_avg_sq", [np.inf, 1.0])  # noqa: E731

    def new_sample(name):
        return lambda f: f["samples"].create_dataset(name, data=np.zeros((1, 1, 2, 2), np.uint8))
    return [
        ("format_version array", lambda f: f.attrs.__setitem__("format_version", [1, 2]), "'format_version'"),
        ("format_version text", lambda f: f.attrs.__setitem__("format_version", "1"), "'format_version'"),
        ("config list", lambda f: f.attrs.__setitem__("config", "[1, 2]"), "'config' is damaged (a JSON object"),
        ("config number", lambda f: f.attrs.__setitem__("config", "5"), "'config' is damaged"),
        ("status bogus", lambda f: f.attrs.__setitem__("status", "flying"), "'status' is damaged"),
        ("step text", lambda f: f["checkpoint"].attrs.__setitem__("step", "abc"), "attribute 'step' is damaged"),
        ("step negative", lambda f: f["checkpoint"].attrs.__setitem__("step", -3), "attribute 'step' is damaged"),
        ("step disagrees", lambda f: f["checkpoint"].attrs.__setitem__("step", 12), "(12) and checkpoint/state/step"),
        ("samples abc", new_sample("abc"), "samples/abc is damaged (a step number"),
        ("NaN parameter", nan_w, "checkpoint/state/params/w holds NaN (1000 of 1000 values)"),
        ("Inf moment", inf_m, "checkpoint/state/optimizer/exp_avg_sq holds Inf (1 of 2 values)"),
        ("metric step back", lambda f: _set_leaf(f, "metrics/step", [0, 1, 1, 3, 4]), "metrics/step is damaged"),
    ]


@pytest.mark.parametrize("name, edit, fragment", _edited_cases(), ids=[c[0] for c in _edited_cases()])
def test_edited_files_with_valid_checksums_are_refused_naming_the_part_by_every_open(tmp_path, name, edit,
                                                                                     fragment):
    run = new_run(tmp_path)
    for s in range(5):
        run.log(s, loss=float(s))
    run.save_checkpoint({"step": 4, "params": {"w": np.ones(1000, np.float32)},
                         "optimizer": {"exp_avg_sq": np.ones(2)}})
    run.add_samples(4, np.zeros((1, 1, 2, 2), np.uint8))
    run.close()
    path = tmp_path / "run.h5"
    _edit(path, edit)
    before = path.read_bytes()
    for mode in ("r", "a"):
        with pytest.raises(RunFileError) as err:
            RunFile.open(path, mode=mode)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message
    assert path.read_bytes() == before and not (tmp_path / "run.h5.lock").exists()
