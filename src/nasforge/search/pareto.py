"""Pareto-front and hypervolume utilities.

Thin wrappers over Optuna's own implementations (``optuna._hypervolume.compute_hypervolume``,
exact WFG for any dimension, and the non-dominated sort in ``optuna.study._multi_objective``),
so that nasforge and Optuna's samplers agree on what "non-dominated" and "hypervolume" mean.
These Optuna modules are private; they are pinned with ``optuna==5.0.0`` and wrapped here so that
a move upstream is a one-file change. Every function takes *losses*: lower is better in every
column (negate maximized objectives first, see :func:`to_losses`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from optuna._hypervolume import compute_hypervolume
from optuna.study import StudyDirection
from optuna.study._multi_objective import _fast_non_domination_rank, _is_pareto_front

from nasforge.errors import ConfigError

__all__ = [
    "constrained_rank",
    "hypervolume",
    "hypervolume_gap",
    "is_non_dominated",
    "non_domination_rank",
    "pareto_front",
    "to_losses",
    "total_violation",
]


def _as_2d(losses: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(losses, dtype=float)
    if arr.ndim != 2:
        raise ConfigError(
            f"losses must be a 2-D array (points x objectives), got shape {arr.shape}"
        )
    if arr.size and not np.all(np.isfinite(arr)):
        raise ConfigError("losses contain NaN or infinite values")
    return arr


def to_losses(values: np.ndarray, directions: Sequence[StudyDirection | str]) -> np.ndarray:
    """Turn objective values into losses (maximized columns negated).

    Args:
        values: ``(n, m)`` objective values.
        directions: ``m`` directions, :class:`optuna.study.StudyDirection` or "minimize"/"maximize".

    Returns:
        ``(n, m)`` losses, lower is better everywhere.
    """
    arr = np.asarray(values, dtype=float)
    sign = np.array([_sign(d) for d in directions], dtype=float)
    if arr.ndim != 2 or arr.shape[1] != len(sign):
        raise ConfigError(f"values of shape {arr.shape} do not match {len(sign)} directions")
    return arr * sign


def _sign(direction: StudyDirection | str) -> float:
    if direction in (StudyDirection.MINIMIZE, "minimize", "min"):
        return 1.0
    if direction in (StudyDirection.MAXIMIZE, "maximize", "max"):
        return -1.0
    raise ConfigError(f"unknown direction {direction!r}; use 'minimize' or 'maximize'")


def is_non_dominated(losses: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (duplicates all count as on the front)."""
    arr = _as_2d(losses)
    if len(arr) == 0:
        return np.zeros(0, dtype=bool)
    # Optuna keeps only the first of identical points; we want every copy marked, so compare
    # through the unique rows.
    uniq, inv = np.unique(arr, axis=0, return_inverse=True)
    return _is_pareto_front(uniq, assume_unique_lexsorted=True)[inv.reshape(-1)]


def pareto_front(losses: np.ndarray) -> np.ndarray:
    """The distinct non-dominated points of ``losses``, shape ``(k, m)``."""
    arr = _as_2d(losses)
    if len(arr) == 0:
        return arr
    uniq = np.unique(arr, axis=0)
    return uniq[_is_pareto_front(uniq, assume_unique_lexsorted=True)]


def non_domination_rank(losses: np.ndarray) -> np.ndarray:
    """Non-domination rank of every point (0 = on the front), as in NSGA-II."""
    arr = _as_2d(losses)
    return _fast_non_domination_rank(arr)


def constrained_rank(losses: np.ndarray, violation: np.ndarray | None) -> np.ndarray:
    """Rank under Deb's constrained domination (as Optuna's NSGA-II with ``constraints_func``).

    Feasible points (total violation 0) come first, ranked by non-domination among themselves;
    infeasible points follow, ordered by total violation (less is better; equal violations share
    a rank). With ``violation`` None (no constraints) this is :func:`non_domination_rank`.

    Args:
        losses: ``(n, m)`` losses.
        violation: ``(n,)`` total constraint violation, ``sum(max(c, 0))``; ``inf`` for a trial
            whose constraints are unknown.
    """
    arr = _as_2d(losses)
    if violation is None or len(arr) == 0:
        return non_domination_rank(arr) if len(arr) else np.zeros(0, dtype=int)
    v = np.asarray(violation, dtype=float).reshape(-1)
    if v.shape != (len(arr),):
        raise ConfigError(f"{len(v)} violations for {len(arr)} points")
    feasible = v <= 0.0
    ranks = np.zeros(len(arr), dtype=int)
    top = 0
    if feasible.any():
        ranks[feasible] = non_domination_rank(arr[feasible])
        top = int(ranks[feasible].max()) + 1
    if (~feasible).any():
        _, dense = np.unique(v[~feasible], return_inverse=True)
        ranks[~feasible] = top + dense.reshape(-1)
    return ranks


def total_violation(constraints: np.ndarray) -> np.ndarray:
    """``(n,)`` total violation ``sum(max(c, 0))`` of ``(n, k)`` constraint values (NaN: inf)."""
    c = np.asarray(constraints, dtype=float)
    if c.ndim != 2:
        raise ConfigError(f"constraints must be (points x constraints), got shape {c.shape}")
    out = np.clip(np.nan_to_num(c, nan=np.inf), 0.0, None).sum(axis=1)
    return out


def hypervolume(losses: np.ndarray, reference_point: np.ndarray | Sequence[float]) -> float:
    """Hypervolume dominated by ``losses`` and bounded by ``reference_point`` (exact, WFG).

    Points that do not strictly dominate the reference point contribute nothing (they are dropped
    before the computation, which Optuna's routine requires).
    """
    arr = _as_2d(losses)
    ref = np.asarray(reference_point, dtype=float)
    if ref.shape != (arr.shape[1],):
        raise ConfigError(f"reference point of shape {ref.shape} for {arr.shape[1]} objectives")
    inside = arr[np.all(arr < ref, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(pareto_front(inside), ref, assume_pareto=True))


def hypervolume_gap(
    found: np.ndarray, true_front: np.ndarray, reference_point: np.ndarray | Sequence[float]
) -> float:
    """``1 - HV(found) / HV(true_front)``: 0 when the true front is found, 1 when nothing counts.

    Raises:
        ConfigError: if the true front has zero hypervolume (the gap is undefined).
    """
    hv_true = hypervolume(true_front, reference_point)
    if hv_true <= 0.0:
        raise ConfigError("the true front has zero hypervolume in the region of interest")
    return 1.0 - hypervolume(found, reference_point) / hv_true
