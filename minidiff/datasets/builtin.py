"""Built-in data sets: the bundled 8x8 digits, procedural shapes, and 2-D point sets, all generated from a seed.

Each loader takes a host `np.random.Generator` plus its options and returns raw data: (x, labels, kind, meta) with
images already in [-1, 1] and points unscaled (they are standardised after the split, with train statistics).
"""

from __future__ import annotations

import functools
import gzip
import os
import sys
from pathlib import Path

import numpy as np

from minidiff.datasets.base import DataError

DIGITS_FILE = "digits.csv.gz"


def bundled_data_dirs() -> list[Path]:
    """Where the bundled data may live, in the order searched.

    1. $MINIDIFF_DATA_DIR, if set.
    2. The repository's `data/` next to the `minidiff` package: a source checkout or an editable install (the usual
       case; the file is not duplicated inside the package).
    3. `<prefix>/share/minidiff/data`: where a regular (non-editable) wheel puts `data/` when pyproject.toml lists it
       under [tool.setuptools.data-files]; sys.prefix covers virtualenvs, sys.base_prefix a system install.
    """
    dirs = []
    if os.environ.get("MINIDIFF_DATA_DIR"):
        dirs.append(Path(os.environ["MINIDIFF_DATA_DIR"]))
    dirs.append(Path(__file__).resolve().parents[2] / "data")
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        dirs.append(Path(prefix) / "share" / "minidiff" / "data")
    return dirs


def bundled_file(name: str) -> Path:
    for d in bundled_data_dirs():
        if (d / name).is_file():
            return d / name
    searched = ", ".join(str(d) for d in bundled_data_dirs())
    raise DataError(f"bundled data file {name} not found (searched {searched}); set MINIDIFF_DATA_DIR to its folder")


@functools.lru_cache(maxsize=2)
def _read_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: unreadable or corrupt ({exc})") from None
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"{path}: expected 65 columns (64 pixels and the label), got shape {table.shape}")
    return table[:, :64].reshape(-1, 1, 8, 8), table[:, 64]


def load_digits(rng):
    """1,797 UCI digits, (N, 1, 8, 8); pixels 0..16 -> x / 8 - 1 (data/README.md)."""
    pixels, labels = _read_digits(bundled_file(DIGITS_FILE))
    return pixels / 8.0 - 1.0, labels.copy(), "image", {"scaling": "x/8 - 1"}


def _shape_masks(kind, u, v, r):
    """Coverage of one shape class at rotated, centred coordinates (u, v) with size r (all (B, P, P))."""
    if kind == 0:  # circle of radius r
        return u * u + v * v <= r * r
    if kind == 1:  # square of half-side 0.8 r, so its area is close to the circle's
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    # equilateral triangle with circumradius r: inside all three edges, each at the inradius r/2 from the centre
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        ang = np.pi / 2 + np.pi + 2 * np.pi * k / 3  # outward normal of the edge opposite vertex k
        inside &= u * np.cos(ang) + v * np.sin(ang) <= r / 2
    return inside


def load_shapes(rng, n: int = 3000, size: int = 16):
    """Anti-aliased white circles, squares and triangles on black, (n, 1, size, size), labels 0/1/2.

    Each shape has a random size (radius 0.2..0.4 of the image), rotation and position (fully inside the image);
    pixel values are the covered fraction of 4x4 sub-pixel samples, mapped to [-1, 1].
    """
    if size not in (16, 32):
        raise DataError(f"dataset 'shapes': size must be 16 or 32, got {size}")
    n = _positive_int(n, "shapes", "n")
    labels = rng.integers(0, 3, size=n)
    radius = rng.uniform(0.2, 0.4, size=n) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    theta = rng.uniform(0.0, 2 * np.pi, size=n)
    ss = 4
    grid = (np.arange(size * ss) + 0.5) / ss  # sub-pixel centres in pixel units
    out = np.empty((n, 1, size, size))
    for lo in range(0, n, 256):  # chunks keep the (B, P, P) temporaries small
        sl = slice(lo, min(lo + 256, n))
        dx = grid[None, None, :] - cx[sl, None, None]
        dy = grid[None, :, None] - cy[sl, None, None]
        c, s = np.cos(theta[sl])[:, None, None], np.sin(theta[sl])[:, None, None]
        u, v = c * dx + s * dy, -s * dx + c * dy
        r = radius[sl, None, None]
        cover = np.zeros(dx.shape[:1] + (size * ss, size * ss), dtype=bool)
        for k in range(3):
            pick = (labels[sl] == k)[:, None, None]
            cover |= pick & _shape_masks(k, u, v, r)
        frac = cover.reshape(-1, size, ss, size, ss).mean(axis=(2, 4))
        out[sl, 0] = 2.0 * frac - 1.0
    return out, labels, "image", {"scaling": "coverage*2 - 1", "size": size}


def _positive_int(n, name, option):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"dataset {name!r}: option {option} must be a positive integer, got {n!r}")
    return int(n)


def _swissroll(rng, n, noise):
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return x + noise * rng.standard_normal((n, 2)), None


def _moons(rng, n, noise):
    labels = rng.integers(0, 2, size=n)
    th = rng.uniform(0.0, np.pi, size=n)
    outer = np.stack([np.cos(th), np.sin(th)], axis=1)
    inner = np.stack([1.0 - np.cos(th), 0.5 - np.sin(th)], axis=1)
    x = np.where(labels[:, None] == 0, outer, inner)
    return x + noise * rng.standard_normal((n, 2)), labels


def _eight_gaussians(rng, n, noise):
    labels = rng.integers(0, 8, size=n)
    ang = labels * (np.pi / 4)
    centres = 2.0 * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    return centres + noise * rng.standard_normal((n, 2)), labels


def _checkerboard(rng, n, noise):
    """8 unit squares of a 4x4 board on [-2, 2]^2 (the FFJORD toy set), uniform inside each."""
    x1 = rng.uniform(-2.0, 2.0, size=n)
    # x2 in [0, 1) or [-2, -1), shifted up by 1 in odd columns: the dark squares of the board
    x2 = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(x1) % 2
    x = np.stack([x1, x2], axis=1)
    return x + noise * rng.standard_normal((n, 2)), None


POINT_SETS = {
    "swissroll": (_swissroll, 0.25),
    "moons": (_moons, 0.08),
    "8gaussians": (_eight_gaussians, 0.2),
    "checkerboard": (_checkerboard, 0.0),
}


def point_loader(name):
    make, default_noise = POINT_SETS[name]

    def load(rng, n: int = 4000, noise: float = default_noise):
        n = _positive_int(n, name, "n")
        if not (isinstance(noise, (int, float)) and noise >= 0):
            raise DataError(f"dataset {name!r}: option noise must be a number >= 0, got {noise!r}")
        x, labels = make(rng, n, float(noise))
        return x, labels, "points", {}
    load.__doc__ = f"{name}: (n, 2) points (standardised after the split); options n=4000, noise={default_noise}."
    return load


# Built-in sets that are fixed data rather than drawn from the seed: their held-out split is the same for every seed.
FIXED_BUILTINS = ("digits",)
BUILTINS = {"digits": load_digits, "shapes": load_shapes, **{name: point_loader(name) for name in POINT_SETS}}
