"""The model artifact: one trained network's folder, ``model.json`` + ``weights.safetensors``.

One format for every float model, dense or pruned. ``model.json`` is ``schema``/``version``,
``variant`` (``dense``, or ``pruned``: structured pruning made layers smaller than the
architecture describes) and, for a pruned model, ``layer_shapes`` (the Conv/BN/Linear sizes,
from which :func:`nasforge.compress.prune.load_pruned_weights` resizes the freshly built
network), beside the model's description (``meta``: the architecture fields of its space,
normalisation, candidate, history ...). Weights are safetensors (never pickle).

Read as well: version 1, the flat ``model.json`` written before the header (a pruned one's
shapes are inferred from its weights), and ``nasforge-pruned-v1`` folders (``model.json`` with
``format``/``meta``/``shapes`` beside ``model.safetensors``), both read as this format.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from nasforge.artifacts.base import (
    HEADER,
    LEGACY_VERSION,
    ArtifactVersionError,
    header_version,
    load_json,
    versions_text,
)
from nasforge.atomic import save_safetensors, temp_dir_beside
from nasforge.errors import ModelFileError

MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
VARIANTS = ("dense", "pruned")
#: The pruned-model format of nasforge before artifacts had one model format.
LEGACY_PRUNED_FORMAT = "nasforge-pruned-v1"
LEGACY_PRUNED_WEIGHTS = "model.safetensors"
#: Keys of ``model.json`` that are the format's, not the model description's.
RESERVED = (*HEADER, "variant", "layer_shapes")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


@dataclass
class ModelDescription:
    """``model.json`` of a model folder, without the weights.

    Attributes:
        meta: The model's description (architecture fields, normalisation, history ...).
        variant: ``dense`` or ``pruned``.
        layer_shapes: Per-layer Conv/BN/Linear sizes of a pruned model (None: dense, or a
            version-1 pruned model whose shapes come from its weights).
        version: The version read (1 for files from before the header and
            ``nasforge-pruned-v1`` folders).
        weights: The weights file.
    """

    meta: dict[str, Any]
    variant: str
    layer_shapes: dict[str, dict[str, Any]] | None
    version: int
    weights: Path


@dataclass
class ModelArtifact:
    """A network's weights and description, as the model stages pass it on.

    Attributes:
        meta: The model's description (JSON; may not use the keys of :data:`RESERVED`).
        state: The state dict (tensors).
        layer_shapes: Per-layer sizes of a pruned model; None for a dense one.
    """

    SCHEMA: ClassVar[str] = "nasforge.model"
    VERSION: ClassVar[int] = 2
    READS: ClassVar[tuple[int, ...]] = (LEGACY_VERSION, 2)

    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    layer_shapes: dict[str, dict[str, Any]] | None = None

    @property
    def variant(self) -> str:
        """``pruned`` when it records layer sizes (smaller than the architecture's), else
        ``dense``."""
        return "dense" if self.layer_shapes is None else "pruned"

    @classmethod
    def from_module(
        cls, model: torch.nn.Module, meta: dict[str, Any], pruned: bool = False
    ) -> ModelArtifact:
        """The artifact of ``model``'s current weights (its layer sizes kept when ``pruned``)."""
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        return cls(dict(meta), state, layer_shapes(model) if pruned else None)

    @classmethod
    def describe(cls, path: str | Path) -> ModelDescription:
        """Read ``model.json`` of folder ``path`` (the weights are not loaded).

        Raises:
            ModelFileError: Missing or corrupt ``model.json``, or a malformed field.
            ArtifactVersionError: Another schema, or a version (or legacy format) this
                nasforge does not read.
        """
        path = Path(path)
        file = path / MODEL_JSON
        doc = load_json(file, "model artifact")
        if "schema" not in doc and "format" in doc:
            return cls._describe_legacy_pruned(doc, file)
        version = header_version(doc, file, cls.SCHEMA, cls.READS)
        if version == LEGACY_VERSION:
            return ModelDescription(doc, "dense", None, version, path / WEIGHTS)
        variant = doc.get("variant")
        if variant not in VARIANTS:
            raise ModelFileError(f"{file}: variant {variant!r} is not one of {', '.join(VARIANTS)}")
        shapes = doc.get("layer_shapes")
        if variant == "pruned" and not _is_shapes(shapes):
            raise ModelFileError(f"{file}: a pruned model needs layer_shapes (per-layer sizes)")
        meta = {k: v for k, v in doc.items() if k not in RESERVED}
        return ModelDescription(
            meta, variant, shapes if variant == "pruned" else None, version, path / WEIGHTS
        )

    @classmethod
    def _describe_legacy_pruned(cls, doc: dict[str, Any], file: Path) -> ModelDescription:
        if doc["format"] != LEGACY_PRUNED_FORMAT:
            raise ArtifactVersionError(
                f"{file}: model format {doc['format']!r} is unknown; this nasforge reads "
                f"{cls.SCHEMA} versions {versions_text(cls.READS)} and {LEGACY_PRUNED_FORMAT}"
            )
        meta, shapes = doc.get("meta"), doc.get("shapes")
        if not isinstance(meta, dict) or not _is_shapes(shapes):
            raise ModelFileError(f"{file}: not a nasforge model description (meta/shapes)")
        return ModelDescription(
            dict(meta), "pruned", dict(shapes), LEGACY_VERSION, file.parent / LEGACY_PRUNED_WEIGHTS
        )

    @classmethod
    def read(cls, path: str | Path) -> ModelArtifact:
        """Read the model folder ``path``: description and weights.

        Raises:
            ModelFileError: Missing, truncated or corrupt files.
            ArtifactVersionError: A version (or format) this nasforge does not read.
        """
        desc = cls.describe(path)
        if not desc.weights.is_file():
            raise ModelFileError(f"model weights missing: {desc.weights}")
        try:
            state = load_file(str(desc.weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelFileError(
                f"corrupt or truncated weights {desc.weights}: {_first_line(err)}"
            ) from None
        return cls(desc.meta, state, desc.layer_shapes)

    def document(self) -> dict[str, Any]:
        """``model.json``'s content."""
        clash = [k for k in RESERVED if k in self.meta]
        if clash:
            raise ValueError(f"a model description may not use the keys {clash}")
        doc: dict[str, Any] = {"schema": self.SCHEMA, "version": self.VERSION}
        doc["variant"] = self.variant
        if self.layer_shapes is not None:
            doc["layer_shapes"] = self.layer_shapes
        return {**doc, **self.meta}

    def write(self, path: str | Path) -> Path:
        """Write the folder ``path``, replacing it as a whole (a kill leaves the old or the new).

        Returns:
            The folder.
        """
        path = Path(path)
        text = json.dumps(self.document(), indent=2)
        tmp = temp_dir_beside(path)
        try:
            save_safetensors(self.state, tmp / WEIGHTS)
            (tmp / MODEL_JSON).write_text(text)
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path


def layer_shapes(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer shape attributes of the Conv/BN/Linear layers (what pruning changes)."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, _ConvNd):
            shapes[name] = {
                "type": "conv",
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "groups": m.groups,
            }
        elif isinstance(m, torch.nn.Linear):
            shapes[name] = {
                "type": "linear",
                "in_features": m.in_features,
                "out_features": m.out_features,
            }
        elif isinstance(m, _BatchNorm):
            shapes[name] = {"type": "batchnorm", "num_features": m.num_features}
    return shapes


def _is_shapes(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())
