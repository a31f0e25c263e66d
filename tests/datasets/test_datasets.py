"""minidiff.datasets: built-in sets, user files, bad-data errors, resumable batching and the PNG writer."""

import gzip
import struct
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers.paths import REPO
from minidiff.backend import get_backend
from minidiff.datasets import (DATASETS, BatchIterator, DataError, encode_png, load_dataset, save_image_grid, to_uint8,
                           write_idx)

IMAGE_SETS = {"digits": (1, 8, 8), "shapes": (1, 16, 16)}
POINT_SETS = ("swissroll", "moons", "8gaussians", "checkerboard")


@pytest.mark.parametrize("name", DATASETS)
def test_builtin_dataset_has_documented_shape_range_and_split(name):
    ds = load_dataset(name, seed=0, holdout=0.1)
    n = len(ds.train) + len(ds.test)
    assert ds.name == name and ds.train.dtype == np.float32
    assert len(ds.test) == round(0.1 * n)
    if name in IMAGE_SETS:
        assert ds.kind == "image" and ds.shape == IMAGE_SETS[name]
        assert ds.train.min() == -1.0 and ds.train.max() == 1.0  # both ends of [-1, 1] are used
        assert ds.test.min() >= -1.0 and ds.test.max() <= 1.0
        assert ds.train_labels.shape == (len(ds.train),)
    else:
        assert ds.kind == "points" and ds.shape == (2,) and n == 4000
        np.testing.assert_allclose(ds.train.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(ds.train.std(axis=0), 1.0, rtol=1e-5)
    if name == "digits":
        assert n == 1797 and set(np.unique(ds.train_labels)) == set(range(10))


@pytest.mark.parametrize("name", ["shapes", "moons", "checkerboard"])
def test_same_seed_gives_bitwise_same_data_and_other_seed_differs(name):
    a, b, c = (load_dataset(name, seed=s, n=600) for s in (3, 3, 4))
    assert a.train.tobytes() == b.train.tobytes() and a.test.tobytes() == b.test.tobytes()
    assert a.train.tobytes() != c.train.tobytes()


def test_fixed_data_is_held_out_the_same_way_for_every_seed(tmp_path):
    """The digits' held-out split is the FD reference of every run (minidiff.instruments.quality): a run with seed 1
    must not train on it, as it would if the split followed the run's seed. The same holds for the user's files."""
    from minidiff.instruments.quality import _heldout_digits
    reference = _heldout_digits()[1]
    for seed in (0, 1, 2, 7):
        ds = load_dataset("digits", seed=seed)
        assert ds.test.tobytes() == reference.tobytes()
        assert not set(map(bytes, ds.train.reshape(len(ds.train), -1))) & set(map(bytes, reference.reshape(180, -1)))
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=(50, 4, 4), dtype=np.uint8))
    a, b = (load_dataset(str(path), seed=s) for s in (0, 5))
    assert a.test.tobytes() == b.test.tobytes()


def test_digits_are_the_bundled_file_scaled_by_x_over_8():
    ds = load_dataset("digits", holdout=0.0)
    with gzip.open(__import__("minidiff.datasets.builtin", fromlist=["x"]).bundled_file("digits.csv.gz"), "rt") as f:
        first = np.array(f.readline().split(","), dtype=float)
    np.testing.assert_array_equal(ds.train[0].ravel(), first[:64] / 8 - 1)
    assert ds.train_labels[0] == first[64]


