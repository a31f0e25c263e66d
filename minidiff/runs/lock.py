"""One writer per run file: `<name>.h5.lock` beside it, held with a POSIX record lock while a process writes the run.

    acquire("runs/a.h5")      # RunFileLockedError "runs/a.h5 is being written by process 1234" if another holds it
    ...                       # create, log, checkpoint, set the status
    release("runs/a.h5")

Readers take no lock: a run file is only ever replaced whole (minidiff.runs.file), so inspect, sample, evaluate and
compare read it while it trains. Why a record lock (fcntl.lockf) and not flock: the kernel drops it when the holding
process ends however it ends (SIGKILL included), so a lock is never stale, and it is not handed on to the worker
processes a model forks (a flock would be, and would outlive a killed parent while they linger). Record locks belong
to a process, not to an open file: within one process the lock is counted here, so several RunFile objects on one
path (a test that trains, then resumes) share it, and the lock file is opened exactly once per process (closing any
descriptor of it would drop the lock).

The lock file holds the holder's process id, for the message. It is removed on release; one left by a killed process
locks nothing and is reused. After locking, the path must still name the locked file (a releasing process may have
removed it in between), else the lock is taken again.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from minidiff.runs.layout import RunFileError

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range locks play the same part
    fcntl = None
    import msvcrt

_HELD: dict = {}        # lock path -> [file descriptor, count]
_GUARD = threading.Lock()


class RunFileLockedError(RunFileError):
    """Another process is writing this run file."""


def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _key(path) -> str:
    return os.path.realpath(lock_path(path))


def acquire(path) -> None:
    """Hold the writer lock of the run file at `path` (counted within a process). RunFileLockedError when another
    process holds it; OSError when the lock file cannot be made (a read-only folder: nothing can be written)."""
    key = _key(path)
    with _GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return
        for _ in range(100):
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                pid = _read_pid(fd, wait=True)
                os.close(fd)
                who = f"process {pid}" if pid else "another process"
                raise RunFileLockedError(f"{path} is being written by {who}; wait for it to end (inspect, sample "
                                         "and evaluate may read the run meanwhile)")
            if _names_same_file(key, fd):
                break
            os.close(fd)  # removed by its last holder between our open and our lock: take the new one
        else:
            raise RunFileLockedError(f"{path}: its lock file keeps being replaced; another process is writing it")
        _write_pid(fd)
        _HELD[key] = [fd, 1]


def release(path) -> None:
    """Give up one hold of the lock; the last one removes the lock file and unlocks."""
    key = _key(path)
    with _GUARD:
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        try:
            os.unlink(key)   # while still locked: a process that opened it meanwhile sees it gone and retries
        except OSError:
            pass
        os.close(entry[0])   # drops the lock


def holder(path):
    """The process id writing the run at `path`, or None when no process holds its lock."""
    key = _key(path)
    with _GUARD:
        if key in _HELD:
            return os.getpid()
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return None
    try:
        if fcntl is not None:
            if _probe(fd):
                return None
        return _read_pid(fd) or -1
    finally:
        os.close(fd)


def _probe(fd) -> bool:
    """Whether the lock is free (a shared lock is granted only when nobody holds the exclusive one)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    return True   # closing fd releases the probe (this process holds no other lock on this file)


def _try_lock(fd) -> bool:
    try:
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _names_same_file(key, fd) -> bool:
    try:
        now = os.stat(key)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _write_pid(fd) -> None:
    try:   # best effort: on a full disk the lock still holds, the message then says "another process"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass


def _read_pid(fd, wait: bool = False):
    """The holder's process id from the lock file, or None. wait: give a holder that has just locked up to ~0.5 s to
    write it (it locks first, then writes: a writer refused in between would otherwise name nobody)."""
    for _ in range(50 if wait else 1):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            pid = int(os.read(fd, 32).decode().strip() or 0) or None
        except (OSError, ValueError):
            pid = None
        if pid is not None:
            return pid
        if wait:
            time.sleep(0.01)
    return None
