"""The model artifact passed between stages: ``model.json`` + ``weights.safetensors``.

``model.json`` holds the architecture, the dataset's input shape and normalisation, and the
history of every stage that touched the model. The architecture is ``space`` (the name of a
search space of :mod:`nasforge.space.registry`; files written before the field existed are cell
models) plus the fields that space writes (:meth:`nasforge.space.base.SearchSpace.model_fields`:
always ``arch_str``, the space's readable name of the architecture, and ``shape``; e.g. the
NB201 string and network shape of a cell, or a macro model's
:class:`~nasforge.space.macro.MacroSpec` as ``spec``). Weights are safetensors (never pickle). A
pruned model keeps its unpruned architecture description; its smaller layers are restored from
the weight shapes (``nasforge.compress.prune``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nasforge.atomic import save_safetensors
from nasforge.errors import ConfigError, ModelFileError
from nasforge.space.registry import DEFAULT_SPACE, get_space, space_names, space_of

MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"


def save_model(model: torch.nn.Module, out_dir: Path, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_safetensors(state, out_dir / WEIGHTS)
    (out_dir / MODEL_JSON).write_text(json.dumps(meta, indent=2))


def read_meta(path: Path) -> dict[str, Any]:
    """Read ``model.json`` of a model artifact.

    Raises:
        ModelFileError: Missing or not JSON.
    """
    f = Path(path) / MODEL_JSON
    if not f.is_file():
        raise ModelFileError(f"not a model artifact (no {MODEL_JSON}): {path}")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"corrupt {f}: {err}") from None
    if not isinstance(meta, dict) or "arch_str" not in meta or "shape" not in meta:
        raise ModelFileError(f"{f} lacks arch_str/shape")
    space = meta.get("space", DEFAULT_SPACE)
    known = space_names()
    if space not in known:
        raise ModelFileError(
            f"{f}: unknown search space {space!r} (expected one of {', '.join(known)})"
        )
    problem = get_space(space).model_problem(meta)
    if problem:
        raise ModelFileError(f"{f}: {problem}")
    return meta


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
    """
    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ModelFileError(f"model weights missing: {weights}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"corrupt or truncated weights {weights}: {err}") from None
    model = build_network(meta)
    own = model.state_dict()
    try:
        if all(k in own and own[k].shape == v.shape for k, v in state.items()) and len(
            state
        ) == len(own):
            model.load_state_dict(state)
        else:
            from nasforge.compress.prune import load_pruned_weights

            load_pruned_weights(model, state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ModelFileError(
            f"weights {weights} do not fit architecture {meta['arch_str']}: {err}"
        ) from None
    model.eval()
    return model, meta
