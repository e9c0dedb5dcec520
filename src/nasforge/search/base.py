"""Common base of nasforge's own architecture samplers, constraints and validity.

A nasforge strategy is an :class:`optuna.samplers.BaseSampler` that proposes categorical
parameters jointly (for a NAS-Bench-201 cell: ``edge0`` .. ``edge5`` with choices
:data:`nasforge.space.nb201.OPS`). It keeps no state that the study does not hold: every proposal
is computed from the study's trials, so a study resumed from its storage (SQLite locally, an RDB
shared by workers on a cluster) continues where it stopped, and parallel workers see each other's
trials.

Numerical parameters (``FloatDistribution``, ``IntDistribution``, e.g. a learning rate next to
the cell) are not part of the joint proposal: they are sampled independently by Optuna's
univariate TPE (so they are still learned from the trials), whether Optuna asks for them through
``sample_independent`` or passes them in a relative search space. Categorical parameters outside
the joint space (conditional ones) are sampled the same way.

Constraints follow Optuna's convention: ``constraints_func(trial) -> Sequence[float]``, a value
``<= 0`` is satisfied; the sampler evaluates it in ``after_trial`` and stores the values under
Optuna's constraints system attribute, so ``FrozenTrial.constraints`` (and Optuna's own samplers
and plots) see them. Constraints set by the objective through ``Trial.set_constraint`` are read
the same way.

``is_valid(params) -> bool`` marks points that must never be evaluated (a NAS-Bench-201 cell
without an input-to-output path): nasforge's samplers never propose them; for Optuna's samplers,
which cannot be told, :func:`ask_valid` asks again instead.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial, TrialState

from nasforge.errors import ConfigError

SearchSpace = Mapping[str, Sequence[str]]
Prior = Mapping[str, Mapping[str, float]]
ConstraintsFunc = Callable[[FrozenTrial], Sequence[float]]
IsValid = Callable[[Mapping[str, Any]], bool]

#: User attribute :func:`ask_valid` sets on a proposal it rejected (told PRUNED, never evaluated).
INVALID_ATTR = "nasforge_invalid"
#: Proposals :class:`ArchSampler` may reject through ``is_valid`` before it gives up.
MAX_INVALID_PROPOSALS = 1000
_LARGE = 1e100  # stands in for an infinite objective value in the samplers' arithmetic


def check_constraint_values(values: Any, trial_number: int, expected: int | None = None) -> tuple:
    """Validate what a ``constraints_func`` returned for one trial.

    Args:
        values: the returned value; must be a sequence of real numbers, none NaN.
        trial_number: the trial's number (for the message).
        expected: the number of constraints other trials of the study have, if known.

    Returns:
        The values as a tuple of floats.

    Raises:
        ConfigError: not a sequence of numbers, a NaN, or a length other than ``expected``.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise ConfigError(
            f"constraints_func must return a sequence of floats, got {type(values).__name__} "
            f"for trial {trial_number}"
        )
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(
            f"constraints_func returned non-numeric values {list(values)!r} for trial "
            f"{trial_number}"
        ) from None
    if any(math.isnan(v) for v in out):
        raise ConfigError(
            f"constraints_func returned NaN for trial {trial_number}: {list(out)} (a constraint "
            "must be a number, <= 0 when satisfied)"
        )
    if expected is not None and len(out) != expected:
        raise ConfigError(
            f"constraints_func returned {len(out)} values for trial {trial_number}, but "
            f"{expected} for earlier trials (the number of constraints must not change)"
        )
    return out


def checked_constraints_func(fn: ConstraintsFunc) -> ConstraintsFunc:
    """Wrap ``fn`` so that a NaN, a non-numeric value or a change of length is a clear
    :class:`ConfigError` (as nasforge's samplers check it) rather than Optuna's bare error.

    The length is checked against the earlier calls of this wrapper.
    """
    lock = threading.Lock()
    seen: list[int] = []

    def wrapped(trial: FrozenTrial) -> Sequence[float]:
        with lock:
            out = check_constraint_values(fn(trial), trial.number, seen[0] if seen else None)
            if not seen:
                seen.append(len(out))
        return out

    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapped


