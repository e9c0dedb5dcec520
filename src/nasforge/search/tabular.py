"""Tabular benchmark of search strategies (NAS-Bench-201-shaped tables).

A table is a CSV with an ``arch_str`` column (NAS-Bench-201 cell strings) and metric columns. A
strategy "evaluates" a cell by looking up its row, so the true Pareto front is known exactly.

Samplers optimize the **raw** columns. The yardstick, fixed so results compare across runs, is the
HV gap ``1 - HV(found) / HV(true front of the whole table)`` in a region of interest (ROI):

* a maximized column ``a`` (an accuracy) maps to ``(max(a) - a) / 10``: only models within 10
  points of the table's best count;
* a minimized column ``c`` (latency, energy; must be positive) maps to
  ``(log10 c - min) / (max - min)`` over the table;
* the reference point is 1.0 in every objective.

**Constraints** (``COL:>=:VALUE`` / ``COL:<=:VALUE``, e.g. "accuracy >= 90") are given to every
strategy through Optuna's ``constraints_func`` (violation ``VALUE - x`` for ``>=``, ``x - VALUE``
for ``<=``; ``optuna-random`` ignores constraints). With constraints, the HV gap counts feasible
cells only, both in what a search found and in the true front.

**Degenerate cells** (no input-to-output path of non-``none`` edges: the cell outputs zeros, the
network is a constant function) are never evaluated by any strategy: nasforge's samplers are told
through ``is_valid`` and never propose one; Optuna's samplers are asked through
:func:`nasforge.search.base.ask_valid`, which tells such a proposal PRUNED (not an evaluation, not
counted in the budget) and asks again.

Each strategy runs ``seeds`` independent studies of ``max(budgets)`` trials; the gap after the
first ``b`` trials gives the result at budget ``b``. Strategies are compared by median and IQR
over seeds, and by a Wilcoxon signed-rank test paired by seed against Optuna's ``NSGAIISampler``.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import wilcoxon
from threadpoolctl import threadpool_limits

from nasforge.atomic import atomic_file
from nasforge.errors import ConfigError, DataError
from nasforge.search.base import INVALID_ATTR
from nasforge.search.driver import drive, open_study
from nasforge.search.pareto import hypervolume, pareto_front
from nasforge.search.samplers import (
    STRATEGIES,
    default_sampler_options,
    make_sampler,
    validate_sampler_options,
)
from nasforge.space import nb201

BASELINE = "optuna-nsga2"
DIRECTIONS = {"max": "maximize", "min": "minimize"}
CONSTRAINT_OPS = (">=", "<=")
Constraint = tuple[str, str, float]  # (column, ">=" | "<=", value)
DEGENERATE_NOTE = (
    "degenerate cells (no input-to-output path of non-none edges) are never evaluated: "
    "nasforge's samplers get is_valid and never propose one; Optuna's are asked through "
    "nasforge.search.base.ask_valid, which tells such a proposal PRUNED (no evaluation, not "
    "counted in the budget) and asks again"
)


def is_connected_cell(params: dict[str, Any]) -> bool:
    """Whether a NAS-Bench-201 cell given as params has an input-to-output path (not degenerate)."""
    return any(nb201.active_edges(nb201.CellSpec.from_params(params)))


def parse_constraint(spec: str, columns: Sequence[str] | None = None) -> Constraint:
    """Parse ``"COL:>=:VALUE"`` or ``"COL:<=:VALUE"`` (e.g. ``cifar10_valid_acc:>=:90``).

    Raises:
        ConfigError: bad syntax, operator or value, or (with ``columns``) an unknown column.
    """
    parts = [p.strip() for p in spec.strip().rsplit(":", 2)]
    if len(parts) != 3 or not parts[0]:
        raise ConfigError(f"bad constraint {spec!r}; expected COLUMN:>=:VALUE or COLUMN:<=:VALUE")
    col, op, value = parts
    if op not in CONSTRAINT_OPS:
        raise ConfigError(f"bad constraint operator {op!r} in {spec!r}; use >= or <=")
    try:
        v = float(value)
    except ValueError:
        raise ConfigError(
            f"bad constraint value {value!r} in {spec!r}; expected a number"
        ) from None
    if not np.isfinite(v):
        raise ConfigError(f"constraint value must be finite in {spec!r}")
    if columns is not None and col not in columns:
        raise ConfigError(f"unknown constraint column {col!r}; table has {', '.join(columns)}")
    return (col, op, v)


def _table_columns(table: Path) -> list[str]:
    if not Path(table).is_file():
        raise DataError(f"table not found: {table}")
    with Path(table).open(newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise DataError(f"{table}: empty CSV")
    return header


def parse_objectives(spec: str, columns: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Parse ``"COL:max,COL:min[,...]"``.

    Args:
        spec: comma-separated ``column:direction`` pairs, direction ``max`` or ``min``.
        columns: the table's columns; if given, every objective column must be one of them and
            ``arch_str`` must be present.

    Returns:
        ``[(column, "max" | "min"), ...]``.

    Raises:
        ConfigError: empty spec, bad syntax or direction, repeated or unknown column, or a table
            without ``arch_str``.
    """
    if not spec or not spec.strip():
        raise ConfigError("objectives are empty; expected e.g. 'cifar10_valid_acc:max,lat:min'")
    out: list[tuple[str, str]] = []
    for part in spec.split(","):
        col, sep, direction = part.strip().rpartition(":")
        if not sep or not col:
            raise ConfigError(f"bad objective {part.strip()!r}; expected COLUMN:max or COLUMN:min")
        direction = direction.strip().lower()
        if direction not in DIRECTIONS:
            raise ConfigError(f"bad direction {direction!r} in {part.strip()!r}; use max or min")
        if any(col == c for c, _ in out):
            raise ConfigError(f"objective column {col!r} given twice")
        out.append((col, direction))
    if len(out) < 2:
        raise ConfigError("need at least two objectives for a Pareto search")
    if columns is not None:
        if "arch_str" not in columns:
            raise ConfigError("the table has no 'arch_str' column")
        unknown = [c for c, _ in out if c not in columns]
        if unknown:
            raise ConfigError(
                f"unknown objective column(s) {', '.join(unknown)}; table has {', '.join(columns)}"
            )
    return out


