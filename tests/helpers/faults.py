"""Tools of the fault-injection suite (the test_faults* files): runs to damage, ways to damage them, the contract's
assertions, and a tally of trials per family that the suite prints."""

import collections
import subprocess
import sys

import h5py
import numpy as np

from helpers.bitwise import bitwise_problem
from helpers.paths import CLI_PY
from minidiff.runs.tree import crc32_of

CLI = [sys.executable, str(CLI_PY)]

# a moons run that trains in about a second: checkpoints, logs and an evaluation, no images
MOONS = ["--dataset", "moons", "--timesteps", "50", "--batch-size", "32", "--log-every", "2", "--ckpt-every", "4",
         "--sample-every", "1000", "--eval-every", "4", "--eval-samples", "32", "--probe-every", "4",
         "--probe-buckets", "2"]
# a UNet on the digits small enough for the suite: the image path (sample grids, halving, the PNG beside the run)
DIGITS = ["--dataset", "digits", "--base-channels", "8", "--timesteps", "50", "--batch-size", "16", "--log-every",
          "2", "--ckpt-every", "4", "--sample-every", "4", "--eval-every", "0", "--probe-every", "0"]

TALLY = collections.defaultdict(lambda: [0, 0])   # family -> [trials, held]


def count(family: str, held: bool) -> bool:
    TALLY[family][0] += 1
    TALLY[family][1] += bool(held)
    return held


def tally_problem():
    """Print the trials of every family so far (trials/held) and return the families where one did not hold."""
    print("\nfault trials (family: trials/held): " + "; ".join(f"{f}: {t}/{h}" for f, (t, h) in sorted(TALLY.items())))
    return {f: (t, h) for f, (t, h) in TALLY.items() if t != h}


def run_cli(*args, env=None, preexec_fn=None, timeout=300, cwd=None):
    """The CLI in its own process (a traceback, a warning or a second line shows as it would to a user)."""
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=preexec_fn, cwd=cwd, check=False)


def contract_problem(proc, code, *fragments):
    """None when `proc` ended as the README's contract says for exit `code`: that code, and (for an error) one line
    starting "Error:" holding each fragment, no traceback, no warning. Else what went wrong."""
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != code:
        return f"exit {proc.returncode}, expected {code}: {proc.stderr[-800:]}"
    if "Traceback" in proc.stderr or "Warning" in proc.stderr:
        return f"traceback or warning: {proc.stderr[-800:]}"
    if code in (0, 130):
        return None
    errors = [ln for ln in err if ln.startswith("Error:")]
    if len(errors) != 1 or err[-1] != errors[0]:
        return f"not one error line at the end: {err}"
    missing = [f for f in fragments if f not in errors[0]]
    return f"{missing} not in {errors[0]!r}" if missing else None


def set_leaf(f, name, value):
    """Replace a dataset's value and its checksum in an open run file: damage only the content checks can see."""
    ds = f[name]
    value = np.broadcast_to(np.asarray(value, dtype=ds.dtype), ds.shape).copy()
    ds[...] = value
    ds.attrs["crc32"] = crc32_of(value)


def replace_leaf(f, name, value):
    """Replace a checkpoint array by one of another shape or dtype, with a valid checksum."""
    attrs = dict(f[name].attrs)
    del f[name]
    ds = f.create_dataset(name, data=value)
    ds.attrs.update(attrs)
    ds.attrs["crc32"] = crc32_of(np.asarray(value))


def edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def metrics_problem(a: dict, b: dict):
    """None when two runs' metrics agree bit for bit, except the clock readings."""
    timed = {"step_time", "wall_time"}
    if set(a) != set(b):
        return f"metrics {sorted(set(a) ^ set(b))} in one run only"
    untimed_names = sorted(set(a) - timed)
    return bitwise_problem({n: a[n] for n in untimed_names}, {n: b[n] for n in untimed_names}, "metrics")