def study_constraint_count(study: Study, exclude: int | None = None) -> int | None:
    """Number of constraints stored on the study's COMPLETE trials (None if none has any)."""
    for t in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True):
        if t.number == exclude:
            continue
        con = t.system_attrs.get(_CONSTRAINTS_KEY)
        if con is not None:
            return len(con)
    return None


def process_constraints(
    constraints_func: ConstraintsFunc, study: Study, trial: FrozenTrial, state: TrialState
) -> None:
    """Evaluate and store a trial's constraints as Optuna's samplers do (``after_trial``).

    Called for COMPLETE and PRUNED trials (Optuna's convention), except for proposals
    :func:`ask_valid` rejected (they were never evaluated). The values are stored under Optuna's
    constraints system attribute, so ``FrozenTrial.constraints`` returns them. The number of
    values is checked for COMPLETE trials against the other COMPLETE trials (a PRUNED trial may
    have none: it was stopped before it was measured).

    Raises:
        ConfigError: see :func:`check_constraint_values`.
    """
    if state not in (TrialState.COMPLETE, TrialState.PRUNED):
        return
    if trial.user_attrs.get(INVALID_ATTR):
        return
    expected = study_constraint_count(study, trial.number) if state == TrialState.COMPLETE else None
    values = check_constraint_values(constraints_func(trial), trial.number, expected)
    study._storage.set_trial_system_attr(trial._trial_id, _CONSTRAINTS_KEY, values)


REPAIRED_ATTR = "nasforge_repaired"
"""User attribute of a trial :func:`ask_valid` drew at random after the strategy kept proposing
invalid points (its value: the number of invalid proposals in a row before it)."""


def random_valid_params(
    distributions: Mapping[str, BaseDistribution],
    is_valid: IsValid,
    seed: int,
    max_tries: int = 2_000,
) -> dict[str, Any]:
    """A point drawn uniformly from ``distributions`` (Optuna's RandomSampler) that is valid.

    Raises:
        ConfigError: No valid point in ``max_tries`` draws.
    """
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(max_tries):
        params = scratch.ask(dict(distributions)).params
        if is_valid(params):
            return params
    raise ConfigError(
        f"no valid point in {max_tries} uniform draws; is_valid may reject everything"
    )


def ask_valid(
    study: Study,
    distributions: Mapping[str, BaseDistribution],
    is_valid: IsValid,
    max_tries: int = 500,
    repair_after: int = 3,
    before_ask: Callable[[], None] | None = None,
    skip_attrs: Mapping[str, Any] | None = None,
) -> optuna.Trial:
    """Ask ``study`` for a trial whose parameters satisfy ``is_valid``, for any sampler.

    Optuna's samplers cannot be told which points are valid (e.g. that a NAS-Bench-201 cell
    needs an input-to-output path), so each invalid proposal is recorded and the sampler asked
    again. A rejected proposal is told ``TrialState.PRUNED``, with the user attribute
    :data:`INVALID_ATTR` set (plus ``skip_attrs``), and is never evaluated:

    * it does not count as an evaluation (not COMPLETE: budgets count COMPLETE trials);
    * the samplers learn from it where they can: TPE ranks pruned trials below every complete
      one (so it moves away from invalid regions), nasforge's samplers never propose a point
      twice, NSGA-II and GP ignore it. FAIL would also be ignored by all of them, but would read
      as a crash in logs and dashboards; PRUNED says "stopped before it was worth evaluating".

    A sampler that ignores the rejection and is deterministic given the study (Optuna's
    GPSampler optimizes its acquisition function from the same trials every time) proposes the
    same invalid point forever. So after ``repair_after`` invalid proposals in a row the next
    trial is a uniformly random valid point (a repair step, seeded by the study's trial count,
    so a resumed search repeats it), enqueued into the study and tagged :data:`REPAIRED_ATTR`;
    the strategy then continues from a study that has one more informative trial.

    Optuna's samplers with a ``constraints_func`` call it on PRUNED trials too, so it must cope
    with a trial that has no results (e.g. return ``[]`` or look the values up by params);
    nasforge's samplers skip rejected proposals.

    Args:
        study: the study.
        distributions: all parameters of the trial (``study.ask``'s ``fixed_distributions``),
            so that the whole point is known before it is checked.
        is_valid: ``params -> bool``.
        max_tries: proposals asked at most, this call.
        repair_after: invalid proposals in a row before a random valid point is asked
            (0: never).
        before_ask: called before every ``study.ask`` (e.g. to reseed the sampler).
        skip_attrs: more user attributes for a rejected proposal (e.g. why it was skipped).

    Returns:
        A RUNNING trial with valid parameters; evaluate it and ``study.tell`` it as usual.

    Raises:
        ConfigError: ``max_tries`` proposals in a row were invalid (the message says how many
            invalid proposals the study holds).
    """
    if max_tries < 1:
        raise ConfigError(f"max_tries must be >= 1, got {max_tries}")
    invalid = 0
    for tries in range(max_tries):
        repair = 0 < repair_after <= tries
        if repair:
            seed = len(study._get_trials(deepcopy=False, use_cache=False))
            try:
                params = random_valid_params(distributions, is_valid, seed)
            except ConfigError:
                break  # nothing valid to repair with: the error below says so
            study.enqueue_trial(params)
        if before_ask is not None:
            before_ask()
        trial = study.ask(dict(distributions))
        if is_valid(trial.params):
            if repair:
                trial.set_user_attr(REPAIRED_ATTR, tries)
            return trial
        invalid += 1
        trial.set_user_attr(INVALID_ATTR, True)
        for key, value in (skip_attrs or {}).items():
            trial.set_user_attr(key, value)
        study.tell(trial, state=TrialState.PRUNED)
    total = sum(
        1
        for t in study._get_trials(deepcopy=False, use_cache=False)
        if t.user_attrs.get(INVALID_ATTR)
    )
    raise ConfigError(
        f"the sampler proposed {invalid} invalid points in a row ({total} in the study); "
        "the valid part of the space may be too small for it, or is_valid rejects everything"
    )


