"""The tape: the caches of one forward pass, which its backward pops in reverse.

A module's forward appends one entry per layer it runs; its backward pops them in the opposite order, so a tape is
spent exactly when the backward has undone every layer. A forward that will not be differentiated (sampling,
evaluation) records onto a NoTape, which keeps nothing, and its layers may skip work that only a backward needs.
"""

from __future__ import annotations


class Tape(list):
    """The caches of one forward pass: modules push one entry each, backward pops them in reverse."""

    keeps = True   # layers may skip work that only a backward needs when False

    def check_spent(self) -> None:
        """RuntimeError if a backward left caches on the tape (it popped fewer than its forward pushed)."""
        if self:
            raise RuntimeError(f"backward left {len(self)} caches unused: the tape is out of step")


class NoTape:
    """Stands in for a Tape when nothing must be kept (a forward with cache=False)."""

    keeps = False

    def append(self, entry):
        pass


def make_tape(cache: bool):
    """A Tape for a forward that a backward will follow, else a NoTape."""
    return Tape() if cache else NoTape()


def add_grads(grads, prefix, layer_grads):
    """Store a layer's {"weight": ..., "bias": ...} under the full parameter names `prefix.weight`, ..."""
    for k, v in layer_grads.items():
        grads[f"{prefix}.{k}"] = v
