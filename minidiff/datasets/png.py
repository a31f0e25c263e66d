"""Images in [-1, 1] -> uint8 -> a tiled grid -> a PNG file, with zlib and struct only (no matplotlib, no PIL)."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from minidiff.backend import to_numpy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: greyscale, RGB, RGBA


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (host or device, any float dtype) -> host uint8, round((x + 1) * 127.5) clipped to 0..255.

    uint8 input is returned unchanged, so already quantised samples (e.g. from a run file) pass straight through.
    """
    x = to_numpy(images)
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, nrow: int | None = None, scale: int | None = None, pad: int = 2,
              pad_value: int = 128) -> np.ndarray:
    """(N, C, H, W) or (N, H, W) images in [-1, 1] or uint8 -> one (rows*(H*s+pad)+pad, ..., C) uint8 grid.

    nrow: images per row (default ceil(sqrt(N))). scale: integer nearest-neighbour upscaling (default: the smallest
    that makes a tile at least 64 pixels, so 8x8 digits become viewable 64x64 tiles). Tiles are separated and
    framed by `pad` pixels of grey.
    """
    x = to_uint8(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must be (N, C, H, W) or (N, H, W) with N > 0, got shape {x.shape}")
    n, c, h, w = x.shape
    if c not in _COLOR_TYPES:
        raise ValueError(f"images must have 1, 3 or 4 channels, got {c}")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    s = scale or max(1, math.ceil(64 / max(h, w)))
    x = x.repeat(s, axis=2).repeat(s, axis=3).transpose(0, 2, 3, 1)  # (N, H*s, W*s, C)
    th, tw = h * s, w * s
    grid = np.full((ncol_rows * (th + pad) + pad, nrow * (tw + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (th + pad), pad + q * (tw + pad)
        grid[top:top + th, left:left + tw] = x[i]
    return grid


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W) or (H, W, C) uint8 with C in 1/3/4 -> PNG bytes (8-bit, no interlace, filter 0 on every row)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    h, w, c = img.shape
    if img.dtype != np.uint8 or c not in _COLOR_TYPES:
        raise ValueError(f"encode_png needs uint8 (H, W[, 1|3|4]), got {img.dtype} {image.shape}")
    rows = np.concatenate([np.zeros((h, 1), dtype=np.uint8), img.reshape(h, w * c)], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[c], 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def save_image_grid(images, path, nrow: int | None = None, scale: int | None = None, pad: int = 2) -> np.ndarray:
    """Write images in [-1, 1] (or uint8) as one PNG grid at `path`; returns the (H, W, C) uint8 grid written."""
    grid = make_grid(images, nrow=nrow, scale=scale, pad=pad)
    Path(path).write_bytes(encode_png(grid))
    return grid
