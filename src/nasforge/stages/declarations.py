"""One declaration per pipeline stage: the single place a stage's shape is written down.

A :class:`StageDeclaration` names the stage's function, its typed inputs and its output, whether
its output is versioned (DVC hash pushed, MLflow tag), the cluster resources of its task, whether
it needs its own MLflow run, and how its run is named. From these tables come:

* the CLI subcommand of each stage (:func:`nasforge.cli.build_parser`: one option per input);
* the runner's behaviour (:func:`nasforge.stages.runner.execute`: which function, which inputs,
  versioning, the tracking run the stage needs, closing the pipeline's parent MLflow run);
* the cluster settings of each task (``pipelines/cluster.py``: requests, limits, retries).

The KFP components (``components/<stage>.py``) and the ``dvc.yaml`` stages stay literal — KFP
compiles a component from its Python signature and DVC reads YAML — and
``tests/test_stage_declarations.py`` holds them to these declarations.

The stage functions are named by module, not imported: importing every stage imports torch,
ONNX, OpenVINO, MLflow and matplotlib (tens of seconds), and the CLI builds its parser from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nasforge.errors import ConfigError, DataError, ModelFileError, NasforgeError

#: ``artifact``: one folder; ``artifacts``: one or more folders; ``int``/``str``: a value.
InputKind = Literal["artifact", "artifacts", "int", "str"]


@dataclass(frozen=True)
class Resources:
    """CPU (cores) and memory requests and limits of one task on a cluster."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


@dataclass(frozen=True)
class StageInput:
    """One input of a stage.

    Attributes:
        name: Keyword of the stage function, name of the KFP component's input and of the
            runner's keyword argument.
        kind: ``artifact`` (a folder another stage wrote), ``artifacts`` (one or more such
            folders), ``int`` or ``str`` (a value).
        help: What it is, for ``nasforge <stage> --help``.
        flag: The CLI option (default ``--<name>``).
        missing: The error a path that does not exist raises (a dataset is a DataError).
    """

    name: str
    kind: InputKind
    help: str
    flag: str | None = None
    missing: type[NasforgeError] = ModelFileError

    @property
    def option(self) -> str:
        """The CLI option of this input."""
        return self.flag or f"--{self.name}"

    @property
    def is_path(self) -> bool:
        """An artifact folder (or several): a DVC dependency and a KFP input artifact."""
        return self.kind in ("artifact", "artifacts")


