"""Where the host's time goes in a real GPU training step: `Trainer.train_step` of the default configuration (or
--device cpu, for a comparison; or --bench NAME, the benchmark's unit of that configuration), under cProfile. A
launch-bound step spends its time issuing CuPy calls, so the functions with the most host time are the ones to fuse
or batch; with --kernels, a device-bound one shows which kernels take the GPU's time.

    python benchmarks/gpu_profile.py [--device gpu] [--steps 30] [--top 30] [--kernels] [--bench 32x32]

Prints the step's median time (device synchronised), then the functions (minidiff's and the CuPy calls they make) by
own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

from minidiff.backend import get_backend
from minidiff.bench.units import CONFIGS, build_model, ours_unit
from minidiff.execution import wrap
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import Trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--kernels", action="store_true", help="also list the GPU kernels by device time (needs torch)")
    ap.add_argument("--bench", choices=sorted(CONFIGS), help="profile this benchmark configuration's unit instead")
    args = ap.parse_args(argv)
    if args.bench:
        backend = get_backend(args.device)
        model = wrap(build_model(CONFIGS[args.bench], backend))
        _profile(ours_unit(CONFIGS[args.bench], model), backend, f"bench unit {args.bench}", args)
        return
    trainer = Trainer(TrainConfig(device=args.device))
    try:
        _profile(trainer.train_step, trainer.backend, "Trainer.train_step, default config", args)
    finally:
        trainer.model.stop_workers()


def _profile(step, backend, label, args):
    sync = backend.synchronize
    for _ in range(5):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    print(f"{label}, {args.device}: median {statistics.median(times):.2f} ms, "
          f"best {min(times):.2f} ms over {args.steps} steps", flush=True)
    prof = cProfile.Profile()
    sync()
    prof.enable()
    for _ in range(args.steps):
        step()
    sync()
    prof.disable()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
        print(f"--- by {key} (times over {args.steps} steps) ---")
        lines = buf.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print("\n".join(line for line in lines[start:] if line.strip()), flush=True)
    if args.kernels and backend.name == "cupy":
        _kernel_table(step, backend, args.top)


def _kernel_table(step, backend, top, steps=5):
    """The GPU kernels of `steps` training steps (CuPy's and cuBLAS's alike: torch.profiler reads every kernel of
    the process through CUPTI), by total device time."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        print("--kernels needs torch (its profiler reads the device's kernel times)")
        return
    backend.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        backend.synchronize()
    print(f"--- GPU kernels over {steps} steps, by device time ---")
    for key in ("device_time_total", "cuda_time_total"):   # the name changed across torch versions
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))
            return
        except (AttributeError, KeyError, ValueError):
            continue


if __name__ == "__main__":
    main()