@dataclass
class TabularProblem:
    """A table, objectives and the ROI yardstick.

    Attributes:
        objectives: ``[(column, "max" | "min")]``.
        raw: ``(5**6, m)`` raw values indexed by canonical cell index (NaN where the table has
            no row for the cell).
        roi: ``(5**6, m)`` ROI losses (see the module docstring).
        true_front: distinct non-dominated ROI losses of the whole table (its feasible cells,
            with constraints), inside the ROI.
        hv_true: hypervolume of the true front (reference point 1.0).
        constraints: ``[(column, ">=" | "<=", value)]``.
        violation: ``(5**6, k)`` constraint values per cell (``<= 0`` satisfied; NaN where the
            table has no row).
    """

    table: Path
    objectives: list[tuple[str, str]]
    raw: np.ndarray
    roi: np.ndarray
    true_front: np.ndarray = field(repr=False)
    hv_true: float = 0.0
    constraints: list[Constraint] = field(default_factory=list)
    violation: np.ndarray | None = field(default=None, repr=False)

    @property
    def feasible(self) -> np.ndarray:
        """``(5**6,)`` True where a cell satisfies every constraint (all True without)."""
        if self.violation is None or self.violation.shape[1] == 0:
            return np.ones(len(self.raw), dtype=bool)
        return np.all(self.violation <= 0, axis=1)

    def constraint_values(self, index: int) -> list[float]:
        """Constraint values of one cell (``inf`` where the table has no row for it)."""
        if self.violation is None:
            return []
        row = self.violation[index]
        return [float(v) if np.isfinite(v) else float("inf") for v in row]

    @property
    def directions(self) -> list[str]:
        """Optuna directions of the objectives."""
        return [DIRECTIONS[d] for _, d in self.objectives]

    def gap(self, indices: Sequence[int]) -> float:
        """HV gap of the cells ``indices`` (canonical indices)."""
        if len(indices) == 0:
            return 1.0
        idx = np.asarray(indices, dtype=int)
        pts = self.roi[idx[self.feasible[idx]]]
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        return 1.0 - hypervolume(pts, np.ones(pts.shape[1])) / self.hv_true


