"""Arrays laid end to end in one flat buffer, so that elementwise work over all of them runs on a few long chunks.

A model's parameters are over a hundred small arrays. An optimizer step applies the same elementwise rule to each,
and in NumPy every operation costs a call's overhead whatever its size (on a GPU, a kernel launch): per parameter,
Adam's ten operations cost more in calls than in arithmetic. `FlatArrays` is a dict whose arrays are consecutive
views into one 1-D buffer, in dict order, with no gaps; `chunks` cuts that buffer into chunks of whole arrays, which
an optimizer then treats like single arrays (PyTorch's "multi-tensor" optimizers group parameters the same way), a
few times faster (BENCHMARKS.md). An elementwise rule gives the same bits per element however the elements are
grouped. A model's gradients come laid out the same way (`gather`), so a gradient norm, a clip or an optimizer's
chunk reads one slice of them instead of every array (on a GPU, one launch instead of one per array).
"""

from __future__ import annotations

import math

from minidiff.kernels.capture import is_capturing


class FlatArrays(dict):
    """dict name -> array, each a C-contiguous view of `flat[start:stop]` (consecutive, in dict order).

    FlatArrays(shapes, flat) lays arrays of `shapes` (name -> shape) over `flat`, a 1-D array of exactly their total
    size; `intact()` says whether the dict still holds exactly those views (an entry replaced by another array breaks
    the layout, and users of `flat` must then fall back to the arrays one by one). A copy (copy.deepcopy, pickle) is
    laid out over a copy of `flat`, or is a plain dict when the layout was broken.
    """

    def __init__(self, shapes: dict, flat):
        spans, start = {}, 0
        for name, shape in shapes.items():
            spans[name] = (start, start + math.prod(shape), tuple(shape))
            start += math.prod(shape)
        if flat.ndim != 1 or start != flat.shape[0]:
            raise ValueError(f"the flat buffer has shape {flat.shape}, the shapes need ({start},)")
        super().__init__({name: flat[a:b].reshape(shape) for name, (a, b, shape) in spans.items()})
        self.flat = flat
        self.spans = {name: (a, b) for name, (a, b, _) in spans.items()}
        self._shapes = {name: shape for name, (_, _, shape) in spans.items()}
        self._views = tuple(self.values())

    def __reduce__(self):
        # a dict subclass would otherwise be rebuilt item by item: views copied apart from a copied `flat`, which an
        # optimizer built on the copy would then update in their place
        if self.intact():
            return FlatArrays, (self._shapes, self.flat)
        return dict, (dict(self),)

    def intact(self) -> bool:
        return len(self) == len(self._views) and all(a is b for a, b in zip(self.values(), self._views))

    def like(self, flat) -> "FlatArrays":
        """The same layout over another buffer of the same length (an optimizer's state, an EMA)."""
        return FlatArrays(self._shapes, flat)

    def same_layout(self, other) -> bool:
        """Whether `other` is an intact FlatArrays with these names, shapes and order: its `flat` then lines up with
        this one's element for element (a model's gradients with its parameters)."""
        # dict equality ignores order, and a reordered layout would hand each parameter another's gradient
        return (isinstance(other, FlatArrays) and other.intact()
                and list(other._shapes.items()) == list(self._shapes.items()))


def gather(layout: FlatArrays, arrays: dict, xp, out: FlatArrays | None = None) -> FlatArrays:
    """`arrays` (the names and shapes of `layout`) copied end to end into a new buffer laid out like `layout`, in its
    dtype (or into `out`, laid out like it): one concatenation (on a GPU a single kernel) instead of a copy per array.

    Except while a CUDA graph captures (minidiff.execution.graphs): CuPy's concatenation of many arrays sends their
    pointers from the host, which a capture refuses, so there each array is copied into its span (the same bits; in
    a graph, launches cost no host time)."""
    if is_capturing(xp):
        flat = out.flat if out is not None else xp.empty(layout.flat.shape, dtype=layout.flat.dtype)
        for name, (a, b) in layout.spans.items():
            flat[a:b] = arrays[name].reshape(-1)
        return out if out is not None else layout.like(flat)
    pieces = [arrays[name].reshape(-1) for name in layout]
    if out is not None:
        xp.concatenate(pieces, out=out.flat)
        return out
    return layout.like(xp.concatenate(pieces, dtype=layout.flat.dtype))


def total_size(shapes: dict) -> int:
    return sum(math.prod(s) for s in shapes.values())


def chunks(arrays: FlatArrays, min_size: int) -> list:
    """[(start, stop, names)]: consecutive arrays gathered into a chunk until it holds >= min_size elements (the
    last chunk may hold fewer). An array larger than min_size forms a chunk of its own or ends one."""
    out, names, start = [], [], 0
    for name, (a, b) in arrays.spans.items():
        names.append(name)
        if b - start >= min_size:
            out.append((start, b, tuple(names)))
            names, start = [], b
    if names:
        out.append((start, arrays.spans[names[-1]][1], tuple(names)))
    return out
