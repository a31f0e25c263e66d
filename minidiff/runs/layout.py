"""The HDF5 layout of a run file: each part written with its checksum; the errors a run file raises.

minidiff.runs.file.RunFile is the only writer: it decides when and how a file is (re)built and published; this module
knows what goes where, and minidiff.runs.validate reads a whole file back and checks it. The layout itself is
documented in docs/run-format.md.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np

from minidiff.runs.tree import crc32_of

FORMAT = "minidiff-run"
FORMAT_VERSION = 1
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
STATUSES = ("running", "finished", "diverged", "interrupted")
_CHUNK_ROWS = 256


class RunFileError(RuntimeError):
    """A run file is missing, damaged or unusable; the message names the file and the damaged part."""


# errno values that mean the machine failed, not the input: the disk is full, read-only or gone, access is denied
ENVIRONMENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO", "ESTALE", "ENOTCONN", "ENODEV", "ENXIO",
    "ETIMEDOUT", "EHOSTDOWN", "ENOMEM", "ENOLCK") if hasattr(errno, name))


class RunFileExistsError(RunFileError, FileExistsError):
    """The run file exists and overwrite was not requested."""


class StorageError(OSError):
    """The file system refused a read or write (disk full, read-only, permission, a lost mount): the environment
    failed, not the input. str() is one line naming the file and the reason; errno is the underlying error's."""

    def __init__(self, code, message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self):
        return self.message


def storage_error(path, exc: OSError, action: str = "write"):
    """The StorageError for an OSError that the file system raised while `action`-ing `path`, or a RunFileError
    when the error is the input's (a name too long, a path through a file)."""
    code = getattr(exc, "errno", None)
    reason = os.strerror(code) if code else (str(exc).splitlines() or [type(exc).__name__])[0]
    if code in _INPUT_ERRNOS:
        return RunFileError(f"cannot {action} {path}: {reason}")
    return StorageError(code, f"cannot {action} {path}: {reason}")


# the path given is wrong, the machine is fine
_INPUT_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR}


def host_attr(v):
    """An HDF5 attribute value as a plain Python value (str, number, list)."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def write_metrics(group, metrics: dict) -> None:
    """metrics/<name>: one chunked, extendable dataset per metric, each with its crc32."""
    for name, arr in metrics.items():
        ds = group.create_dataset(name, data=arr, maxshape=(None,) + arr.shape[1:],
                                  chunks=(_CHUNK_ROWS,) + arr.shape[1:])
        ds.attrs["crc32"] = crc32_of(arr)


def write_samples(group, old, new: dict, drop_after) -> None:
    """samples/<step>: the new images (with their sampler attributes) and the old file's, up to drop_after."""
    kept = [] if old is None else [int(k) for k in old["samples"]]
    for step in sorted(set(kept) | set(new)):
        if drop_after is not None and step > drop_after:
            continue
        if step in new:
            images, attrs = new[step]
            ds = group.create_dataset(str(step), data=images)
            ds.attrs.update({k: v if isinstance(v, (str, int, float, bool, np.generic)) else json.dumps(v)
                             for k, v in attrs.items()})
            ds.attrs.update(step=step, crc32=crc32_of(images))
        else:
            old.copy(old[f"samples/{step}"], group, str(step))


def merge_rows(old: dict, pending: list, widths: dict) -> dict:
    """Flushed metric arrays + pending rows [(step, {name: value})] -> aligned arrays, one row per step: rows of
    one step merge, missing values are NaN; widths: name -> vector length (None for a scalar)."""
    pending = list(pending)
    n_old = len(old["step"])
    if pending and n_old and pending[0][0] == old["step"][-1]:  # more values for the last flushed row
        n_old -= 1
        pending.insert(0, (pending[0][0], {k: v[-1] for k, v in old.items() if k != "step"}))
    steps, rows = [], []
    for step, row in pending:
        if steps and steps[-1] == step:
            rows[-1].update(row)
        else:
            steps.append(step)
            rows.append(dict(row))
    out = {"step": np.concatenate([old["step"][:n_old], np.asarray(steps, dtype=np.int64)])}
    names = [k for k in old if k != "step"] + [k for r in rows for k in r if k not in old]
    for name in dict.fromkeys(names):
        width = widths.get(name)
        tail = () if width is None else (width,)
        new = np.full((len(rows),) + tail, np.nan)
        for i, r in enumerate(rows):
            if name in r:
                new[i] = r[name]
        head = old[name][:n_old] if name in old else np.full((n_old,) + tail, np.nan)
        out[name] = np.concatenate([head, new])
    return out
