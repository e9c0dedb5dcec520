"""The prepared-dataset artifact: ``dataset.npz`` (uint8 images, labels) + ``meta.json``.

The arrays are read and written by :mod:`nasforge.data.prepared`; this is the description
every stage reads first: source, split seed, classes, input shape, the training split's
per-channel mean and std, split sizes and the SHA-256 of ``dataset.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nasforge.artifacts.base import JsonArtifact, artifact_folder
from nasforge.errors import DataError

META_JSON = "meta.json"
ARRAYS = "dataset.npz"


@dataclass
class Dataset(JsonArtifact):
    """Description of a prepared dataset (``meta.json``).

    Attributes:
        source: Where the images came from (``digits``, a folder, a ``.tar``, a ``.npz``).
        seed: Seed of the split.
        classes: Class names, index = label.
        input_shape: ``[C, H, W]`` of one image.
        mean: Per-channel mean of the training split (images scaled to [0, 1]).
        std: Per-channel standard deviation of the training split.
        counts: Images per split (``train``, ``val``, ``test``).
        sha256: SHA-256 of ``dataset.npz``.
        extra: Fields this version does not name.
    """

    SCHEMA: ClassVar[str] = "nasforge.dataset"
    FILE: ClassVar[str] = META_JSON
    WHAT: ClassVar[str] = "prepared dataset"
    ERROR: ClassVar[type[DataError]] = DataError

    source: str
    seed: int
    classes: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    counts: dict[str, int]
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> Dataset:
        """Read the description of the prepared dataset in folder ``path``.

        Raises:
            DataError: ``dataset.npz`` or ``meta.json`` is missing, or ``meta.json`` is corrupt.
            ArtifactVersionError: ``meta.json`` is of a version this nasforge does not read.
        """
        path = artifact_folder(path, META_JSON)
        if not (path / ARRAYS).is_file() or not (path / META_JSON).is_file():
            raise DataError(f"not a prepared dataset (needs {ARRAYS} and {META_JSON}): {path}")
        return super().read(path)
