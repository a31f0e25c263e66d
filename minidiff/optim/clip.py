"""Gradient clipping by global norm (DDPM clips at 1.0), as `torch.nn.utils.clip_grad_norm_` does it."""

from __future__ import annotations

from minidiff.backend import get_array_module
from minidiff.kernels.flat import FlatArrays


def _arrays(arrays) -> list:
    """The arrays to work on: a FlatArrays' one flat buffer (one call instead of one per array), else each array."""
    if isinstance(arrays, FlatArrays) and arrays.intact():
        return [arrays.flat]
    return list(arrays.values() if isinstance(arrays, dict) else arrays)


def global_norm(arrays) -> object:
    """||(a_1, ..., a_k)||_2 = sqrt(sum_i ||a_i||^2) over a dict or an iterable of arrays, as a 0-d backend array.
    A FlatArrays (a model's gradients) is summed over its flat buffer in one product."""
    arrays = _arrays(arrays)
    xp = get_array_module(*arrays)
    total = None
    for a in arrays:
        sq = xp.vdot(a, a)  # no temporary the size of a, unlike sum(a * a)
        total = sq if total is None else total + sq
    return xp.sqrt(total)


def clip_grad_norm(grads: dict, max_norm: float):
    """Scale every gradient in place by min(1, max_norm / (||g|| + 1e-6)); return the pre-clip global norm ||g||.

    grads: dict name -> array (any shapes, one backend). ||g|| is the 2-norm of all gradients concatenated. The
    factor is computed and applied on the device — always multiplied, 1 when no clipping is needed — so there is no
    host synchronisation and no data-dependent branch (PyTorch does the same). A non-finite norm makes every
    gradient NaN, as in PyTorch; check the returned norm where that matters. Returns a 0-d backend array.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    arrays = _arrays(grads)
    xp = get_array_module(*arrays)
    total_norm = global_norm(arrays)
    factor = xp.minimum(max_norm / (total_norm + 1e-6), 1.0)
    cast = {}   # the factor in each gradient dtype, made once (one device op per dtype, not per array)
    for g in arrays:
        if g.dtype not in cast:
            cast[g.dtype] = factor.astype(g.dtype)
        g *= cast[g.dtype]
    return total_norm