def test_bundled_digits_are_found_through_minidiff_data_dir(tmp_path, monkeypatch):
    rows = np.hstack([np.full((5, 64), 16), np.arange(5)[:, None]])
    with gzip.open(tmp_path / "digits.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    monkeypatch.setenv("MINIDIFF_DATA_DIR", str(tmp_path))
    ds = load_dataset("digits", holdout=0.0)
    assert len(ds.train) == 5 and (ds.train == 1.0).all()


def test_shapes_option_32_and_three_balanced_classes():
    ds = load_dataset("shapes", n=300, size=32, holdout=0.0)
    assert ds.shape == (1, 32, 32)
    counts = np.bincount(ds.train_labels, minlength=3)
    assert counts.min() > 70  # circles, squares and triangles all present
    # each image holds one filled shape: between ~4% and ~60% of the pixels are bright
    frac = (ds.train > 0).mean(axis=(1, 2, 3))
    assert frac.min() > 0.02 and frac.max() < 0.6


def test_moons_and_8gaussians_labels_separate_the_clusters():
    ds = load_dataset("8gaussians", holdout=0.0, noise=0.05)
    ang = np.arctan2(ds.train[:, 1], ds.train[:, 0])
    mode = np.rint(ang / (np.pi / 4)).astype(int) % 8
    assert (mode == ds.train_labels).mean() > 0.99


# --- user files ------------------------------------------------------------------------------------------------------
def _images_u8(n=10, h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _save(tmp_path, fmt, arr):
    if fmt == "npy":
        p = tmp_path / "x.npy"
        np.save(p, arr)
    elif fmt == "npy.gz":
        p = tmp_path / "x.npy.gz"
        with gzip.open(p, "wb") as f:
            np.save(f, arr)
    elif fmt == "npz":
        p = tmp_path / "x.npz"
        np.savez(p, images=arr)
    elif fmt == "h5":
        p = tmp_path / "x.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("data/images", data=arr)
    else:
        p = tmp_path / ("train-images-idx3-ubyte" + (".gz" if fmt == "idx.gz" else ""))
        write_idx(p, arr)
    return p


@pytest.mark.parametrize("fmt", ["npy", "npy.gz", "npz", "h5", "idx", "idx.gz"])
def test_user_uint8_file_round_trips_with_channel_axis_and_x_over_127_5(tmp_path, fmt):
    raw = _images_u8()
    ds = load_dataset(_save(tmp_path, fmt, raw), holdout=0.0, dtype="float64")
    assert ds.kind == "image" and ds.train.shape == (10, 1, 6, 5)
    np.testing.assert_array_equal(ds.train[:, 0], raw / 127.5 - 1.0)


def test_idx_file_matches_mnist_header_layout(tmp_path):
    p = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(p, _images_u8(n=3, h=28, w=28))
    raw = p.read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03" and struct.unpack(">3I", raw[4:16]) == (3, 28, 28)
    assert len(raw) == 16 + 3 * 28 * 28


def test_float_file_is_min_max_rescaled_and_channels_last_is_transposed(tmp_path):
    x = np.random.default_rng(1).uniform(3.0, 7.0, size=(8, 5, 4, 3))
    np.save(tmp_path / "f.npy", x)
    ds = load_dataset(tmp_path / "f.npy", holdout=0.0, dtype="float64")
    assert ds.train.shape == (8, 3, 5, 4)
    expect = 2 * (x - x.min()) / (x.max() - x.min()) - 1
    np.testing.assert_allclose(ds.train, expect.transpose(0, 3, 1, 2), atol=1e-12)


def test_user_points_file_is_standardised_and_labels_follow_the_split(tmp_path):
    x = np.random.default_rng(2).normal(5.0, 3.0, size=(200, 2))
    np.savez(tmp_path / "p.npz", x=x, y=np.arange(200))
    ds = load_dataset(tmp_path / "p.npz", key="x", labels_key="y", holdout=0.25, dtype="float64")
    assert ds.kind == "points" and len(ds.test) == 50
    np.testing.assert_allclose(ds.train.mean(0), 0, atol=1e-12)
    # labels were the row numbers: they must still point at the same rows after the split
    mean, std = np.array(ds.meta["mean"]), np.array(ds.meta["std"])
    np.testing.assert_allclose(ds.test * std + mean, x[ds.test_labels], atol=1e-12)


def _bad_cases(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope.npy", "not found")
    cases["directory"] = (tmp_path, "directory")
    (tmp_path / "empty.npy").write_bytes(b"")
    cases["empty file"] = (tmp_path / "empty.npy", "empty")
    (tmp_path / "junk.npy").write_bytes(b"this is not an array at all")
    cases["garbage"] = (tmp_path / "junk.npy", "unrecognised format")
    np.save(tmp_path / "full.npy", np.zeros((50, 8, 8)))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:1000])
    cases["truncated npy"] = (tmp_path / "trunc.npy", "corrupt")
    write_idx(tmp_path / "i.idx", _images_u8())
    (tmp_path / "trunc.idx").write_bytes((tmp_path / "i.idx").read_bytes()[:-7])
    cases["truncated idx"] = (tmp_path / "trunc.idx", "truncated or corrupt")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    cases["corrupt gzip"] = (tmp_path / "bad.gz", "corrupt")
    with h5py.File(tmp_path / "full.h5", "w") as f:
        f.create_dataset("x", data=np.ones((40, 8, 8)))
    (tmp_path / "trunc.h5").write_bytes((tmp_path / "full.h5").read_bytes()[:3000])
    cases["truncated h5"] = (tmp_path / "trunc.h5", "truncated file")
    np.save(tmp_path / "rank1.npy", np.zeros(10))
    cases["rank 1"] = (tmp_path / "rank1.npy", "wrong rank 1")
    np.save(tmp_path / "rank5.npy", np.zeros((2, 1, 1, 3, 3)))
    cases["rank 5"] = (tmp_path / "rank5.npy", "wrong rank 5")
    nan = np.ones((4, 3, 3))
    nan[1, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cases["NaN"] = (tmp_path / "nan.npy", "1 NaN")
    np.save(tmp_path / "inf.npy", np.full((4, 3, 3), np.inf))
    cases["Inf"] = (tmp_path / "inf.npy", "Inf")
    np.save(tmp_path / "zero.npy", np.zeros((0, 8, 8)))
    cases["no samples"] = (tmp_path / "zero.npy", "empty")
    np.save(tmp_path / "const.npy", np.full((4, 3, 3), 2.0))
    cases["constant"] = (tmp_path / "const.npy", "every value equals")
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 4, 4)), b=np.zeros((3, 4, 4)))
    cases["npz without key"] = (tmp_path / "two.npz", "holds 2 arrays (a, b)")
    np.save(tmp_path / "str.npy", np.array([["a", "b"], ["c", "d"]]))
    cases["strings"] = (tmp_path / "str.npy", "numeric")
    cases.update(_oversized_cases(tmp_path))
    return cases