@dataclass(frozen=True)
class StageDeclaration:
    """Everything about a stage that its callers (CLI, KFP, DVC) and the runner need.

    Attributes:
        name: The stage's name: CLI subcommand, KFP task, ``dvc.yaml`` stage, MLflow tag.
        module: The module under :mod:`nasforge.stages` whose ``run`` is the stage; ``run``
            takes ``(params, <inputs by name>, output, ctx)`` and returns a StageResult.
        help: One line for ``nasforge --help``.
        inputs: The stage's inputs, in CLI order.
        output: Name of the output artifact (the KFP component's output; ``--output`` folder).
        resources: What its task asks of a cluster.
        versioned: Its output is a dataset or model: DVC hashes and pushes it, and the hash is
            the ``dvc.md5`` tag of its MLflow run.
        needs_tracking_run: It stores files in its own MLflow run (the model registry's
            versions), so it cannot run with tracking off.
        retry: A failed attempt may be retried on a cluster (a retried promote would register
            the model twice).
        ends_parent_run: The pipeline's last stage: once it succeeds, the parent MLflow run it
            nests under is marked finished, whoever called it.
        run_name: Name of its MLflow run (and console label), formatted with its value inputs,
            e.g. ``"benchmark-{target}"``; default the stage's name.
        loop_metric: The result metric whose count the KFP component returns as a list of
            indices, for the DAG to loop over (the search's candidates).
    """

    name: str
    module: str
    help: str
    inputs: tuple[StageInput, ...]
    output: str
    resources: Resources
    versioned: bool = False
    needs_tracking_run: bool = False
    retry: bool = True
    ends_parent_run: bool = False
    run_name: str | None = None
    loop_metric: str | None = None

    def function(self) -> Callable[..., Any]:
        """The stage's ``run`` function (imports its module)."""
        return importlib.import_module(f"nasforge.stages.{self.module}").run

    def label(self, inputs: Mapping[str, Any]) -> str:
        """The default name of the stage's MLflow run for these inputs."""
        if self.run_name is None:
            return self.name
        return self.run_name.format(**inputs)

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Check that ``inputs`` are exactly the declared ones.

        Raises:
            ConfigError: An input is missing or unknown.
        """
        declared = [i.name for i in self.inputs]
        unknown = sorted(set(inputs) - set(declared))
        missing = [n for n in declared if inputs.get(n) is None]
        if unknown or missing:
            what = "; ".join(
                part
                for part in (
                    f"unknown input(s) {', '.join(unknown)}" if unknown else "",
                    f"missing input(s) {', '.join(missing)}" if missing else "",
                )
                if part
            )
            takes = ", ".join(declared) or "no inputs"
            raise ConfigError(f"stage {self.name}: {what} (it takes {takes})")


_DATASET = StageInput(
    "dataset",
    "artifact",
    "prepared dataset folder (the output of prepare-data)",
    flag="--data",
    missing=DataError,
)
_MODEL_HELP = "model artifact folder (model.json + weights.safetensors)"
_TRAINING = Resources("4", "8", "8Gi", "16Gi")

#: Every stage, in pipeline order.
DECLARATIONS: tuple[StageDeclaration, ...] = (
    StageDeclaration(
        name="prepare-data",
        module="prepare_data",
        help="load and split a dataset",
        inputs=(),
        output="dataset",
        resources=Resources("1", "2", "2Gi", "4Gi"),
        versioned=True,
    ),
    StageDeclaration(
        name="search",
        module="search",
        help="train the supernet and search the Pareto set",
        inputs=(_DATASET,),
        output="search",
        resources=_TRAINING,
        versioned=True,
        loop_metric="candidates",
    ),
    StageDeclaration(
        name="train",
        module="train",
        help="fine-tune a candidate with distillation",
        inputs=(
            _DATASET,
            StageInput("search", "artifact", "search output folder (pareto.json, supernet)"),
            StageInput(
                "candidate",
                "int",
                "index of the candidate in the search's pareto.json (0 = cand-0)",
            ),
        ),
        output="model",
        resources=_TRAINING,
        versioned=True,
        run_name="train-cand-{candidate}",
    ),
    StageDeclaration(
        name="prune",
        module="prune",
        help="prune a model artifact's channels and fine-tune it",
        inputs=(_DATASET, StageInput("model", "artifact", _MODEL_HELP + " (train's output)")),
        output="pruned",
        resources=_TRAINING,
        versioned=True,
    ),
    StageDeclaration(
        name="qat",
        module="qat",
        help="INT8 quantization-aware training of a model artifact",
        inputs=(_DATASET, StageInput("model", "artifact", _MODEL_HELP + " (prune's output)")),
        output="quantized",
        resources=_TRAINING,
        versioned=True,
    ),
    StageDeclaration(
        name="export",
        module="export",
        help="export ONNX fp32/int8 and OpenVINO IR with parity checks",
        inputs=(
            _DATASET,
            StageInput("model", "artifact", "fp32 model artifact (pruned)"),
            StageInput("quantized", "artifact", "INT8 artifact (qat)"),
        ),
        output="exported",
        resources=Resources("2", "4", "4Gi", "8Gi"),
        versioned=True,
    ),
    StageDeclaration(
        name="benchmark",
        module="benchmark",
        help="measure exported models on a target",
        inputs=(
            _DATASET,
            StageInput("exported", "artifacts", "export folders (one per candidate)"),
            StageInput("target", "str", "a target name (see `nasforge targets`)"),
        ),
        output="result",
        # Requests what it limits (Guaranteed QoS): timings taken on a node whose CPU a
        # neighbour can borrow are not worth recording.
        resources=Resources("4", "4", "8Gi", "8Gi"),
        run_name="benchmark-{target}",
    ),
    StageDeclaration(
        name="promote",
        module="promote",
        help="register the best model per target and gate the champion, or roll a champion back",
        inputs=(
            StageInput(
                "benchmarks",
                "artifacts",
                "benchmark output folders (every candidate on every target)",
            ),
        ),
        output="promotion",
        resources=Resources("500m", "1", "1Gi", "2Gi"),
        needs_tracking_run=True,
        retry=False,
    ),
    StageDeclaration(
        name="report",
        module="report",
        help="write report.html and summary.json",
        inputs=(
            StageInput("search", "artifact", "search output folder"),
            StageInput("promotion", "artifact", "promote output folder (promotion.json)"),
            StageInput("benchmarks", "artifacts", "benchmark output folders"),
        ),
        output="report",
        resources=Resources("500m", "1", "1Gi", "2Gi"),
        ends_parent_run=True,
    ),
)

#: Stage names in pipeline order.
STAGES: tuple[str, ...] = tuple(d.name for d in DECLARATIONS)
_BY_NAME = {d.name: d for d in DECLARATIONS}


def declaration(stage: str) -> StageDeclaration:
    """The declaration of ``stage``.

    Raises:
        ConfigError: No stage has that name.
    """
    try:
        return _BY_NAME[stage]
    except KeyError:
        raise ConfigError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}") from None
