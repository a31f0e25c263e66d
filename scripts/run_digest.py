"""Digests of a run file's contents, to show that two versions of minidiff wrote the same run bit for bit.

    python scripts/run_digest.py RUN.h5 [RUN.h5 ...]          # one line per part: its sha256, dtype and shape
    python scripts/run_digest.py --compare A.h5 B.h5          # exit 1 and the differing parts when they differ

Every dataset of the file is hashed over its dtype, shape and raw bytes (so 0.0 and -0.0 differ, and NaN equals
itself), as is the stored config. Left out: what measures the machine, not the run -- wall times (metrics/step_time,
the checkpoint's train_time and accumulated time) -- and the root attributes that say when and where the file was
written.
"""

from __future__ import annotations

import hashlib
import json
import sys

import h5py
import numpy as np

TIMINGS = {"metrics/step_time", "metrics/wall_time", "checkpoint/state/train_time", "checkpoint/state/accumulators/time"}


def digests(path) -> dict:
    """{part name: "sha256 dtype shape"} for every dataset of the run file, plus its config attribute."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs/config"] = hashlib.sha256(json.dumps(json.loads(f.attrs["config"]), sort_keys=True)
                                             .encode()).hexdigest()

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name not in TIMINGS:
                a = np.asarray(obj[()])
                h = hashlib.sha256(a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes()).hexdigest()
                out[name] = f"{h} {a.dtype} {a.shape}"

        f.visititems(visit)
    return out


def main(argv) -> int:
    if argv[:1] == ["--compare"] and len(argv) == 3:
        a, b = digests(argv[1]), digests(argv[2])
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        for k in differ:
            print(f"differs: {k}\n  {a.get(k)}\n  {b.get(k)}")
        print(f"{len(a)} parts, {len(differ)} differ: {argv[1]} vs {argv[2]}")
        return 1 if differ else 0
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip())
        return 2
    for path in argv:
        for k, v in sorted(digests(path).items()):
            print(f"{path} {k} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
