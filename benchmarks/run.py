"""Run minidiff's speed benchmark (the same as `minidiff bench`), optionally save the JSON, or profile our step.

    python benchmarks/run.py                       # all configurations, table on stdout
    python benchmarks/run.py --quick --config digits --json
    python benchmarks/run.py --out results.json    # table on stdout, the rows as JSON in a file
    python benchmarks/run.py --profile digits      # cProfile of our training step, top functions by tottime

See benchmarks/README.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys

from minidiff.bench.benchmark import QUICK, format_table, run_benchmarks
from minidiff.bench.units import CONFIGS, build_model, ours_unit
from minidiff.backend import get_backend
from minidiff.execution import wrap


def profile_step(name, device="cpu", steps=3, top=25) -> str:
    """cProfile of `steps` of our unit for configuration `name` after one warm-up: the top functions by tottime."""
    cfg = CONFIGS[name]
    unit = ours_unit(cfg, wrap(build_model(cfg, get_backend(device))))
    unit()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        unit()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=list(CONFIGS), help="repeat for several (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help=f"repeats/warm-up {QUICK['repeats']}/{QUICK['warmup']}")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="BLAS and torch threads (default: NumPy's BLAS setting)")
    ap.add_argument("--no-torch", action="store_true", help="time ours only")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    ap.add_argument("--out", help="also write the rows as JSON to this file")
    ap.add_argument("--profile", choices=list(CONFIGS), help="print a cProfile of our unit instead of benchmarking")
    args = ap.parse_args(argv)
    if args.profile:
        print(profile_step(args.profile, args.device))
        return
    repeats, warmup = (QUICK["repeats"], QUICK["warmup"]) if args.quick else (args.repeats, args.warmup)
    rows = run_benchmarks(args.config, repeats=repeats, warmup=warmup, threads=args.threads,
                          with_torch=not args.no_torch, device=args.device, memory=not args.no_memory,
                          progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
