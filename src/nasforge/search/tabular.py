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

Each strategy runs ``seeds`` independent studies of ``max(budgets)`` trials; the gap after the
first ``b`` trials gives the result at budget ``b``. Strategies are compared by median and IQR
over seeds, and by a Wilcoxon signed-rank test paired by seed against Optuna's ``NSGAIISampler``.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy.stats import wilcoxon
from threadpoolctl import threadpool_limits

from nasforge.errors import ConfigError, DataError
from nasforge.search.pareto import hypervolume, pareto_front
from nasforge.search.samplers import STRATEGIES, make_sampler
from nasforge.space import nb201

BASELINE = "optuna-nsga2"
DIRECTIONS = {"max": "maximize", "min": "minimize"}


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
        true_front: distinct non-dominated ROI losses of the whole table, inside the ROI.
        hv_true: hypervolume of the true front (reference point 1.0).
    """

    table: Path
    objectives: list[tuple[str, str]]
    raw: np.ndarray
    roi: np.ndarray
    true_front: np.ndarray = field(repr=False)
    hv_true: float = 0.0

    @property
    def directions(self) -> list[str]:
        """Optuna directions of the objectives."""
        return [DIRECTIONS[d] for _, d in self.objectives]

    def gap(self, indices: Sequence[int]) -> float:
        """HV gap of the cells ``indices`` (canonical indices)."""
        if len(indices) == 0:
            return 1.0
        pts = self.roi[np.asarray(indices, dtype=int)]
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        return 1.0 - hypervolume(pts, np.ones(pts.shape[1])) / self.hv_true


def load_problem(table: Path, objectives: list[tuple[str, str]]) -> TabularProblem:
    """Read the table and build the ROI yardstick.

    Raises:
        DataError: unreadable table, bad ``arch_str`` or numbers, duplicate cells, non-positive
            cost values, or no cell within the ROI.
        ConfigError: unknown objective columns.
    """
    table = Path(table)
    columns = _table_columns(table)
    parse_objectives(",".join(f"{c}:{d}" for c, d in objectives), columns)
    m = len(objectives)
    raw = np.full((nb201.NUM_ARCHS, m), np.nan)
    seen = np.zeros(nb201.NUM_ARCHS, dtype=bool)
    with table.open(newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                idx = nb201.CellSpec.from_arch_str(row["arch_str"]).to_index()
                vals = [float(row[c]) for c, _ in objectives]
            except (ConfigError, ValueError, TypeError) as exc:
                raise DataError(f"{table}:{line}: {exc}") from exc
            if seen[idx]:
                raise DataError(f"{table}:{line}: cell {row['arch_str']} appears twice")
            seen[idx] = True
            raw[idx] = vals
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
    inside = roi[seen][np.all(roi[seen] < 1.0, axis=1)]  # only the ROI counts
    front = pareto_front(inside) if len(inside) else inside
    hv_true = hypervolume(front, np.ones(m))
    if hv_true <= 0:
        raise DataError(f"{table}: no cell inside the region of interest")
    return TabularProblem(table, list(objectives), raw, roi, front, hv_true)


@cache
def _cached_problem(table: str, objectives: tuple[tuple[str, str], ...]) -> TabularProblem:
    return load_problem(Path(table), list(objectives))


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
) -> optuna.Study:
    """Run (or resume) one search on the table until it has ``n_trials`` completed trials.

    Trials left RUNNING by a killed process are marked FAIL on resume (they never finished, so
    nothing is evaluated twice; nasforge's samplers also never re-propose them). Cells missing
    from the table end as PRUNED trials and do not count toward ``n_trials``.

    Args:
        problem: the table problem.
        strategy: a name from :data:`nasforge.search.samplers.STRATEGIES`.
        seed: sampler seed.
        n_trials: completed trials wanted in the study.
        storage: Optuna storage (URL such as ``sqlite:///search.db`` or object); None: memory.
        study_name: study name in the storage (needed to resume).
        on_evaluate: called with ``(trial number, canonical cell index)`` at each evaluation.
        prior: op-probability prior for strategies that take one.
        sampler_kwargs: extra constructor arguments of the sampler.
        fail_running: mark RUNNING trials FAIL before resuming; set False when other workers
            share the storage (their trials are running, not stale).

    Returns:
        The study.
    """
    sampler = make_sampler(
        strategy, seed, search_space=nb201.search_space(), prior=prior, **(sampler_kwargs or {})
    )
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=sampler,
        directions=problem.directions,
        load_if_exists=True,
    )
    if fail_running:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    ops = list(nb201.OPS)

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        spec = nb201.CellSpec(tuple(trial.suggest_categorical(p, ops) for p in nb201.PARAM_NAMES))
        idx = spec.to_index()
        if on_evaluate is not None:
            on_evaluate(trial.number, idx)
        vals = problem.raw[idx]
        if not np.all(np.isfinite(vals)):
            raise optuna.TrialPruned(f"cell {spec.arch_str} not in the table")
        return tuple(float(v) for v in vals)

    # Guard against endless loops on sparse tables: at most 10x the budget in trials overall.
    max_total = 10 * n_trials + 100
    while True:
        remaining = n_trials - len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if remaining <= 0 or len(study.trials) >= max_total:
            return study
        study.optimize(objective, n_trials=remaining)


def _curve_points(budget: int) -> list[int]:
    pts = {int(round(x)) for x in np.geomspace(5, budget, 16)}
    return sorted(p for p in pts if 1 <= p <= budget)


def _run_job(args: tuple[str, tuple[tuple[str, str], ...], str, int, int, list[int]]) -> dict:
    table, objectives, strategy, seed, budget, checkpoints = args
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # One thread per worker: the pool already uses the cores, nested BLAS/torch pools only
    # contend (GPSampler runs torch).
    threadpool_limits(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    problem = _cached_problem(table, objectives)
    t0, c0 = time.perf_counter(), time.process_time()
    study = search_table(problem, strategy, seed, budget)
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
        "gaps": {b: problem.gap(idx[:b]) for b in checkpoints},
        "distinct": len(set(idx)),
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    problem = load_problem(Path(table), list(objectives))  # validates before forking
    max_budget = budgets[-1]
    checkpoints = sorted(set(_curve_points(max_budget)) | set(budgets))
    per = {s: min(seeds, (seeds_per_strategy or {}).get(s, seeds)) for s in strategies}
    jobs = [
        (str(Path(table).resolve()), tuple(objectives), s, seed, max_budget, checkpoints)
        for s in strategies
        for seed in range(per[s])
    ]
    jobs.sort(key=lambda j: j[2] != "optuna-gp")  # start the slowest first
    t0 = time.perf_counter()
    if workers == 1:
        rows = [_run_job(j) for j in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = pool.map(_run_job, jobs, chunksize=1)
    wall = time.perf_counter() - t0
    doc = _summarize(problem, strategies, budgets, checkpoints, rows)
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
    lines = [
        f"Objectives: `{', '.join(doc['problem']['objectives'])}` — {doc['problem']['metric']}.",
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
