"""The HDF5 layout of a run file: each part written with its checksum, and a whole file read back and verified.

minidiff.runs.file.RunFile is the only caller: it decides when and how a file is (re)built and published; this module
knows what goes where. The layout itself is documented in docs/run-format.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from minidiff.runs.tree import TreeError, crc32_of, read_tree

FORMAT = "minidiff-run"
FORMAT_VERSION = 1
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CHUNK_ROWS = 256


class RunFileError(RuntimeError):
    """A run file is missing, damaged or unusable; the message names the file and the damaged part."""


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


def read_checked(ds, path):
    name = ds.name.lstrip("/")
    try:
        data = ds[()]
    except (OSError, ValueError, KeyError) as exc:
        raise RunFileError(f"{path}: {name} is damaged (unreadable: {exc})") from None
    if "crc32" in ds.attrs and crc32_of(data) != int(ds.attrs["crc32"]):
        raise RunFileError(f"{path}: {name} is damaged (checksum mismatch)")
    return data


def read_and_verify(path: Path):
    """(attrs, metrics, checkpoint step) of a run file after checking every part; RunFileError names the damage."""
    if not path.exists():
        raise RunFileError(f"{path}: run file not found")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head != HDF5_SIGNATURE:
        raise RunFileError(f"{path}: not an HDF5 file (no HDF5 signature; empty, garbage or another format)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RunFileError(f"{path}: HDF5 structure is damaged or the file is truncated ({exc})") from None
    with f:
        try:
            attrs = {k: host_attr(v) for k, v in f.attrs.items()}
        except (OSError, KeyError) as exc:
            raise RunFileError(f"{path}: root attributes are damaged ({exc})") from None
        if attrs.get("format") != FORMAT:
            raise RunFileError(f"{path}: root attributes are missing or damaged: not a minidiff run file")
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise RunFileError(f"{path}: run-file format {attrs['format_version']} is newer than this minidiff "
                               f"({FORMAT_VERSION}); upgrade minidiff")
        try:
            json.loads(attrs["config"])
        except (KeyError, TypeError, ValueError):
            raise RunFileError(f"{path}: root attribute 'config' is missing or damaged (invalid JSON)") from None
        for part in ("metrics", "checkpoint", "samples"):
            if not isinstance(f.get(part), h5py.Group):
                raise RunFileError(f"{path}: group '{part}' is missing or damaged")
        metrics = {name: read_checked(ds, path) for name, ds in f["metrics"].items()}
        rows = len(metrics.get("step", ()))
        for name, arr in metrics.items():
            if len(arr) != rows:
                raise RunFileError(f"{path}: metrics/{name} is damaged ({len(arr)} rows, metrics/step has {rows})")
        ckpt_step = None
        if "state" in f["checkpoint"]:
            try:
                read_tree(f["checkpoint/state"])
                ckpt_step = int(f["checkpoint"].attrs["step"])
            except (TreeError, KeyError) as exc:
                raise RunFileError(f"{path}: checkpoint is damaged: {exc}") from None
        for ds in f["samples"].values():
            read_checked(ds, path)
    metrics.setdefault("step", np.zeros(0, dtype=np.int64))
    return attrs, metrics, ckpt_step
