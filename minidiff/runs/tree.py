"""A nested-dict store on HDF5 groups, exact both ways: what `write_tree` is given, `read_tree` gives back.

Used by minidiff.runs.file for checkpoints. Leaves and how they are kept (attribute "type" on each object):
  dict              group ("dict"), children in insertion order (track_order); keys must be str without "/"
  list, tuple       group ("list" / "tuple"), children "0", "1", ...
  ndarray           dataset ("array"), dtype and shape as given; device arrays are copied to the host first
  NumPy scalar      0-d dataset ("scalar"), read back as the same NumPy scalar type
  None, bool, int, float, str   a JSON text dataset ("json"): Python ints of any size (PCG64's 128-bit
                    state) and floats (repr round-trips, NaN/Inf included) come back exactly
Every dataset carries "crc32" of its bytes, so damaged data is reported (TreeError naming the dataset) rather than
silently returned.
"""

from __future__ import annotations

import json
import zlib

import h5py
import numpy as np

from minidiff.backend import to_numpy


class TreeError(ValueError):
    """A stored tree cannot be read back intact; the message names the damaged object."""


def crc32_of(data) -> int:
    """CRC-32 of the raw bytes of an array, NumPy scalar or bytes object."""
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
    return zlib.crc32(raw) & 0xFFFFFFFF


def _check_key(key, where):
    if not isinstance(key, str) or not key or "/" in key or key == ".":
        raise TypeError(f"checkpoint keys must be non-empty strings without '/', got {key!r} at {where or '/'}")


def write_tree(parent: h5py.Group, name: str, value, where: str = "") -> None:
    """Store `value` as parent[name] (see the module docstring for the encoding)."""
    where = f"{where}/{name}"
    if isinstance(value, dict):
        g = parent.create_group(name, track_order=True)
        g.attrs["type"] = "dict"
        for k, v in value.items():
            _check_key(k, where)
            write_tree(g, k, v, where)
    elif isinstance(value, (list, tuple)):
        g = parent.create_group(name, track_order=True)
        g.attrs["type"] = type(value).__name__
        for i, v in enumerate(value):
            write_tree(g, str(i), v, where)
    elif isinstance(value, np.generic):  # before the Python scalars: np.float64 is a subclass of float
        _write_array(parent, name, np.asarray(value), "scalar", where)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = json.dumps(value)
        ds = parent.create_dataset(name, data=text, dtype=h5py.string_dtype())
        ds.attrs.update(type="json", crc32=crc32_of(text.encode("utf-8")))
    elif hasattr(value, "shape") and hasattr(value, "dtype"):
        _write_array(parent, name, to_numpy(value), "array", where)
    else:
        raise TypeError(f"cannot store {type(value).__name__} at {where} in a checkpoint "
                        "(use dicts, lists, arrays, numbers, strings or None)")


def _write_array(parent, name, a: np.ndarray, kind: str, where: str) -> None:
    if a.dtype.kind not in "biufc":
        raise TypeError(f"cannot store an array of dtype {a.dtype} at {where} (numeric or bool only)")
    ds = parent.create_dataset(name, data=a)
    ds.attrs.update(type=kind, crc32=crc32_of(a))


def read_tree(obj):
    """The value stored at `obj` (an h5py Group or Dataset written by write_tree)."""
    try:
        kind = obj.attrs["type"]
    except (KeyError, OSError):
        raise TreeError(f"{obj.name}: missing its type attribute") from None
    if isinstance(obj, h5py.Group):
        if kind == "dict":
            return {k: read_tree(obj[k]) for k in obj}
        items = [read_tree(obj[str(i)]) for i in range(len(obj))]
        return tuple(items) if kind == "tuple" else items
    try:
        data = obj[()]
    except (OSError, ValueError) as exc:
        raise TreeError(f"{obj.name}: unreadable ({exc})") from None
    if kind == "json":
        data = data if isinstance(data, bytes) else str(data).encode("utf-8")
    elif kind == "array":
        data = np.asarray(data)  # a 0-d dataset reads as a NumPy scalar; an "array" leaf was an ndarray
    if crc32_of(data) != int(obj.attrs.get("crc32", -1)):
        raise TreeError(f"{obj.name}: checksum mismatch")
    if kind == "json":
        return json.loads(data.decode("utf-8"))
    return data
