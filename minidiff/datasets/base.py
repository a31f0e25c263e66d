"""Dataset, DataError, and the validation / scaling / splitting every data source goes through.

All arrays here are host NumPy arrays: data sets are loaded and split on the host, and the trainer moves each batch to
its backend with `backend.asarray(batch, dtype)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("image", "points")


class DataError(ValueError):
    """Bad or missing data; the message is one line naming the file (or data set) and the problem."""


@dataclass
class Dataset:
    """A data set split into train and held-out test parts.

    train, test: host float arrays, images (N, C, H, W) in [-1, 1] or points (N, D) standardised with the train
    split's mean and std. shape: the per-sample shape, (C, H, W) or (D,). labels are int64 (N,) or None.
    meta: how the data was scaled (e.g. {"scaling": "x/8 - 1"} or the points' mean and std), for the record.
    """

    name: str
    kind: str
    train: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple:
        return tuple(self.train.shape[1:])

    def __repr__(self):
        return (f"Dataset({self.name!r}, kind={self.kind!r}, shape={self.shape}, "
                f"train={len(self.train)}, test={len(self.test)})")


def check_array(x, where: str) -> np.ndarray:
    """Reject what no model can train on: non-numeric, empty, or non-finite data. Returns x as a host ndarray."""
    x = np.asarray(x)
    if x.dtype == bool:
        x = x.astype(np.uint8)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{where}: data must be numeric, got dtype {x.dtype}")
    if x.size == 0 or x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{where}: data is empty (shape {x.shape})")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
            raise DataError(f"{where}: data holds {n_nan} NaN and {n_inf} Inf values")
    return x


def to_model_layout(x: np.ndarray, where: str) -> tuple[np.ndarray, str]:
    """(N, D) -> points; (N, H, W) -> (N, 1, H, W); (N, H, W, C) with C in 1/3/4 -> (N, C, H, W); else DataError.

    A 4-D array is taken as channels-last only when its last axis looks like channels (1, 3 or 4) and its second
    does not, because (N, 28, 28, 1) files are common and (N, 1, 28, 28) ones must stay as they are.
    """
    if x.ndim == 2:
        return x, "points"
    if x.ndim == 3:
        return x[:, None], "image"
    if x.ndim == 4:
        if x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x, "image"
    raise DataError(f"{where}: wrong rank {x.ndim} (shape {x.shape}); expected (N, D) points, "
                    "(N, H, W) or (N, C, H, W) images")


def scale_images(x: np.ndarray, where: str) -> tuple[np.ndarray, dict]:
    """Pixels -> [-1, 1] in float64: uint8 as x / 127.5 - 1 (the full 0..255 range); anything else min/max rescaled,
    2 (x - min) / (max - min) - 1, over the whole array (so relative intensities between images are kept)."""
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 127.5 - 1.0, {"scaling": "x/127.5 - 1"}
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        raise DataError(f"{where}: every value equals {lo}; there is nothing to rescale to [-1, 1]")
    x = x.astype(np.float64)
    return 2.0 * (x - lo) / (hi - lo) - 1.0, {"scaling": "min/max", "min": lo, "max": hi}


def split_holdout(n: int, holdout: float, rng: np.random.Generator, where: str):
    """Random (train_idx, test_idx), each sorted so the splits keep the source order; round(holdout * n) go to test."""
    if not 0.0 <= holdout < 1.0:
        raise DataError(f"{where}: holdout must be in [0, 1), got {holdout}")
    n_test = int(round(holdout * n))
    if n - n_test < 1:
        raise DataError(f"{where}: {n} samples leave none to train on with holdout {holdout}")
    perm = rng.permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def standardise(train: np.ndarray, test: np.ndarray, where: str):
    """Points -> zero mean, unit std per coordinate, using the train split's statistics for both splits."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    if (std == 0).any():
        raise DataError(f"{where}: a coordinate is constant in the training split; cannot standardise")
    meta = {"scaling": "standardised", "mean": mean.tolist(), "std": std.tolist()}
    return (train - mean) / std, (test - mean) / std, meta


def build_dataset(name, x, labels, kind, holdout, rng, dtype, scaled_meta, where) -> Dataset:
    """Split an already scaled image array, or raw points (standardised here), into a Dataset."""
    tr, te = split_holdout(len(x), holdout, rng, where)
    xtr, xte = x[tr], x[te]
    meta = dict(scaled_meta)
    if kind == "points":
        xtr, xte, meta = standardise(xtr.astype(np.float64), xte.astype(np.float64), where)
    ytr = yte = None
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        ytr, yte = labels[tr], labels[te]
    return Dataset(name=name, kind=kind, train=np.ascontiguousarray(xtr, dtype=dtype),
                   test=np.ascontiguousarray(xte, dtype=dtype), train_labels=ytr, test_labels=yte, meta=meta)
