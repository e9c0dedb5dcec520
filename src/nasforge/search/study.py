"""The pipeline's subnet search loop, for every space: one Optuna ask/tell study.

:func:`run_study` asks the strategy (:func:`nasforge.search.samplers.make_sampler`, the code the
tabular benchmark runs) for architectures, never evaluates a degenerate one (``is_valid``), scores
the rest with ``evaluate`` and tells the study the objective columns; every measured metric and
every constraint's violation are kept on the trial (user attributes), so the samplers see the
constraints through Optuna's ``constraints_func`` and a resumed study rebuilds its records without
evaluating anything again. :func:`select_candidates` then picks the candidates among the
feasible trials.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from nasforge.errors import ConfigError
from nasforge.progress import step as progress_step
from nasforge.search.base import ask_valid
from nasforge.search.objectives import Constraint, check_feasible, column_kind, explain_infeasible
from nasforge.search.pareto import non_domination_rank
from nasforge.stages import StageResult

METRICS_ATTR = "nasforge_metrics"
CONSTRAINTS_ATTR = "nasforge_constraints"
SKIPPED_ATTR = "nasforge_skipped"
MAX_INVALID_IN_A_ROW = 500


def _constraints_func(trial: FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get(CONSTRAINTS_ATTR, [])


def resume_study(study: optuna.Study) -> int:
    """Prepare a study that a killed search left behind; returns its finished trials.

    A trial still RUNNING was being evaluated when the process died (one process owns a local
    study): it is marked FAIL so it is neither counted nor waited for, and its architecture is
    proposed again by the sampler if it is still worth it.
    """
    finished = 0
    for t in study.trials:
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        elif t.state == TrialState.COMPLETE:
            finished += 1
    if finished:
        print(f"  resumed the search: {finished} finished trials kept", flush=True)
    return finished


def run_study(
    evaluate: Callable[[Mapping[str, Any]], dict[str, float]],
    *,
    objectives: Sequence[str],
    distributions: Mapping[str, optuna.distributions.BaseDistribution],
    strategy: str,
    seed: int,
    trials: int,
    storage: str | None,
    study_name: str,
    constraints: Sequence[Constraint] = (),
    is_valid: Callable[[Mapping[str, Any]], bool] | None = None,
    search_space: Mapping[str, Sequence[Any]] | None = None,
    prior: Any = None,
    sampler_options: Mapping[str, Any] | None = None,
    first: Mapping[str, Any] | None = None,
    describe: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda p: {},
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a multi-objective, constrained search until ``trials`` are complete.

    Args:
        evaluate: ``params -> {metric: value}``; must hold every objective column and every
            constraint's metric.
        objectives: Study columns, all minimised.
        distributions: The architecture parameters.
        strategy: A name from :data:`nasforge.search.samplers.STRATEGIES`.
        seed: Base seed; each trial's sampler is seeded with ``seed + proposals so far`` so a
            resumed search proposes what an uninterrupted one would have.
        trials: Completed (evaluated) trials wanted.
        storage: Optuna storage URL (None: in memory).
        study_name: Study name inside ``storage``.
        constraints: Constraints on the metrics (Optuna's ``constraints_func`` convention).
        is_valid: ``params -> bool``; a proposal it rejects is never evaluated (told PRUNED,
            with the reason kept) and does not count as a trial.
        search_space: ``{param: choices}`` for nasforge's samplers.
        prior: Op-probability prior for the strategies that take one.
        sampler_options: The strategy's own settings (validated by ``make_sampler``).
        first: Parameters evaluated first in a new study (e.g. the distillation teacher).
        describe: ``params -> fields`` added to each record (``arch_str``, ``ops``, ``spec``).
        progress: One-line progress callback.

    Returns:
        One record per completed trial, in trial order: ``trial``, the ``describe`` fields,
        ``objectives``, ``metrics``, ``feasible``, ``violations``.

    Raises:
        ConfigError: A bad strategy or options, or ``is_valid`` rejected
            :data:`MAX_INVALID_IN_A_ROW` proposals in a row.
    """
    from nasforge.search.samplers import make_sampler

    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    constraints_func = _constraints_func if constraints else None

    def sampler(k: int) -> optuna.samplers.BaseSampler:
        return make_sampler(
            strategy,
            seed + k,
            search_space=search_space,
            prior=prior,
            constraints_func=constraints_func,
            is_valid=is_valid,
            options=dict(sampler_options or {}),
        )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        directions=["minimize"] * len(objectives),
        sampler=sampler(0),
        load_if_exists=True,
    )
    resume_study(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives))

    def completed() -> list[FrozenTrial]:
        return [t for t in study.trials if t.state == TrialState.COMPLETE]

    done = completed()
    if first is not None and not study.trials:
        study.enqueue_trial(dict(first))
    every = max(1, trials // 5)

    def reseed() -> None:
        # A fresh sampler per proposal: the strategies keep their state in the study, not in
        # the sampler, so proposals depend only on the study's trials (resumption is exact).
        # Seeded by the proposals so far (evaluated or skipped as degenerate, not the trials a
        # kill cut short): a skipped proposal must not be proposed again by the same seed.
        asked = sum(1 for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
        study.sampler = sampler(asked)

    while len(done) < trials:
        if is_valid is None:
            reseed()
            trial = study.ask(dict(distributions))
        else:
            try:
                trial = ask_valid(
                    study,
                    distributions,
                    is_valid,
                    max_tries=MAX_INVALID_IN_A_ROW,
                    before_ask=reseed,
                    skip_attrs={SKIPPED_ATTR: "degenerate: no input-to-output path"},
                )
            except ConfigError:
                raise ConfigError(
                    f"strategy {strategy!r} proposed {MAX_INVALID_IN_A_ROW} degenerate "
                    "architectures in a row; the space may have too few valid ones"
                ) from None
        metrics = evaluate(trial.params)
        missing = [n for n in objectives if n not in metrics]
        if missing:
            raise ConfigError(f"the evaluation measured no {missing[0]!r}")
        trial.set_user_attr(METRICS_ATTR, {k: float(v) for k, v in metrics.items()})
        if constraints:
            trial.set_user_attr(CONSTRAINTS_ATTR, [c.violation(metrics) for c in constraints])
        values = [float(metrics[n]) for n in objectives]
        if not all(math.isfinite(v) for v in values):
            bad = objectives[[math.isfinite(v) for v in values].index(False)]
            raise ConfigError(f"objective {bad!r} is not finite for {describe(trial.params)}")
        study.tell(trial, values)
        done = completed()
        progress_step("search trial", len(done), trials, echo=False)
        if progress and (len(done) % every == 0 or len(done) == trials):
            name = describe(trial.params).get("arch_str", trial.number)
            progress(
                f"search trial {len(done)}/{trials}: {name} err={metrics.get('val_error', math.nan):.3f}"
            )
    records = []
    for t in done:
        metrics = dict(
            t.user_attrs.get(METRICS_ATTR) or dict(zip(objectives, t.values, strict=True))
        )
        feasible, violations = check_feasible(metrics, constraints)
        records.append(
            {
                "trial": t.number,
                **describe(t.params),
                "objectives": dict(zip(objectives, t.values, strict=True)),
                "metrics": metrics,
                "feasible": feasible,
                "violations": violations,
            }
        )
    return records


def skipped_trials(storage: str, study_name: str) -> int:
    """How many proposals the study skipped as degenerate."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    return sum(1 for t in study.trials if SKIPPED_ATTR in t.user_attrs)


def select_candidates(
    records: list[dict[str, Any]],
    names: Sequence[str],
    k: int,
    accuracy_window: float = 1.0,
    constraints: Sequence[Constraint] = (),
) -> list[dict[str, Any]]:
    """Pick up to ``k`` candidates among the feasible trials: the first non-dominated front,
    spread over accuracy, then the next fronts if the first is smaller than ``k``. Each record
    gets its ``rank`` (over all trials; feasible ones first, as in constrained domination).

    Only subnets within ``accuracy_window`` of the best feasible validation accuracy are picked
    (the same region of interest as the tabular benchmark's metric).

    Raises:
        ConfigError: No trials, or none feasible (the message names the constraint that held
            everything back).
    """
    if not records:
        raise ConfigError("the search produced no trials")
    feasible = [r for r in records if r.get("feasible", True)]
    infeasible = [r for r in records if not r.get("feasible", True)]
    for group, offset in ((feasible, 0), (infeasible, None)):
        if not group:
            continue
        losses = np.array([[r["objectives"][n] for n in names] for r in group], dtype=float)
        ranks = non_domination_rank(losses)
        base = 0 if offset == 0 else (max((r["rank"] for r in feasible), default=-1) + 1)
        for r, rank in zip(group, ranks, strict=True):
            r["rank"] = int(rank) + base
    if not feasible:
        raise ConfigError(explain_infeasible(records, constraints))
    best_err = min(r["objectives"]["val_error"] for r in feasible)
    eligible = [
        r for r in feasible if r["objectives"]["val_error"] <= best_err + accuracy_window + 1e-12
    ]
    elig_losses = np.array([[r["objectives"][n] for n in names] for r in eligible], dtype=float)
    elig_ranks = non_domination_rank(elig_losses)
    chosen: list[dict[str, Any]] = []
    for rank in sorted(set(int(x) for x in elig_ranks)):
        front = sorted(
            (r for r, rk in zip(eligible, elig_ranks, strict=True) if rk == rank),
            key=lambda r: r["objectives"]["val_error"],
        )
        need = k - len(chosen)
        if need <= 0:
            break
        if len(front) <= need:
            chosen.extend(front)
        else:
            # Evenly spaced along the front, always keeping its most accurate member.
            idx = np.unique(np.round(np.linspace(0, len(front) - 1, need)).astype(int))
            chosen.extend(front[i] for i in idx)
    return chosen


def pareto_fields(
    setup: dict[str, Any],
    measurer: Any,
    precision: str,
    records: list[dict[str, Any]],
    candidates: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``pareto.json`` fields both spaces write the same way."""
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
    losses: list[float],
    strategy: str,
    *,
    supernet_seconds: float,
    search_seconds: float,
    unique_subnets: int,
    tags: dict[str, str] | None = None,
) -> StageResult:
    """Write ``pareto.json`` and ``history.json`` and summarize a search (either space)."""
    (output / "pareto.json").write_text(json.dumps(pareto, indent=2))
    (output / "history.json").write_text(
        json.dumps({"supernet_loss": losses, "trials": records, "strategy": strategy}, indent=2)
    )
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
        artifacts=[output / "pareto.json", output / "history.json"],
    )
