"""The promotion artifact: ``promotion.json``, one decision per target and the gate's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from nasforge.artifacts.base import JsonArtifact

PROMOTION_JSON = "promotion.json"


@dataclass
class Promotion(JsonArtifact):
    """``promotion.json``.

    Attributes:
        decisions: Per target: the registered model and version, whether it was promoted and
            why, the gate's evidence and every ``rejected`` model with its reason.
        gate: The settings of the side-by-side timing gate.
        extra: Fields this version does not name.
    """

    SCHEMA: ClassVar[str] = "nasforge.promotion"
    FILE: ClassVar[str] = PROMOTION_JSON
    WHAT: ClassVar[str] = "promote output"
    JSON_DEFAULT: ClassVar[Any] = str

    decisions: list[dict[str, Any]]
    gate: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
