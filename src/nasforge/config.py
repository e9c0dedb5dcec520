"""Typed configuration: one YAML file (``params.yaml``) validated by pydantic.

Every stage receives the whole :class:`Params` object, so the CLI, the KFP components and DVC all
read the same fields. Unknown fields are rejected (a typo must not silently fall back to a
default), and a validation failure is raised as a one-line :class:`~nasforge.errors.ConfigError`
that names the offending field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nasforge.errors import ConfigError
from nasforge.space.registry import DEFAULT_SPACE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunParams(_Section):
    """Run-wide settings."""

    name: str = "nasforge"
    seed: int = 0
    threads: int = Field(2, ge=1, description="CPU threads for torch and the runtimes")


class DataParams(_Section):
    """Dataset source and split."""

    source: str = Field(
        "digits", description="'digits', an ImageFolder dir, a .tar of one, or .npz"
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    max_per_class: int | None = Field(None, ge=1, description="subsample each class (time-boxing)")
    image_size: int | None = Field(None, ge=4, description="resize images to this size")


class MacroSpaceParams(_Section):
    """The part of the macro elastic space searched (``space.kind: macro``).

    Each list is a subset of :mod:`nasforge.space.macro`'s choices (default: all of them); a
    smaller corner (e.g. ``kernels: [3]``, ``expands: [3]``) trains and searches much faster.
    """

    depths: list[int] = Field(
        default_factory=lambda: [1, 2, 3], description="blocks per stage, subset of 1, 2, 3"
    )
    widths: list[float] = Field(
        default_factory=lambda: [0.5, 0.75, 1.0],
        description="stage width multipliers, subset of 0.5, 0.75, 1.0",
    )
    kernels: list[int] = Field(
        default_factory=lambda: [3, 5, 7], description="depthwise kernel sizes, subset of 3, 5, 7"
    )
    expands: list[int] = Field(
        default_factory=lambda: [3, 4, 6], description="expansion ratios, subset of 3, 4, 6"
    )
    sandwich_random: int = Field(
        2, ge=0, description="random subnets per supernet step besides the largest and smallest"
    )

    @field_validator("depths", "widths", "kernels", "expands")
    @classmethod
    def _subset(cls, v: list, info: Any) -> list:
        from nasforge.space import macro

        full = {
            "depths": macro.DEPTHS,
            "widths": macro.WIDTHS,
            "kernels": macro.KERNELS,
            "expands": macro.EXPANDS,
        }[info.field_name]
        bad = [x for x in v if x not in full]
        if not v or bad:
            raise ValueError(f"must be a non-empty subset of {list(full)}")
        return sorted(set(v))


class SpaceParams(_Section):
    """Search space: a space of :mod:`nasforge.space.registry` and the settings of each.

    Built in: cell (NAS-Bench-201 cells; ``channels``, ``cells_per_stage``) and macro (the
    MobileNetV2 / Once-for-All elastic space; the ``macro`` section).
    """

    kind: str = Field(
        DEFAULT_SPACE,
        description="the search space (nasforge.space.registry): cell (NB201 cells: channels, "
        "cells_per_stage) or macro (MobileNetV2/Once-for-All elastic space: the macro section)",
    )
    channels: int = Field(16, ge=2, description="cell space: channels of the first stage")
    cells_per_stage: int = Field(1, ge=1, description="cell space: cells per stage")
    macro: MacroSpaceParams = MacroSpaceParams()

    @field_validator("kind")
    @classmethod
    def _known_space(cls, v: str) -> str:
        from nasforge.space.registry import space_names

        known = space_names()
        if v not in known:
            raise ValueError(f"unknown search space {v!r}; known: {', '.join(known)}")
        return v


class SearchParams(_Section):
    """Supernet training and the multi-objective, constrained subnet search.

    ``objectives`` and ``constraints`` are described in :mod:`nasforge.search.objectives`; the
    budgets are constraints of the study too (:func:`nasforge.search.objectives.
    budget_constraints`).
    """

    supernet_epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    strategy: str = Field(
        "hybrid", description="search strategy (nasforge.search.samplers.STRATEGIES)"
    )
    sampler_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the strategy's own settings, e.g. {population_size: 8} for optuna-nsga2",
    )
    trials: int = Field(40, ge=2)
    objectives: list[str] = Field(
        default_factory=lambda: ["error", "latency", "memory"],
        description="any of error, latency, memory, energy, params, macs (error is required)",
    )
    constraints: list[str] = Field(
        default_factory=list,
        description="'METRIC <= VALUE' / 'METRIC >= VALUE', e.g. 'memory_mb <= 0.5'",
    )
    budget_accuracy_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="budgets.min_accuracy is asked of inherited-weight accuracy minus this much",
    )
    max_candidates: int = Field(2, ge=1, description="Pareto candidates carried to training")
    candidate_accuracy_window: float = Field(
        0.10,
        gt=0,
        le=1,
        description="candidates must be within this much validation accuracy of the best subnet",
    )
    bn_recalibration_batches: int = Field(4, ge=0)
    latency_batch_size: int = Field(1, ge=1)
    latency_source: Literal["measure", "table"] = Field(
        "measure", description="time each subnet, or predict from a profiled latency table"
    )
    prior: Literal["none", "darts"] = Field(
        "none",
        description="'darts': a short DARTS run's op probabilities steer the 'hybrid' strategy",
    )
    darts_epochs: int = Field(5, ge=1, description="epochs of the DARTS run behind the prior")

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "population_size" in data:
            raise ValueError(
                "search.population_size moved to search.sampler_options.population_size "
                "(optuna-nsga2; sized to the trial budget when unset)"
            )
        return data

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from nasforge.search.samplers import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; choose from {', '.join(STRATEGIES)}")
        return v

    @field_validator("sampler_options")
    @classmethod
    def _valid_options(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        from nasforge.search.samplers import validate_sampler_options

        strategy = info.data.get("strategy")
        if strategy is None:
            return v
        try:
            return validate_sampler_options(strategy, v)
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @field_validator("objectives")
    @classmethod
    def _valid_objectives(cls, v: list[str]) -> list[str]:
        from nasforge.search.objectives import OBJECTIVE_KINDS

        bad = [k for k in v if k not in OBJECTIVE_KINDS]
        if bad:
            raise ValueError(
                f"unknown objective {bad[0]!r}; choose from {', '.join(OBJECTIVE_KINDS)}"
            )
        if len(set(v)) != len(v):
            raise ValueError("lists an objective twice")
        if "error" not in v:
            raise ValueError("must include 'error' (a search without accuracy finds nothing)")
        return v

    @field_validator("constraints")
    @classmethod
    def _valid_constraints(cls, v: list[str]) -> list[str]:
        from nasforge.search.objectives import parse_constraint

        for text in v:
            try:
                parse_constraint(text, None, "constraint")
            except ConfigError as err:
                raise ValueError(str(err).removeprefix("constraint: ")) from None
        return v

    @field_validator("prior")
    @classmethod
    def _prior_needs_hybrid(cls, v: str, info: Any) -> str:
        strategy = info.data.get("strategy")
        if v != "none" and strategy != "hybrid":
            raise ValueError(f"a '{v}' prior steers only the 'hybrid' strategy (got {strategy!r})")
        return v


class TuneParams(_Section):
    """Bayesian optimization (Optuna) of the fine-tuning hyper-parameters, per candidate.

    Each trial fine-tunes a copy of the candidate with the sampled learning rate, weight decay and
    epochs and scores it on the validation split; the best trial's model is kept.
    """

    enabled: bool = False
    trials: int = Field(8, ge=1)
    sampler: Literal["tpe", "gp"] = "tpe"
    lr: tuple[float, float] = (1e-3, 0.1)
    weight_decay: tuple[float, float] = (1e-5, 1e-2)
    epochs: tuple[int, int] = (2, 15)

    @field_validator("lr", "weight_decay")
    @classmethod
    def _log_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1]:
            raise ValueError(f"must be [low, high] with 0 < low < high (got {list(v)})")
        return v

    @field_validator("epochs")
    @classmethod
    def _epoch_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 1 <= low <= high (got {list(v)})")
        return v


class TrainParams(_Section):
    """Fine-tuning of candidates with logit distillation from the largest subnet."""

    epochs: int = Field(15, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.02, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    kd_temperature: float = Field(4.0, gt=0)
    kd_alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term")
    tune: TuneParams = TuneParams()


class PruneParams(_Section):
    """Structured channel pruning."""

    channel_ratio: float = Field(0.25, ge=0, lt=1, description="fraction of channels removed")
    importance: Literal["magnitude", "taylor"] = "magnitude"
    steps: int = Field(1, ge=1)
    finetune_epochs: int = Field(5, ge=0)
    lr: float = Field(0.01, gt=0)


class QatParams(_Section):
    """INT8 quantization-aware training."""

    epochs: int = Field(3, ge=0)
    lr: float = Field(0.002, gt=0)
    batch_size: int = Field(64, ge=1)
    freeze_bn_after_epochs: int | None = Field(
        None,
        ge=0,
        description="epochs after which BatchNorm statistics stop updating (null: never)",
    )


class ExportParams(_Section):
    """Export to ONNX / OpenVINO and its parity check (a promotion gate)."""

    parity_min_top1: float = Field(
        0.99,
        gt=0,
        le=1,
        description="top-1 agreement with the torch model on the test split required of an "
        "exported model (below it, the model is measured but never promoted)",
    )


class BenchmarkParams(_Section):
    """Measurement on each target."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    warmup: int = Field(10, ge=0)
    repeats: int = Field(50, ge=3)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("must be a non-empty list of positive integers")
        return v


