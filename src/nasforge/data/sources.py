"""Dataset readers: scikit-learn digits, ImageFolder directories or tar archives, and ``.npz``.

Every reader returns :class:`RawData`: uint8 images in NCHW layout with int64 labels, plus an
optional predefined test pool (ImageFolder trees with ``train/`` and ``test/`` keep their split).
Tar archives are read member by member in memory, never extracted, so a hostile archive cannot
write outside the output folder. ``.npz`` files are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from nasforge.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


@dataclass
class RawData:
    """Images (uint8, NCHW) and labels, with an optional predefined test pool."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


def load_digits_raw() -> RawData:
    """scikit-learn's ``digits``: 1,797 real 8x8 grey images of handwritten digits (values 0..16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 maps onto 0..255 without collisions, so the uint8 artifact is lossless.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    return RawData(x=x, y=d.target.astype(np.int64), classes=[str(c) for c in d.target_names])


def _decode(data: bytes, name: str, image_size: int | None, mode: str | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert(mode or ("L" if img.mode in ("L", "1", "I;16") else "RGB"))
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot decode image {name}: {err}") from None
    return arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _group_by_split(items: list[tuple[PurePosixPath, object]]) -> dict[str, dict[str, list]]:
    """Group image entries into ``{split: {class: [entry, ...]}}``.

    Layouts: ``<root>/<class>/img`` (split "all"), or ``<root>/{train,test}/<class>/img``, possibly
    below one common top folder.
    """
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for path, entry in items:
        parts = path.parts
        if len(parts) >= 3 and parts[-3] in ("train", "test", "val", "valid"):
            split = "test" if parts[-3] == "test" else "train"
            groups[split][parts[-2]].append((str(path), entry))
        elif len(parts) >= 2:
            groups["all"][parts[-2]].append((str(path), entry))
    if "all" in groups and ("train" in groups or "test" in groups):
        groups.pop("all")  # stray images beside a train/test tree are not a split of their own
    return groups


def _assemble(
    groups: dict[str, dict[str, list]],
    read: callable,
    image_size: int | None,
    max_per_class: int | None,
    source: str,
) -> RawData:
    if not groups:
        raise DataError(f"no images in ImageFolder layout (<class>/<image>) found in {source}")
    classes = sorted({c for split in groups.values() for c in split})
    index = {c: i for i, c in enumerate(classes)}
    mode: str | None = None
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, per_class in groups.items():
        xs, ys = [], []
        for cls in sorted(per_class):
            entries = sorted(per_class[cls], key=lambda e: e[0])
            limit = max_per_class
            if limit is not None and split == "test":
                limit = max(10, limit // 5)
            for name, entry in entries[:limit]:
                arr = _decode(read(entry), name, image_size, mode)
                mode = mode or ("L" if arr.shape[0] == 1 else "RGB")
                xs.append(arr)
                ys.append(index[cls])
        shapes = {a.shape for a in xs}
        if len(shapes) > 1:
            raise DataError(
                f"images in {source} have different sizes {sorted(shapes)[:3]}; set data.image_size"
            )
        out[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    if "all" in out:
        return RawData(x=out["all"][0], y=out["all"][1], classes=classes)
    if "train" not in out:
        raise DataError(f"{source} has a test/ split but no train/ split")
    test = out.get("test")
    return RawData(
        x=out["train"][0],
        y=out["train"][1],
        classes=classes,
        x_test=None if test is None else test[0],
        y_test=None if test is None else test[1],
    )


def load_image_folder(path: Path, image_size: int | None, max_per_class: int | None) -> RawData:
    """Read an ImageFolder directory (``<class>/<image>`` or ``{train,test}/<class>/<image>``)."""
    items = [
        (PurePosixPath(p.relative_to(path).as_posix()), p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return _assemble(
        _group_by_split(items), lambda p: p.read_bytes(), image_size, max_per_class, str(path)
    )


def load_image_tar(path: Path, image_size: int | None, max_per_class: int | None) -> RawData:
    """Read an ImageFolder tree straight from a tar archive, without extracting it."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"cannot read tar archive {path}: {err}") from None
    with tar:
        try:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and PurePosixPath(m.name).suffix.lower() in IMAGE_SUFFIXES
            ]
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"tar archive {path} is corrupt or truncated: {err}") from None
        items = [(PurePosixPath(m.name), m) for m in members]

        def read(member: tarfile.TarInfo) -> bytes:
            try:
                fh = tar.extractfile(member)
                if fh is None:
                    raise DataError(f"tar member {member.name} in {path} is not a regular file")
                return fh.read()
            except (tarfile.TarError, OSError, EOFError) as err:
                raise DataError(f"tar archive {path} is corrupt at {member.name}: {err}") from None

        return _assemble(_group_by_split(items), read, image_size, max_per_class, str(path))


