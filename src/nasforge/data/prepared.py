"""The prepared-dataset artifact's arrays: one ``dataset.npz`` plus ``meta.json``
(:class:`nasforge.artifacts.dataset.Dataset`, the versioned description).

Images stay uint8 (CIFAR-10 is 150 MB instead of 600 MB as float32); per-channel mean and std of
the training split are stored in the metadata, and :meth:`PreparedData.tensors` normalises on
load, so every stage and every runtime sees exactly the same inputs.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from nasforge.artifacts.dataset import ARRAYS, Dataset
from nasforge.data.sources import RawData
from nasforge.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class PreparedData:
    """Train/val/test arrays with their normalisation and class names."""

    arrays: dict[str, np.ndarray]
    classes: list[str]
    mean: list[float]
    std: list[float]
    meta: dict

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(int(s) for s in self.arrays["x_train"].shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def numpy(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 images and int64 labels of ``split``."""
        x = self.arrays[f"x_{split}"].astype(np.float32) / 255.0
        mean = np.asarray(self.mean, np.float32)[None, :, None, None]
        std = np.asarray(self.std, np.float32)[None, :, None, None]
        return (x - mean) / std, self.arrays[f"y_{split}"]

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`numpy`, as torch tensors."""
        x, y = self.numpy(split)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def split_raw(
    raw: RawData, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Deterministic stratified train/val/test split (a predefined test pool is kept as is)."""

    def strat(y: np.ndarray) -> np.ndarray | None:
        counts = np.bincount(y)
        return y if counts[counts > 0].min() >= 2 else None

    if raw.x_test is not None:
        x_test, y_test = raw.x_test, raw.y_test
        x_rest, y_rest = raw.x, raw.y
    else:
        x_rest, x_test, y_rest, y_test = train_test_split(
            raw.x, raw.y, test_size=test_fraction, random_state=seed, stratify=strat(raw.y)
        )
    val_share = val_fraction / (1.0 - (0.0 if raw.x_test is not None else test_fraction))
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=seed, stratify=strat(y_rest)
    )
    return {
        "x_train": x_train, "y_train": y_train,
        "x_val": x_val, "y_val": y_val,
        "x_test": x_test, "y_test": y_test,
    }  # fmt: skip


def save_prepared(
    arrays: dict[str, np.ndarray], classes: list[str], source: str, seed: int, out_dir: Path
) -> dict:
    """Write ``dataset.npz`` and ``meta.json`` into ``out_dir``; return the metadata."""
    x = arrays["x_train"].astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3)).tolist()
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3).tolist()
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / ARRAYS
    np.savez(npz, **arrays)
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    description = Dataset(
        source=source,
        seed=seed,
        classes=list(classes),
        input_shape=[int(s) for s in arrays["x_train"].shape[1:]],
        mean=mean,
        std=std,
        counts={s: int(len(arrays[f"y_{s}"])) for s in SPLITS},
        sha256=digest,
    )
    description.write(out_dir)
    return description.to_body()


def load_prepared(path: str | Path) -> PreparedData:
    """Load the artifact written by the prepare-data stage.

    Raises:
        DataError: The folder or its files are missing or corrupt.
        ArtifactVersionError: ``meta.json`` is of a version this nasforge does not read.
    """
    path = Path(path)
    description = Dataset.read(path)
    meta = description.to_body()
    try:
        with np.load(path / ARRAYS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"prepared dataset {path} is corrupt: {err}") from None
    missing = [f"{a}_{s}" for s in SPLITS for a in ("x", "y") if f"{a}_{s}" not in arrays]
    if missing:
        raise DataError(f"prepared dataset {path} lacks arrays {missing}")
    return PreparedData(arrays, meta["classes"], meta["mean"], meta["std"], meta)
