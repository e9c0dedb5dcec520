"""What the report computes from the search's records: per-target 2-D fronts and hypervolume.

Trial records come from ``pareto.json`` / ``history.json``. New-format records carry
``objectives`` (the study's objectives), ``metrics`` (objectives plus other figures such as
``val_accuracy`` and the latency of every target), ``feasible`` and ``violations``; old-format
records only ``objectives`` (``val_error``, ``latency_ms[<target>]``, ``params``). Every function
here accepts both: a missing key means "absent" (a record without ``feasible`` counts as
feasible).

The Pareto front drawn for a target is computed **in that target's plane** (validation error,
latency), among the feasible trials: a trial on the study's many-objective front may be
dominated in one 2-D plane, and marking it there misleads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from nasforge.search.pareto import hypervolume, is_non_dominated

LATENCY_PREFIX = "latency_ms["

#: How far beyond the worst normalised value (1.0) the hypervolume's reference point lies.
HV_REFERENCE = 1.1


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def value(record: dict[str, Any], name: str) -> float | None:
    """A figure of a trial: from ``objectives``, else ``metrics``; None when absent or not finite."""
    for key in ("objectives", "metrics"):
        v = _finite((record.get(key) or {}).get(name))
        if v is not None:
            return v
    return None


def accuracy(record: dict[str, Any]) -> float | None:
    """Validation accuracy (0-1) of a trial: ``val_accuracy``, else ``1 - val_error``."""
    acc = _finite((record.get("metrics") or {}).get("val_accuracy"))
    if acc is not None:
        return acc
    err = value(record, "val_error")
    return None if err is None else 1.0 - err


def is_feasible(record: dict[str, Any]) -> bool:
    """Whether a trial meets the search's constraints (records without the flag do)."""
    return bool(record.get("feasible", True))


def latency_targets(pareto: dict[str, Any], trials: Sequence[dict[str, Any]]) -> list[str]:
    """Targets that have a latency figure: objectives first (study order), then metrics."""
    names: list[str] = []
    for n in pareto.get("objectives", []):
        if n.startswith(LATENCY_PREFIX) and n not in names:
            names.append(n)
    for r in trials:
        for n in [*(r.get("objectives") or {}), *(r.get("metrics") or {})]:
            if n.startswith(LATENCY_PREFIX) and n not in names:
                names.append(n)
    return [n[len(LATENCY_PREFIX) : -1] for n in names]


def latency_name(target: str) -> str:
    """Column name of a target's latency."""
    return f"{LATENCY_PREFIX}{target}]"


def plane_points(
    trials: Sequence[dict[str, Any]], target: str
) -> list[tuple[dict[str, Any], float, float]]:
    """``(record, latency_ms, accuracy)`` of every trial that has both figures for ``target``."""
    out = []
    for r in trials:
        lat, acc = value(r, latency_name(target)), accuracy(r)
        if lat is not None and acc is not None:
            out.append((r, lat, acc))
    return out


def plane_front(trials: Sequence[dict[str, Any]], target: str) -> list[int]:
    """Trial numbers on the 2-D front of (accuracy up, ``target`` latency down), feasible only.

    Sorted by latency (then accuracy descending), so consecutive points draw the front's line.
    """
    pts = [(r, lat, acc) for r, lat, acc in plane_points(trials, target) if is_feasible(r)]
    if not pts:
        return []
    losses = np.array([[lat, -acc] for _, lat, acc in pts], dtype=float)
    mask = is_non_dominated(losses)
    on = [(lat, -acc, r["trial"]) for (r, lat, acc), m in zip(pts, mask, strict=True) if m]
    return [t for _, _, t in sorted(on)]


