"""Common base of nasforge's own architecture samplers.

A nasforge strategy is an :class:`optuna.samplers.BaseSampler` over categorical parameters (for a
NAS-Bench-201 cell: ``edge0`` .. ``edge5`` with choices :data:`nasforge.space.nb201.OPS`). It keeps
no state that the study does not hold: every proposal is computed from the study's trials, so a
study resumed from its storage (SQLite locally, an RDB shared by workers on a cluster) continues
where it stopped, and parallel workers see each other's trials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nasforge.errors import ConfigError

SearchSpace = Mapping[str, Sequence[str]]
Prior = Mapping[str, Mapping[str, float]]


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
    """Base class: categorical search space, trials as index arrays, losses, duplicate checks.

    Subclasses implement :meth:`propose`, which returns one choice index per parameter.

    Args:
        seed: random seed.
        search_space: ``{param: choices}``; if None, the study's intersection search space of
            categorical parameters is used (known after the first trial).
        prior: optional op-probability prior, see :func:`validate_prior`.
    """

    def __init__(
        self,
        seed: int | None = None,
        search_space: SearchSpace | None = None,
        prior: Prior | None = None,
    ) -> None:
        if search_space is not None:
            if not search_space:
                raise ConfigError("search_space must name at least one parameter")
            for name, choices in search_space.items():
                if len(choices) < 1 or len(set(choices)) != len(choices):
                    raise ConfigError(f"parameter {name!r} needs distinct choices, got {choices}")
        self._space = {k: list(v) for k, v in search_space.items()} if search_space else None
        self._prior = validate_prior(prior, self._space)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._random = RandomSampler(seed=seed)
        self._intersection = IntersectionSearchSpace()

    def reseed_rng(self) -> None:
        """Reseed (Optuna calls this in forked workers so they do not repeat each other)."""
        self._rng = np.random.default_rng()
        self._random.reseed_rng()

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
        """Propose all categorical parameters of ``trial`` at once."""
        if not search_space:
            return {}
        names = list(search_space)
        choices = [list(search_space[n].choices) for n in names]  # type: ignore[attr-defined]
        done, losses, taken = self._history(study, trial, names, choices)
        prior = self._prior_arrays(names, choices)
        idx = self.propose(names, choices, done, losses, taken, prior)
        return {n: choices[k][int(i)] for k, (n, i) in enumerate(zip(names, idx, strict=True))}

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """Parameters outside the joint space (e.g. numeric ones) are sampled at random."""
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # -- helpers for subclasses -------------------------------------------------------------

    def propose(
        self,
        names: list[str],
        choices: list[list[Any]],
        done: np.ndarray,
        losses: np.ndarray,
        taken: set[tuple[int, ...]],
        prior: list[np.ndarray] | None,
    ) -> np.ndarray:
        """Return one choice index per parameter.

        Args:
            names: parameter names.
            choices: choices per parameter.
            done: ``(n, d)`` choice indices of completed trials.
            losses: ``(n, m)`` their losses (lower is better in every column).
            taken: index tuples already completed, running, failed or pruned (avoid repeats).
            prior: per-parameter choice probabilities, or None.
        """
        raise NotImplementedError

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
    ) -> tuple[np.ndarray, np.ndarray, set[tuple[int, ...]]]:
        lookup = [{c: i for i, c in enumerate(cs)} for cs in choices]
        signs = np.array(
            [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in study.directions], dtype=float
        )
        rows: list[tuple[int, ...]] = []
        vals: list[list[float]] = []
        taken: set[tuple[int, ...]] = set()
        for t in study._get_trials(deepcopy=False, use_cache=True):
            if t.number == trial.number:
                continue
            try:
                key = tuple(lookup[k][t.params[n]] for k, n in enumerate(names))
            except KeyError:
                continue  # a trial from another space (or missing params): not comparable
            taken.add(key)
            if t.state == TrialState.COMPLETE and t.values is not None:
                rows.append(key)
                vals.append(list(t.values))
        done = np.array(rows, dtype=int).reshape(-1, len(names))
        losses = np.array(vals, dtype=float).reshape(len(rows), len(signs)) * signs
        return done, losses, taken

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
