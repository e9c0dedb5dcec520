"""search: train a weight-sharing supernet, then search its subnets for the Pareto set.

One body for every search space (``space.kind``, :mod:`nasforge.space.registry`): the space
supplies the supernet, its training, the subnets with inherited weights, the teacher, the
sampler's parameters and validity, a prior and the blocks of its latency tables
(:class:`~nasforge.space.base.SearchSpace`); everything else is shared.

Objectives (``search.objectives``, all minimised; :mod:`nasforge.search.objectives`): validation
error of the subnet with inherited weights (after BN recalibration), latency of the deployed
precision on every target (measured here or predicted from a profiled table for runtime targets,
looked up for table targets, from a GPU node's table for GPU targets), memory, energy,
parameters, MACs. ``search.constraints`` and the budgets are constraints of the study; points the
space calls invalid (cells without an input-to-output path) are never evaluated. The search is an
Optuna study run by the one search driver (:func:`nasforge.search.driver.search_subnets`), whose
sampler comes from :func:`nasforge.search.samplers.make_sampler` — the same strategy code as the
tabular benchmark — kept in the stage's work folder, so a killed search resumes without
re-evaluating trials.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from nasforge.artifacts.search_result import (
    HISTORY_JSON,
    PARETO_JSON,
    STUDY,
    SUPERNET,
    SearchHistory,
    SearchResult,
)
from nasforge.atomic import save_safetensors
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import ConfigError
from nasforge.search.driver import search_subnets, select_candidates, skipped_trials
from nasforge.search.objectives import column_kind
from nasforge.search.setup import (
    SearchPredictor,
    deployed_precision,
    objective_setup,
    resolve_targets,
    sampler_options,
)
from nasforge.search.subnet_metrics import SubnetEvaluator, SubnetMetrics
from nasforge.space.base import SearchSpace
from nasforge.space.registry import get_space, space_names
from nasforge.stages import NO_CONTEXT, StageContext, StageResult


def check_prior(space: type[SearchSpace], prior: str) -> None:
    """Refuse a ``search.prior`` the space cannot compute (one-line ConfigError)."""
    if prior != "none" and prior not in space.priors:
        able = [n for n in space_names() if prior in get_space(n).priors]
        raise ConfigError(
            f"search.prior '{prior}' steers the {' / '.join(able)} space only "
            f"(space.kind: {' or '.join(able)})"
        )


def check_targets(space: type[SearchSpace], targets: list[Any]) -> None:
    """Refuse ``table:`` targets for a space they cannot look up (one-line ConfigError)."""
    tables = [t.name for t in targets if t.kind == "table"]
    if tables and not space.table_targets:
        raise ConfigError(
            f"target {tables[0]!r} looks latencies up by NB201 cell; the {space.name} space "
            "needs runtime targets"
        )


def run(params: Params, dataset: Path, output: Path, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """Train the supernet of ``params.space`` on ``dataset``; write the Pareto candidates.

    Writes ``supernet.safetensors``, ``study.db``, ``pareto.json`` and ``history.json`` to
    ``output``. Records and candidates carry the space's architecture fields
    (:meth:`~nasforge.space.base.SearchSpace.spec_record`: ``arch_str``, plus e.g. ``ops`` or
    ``spec``).

    Raises:
        ConfigError: the space cannot use the prior or the targets asked for, or no trial is
            feasible.
        TargetError: a target cannot be used or modelled here.
    """
    sp = params.search
    space_type = get_space(params.space.kind)
    check_prior(space_type, sp.prior)
    targets = resolve_targets(params.targets)
    check_targets(space_type, targets)
    data = load_prepared(dataset)
    torch.manual_seed(params.run.seed)
    space = space_type.from_params(params.space, data.input_shape, data.num_classes)
    # Latency models first: a target that cannot be modelled fails before the supernet trains.
    precision = deployed_precision(params)
    predictor = SearchPredictor(targets, space.block_space(), params, precision)
    # Seeded again, so the supernet starts the same whether latency tables had to be profiled.
    torch.manual_seed(params.run.seed)
    supernet = space.new_supernet()
    x_train, y_train = data.tensors("train")
    x_val, y_val = data.tensors("val")

    work = ctx.work_dir or output
    t0 = time.perf_counter()
    trained = space.train_supernet(supernet, params, x_train, y_train)
    supernet_seconds = time.perf_counter() - t0
    output.mkdir(parents=True, exist_ok=True)
    save_safetensors(
        {k: v.contiguous() for k, v in supernet.state_dict().items()},
        output / SUPERNET,
    )

    setup = objective_setup(params, predictor)
    measurer = SubnetMetrics(
        predictor, data.input_shape, precision, sp.latency_batch_size, params.run.threads
    )
    evaluator = SubnetEvaluator(
        space,
        supernet,
        x_train,
        x_val,
        y_val,
        bn_batches=sp.bn_recalibration_batches,
        batch_size=sp.batch_size,
        metrics=measurer,
    )
    prior, prior_record = (
        space.prior(sp.prior, params, x_train, y_train) if sp.prior != "none" else (None, None)
    )
    t1 = time.perf_counter()
    # The study lives in the work folder, which outlives a killed attempt: a rerun keeps every
    # finished trial. It is copied into the output when the search is done.
    storage = f"sqlite:///{work / STUDY}"
    records = search_subnets(
        evaluator,
        objectives=setup["objectives"],
        strategy=sp.strategy,
        seed=params.run.seed,
        trials=sp.trials,
        storage=storage,
        constraints=setup["constraints"],
        prior=prior,
        sampler_options=sampler_options(params),
        progress=lambda msg: print(f"  {msg}", flush=True),
    )
    search_seconds = time.perf_counter() - t1
    if work != output:
        shutil.copy2(work / STUDY, output / STUDY)
    candidates = select_candidates(
        records,
        setup["objectives"],
        sp.max_candidates,
        sp.candidate_accuracy_window,
        setup["constraints"],
    )
    pareto = {
        "space": space.name,
        **space.pareto_fields(),
        **trained.fields,
        "teacher": space.spec_record(space.teacher()),
        "targets": [t.describe() for t in targets],
        "latency_sources": predictor.describe(),
        **pareto_fields(setup, measurer, precision, records, candidates),
        "skipped_degenerate": skipped_trials(storage, space.study_name),
        "prior": prior_record,
    }
    return finish_search(
        output,
        pareto,
        records,
        trained.losses,
        sp.strategy,
        supernet_seconds=supernet_seconds,
        search_seconds=search_seconds,
        unique_subnets=len(evaluator.cache),
        tags={"space": space.name},
    )


def pareto_fields(
    setup: dict[str, Any],
    measurer: Any,
    precision: str,
    records: list[dict[str, Any]],
    candidates: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``pareto.json`` fields of the study: objectives, constraints, candidates, front."""
    objectives = setup["objectives"]
    return {
        "objectives": objectives,
        "objective_kinds": {n: column_kind(n) for n in objectives},
        "metric_sources": measurer.sources(),
        "precision": precision,
        "constraints": [c.as_dict() for c in setup["constraints"]],
        "notes": setup["notes"],
        "feasible_trials": sum(1 for r in records if r["feasible"]),
        "candidates": [{"id": f"cand-{i}", **c} for i, c in enumerate(candidates)],
        "front": [r for r in records if r["rank"] == 0],
        "energy": "per target, see metric_sources (measured where a meter is readable, else estimated)",
    }