class BudgetParams(_Section):
    """What a model must meet to be promoted."""

    min_accuracy: float = Field(0.0, ge=0, le=1)
    max_latency_ms: float | None = Field(None, gt=0)
    max_size_mb: float | None = Field(None, gt=0)


class PromoteParams(_Section):
    """Champion gates (see :mod:`nasforge.tracking.gate`).

    When a target has a champion, champion and challenger are timed side by side in the promote
    process on the target's runtime: ``rounds`` interleaved rounds of ``repeats`` runs at batch 1
    after ``warmup`` runs, and a ``confidence`` bootstrap interval of the latency ratio decides
    "faster" / "slower"; a difference under ``latency_floor_ms`` is a tie decided by accuracy.
    """

    precision: Literal["int8", "fp32", "any"] = "int8"
    accuracy_tolerance: float = Field(
        0.005,
        ge=0,
        description="a faster challenger may lose at most this much accuracy (absolute)",
    )
    latency_tolerance: float = Field(
        0.10,
        ge=0,
        lt=1,
        description="faster / slower means the latency ratio's interval is beyond 1 -/+ this",
    )
    latency_floor_ms: float = Field(
        0.05, ge=0, description="latency differences below this (ms) are ties, decided by accuracy"
    )
    rounds: int = Field(
        20, ge=5, le=1000, description="interleaved timing rounds of champion and challenger"
    )
    repeats: int = Field(20, ge=1, le=10000, description="timed runs per model per round")
    warmup: int = Field(
        10,
        ge=0,
        le=10000,
        description="untimed runs per model in each round (fresh sessions each round)",
    )
    confidence: float = Field(
        0.95, ge=0.5, lt=1, description="confidence level of the latency intervals"
    )


