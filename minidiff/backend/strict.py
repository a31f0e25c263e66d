"""A strict NumPy backend for tests: arrays that refuse to become host NumPy arrays implicitly.

CuPy refuses `np.asarray(gpu_array)`, and `float(x)` / `if x:` on a device array silently synchronises the GPU.
Code that does either works on NumPy and then breaks or stalls on a GPU. `StrictArray` wraps a NumPy array, computes
with NumPy, and raises on every implicit host conversion, so the CPU test suite catches that code. The explicit
transfers CuPy offers (`.get()`, `.item()`, `.tolist()`, `backend.asnumpy`) stay allowed.
"""

from __future__ import annotations

import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

_HOST_MSG = ("implicit conversion of a device array to the host ({}) is not allowed: "
             "use backend.asnumpy(x) or x.get() where a host copy is meant")


def _unwrap(obj):
    if isinstance(obj, StrictArray):
        return obj._a
    if isinstance(obj, tuple):
        return tuple(_unwrap(o) for o in obj)
    if isinstance(obj, list):
        return [_unwrap(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _refuse_host_arrays(objs):
    """CuPy refuses to compute with a host ndarray; a 0-d array or scalar is fine."""
    for o in objs:
        if isinstance(o, np.ndarray) and o.ndim > 0:
            raise TypeError("a host NumPy array was mixed with a device array; move it with backend.asarray first")
        if isinstance(o, (tuple, list)):
            _refuse_host_arrays(o)


def _holds_strict(objs):
    return any(isinstance(o, StrictArray) or (isinstance(o, (tuple, list)) and _holds_strict(o)) for o in objs)


def _wrap(obj):
    if isinstance(obj, np.ndarray):
        return StrictArray(obj)
    if isinstance(obj, np.generic):  # CuPy reductions return 0-d device arrays, not host scalars
        return StrictArray(np.asarray(obj))
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


class StrictArray(NDArrayOperatorsMixin):
    """A NumPy array that behaves like a CuPy array with respect to the host boundary."""

    __slots__ = ("_a",)

    def __init__(self, a):
        self._a = a if isinstance(a, np.ndarray) else np.asarray(a)

    # --- the host boundary -------------------------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_HOST_MSG.format("np.asarray"))

    def __float__(self):
        raise TypeError(_HOST_MSG.format("float()"))

    def __int__(self):
        raise TypeError(_HOST_MSG.format("int()"))

    def __index__(self):
        raise TypeError(_HOST_MSG.format("operator.index"))

    def __bool__(self):
        raise TypeError(_HOST_MSG.format("bool()"))

    def get(self):
        """Explicit device -> host copy, as `cupy.ndarray.get()`."""
        return self._a.copy()

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    # --- computation stays wrapped -----------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_host_arrays(inputs)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _unwrap(out)
        result = getattr(ufunc, method)(*_unwrap(inputs), **_unwrap({k: v for k, v in kwargs.items() if k != "out"}),
                                         **({"out": kwargs["out"]} if out is not None else {}))
        if out is not None:
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        _refuse_host_arrays(args)
        out = kwargs.get("out")
        result = func(*_unwrap(args), **_unwrap(kwargs))
        if isinstance(out, StrictArray):
            return out
        return _wrap(result)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __repr__(self):
        return f"StrictArray({self._a!r})"

    @property
    def T(self):
        return StrictArray(self._a.T)

    @property
    def shape(self):
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def nbytes(self):
        return self._a.nbytes

    @property
    def strides(self):
        return self._a.strides

    @property
    def flags(self):
        return self._a.flags

    @property
    def base(self):
        return self._a.base

    def __getattr__(self, name):  # reshape, transpose, sum, astype, fill, ... computed by NumPy, results wrapped
        if name.startswith("__"):  # __array_interface__ / __array_struct__ would hand NumPy the buffer
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *a, **k: _wrap(attr(*_unwrap(a), **_unwrap(k)))
        return _wrap(attr)


class _StrictNamespace:
    """Looks like the `numpy` module, but every function returns StrictArrays."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        if name == "ndarray":
            return StrictArray
        obj = getattr(self._module, name)
        if isinstance(obj, types.ModuleType):
            return _StrictNamespace(obj)
        if isinstance(obj, (type, np.ufunc)) or not callable(obj):
            return obj  # dtypes, constants; ufuncs dispatch through __array_ufunc__ on their own
        def strict_function(*a, **k):
            if _holds_strict(a) or _holds_strict(tuple(k.values())):
                _refuse_host_arrays(a)
            return _wrap(obj(*_unwrap(a), **_unwrap(k)))
        return strict_function

    def __repr__(self):
        return f"<strict namespace over {self._module.__name__}>"


xp = _StrictNamespace(np)