def _npy_header(shape, descr="<f8") -> bytes:
    """A .npy header declaring `shape` (v1.0, padded to a multiple of 64 bytes as numpy writes it)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def _bomb(declared=(10, 8, 8), inflated=300 << 20) -> bytes:
    """A gzipped .npy whose header declares a small array but whose stream inflates to `inflated` bytes: the same
    1 MiB member of zeros repeated (gzip members concatenate), so the file stays small."""
    head = gzip.compress(_npy_header(declared, "|u1"))
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9)
    return head + zeros * (inflated >> 20)


def _oversized_cases(tmp_path):
    """Files whose declared array, or whose inflated bytes, no machine here can hold: refused before allocating."""
    huge = (10 ** 9, 64, 64)   # 32 TB of float64
    cases = {}
    (tmp_path / "huge.npy").write_bytes(_npy_header(huge) + bytes(64))
    cases["huge npy"] = (tmp_path / "huge.npy", "needs ~")
    (tmp_path / "huge.npy.gz").write_bytes(gzip.compress(_npy_header(huge) + bytes(64)))
    cases["huge npy.gz"] = (tmp_path / "huge.npy.gz", "needs ~")
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", _npy_header(huge) + bytes(64))
    cases["huge npz"] = (tmp_path / "huge.npz", "needs ~")
    with h5py.File(tmp_path / "huge.h5", "w") as f:
        f.create_dataset("x", shape=huge, dtype="f8", chunks=(1, 64, 64))   # nothing written: a small file
    cases["huge h5"] = (tmp_path / "huge.h5", "needs ~")
    (tmp_path / "huge.idx.gz").write_bytes(gzip.compress(bytes([0, 0, 0x0E, 3]) + struct.pack(">3I", *huge)))
    cases["huge idx.gz"] = (tmp_path / "huge.idx.gz", "needs ~")
    (tmp_path / "bomb.npy.gz").write_bytes(_bomb())
    cases["decompression bomb"] = (tmp_path / "bomb.npy.gz", "inflates past 768 B, the array its header declares")
    return cases


def test_gzip_of_several_members_still_loads_and_a_bomb_stops_at_the_declared_size(tmp_path, monkeypatch):
    import minidiff.datasets.files as files

    x = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    np.save(tmp_path / "x.npy", x)
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "m.npy.gz").write_bytes(gzip.compress(raw[:50]) + gzip.compress(raw[50:]) + bytes(8))
    assert files.load_array_file(tmp_path / "m.npy.gz")[0].tobytes() == x.tobytes()
    inflated = []
    real = files._Inflater.read

    def counted(self, n):
        out = real(self, n)
        inflated.append(len(out))
        return out
    monkeypatch.setattr(files._Inflater, "read", counted)
    (tmp_path / "bomb.npy.gz").write_bytes(_bomb())
    with pytest.raises(DataError, match="decompression bomb"):
        files.load_array_file(tmp_path / "bomb.npy.gz")
    # a head long enough for any header, then at most the declared size and a byte: the 300 MiB never were
    assert 0 < sum(inflated) <= files._HEAD + 768 + 1


def test_several_arrays_without_a_key_name_the_option_that_picks_one(tmp_path):
    np.savez(tmp_path / "two.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.arange(3))
    with pytest.raises(DataError, match=r"holds 2 arrays \(images, labels\); choose one with --dataset-key NAME"):
        load_dataset(tmp_path / "two.npz")
    assert load_dataset(tmp_path / "two.npz", key="images", holdout=0.0).train.shape == (3, 1, 4, 4)


def test_every_bad_file_raises_one_line_data_error_naming_the_file(tmp_path):
    for what, (path, problem) in _bad_cases(tmp_path).items():
        with pytest.raises(DataError) as err:
            load_dataset(path)
        msg = str(err.value)
        assert str(path) in msg and problem in msg and "\n" not in msg, (what, msg)


def test_unknown_dataset_name_lists_the_valid_names():
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of digits, shapes, swissroll"):
        load_dataset("mnist")


def test_unknown_option_and_bad_holdout_are_data_errors():
    with pytest.raises(DataError, match="unknown option size"):
        load_dataset("moons", size=3)
    with pytest.raises(DataError, match="holdout must be in"):
        load_dataset("moons", holdout=1.0)
    with pytest.raises(DataError, match="size must be 16 or 32"):
        load_dataset("shapes", size=20)


# --- batching ------------------------------------------------------------------------------------------------------
def test_batch_iterator_resumed_from_state_dict_yields_identical_batches():
    data = np.arange(50, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    straight = BatchIterator(data, 8, seed=7)
    ref = [next(straight) for _ in range(20)]  # 6 batches per epoch: crosses three epoch boundaries
    first = BatchIterator(data, 8, seed=7)
    for _ in range(9):
        next(first)
    state = first.state_dict()
    next(first)  # advancing the original must not change the saved state
    resumed = BatchIterator(data, 8, seed=12345)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(11)]
    for a, b in zip(ref[9:], got):
        np.testing.assert_array_equal(a, b)
    assert resumed.epoch == straight.epoch


def test_batch_iterator_visits_each_sample_at_most_once_per_epoch_and_reshuffles():
    it = BatchIterator(np.arange(20), 6, seed=0)
    epochs = [np.concatenate([next(it) for _ in range(it.batches_per_epoch)]) for _ in range(2)]
    for e in epochs:
        assert len(e) == 18 and len(set(e.tolist())) == 18
    assert not np.array_equal(epochs[0], epochs[1])


def test_batch_iterator_rejects_state_for_other_data_and_oversized_batches():
    it = BatchIterator(np.arange(20), 4)
    with pytest.raises(DataError, match="20 samples"):
        BatchIterator(np.arange(30), 4).load_state_dict(it.state_dict())
    with pytest.raises(DataError, match="larger than the 20"):
        BatchIterator(np.arange(20), 21)


# --- PNG ------------------------------------------------------------------------------------------------------------
def _decode_png(raw):
    """Minimal PNG reader for the files we write: checks chunk CRCs, returns (w, h, colour type, raw scanlines)."""
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind, data = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF
        chunks.append((kind, data))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[0][1][:10])
    idat = zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT"))
    return w, h, ctype, idat


def test_png_grid_of_8x8_digits_is_upscaled_and_decodes_to_expected_pixels(tmp_path):
    imgs = load_dataset("digits").train[:10]
    path = tmp_path / "grid.png"
    grid = save_image_grid(imgs, path, nrow=5)
    w, h, ctype, idat = _decode_png(path.read_bytes())
    # 8x8 tiles upscaled 8x to 64 px, 5 per row, 2 rows, 2 px padding around and between
    assert (w, h, ctype) == (5 * 66 + 2, 2 * 66 + 2, 0) and grid.shape == (h, w, 1)
    assert len(idat) == h * (1 + w)
    pixels = np.frombuffer(idat, np.uint8).reshape(h, 1 + w)
    assert (pixels[:, 0] == 0).all()
    np.testing.assert_array_equal(pixels[:, 1:], grid[:, :, 0])
    np.testing.assert_array_equal(grid[2:66, 2:66, 0], to_uint8(imgs[0, 0]).repeat(8, 0).repeat(8, 1))


def test_png_rgb_matches_matplotlib_reader(tmp_path):
    plt_image = pytest.importorskip("matplotlib.image", reason="matplotlib cross-check of the PNG writer")
    img = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    (tmp_path / "c.png").write_bytes(encode_png(img))
    back = plt_image.imread(tmp_path / "c.png")
    np.testing.assert_array_equal(np.rint(back * 255).astype(np.uint8), img)


def test_to_uint8_maps_minus_one_to_0_and_one_to_255_from_any_backend(cpu_backend):
    x = cpu_backend.asarray(np.array([-1.5, -1.0, 0.0, 1.0, 2.0]), dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255])
    assert to_uint8(get_backend("cpu").asarray(np.zeros(2, np.uint8))).dtype == np.uint8


def test_every_bundled_file_the_package_opens_ships_in_the_wheel():
    """A non-editable install finds data only under share/minidiff/data: each name passed to bundled_file(...) in
    the package must be listed in pyproject's data-files (without the digits classifier, the default `minidiff train`
    fails at its first evaluation)."""
    import re
    import tomllib

    root = REPO
    shipped = {Path(p).name for files in tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
               ["data-files"].values() for p in files}
    opened = {m for path in (root / "minidiff").rglob("*.py")
              for m in re.findall(r"bundled_file\(\s*[\"']([^\"']+)[\"']", path.read_text())}
    opened |= {m for path in (root / "minidiff").rglob("*.py")
               for m in re.findall(r"[\"']([\w.-]+\.(?:npz|csv\.gz))[\"']", path.read_text())}
    assert opened and opened <= shipped, f"not in pyproject data-files: {sorted(opened - shipped)}"
    assert all((root / "data" / name).is_file() for name in shipped)
