"""Whether a CUDA graph is being captured, and the error that defers work which must not be captured.

A CUDA graph (minidiff.execution.graphs) records the launches of one forward or backward and replays them. Code that
would make something lasting during a capture (a scratch buffer, a constant: minidiff.kernels.workspace) cannot: the
memory would come from the graph's own pool, and a constant's kernels would only run when the graph is launched.
"""

from __future__ import annotations

from minidiff.backend import is_cupy_module


class CaptureNeedsWarmUp(RuntimeError):
    """Raised inside a CUDA graph capture by code that would make something lasting (a scratch buffer, a constant):
    such work must run eagerly, so the graph's owner runs the call eagerly and captures it the next time."""


def is_capturing(xp) -> bool:
    """Whether `xp` is CuPy and its current stream is capturing a CUDA graph."""
    return is_cupy_module(xp) and xp.cuda.get_current_stream().is_capturing()