def finish_search(
    output: Path,
    pareto: dict[str, Any],
    records: list[dict[str, Any]],
    losses: Any,
    strategy: str,
    *,
    supernet_seconds: float,
    search_seconds: float,
    unique_subnets: int,
    tags: dict[str, str] | None = None,
) -> StageResult:
    """Write ``pareto.json`` and ``history.json`` and summarize the search."""
    SearchResult.from_dict(pareto).write(output)
    SearchHistory(trials=records, supernet_loss=losses, strategy=strategy).write(output)
    best = min(records, key=lambda r: r["objectives"]["val_error"])
    print(
        f"  Pareto front: {len(pareto['front'])} subnets; {len(pareto['candidates'])} candidates",
        flush=True,
    )
    return StageResult(
        metrics={
            "supernet_seconds": supernet_seconds,
            "search_seconds": search_seconds,
            "trials": len(records),
            "unique_subnets": unique_subnets,
            "front_size": len(pareto["front"]),
            "candidates": len(pareto["candidates"]),
            "best_val_accuracy": 1.0 - best["objectives"]["val_error"],
        },
        tags={"strategy": strategy, "best_arch_str": best["arch_str"], **(tags or {})},
        model_dir=output,
        artifacts=[output / PARETO_JSON, output / HISTORY_JSON],
    )
