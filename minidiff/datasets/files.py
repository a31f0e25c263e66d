"""The user's own data files: .npy, .npz, HDF5 and MNIST-style IDX, each optionally gzipped.

The format is recognised from the file's first bytes, not its name, so `train-images-idx3-ubyte.gz`,
`images.npy.gz` and an HDF5 file called `data.bin` all load. Arrays come back raw (dtype and shape as stored);
`minidiff.datasets.load_dataset` validates, reshapes and scales them.

Sizes are checked before anything large is allocated: an array's declared shape (the .npy or .npz header, the IDX
dimensions, the HDF5 dataset) against the memory loading it takes (the array, its float64 scaling and the splits:
~LOAD_BYTES_PER_ELEMENT bytes an element besides the raw bytes), and gzip is inflated in pieces, never past what the
declared array needs (a .npy or IDX inside) or what the machine can hold (anything else): a small file that
inflates to gigabytes (a decompression bomb) is refused after reading at most that much.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from minidiff.backend.memory import available_bytes, format_bytes
from minidiff.datasets.base import DataError

GZIP_MAGIC = b"\x1f\x8b"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian after a 4-byte magic and the dimensions
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}
LOAD_BYTES_PER_ELEMENT = 20   # float64 scaled copy, the train/test split of it, the model-dtype copy
_PIECE = 1 << 20              # gzip is inflated this many output bytes at a time
_HEAD = 1 << 16               # enough inflated bytes for any .npy header (and the largest IDX one)


def check_array_fits(shape, dtype, path) -> None:
    """DataError when loading an array of `shape` and `dtype` needs more memory than the machine has."""
    if any(int(d) < 0 for d in shape):
        raise DataError(f"{path}: declares a negative dimension {tuple(shape)}")
    elements = math.prod(int(d) for d in shape)
    need = elements * (np.dtype(dtype).itemsize + LOAD_BYTES_PER_ELEMENT)
    have = available_bytes()
    if have is not None and need > have:
        raise DataError(f"{path}: an array of shape {tuple(int(d) for d in shape)} {np.dtype(dtype)} needs "
                        f"~{format_bytes(need)} of memory to load; this machine has {format_bytes(have)} available")


def _npy_header(fp, path):
    """(shape, dtype, header length) of the .npy stream at fp's position; DataError when it is not one."""
    start = fp.tell()
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fp)
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(f"{path}: unreadable or corrupt ({str(exc).splitlines()[0]})") from None
    return shape, dtype, fp.tell() - start


def _declared_size(head: bytes, path):
    """Bytes the array at the start of `head` declares (.npy: header + data; IDX: header + data), checked against
    memory; None for any other format."""
    if head.startswith(NPY_MAGIC):
        shape, dtype, header = _npy_header(io.BytesIO(head), path)
        check_array_fits(shape, dtype, path)
        return header + math.prod(shape) * dtype.itemsize
    if head[:2] == b"\x00\x00" and len(head) >= 4 and head[2] in IDX_DTYPES and head[3] > 0:
        ndim = head[3]
        if len(head) < 4 + 4 * ndim:
            return None
        dims = struct.unpack(f">{ndim}I", head[4:4 + 4 * ndim])
        check_array_fits(dims, IDX_DTYPES[head[2]], path)
        return 4 + 4 * ndim + math.prod(dims) * np.dtype(IDX_DTYPES[head[2]]).itemsize
    return None


def _gunzip(raw: bytes, path) -> bytes:
    """gzip.decompress without its unbounded output: inflate the head, learn from it how many bytes the data may
    have (_declared_size, else the memory left), and refuse a stream that inflates past that."""
    stream = _Inflater(raw, path)
    head = stream.read(_HEAD)
    declared = _declared_size(head, path)
    have = available_bytes()
    limit = declared if declared is not None else (have // 2 if have is not None else None)
    rest = stream.read(None if limit is None else limit + 1 - len(head))
    out = head + rest
    if limit is not None and len(out) > limit:
        what = ("the array its header declares" if declared is not None
                else f"half of the {format_bytes(have)} this machine has available")
        raise DataError(f"{path}: gzip data inflates past {format_bytes(limit)}, {what} (a decompression bomb or a "
                        "corrupt file)")
    return out


class _Inflater:
    """The inflated bytes of a gzip file (all its members, as gzip.decompress reads them), read in bounded pieces."""

    def __init__(self, raw: bytes, path):
        self.data, self.path = raw, path
        self.z = zlib.decompressobj(wbits=31)
        self.done = False

    def read(self, n):
        """Up to n more inflated bytes (None: all of them)."""
        pieces, got = [], 0
        while not self.done and (n is None or got < n):
            want = _PIECE if n is None else min(_PIECE, n - got)
            try:
                piece = self.z.decompress(self.data, want)
            except zlib.error as exc:
                raise DataError(f"{self.path}: unreadable or corrupt ({exc})") from None
            stalled = not piece and len(self.z.unconsumed_tail) == len(self.data)
            self.data = self.z.unconsumed_tail
            pieces.append(piece)
            got += len(piece)
            if self.z.eof:
                rest = self.z.unused_data
                if rest.strip(b"\x00"):   # another member follows (gzip's own trailing zeros are padding)
                    self.data, self.z = rest, zlib.decompressobj(wbits=31)
                else:
                    self.done = True
            elif stalled or not (piece or self.data):
                raise DataError(f"{self.path}: unreadable or corrupt (the gzip stream ends early)")
        return b"".join(pieces)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    try:
        have = available_bytes()
        if have is not None and path.stat().st_size > have // 2:
            raise DataError(f"{path}: the file ({format_bytes(path.stat().st_size)}) is larger than half of the "
                            f"{format_bytes(have)} of memory this machine has available")
        raw = path.read_bytes()
        if raw[:2] == GZIP_MAGIC:
            raw = _gunzip(raw, path)
        elif raw.startswith(NPY_MAGIC):
            _declared_size(raw[:_HEAD], path)
    except (OSError, EOFError) as exc:
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
        raise DataError(f"{path}: holds {len(names)} {what}s ({', '.join(names) or 'none'}); choose one with "
                        "--dataset-key NAME (dataset_options key in a config file, key= in Python)")
    return names[0]


def _load_npz(raw, path, key, labels_key):
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        names = list(npz.files)
        picked = [_pick([n for n in names if n != labels_key], key, path, "array")]
        if labels_key is not None:
            picked.append(_pick(names, labels_key, path, "array"))
        for name in picked:   # the member's declared shape, before numpy allocates it
            with npz.zip.open(f"{name}.npy") as member:
                shape, dtype, _ = _npy_header(member, path)
            check_array_fits(shape, dtype, path)
        x = npz[picked[0]]
        y = npz[picked[1]] if labels_key is not None else None
    return x, y


def _load_h5(raw, path, key, labels_key):
    import h5py  # a dependency, imported late so `minidiff.datasets` stays light for the point sets

    with h5py.File(io.BytesIO(raw), "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        picked = [f[_pick([n for n in names if n != labels_key], key, path, "dataset")]]
        if labels_key is not None:
            picked.append(f[_pick(names, labels_key, path, "dataset")])
        for ds in picked:
            check_array_fits(ds.shape or (), ds.dtype, path)
        x = picked[0][()]
        y = picked[1][()] if labels_key is not None else None
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
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
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
