"""Where a GPU training step's time goes: forward, backward and the Adam step (fused kernels or not), and how much of
the step is the host enqueuing work (a step that takes as long without a synchronisation as with one is bound by
Python and kernel launches, not by the GPU's arithmetic).

    python benchmarks/gpu_breakdown.py [--config digits --config 32x32] [--repeats 20]

Needs CuPy and a GPU. Medians in milliseconds; the device is synchronised around each timed phase.
"""

from __future__ import annotations

import argparse
import statistics
import time

from minidiff.backend import get_backend
from minidiff.bench.units import CONFIGS, LR, build_model, host_batch
from minidiff.execution import wrap
from minidiff.optim import build_optimizer
from minidiff.kernels import optim_cuda as fused


def _median_ms(fn, sync, repeats):
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def breakdown(name, repeats=20):
    be = get_backend("gpu")
    cfg = CONFIGS[name]
    model = wrap(build_model(cfg, be))
    opt = build_optimizer("adam", model.params, lr=LR)
    x, t, y = host_batch(cfg)
    x, y = be.asarray(x, dtype=model.dtype), be.asarray(y, dtype=model.dtype)
    scale = 2.0 / y.size
    state = {}

    def forward():
        state["out"] = model.forward(x, t)

    def backward():
        state["grads"] = model.backward((state["out"] - y) * scale)

    def step():
        forward()
        backward()
        opt.step(state["grads"])

    def enqueue_only():   # host time to issue one step, read without waiting for the device
        t0 = time.perf_counter()
        step()
        state["enqueue"].append(1e3 * (time.perf_counter() - t0))

    for _ in range(3):
        step()
    row = {"config": name, "step": _median_ms(step, be.synchronize, repeats)}
    row["forward"] = _median_ms(forward, be.synchronize, repeats)
    forward()
    row["backward"] = _median_ms(lambda: (forward(), backward()), be.synchronize, repeats) - row["forward"]
    grads = state["grads"]
    try:
        for enabled in (True, False):
            fused.ENABLED = enabled
            opt.step(grads)
            row["adam_fused" if enabled else "adam_generic"] = _median_ms(lambda: opt.step(grads), be.synchronize,
                                                                           repeats)
    finally:
        fused.ENABLED = True
    state["enqueue"] = []
    be.synchronize()
    for _ in range(repeats):
        enqueue_only()
        be.synchronize()
    row["enqueue"] = statistics.median(state["enqueue"])
    row["step_late"] = _median_ms(step, be.synchronize, repeats)   # the step again: is the first reading transient?
    row["gpu_span"] = _gpu_span_ms(be.xp, step, repeats)
    return row


def _gpu_span_ms(xp, fn, repeats):
    """Median time between CUDA events recorded before and after fn on the device's stream. It includes the time the
    device sits idle waiting for the host's next launch, so in a launch-bound step it tracks the enqueue time; the
    device's own work is smaller (benchmarks/gpu_profile.py --kernels sums it)."""
    times = []
    for _ in range(repeats):
        start, stop = xp.cuda.Event(), xp.cuda.Event()
        xp.cuda.Device().synchronize()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def call_overheads(repeats=200):
    """Host µs per call of the array operations a step is made of, on conv-sized float32 operands (no sync between
    calls, one after the last): what a launch-bound step pays per operation."""
    be = get_backend("gpu")
    xp = be.xp
    a, b = xp.ones((8192, 144), xp.float32), xp.ones((144, 32), xp.float32)
    o, v = xp.empty((8192, 32), xp.float32), xp.ones((8192, 32), xp.float32)
    ops = {"matmul": lambda: xp.matmul(a, b), "matmul out=": lambda: xp.matmul(a, b, out=o),
           "dot": lambda: xp.dot(a, b), "dot out=": lambda: xp.dot(a, b, out=o),
           "add": lambda: xp.add(o, v), "add out=": lambda: xp.add(o, v, out=o), "sum axis 0": lambda: v.sum(axis=0)}
    rows = {}
    for name, fn in ops.items():
        fn()
        be.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        rows[name] = 1e6 * (time.perf_counter() - t0) / repeats
        be.synchronize()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=[c for c in CONFIGS if not CONFIGS[c].sample_steps])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    keys = ("step", "forward", "backward", "adam_fused", "adam_generic", "enqueue", "step_late", "gpu_span")
    print("config     " + "".join(f"{k:>14}" for k in keys) + "   (ms, medians)")
    for name in args.config or ["digits", "32x32"]:
        row = breakdown(name, args.repeats)
        print(f"{name:10} " + "".join(f"{row[k]:14.2f}" for k in keys), flush=True)
    print("host µs per call: " + ", ".join(f"{k} {v:.1f}" for k, v in call_overheads().items()))


if __name__ == "__main__":
    main()
