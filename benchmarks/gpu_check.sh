#!/usr/bin/env bash
# The GPU checks of issue 7 in one call of a lent GPU machine (see benchmarks/README.md): the tests that run on CuPy,
# where the GPU step's time goes, then the benchmark against PyTorch CUDA eager. Logs and JSON go to $OUT.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh [tests] [graphs] [breakdown] [bench] [memory] [cli]   (default: the first three)
# Exits 1 when there is no usable GPU for CuPy, or when any step failed (the others still run).
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-tests breakdown bench}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import cupy, numpy, torch; cupy.zeros(1).sum().item()
print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)" || {
  echo "no usable GPU for CuPy here: nothing to check" >&2; exit 1; }
# the GPU images have pytest-xdist and pytest-timeout; elsewhere the tests run serially, without a time limit
plugins=$(python3 -c "import xdist, pytest_timeout" 2>/dev/null && echo "-n 8 --timeout 150")
failed=""
for step in $steps; do
  case $step in
    tests)  # the CuPy parametrisations of every backend-parametrised test, tests/backend/test_gpu.py and
            # tests/execution/test_gpu_graphs.py
      timeout 240 python3 -m pytest -q -p no:cacheprovider $plugins -k gpu tests/ -rfs 2>&1 \
        | tee "$OUT/tests.log" | tail -40 || failed="$failed tests" ;;
    graphs)  # the default training step with CUDA graphs on and off, interleaved, and their bits compared
      timeout 120 python3 benchmarks/graph_ab.py 2>&1 | tee "$OUT/graphs.log" || failed="$failed graphs" ;;
    breakdown)
      timeout 90 python3 benchmarks/gpu_breakdown.py 2>&1 | tee "$OUT/breakdown.log" || failed="$failed breakdown" ;;
    bench)
      timeout 200 python3 benchmarks/run.py --device gpu --no-memory --out "$OUT/bench.json" 2>&1 \
        | tee "$OUT/bench.log" | tail -12 || failed="$failed bench" ;;
    memory)
      timeout 200 python3 benchmarks/run.py --device gpu --repeats 3 --out "$OUT/bench_mem.json" 2>&1 \
        | tee "$OUT/bench_mem.log" | tail -12 || failed="$failed memory" ;;
    cli)  # the main job end to end on the GPU: `minidiff train` with its defaults, then inspect and sample the run
      { time timeout 200 python3 cli.py train --device gpu --quiet --out "$OUT/gpu_run.h5"; } 2>&1 \
        | tee "$OUT/train.log" | tail -8 || failed="$failed train"
      timeout 60 python3 cli.py inspect "$OUT/gpu_run.h5" 2>&1 | tee "$OUT/inspect.log" | tail -15 \
        || failed="$failed inspect"
      timeout 60 python3 cli.py sample "$OUT/gpu_run.h5" --out "$OUT/gpu_samples.png" 2>&1 | tail -3 \
        || failed="$failed sample" ;;
    *) echo "unknown step $step (tests, graphs, breakdown, bench, memory, cli)" >&2; failed="$failed $step" ;;
  esac
done
if [ -n "$failed" ]; then echo "FAILED:$failed" >&2; exit 1; fi
echo "all steps passed: $steps"
