"""One HDF5 file per training run: metrics, a checkpoint, samples and the run's identity; crash-safe.

Layout and guarantees: docs/run-format.md. The short version:

    run = RunFile.create("runs/a.h5", config, command_line)      # never clobbers an existing file
    run.log(step, loss=0.1, lr=1e-3, timestep_loss=vec)          # buffered in memory
    run.save_checkpoint({"step": step, "params": {...}, ...})    # writes metrics + checkpoint, atomically
    run.set_status("finished")
    state = RunFile.open("runs/a.h5", mode="a").resume()        # checkpoint back, later metrics dropped

Crash safety: HDF5 has no journal, so a process killed while it modifies a file can leave the whole file unreadable.
This module therefore never modifies a run file in place. Every flush writes a complete new file beside it
(`<name>.h5.tmp`: root attributes, all metrics, the new checkpoint or a copy of the old one, the samples), fsyncs it,
renames it over the original with os.replace (atomic on POSIX and Windows) and fsyncs the directory. A reader, or a
run killed at any instant, sees either the old complete file or the new complete one. Rebuilding (rather than copying
the file and editing the copy) also keeps the file compact: HDF5 does not reclaim the space of deleted objects.
Between flushes the file is closed, so other processes can inspect it while a run trains. One process writes a run
at a time: a writable RunFile holds the run's writer lock (minidiff.runs.lock) from create() or open(mode="a") until
close() (or until it is garbage-collected, or its process ends).

Errors: RunFileError (the file is missing, damaged, locked by another writer: the input's fault) and StorageError
(an OSError: the file system refused a write, e.g. a full disk; the previous file is then left as it was).

RunFile decides when a file is rebuilt and how it is published; minidiff.runs.layout writes the parts (metrics,
checkpoint, samples) and minidiff.runs.validate checks a whole file on open. RunFileError, StorageError and the format
constants are importable from here.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import h5py
import numpy as np

from minidiff import __version__
from minidiff.backend import to_numpy
from minidiff.runs import lock
from minidiff.runs.layout import (FORMAT, FORMAT_VERSION, HDF5_SIGNATURE, STATUSES, RunFileError, RunFileExistsError,
                                  StorageError, host_attr, merge_rows, storage_error)
from minidiff.runs.lock import RunFileLockedError
from minidiff.runs.publish import build_image, fsync_path, now, publish_file, write_synced
from minidiff.runs.validate import nonfinite_leaf, read_checked, read_state, validate_file

__all__ = ["FORMAT", "FORMAT_VERSION", "HDF5_SIGNATURE", "STATUSES", "RunFile", "RunFileError", "RunFileExistsError",
           "RunFileLockedError", "StorageError"]




def _acquire(path) -> None:
    try:
        lock.acquire(path)
    except RunFileError:
        raise
    except OSError as exc:  # the lock file cannot be made: nothing could be written beside it either
        raise storage_error(path, exc, "lock") from None


class RunFile:
    """A run file on disk plus its pending (not yet flushed) metric rows. Build with create() or open()."""

    def __init__(self, path, writable: bool, attrs: dict, metrics: dict, ckpt_step):
        self.path = Path(path)
        self.writable = writable
        self._attrs = attrs
        self._flushed = metrics      # name -> host array, all with len == len(metrics["step"])
        self._pending = []           # [(step, {name: float | 1-D array})] logged since the last flush
        self._widths = {k: (v.shape[1] if v.ndim == 2 else None) for k, v in metrics.items() if k != "step"}
        self._ckpt_step = ckpt_step
        self._locked = False

    # --- construction --------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, config: dict, command_line: str = "", overwrite: bool = False, backend: str = "numpy",
               versions: dict | None = None) -> "RunFile":
        """Write a new run file (status "running", no metrics, no checkpoint) and return it open for writing.

        config: the full configuration, stored as JSON. versions: extra library versions (e.g. {"cupy": "13.3"}).
        An existing file is replaced only with overwrite=True, and then atomically. Parent folders are created.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise RunFileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        try:
            config_json = json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config must be JSON-serialisable: {exc}") from None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(path.parent, exc, "create the folder") from None
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "minidiff_version": __version__,
                 "created": now(), "command_line": command_line, "config": config_json, "status": "running",
                 "status_message": "", "backend": backend, "numpy_version": np.__version__,
                 "h5py_version": h5py.__version__, "hdf5_version": h5py.version.hdf5_version,
                 "python_version": platform.python_version(), "platform": platform.platform()}
        attrs.update({f"{k}_version": str(v) for k, v in (versions or {}).items()})
        run = cls(path, True, attrs, {"step": np.zeros(0, dtype=np.int64)}, None)
        run._lock()
        try:
            run._remove_tmp()
            run._rewrite(publish="overwrite" if overwrite else "new")  # nothing of an overwritten run is kept
        except BaseException:
            run._unlock()
            raise
        return run

    @classmethod
    def open(cls, path, mode: str = "r") -> "RunFile":
        """Open an existing run file: mode "r" to inspect or sample, "a" to continue writing (see resume()).

        The whole file is checked on open (minidiff.runs.validate): root attributes, every metric, every checkpoint
        leaf's checksum and finiteness, every sample; damage raises RunFileError naming the part. Mode "a" first
        takes the writer lock (RunFileLockedError when another process writes the run). A leftover `<name>.h5.tmp`
        (a flush that was killed) is ignored, and removed in mode "a". Opening changes no byte of the file.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        if mode == "r":
            return cls(path, False, *validate_file(path))
        _acquire(path)   # before reading: no other writer can change the file between the check and our writes
        run = None
        try:
            run = cls(path, True, *validate_file(path))
            run._locked = True
            run._remove_tmp()
        except BaseException:
            if run is not None:
                run._locked = False
            lock.release(path)
            raise
        return run

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Flush pending metrics (the file itself is only ever open inside a flush) and give up the writer lock."""
        try:
            if self.writable and self._pending:
                self.flush()
        finally:
            self._unlock()

    def __del__(self):
        try:
            self._unlock()
        except Exception:  # noqa: BLE001 -- at interpreter exit; the process's end drops the lock anyway
            pass

    def _lock(self) -> None:
        if not self._locked:
            _acquire(self.path)
            self._locked = True

    def _unlock(self) -> None:
        if getattr(self, "_locked", False):
            self._locked = False
            lock.release(self.path)

    # --- properties ----------------------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def config(self) -> dict:
        return json.loads(self._attrs["config"])

    @property
    def status(self) -> str:
        return self._attrs["status"]

    @property
    def checkpoint_step(self):
        """The step of the stored checkpoint, or None when no checkpoint was saved yet."""
        return self._ckpt_step

    # --- metrics -------------------------------------------------------------------------------------------------
    def log(self, step: int, **values) -> None:
        """Buffer one row of metrics at `step` (scalars, or 1-D vectors such as timestep_loss).

        Every metric gets a row for every logged step (NaN where a step did not log it); logging the same step
        again fills in that row. Steps must not decrease. Nothing reaches the disk until flush() or a checkpoint.
        """
        self._require_writable()
        step = int(step)
        last = self._last_step()
        if last is not None and step < last:
            raise ValueError(f"metrics step went back from {last} to {step}; resume() truncates after a checkpoint")
        row = {}
        for name, v in values.items():
            if name == "step" or "/" in name or not name:
                raise ValueError(f"invalid metric name {name!r}")
            a = np.asarray(to_numpy(v), dtype=np.float64)
            width = a.shape[0] if a.ndim == 1 else None
            if a.ndim > 1 or self._widths.setdefault(name, width) != width:
                raise ValueError(f"metric {name!r} must stay a scalar or a 1-D vector of one length "
                                 f"(first logged with width {self._widths.get(name)}), got shape {a.shape}")
            row[name] = float(a) if width is None else a.copy()
        self._pending.append((step, row))

    def _last_step(self):
        if self._pending:
            return self._pending[-1][0]
        steps = self._flushed["step"]
        return int(steps[-1]) if len(steps) else None

    def metrics(self) -> dict:
        """Every metric as a host array, flushed and pending rows together: "step" (int64), scalars (R,) float64,
        vectors (R, width) float64."""
        return {k: v.copy() for k, v in self._materialise().items()}

    def _materialise(self) -> dict:
        return merge_rows(self._flushed, self._pending, self._widths)

    def flush(self) -> None:
        """Write the pending metrics: the file is rebuilt beside itself and atomically replaced."""
        self._require_writable()
        self._rewrite()

    # --- checkpoint ----------------------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict, step: int | None = None) -> None:
        """Store `state` (a nested dict of arrays, numbers, strings, None, lists and dicts) as the checkpoint,
        replacing the previous one atomically together with all pending metrics.

        step defaults to state["step"]; resume() keeps the metric rows and samples up to it. Device arrays are
        copied to the host; load_checkpoint() returns host NumPy arrays, bit for bit. ValueError, nothing written,
        when a floating-point leaf is NaN or Inf: readers refuse such a checkpoint as damaged.
        """
        self._require_writable()
        if step is None:
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("save_checkpoint needs step= or a state dict with a 'step' entry")
            step = state["step"]
        bad = nonfinite_leaf(state)
        if bad is not None:   # a reader would refuse it (minidiff.runs.validate): never write one
            raise ValueError(f"{self.path}: checkpoint/state/{bad[0]} holds {bad[1]}; a checkpoint must be finite")
        self._rewrite(checkpoint=(state, int(to_numpy(step))))

    def load_checkpoint(self) -> dict:
        """The stored checkpoint as a nested dict, every leaf checked as on open (checksum, finiteness, step)."""
        if self._ckpt_step is None:
            raise RunFileError(f"{self.path} holds no checkpoint (the run stopped before its first one)")
        with self._h5() as f:
            if "state" not in f["checkpoint"]:
                raise RunFileError(f"{self.path}: its checkpoint is gone (the file was replaced meanwhile)")
            state, self._ckpt_step = read_state(f, self.path)
        return state

    def resume(self, state=None, config: dict | None = None) -> dict | None:
        """Continue this run: drop metric rows and samples logged after its checkpoint's step (all of them when it
        has no checkpoint: the run then starts again at step 0), set the status back to "running", and return the
        checkpoint (or None). Needs mode "a". A caller that has already read and checked the checkpoint passes it
        as `state`, so the file is not read again between the check and the write; `config` replaces the stored
        config in the same write (see set_config)."""
        self._require_writable()
        if state is None and self._ckpt_step is not None:
            state = self.load_checkpoint()
        if config is not None:
            try:
                self._attrs["config"] = json.dumps(config)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"config must be JSON-serialisable: {exc}") from None
        last = -1 if self._ckpt_step is None else self._ckpt_step
        keep = self._flushed["step"] <= last
        self._flushed = {k: v[keep] for k, v in self._flushed.items()}
        self._pending = [(s, r) for s, r in self._pending if s <= last]
        self._attrs.update(status="running", status_message="")
        self._rewrite(drop_samples_after=last)
        return state

    def discard_pending(self) -> None:
        """Forget the metric rows logged since the last flush (a flush that failed: a status can still be written
        in the space the old file takes)."""
        self._pending = []

    # --- samples and status --------------------------------------------------------------------------------------
    def add_samples(self, step: int, images, **attrs) -> None:
        """Store uint8 sample images as samples/<step> with the sampler settings as attributes (flushes)."""
        self._require_writable()
        images = to_numpy(images)
        if images.dtype != np.uint8:
            raise TypeError(f"samples must be uint8 images (see minidiff.datasets.to_uint8), got {images.dtype}")
        self._rewrite(samples={int(step): (np.ascontiguousarray(images), attrs)})

    def sample_steps(self) -> list:
        with self._h5() as f:
            return sorted(int(k) for k in f["samples"])

    def load_samples(self, step: int | None = None):
        """(uint8 images, attrs) stored at `step` (default: the latest)."""
        steps = self.sample_steps()
        if not steps:
            raise RunFileError(f"{self.path} holds no samples")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise RunFileError(f"{self.path} has no samples at step {step} (it has {steps})")
        with self._h5() as f:
            ds = f[f"samples/{step}"]
            return read_checked(ds, self.path), {k: host_attr(v) for k, v in ds.attrs.items() if k != "crc32"}

    def set_status(self, status: str, message: str = "") -> None:
        """running | finished | diverged | interrupted, with an optional one-line reason; flushes."""
        self._require_writable()
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        self._attrs.update(status=status, status_message=message)
        self._rewrite()

    def set_config(self, config: dict) -> None:
        """Replace the stored config (e.g. `resume --steps` past the planned steps extends config["steps"]); flushes.
        The caller vouches that the new config describes the same run: the checkpoint is kept as it is."""
        self._require_writable()
        try:
            self._attrs["config"] = json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config must be JSON-serialisable: {exc}") from None
        self._rewrite()

    def set_attrs(self, **values) -> None:
        """Extra root attributes (strings or numbers, e.g. layer_names as JSON); written with the next flush."""
        self._require_writable()
        reserved = sorted(set(values) & {"format", "format_version", "status", "config", "created"})
        if reserved:
            raise ValueError(f"attribute(s) {reserved} are managed by RunFile")
        self._attrs.update(values)

    # --- the one writer ------------------------------------------------------------------------------------------
    def _require_writable(self):
        if not self.writable:
            raise RunFileError(f"{self.path} was opened read-only; open it with mode='a' to write")
        self._lock()   # again after close(): the lock is given up there

    def _tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def _remove_tmp(self):
        try:
            self._tmp().unlink(missing_ok=True)
        except OSError as exc:
            raise storage_error(self._tmp(), exc, "remove") from None

    def _h5(self):
        try:
            return h5py.File(self.path, "r")
        except OSError as exc:
            raise RunFileError(f"{self.path}: cannot open ({exc})") from None

    def _rewrite(self, checkpoint=None, samples=None, drop_samples_after=None, publish="replace") -> None:
        """Build the complete file in memory, write it to <name>.tmp, fsync it, and publish it over <name> in one
        atomic step (minidiff.runs.publish)."""
        metrics = self._materialise()
        self._attrs["updated"] = now()
        tmp = self._tmp()
        try:
            old = h5py.File(self.path, "r") if publish == "replace" and self.path.exists() else None
            try:
                image = build_image(self._attrs, metrics, checkpoint, old, samples or {}, drop_samples_after)
            finally:
                if old is not None:
                    old.close()
            write_synced(tmp, image)
            publish_file(tmp, self.path, publish)
        except BaseException as exc:
            try:
                tmp.unlink(missing_ok=True)  # a failed flush leaves the previous file as it was
            except OSError:
                pass
            if isinstance(exc, OSError) and not isinstance(exc, (RunFileError, StorageError)):
                raise storage_error(self.path, exc) from None
            raise
        fsync_path(self.path.parent, directory=True)
        self._flushed, self._pending = metrics, []
        if checkpoint is not None:
            self._ckpt_step = checkpoint[1]
