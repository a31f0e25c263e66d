"""End to end, as a newcomer meets it: `minidiff train` on the bundled digits, then `minidiff sample`; the
loss falls well below its start and the PNG holds digits, not noise, by the Frechet distance of the images decoded
from it in the shipped classifier's feature space."""

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from helpers.paths import CLI_PY as CLI
from minidiff.instruments.quality import digits_fd, reference_levels
from minidiff.runs.file import RunFile

STEPS, LOG_EVERY = 200, 20  # enough steps of the default UNet for its samples to be clearly digits
N_SAMPLES, TILE, PAD = 256, 64, 2  # the grid: ceil(sqrt(256)) = 16 tiles a row, 8x8 digits upscaled 8x, 2 px frames


def _minidiff(cwd, *args):
    result = subprocess.run([sys.executable, str(CLI), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def _decode_greyscale_png(raw: bytes) -> np.ndarray:
    """The 8-bit greyscale, filter-0 PNGs minidiff writes -> (H, W) uint8, independently of minidiff's writer."""
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(raw):
        (n,), kind = struct.unpack(">I", raw[pos:pos + 4]), raw[pos + 4:pos + 8]
        data = raw[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", raw[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + data), kind
        chunks[kind] = chunks.get(kind, b"") + data
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(h, w + 1)
    assert np.all(rows[:, 0] == 0)  # filter type 0 on every row
    return rows[:, 1:]


def _tiles(grid: np.ndarray, per_row: int) -> np.ndarray:
    """The 8x8 images back out of a grid of TILE x TILE nearest-neighbour upscaled tiles -> (N, 1, 8, 8) in [-1, 1]."""
    s = TILE // 8
    tiles = []
    for i in range(N_SAMPLES):
        r, q = divmod(i, per_row)
        top, left = PAD + r * (TILE + PAD), PAD + q * (TILE + PAD)
        tile = grid[top:top + TILE, left:left + TILE]
        small = tile[::s, ::s]
        np.testing.assert_array_equal(tile, small.repeat(s, 0).repeat(s, 1))  # really an upscaled 8x8 image
        tiles.append(small)
    return np.stack(tiles)[:, None].astype(np.float64) / 127.5 - 1.0


@pytest.mark.slow
def test_default_train_then_sample_gives_falling_loss_and_a_png_of_digits_not_noise(tmp_path):
    # the README's command, shortened: defaults everywhere else (UNet on digits, Adam at its default lr)
    _minidiff(tmp_path, "train", "--steps", STEPS, "--log-every", LOG_EVERY, "-q")
    runs = sorted((tmp_path / "runs").glob("digits-adam-*.h5"))
    assert len(runs) == 1, runs
    run_file = runs[0]
    assert run_file.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"  # the sample grid written beside the run

    run = RunFile.open(run_file)
    assert run.status == "finished" and run.checkpoint_step == STEPS
    m = run.metrics()
    loss = m["loss"][np.isfinite(m["loss"])]
    assert len(loss) == STEPS // LOG_EVERY
    first, last = loss[0], loss[-3:].mean()  # each a mean over LOG_EVERY steps
    assert last < 0.5 * first, (first, last, loss)
    run.close()

    out = tmp_path / "grid.png"
    result = _minidiff(tmp_path, "sample", run_file, "--n", N_SAMPLES, "--steps", 25, "--out", out)
    assert f"from step {STEPS}" in result.stdout
    grid = _decode_greyscale_png(out.read_bytes())
    per_row = 16
    side = per_row * (TILE + PAD) + PAD
    assert grid.shape == (side, side)
    assert np.all(grid[:PAD] == 128) and np.all(grid[:, :PAD] == 128)  # the grey frame

    # FD rather than the classifier's confidence: it is ~0.8 on Gaussian noise too, so confidence cannot tell them apart
    images = _tiles(grid, per_row)
    fd = digits_fd(images)
    levels = reference_levels(num_samples=N_SAMPLES)  # at 256 images: noise ~1080, real digits ~27
    assert fd < 0.1 * levels["ceiling"], (fd, levels)
