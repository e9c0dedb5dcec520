"""The one search driver: an Optuna study, asked and told, resumed, and its candidates chosen.

Every search nasforge runs goes through here: the pipeline's search stage for every space
(:func:`search_subnets`, over a :class:`~nasforge.space.base.SearchSpace`), and the tabular
benchmark (:func:`nasforge.search.tabular.search_table`, ``nasforge bench-search``). The pieces:

* :func:`open_study` creates or loads the study and closes the trials a killed process left
  RUNNING (marked FAIL: never counted, never waited for, proposed again if still worth it);
* :func:`drive` is the ask/tell loop: it asks the strategy until ``trials`` are COMPLETE, through
  :func:`nasforge.search.base.ask_valid` when some points are invalid (never evaluated, told
  PRUNED, a stuck strategy repaired with a random valid point), evaluates, and tells;
* :func:`run_study` is the pipeline's study: every measured metric and every constraint's
  violation are kept on the trial (user attributes), so the samplers see the constraints through
  Optuna's ``constraints_func`` and a resumed study rebuilds its records without evaluating
  anything again; each proposal's sampler is seeded by the proposals so far, so a resumed search
  proposes what an uninterrupted one would have;
* :func:`select_candidates` picks the candidates among the feasible trials.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from nasforge.errors import ConfigError
from nasforge.progress import step as progress_step
from nasforge.search.base import INVALID_ATTR, IsValid, ask_valid
from nasforge.search.objectives import Constraint, check_feasible, explain_infeasible
from nasforge.search.pareto import non_domination_rank

METRICS_ATTR = "nasforge_metrics"
CONSTRAINTS_ATTR = "nasforge_constraints"
SKIPPED_ATTR = "nasforge_skipped"
MAX_INVALID_IN_A_ROW = 500


def open_study(
    *,
    storage: str | optuna.storages.BaseStorage | None,
    study_name: str | None,
    directions: Sequence[str],
    sampler: optuna.samplers.BaseSampler,
    fail_running: bool = True,
    progress: Callable[[str], None] | None = None,
) -> optuna.Study:
    """Create the study, or load it from ``storage`` to resume it.

    Args:
        storage: Optuna storage (URL such as ``sqlite:///study.db`` or object); None: memory.
        study_name: Study name in the storage (needed to resume).
        directions: ``"minimize"`` / ``"maximize"`` per objective.
        sampler: The strategy.
        fail_running: Mark trials left RUNNING FAIL. A local study has one owner, so a RUNNING
            trial was being evaluated when its process died; set False when other workers share
            the storage (their trials are running, not stale).
        progress: Told how many finished trials a resumed study keeps.
    """
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        directions=list(directions),
        sampler=sampler,
        load_if_exists=True,
    )
    if fail_running:
        finished = 0
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                study.tell(t.number, state=TrialState.FAIL)
            elif t.state == TrialState.COMPLETE:
                finished += 1
        if finished and progress is not None:
            progress(f"resumed the search: {finished} finished trials kept")
    return study


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's COMPLETE trials, in trial order."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def drive(
    study: optuna.Study,
    distributions: Mapping[str, optuna.distributions.BaseDistribution],
    evaluate: Callable[[optuna.Trial], Sequence[float] | None],
    trials: int,
    *,
    is_valid: IsValid | None = None,
    before_ask: Callable[[], None] | None = None,
    skip_attrs: Mapping[str, Any] | None = None,
    max_invalid_in_a_row: int = MAX_INVALID_IN_A_ROW,
    max_evaluations: int | None = None,
    on_complete: Callable[[optuna.Trial, int], None] | None = None,
    stuck_message: str | None = None,
) -> None:
    """Ask, evaluate and tell until the study holds ``trials`` COMPLETE trials.

    Args:
        study: The study (see :func:`open_study`).
        distributions: Every parameter of a trial.
        evaluate: ``trial -> objective values``; None tells the trial PRUNED (e.g. a point a
            table has no row for), which does not count toward ``trials``.
        trials: COMPLETE trials wanted.
        is_valid: ``params -> bool``; a point it rejects is never evaluated
            (:func:`~nasforge.search.base.ask_valid`).
        before_ask: Called before every ``study.ask`` (e.g. to reseed the sampler).
        skip_attrs: More user attributes of a rejected point (why it was skipped).
        max_invalid_in_a_row: Invalid proposals in a row before
            :func:`~nasforge.search.base.ask_valid` gives up (ConfigError).
        max_evaluations: Stop once this many trials (of all time, invalid proposals not
            counted) were evaluated, even short of ``trials``: a guard for problems where many
            points evaluate to PRUNED.
        on_complete: ``(trial, completed so far)`` after each COMPLETE trial.
        stuck_message: The error when ``max_invalid_in_a_row`` proposals in a row were invalid
            (default: :func:`~nasforge.search.base.ask_valid`'s).

    Raises:
        ConfigError: The strategy proposed ``max_invalid_in_a_row`` invalid points in a row.
    """
    evaluated = 0
    if max_evaluations is not None:
        evaluated = len([t for t in study.trials if not t.user_attrs.get(INVALID_ATTR)])
    while len(completed_trials(study)) < trials:
        if max_evaluations is not None and evaluated >= max_evaluations:
            return
        if is_valid is None:
            if before_ask is not None:
                before_ask()
            trial = study.ask(dict(distributions))
        else:
            try:
                trial = ask_valid(
                    study,
                    distributions,
                    is_valid,
                    max_tries=max_invalid_in_a_row,
                    before_ask=before_ask,
                    skip_attrs=skip_attrs,
                )
            except ConfigError:
                if stuck_message is None:
                    raise
                raise ConfigError(stuck_message) from None
        evaluated += 1
        values = evaluate(trial)
        if values is None:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        study.tell(trial, [float(v) for v in values])
        if on_complete is not None:
            on_complete(trial, len(completed_trials(study)))


def _constraints_func(trial: FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get(CONSTRAINTS_ATTR, [])


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
    is_valid: IsValid | None = None,
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
    study = open_study(
        storage=storage,
        study_name=study_name,
        directions=["minimize"] * len(objectives),
        sampler=sampler(0),
        progress=lambda msg: print(f"  {msg}", flush=True),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives))
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

    last: dict[str, float] = {}

    def score(trial: optuna.Trial) -> list[float]:
        metrics = evaluate(trial.params)
        last.clear()
        last.update(metrics)
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
        return values

    def told(trial: optuna.Trial, done: int) -> None:
        progress_step("search trial", done, trials, echo=False)
        if progress and (done % every == 0 or done == trials):
            name = describe(trial.params).get("arch_str", trial.number)
            err = last.get("val_error", math.nan)
            progress(f"search trial {done}/{trials}: {name} err={err:.3f}")

    drive(
        study,
        distributions,
        score,
        trials,
        is_valid=is_valid,
        before_ask=reseed,
        skip_attrs={SKIPPED_ATTR: "degenerate: no input-to-output path"},
        on_complete=told,
        stuck_message=(
            f"strategy {strategy!r} proposed {MAX_INVALID_IN_A_ROW} degenerate architectures in "
            "a row; the space may have too few valid ones"
        ),
    )
    records = []
    for t in completed_trials(study):
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


def search_subnets(
    evaluator: Any,
    *,
    strategy: str,
    trials: int,
    seed: int,
    storage: str | None = None,
    study_name: str | None = None,
    objectives: Sequence[str] | None = None,
    constraints: Sequence[Constraint] = (),
    prior: Any = None,
    sampler_options: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) :func:`run_study` over the subnets of a search space.

    The space (``evaluator.space``, a :class:`~nasforge.space.base.SearchSpace`) supplies the
    distributions, the choices for nasforge's samplers, the validity check, the teacher
    (evaluated first) and each record's architecture fields (:meth:`spec_record`).

    Args:
        evaluator: Has ``space`` and ``evaluate(spec) -> {metric: value}`` (e.g. a
            :class:`~nasforge.search.subnet_metrics.SubnetEvaluator`), and
            ``objective_names()`` when ``objectives`` is not given.
        strategy: A name from :data:`nasforge.search.samplers.STRATEGIES`.
        trials: Completed trials wanted.
        seed: Sampler seed.
        storage: Optuna storage URL (None: in memory); with it a killed search resumes.
        study_name: Study name inside ``storage`` (default: the space's).
        objectives: Study columns (default: ``evaluator.objective_names()``).
        constraints: Constraints on the evaluator's metrics.
        prior: Op-probability prior for the strategies that take one.
        sampler_options: The strategy's own settings.
        progress: One-line progress callback.

    Returns:
        The records of :func:`run_study`.
    """
    space = evaluator.space
    names = list(objectives) if objectives is not None else list(evaluator.objective_names())
    spec_of = space.spec_from_params
    return run_study(
        lambda p: evaluator.evaluate(spec_of(p)),
        objectives=names,
        distributions=space.distributions(),
        strategy=strategy,
        seed=seed,
        trials=trials,
        storage=storage,
        study_name=study_name or space.study_name,
        constraints=constraints,
        is_valid=space.validity(),
        search_space=space.choices(),
        prior=prior,
        sampler_options=sampler_options,
        # The largest subnet is the distillation teacher; evaluating it first anchors the front.
        first=space.spec_to_params(space.teacher()),
        describe=lambda p: space.spec_record(spec_of(p)),
        progress=progress,
    )


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
