"""The one validation of a run file: every reader (RunFile.open, hence inspect, sample, evaluate, compare, resume)
passes through `validate_file` before it uses anything, and `resume` passes it before it changes a byte.

What is checked, each failure a RunFileError of one line naming the file and the part:
  structure   the HDF5 signature, the file opens, groups metrics / checkpoint / samples exist
  attributes  format is "minidiff-run", format_version an integer no newer than this minidiff's, config a JSON
              object, status one of STATUSES
  metrics     every dataset's checksum; metrics/step 1-D integers increasing strictly; every other metric float
              (R,) or (R, K) with R rows
  checkpoint  every leaf's checksum and type; the `step` attribute an integer >= 0 that equals state/step; every
              floating-point leaf finite (parameters, EMA, optimizer moments, accumulators: a checkpoint is written
              only from a finite state, so NaN or Inf in one is damage)
  samples     names that are step numbers, uint8 (N, C, H, W) images, checksums
What a checkpoint must hold for a particular model (shapes, dtypes, counters that agree) is checked one layer up, by
minidiff.training.integrity, which knows the trainer's state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np

from minidiff.runs.layout import FORMAT, FORMAT_VERSION, HDF5_SIGNATURE, STATUSES, RunFileError, host_attr, \
    storage_error
from minidiff.runs.tree import TreeError, crc32_of, read_tree


def validate_file(path: Path):
    """(attrs, metrics, checkpoint step or None) of the run file at `path` after checking every part (module doc)."""
    path = Path(path)
    _check_signature(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RunFileError(f"{path}: HDF5 structure is damaged or the file is truncated "
                           f"({str(exc).splitlines()[0]})") from None
    with f:
        try:
            attrs = check_attributes(f, path)
            for part in ("metrics", "checkpoint", "samples"):
                if part not in f or not isinstance(_get(f, part, path), h5py.Group):
                    raise RunFileError(f"{path}: group '{part}' is missing or damaged")
            metrics = check_metrics(f["metrics"], path)
            ckpt_step = None
            if "state" in f["checkpoint"]:
                _, ckpt_step = read_state(f, path)
            check_samples(f["samples"], path)
        except RunFileError:
            raise
        except HDF5_ERRORS as exc:   # HDF5 found damaged metadata where no check of ours looked yet
            raise RunFileError(f"{path}: HDF5 structure is damaged ({_first_line(exc)})") from None
    return attrs, metrics, ckpt_step


# what h5py raises on damaged structure: OSError or RuntimeError from HDF5, KeyError for a broken link, ValueError and
# TypeError (UnicodeDecodeError among them) for undecodable attributes
HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _first_line(exc) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_signature(path: Path) -> None:
    if not path.exists():
        raise RunFileError(f"{path}: run file not found")
    if path.is_dir():
        raise RunFileError(f"{path}: is a directory, not a run file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise storage_error(path, exc, "read") from None
    if head != HDF5_SIGNATURE:
        raise RunFileError(f"{path}: not an HDF5 file (no HDF5 signature; empty, garbage or another format)")


def _get(group, name, path):
    try:
        return group[name]
    except (KeyError, OSError, ValueError) as exc:
        where = f"{group.name.strip('/')}/{name}".lstrip("/")
        raise RunFileError(f"{path}: {where} is damaged ({str(exc).splitlines()[0]})") from None


def check_attributes(f, path) -> dict:
    """The root attributes as plain values, after checking the ones every reader relies on."""
    try:
        attrs = {k: host_attr(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise RunFileError(f"{path}: root attributes are damaged ({exc})") from None
    if attrs.get("format") != FORMAT:
        raise RunFileError(f"{path}: root attributes are missing or damaged: not a minidiff run file")
    version = attrs.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RunFileError(f"{path}: root attribute 'format_version' is damaged (an integer expected, got "
                           f"{_short(version)})")
    if version > FORMAT_VERSION:
        raise RunFileError(f"{path}: run-file format {version} is newer than this minidiff ({FORMAT_VERSION}); "
                           "upgrade minidiff")
    try:
        config = json.loads(attrs["config"])
    except (KeyError, TypeError, ValueError):
        raise RunFileError(f"{path}: root attribute 'config' is missing or damaged (invalid JSON)") from None
    if not isinstance(config, dict):
        raise RunFileError(f"{path}: root attribute 'config' is damaged (a JSON object expected, got "
                           f"{type(config).__name__})")
    if attrs.get("status") not in STATUSES:
        raise RunFileError(f"{path}: root attribute 'status' is damaged ({_short(attrs.get('status'))}; expected "
                           f"one of {', '.join(STATUSES)})")
    message = attrs.get("status_message", "")
    if not isinstance(message, str):
        raise RunFileError(f"{path}: root attribute 'status_message' is damaged (a string expected)")
    return attrs


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_checked(ds, path):
    """A dataset's value after its checksum; RunFileError naming it when it is unreadable, not a dataset or damaged."""
    name = ds.name.lstrip("/")
    if not isinstance(ds, h5py.Dataset):
        raise RunFileError(f"{path}: {name} is damaged (a group where a dataset belongs)")
    try:
        data = ds[()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunFileError(f"{path}: {name} is damaged (unreadable: {str(exc).splitlines()[0]})") from None
    if "crc32" in ds.attrs and crc32_of(data) != int(ds.attrs["crc32"]):
        raise RunFileError(f"{path}: {name} is damaged (checksum mismatch)")
    return data


def check_metrics(group, path) -> dict:
    """metrics/<name> -> host array, every one checked (module doc); "step" is always present (empty: no rows)."""
    metrics = {name: read_checked(_get(group, name, path), path) for name in group}
    steps = metrics.setdefault("step", np.zeros(0, dtype=np.int64))
    if steps.ndim != 1 or not np.issubdtype(steps.dtype, np.integer):
        raise RunFileError(f"{path}: metrics/step is damaged ({steps.dtype} {steps.shape}, 1-D integers expected)")
    if len(steps) and (steps[0] < 0 or np.any(np.diff(steps) <= 0)):
        raise RunFileError(f"{path}: metrics/step is damaged (steps must increase strictly from 0 or more)")
    for name, arr in metrics.items():
        if name == "step":
            continue
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.floating):
            raise RunFileError(f"{path}: metrics/{name} is damaged ({arr.dtype} {arr.shape}, float (R,) or (R, K) "
                               "expected)")
        if len(arr) != len(steps):
            raise RunFileError(f"{path}: metrics/{name} is damaged ({len(arr)} rows, metrics/step has {len(steps)})")
    return metrics


