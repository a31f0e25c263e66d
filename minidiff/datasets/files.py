"""The user's own data files: .npy, .npz, HDF5 and MNIST-style IDX, each optionally gzipped.

The format is recognised from the file's first bytes, not its name, so `train-images-idx3-ubyte.gz`,
`images.npy.gz` and an HDF5 file called `data.bin` all load. Arrays come back raw (dtype and shape as stored);
`minidiff.datasets.load_dataset` validates, reshapes and scales them.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from pathlib import Path

import numpy as np

from minidiff.datasets.base import DataError

GZIP_MAGIC = b"\x1f\x8b"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian after a 4-byte magic and the dimensions
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    try:
        raw = path.read_bytes()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: unreadable or corrupt ({exc})") from None
    if not raw:
        raise DataError(f"{path}: file is empty")
    return raw


def _pick(names: list[str], key, path, what: str) -> str:
    if key is not None:
        if key not in names:
            raise DataError(f"{path}: no {what} named {key!r} (it holds: {', '.join(names) or 'nothing'})")
        return key
    if len(names) != 1:
        raise DataError(f"{path}: holds {len(names)} {what}s ({', '.join(names) or 'none'}); choose one with key=")
    return names[0]


def _load_npz(raw, path, key, labels_key):
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        names = list(npz.files)
        x = npz[_pick([n for n in names if n != labels_key], key, path, "array")]
        y = npz[_pick(names, labels_key, path, "array")] if labels_key is not None else None
    return x, y


def _load_h5(raw, path, key, labels_key):
    import h5py  # a dependency, imported late so `minidiff.datasets` stays light for the point sets

    with h5py.File(io.BytesIO(raw), "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        x = f[_pick([n for n in names if n != labels_key], key, path, "dataset")][()]
        y = f[_pick(names, labels_key, path, "dataset")][()] if labels_key is not None else None
    return x, y


def _load_idx(raw, path):
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX dimensions {dims} need {expected} data bytes, file has {len(raw) - header} "
                        "(truncated or corrupt)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_array_file(path, key: str | None = None, labels_key: str | None = None):
    """Read (x, labels or None) from a .npy / .npz / .h5 / IDX file, gzipped or not.

    key picks the array (npz) or dataset (h5, a path like "group/images") when the file holds several;
    labels_key optionally names integer labels stored beside it. DataError on any problem, naming the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    try:
        if raw.startswith(NPY_MAGIC):
            if key is not None or labels_key is not None:
                raise DataError(f"{path}: a .npy file holds one array; key/labels_key do not apply")
            return np.load(io.BytesIO(raw), allow_pickle=False), None
        if raw.startswith(ZIP_MAGIC):
            return _load_npz(raw, path, key, labels_key)
        if raw.startswith(HDF5_MAGIC):
            return _load_h5(raw, path, key, labels_key)
        if raw[:2] == b"\x00\x00" and len(raw) >= 4:
            return _load_idx(raw, path), None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: unreadable or corrupt ({reason})") from None
    raise DataError(f"{path}: unrecognised format (expected .npy, .npz, HDF5 or IDX data, optionally gzipped)")


def write_idx(path, array) -> None:
    """Write an array as an IDX file (gzipped when the name ends in .gz): the MNIST format, for tests and export."""
    a = np.asarray(array)
    if a.dtype not in IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {a.dtype}; use one of {sorted(str(d) for d in IDX_CODES)}")
    header = bytes([0, 0, IDX_CODES[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    payload = header + a.astype(a.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