def load_problem(
    table: Path,
    objectives: list[tuple[str, str]],
    constraints: Sequence[Constraint] | None = None,
) -> TabularProblem:
    """Read the table and build the ROI yardstick (over the feasible cells, with constraints).

    Raises:
        DataError: unreadable table, bad ``arch_str`` or numbers, duplicate cells, non-positive
            cost values, or no (feasible) cell within the ROI.
        ConfigError: unknown objective or constraint columns, bad constraints.
    """
    table = Path(table)
    columns = _table_columns(table)
    parse_objectives(",".join(f"{c}:{d}" for c, d in objectives), columns)
    constraints = [parse_constraint(f"{c}:{op}:{v!r}", columns) for c, op, v in constraints or []]
    m = len(objectives)
    k = len(constraints)
    cons_raw = np.full((nb201.NUM_ARCHS, k), np.nan)
    raw = np.full((nb201.NUM_ARCHS, m), np.nan)
    seen = np.zeros(nb201.NUM_ARCHS, dtype=bool)
    with table.open(newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                idx = nb201.CellSpec.from_arch_str(row["arch_str"]).to_index()
                vals = [float(row[c]) for c, _ in objectives]
                cvals = [float(row[c]) for c, _, _ in constraints]
            except (ConfigError, ValueError, TypeError) as exc:
                raise DataError(f"{table}:{line}: {exc}") from exc
            if seen[idx]:
                raise DataError(f"{table}:{line}: cell {row['arch_str']} appears twice")
            seen[idx] = True
            raw[idx] = vals
            cons_raw[idx] = cvals
    if not seen.any():
        raise DataError(f"{table}: no rows")
    roi = np.full_like(raw, np.nan)
    for j, (col, direction) in enumerate(objectives):
        v = raw[seen, j]
        if not np.all(np.isfinite(v)):
            raise DataError(f"{table}: column {col!r} has missing or non-finite values")
        if direction == "max":
            roi[seen, j] = (v.max() - v) / 10.0
        else:
            if np.any(v <= 0):
                raise DataError(f"{table}: minimized column {col!r} must be positive (log scale)")
            lv = np.log10(v)
            span = lv.max() - lv.min()
            roi[seen, j] = (lv - lv.min()) / span if span > 0 else 0.0
    violation = np.full_like(cons_raw, np.nan)
    for j, (col, op, value) in enumerate(constraints):
        v = cons_raw[seen, j]
        if not np.all(np.isfinite(v)):
            raise DataError(f"{table}: constraint column {col!r} has missing or non-finite values")
        violation[seen, j] = value - v if op == ">=" else v - value
    ok = seen & np.all(violation <= 0, axis=1) if k else seen
    inside = roi[ok][np.all(roi[ok] < 1.0, axis=1)]  # only the ROI counts
    front = pareto_front(inside) if len(inside) else inside
    hv_true = hypervolume(front, np.ones(m)) if len(inside) else 0.0
    if hv_true <= 0:
        what = "feasible " if k else ""
        raise DataError(f"{table}: no {what}cell inside the region of interest")
    return TabularProblem(
        table, list(objectives), raw, roi, front, hv_true, list(constraints), violation
    )


@cache
def _cached_problem(
    table: str,
    objectives: tuple[tuple[str, str], ...],
    constraints: tuple[Constraint, ...] = (),
) -> TabularProblem:
    return load_problem(Path(table), list(objectives), list(constraints))


def search_table(
    problem: TabularProblem,
    strategy: str,
    seed: int,
    n_trials: int,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    on_evaluate: Callable[[int, int], None] | None = None,
    prior: dict[str, dict[str, float]] | None = None,
    sampler_kwargs: dict[str, Any] | None = None,
    fail_running: bool = True,
    skip_degenerate: bool = True,
) -> optuna.Study:
    """Run (or resume) one search on the table until it has ``n_trials`` completed trials.

    The study is opened, resumed and asked/told by the pipeline's search driver
    (:func:`nasforge.search.driver.open_study`, :func:`~nasforge.search.driver.drive`). Trials
    left RUNNING by a killed process are marked FAIL on resume (they never finished, so
    nothing is evaluated twice; nasforge's samplers also never re-propose them). Cells missing
    from the table end as PRUNED trials and do not count toward ``n_trials``; so do degenerate
    cells (see the module docstring), which are never evaluated. The problem's constraints
    reach the strategy through ``constraints_func``.

    Args:
        problem: the table problem.
        strategy: a name from :data:`nasforge.search.samplers.STRATEGIES`.
        seed: sampler seed.
        n_trials: completed trials wanted in the study.
        storage: Optuna storage (URL such as ``sqlite:///search.db`` or object); None: memory.
        study_name: study name in the storage (needed to resume).
        on_evaluate: called with ``(trial number, canonical cell index)`` at each evaluation.
        prior: op-probability prior for strategies that take one.
        sampler_kwargs: the strategy's options (:func:`nasforge.search.samplers.make_sampler`).
        fail_running: mark RUNNING trials FAIL before resuming; set False when other workers
            share the storage (their trials are running, not stale).
        skip_degenerate: never evaluate cells without an input-to-output path.

    Returns:
        The study.
    """
    is_valid = is_connected_cell if skip_degenerate else None
    constraints_func = _TableConstraints(problem) if problem.constraints else None
    sampler = make_sampler(
        strategy,
        seed,
        search_space=nb201.search_space(),
        prior=prior,
        constraints_func=constraints_func,
        is_valid=is_valid,
        options=sampler_kwargs,
    )
    study = open_study(
        storage=storage,
        study_name=study_name,
        directions=problem.directions,
        sampler=sampler,
        fail_running=fail_running,
    )

    def evaluate(trial: optuna.Trial) -> list[float] | None:
        idx = nb201.CellSpec.from_params(trial.params).to_index()
        if on_evaluate is not None:
            on_evaluate(trial.number, idx)
        vals = problem.raw[idx]
        if not np.all(np.isfinite(vals)):
            return None  # cell not in the table: PRUNED
        return [float(v) for v in vals]

    drive(
        study,
        {p: CategoricalDistribution(list(nb201.OPS)) for p in nb201.PARAM_NAMES},
        evaluate,
        n_trials,
        is_valid=is_valid,
        # Guard against endless loops on sparse tables: at most 10x the budget in trials
        # overall (degenerate proposals excluded: they are bounded by ask_valid's retries).
        max_evaluations=10 * n_trials + 100,
    )
    return study


class _TableConstraints:
    """``constraints_func`` of a table problem: looks the cell's values up (picklable)."""

    def __init__(self, problem: TabularProblem) -> None:
        self._problem = problem

    def __call__(self, trial: FrozenTrial) -> list[float]:
        idx = nb201.CellSpec.from_params(trial.params).to_index()
        return self._problem.constraint_values(idx)


def invalid_proposals(study: optuna.Study) -> int:
    """Proposals :func:`nasforge.search.base.ask_valid` rejected in ``study``."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(INVALID_ATTR))


def _curve_points(budget: int) -> list[int]:
    pts = {int(round(x)) for x in np.geomspace(5, budget, 16)}
    return sorted(p for p in pts if 1 <= p <= budget)


def _run_job(args: tuple) -> dict:
    table, objectives, strategy, seed, budget, checkpoints, constraints, options = args
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # One thread per worker: the pool already uses the cores, nested BLAS/torch pools only
    # contend (GPSampler runs torch).
    threadpool_limits(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    problem = _cached_problem(table, objectives, constraints)
    t0, c0 = time.perf_counter(), time.process_time()
    study = search_table(problem, strategy, seed, budget, sampler_kwargs=dict(options))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    idx = [
        nb201.CellSpec.from_params(t.params).to_index()
        for t in trials
        if t.state == TrialState.COMPLETE
    ]
    return {
        "strategy": strategy,
        "seed": seed,
        "budget": budget,
        "gaps": {b: problem.gap(idx[:b]) for b in checkpoints},
        "distinct": len(set(idx)),
        "degenerate_skipped": invalid_proposals(study),
        "feasible": int(problem.feasible[np.asarray(idx, dtype=int)].sum()) if idx else 0,
        "seconds": elapsed,
        "cpu_seconds": cpu,
    }


def _wilcoxon_p(a: list[float], b: list[float]) -> float | None:
    diff = np.asarray(a) - np.asarray(b)
    if len(diff) < 2:
        return None
    if np.allclose(diff, 0.0):
        return 1.0
    return float(wilcoxon(a, b, zero_method="wilcox").pvalue)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_file(path, suffix=path.suffix) as tmp:
        write(tmp)


def run_bench_search(
    table: Path,
    objectives: list[tuple[str, str]],
    strategies: list[str],
    budgets: list[int],
    seeds: int,
    out: Path,
    workers: int = 2,
    seeds_per_strategy: dict[str, int] | None = None,
    name: str = "search",
    constraints: Sequence[Constraint] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict:
    """Benchmark strategies on a table; write ``<name>.json``, ``<name>.md``, ``<name>.png``.

    Args:
        table: CSV with ``arch_str`` and the objective columns.
        objectives: ``[(column, "max" | "min")]`` (see :func:`parse_objectives`).
        strategies: strategy names (``optuna-nsga2`` is added if missing: it is the baseline of
            the Wilcoxon tests).
        budgets: evaluation budgets to report (each seed runs ``max(budgets)`` trials).
        seeds: seeds per strategy (seeds ``0 .. seeds-1``, shared across strategies for pairing).
        out: output directory.
        workers: processes running (strategy, seed) jobs in parallel.
        seeds_per_strategy: fewer seeds for slow strategies, e.g. ``{"optuna-gp": 3}``.
        name: file stem of the outputs.
        constraints: ``[(column, ">=" | "<=", value)]`` given to every strategy (see
            :func:`parse_constraint`); the HV gap then counts feasible cells only.
        options: ``{strategy: options}`` for :func:`nasforge.search.samplers.make_sampler`
            (default: :func:`nasforge.search.samplers.default_sampler_options` for the largest
            budget).

    Returns:
        The JSON document: ``{"problem": ..., "results": {strategy: {str(budget): {median_gap,
        q25, q75, p_vs_nsga2, seeds}}}, "curves": ..., "timing": ...}``.

    Raises:
        ConfigError: unknown strategy, bad budgets/seeds/workers.
        DataError: unusable table.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if not budgets or any(int(b) < 1 for b in budgets):
        raise ConfigError(f"budgets must be positive integers, got {budgets}")
    if seeds < 1 or workers < 1:
        raise ConfigError("seeds and workers must be >= 1")
    strategies = list(dict.fromkeys([BASELINE, *strategies]))
    budgets = sorted({int(b) for b in budgets})
    constraints = [tuple(c) for c in constraints or []]
    # validates before forking
    problem = load_problem(Path(table), list(objectives), constraints)  # type: ignore[arg-type]
    max_budget = budgets[-1]
    # Options per (strategy, run budget). A strategy whose defaults depend on the budget (NSGA-II's
    # population) and has no user options runs once per budget, each sized to it; the others run
    # max(budgets) trials once and are read at every budget.
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for s in strategies:
        if options and s in options:
            runs[s] = {max_budget: dict(options[s])}
            continue
        sized = {b: default_sampler_options(s, b) for b in budgets}
        if all(o == sized[max_budget] for o in sized.values()):
            runs[s] = {max_budget: sized[max_budget]}
        else:
            runs[s] = sized
    for s, per_budget in runs.items():
        for o in per_budget.values():
            validate_sampler_options(s, o)
    checkpoints = sorted(set(_curve_points(max_budget)) | set(budgets))
    per = {s: min(seeds, (seeds_per_strategy or {}).get(s, seeds)) for s in strategies}
    jobs = [
        (
            str(Path(table).resolve()),
            tuple(objectives),
            s,
            seed,
            run_budget,
            [c for c in checkpoints if c <= run_budget],
            tuple(problem.constraints),
            tuple(sorted(o.items())),
        )
        for s in strategies
        for run_budget, o in runs[s].items()
        for seed in range(per[s])
    ]
    jobs.sort(key=lambda j: j[2] != "optuna-gp")  # start the slowest first
    t0 = time.perf_counter()
    if workers == 1:
        job_rows = [_run_job(j) for j in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            job_rows = pool.map(_run_job, jobs, chunksize=1)
    wall = time.perf_counter() - t0
    rows = _merge_sized_runs(job_rows, runs, budgets)
    doc = _summarize(problem, strategies, budgets, checkpoints, rows)
    doc["problem"]["sampler_options"] = {
        s: (next(iter(o.values())) if len(o) == 1 else {f"budget {b}": v for b, v in o.items()})
        for s, o in runs.items()
    }
    doc["degenerate_skipped_per_strategy"] = {
        s: sum(r["degenerate_skipped"] for r in rows if r["strategy"] == s) for s in strategies
    }
    if problem.constraints:
        doc["feasible_evaluations_per_strategy"] = {
            s: sum(r["feasible"] for r in rows if r["strategy"] == s) for s in strategies
        }
    doc["timing"] = {
        "wall_seconds": wall,
        "workers": workers,
        # Summed over seeds; wall includes waiting for the CPU on a shared machine.
        "job_wall_seconds_per_strategy": {
            s: sum(r["seconds"] for r in rows if r["strategy"] == s) for s in strategies
        },
        "cpu_seconds_per_strategy": {
            s: sum(r["cpu_seconds"] for r in rows if r["strategy"] == s) for s in strategies
        },
    }
    out = Path(out)
    _atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(doc, indent=2)))
    _atomic_write(out / f"{name}.md", lambda p: p.write_text(markdown_table(doc)))
    _atomic_write(out / f"{name}.png", lambda p: plot_curves(doc, p))
    return doc


