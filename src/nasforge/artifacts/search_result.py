"""The search result: ``pareto.json`` (candidates and how they were chosen) + ``history.json``.

The search folder also holds the trained supernet (``supernet.safetensors``) and the Optuna
study (``study.db``); the space named by ``space`` reads its own fields back
(:meth:`nasforge.space.base.SearchSpace.from_pareto`). Every space writes ``space``; a
``pareto.json`` from before the header (version 1) without it was a cell search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nasforge.artifacts.base import LEGACY_VERSION, JsonArtifact
from nasforge.space.registry import DEFAULT_SPACE

PARETO_JSON = "pareto.json"
HISTORY_JSON = "history.json"
SUPERNET = "supernet.safetensors"
STUDY = "study.db"


@dataclass
class SearchResult(JsonArtifact):
    """``pareto.json``: the searched space, the chosen candidates and the front.

    Attributes:
        space: Name of the search space searched (:mod:`nasforge.space.registry`).
        candidates: The Pareto candidates to fine-tune, each with ``id`` (``cand-<i>``),
            ``arch_str`` and the space's architecture fields.
        objectives: The study's objective columns.
        teacher: Architecture record of the distillation teacher (the largest subnet).
        front: Trial records of the first non-dominated front.
        extra: Every other field (the space's own, constraints, metric sources, prior ...).
    """

    SCHEMA: ClassVar[str] = "nasforge.search-result"
    FILE: ClassVar[str] = PARETO_JSON
    WHAT: ClassVar[str] = "search output"

    space: str
    candidates: list[dict[str, Any]]
    objectives: list[str] = field(default_factory=list)
    teacher: dict[str, Any] | None = None
    front: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.space:
            raise ValueError("a search result names its space")

    @classmethod
    def upgrade(cls, body: dict[str, Any], version: int) -> dict[str, Any]:  # noqa: D102
        if version == LEGACY_VERSION:
            body.setdefault("space", DEFAULT_SPACE)
        return body

    def as_dict(self) -> dict[str, Any]:
        """The document as one dict (what the spaces and the report read)."""
        return self.to_body()


@dataclass
class SearchHistory(JsonArtifact):
    """``history.json``: every trial of the study and the supernet's training losses.

    Attributes:
        trials: One record per evaluated trial (objectives, feasibility, rank, architecture).
        supernet_loss: The supernet's loss curve(s), as the space's training reports them.
        strategy: The search strategy (``search.strategy``).
        extra: Fields this version does not name.
    """

    SCHEMA: ClassVar[str] = "nasforge.search-history"
    FILE: ClassVar[str] = HISTORY_JSON
    WHAT: ClassVar[str] = "search output"

    trials: list[dict[str, Any]]
    supernet_loss: Any = None
    strategy: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def read_pareto(path: str | Path) -> dict[str, Any]:
    """The ``pareto.json`` of search folder ``path`` as one dict (``space`` always set).

    Raises:
        ModelFileError: Missing, corrupt or malformed.
        ArtifactVersionError: A version this nasforge does not read.
    """
    return SearchResult.read(path).as_dict()