def validate_prior(prior: Prior | None, space: SearchSpace | None) -> dict[str, np.ndarray] | None:
    """Check an op-probability prior and turn it into normalized arrays aligned with ``space``.

    Args:
        prior: ``{param: {choice: weight}}``; weights non-negative, at least one positive per
            param; choices missing from a param's dict get weight 0. Params absent from the
            prior are uniform.
        space: the search space the prior refers to (required when a prior is given).

    Returns:
        ``{param: probabilities in the order of space[param]}`` or None.

    Raises:
        ConfigError: on unknown params/choices, negative or all-zero weights, or no space.
    """
    if prior is None:
        return None
    if space is None:
        raise ConfigError("a prior needs an explicit search_space")
    out: dict[str, np.ndarray] = {}
    for name, choices in space.items():
        weights = prior.get(name)
        if weights is None:
            out[name] = np.full(len(choices), 1.0 / len(choices))
            continue
        unknown = set(weights) - set(choices)
        if unknown:
            raise ConfigError(f"prior for {name!r} names unknown choices {sorted(unknown)}")
        p = np.array([float(weights.get(c, 0.0)) for c in choices])
        if np.any(~np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ConfigError(f"prior for {name!r} needs finite non-negative weights, sum > 0")
        out[name] = p / p.sum()
    extra = set(prior) - set(space)
    if extra:
        raise ConfigError(f"prior names parameters not in the search space: {sorted(extra)}")
    return out


class ArchSampler(BaseSampler):
    """Base class: joint categorical proposals, trials as index arrays, losses, constraints.

    Subclasses implement :meth:`propose`, which returns one choice index per parameter.

    Args:
        seed: random seed.
        search_space: ``{param: choices}``; if None, the study's intersection search space of
            categorical parameters is used (known after the first trial).
        prior: optional op-probability prior, see :func:`validate_prior`.
        constraints_func: Optuna's ``constraints_func`` (``<= 0`` satisfied), evaluated in
            :meth:`after_trial`; ranking uses Deb's constrained domination.
        is_valid: ``params -> bool`` on the jointly proposed parameters; a point it rejects is
            never proposed. Needs ``search_space`` (otherwise the first trial's parameters are
            sampled independently, unchecked). Must be deterministic.
    """

    def __init__(
        self,
        seed: int | None = None,
        search_space: SearchSpace | None = None,
        prior: Prior | None = None,
        *,
        constraints_func: ConstraintsFunc | None = None,
        is_valid: IsValid | None = None,
    ) -> None:
        if search_space is not None:
            if not search_space:
                raise ConfigError("search_space must name at least one parameter")
            for name, choices in search_space.items():
                if len(choices) < 1 or len(set(choices)) != len(choices):
                    raise ConfigError(f"parameter {name!r} needs distinct choices, got {choices}")
        if is_valid is not None and search_space is None:
            raise ConfigError("is_valid needs an explicit search_space")
        if constraints_func is not None and not callable(constraints_func):
            raise ConfigError("constraints_func must be callable: FrozenTrial -> [float, ...]")
        if is_valid is not None and not callable(is_valid):
            raise ConfigError("is_valid must be callable: params -> bool")
        self._space = {k: list(v) for k, v in search_space.items()} if search_space else None
        self._prior = validate_prior(prior, self._space)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._independent = TPESampler(seed=seed)
        self._intersection = IntersectionSearchSpace()
        self._constraints_func = constraints_func
        self._is_valid = is_valid

    def reseed_rng(self) -> None:
        """Reseed (Optuna calls this in forked workers so they do not repeat each other)."""
        self._rng = np.random.default_rng()
        self._independent.reseed_rng()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """The categorical parameters this sampler proposes jointly."""
        if self._space is not None:
            return {n: CategoricalDistribution(c) for n, c in self._space.items()}
        return {
            n: d
            for n, d in self._intersection.calculate(study).items()
            if isinstance(d, CategoricalDistribution)
        }

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """Propose the categorical parameters of ``trial`` jointly; numerical ones independently."""
        if not search_space:
            return {}
        out: dict[str, Any] = {}
        cat: dict[str, CategoricalDistribution] = {}
        for n, d in search_space.items():
            if isinstance(d, CategoricalDistribution):
                cat[n] = d
            else:  # numerical: no joint model, fall back to independent sampling
                out[n] = self._independent.sample_independent(study, trial, n, d)
        if cat:
            out.update(self._propose_valid(study, trial, cat))
        return out

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """Parameters outside the joint space (numerical, conditional) go to univariate TPE."""
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:  # noqa: D102
        self._independent.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        """Evaluate and store the trial's constraints (see :func:`process_constraints`)."""
        if self._constraints_func is not None:
            process_constraints(self._constraints_func, study, trial, state)
        self._independent.after_trial(study, trial, state, values)

    def _propose_valid(
        self, study: Study, trial: FrozenTrial, space: Mapping[str, CategoricalDistribution]
    ) -> dict[str, Any]:
        names = list(space)
        choices = [list(space[n].choices) for n in names]
        done, losses, taken, cons = self._history(study, trial, names, choices)
        prior = self._prior_arrays(names, choices)
        for _ in range(MAX_INVALID_PROPOSALS):
            idx = self.propose(names, choices, done, losses, taken, prior, cons)
            params = {
                n: choices[k][int(i)] for k, (n, i) in enumerate(zip(names, idx, strict=True))
            }
            if self._is_valid is None or self._is_valid(params):
                return params
            taken.add(tuple(int(v) for v in idx))  # never again, this call
        for _ in range(100 * MAX_INVALID_PROPOSALS):  # the strategy is stuck: plain random
            idx = self._random_index(choices, None)
            params = {
                n: choices[k][int(i)] for k, (n, i) in enumerate(zip(names, idx, strict=True))
            }
            if self._is_valid(params):  # type: ignore[misc]
                return params
        raise ConfigError(
            f"{type(self).__name__} found no point that is_valid accepts in "
            f"{101 * MAX_INVALID_PROPOSALS} proposals; is_valid may reject the whole space"
        )

    # -- helpers for subclasses -------------------------------------------------------------

    def propose(
        self,
        names: list[str],
        choices: list[list[Any]],
        done: np.ndarray,
        losses: np.ndarray,
        taken: set[tuple[int, ...]],
        prior: list[np.ndarray] | None,
        constraints: np.ndarray,
    ) -> np.ndarray:
        """Return one choice index per parameter.

        Args:
            names: parameter names.
            choices: choices per parameter.
            done: ``(n, d)`` choice indices of completed trials.
            losses: ``(n, m)`` their losses (lower is better in every column; infinite values
                replaced by a large finite number).
            taken: index tuples already completed, running, failed or pruned, or rejected by
                ``is_valid`` (avoid them).
            prior: per-parameter choice probabilities, or None.
            constraints: ``(n, k)`` constraint values of the completed trials (``<= 0``
                satisfied; NaN where a trial has none); ``k = 0`` without constraints.
        """
        raise NotImplementedError

    def _valid_mask(
        self, names: list[str], choices: list[list[Any]], idx: np.ndarray
    ) -> np.ndarray:
        """``is_valid`` of each row of ``idx`` (all True without ``is_valid``)."""
        if self._is_valid is None:
            return np.ones(len(idx), dtype=bool)
        return np.array(
            [
                bool(self._is_valid({n: choices[k][int(row[k])] for k, n in enumerate(names)}))
                for row in idx
            ],
            dtype=bool,
        )

    def _prior_arrays(self, names: list[str], choices: list[list[Any]]) -> list[np.ndarray] | None:
        if self._prior is None:
            return None
        out = []
        for n, c in zip(names, choices, strict=True):
            p = self._prior.get(n)
            if p is None or len(p) != len(c) or list(c) != self._space[n]:  # type: ignore[index]
                out.append(np.full(len(c), 1.0 / len(c)))
            else:
                out.append(p)
        return out

    @staticmethod
    def _history(
        study: Study, trial: FrozenTrial, names: list[str], choices: list[list[Any]]
    ) -> tuple[np.ndarray, np.ndarray, set[tuple[int, ...]], np.ndarray]:
        lookup = [{c: i for i, c in enumerate(cs)} for cs in choices]
        signs = np.array(
            [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in study.directions], dtype=float
        )
        rows: list[tuple[int, ...]] = []
        vals: list[list[float]] = []
        cons: list[dict[str, float]] = []
        taken: set[tuple[int, ...]] = set()
        for t in study._get_trials(deepcopy=False, use_cache=True):
            if t.number == trial.number:
                continue
            try:
                key = tuple(lookup[k][t.params[n]] for k, n in enumerate(names))
            except (KeyError, TypeError):
                continue  # a trial from another space (or missing params): not comparable
            taken.add(key)
            if t.state == TrialState.COMPLETE and t.values is not None:
                rows.append(key)
                vals.append(list(t.values))
                cons.append(t.constraints)
        done = np.array(rows, dtype=int).reshape(-1, len(names))
        losses = np.array(vals, dtype=float).reshape(len(rows), len(signs)) * signs
        losses = np.nan_to_num(losses, nan=_LARGE, posinf=_LARGE, neginf=-_LARGE)
        keys = sorted({k for c in cons for k in c}, key=lambda k: (len(k), k))
        con = np.full((len(rows), len(keys)), np.nan)
        for i, c in enumerate(cons):
            for j, k in enumerate(keys):
                if k in c and c[k] is not None:
                    con[i, j] = float(c[k])
        return done, losses, taken, con

    def _random_index(self, choices: list[list[Any]], prior: list[np.ndarray] | None) -> np.ndarray:
        if prior is None:
            return np.array([self._rng.integers(len(c)) for c in choices])
        return np.array([self._rng.choice(len(p), p=p) for p in prior])

    def _fresh_random(
        self,
        choices: list[list[Any]],
        taken: set[tuple[int, ...]],
        prior: list[np.ndarray] | None,
        tries: int = 200,
    ) -> np.ndarray:
        """A random point not yet taken (falls back to a repeat once the space is exhausted)."""
        x = self._random_index(choices, prior)
        for _ in range(tries):
            if tuple(int(v) for v in x) not in taken:
                return x
            x = self._random_index(choices, None if _ % 2 else prior)
        return x


def violations(constraints: np.ndarray) -> np.ndarray | None:
    """Total violation per trial from :meth:`ArchSampler.propose`'s ``constraints`` (None: k=0)."""
    if constraints.ndim != 2 or constraints.shape[1] == 0:
        return None
    return np.clip(np.nan_to_num(constraints, nan=np.inf), 0.0, None).sum(axis=1)