def read_state(f, path):
    """(the checkpoint's state tree, its step) from an open run file, every leaf checked (module doc)."""
    try:
        state = read_tree(f["checkpoint/state"])
    except (TreeError, KeyError, OSError, ValueError, TypeError) as exc:
        raise RunFileError(f"{path}: checkpoint is damaged: {exc}") from None
    raw_step = f["checkpoint"].attrs.get("step")
    if not isinstance(raw_step, (int, np.integer)) or isinstance(raw_step, (bool, np.bool_)) or raw_step < 0:
        raise RunFileError(f"{path}: checkpoint attribute 'step' is damaged (a step number expected, got "
                           f"{_short(host_attr(raw_step))})")
    step = int(raw_step)
    if isinstance(state, dict) and "step" in state and state["step"] != step:
        raise RunFileError(f"{path}: checkpoint is damaged: its step attribute ({step}) and checkpoint/state/step "
                           f"({_short(state['step'])}) disagree")
    bad = nonfinite_leaf(state)
    if bad is not None:
        raise RunFileError(f"{path}: checkpoint/state/{bad[0]} holds {bad[1]}")
    return state, step


def nonfinite_leaf(tree, where: str = ""):
    """(path, "NaN" | "Inf" | "NaN and Inf (k of n values)") of the first floating-point leaf of a state tree (nested
    dicts / lists of host arrays and numbers) that is not finite, or None. Integers and strings are always finite."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return _nonfinite_value(tree, where)
    for key, value in items:
        found = nonfinite_leaf(value, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _nonfinite_value(value, where):
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, "NaN" if math.isnan(value) else "Inf")
    if not isinstance(value, (np.ndarray, np.generic)) or value.dtype.kind not in "fc":
        return None
    a = np.asarray(value)
    if np.isfinite(a).all():
        return None
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    kinds = " and ".join(kind for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
    return where, kinds if a.size == 1 else f"{kinds} ({n_nan + n_inf} of {a.size} values)"


def check_samples(group, path) -> None:
    for name in group:
        if not name.isdigit():
            raise RunFileError(f"{path}: samples/{name} is damaged (a step number expected as its name)")
        data = read_checked(_get(group, name, path), path)
        if data.dtype != np.uint8 or data.ndim != 4:
            raise RunFileError(f"{path}: samples/{name} is damaged ({data.dtype} {data.shape}, uint8 (N, C, H, W) "
                               "expected)")
