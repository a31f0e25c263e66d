"""Digests of a run file's contents, to show that two versions of minidiff wrote the same run bit for bit.

    python scripts/run_digest.py RUN.h5 [RUN.h5 ...]          # one line per part: its sha256, dtype and shape
    python scripts/run_digest.py --compare A.h5 B.h5          # exit 1 and the differing parts when they differ
    python scripts/run_digest.py --compare --shared OLD.h5 NEW.h5
                                    # only the parts both files hold, and OLD's config options: for a version that
                                    # records more (new metrics, new options at their defaults) over the same run

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

TIMINGS = {"metrics/step_time", "metrics/wall_time", "checkpoint/state/train_time",
           "checkpoint/state/accumulators/time"}


def digests(path, config_keys=None) -> dict:
    """{part name: "sha256 dtype shape"} for every dataset of the run file, plus its config attribute (only the
    options named in `config_keys`, when given)."""
    out = {}
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["config"])
        if config_keys is not None:
            config = {k: v for k, v in config.items() if k in config_keys}
        out["attrs/config"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name not in TIMINGS:
                a = np.asarray(obj[()])
                h = hashlib.sha256(a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes()).hexdigest()
                out[name] = f"{h} {a.dtype} {a.shape}"

        f.visititems(visit)
    return out


def _report(a, b, parts, name_a, name_b) -> int:
    differ = sorted(k for k in parts if a.get(k) != b.get(k))
    for k in differ:
        print(f"differs: {k}\n  {a.get(k)}\n  {b.get(k)}")
    print(f"{len(parts)} parts, {len(differ)} differ: {name_a} vs {name_b}")
    return 1 if differ else 0


def main(argv) -> int:
    if argv[:2] == ["--compare", "--shared"] and len(argv) == 4:
        with h5py.File(argv[2], "r") as f:
            keys = set(json.loads(f.attrs["config"]))
        a, b = digests(argv[2], keys), digests(argv[3], keys)
        return _report(a, b, set(a) & set(b), argv[2], argv[3])
    if argv[:1] == ["--compare"] and len(argv) == 3:
        a, b = digests(argv[1]), digests(argv[2])
        return _report(a, b, set(a) | set(b), argv[1], argv[2])
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip())
        return 2
    for path in argv:
        for k, v in sorted(digests(path).items()):
            print(f"{path} {k} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