def _as_nchw_uint8(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: array {key!r} must have 3 or 4 dimensions, has {x.ndim}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.dtype != np.uint8:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{path}: array {key!r} has values outside 0..255 ({lo}..{hi})")
        scale = 255.0 if hi <= 1.0 else 1.0
        x = np.rint(x * scale).astype(np.uint8)
    return np.ascontiguousarray(x)


def load_npz(path: Path) -> RawData:
    """Read ``x``/``y`` (or ``x_train``/``y_train`` [+ ``x_test``/``y_test``]) from an ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"cannot read {path} as .npz: {err}") from None
    if "x" in arrays and "y" in arrays:
        x, y = arrays["x"], arrays["y"]
        x_test = y_test = None
    elif "x_train" in arrays and "y_train" in arrays:
        x, y = arrays["x_train"], arrays["y_train"]
        x_test, y_test = arrays.get("x_test"), arrays.get("y_test")
    else:
        raise DataError(f"{path}: needs arrays x,y or x_train,y_train; has {sorted(arrays)}")
    y = np.asarray(y).astype(np.int64).reshape(-1)
    x = _as_nchw_uint8(np.asarray(x), "x", path)
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    n_classes = int(y.max()) + 1 if len(y) else 0
    raw = RawData(x=x, y=y, classes=[str(i) for i in range(n_classes)])
    if x_test is not None and y_test is not None:
        raw.x_test = _as_nchw_uint8(np.asarray(x_test), "x_test", path)
        raw.y_test = np.asarray(y_test).astype(np.int64).reshape(-1)
    return raw


def load_source(
    source: str, image_size: int | None = None, max_per_class: int | None = None
) -> RawData:
    """Load any supported source by name or path.

    Args:
        source: ``digits``, an ImageFolder directory, a ``.tar`` (optionally compressed) or ``.npz``.
        image_size: Resize images to a square of this size (ImageFolder/tar only).
        max_per_class: Keep at most this many training images per class.

    Raises:
        DataError: The source does not exist or cannot be read.
    """
    if source == "digits":
        raw = load_digits_raw()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"dataset not found: {source}")
        if path.is_dir():
            raw = load_image_folder(path, image_size, max_per_class)
        elif path.suffix == ".npz":
            raw = load_npz(path)
        elif path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")):
            raw = load_image_tar(path, image_size, max_per_class)
        else:
            raise DataError(f"unsupported dataset format: {source} (use a folder, .tar or .npz)")
    if len(raw.x) == 0:
        raise DataError(f"dataset {source} is empty")
    # ImageFolder readers subsample while decoding; in-memory sources are subsampled here.
    if max_per_class is not None and (source == "digits" or Path(source).suffix == ".npz"):
        keep = np.concatenate(
            [np.flatnonzero(raw.y == c)[:max_per_class] for c in np.unique(raw.y)]
        )
        keep.sort()
        raw.x, raw.y = raw.x[keep], raw.y[keep]
    return raw
