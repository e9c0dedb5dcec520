"""Dataset readers and the deterministic split."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from nasforge.data.prepared import load_prepared, save_prepared, split_raw
from nasforge.data.sources import load_source
from nasforge.errors import DataError
from tests.conftest import CIFAR_TAR


def _png(value: int, size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_digits_split_is_deterministic_and_stratified():
    raw = load_source("digits")
    assert raw.x.shape == (1797, 1, 8, 8) and raw.x.dtype == np.uint8
    a = split_raw(raw, 0.15, 0.15, seed=3)
    b = split_raw(raw, 0.15, 0.15, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert sum(len(a[f"y_{s}"]) for s in ("train", "val", "test")) == 1797
    assert set(np.unique(a["y_test"])) == set(range(10))
    c = split_raw(raw, 0.15, 0.15, seed=4)
    assert not np.array_equal(a["y_test"], c["y_test"])


def test_prepared_round_trip_and_normalisation(tmp_path):
    raw = load_source("digits")
    meta = save_prepared(split_raw(raw, 0.2, 0.2, 0), raw.classes, "digits", 0, tmp_path)
    data = load_prepared(tmp_path)
    x, y = data.numpy("train")
    assert x.dtype == np.float32 and abs(float(x.mean())) < 0.05 and 0.9 < float(x.std()) < 1.1
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(meta["sha256"]) == 64


def test_image_folder_directory_and_tar(tmp_path):
    root = tmp_path / "imgs"
    for split, n in (("train", 6), ("test", 2)):
        for cls, value in (("cat", 10), ("dog", 200)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(_png(value))
    raw = load_source(str(root))
    assert raw.classes == ["cat", "dog"] and raw.x.shape == (12, 3, 6, 6)
    assert raw.x_test.shape == (4, 3, 6, 6)
    assert int(raw.x[raw.y == 1].mean()) == 200

    tar_path = tmp_path / "imgs.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(root, arcname="imgs")
    raw_t = load_source(str(tar_path))
    np.testing.assert_array_equal(np.sort(raw_t.y), np.sort(raw.y))
    assert raw_t.x_test.shape == raw.x_test.shape


def test_npz_source(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = load_source(str(tmp_path / "d.npz"))
    assert raw.x.shape == (40, 3, 8, 8) and raw.classes == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing", None, "dataset not found"),
        ("x.tar", b"not a tar at all" * 50, "tar"),
        ("x.npz", b"garbage", "npz"),
        ("x.csv", b"a,b", "unsupported"),
    ],
)
def test_bad_sources_raise_data_error(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_source(str(path))


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_npz_raises_data_error(tmp_path, keep):
    """A cut-off .npz is a zip without its directory (BadZipFile) or with a short member."""
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.arange(40) % 4)
    whole = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(DataError, match="cannot read .*cut.npz as .npz"):
        load_source(str(tmp_path / "cut.npz"))


def test_corrupt_image_in_folder(tmp_path):
    d = tmp_path / "cls"
    d.mkdir()
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="cannot decode image"):
        load_source(str(tmp_path))


@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"CIFAR-10 tar not found at {CIFAR_TAR}")
def test_cifar10_tar_subset():
    raw = load_source(str(CIFAR_TAR), max_per_class=5)
    assert raw.x.shape == (50, 3, 32, 32) and len(raw.classes) == 10
    assert raw.x_test is not None and raw.x_test.shape[0] == 100
