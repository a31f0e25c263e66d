"""Learning-rate schedules (endpoints, shape, validation) and the EMA of weights (against a hand EMA in torch)."""

import pickle
import tracemalloc

import h5py
import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from minidiff.backend import to_numpy
from minidiff.optim.ema import EMA
from minidiff.optim.lr_schedules import LR_SCHEDULES, make_lr_schedule


# --- schedules -----------------------------------------------------------------------------------------------------
def test_schedule_names():
    assert LR_SCHEDULES == ("constant", "warmup", "cosine", "warmup_cosine")


def test_constant_schedule_is_constant():
    s = make_lr_schedule("constant", 2e-4, 100)
    assert {s(k) for k in (0, 50, 99, 1000)} == {2e-4}


def test_linear_warmup_first_step_moves_and_reaches_lr_at_step_warmup_minus_one():
    s = make_lr_schedule("warmup", 1e-3, 100, warmup_steps=10)
    lrs = [s(k) for k in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == 1e-3 and lrs[8] < 1e-3 and lrs[99] == 1e-3
    assert np.all(np.diff(lrs) >= 0)


def test_cosine_goes_from_lr_to_min_lr_at_the_last_step_and_stays():
    s = make_lr_schedule("cosine", 1e-3, 101, min_lr=1e-5)
    lrs = np.array([s(k) for k in range(101)])
    assert lrs[0] == 1e-3 and lrs[100] == pytest.approx(1e-5, abs=1e-18) and s(500) == pytest.approx(1e-5)
    assert lrs[50] == pytest.approx((1e-3 + 1e-5) / 2)  # halfway in progress is halfway in rate
    assert np.all(np.diff(lrs) <= 0)


def test_warmup_cosine_rises_to_lr_then_decays_to_min_lr():
    s = make_lr_schedule("warmup_cosine", 1e-3, 100, warmup_steps=10, min_lr=0.0)
    lrs = np.array([s(k) for k in range(100)])
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == 1e-3 and lrs.max() == 1e-3
    assert lrs[99] == pytest.approx(0.0, abs=1e-18)
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[9:]) < 0)


def test_warmup_cosine_without_warmup_is_cosine():
    a = make_lr_schedule("warmup_cosine", 1e-3, 50)
    b = make_lr_schedule("cosine", 1e-3, 50)
    assert [a(k) for k in range(60)] == [b(k) for k in range(60)]


def test_schedule_is_picklable_data():
    s = make_lr_schedule("warmup_cosine", 1e-3, 100, warmup_steps=10)
    assert pickle.loads(pickle.dumps(s))(37) == s(37)


@pytest.mark.parametrize("kwargs, param", [
    ({"name": "linear"}, "linear"),
    ({"lr": -1.0}, "lr"),
    ({"min_lr": 1.0}, "min_lr"),
    ({"total_steps": 0}, "total_steps"),
    ({"warmup_steps": 200}, "warmup_steps"),
    ({"warmup_steps": -1}, "warmup_steps"),
])
def test_invalid_schedule_arguments_raise_value_error_naming_them(kwargs, param):
    args = {"name": "warmup_cosine", "lr": 1e-3, "total_steps": 100, "warmup_steps": 10, "min_lr": 0.0, **kwargs}
    with pytest.raises(ValueError, match=param):
        make_lr_schedule(**args)


# --- EMA -----------------------------------------------------------------------------------------------------------
SHAPES = {"w": (4, 3), "b": (3,)}


def _param_sequence(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(n)]


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_a_hand_ema_in_torch(torch, warmup):
    seq = _param_sequence(60)
    params = {k: v.copy() for k, v in seq[0].items()}
    ema = EMA(params, decay=0.95, warmup=warmup)
    ref = {k: torch.tensor(v) for k, v in seq[0].items()}
    for n, new in enumerate(seq[1:], start=1):
        for k in params:
            params[k][...] = new[k]
        d = ema.update(params)
        d_ref = min(0.95, (1 + n) / (10 + n)) if warmup else 0.95
        assert d == d_ref
        for k, t in ref.items():
            t.mul_(d_ref).add_(torch.tensor(new[k]), alpha=1 - d_ref)
            np.testing.assert_allclose(ema.params[k], t.numpy(), rtol=1e-12, atol=1e-15)


