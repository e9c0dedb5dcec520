"""Search the macro elastic space through a trained :class:`MacroSupernet`.

The glue between the macro supernet and the search engine: subnets are scored with inherited
weights (after BN recalibration) and proposed by the very strategies of the tabular benchmark
(:func:`nasforge.search.samplers.make_sampler`) in an Optuna study, so the same code, storage
and resumption serve both spaces. :func:`run_macro_search` is the search stage's body for
``space.kind == "macro"``; it writes the same ``pareto.json`` / ``history.json`` layout as the cell
search, with each record's architecture as a ``spec`` object (:meth:`MacroSpec.to_json`) instead
of an ``arch_str``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch

from nasforge.checkpoint import current_work_dir
from nasforge.search.base import Prior
from nasforge.search.objectives import Constraint
from nasforge.search.study import finish_search, pareto_fields, run_study, select_candidates
from nasforge.space.cell import count_parameters
from nasforge.space.macro import MacroSpec, macro_search_space
from nasforge.supernet.macro_supernet import (
    FULL_SPACE,
    ElasticChoices,
    MacroSupernet,
    evaluate_subnet,
    train_progressive,
)

STUDY_NAME = "nasforge-macro-search"


class MacroSubnetEvaluator:
    """Scores macro subnets of a trained supernet on every objective; caches repeated specs.

    Objectives (all minimised): ``val_error`` (inherited weights, BN recalibrated on
    ``bn_batches`` training batches), ``latency_ms[<target>]`` for every target of ``predictor``
    (e.g. a :class:`nasforge.hardware.predictor.LatencyPredictor` over a
    :class:`nasforge.hardware.spaces.MacroBlockSpace`; anything with ``targets`` and
    ``predict(spec) -> {name: ms}``), and ``params``; with ``metrics`` (a
    :class:`nasforge.search.subnet_metrics.SubnetMetrics`) every metric of the pipeline's search,
    whose objective columns ``names`` then lists.
    """

    def __init__(
        self,
        supernet: MacroSupernet,
        x_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        predictor: Any | None = None,
        *,
        bn_batches: int = 4,
        batch_size: int = 64,
        metrics: Any | None = None,
    ) -> None:
        self.supernet = supernet
        self.x_train, self.x_val, self.y_val = x_train, x_val, y_val
        self.predictor = predictor
        self.bn_batches = bn_batches
        self.batch_size = batch_size
        self.metrics = metrics
        self.names: list[str] | None = None
        self.cache: dict[MacroSpec, dict[str, float]] = {}

    def objective_names(self) -> list[str]:
        """Names of the objectives, in the study's order (``names`` when set)."""
        if self.names is not None:
            return list(self.names)
        targets = [] if self.predictor is None else [t.name for t in self.predictor.targets]
        return ["val_error"] + [f"latency_ms[{n}]" for n in targets] + ["params"]

    def evaluate(self, spec: MacroSpec) -> dict[str, float]:
        """All objective values of ``spec`` (cached)."""
        if spec in self.cache:
            return self.cache[spec]
        acc, subnet = evaluate_subnet(
            self.supernet,
            spec,
            self.x_val,
            self.y_val,
            self.x_train,
            bn_batches=self.bn_batches,
            batch_size=self.batch_size,
        )
        values = {"val_error": 1.0 - acc, "val_accuracy": acc}
        if self.predictor is not None:
            for name, ms in self.predictor.predict(spec).items():
                values[f"latency_ms[{name}]"] = float(ms)
        values["params"] = float(count_parameters(subnet))
        if self.metrics is not None:
            values.update(self.metrics.measure(subnet, spec, macro_arch_str(spec)))
        self.cache[spec] = values
        return values


def macro_arch_str(spec: MacroSpec) -> str:
    """A compact, readable one-line name of ``spec`` (what ``arch_str`` holds for the cell space),
    e.g. ``macro:d=1,2,1,1;w=0.5,1,1,1;k=3,3,5,3;e=3,3,3,3``: per-stage depth, width, kernel and
    expansion."""

    def join(values: tuple) -> str:
        return ",".join(f"{v:g}" for v in values)

    return (
        f"macro:d={join(spec.depths)};w={join(spec.widths)};"
        f"k={join(spec.kernels)};e={join(spec.expands)}"
    )


