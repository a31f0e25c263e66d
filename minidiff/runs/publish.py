"""How a run file reaches the disk: built whole in memory, written beside the old one, fsynced, renamed over it.

    image = build_image(attrs, metrics, checkpoint, old, samples, drop_after)   # bytes of a complete run file
    write_synced(tmp, image)                                                      # one write, fsync
    publish_file(tmp, path, "replace")                                            # os.replace: atomic

HDF5 never writes to the disk itself. A write it cannot finish (a full disk) leaves its library state dirty: every
later close or garbage collection of its objects fails again, printing pages of errors, down to a crash at exit. The
file is built with HDF5's in-memory (core) driver and its image written with one plain write, whose failure is a
clean OSError that minidiff.runs.file turns into a StorageError, with the previous file untouched.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import h5py

from minidiff.runs.layout import RunFileExistsError, write_metrics, write_samples
from minidiff.runs.tree import write_tree


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the `created`, `updated` and `saved` attributes)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def build_image(attrs: dict, metrics: dict, checkpoint, old, samples: dict, drop_samples_after) -> bytes:
    """The bytes of a complete run file: `attrs` at the root, `metrics`, the checkpoint ((state, step), or None to
    copy the `old` file's, if any) and the samples (the new ones, and the old file's up to drop_samples_after)."""
    with h5py.File("run-file.in-memory", "w", driver="core", backing_store=False, track_order=True) as f:
        f.attrs.update(attrs)
        write_metrics(f.create_group("metrics", track_order=True), metrics)
        ckpt = f.create_group("checkpoint")
        if checkpoint is not None:
            write_tree(ckpt, "state", checkpoint[0])
            ckpt.attrs.update(step=checkpoint[1], saved=now())
        elif old is not None and "state" in old["checkpoint"]:
            old.copy(old["checkpoint/state"], ckpt, "state")
            ckpt.attrs.update(old["checkpoint"].attrs)
        write_samples(f.create_group("samples"), old, samples, drop_samples_after)
        f.flush()
        return f.id.get_file_image()


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` as the whole file at `path` and fsync it (a partial write raises, as a full disk does)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_path(path, directory=False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on Windows; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_file(tmp: Path, path: Path, mode: str) -> None:
    """Put `tmp` in the place of `path`: "replace" (or "overwrite") with os.replace, atomic; "new" with a hard
    link, which refuses an existing name atomically (RunFileExistsError): no race between a check and the write."""
    if mode != "new":
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise RunFileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise RunFileExistsError(f"{path} already exists; pass overwrite=True") from None
        os.replace(tmp, path)
        return
    tmp.unlink()
