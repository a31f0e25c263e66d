"""How much memory this machine can give, so that sizes are refused before anything is allocated.

    available_bytes()        # host memory a new allocation can get: MemAvailable, capped by a cgroup limit
    device_bytes(backend)    # on CuPy, the device's free memory; None elsewhere
    format_bytes(477 << 30)  # "477 GiB"

Both return None when the machine does not say, and callers then skip their check: a refusal must be certain.
"""

from __future__ import annotations

import os


def available_bytes():
    """Host memory available to this process in bytes (Linux: MemAvailable, capped by the cgroup's memory limit less
    its usage; elsewhere the physical memory), or None when unknown."""
    found = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    if found:
        return min(found)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def device_bytes(backend):
    """Free memory of the current CUDA device when `backend` is CuPy, else None."""
    if getattr(backend, "name", None) != "cupy":
        return None
    try:
        free, _ = backend.xp.cuda.runtime.memGetInfo()
    except Exception:  # noqa: BLE001 -- any CUDA error means "unknown", never a refusal
        return None
    return int(free)


def format_bytes(n) -> str:
    """1536 -> "1.5 KiB"; three significant digits, binary units."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


def _meminfo_available():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom():
    """limit - usage of the cgroup (v2, else v1) this process runs in, or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
            if text == "max":
                return None
            limit = int(text)
            if limit >= 1 << 60:   # v1 reports "no limit" as a huge number
                return None
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
            return max(limit - usage, 0)
        except (OSError, ValueError):
            continue
    return None