def choices_search_space(choices: ElasticChoices = FULL_SPACE) -> dict[str, list]:
    """Sampler parameters (``stage0_depth`` ...) restricted to ``choices``."""
    by_field = {
        "depth": choices.depths,
        "width": choices.widths,
        "kernel": choices.kernels,
        "expand": choices.expands,
    }
    return {name: list(by_field[name.split("_", 1)[1]]) for name in macro_search_space()}


def macro_distributions(
    choices: ElasticChoices = FULL_SPACE,
) -> dict[str, optuna.distributions.CategoricalDistribution]:
    """Optuna distributions of the macro space's sampler parameters (within ``choices``)."""
    return {
        name: optuna.distributions.CategoricalDistribution(values)
        for name, values in choices_search_space(choices).items()
    }


def progressive_phases(choices: ElasticChoices = FULL_SPACE) -> tuple[ElasticChoices, ...]:
    """OFA's progressive-shrinking phases inside ``choices``: the largest network, then elastic
    kernel, depth, and width + expansion (:data:`DEFAULT_PHASES` for the full space).

    A phase that opens nothing new (its dimension has one choice in ``choices``) is dropped.
    """
    top = dict(
        depths=choices.depths[-1:],
        widths=choices.widths[-1:],
        kernels=choices.kernels[-1:],
        expands=choices.expands[-1:],
    )
    candidates = [
        ElasticChoices("largest", **top),
        ElasticChoices("kernel", **{**top, "kernels": choices.kernels}),
        ElasticChoices("depth", **{**top, "kernels": choices.kernels, "depths": choices.depths}),
        ElasticChoices(
            "width",
            depths=choices.depths,
            widths=choices.widths,
            kernels=choices.kernels,
            expands=choices.expands,
        ),
    ]

    def dims(c: ElasticChoices) -> tuple:
        return (c.depths, c.widths, c.kernels, c.expands)

    phases = [candidates[0]]
    for c in candidates[1:]:
        if dims(c) != dims(phases[-1]):
            phases.append(c)
    return tuple(phases)


def choices_from_params(params: Any) -> ElasticChoices:
    """The part of the macro space configured in ``params.space.macro`` (full space if absent)."""
    macro = getattr(getattr(params, "space", None), "macro", None)
    if macro is None:
        return FULL_SPACE
    return ElasticChoices(
        "configured",
        depths=tuple(macro.depths),
        widths=tuple(macro.widths),
        kernels=tuple(macro.kernels),
        expands=tuple(macro.expands),
    )


