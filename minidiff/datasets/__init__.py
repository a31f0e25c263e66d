"""Data for training: built-in and user data sets, seeded batching, and PNG grids of samples.

    ds = load_dataset("digits", seed=0)            # Dataset: ds.train (N, 1, 8, 8) in [-1, 1], ds.test, ds.kind
    batches = BatchIterator(ds.train, 128, seed=0)  # next(batches) -> (128, 1, 8, 8); state_dict() for resume
    save_image_grid(samples, "grid.png")           # samples in [-1, 1], no matplotlib needed

Built-in names (DATASETS): "digits" (the bundled UCI 8x8 digits, the default), "shapes" (procedural 16x16 or 32x32
circles, squares and triangles), and the 2-D point sets "swissroll", "moons", "8gaussians", "checkerboard".
Anything else is a path to the user's .npy / .npz / .h5 array or an MNIST-style IDX file, gzipped or not.

Scaling: images end in [-1, 1] — digits x/8 - 1, shapes by pixel coverage, user uint8 x/127.5 - 1, any other user
dtype min/max rescaled over the whole array; points (N, D) are standardised with the train split's mean and std.
(N, H, W) arrays get a channel axis, channels-last (N, H, W, 1|3|4) is transposed to (N, C, H, W).
All arrays are host NumPy; the trainer moves batches to its backend.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np

from minidiff.backend import resolve_dtype
from minidiff.datasets.base import DataError, Dataset, build_dataset, check_array, scale_images, to_model_layout
from minidiff.datasets.batches import BatchIterator
from minidiff.datasets.builtin import BUILTINS, FIXED_BUILTINS
from minidiff.datasets.files import load_array_file, write_idx
from minidiff.datasets.png import encode_png, make_grid, save_image_grid, to_uint8

DATASETS = tuple(BUILTINS)
DEFAULT_DATASET = "digits"

__all__ = ["DATASETS", "DEFAULT_DATASET", "BatchIterator", "DataError", "Dataset", "encode_png", "load_dataset",
           "make_grid", "save_image_grid", "to_uint8", "write_idx"]


def _is_path(name) -> bool:
    if isinstance(name, os.PathLike):
        return True
    return os.sep in name or "/" in name or "." in name or Path(name).exists()


def _check_options(loader, options: dict, where: str) -> None:
    valid = [p for p in inspect.signature(loader).parameters if p not in ("rng", "path")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"{where}: unknown option {', '.join(unknown)} (valid: {', '.join(valid) or 'none'})")


def load_dataset(name_or_path=DEFAULT_DATASET, seed: int = 0, holdout: float = 0.1, dtype="float32",
                 **options) -> Dataset:
    """Load a built-in data set by name or a user file by path, split off `holdout` of it for evaluation.

    seed drives the generation of procedural sets and their train/test split (independent streams of one
    SeedSequence), so the same arguments give the same arrays bit for bit. Fixed data (the bundled digits, the
    user's files) is split the same way whatever the seed (the split of seed 0): a run's evaluation data -- and the
    reference of the digits' Frechet distance (minidiff.instruments.quality) -- is then held out from every run's
    training.
    options: `n`, `size` (shapes: 16 or 32), `noise` (point sets); `key`, `labels_key` (files holding several
    arrays). DataError on anything wrong.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    gen_seq, split_seq = np.random.SeedSequence(int(seed)).spawn(2)
    fixed_split_seq = np.random.SeedSequence(0).spawn(2)[1]
    dtype = resolve_dtype(dtype)
    name = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(name, str):
        raise DataError(f"dataset must be a name or a path, got {name_or_path!r}")
    if name in BUILTINS:
        loader, where = BUILTINS[name], f"dataset {name!r}"
        _check_options(loader, options, where)
        x, labels, kind, meta = loader(np.random.default_rng(gen_seq), **options)
    elif _is_path(name_or_path):
        where = str(name)
        _check_options(load_array_file, options, where)
        raw, labels = load_array_file(name, **options)
        x, kind = to_model_layout(check_array(raw, where), where)
        if labels is not None:
            labels = _check_labels(labels, len(x), where)
        x, meta = scale_images(x, where) if kind == "image" else (x, {})
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
                        "or give the path of a .npy/.npz/.h5/IDX file")
    procedural = name in BUILTINS and name not in FIXED_BUILTINS
    split_rng = np.random.default_rng(split_seq if procedural else fixed_split_seq)
    return build_dataset(name, x, labels, kind, holdout, split_rng, dtype, meta, where)


def _check_labels(labels, n, where):
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be ({n},) integers, got {y.dtype} {y.shape}")
    return y
