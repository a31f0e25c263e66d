"""The suite's own bitwise comparison (helpers.bitwise): it must see every difference np.array_equal misses, and
accept what is the same bit for bit (NaN with the same payload included)."""

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal, bitwise_problem
from minidiff.backend import get_backend


def _nan(payload):
    x = np.array([1.0, np.nan], dtype=np.float32)
    x.view(np.uint32)[1] = payload
    return x


def test_a_signed_zero_differs_from_zero():
    assert np.array_equal(np.array([0.0]), np.array([-0.0]))   # what the comparison must not do
    assert "flat index 1" in bitwise_problem(np.array([1.0, 0.0]), np.array([1.0, -0.0]))
    assert bitwise_problem(0.0, -0.0) is not None   # Python floats too
    assert bitwise_problem(np.float64(0.0), np.float64(-0.0)) is not None


def test_a_nan_equals_the_same_nan_and_not_another_payload():
    assert not np.array_equal(_nan(0x7FC00000), _nan(0x7FC00000))
    assert bitwise_problem(_nan(0x7FC00000), _nan(0x7FC00000)) is None
    assert bitwise_problem(float("nan"), float("nan")) is None
    assert bitwise_problem(_nan(0x7FC00000), _nan(0x7FC01234)) is not None


def test_a_dtype_shape_or_type_change_is_a_difference():
    x = np.arange(6.0)
    assert "dtype float64 vs float32" in bitwise_problem(x, x.astype(np.float32))
    assert "shape (6,) vs (2, 3)" in bitwise_problem(x, x.reshape(2, 3))
    assert bitwise_problem(x[0], x[:1]) is not None          # a scalar is not a one-element array
    assert bitwise_problem(1, 1.0) is not None and bitwise_problem([1], (1,)) is not None


def test_the_layout_in_memory_does_not_matter():
    x = np.arange(12.0).reshape(3, 4)
    assert bitwise_problem(x.T, np.ascontiguousarray(x.T)) is None


def test_the_message_names_the_first_differing_key_of_a_state_tree():
    a = {"step": 4, "params": {"w": np.ones(3), "b": np.zeros(2)}, "rng": [np.uint64(7), "pcg"]}
    b = {"step": 4, "params": {"w": np.ones(3), "b": np.array([0.0, -0.0])}, "rng": [np.uint64(7), "pcg"]}
    assert bitwise_problem(a, a) is None
    assert bitwise_problem(a, b).startswith("/params/b: bytes differ")
    assert bitwise_problem(a, {**a, "rng": [np.uint64(8), "pcg"]}).startswith("/rng[0]")
    assert "keys" in bitwise_problem(a, {"params": a["params"], "step": 4, "rng": a["rng"]})   # key order too
    with pytest.raises(AssertionError, match="/params/b"):
        assert_bitwise_equal(a, b)


def test_device_arrays_are_compared_on_the_host():
    strict = get_backend("strict")
    x = strict.asarray(np.array([0.0, 1.0]))
    assert bitwise_problem(x, strict.asarray(np.array([0.0, 1.0]))) is None
    assert bitwise_problem(x, strict.asarray(np.array([-0.0, 1.0]))) is not None
    assert bitwise_problem(x, np.array([0.0, 1.0])) is not None   # a device array is not a host one
