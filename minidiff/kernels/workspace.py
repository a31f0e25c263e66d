"""Scratch buffers that live from call to call: im2col columns, padded inputs, elementwise temporaries.

A layer asks for `scratch(name, shape, like)` and gets a view of a flat buffer kept for that name (per array module,
dtype and thread), grown when a larger shape is asked for. Reusing it is what makes it cheap: a fresh large array
costs a page fault per 4 KiB the first time it is written (the allocator hands freed memory back to the OS), which
can cost more than the arithmetic done with it.

Rules that keep it safe: a scratch array is used inside the function that asked for it and never returned or
cached; two live scratch arrays need two names; the thread id is part of the key, so worker threads never share one.

Activations and gradients cannot be scratch (they live from the forward to the backward), so for them
`retain_freed_memory` asks the C allocator to keep what a training step frees for the next step, which allocates
the same sizes again: without it glibc hands the freed memory back to the OS after every backward and the next
forward faults it all in again (thousands of page faults a step; BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading

from minidiff.backend import get_array_module
from minidiff.kernels.capture import CaptureNeedsWarmUp, is_capturing

_BUFFERS: dict = {}
_TAGS: dict = {}       # scratch_kept: the tag each buffer was last handed out under
_CONSTANTS: dict = {}


def _device(a):
    """A hashable name of the device `a` lives on (NumPy: "cpu"; CuPy: <CUDA Device k>)."""
    return str(getattr(a, "device", "cpu"))


def scratch(name, shape, like):
    """An uninitialised array of `shape` with the dtype and array module of `like`, reused across calls."""
    return scratch_kept(name, shape, like, None)[0]


def scratch_kept(name, shape, like, tag):
    """scratch(name, shape, like) and whether the buffer was last handed out under the same `tag` (and not grown
    since): then whatever that call wrote and this one does not overwrite is still there (a zero border, say)."""
    size = math.prod(shape)
    # type: NumPy, strict and CuPy arrays differ; device: each GPU of a multi-GPU host has its own
    key = (name, type(like), _device(like), like.dtype.str, threading.get_ident())
    buf = _BUFFERS.get(key)
    if buf is None or buf.size < size:
        xp = get_array_module(like)
        if is_capturing(xp):   # from the graph's pool, it would die with the graph while kept here
            raise CaptureNeedsWarmUp(f"scratch buffer {name!r} of {size} elements")
        buf = xp.empty(max(size, 1), dtype=like.dtype)
        _BUFFERS[key] = buf
        _TAGS.pop(key, None)
    kept = tag is not None and _TAGS.get(key) == tag
    _TAGS[key] = tag
    return buf[:size].reshape(shape), kept


def constant(key, like, build):
    """A read-only array made once by build(xp, dtype) for `key`, per array module, device and dtype of `like`,
    shared by all threads: never write into it."""
    full = (key, type(like), _device(like), like.dtype.str)
    value = _CONSTANTS.get(full)
    if value is None:
        xp = get_array_module(like)
        if is_capturing(xp):   # captured, build's kernels would only run when the graph is launched
            raise CaptureNeedsWarmUp(f"constant {key!r}")
        value = _CONSTANTS[full] = build(xp, like.dtype)
    return value


def ones_row(n, like):
    """A (1, n) row of ones (it turns sums into matrix-vector products, see minidiff.kernels.channels)."""
    return constant(("ones", n), like, lambda xp, dtype: xp.ones((1, n), dtype=dtype))


def scratch_views(params: dict, count: int) -> dict:
    """name -> tuple of `count` arrays shaped like params[name], views into one flat buffer per (dtype, slot).

    Parameters are processed one after another, so they can share scratch memory: `count` x the largest parameter,
    not `count` x the model.
    """
    sizes: dict = {}
    for p in params.values():
        sizes[p.dtype] = max(sizes.get(p.dtype, 0), p.size)
    xp = get_array_module(*params.values())
    flat = {dt: [xp.empty(n, dtype=dt) for _ in range(count)] for dt, n in sizes.items()}
    return {name: tuple(buf[:p.size].reshape(p.shape) for buf in flat[p.dtype]) for name, p in params.items()}


def held_buffers() -> list:
    """Every scratch buffer and constant now kept: a CUDA graph that captured them holds this list, so that a buffer
    later replaced (grown) or dropped (`clear`) is not freed while the graph still reads and writes it."""
    return list(_BUFFERS.values()) + list(_CONSTANTS.values())


def clear():
    """Drop every scratch buffer (their memory goes back to the allocator)."""
    _BUFFERS.clear()
    _TAGS.clear()
    _CONSTANTS.clear()


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process (no trimming; heap, not mmap, up to 32 MiB blocks).

    Process-wide and idempotent; peak memory is unchanged (memory is reused, not added), but the resident size no
    longer drops between steps. Returns False where the C library is not glibc (nothing is changed there).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3         # <malloc.h>
        return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def release_free_memory() -> bool:
    """Hand the pages of the C heap's free blocks back to the OS (glibc's malloc_trim(0)); False elsewhere.

    For a freshly forked worker (minidiff.execution.processes): the free blocks it inherits are free in the parent
    too, and the parent's next allocations write into them; every page written then is copied, and the worker would
    keep the old copy it never uses (as much as the parent had freed before the fork). Released in the worker first,
    the page stays the parent's alone.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
