"""Networks of model artifacts: build the architecture a ``model.json`` describes, with weights.

The files are :class:`nasforge.artifacts.model.ModelArtifact` (one format, dense or pruned).
Its description holds the architecture as ``space`` (the name of a search space of
:mod:`nasforge.space.registry`; files written before the field existed are cell models) plus
the fields that space writes (:meth:`nasforge.space.base.SearchSpace.model_fields`: always
``arch_str``, the space's readable name of the architecture, and ``shape``; e.g. the NB201
string and network shape of a cell, or a macro model's :class:`~nasforge.space.macro.MacroSpec`
as ``spec``), the dataset's input shape and normalisation, and the history of every stage that
touched the model. A pruned model keeps its unpruned architecture description; its smaller
layers are restored from its recorded layer sizes, or from the weight shapes
(:mod:`nasforge.compress.prune`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nasforge.artifacts.model import MODEL_JSON, WEIGHTS, ModelArtifact
from nasforge.errors import ConfigError, ModelFileError
from nasforge.space.registry import DEFAULT_SPACE, get_space, space_names, space_of

__all__ = ["MODEL_JSON", "WEIGHTS", "build_network", "load_model", "read_meta", "save_model"]


def save_model(
    model: torch.nn.Module, out_dir: Path, meta: dict[str, Any], pruned: bool = False
) -> None:
    """Write ``model``'s weights and ``meta`` as the model artifact ``out_dir`` (replaced whole).

    Args:
        model: The network.
        out_dir: The folder.
        meta: Its description (architecture fields, normalisation, history ...).
        pruned: Record its layer sizes (the ``pruned`` variant), which structured pruning made
            smaller than the architecture describes.
    """
    ModelArtifact.from_module(model, meta, pruned=pruned).write(out_dir)


def check_architecture(meta: dict[str, Any], file: Path) -> dict[str, Any]:
    """``meta`` if it describes an architecture of a known space.

    Raises:
        ModelFileError: It lacks ``arch_str``/``shape``, names an unknown space or its space
            finds a field missing.
    """
    if "arch_str" not in meta or "shape" not in meta:
        raise ModelFileError(f"{file} lacks arch_str/shape")
    space = meta.get("space", DEFAULT_SPACE)
    known = space_names()
    if space not in known:
        raise ModelFileError(
            f"{file}: unknown search space {space!r} (expected one of {', '.join(known)})"
        )
    problem = get_space(space).model_problem(meta)
    if problem:
        raise ModelFileError(f"{file}: {problem}")
    return meta


def read_meta(path: Path) -> dict[str, Any]:
    """Read the description in ``model.json`` of a model artifact.

    Raises:
        ModelFileError: Missing, not JSON, or without a valid architecture.
        ArtifactVersionError: A version this nasforge does not read.
    """
    desc = ModelArtifact.describe(path)
    return check_architecture(desc.meta, Path(path) / MODEL_JSON)


def build_network(meta: dict[str, Any]) -> torch.nn.Module:
    """The freshly initialised (unpruned) network that ``meta`` (a ``model.json``) describes.

    Raises:
        ModelFileError: The architecture fields are malformed.
    """
    try:
        return space_of(meta).network_from_model(meta)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"bad architecture in {MODEL_JSON}: {err}") from None


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network of a model artifact with its weights (pruned shapes included).

    Raises:
        ModelFileError: The artifact is missing, truncated or does not match its architecture.
        ArtifactVersionError: A version this nasforge does not read.
    """
    path = Path(path)
    read_meta(path)  # the architecture is checked before the weights are read
    art = ModelArtifact.read(path)
    meta, state = art.meta, art.state
    model = build_network(meta)
    own = model.state_dict()
    try:
        if (
            art.layer_shapes is None
            and len(state) == len(own)
            and all(k in own and own[k].shape == v.shape for k, v in state.items())
        ):
            model.load_state_dict(state)
        else:
            from nasforge.compress.prune import load_pruned_weights

            load_pruned_weights(model, state, art.layer_shapes)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ModelFileError(
            f"weights {path / WEIGHTS} do not fit architecture {meta['arch_str']}: {err}"
        ) from None
    model.eval()
    return model, meta