def search_macro_subnets(
    evaluator: MacroSubnetEvaluator,
    *,
    strategy: str,
    trials: int,
    seed: int,
    storage: str | None = None,
    study_name: str = STUDY_NAME,
    prior: Prior | None = None,
    progress: Callable[[str], None] | None = None,
    choices: ElasticChoices = FULL_SPACE,
    constraints: Sequence[Constraint] = (),
    sampler_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a multi-objective search over the macro space (:func:`run_study`).

    The strategy is built by :func:`make_sampler`, the same code the tabular benchmark runs.
    With ``storage`` (an Optuna RDB URL such as ``sqlite:///study.db``) a killed search resumes
    where it stopped: finished trials are kept and not evaluated again.

    Args:
        evaluator: Scores a spec on every objective.
        strategy: A name from :data:`nasforge.search.samplers.STRATEGIES`.
        trials: Completed trials wanted in the study.
        seed: Sampler seed.
        storage: Optuna storage URL (None: in memory).
        study_name: Study name inside ``storage``.
        prior: Op-probability prior for the strategies that take one.
        progress: One-line progress callback.
        choices: The part of the space searched (default: all of it).
        constraints: Constraints on the evaluator's metrics.
        sampler_options: The strategy's own settings.

    Returns:
        One record per completed trial: ``trial``, ``spec`` (dict), ``arch_str``
        (:func:`macro_arch_str`), ``objectives``, ``metrics``, ``feasible``, ``violations``.

    Raises:
        ConfigError: ``trials`` below 1, or a bad strategy.
    """
    names = evaluator.objective_names()

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        return evaluator.evaluate(MacroSpec.from_params(p))

    return run_study(
        evaluate,
        objectives=names,
        distributions=macro_distributions(choices),
        strategy=strategy,
        seed=seed,
        trials=trials,
        storage=storage,
        study_name=study_name,
        constraints=constraints,
        search_space=choices_search_space(choices),
        prior=prior,
        sampler_options=sampler_options,
        # The largest subnet is the distillation teacher; evaluating it first anchors the front.
        first=choices.largest().to_params(),
        describe=describe_macro,
        progress=progress,
    )


def describe_macro(p: dict[str, Any]) -> dict[str, Any]:
    """The record fields of a macro trial: ``spec`` (object) and ``arch_str``."""
    spec = MacroSpec.from_params(p)
    return {"spec": json.loads(spec.to_json()), "arch_str": macro_arch_str(spec)}


def select_macro_candidates(
    records: list[dict[str, Any]],
    names: list[str],
    k: int,
    accuracy_window: float = 1.0,
    constraints: Sequence[Constraint] = (),
) -> list[dict[str, Any]]:
    """Up to ``k`` candidates, chosen as for the cell space (every macro subnet is valid).

    Raises:
        ConfigError: ``records`` is empty, or no record is feasible.
    """
    return select_candidates(records, names, k, accuracy_window, constraints)


def macro_block_space(
    input_shape: tuple[int, ...], num_classes: int, choices: ElasticChoices = FULL_SPACE
) -> Any:
    """The macro block space of this input shape, restricted to ``choices`` (latency models)."""
    from nasforge.hardware.spaces import MacroBlockSpace

    return MacroBlockSpace(
        input_shape[0],
        num_classes,
        tuple(input_shape[1:3]),
        depths=choices.depths,
        widths=choices.widths,
        kernels=choices.kernels,
        expands=choices.expands,
    )


def macro_latency_predictor(
    targets: list[Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    batch_size: int = 1,
    mode: str = "measure",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    choices: ElasticChoices = FULL_SPACE,
) -> Any:
    """A :class:`~nasforge.hardware.predictor.LatencyPredictor` over the macro block space of
    this input shape (the latency objectives of :class:`MacroSubnetEvaluator`); in ``table`` mode
    only the blocks ``choices`` can contain are profiled."""
    from nasforge.hardware.predictor import LatencyPredictor

    space = macro_block_space(input_shape, num_classes, choices)
    return LatencyPredictor(
        targets, space, batch_size=batch_size, mode=mode, threads=threads, progress=progress
    )


def load_macro_supernet(search_dir: Path, in_channels: int, num_classes: int) -> MacroSupernet:
    """The trained supernet saved by :func:`run_macro_search` (``supernet.safetensors``).

    Raises:
        ModelFileError: the file is missing or does not match the macro supernet.
    """
    from safetensors.torch import load_file

    from nasforge.errors import ModelFileError

    f = Path(search_dir) / "supernet.safetensors"
    if not f.is_file():
        raise ModelFileError(f"not a macro search output (no supernet.safetensors): {search_dir}")
    supernet = MacroSupernet(in_channels, num_classes)
    try:
        supernet.load_state_dict(load_file(str(f)))
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0]
        raise ModelFileError(f"{f} is not a macro supernet checkpoint: {first}") from None
    return supernet.eval()


def split_epochs(total: int, n_phases: int) -> list[int]:
    """Spread ``total`` supernet epochs over ``n_phases`` phases (the first, largest-only phase
    gets the remainder: OFA trains the full network longest); every phase gets at least one."""
    base = max(1, total // n_phases)
    epochs = [base] * n_phases
    epochs[0] += max(0, total - base * n_phases)
    return epochs


def run_macro_search(
    params: Any, dataset: Path, output: Path, predictor_factory: Callable | None = None
) -> Any:
    """The search stage for the macro space: progressive shrinking, then a strategy's search.

    Reads the same :class:`nasforge.config.Params` fields as the cell search
    (``search.supernet_epochs`` spread over the phases of :func:`progressive_phases`,
    ``batch_size``, ``lr``, ``weight_decay``, ``strategy``, ``sampler_options``, ``trials``,
    ``objectives``, ``constraints``, ``max_candidates``, ``candidate_accuracy_window``,
    ``bn_recalibration_batches``, the latency settings; the budgets; ``run.seed``) plus
    ``space.macro`` (the part of the space searched, random subnets per sandwich step) and
    writes ``supernet.safetensors``, ``study.db``, ``pareto.json`` and ``history.json`` to
    ``output``. Records and candidates carry ``spec`` (:meth:`MacroSpec.to_json` as an object)
    and a readable ``arch_str`` (:func:`macro_arch_str`).

    Args:
        params: Pipeline parameters.
        dataset: Prepared dataset folder.
        output: Output folder.
        predictor_factory: ``(input_shape, num_classes) -> predictor`` for the latency
            objectives; default: the targets of ``params`` at the deployed precision
            (:class:`nasforge.search.setup.SearchPredictor`).

    Returns:
        A :class:`nasforge.stages.StageResult`.
    """
    from nasforge.atomic import save_safetensors
    from nasforge.data.prepared import load_prepared
    from nasforge.search.setup import (
        SearchPredictor,
        deployed_precision,
        objective_setup,
        resolve_targets,
        sampler_options,
    )
    from nasforge.search.subnet_metrics import SubnetMetrics

    sp = params.search
    choices = choices_from_params(params)
    macro = getattr(getattr(params, "space", None), "macro", None)
    n_random = macro.sandwich_random if macro is not None else 2
    phases = progressive_phases(choices)
    data = load_prepared(dataset)
    torch.manual_seed(params.run.seed)
    supernet = MacroSupernet(data.input_shape[0], data.num_classes, choices)
    x_train, y_train = data.tensors("train")
    x_val, y_val = data.tensors("val")
    t0 = time.perf_counter()
    losses = train_progressive(
        supernet,
        x_train,
        y_train,
        phases=phases,
        epochs_per_phase=split_epochs(sp.supernet_epochs, len(phases)),
        batch_size=sp.batch_size,
        lr=sp.lr,
        weight_decay=sp.weight_decay,
        n_random=n_random,
        seed=params.run.seed,
        log_every=1,
    )
    supernet_seconds = time.perf_counter() - t0
    output.mkdir(parents=True, exist_ok=True)
    save_safetensors(
        {k: v.contiguous() for k, v in supernet.state_dict().items()},
        output / "supernet.safetensors",
    )
    precision = deployed_precision(params)
    if predictor_factory is not None:
        predictor = predictor_factory(data.input_shape, data.num_classes)
    else:
        predictor = SearchPredictor(
            resolve_targets(params.targets),
            macro_block_space(data.input_shape, data.num_classes, choices),
            params,
            precision,
        )
    setup = objective_setup(params, predictor)
    measurer = SubnetMetrics(
        predictor, data.input_shape, precision, sp.latency_batch_size, params.run.threads
    )
    evaluator = MacroSubnetEvaluator(
        supernet,
        x_train,
        x_val,
        y_val,
        None,
        bn_batches=sp.bn_recalibration_batches,
        batch_size=sp.batch_size,
        metrics=measurer,
    )
    evaluator.names = setup["objectives"]
    t1 = time.perf_counter()
    # In the work folder, which outlives a killed attempt, so a rerun keeps finished trials.
    work = current_work_dir() or output
    records = search_macro_subnets(
        evaluator,
        strategy=sp.strategy,
        trials=sp.trials,
        seed=params.run.seed,
        storage=f"sqlite:///{work / 'study.db'}",
        progress=lambda msg: print(f"  {msg}", flush=True),
        choices=choices,
        constraints=setup["constraints"],
        sampler_options=sampler_options(params),
    )
    search_seconds = time.perf_counter() - t1
    if work != output:
        output.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "study.db", output / "study.db")
    candidates = select_macro_candidates(
        records,
        setup["objectives"],
        sp.max_candidates,
        sp.candidate_accuracy_window,
        setup["constraints"],
    )
    teacher = choices.largest()
    pareto = {
        "space": "macro",
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "shape": {"in_channels": data.input_shape[0], "num_classes": data.num_classes},
        "choices": {
            "depths": list(choices.depths),
            "widths": list(choices.widths),
            "kernels": list(choices.kernels),
            "expands": list(choices.expands),
        },
        "phases": [p.name for p in phases],
        "teacher": {"spec": json.loads(teacher.to_json()), "arch_str": macro_arch_str(teacher)},
        "latency_sources": predictor.describe(),
        "targets": [t.describe() for t in predictor.targets],
        **pareto_fields(setup, measurer, precision, records, candidates),
    }
    return finish_search(
        output,
        pareto,
        records,
        losses,
        sp.strategy,
        supernet_seconds=supernet_seconds,
        search_seconds=search_seconds,
        unique_subnets=len(evaluator.cache),
        tags={"space": "macro"},
    )
