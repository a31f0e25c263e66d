"""CUDA graphs on against off (minidiff.execution.graphs) for the default `minidiff train` step on a GPU: both
trainers in one process, stepped alternately on the same data, timed per step (device synchronised); then whether
they hold the same parameters bit for bit.

    python benchmarks/graph_ab.py [--steps 40] [--device gpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from minidiff.kernels import cublas as cublas_gpu
from minidiff.execution import graphs as graphs_gpu
from minidiff.backend import to_numpy
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import Trainer


def make_trainer(graphs: bool, device: str) -> Trainer:
    graphs_gpu.ENABLED = graphs   # read when the trainer wraps its model
    return Trainer(TrainConfig(device=device))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="gpu")
    args = parser.parse_args(argv)
    sides = {"graphs": make_trainer(True, args.device), "eager": make_trainer(False, args.device)}
    times = {name: [] for name in sides}
    for step in range(args.steps):
        order = list(sides) if step % 2 == 0 else list(sides)[::-1]
        for name in order:
            trainer = sides[name]
            trainer.backend.synchronize()
            t0 = time.perf_counter()
            trainer.train_step()
            trainer.backend.synchronize()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:6s} first steps {', '.join(f'{1e3 * t:.1f}' for t in ts[:3])} ms; "
              f"median of steps 4-{args.steps}: {1e3 * statistics.median(ts[3:]):.2f} ms")
    ratios = [a / b for a, b in zip(times["graphs"][3:], times["eager"][3:])]
    print(f"paired ratio graphs / eager: median {statistics.median(ratios):.3f}")
    a, b = (to_numpy(sides[n].model.params.flat) for n in ("graphs", "eager"))
    print(f"parameters after {args.steps} steps: bitwise equal {np.array_equal(a, b)}, "
          f"max |diff| {float(np.max(np.abs(a - b))):.3g}")
    print(f"graph pools {graphs_gpu.pool_bytes() / 2**20:.1f} MiB, cuBLAS workspace "
          f"{cublas_gpu.workspace_bytes() / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