class TrackingParams(_Section):
    """MLflow tracking and DVC versioning."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "nasforge"
    model_prefix: str = "nasforge"
    dvc_remote: str = ".dvcstore"


class Params(_Section):
    """The whole configuration of a nasforge run (``params.yaml``)."""

    run: RunParams = RunParams()
    data: DataParams = DataParams()
    space: SpaceParams = SpaceParams()
    search: SearchParams = SearchParams()
    targets: list[str] = Field(default_factory=lambda: ["onnxruntime-cpu", "openvino-cpu"])
    train: TrainParams = TrainParams()
    prune: PruneParams = PruneParams()
    qat: QatParams = QatParams()
    export: ExportParams = Field(default_factory=ExportParams)
    benchmark: BenchmarkParams = BenchmarkParams()
    budgets: BudgetParams = BudgetParams()
    promote: PromoteParams = PromoteParams()
    tracking: TrackingParams = TrackingParams()
    # DVC's foreach needs an explicit list; it must stay within search.max_candidates.
    dvc_candidates: list[int] = Field(default_factory=lambda: [0])

    @field_validator("targets")
    @classmethod
    def _targets_non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one target")
        return v

    def to_json(self) -> str:
        """Serialize to a JSON string (how KFP components receive the configuration)."""
        return self.model_dump_json()


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    more = len(err.errors()) - 1
    tail = f"; and {more} more problem(s)" if more else ""
    return f"{source}: {loc}: {msg}{got_text}{tail}"


def params_from_dict(data: dict[str, Any], source: str = "params") -> Params:
    """Validate a plain dict as :class:`Params`.

    Args:
        data: The configuration mapping.
        source: Where it came from, used in error messages.

    Returns:
        The validated parameters.

    Raises:
        ConfigError: A field is unknown, of the wrong type or out of range.
    """
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    bad = [c for c in params.dvc_candidates if c < 0 or c >= params.search.max_candidates]
    if bad:
        raise ConfigError(
            f"{source}: dvc_candidates: index {bad[0]} is outside 0..{params.search.max_candidates - 1}"
            " (search.max_candidates)"
        )
    from nasforge.search.objectives import parse_constraint

    for text in params.search.constraints:
        parse_constraint(text, params.targets, f"{source}: search.constraints")
    return params


def load_params(path: str | Path | None) -> Params:
    """Load and validate ``params.yaml`` (or defaults when ``path`` is None).

    Args:
        path: YAML file path, or None for the built-in defaults.

    Returns:
        The validated parameters.

    Raises:
        ConfigError: The file is missing, is not YAML, or a field is invalid.
    """
    if path is None:
        return Params()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        # An empty file would silently run every default (no accuracy budget, say) and could
        # move a champion alias: almost always a mistake (a truncated or wrong file).
        raise ConfigError(
            f"{path}: params file is empty; start from the shipped params.yaml (an explicit "
            "`{}` runs the built-in defaults)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return params_from_dict(data, str(path))


def params_from_json(text: str) -> Params:
    """Parse the JSON form produced by :meth:`Params.to_json`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError("params JSON is not valid JSON") from None
    return params_from_dict(data, "params")