def normalisation(
    trials: Sequence[dict[str, Any]], objectives: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-objective (min, max) over every trial that has all the objectives."""
    rows = [v for v in (_row(r, objectives) for r in trials) if v is not None]
    if not rows:
        return np.zeros(len(objectives)), np.ones(len(objectives))
    arr = np.array(rows, dtype=float)
    return arr.min(axis=0), arr.max(axis=0)


def _row(record: dict[str, Any], objectives: Sequence[str]) -> list[float] | None:
    vals = [value(record, n) for n in objectives]
    return None if any(v is None for v in vals) else [float(v) for v in vals]  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class HypervolumeCurve:
    """Hypervolume after each trial and how it was computed.

    Attributes:
        points: ``[(n trials, HV), ...]``, one per trial.
        method: ``"exact (WFG)"`` or ``"Monte Carlo, <k> fixed points"``.
        std_error: Standard error of the final value (0 when exact).
    """

    points: list[tuple[int, float]]
    method: str
    std_error: float = 0.0

    def __iter__(self):
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i):
        return self.points[i]


#: Exact hypervolume for up to this many objectives (WFG grows quickly with the dimension) ...
EXACT_MAX_OBJECTIVES = 5
#: ... and while the exact computations of one curve take less than this many seconds.
EXACT_BUDGET_S = 10.0
#: Fixed, seeded sample points of the Monte Carlo estimate.
MC_SAMPLES = 40_000


def _normalised_feasible(
    trials: Sequence[dict[str, Any]], objectives: Sequence[str]
) -> list[np.ndarray | None]:
    """Per trial (in trial order): its normalised objective vector, or None (infeasible/missing)."""
    lo, hi = normalisation(trials, objectives)
    span = np.where(hi > lo, hi - lo, 1.0)
    out: list[np.ndarray | None] = []
    for r in trials:
        row = _row(r, objectives) if is_feasible(r) else None
        out.append(None if row is None else (np.array(row) - lo) / span)
    return out


def _exact_curve(points: list[np.ndarray | None], m: int, budget_s: float) -> list[float] | None:
    ref = np.full(m, HV_REFERENCE)
    front = np.zeros((0, m))
    hv, out, t0 = 0.0, [], time.perf_counter()
    for p in points:
        if p is not None and not (len(front) and np.any(np.all(front <= p, axis=1))):
            front = np.vstack([front[~np.all(p <= front, axis=1)], p])
            hv = max(hv, hypervolume(front, ref))
            if time.perf_counter() - t0 > budget_s:
                return None
        out.append(hv)
    return out


def _monte_carlo_curve(
    points: list[np.ndarray | None], m: int, k: int
) -> tuple[list[float], float]:
    box = HV_REFERENCE**m
    samples = np.random.default_rng(0).uniform(0.0, HV_REFERENCE, size=(k, m))
    covered = np.zeros(k, dtype=bool)
    out = []
    for p in points:
        if p is not None:
            covered |= np.all(samples >= p, axis=1)
        out.append(box * float(covered.mean()))
    f = float(covered.mean())
    return out, box * math.sqrt(f * (1 - f) / k)


def hypervolume_curve(
    trials: Sequence[dict[str, Any]],
    objectives: Sequence[str],
    *,
    exact: bool | None = None,
    samples: int = MC_SAMPLES,
) -> HypervolumeCurve:
    """Hypervolume of the search's front after each trial.

    HV after ``n`` trials is the hypervolume of the non-dominated *feasible* trials among the
    first ``n`` (in trial order), over all of ``objectives`` (all minimised), each normalised to
    [0, 1] by the minimum and maximum seen over the whole study, with the reference point
    :data:`HV_REFERENCE` (just beyond the worst) in every objective. The normalisation and the
    reference are fixed for the whole curve, so the curve never decreases.

    The exact hypervolume (WFG, :func:`nasforge.search.pareto.hypervolume`) is used for up to
    :data:`EXACT_MAX_OBJECTIVES` objectives while it stays within :data:`EXACT_BUDGET_S`;
    otherwise a Monte Carlo estimate over ``samples`` fixed points of the reference box (the same
    points for every ``n``, so the estimate never decreases either).

    Args:
        trials: Trial records.
        objectives: The study's objective names.
        exact: Force the exact (True) or the Monte Carlo (False) computation.
        samples: Monte Carlo sample points.
    """
    objectives = list(objectives)
    if not objectives:
        return HypervolumeCurve([], "none (no objectives)")
    ordered = sorted(trials, key=lambda r: r.get("trial", 0))
    points = _normalised_feasible(ordered, objectives)
    m = len(objectives)
    values = None
    if exact or (exact is None and m <= EXACT_MAX_OBJECTIVES):
        values = _exact_curve(points, m, math.inf if exact else EXACT_BUDGET_S)
    if values is not None:
        return HypervolumeCurve(list(enumerate(values, start=1)), "exact (WFG)")
    values, se = _monte_carlo_curve(points, m, samples)
    return HypervolumeCurve(
        list(enumerate(values, start=1)), f"Monte Carlo, {samples:,} fixed points", se
    )


def fmt_metric(name: str, v: float | None) -> str:
    """A figure as text for the tables."""
    if v is None:
        return "-"
    if name in ("params", "macs") and abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"