def test_ema_warmup_decay_values():
    ema = EMA({"x": np.zeros(1)}, decay=0.9999, warmup=True)
    assert ema.decay_at(1) == 2 / 11 and ema.decay_at(10) == 0.55 and ema.decay_at(10 ** 6) == 0.9999


def test_ema_is_a_copy_not_an_alias_of_the_weights():
    params = {"x": np.ones(3)}
    ema = EMA(params, decay=0.5)
    params["x"] += 1.0
    assert np.all(ema.params["x"] == 1.0)
    ema.update(params)
    np.testing.assert_array_equal(ema.params["x"], 1.5)
    target = {"x": np.zeros(3)}
    ema.copy_to(target)
    np.testing.assert_array_equal(target["x"], 1.5)


def test_ema_state_dict_round_trips_through_hdf5_and_continues_bit_identically(cpu_backend, tmp_path):
    seq = _param_sequence(20)
    params = {k: cpu_backend.asarray(v) for k, v in seq[0].items()}
    ema = EMA(params, decay=0.9, warmup=True)
    for new in seq[1:10]:
        ema.update({k: cpu_backend.asarray(v) for k, v in new.items()})
    sd = ema.state_dict()
    with h5py.File(tmp_path / "ema.h5", "w") as f:
        f.attrs.update({k: sd[k] for k in ("decay", "warmup", "num_updates")})
        for k, v in sd["params"].items():
            f.create_dataset(f"params/{k}", data=v)
    with h5py.File(tmp_path / "ema.h5", "r") as f:
        loaded = {**dict(f.attrs), "params": {k: f["params"][k][()] for k in f["params"]}}
    ema2 = EMA({k: cpu_backend.asarray(np.zeros(s)) for k, s in SHAPES.items()}, decay=0.5)
    ema2.load_state_dict(loaded)
    assert (ema2.decay, ema2.warmup, ema2.num_updates) == (0.9, True, 9)
    for new in seq[10:]:
        ema.update({k: cpu_backend.asarray(v) for k, v in new.items()})
        ema2.update({k: cpu_backend.asarray(v) for k, v in new.items()})
    host = [{k: to_numpy(v) for k, v in e.params.items()} for e in (ema, ema2)]
    assert_bitwise_equal(host[1], host[0])


def test_ema_update_makes_no_parameter_sized_temporaries():
    params = {"big": np.ones(100_000)}
    ema = EMA(params, decay=0.99)
    ema.update(params)
    tracemalloc.start()
    try:
        ema.update(params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.05 * params["big"].nbytes


def test_ema_refuses_decay_outside_unit_interval():
    with pytest.raises(ValueError, match="decay"):
        EMA({"x": np.zeros(1)}, decay=1.5)


@pytest.mark.parametrize("device", ["cpu", "strict"])
def test_ema_of_parameters_laid_end_to_end_is_the_per_array_ema_bit_for_bit(device, monkeypatch):
    """A model's parameters (minidiff.kernels.flat) are averaged in long chunks that cut across arrays: the same
    elementwise operations, so the same bits as array by array; a plain dict handed to update takes the per-array
    path."""
    from minidiff.optim import ema as ema_module
    from minidiff.backend import get_backend
    from minidiff.kernels.flat import FlatArrays, total_size
    monkeypatch.setattr(ema_module, "CHUNK_SIZE", 7)   # chunks that start and end inside arrays
    be = get_backend(device)
    shapes = {"w": (3, 4), "b": (5,), "k": (2, 2, 2)}
    rng = np.random.default_rng(8)
    steps = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)]
    flat = FlatArrays(shapes, be.xp.zeros(total_size(shapes), dtype=np.float32))
    plain = {k: be.xp.zeros(s, dtype=np.float32) for k, s in shapes.items()}
    emas = [EMA(p, decay=0.9, warmup=True) for p in (flat, plain)]
    assert emas[0]._chunks == [(0, 7), (7, 14), (14, 21), (21, 25)] and emas[1]._chunks is None
    for i, new in enumerate(steps):
        for p in (flat, plain):
            for k, v in new.items():
                p[k][...] = be.asarray(v)
        emas[0].update(flat if i != 3 else dict(flat))   # step 3: not laid out, so array by array
        emas[1].update(plain)
    flat_ema, plain_ema = ({k: to_numpy(e.params[k]) for k in shapes} for e in emas)
    assert_bitwise_equal(flat_ema, plain_ema)