def _merge_sized_runs(
    job_rows: list[dict], runs: dict[str, dict[int, dict[str, Any]]], budgets: list[int]
) -> list[dict]:
    """One row per (strategy, seed): a budget-sized strategy's gap at budget ``b`` comes from its
    run of ``b`` trials, its curve from the longest run; times are summed over its runs."""
    out = []
    for s, per_budget in runs.items():
        mine = [r for r in job_rows if r["strategy"] == s]
        if len(per_budget) == 1:
            out += mine
            continue
        longest = max(per_budget)
        for seed in sorted({r["seed"] for r in mine}):
            rs = {r["budget"]: r for r in mine if r["seed"] == seed}
            row = dict(rs[longest])
            row["gaps"] = {**rs[longest]["gaps"], **{b: rs[b]["gaps"][b] for b in budgets}}
            for key in ("seconds", "cpu_seconds", "degenerate_skipped"):
                row[key] = sum(r[key] for r in rs.values())
            out.append(row)
    return out


def _summarize(
    problem: TabularProblem,
    strategies: list[str],
    budgets: list[int],
    checkpoints: list[int],
    rows: list[dict],
) -> dict[str, Any]:
    by = {
        s: sorted((r for r in rows if r["strategy"] == s), key=lambda r: r["seed"])
        for s in strategies
    }
    seeds_of = {s: {r["seed"]: r for r in by[s]} for s in strategies}
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, list[float]]] = {}

    def paired_p(s: str, other: str, b: int) -> float | None:
        common = sorted(set(seeds_of[s]) & set(seeds_of[other]))
        return _wilcoxon_p(
            [seeds_of[s][k]["gaps"][b] for k in common],
            [seeds_of[other][k]["gaps"][b] for k in common],
        )

    for s in strategies:
        results[s] = {}
        for b in budgets:
            g = [r["gaps"][b] for r in by[s]]
            results[s][str(b)] = {
                "median_gap": float(np.median(g)),
                "q25": float(np.quantile(g, 0.25)),
                "q75": float(np.quantile(g, 0.75)),
                "p_vs_nsga2": None if s == BASELINE else paired_p(s, BASELINE, b),
                "seeds": len(g),
                # Paired two-sided Wilcoxon p against every other Optuna sampler in the run.
                "p_vs": {
                    o: paired_p(s, o, b)
                    for o in strategies
                    if o != s and o.startswith("optuna-") and o != BASELINE
                },
                "gaps": g,  # per seed, seeds 0..n-1, for later paired tests
            }
        gaps = np.array([[r["gaps"][c] for c in checkpoints] for r in by[s]])
        curves[s] = {
            "evaluations": checkpoints,
            "median": np.median(gaps, axis=0).tolist(),
            "q25": np.quantile(gaps, 0.25, axis=0).tolist(),
            "q75": np.quantile(gaps, 0.75, axis=0).tolist(),
        }
    return {
        "problem": {
            "table": str(problem.table),
            "objectives": [f"{c}:{d}" for c, d in problem.objectives],
            "metric": "HV gap = 1 - HV(found)/HV(true front); ROI: max column a -> (max(a)-a)/10, "
            "min column c -> (log10 c - min)/(max - min) over the table; reference point 1.0",
            "true_front_size": int(len(problem.true_front)),
            "hv_true": problem.hv_true,
            "budgets": budgets,
            "baseline": BASELINE,
            "test": "Wilcoxon signed-rank, paired by seed, two-sided, vs optuna-nsga2",
            "degenerate_cells": DEGENERATE_NOTE,
            "constraints": [f"{c}:{op}:{v:g}" for c, op, v in problem.constraints],
            "feasible_cells": int(problem.feasible[np.all(np.isfinite(problem.raw), axis=1)].sum()),
        },
        "results": results,
        "curves": curves,
    }


