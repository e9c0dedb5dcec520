"""Pipeline stages: one module per stage, each a plain ``run(params, ..., output) -> StageResult``.

Stages know nothing of KFP, DVC or the CLI; :mod:`nasforge.stages.runner` wraps them with MLflow
tracking, atomic outputs and progress, and is what all three callers use.
"""

from dataclasses import dataclass, field
from pathlib import Path

STAGES = (
    "prepare-data",
    "search",
    "train",
    "prune",
    "qat",
    "export",
    "benchmark",
    "promote",
    "report",
)


@dataclass
class StageResult:
    """What a stage produced.

    Attributes:
        metrics: Numbers worth logging (accuracy, latency, sizes ...).
        tags: Strings worth logging (arch_str, decisions ...).
        model_dir: The produced model/dataset folder to hash and version with DVC, if any.
        artifacts: Small files to upload to the stage's MLflow run.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    model_dir: Path | None = None
    artifacts: list[Path] = field(default_factory=list)
