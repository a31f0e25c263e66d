"""Peak memory of a benchmark unit (ours or the PyTorch twin), each measured in a fresh Python process.

    measure_memory(BenchConfig(...), "ours" | "torch", device="cpu") -> MiB beyond the resident parameters

A fresh process per measurement keeps one implementation's allocator caches and high-water marks out of the
other's; `python -m minidiff.bench.memory '<json spec>'` is that child process. Used by minidiff.bench.benchmark.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace

from minidiff.kernels import cublas as cublas_gpu
from minidiff.execution import graphs as graphs_gpu
from minidiff.backend import get_backend
from minidiff.bench.flops import limit_threads
from minidiff.bench.units import BenchConfig, build_model, host_batch, make_twin, ours_unit, torch_unit
from minidiff.execution import wrap
from minidiff.optim import build_optimizer


def _host_rss_kib(field_name):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field_name + ":")).split()[1])


def _memory_mark(backend, impl):
    """Start a peak-memory measurement -> (how to read it, baseline MiB). How it is counted:

    CPU: the process's resident set, which sees every allocator (NumPy's, PyTorch's, BLAS buffers). The kernel's
    high-water mark is reset (5 to /proc/self/clear_refs) and VmRSS is the baseline; the peak is VmHWM. Where
    clear_refs is refused, ru_maxrss is both (then an earlier, higher peak could hide the step's). Our worker
    processes (minidiff.execution.processes) add their private memory (`DataParallel.worker_memory_mib`): what they
    allocated and the pre-fork pages they keep once the parent has written to its copy.
    GPU: the caching allocators' reserved bytes, emptied of cached blocks first: for ours, the peak of CuPy's
    default pool plus the CUDA graphs' own pools (`graphs_gpu.peak_reserved_bytes`: the pools only grow, except
    where a capture hands the default pool's cached blocks back, and the total just before that counts too) plus
    the cuBLAS workspaces (made in the warm-up, so in the baseline, like PyTorch's); torch.cuda.max_memory_reserved
    for PyTorch.
    """
    if backend.name == "cupy":
        backend.synchronize()
        if impl == "torch":
            import torch
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            read = torch.cuda.max_memory_reserved
        else:
            backend.xp.get_default_memory_pool().free_all_blocks()
            graphs_gpu.reset_peak()
            read = lambda: graphs_gpu.peak_reserved_bytes(backend.xp) + cublas_gpu.workspace_bytes()  # noqa: E731
        return (lambda: (backend.synchronize(), read() / 2 ** 20)[1]), read() / 2 ** 20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return (lambda: _host_rss_kib("VmHWM") / 1024), _host_rss_kib("VmRSS") / 1024
    except OSError:
        import resource
        read = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (KiB on Linux)
        return read, read()


def _warm_up(cfg, model, twin):
    """One forward (+ backward for training) at batch 1 and an Adam step on a 1-element stand-in parameter: pages
    in the library code (importing torch.optim alone adds tens of MB) and starts the thread pools before the baseline,
    so what is measured is the step's memory, not first-call set-up."""
    x, t, _ = host_batch(replace(cfg, batch=1))
    if twin is None:
        build_optimizer("adam", {"p": model.backend.xp.zeros(1)}).step({"p": model.backend.xp.ones(1)})
        out = model.forward(model.backend.asarray(x, dtype=model.dtype), t, cache=not cfg.sample_steps)
        if not cfg.sample_steps:
            model.backward(out)
        return
    import torch
    dev = next(twin.parameters()).device
    p = torch.zeros(1, device=dev, requires_grad=True)
    p.grad = torch.ones_like(p)
    torch.optim.Adam([p]).step()
    with torch.inference_mode(mode=bool(cfg.sample_steps)):
        x = torch.as_tensor(x, dtype=getattr(torch, model.dtype.name), device=dev)
        out = twin(x, torch.as_tensor(t, device=dev))
    if not cfg.sample_steps:
        out.sum().backward()
        twin.zero_grad(set_to_none=True)


def _probe(spec) -> dict:
    """Body of the child process: build the model (and twin), start the meter, run warm-up + steps, report."""
    cfg, impl = BenchConfig(**spec["config"]), spec["impl"]
    backend = get_backend(spec["device"])
    with limit_threads(spec["threads"]):
        model = build_model(cfg, backend, spec["dtype"])
        runner = wrap(model)   # in either process, as training runs it (and with its allocator settings)
        twin = None
        if impl == "torch":
            import torch
            torch.set_num_threads(spec["torch_threads"])
            twin = make_twin(model)
        _warm_up(cfg, runner, twin)
        peak, base = _memory_mark(backend, impl)  # parameters are resident already; the rest comes after
        unit = torch_unit(cfg, runner, twin) if twin is not None else ours_unit(cfg, runner)
        for _ in range(spec["steps"]):
            unit()
        # our worker processes (minidiff.execution.processes) fork during the first unit: their growth counts as well
        return {"peak_mem_mb": peak() - base + (runner.worker_memory_mib() if impl == "ours" else 0.0)}


def measure_memory(cfg, impl, device="cpu", dtype="float32", threads=None, torch_threads=1, steps=2,
                   timeout=900) -> float:
    """Peak memory (MiB) of `steps` units of `cfg` by `impl` ("ours" | "torch") in a fresh Python process.

    Counted: everything the units allocate beyond the already-resident parameters (the twin's and, in the torch
    process, also ours, made before the baseline): gradients, optimizer state, the batch, activations and
    workspace -- the same for both, so the numbers compare. A fresh process per measurement keeps one
    implementation's allocator caches and high-water marks out of the other's. See `_memory_mark`.
    """
    spec = {"config": asdict(cfg), "impl": impl, "device": device, "dtype": dtype, "threads": threads,
            "torch_threads": torch_threads, "steps": steps}
    proc = subprocess.run([sys.executable, "-m", "minidiff.bench.memory", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {cfg.name}/{impl} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_mb"]


if __name__ == "__main__":  # the child process: python -m minidiff.bench.memory '<json spec>'
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
