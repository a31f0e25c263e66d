"""The speed benchmark: minidiff's UNet training step and DDIM sampling, timed side by side with PyTorch.

One *unit* of work per configuration (minidiff.bench.units: `CONFIGS`, a training step or a DDIM sampling call).
Timing: after `warmup` units each, ours and PyTorch's alternate for `repeats` rounds (the order flips every round),
so machine noise hits both; each timed unit follows `settle` seconds of untimed units of its own side, as one
training step follows another; the device is synchronised before each clock read. Reported: medians (and the
median of per-round ratios).
Throughput: FLOPs of a unit counted from the layer shapes (`minidiff.bench.flops`), achieved GFLOP/s, and
`peak_fraction` = achieved / the matrix-multiply peak measured in the same run (best of 5 square float matmuls,
2048^3 on the CPU, 8192^3 on a GPU, before each configuration; the best reading of the run counts, as load only
lowers it).
Threads: PyTorch gets as many threads as NumPy's BLAS uses (threadpoolctl), or `threads` for both.
Memory: `minidiff.bench.memory.measure_memory` (a fresh process per side). `run_benchmarks` returns one dict per
configuration; `format_table` prints them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np

from minidiff.backend import get_backend
from minidiff.bench.flops import blas_info, limit_threads, matmul_peak_gflops, unet_flops
from minidiff.bench.memory import measure_memory
from minidiff.bench.units import CONFIGS, BenchConfig, build_model, make_twin, ours_unit, torch_unit
from minidiff.execution import wrap

QUICK = {"repeats": 2, "warmup": 1}  # `minidiff bench --quick`


def _synchronizer(backend, with_cuda):
    def sync():
        backend.synchronize()
        if with_cuda:
            import torch
            torch.cuda.synchronize()
    return sync


def interleaved_times(units, warmup, repeats, sync, settle=0.0):
    """Run each callable `warmup` times, then `repeats` rounds alternating between them (order reversed every other
    round). With settle > 0, each timed call follows untimed calls of the same callable for at least `settle`
    seconds. -> one list of `repeats` wall-clock seconds per callable."""
    times = [[] for _ in units]
    for r in range(warmup + repeats):
        order = list(range(len(units)))
        for i in (order if r % 2 == 0 else order[::-1]):
            sync()
            if settle > 0:
                t_end = time.perf_counter() + settle
                while True:
                    units[i]()
                    sync()
                    if time.perf_counter() >= t_end:
                        break
            t0 = time.perf_counter()
            units[i]()
            sync()
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return times


# --- the benchmark --------------------------------------------------------------------------------------------------

def _resolve_configs(configs):
    """None -> every entry of CONFIGS; names are looked up, BenchConfig objects pass through."""
    unknown = [c for c in configs or () if not isinstance(c, BenchConfig) and c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown benchmark configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    return list(CONFIGS.values()) if configs is None else [c if isinstance(c, BenchConfig) else CONFIGS[c]
                                                           for c in configs]


@dataclass
class _Session:
    """What every configuration of one run_benchmarks call shares."""
    backend: object
    dtype: str
    torch: object  # the torch module, or None
    warmup: int
    repeats: int
    settle: float
    memory: bool
    peaks: list = field(default_factory=list)  # matmul peak measurements (GFLOP/s), one before each configuration
    machine: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)


def _timing_keys(seconds, cfg, flops, prefix=""):
    """Median ms, every repeat's ms (`step_ms_runs`), images/s and GFLOP/s under `prefix` + key; None without
    repeats."""
    med = float(np.median(seconds)) if seconds else None
    keys = {"step_ms": med and 1e3 * med, "step_ms_runs": seconds and [1e3 * x for x in seconds],
            "step_ms_best": seconds and 1e3 * min(seconds),
            "images_per_s": med and cfg.batch / med, "gflops": med and flops / med / 1e9}
    return {prefix + k: v for k, v in keys.items()}


def _bench_one(cfg, s: _Session, say) -> dict:
    say(f"{cfg.name}: measuring the {s.dtype} matmul peak")
    s.peaks.append(matmul_peak_gflops(s.backend, s.dtype))
    model = build_model(cfg, s.backend, s.dtype)
    runner = wrap(model)
    units = [ours_unit(cfg, runner)] + ([torch_unit(cfg, runner, make_twin(model))] if s.torch else [])
    say(f"{cfg.name}: timing {cfg.unit} x {s.repeats} (+{s.warmup} warm-up){' vs torch' if s.torch else ''}")
    sync = _synchronizer(s.backend, bool(s.torch) and s.backend.name == "cupy")
    times = interleaved_times(units, s.warmup, s.repeats, sync, s.settle) + [None]
    count = unet_flops(model, cfg.batch, cfg.image_size, cfg.image_size)
    flops = count.forward * cfg.sample_steps if cfg.sample_steps else count.training
    row = {"name": cfg.name, "unit": cfg.unit, "device": "gpu" if s.backend.name == "cupy" else "cpu",
           "dtype": model.dtype.name, "batch": cfg.batch, "image_size": cfg.image_size, "params": model.num_params(),
           "repeats": s.repeats, "gflop_per_step": flops / 1e9,
           **_timing_keys(times[0], cfg, flops), **_timing_keys(times[1], cfg, flops, "torch_")}
    row["ratio_vs_torch"] = row["step_ms"] / row["torch_step_ms"] if s.torch else None
    # each round's two units ran back to back under the same load, so the median of per-round ratios is the
    # estimate least moved by load that comes and goes
    row["ratio_vs_torch_rounds"] = [float(r) for r in np.divide(*times[:2])] if s.torch else None
    row["ratio_vs_torch_paired"] = float(np.median(row["ratio_vs_torch_rounds"])) if s.torch else None
    row.update(peak_mem_mb=None, torch_peak_mem_mb=None, mem_ratio_vs_torch=None, memory_error=None)
    if s.memory:
        say(f"{cfg.name}: peak memory, one fresh process each")
        try:  # a failed probe costs its column, not the timings already taken
            row["peak_mem_mb"] = measure_memory(cfg, "ours", **s.probe)
            if s.torch:
                row["torch_peak_mem_mb"] = measure_memory(cfg, "torch", **s.probe)
                row["mem_ratio_vs_torch"] = row["peak_mem_mb"] / row["torch_peak_mem_mb"]
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            row["memory_error"] = str(exc)
            say(str(exc))
    return {**row, **s.machine}


def run_benchmarks(configs=None, repeats=5, warmup=1, threads=None, with_torch=True, device="cpu", progress=None,
                   memory=True, dtype="float32", settle=None) -> list[dict]:
    """Benchmark `configs` (names from CONFIGS or BenchConfig objects; None = all) -> one dict per configuration.

    Keys: name, unit, device, dtype, batch, image_size, params, repeats; step_ms (median), step_ms_runs,
    step_ms_best, images_per_s, gflop_per_step, gflops (achieved GFLOP/s); peak_gflops (the best of the matmul
    peaks measured before each configuration, all in peak_gflops_readings), peak_fraction = gflops / peak_gflops;
    the torch_* twins of the timing keys, ratio_vs_torch = step_ms / torch_step_ms, ratio_vs_torch_rounds (each
    round's ours / torch), ratio_vs_torch_paired (their median); peak_mem_mb, torch_peak_mem_mb, mem_ratio_vs_torch,
    memory_error; threads, torch_threads, blas, blas_env. torch_* and ratios are None without torch (with_torch=False
    or not installed); memory keys are None with memory=False or when a memory process failed (its message is in
    memory_error).
    threads: BLAS and torch threads; None keeps NumPy's BLAS setting and gives torch the same number.
    settle: seconds of untimed units of the same side before each timed one (default 0.15 s on the CPU, 0 on a
    GPU): the timed unit runs as a training step does, right after another, once the other side's idle threads
    (OpenBLAS's and OpenMP's spin ~0.1 s after a call) have gone to sleep. See benchmarks/README.md.
    progress: called with one line of text per phase.
    """
    say, cfgs, backend = progress or (lambda msg: None), _resolve_configs(configs), get_backend(device)
    torch = None
    if with_torch:
        with contextlib.suppress(ImportError):
            import torch
    settle = (0.0 if backend.name == "cupy" else 0.15) if settle is None else settle
    if backend.name == "cupy":   # the first unit warms up, the second captures the CUDA graphs (execution.graphs)
        warmup = max(warmup, 2)
    s = _Session(backend, dtype, torch, warmup, repeats, settle, memory)
    with limit_threads(threads):
        info = blas_info()
        n_threads = threads or info["blas_threads"] or os.cpu_count()
        old_torch_threads = torch.get_num_threads() if torch else None
        if torch:
            torch.set_num_threads(n_threads)
        try:
            s.machine = {"threads": n_threads, "torch_threads": n_threads if torch else None, "blas": info["blas"],
                         "blas_env": info["env"]}
            s.probe = dict(device=device, dtype=dtype, threads=threads, torch_threads=n_threads)
            rows = [_bench_one(cfg, s, say) for cfg in cfgs]
        finally:
            if torch:
                torch.set_num_threads(old_torch_threads)
    return _with_peak(rows, s.peaks)


def _with_peak(rows, peaks):
    """Add peak_gflops (the best matmul rate seen in this run: other load only ever lowers a reading) and the
    peak fractions gflops / peak_gflops."""
    peak = max(peaks)
    for row in rows:
        row.update(peak_gflops=peak, peak_gflops_readings=peaks, peak_fraction=row["gflops"] / peak,
                   torch_peak_fraction=row["torch_gflops"] and row["torch_gflops"] / peak)
    return rows


def _fmt(value, spec, width):
    return f"{'-' if value is None else format(value, spec):>{width}}"


def format_table(results) -> str:
    """A fixed-width table of run_benchmarks' results, with the machine line (peak, BLAS, threads) above it."""
    if not results:
        return "(no results)"
    r0 = results[0]
    env = " ".join(f"{k}={v}" for k, v in r0["blas_env"].items()) or "no OPENBLAS_* set"
    cols = [("name", "name", "<8", 8), ("batch", "batch", "d", 5), ("ms", "step_ms", ".1f", 9),
            ("torch ms", "torch_step_ms", ".1f", 9), ("ratio", "ratio_vs_torch", ".2f", 6),
            ("paired", "ratio_vs_torch_paired", ".2f", 6), ("rounds", "rounds", "<9", 9),
            ("img/s", "images_per_s", ".1f", 8), ("GFLOP/s", "gflops", ".1f", 8), ("peak", "peak_fraction", ".1%", 6),
            ("torch", "torch_peak_fraction", ".1%", 6), ("MiB", "peak_mem_mb", ".1f", 7),
            ("torch MiB", "torch_peak_mem_mb", ".1f", 9), ("unit", "unit", "<16", 16)]
    lines = [f"device {r0['device']}, {r0['dtype']}, matmul peak {r0['peak_gflops']:.1f} GFLOP/s, "
             f"{r0['threads']} threads, BLAS {r0['blas']}, {env}",
             " ".join(f"{title:{'<' if spec[0] == '<' else '>'}{w}}" for title, _, spec, w in cols)]
    for r in results:
        rounds = r.get("ratio_vs_torch_rounds")
        r = {**r, "rounds": f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds else "-"}
        lines.append(" ".join(_fmt(r[key], spec, w) if spec[0] != "<" else format(r[key], spec)
                              for _, key, spec, w in cols))
    lines.append("ms: median per unit; ratio: ours / torch; paired: median of the rounds' ratios, rounds: their range "
                 "(a ratio inside another's range is within noise)")
    lines.append("peak: achieved GFLOP/s / matmul peak; MiB: peak memory beyond the parameters")
    return "\n".join(lines)
