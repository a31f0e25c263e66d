"""The suite's one bitwise comparison: two values are the same when they have the same structure and every array the
same type, dtype, shape and bytes.

np.array_equal is not that: it equates 0.0 and -0.0, calls NaN unequal to itself and ignores the dtype. A resumed run
must reproduce the uninterrupted one bit for bit, signs of zero and NaN payloads included, so every "bitwise" or
"same bits" claim in the suite goes through `bitwise_problem` or `assert_bitwise_equal`.
"""

import struct
from collections.abc import Mapping

import numpy as np

from minidiff.backend import to_numpy
from minidiff.backend.strict import StrictArray


def _is_device_array(x) -> bool:
    return isinstance(x, StrictArray) or type(x).__module__.split(".")[0] == "cupy"


def _array_problem(a, b, where):
    if a.dtype != b.dtype:
        return f"{where}: dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"{where}: shape {a.shape} vs {b.shape}"
    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    if a.tobytes() == b.tobytes():
        return None
    rows = a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1)
    i = int(np.argmax(rows.any(axis=1)))
    return f"{where}: bytes differ, first at flat index {i}: {a[i]!r} vs {b[i]!r}"


def bitwise_problem(a, b, where: str = "") -> str | None:
    """None when a and b are equal bit for bit, else the path of the first difference and what differs there.

    Mappings (dicts, FlatArrays): the same keys in the same order, then each value in turn. Lists and tuples: the same
    type and length, then each item. Arrays (NumPy; strict and CuPy arrays are copied to the host): the same type,
    dtype, shape and bytes in C order. Python floats: the same 8 bytes. Anything else: the same type and ==.
    """
    at = where or "(top level)"
    if type(a) is not type(b):
        return f"{at}: {type(a).__name__} vs {type(b).__name__}"
    if _is_device_array(a):
        a, b = to_numpy(a), to_numpy(b)
    if isinstance(a, Mapping):
        if list(a) != list(b):
            return f"{at}: keys {list(a)} vs {list(b)}"
        return next((p for k in a if (p := bitwise_problem(a[k], b[k], f"{where}/{k}"))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{at}: {len(a)} items vs {len(b)}"
        return next((p for i, (x, y) in enumerate(zip(a, b)) if (p := bitwise_problem(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, (np.ndarray, np.generic)):
        return _array_problem(np.asarray(a), np.asarray(b), at)
    same = struct.pack("<d", a) == struct.pack("<d", b) if isinstance(a, float) else a == b
    return None if same else f"{at}: {a!r} vs {b!r}"


def assert_bitwise_equal(a, b, where: str = ""):
    """Assert bitwise_problem(a, b) is None; the failure names the first differing key, index or element."""
    __tracebackhide__ = True
    problem = bitwise_problem(a, b, where)
    assert problem is None, problem


def untimed(state: dict) -> dict:
    """A trainer's state without its clock readings, the only part two identical runs may differ in (a copy)."""
    state = dict(state)
    state.pop("train_time", None)
    if "accumulators" in state:
        state["accumulators"] = {k: v for k, v in state["accumulators"].items() if k != "time"}
    return state
