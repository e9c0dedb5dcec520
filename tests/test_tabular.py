"""Tabular benchmark runner: objectives, HV gap yardstick, outputs, resumable searches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from nasforge.errors import ConfigError, DataError
from nasforge.search.tabular import load_problem, parse_objectives, run_bench_search, search_table
from nasforge.space import nb201

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NASFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
TABLE = SHARED / "nb201" / "nb201_dev.csv"
needs_table = pytest.mark.skipif(
    not TABLE.is_file(), reason=f"NB201 table not found at {TABLE} (set NASFORGE_SHARED_DATA)"
)
OBJ_A = [("cifar10_valid_acc", "max"), ("raspi4_latency_ms", "min")]

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def problem():
    return load_problem(TABLE, OBJ_A)


def test_parse_objectives() -> None:
    cols = ["arch_idx", "arch_str", "acc", "lat"]
    assert parse_objectives("acc:max, lat:MIN", cols) == [("acc", "max"), ("lat", "min")]
    with pytest.raises(ConfigError, match="bad direction"):
        parse_objectives("acc:up,lat:min", cols)
    with pytest.raises(ConfigError, match="unknown objective column"):
        parse_objectives("acc:max,energy:min", cols)
    with pytest.raises(ConfigError, match="arch_str"):
        parse_objectives("acc:max,lat:min", ["acc", "lat"])
    with pytest.raises(ConfigError, match="expected COLUMN"):
        parse_objectives("acc,lat:min", cols)
    with pytest.raises(ConfigError, match="twice"):
        parse_objectives("acc:max,acc:min", cols)
    with pytest.raises(ConfigError, match="at least two"):
        parse_objectives("acc:max", cols)
    with pytest.raises(ConfigError, match="empty"):
        parse_objectives(" ", cols)


def test_load_problem_rejects_bad_tables(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_problem(tmp_path / "none.csv", OBJ_A)
    bad = tmp_path / "bad.csv"
    bad.write_text("arch_str,acc,lat\n|nope|,1,2\n")
    with pytest.raises(DataError, match=":2:"):
        load_problem(bad, [("acc", "max"), ("lat", "min")])
    neg = tmp_path / "neg.csv"
    cell = nb201.CellSpec.from_index(7).arch_str
    neg.write_text(f"arch_str,acc,lat\n{cell},1,-2\n")
    with pytest.raises(DataError, match="positive"):
        load_problem(neg, [("acc", "max"), ("lat", "min")])


@needs_table
def test_gap_yardstick(problem) -> None:
    all_cells = np.arange(nb201.NUM_ARCHS)
    assert problem.gap(all_cells) == pytest.approx(0.0, abs=1e-12)
    assert problem.gap([]) == 1.0
    # The slowest cell lies at the latency end of the ROI box: it contributes nothing.
    slowest = int(np.nanargmax(problem.raw[:, 1]))
    assert problem.gap([slowest]) == pytest.approx(1.0)
    # The ROI: accuracy 10 points below the best maps to 1.0.
    acc = problem.raw[:, 0]
    assert np.nanmin(problem.roi[:, 0]) == 0.0
    i = int(np.nanargmin(np.abs(acc - (np.nanmax(acc) - 10.0))))
    assert problem.roi[i, 0] == pytest.approx((np.nanmax(acc) - acc[i]) / 10.0)
    best_front = problem.true_front
    assert len(best_front) > 3 and np.all(best_front <= 1.0 + 1e-12)
    # Adding cells never increases the gap.
    rng = np.random.default_rng(0)
    picks = rng.choice(nb201.NUM_ARCHS, 200, replace=False)
    assert problem.gap(picks) <= problem.gap(picks[:50]) + 1e-12


@needs_table
def test_search_table_runs_budget(problem) -> None:
    study = search_table(problem, "optuna-nsga2", 0, 30)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 30
    for t in done:
        idx = nb201.CellSpec.from_params(t.params).to_index()
        assert t.values == pytest.approx(list(problem.raw[idx]))  # raw columns, not ROI


@needs_table
def test_run_bench_search_outputs(tmp_path: Path) -> None:
    doc = run_bench_search(
        TABLE, OBJ_A, ["optuna-random", "hybrid"], [10, 20], seeds=3, out=tmp_path, workers=2
    )
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"search.{ext}").stat().st_size > 0
    on_disk = json.loads((tmp_path / "search.json").read_text())
    assert on_disk["results"] == doc["results"]
    assert set(doc["results"]) == {"optuna-nsga2", "optuna-random", "hybrid"}
    for s, per_budget in doc["results"].items():
        assert set(per_budget) == {"10", "20"}
        for r in per_budget.values():
            assert {"median_gap", "q25", "q75", "p_vs_nsga2", "seeds"} <= set(r)
            assert len(r["gaps"]) == 3 and r["median_gap"] == pytest.approx(np.median(r["gaps"]))
            assert 0.0 <= r["q25"] <= r["median_gap"] <= r["q75"] <= 1.0
            assert r["seeds"] == 3
            assert (r["p_vs_nsga2"] is None) == (s == "optuna-nsga2")
        assert per_budget["20"]["median_gap"] <= per_budget["10"]["median_gap"]
    assert (tmp_path / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert "| hybrid | 3 |" in (tmp_path / "search.md").read_text()


def test_run_bench_search_bad_input_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown strategies"):
        run_bench_search(TABLE, OBJ_A, ["nope"], [10], 2, tmp_path / "o")
    with pytest.raises(ConfigError, match="budgets"):
        run_bench_search(TABLE, OBJ_A, ["hybrid"], [0], 2, tmp_path / "o")
    assert not (tmp_path / "o").exists()


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from nasforge.search.tabular import load_problem, search_table
    table, storage, log, strategy, kill_at = sys.argv[1:6]
    problem = load_problem(Path(table), [("cifar10_valid_acc", "max"), ("raspi4_latency_ms", "min")])

    def on_evaluate(number, idx):
        with open(log, "a") as fh:
            fh.write(f"{number} {idx}\\n")
        if number == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # die mid-evaluation, like a lost worker

    search_table(problem, strategy, 0, 25, storage=storage, study_name="s", on_evaluate=on_evaluate)
    """
)


@needs_table
@pytest.mark.parametrize("strategy", ["hybrid", "optuna-tpe"])
def test_killed_search_resumes_without_reevaluating(tmp_path: Path, problem, strategy) -> None:
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    log = tmp_path / "evals.log"
    kill_at, budget = 12, 25
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(TABLE), storage, str(log), strategy, str(kill_at)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr  # really killed, not finished
    first = log.read_text().split("\n")
    assert len([x for x in first if x]) == kill_at + 1

    evaluated: list[int] = []
    study = search_table(
        problem,
        strategy,
        0,
        budget,
        storage=storage,
        study_name="s",
        on_evaluate=lambda n, i: evaluated.append(n),
    )
    lines = [tuple(map(int, x.split())) for x in log.read_text().split("\n") if x]
    before = [n for n, _ in lines]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == budget
    assert min(evaluated) > kill_at  # nothing finished before the kill was evaluated again
    numbers = before + evaluated
    for t in complete:
        assert numbers.count(t.number) == 1
    killed = study.trials[kill_at]
    assert killed.state == TrialState.FAIL  # the interrupted trial is closed, not left RUNNING
    assert len(numbers) == budget + 1  # the only extra evaluation is the interrupted one