def markdown_table(doc: dict) -> str:
    """Markdown table of median gap [IQR] and p vs NSGA-II per strategy and budget."""
    budgets = doc["problem"]["budgets"]
    head = "| strategy | seeds | " + " | ".join(
        f"gap@{b} median [q25, q75] (p vs nsga2)" for b in budgets
    )
    cons = doc["problem"].get("constraints") or []
    extra = (
        f" Constraints `{', '.join(cons)}`: the HV gap counts feasible cells only"
        f" ({doc['problem'].get('feasible_cells')} feasible cells in the table)."
        if cons
        else ""
    )
    lines = [
        f"Objectives: `{', '.join(doc['problem']['objectives'])}` — {doc['problem']['metric']}."
        + extra,
        "",
        head + " |",
        "|---|---:|" + "---|" * len(budgets),
    ]
    for s, res in doc["results"].items():
        cells = []
        for b in budgets:
            r = res.get(str(b))
            if r is None:
                cells.append("not run")
                continue
            p = "—" if r["p_vs_nsga2"] is None else f"{r['p_vs_nsga2']:.2g}"
            cells.append(f"{r['median_gap']:.3f} [{r['q25']:.3f}, {r['q75']:.3f}] ({p})")
        seeds = next(iter(res.values()))["seeds"]
        lines.append(f"| {s} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(doc: dict, path: Path, title: str | None = None) -> None:
    """PNG of the median HV gap (IQR shaded) vs evaluations, log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s, c in doc["curves"].items():
        ax.plot(c["evaluations"], c["median"], label=s)
        ax.fill_between(c["evaluations"], c["q25"], c["q75"], alpha=0.15)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("evaluations")
    ax.set_ylabel("HV gap (median, IQR)")
    ax.set_title(title or ", ".join(doc["problem"]["objectives"]), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
