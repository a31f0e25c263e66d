"""What a long command tells the person running it: progress, and the numbers a run finished with.

    with Progress("train", total=1500, start=0, quiet=False, on_terminal=sys.stderr.isatty()) as bar:
        bar.update(step, loss)      # loss: None until a step has logged one (the bar shows none until then)

On a terminal, a bar (click's) ending in "step 300/1500  loss 0.0412  12.3 it/s". Redirected to a file a bar is one
useless line, so there it prints

    train  step 300/1500  loss 0.0412  12.3 it/s  ETA 1m37s

every PROGRESS_SECONDS seconds and once at the end (LogProgress; sampling the same, without a loss). `final_numbers`
reads what a finished run reached, for the `done:` line: its last logged loss and its last sample quality.
"""

from __future__ import annotations

import math
import sys
import time

import click
import numpy as np

PROGRESS_SECONDS = 10.0
QUALITY_METRICS = ("fd", "swd")


def format_duration(seconds: float) -> str:
    """97 -> "1m37s", 7500 -> "2h05m", 4.2 -> "4s"."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LogProgress:
    """Progress as plain lines: update(done, loss) after each step; a line when PROGRESS_SECONDS have passed since
    the last one (and the first step is done), and finish() prints the last one. `done` counts from `start`."""

    def __init__(self, label: str, total: int, start: int = 0, stream=None, every: float | None = None,
                 clock=time.perf_counter):
        self.label, self.total, self.start = label, total, start
        self.stream = stream if stream is not None else sys.stderr
        self.every = PROGRESS_SECONDS if every is None else every
        self.clock = clock
        self.t0 = self.last = clock()
        self.done, self.loss, self.printed = start, None, start

    def update(self, done: int, loss=None) -> None:
        self.done = done
        if loss is not None and np.isfinite(loss):
            self.loss = float(loss)
        now = self.clock()
        if now - self.last >= self.every and done > self.start:
            self._line(now)

    def finish(self) -> None:
        if self.done != self.printed:
            self._line(self.clock())

    def _line(self, now) -> None:
        self.last, self.printed = now, self.done
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed
        parts = [self.label, f"step {self.done}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        parts.append(f"{rate:.1f} it/s")
        if self.done < self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        else:
            parts.append(f"in {format_duration(elapsed)}")
        print("  ".join(parts), file=self.stream, flush=True)


class Progress:
    """Progress of a command's steps: a bar on a terminal, LogProgress lines in a log, nothing when quiet.

    update(done, loss=None) after each step (done counts steps from `start`); set_total(n) when the count is known
    only once the work starts (DDPM runs all T steps). The rate counts from the first update, so loading a model
    before the first step is not counted as stepping."""

    def __init__(self, label: str, total: int, start: int = 0, quiet: bool = False, on_terminal: bool = True):
        self.label, self.total, self.start = label, total, start
        self.done, self.loss, self.first = start, None, None
        self.lines = LogProgress(label, total, start) if not (quiet or on_terminal) else None
        self.bar = click.progressbar(length=total - start, label=label, item_show_func=self._show, file=sys.stderr,
                                     hidden=quiet or not on_terminal)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)
        if self.lines is not None and exc[0] is None:
            self.lines.finish()

    def set_total(self, total: int) -> None:
        self.total = self.bar.length = total
        if self.lines is not None:
            self.lines = LogProgress(self.label, total, self.start)

    def update(self, done: int, loss=None) -> None:
        if self.first is None:
            self.first = (done, time.perf_counter())
        if loss is not None:
            self.loss = float(loss)
        step, self.done = done - self.done, done   # before the bar draws: it reads them
        self.bar.update(step)
        if self.lines is not None:
            self.lines.update(done, loss)

    def _show(self, _):
        if self.first is None:
            return None
        shown = f"step {self.done}/{self.total}"
        if self.loss is not None:   # none until a step has logged one: "loss nan" read as a divergence
            shown += f"  loss {self.loss:.4f}"
        first, t0 = self.first
        if self.done > first:
            shown += f"  {(self.done - first) / max(time.perf_counter() - t0, 1e-9):.1f} it/s"
        return shown


def final_numbers(metrics: dict) -> dict:
    """{"step", "loss", and "fd" or "swd" with "quality_step"} from a run's metrics: the last finite value of each
    (a key is absent when the run never logged it)."""
    out = {}
    steps = metrics.get("step", np.zeros(0))
    for name in ("loss",) + QUALITY_METRICS:
        values = metrics.get(name)
        if values is None:
            continue
        ok = np.flatnonzero(np.isfinite(values))
        if len(ok):
            out[name] = float(values[ok[-1]])
            out["step" if name == "loss" else "quality_step"] = int(steps[ok[-1]])
    return out


def describe_final(numbers: dict) -> str:
    """", step 1500, loss 0.0321, fd 31.2 (step 1500)" for the done: line; "" when nothing was logged."""
    parts = []
    if "loss" in numbers:
        parts.append(f"final loss {numbers['loss']:.4g} (step {numbers['step']})")
    for name in QUALITY_METRICS:
        if name in numbers:
            parts.append(f"{name} {numbers[name]:.4g} (step {numbers['quality_step']}; its floor and ceiling: "
                         "minidiff evaluate)")
    return ", ".join(parts)
