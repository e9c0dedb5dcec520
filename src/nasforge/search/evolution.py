"""Evolutionary strategies: multi-objective regularized evolution and progressive space shrinking."""

from __future__ import annotations

from typing import Any

import numpy as np

from nasforge.errors import ConfigError
from nasforge.search.base import (
    ArchSampler,
    ConstraintsFunc,
    IsValid,
    Prior,
    SearchSpace,
    violations,
)
from nasforge.search.pareto import constrained_rank


def mutate(
    rng: np.random.Generator,
    parent: np.ndarray,
    choices: list[list[Any]],
    prior: list[np.ndarray] | None,
    allowed: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Change one parameter of ``parent`` to another choice (prior-weighted, within ``allowed``)."""
    child = parent.copy()
    params = [k for k in range(len(choices)) if _options(k, parent, choices, allowed).size]
    if not params:
        return child
    k = int(rng.choice(params))
    opts = _options(k, parent, choices, allowed)
    if prior is not None:
        w = prior[k][opts] + 1e-3  # keep every option reachable even where the prior says 0
        child[k] = int(rng.choice(opts, p=w / w.sum()))
    else:
        child[k] = int(rng.choice(opts))
    return child


def _options(
    k: int, parent: np.ndarray, choices: list[list[Any]], allowed: list[np.ndarray] | None
) -> np.ndarray:
    opts = np.arange(len(choices[k])) if allowed is None else allowed[k]
    return opts[opts != parent[k]]


class RegularizedEvolutionSampler(ArchSampler):
    """Regularized (aging) evolution (Real et al., 2019), multi-objective.

    The population is the ``population_size`` most recent completed trials (aging: old members
    drop out whatever their quality). A parent is the best of ``tournament_size`` random members,
    "best" meaning lowest non-domination rank within the tournament (ties at random) under Deb's
    constrained domination when there are constraints (feasible first, then less violation);
    the child changes one parameter. Until the population is full, points are drawn at random (from the
    prior, if given). Children already evaluated are re-drawn.

    Args:
        seed: random seed.
        search_space: ``{param: choices}`` (or None: the study's categorical space).
        prior: optional op-probability prior for the initial points and mutations.
        population_size: members kept (aging window).
        tournament_size: members compared per parent selection.
        constraints_func: Optuna's constraints (``<= 0`` satisfied), see :class:`ArchSampler`.
        is_valid: ``params -> bool``; rejected points are never proposed.
    """

    def __init__(
        self,
        seed: int | None = None,
        search_space: SearchSpace | None = None,
        prior: Prior | None = None,
        population_size: int = 40,
        tournament_size: int = 10,
        *,
        constraints_func: ConstraintsFunc | None = None,
        is_valid: IsValid | None = None,
    ) -> None:
        super().__init__(
            seed, search_space, prior, constraints_func=constraints_func, is_valid=is_valid
        )
        if population_size < 2 or not 1 <= tournament_size <= population_size:
            raise ConfigError("regevo needs population_size >= 2 and 1 <= tournament <= population")
        self._pop = population_size
        self._tour = tournament_size

    def propose(self, names, choices, done, losses, taken, prior, constraints):  # noqa: D102
        if len(done) < self._pop:
            return self._fresh_random(choices, taken, prior)
        pop_x, pop_y = done[-self._pop :], losses[-self._pop :]
        viol = violations(constraints)
        pop_v = None if viol is None else viol[-self._pop :]
        for _ in range(50):
            sel = self._rng.choice(self._pop, size=self._tour, replace=False)
            ranks = constrained_rank(pop_y[sel], None if pop_v is None else pop_v[sel])
            best = sel[self._rng.choice(np.flatnonzero(ranks == ranks.min()))]
            child = mutate(self._rng, pop_x[best], choices, prior)
            if tuple(int(v) for v in child) not in taken:
                return child
        return self._fresh_random(choices, taken, prior)


class ProgressiveSampler(ArchSampler):
    """Progressive shrinking of the search space as evidence accumulates.

    Every ``stage_size`` completed trials starts a stage. At stage ``s``, each choice of each
    parameter is scored by how often trials using it reach the top ``elite_fraction`` of
    non-domination ranks (Laplace-smoothed; with constraints, ranks under Deb's constrained
    domination, so infeasible trials rank after every feasible one); a choice seen at least ``min_count`` times whose rate
    falls below ``s * shrink_step`` (capped at ``max_threshold``) times the best choice's rate is
    dropped; at least ``min_keep`` choices per parameter survive. Inside the remaining space,
    half the proposals mutate a non-dominated trial and half are drawn at random, so the search
    keeps exploring what is left. The space is recomputed from the trials at every call, so the
    strategy resumes from storage like any other.

    Args:
        seed: random seed.
        search_space: ``{param: choices}`` (or None: the study's categorical space).
        prior: optional op-probability prior for random draws and mutations.
        stage_size: completed trials per stage.
        elite_fraction: share of trials counted as "good" (by non-domination rank).
        shrink_step: threshold increase per stage.
        max_threshold: cap of the threshold.
        min_count: evidence needed before a choice can be dropped.
        min_keep: choices always kept per parameter.
        constraints_func: Optuna's constraints (``<= 0`` satisfied), see :class:`ArchSampler`.
        is_valid: ``params -> bool``; rejected points are never proposed.
    """

    def __init__(
        self,
        seed: int | None = None,
        search_space: SearchSpace | None = None,
        prior: Prior | None = None,
        stage_size: int = 25,
        elite_fraction: float = 0.25,
        shrink_step: float = 0.15,
        max_threshold: float = 0.6,
        min_count: int = 5,
        min_keep: int = 2,
        *,
        constraints_func: ConstraintsFunc | None = None,
        is_valid: IsValid | None = None,
    ) -> None:
        super().__init__(
            seed, search_space, prior, constraints_func=constraints_func, is_valid=is_valid
        )
        if stage_size < 1 or not 0 < elite_fraction <= 1 or min_keep < 1:
            raise ConfigError("progressive needs stage_size >= 1, 0 < elite <= 1, min_keep >= 1")
        self._stage = stage_size
        self._elite = elite_fraction
        self._step = shrink_step
        self._cap = max_threshold
        self._min_count = min_count
        self._min_keep = min_keep

    def allowed_choices(
        self,
        choices: list[list[Any]],
        done: np.ndarray,
        losses: np.ndarray,
        violation: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Choice indices still allowed per parameter, given the completed trials."""
        stage = len(done) // self._stage
        full = [np.arange(len(c)) for c in choices]
        if stage == 0:
            return full
        ranks = constrained_rank(losses, violation)
        cutoff = np.quantile(ranks, self._elite)
        good = ranks <= cutoff
        threshold = min(self._cap, stage * self._step)
        allowed = []
        for k, c in enumerate(choices):
            counts = np.bincount(done[:, k], minlength=len(c))
            hits = np.bincount(done[good, k], minlength=len(c))
            rate = (hits + 1.0) / (counts + 2.0)
            keep = (counts < self._min_count) | (rate >= threshold * rate.max())
            order = np.argsort(-rate)
            keep[order[: self._min_keep]] = True
            allowed.append(np.flatnonzero(keep))
        return allowed

    def propose(self, names, choices, done, losses, taken, prior, constraints):  # noqa: D102
        viol = violations(constraints)
        allowed = self.allowed_choices(choices, done, losses, viol)
        front = done[constrained_rank(losses, viol) == 0] if len(done) else done
        for attempt in range(100):
            if len(front) and self._rng.random() < 0.5:
                parent = front[self._rng.integers(len(front))]
                x = mutate(self._rng, parent, choices, prior, allowed)
            else:
                x = np.array([self._pick(a, prior, k) for k, a in enumerate(allowed)])
            if tuple(int(v) for v in x) not in taken:
                return x
            if attempt > 50:  # the shrunk space is exhausted: widen to the full space
                allowed = [np.arange(len(c)) for c in choices]
        return self._fresh_random(choices, taken, prior)

    def _pick(self, allowed: np.ndarray, prior: list[np.ndarray] | None, k: int) -> int:
        if prior is None:
            return int(self._rng.choice(allowed))
        w = prior[k][allowed] + 1e-3
        return int(self._rng.choice(allowed, p=w / w.sum()))
