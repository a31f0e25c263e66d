"""The one place that chooses the array library: NumPy (default), CuPy on a GPU, or the strict test backend.

Everything else in minidiff gets its array module from here, either from a `Backend` object (`backend.xp`) or from
an array it was handed (`get_array_module(x)`), so the same layer code runs on NumPy, CuPy and StrictArray. Nothing
else in the package imports cupy.

The device is chosen by argument (`--device` on the CLI) or by the environment variable MINIDIFF_DEVICE:
  cpu    NumPy (the default)
  gpu    CuPy; a clear BackendError if CuPy is not installed or no usable CUDA device is present
  auto   CuPy when it works, NumPy otherwise
  strict NumPy wrapped in StrictArray, which raises on implicit host conversion like CuPy (for tests)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from minidiff.backend import strict as _strict

DEVICES = ("cpu", "gpu", "auto", "strict")
DTYPES = {"float32": np.float32, "float64": np.float64}


class BackendError(RuntimeError):
    """The requested device cannot be used (no CuPy, no GPU, unknown name)."""


def resolve_dtype(dtype) -> np.dtype:
    """'float32' | 'float64' | numpy dtype -> numpy dtype; float32 is minidiff's default."""
    if dtype is None:
        return np.dtype(np.float32)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return np.dtype(DTYPES[dtype])
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _import_cupy():
    """Import CuPy and prove a device works; BackendError with the reason otherwise."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendError("device 'gpu' needs CuPy: pip install 'minidiff[gpu]' "
                           f"(import failed: {exc})") from None
    try:
        cupy.zeros(1).sum().item()  # the first allocation is where a missing driver or device shows up
    except Exception as exc:  # CUDARuntimeError and friends live in cupy_backends; catch them all here
        raise BackendError(f"device 'gpu': CuPy is installed but no usable CUDA device was found ({exc})") from None
    return cupy


@dataclass(frozen=True)
class Backend:
    """An array library plus the explicit host <-> device transfers for it."""

    name: str  # "numpy" | "cupy" | "strict"
    xp: object

    def asarray(self, a, dtype=None):
        """Host (or any) array -> this backend's array."""
        if self.name == "strict":
            if isinstance(a, _strict.StrictArray):
                a = a.get()
            return _strict.StrictArray(np.array(a, dtype=dtype))
        if self.name == "numpy":
            return np.asarray(to_numpy(a), dtype=dtype)
        return self.xp.asarray(a, dtype=dtype)

    def asnumpy(self, a):
        return to_numpy(a)

    def synchronize(self):
        if self.name == "cupy":
            self.xp.cuda.Device().synchronize()


def get_backend(device: str | None = None) -> Backend:
    """Choose the backend; None means $MINIDIFF_DEVICE, else 'cpu'."""
    device = (device or os.environ.get("MINIDIFF_DEVICE") or "cpu").lower()
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return Backend("numpy", np)
    if device == "strict":
        return Backend("strict", _strict.xp)
    if device == "gpu":
        return Backend("cupy", _import_cupy())
    try:
        return Backend("cupy", _import_cupy())
    except BackendError:
        return Backend("numpy", np)


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


_MODULE_OF_TYPE: dict = {}   # array type -> its module; asked thousands of times per training step, so cached


def _module_of_type(tp):
    if issubclass(tp, _strict.StrictArray):
        return _strict.xp
    if tp.__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def get_array_module(*arrays):
    """The array module that owns these arrays: numpy, cupy, or the strict namespace (the first that is not NumPy)."""
    for a in arrays:
        tp = type(a)
        xp = _MODULE_OF_TYPE.get(tp)
        if xp is None:
            xp = _MODULE_OF_TYPE[tp] = _module_of_type(tp)
        if xp is not np:
            return xp
    return np


def backend_of(a) -> Backend:
    """The Backend an existing array lives on."""
    if isinstance(a, _strict.StrictArray):
        return Backend("strict", _strict.xp)
    if _is_cupy(a):
        import cupy
        return Backend("cupy", cupy)
    return Backend("numpy", np)


def to_numpy(a):
    """Explicit device -> host copy (a no-op view for NumPy arrays)."""
    if isinstance(a, _strict.StrictArray) or _is_cupy(a):
        return a.get()
    return np.asarray(a)


def to_float(a) -> float:
    """Explicit device -> host transfer of a scalar (it synchronises on a GPU: call it where a number is needed)."""
    return float(to_numpy(a))


def is_cupy_module(xp) -> bool:
    return getattr(xp, "__name__", "") == "cupy"
