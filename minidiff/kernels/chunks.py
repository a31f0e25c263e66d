"""Chunks of a batch: contiguous ranges of images, for work that runs a few images at a time."""

from __future__ import annotations


def batch_chunks(n, chunks):
    """Split range(n) into at most `chunks` contiguous (start, stop) ranges of near-equal size."""
    chunks = max(1, min(n, chunks))
    bounds = [n * i // chunks for i in range(chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
