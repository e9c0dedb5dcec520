"""Pipeline stages: one module per stage, each a plain ``run(params, ..., output, ctx)``.

Each stage is declared once in :mod:`nasforge.stages.declarations` (inputs, output, versioning,
cluster resources, tracking); :mod:`nasforge.stages.runner` runs it from that declaration with
MLflow tracking, atomic outputs and resumable work folders, for all three callers (CLI, KFP
component, DVC). Stages know nothing of KFP, DVC or the CLI: what the runner knows that a stage
needs comes in its :class:`StageContext`.
"""

from dataclasses import dataclass, field
from pathlib import Path


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


@dataclass(frozen=True)
class StageContext:
    """What the runner gives a stage besides its params and inputs.

    A stage function called directly (a test, a benchmark) gets :data:`NO_CONTEXT`: no MLflow
    run and no work folder, so nothing is resumed.

    Attributes:
        run_id: The stage's own MLflow run, or None when tracking is off.
        parent_run_id: The pipeline's MLflow run it nests under, or None.
        work_dir: The attempt's work folder (:mod:`nasforge.checkpoint`): what a stage keeps
            there survives a failure, so the same stage run again resumes from it.
    """

    run_id: str | None = None
    parent_run_id: str | None = None
    work_dir: Path | None = None


#: The context of a stage function called outside the runner.
NO_CONTEXT = StageContext()
