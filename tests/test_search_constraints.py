"""Constraints (Optuna's constraints_func), validity (is_valid, ask_valid) and sampler options."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import TrialState

from nasforge.errors import ConfigError
from nasforge.search.base import INVALID_ATTR, ask_valid
from nasforge.search.pareto import constrained_rank
from nasforge.search.samplers import (
    NASFORGE_SAMPLERS,
    STRATEGIES,
    default_sampler_options,
    make_sampler,
    validate_sampler_options,
)
from nasforge.search.tabular import is_connected_cell, load_problem, search_table
from nasforge.space import nb201

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NASFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
TABLE = SHARED / "nb201" / "nb201_dev.csv"
needs_table = pytest.mark.skipif(
    not TABLE.is_file(), reason=f"NB201 table not found at {TABLE} (set NASFORGE_SHARED_DATA)"
)
OURS = sorted(NASFORGE_SAMPLERS)
DISTS = {
    p: optuna.distributions.CategoricalDistribution(list(nb201.OPS)) for p in nb201.PARAM_NAMES
}

GAIN = {"none": 0.0, "skip_connect": 0.5, "avg_pool_3x3": 0.2, "nor_conv_1x1": 1.0}
GAIN["nor_conv_3x3"] = 2.0
COST = {"none": 0.0, "skip_connect": 0.1, "avg_pool_3x3": 0.3, "nor_conv_1x1": 1.0}
COST["nor_conv_3x3"] = 3.0
MIN_GAIN = 6.0  # the toy constraint: "accuracy" >= 6 (16% of the cells satisfy it)


def toy_values(params: dict) -> tuple[float, float]:
    ops = [params[p] for p in nb201.PARAM_NAMES]
    active = nb201.active_edges(nb201.CellSpec(tuple(ops)))
    acc = sum(GAIN[o] for o, a in zip(ops, active, strict=True) if a)
    return acc, 1.0 + sum(COST[o] for o in ops)


def toy_constraint(trial: optuna.trial.FrozenTrial) -> list[float]:
    return [MIN_GAIN - toy_values(trial.params)[0]]


def toy_feasible_share() -> float:
    cells = [c.to_params() for c in nb201.all_cells()]
    return float(np.mean([toy_values(p)[0] >= MIN_GAIN for p in cells]))


def run_toy(name: str, n: int, seed: int = 0, **kw) -> optuna.Study:
    sampler = make_sampler(name, seed, nb201.search_space(), **kw)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(n):
        trial = ask_valid(study, DISTS, is_connected_cell)
        study.tell(trial, toy_values(trial.params))
    return study


# -- Deb's constrained domination ------------------------------------------------------------


def test_constrained_rank_puts_feasible_first_then_less_violation() -> None:
    losses = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5], [0.5, 2.0], [5.0, 5.0]])
    viol = np.array([3.0, 0.0, 0.0, 1.0, 0.0])
    ranks = constrained_rank(losses, viol)
    # feasible: 1 and 2 non-dominated (rank 0), 4 dominated (1); then violation 1 (2), 3 (3)
    assert ranks.tolist() == [3, 0, 0, 2, 1]
    assert constrained_rank(losses, None).tolist()[0] == 0


# -- constraints: nasforge's strategies honour them -------------------------------------------


@pytest.mark.parametrize("name", OURS)
def test_constraints_are_stored_like_optunas(name: str) -> None:
    study = run_toy(name, 8, constraints_func=toy_constraint)
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert t.system_attrs[_CONSTRAINTS_KEY] == tuple(toy_constraint(t))
            assert t.constraints == {"0": toy_constraint(t)[0]}


@pytest.mark.parametrize("name", OURS)
def test_toy_later_proposals_mostly_feasible(name: str) -> None:
    share = toy_feasible_share()
    assert share < 0.25  # the constraint rules out most of the space
    n = 80
    rates, found = [], []
    for seed in range(2):
        study = run_toy(name, n, seed=seed, constraints_func=toy_constraint)
        done = study.get_trials(states=(TrialState.COMPLETE,))
        late = done[n // 2 :]
        rates.append(np.mean([toy_constraint(t)[0] <= 0 for t in late]))
        found.append(sum(toy_constraint(t)[0] <= 0 for t in done))
    assert min(found) >= 5
    # later proposals are mostly feasible, far above the feasible share of the space
    assert np.mean(rates) >= 0.5, (rates, share)


@needs_table
@pytest.mark.parametrize("name", OURS)
def test_table_constraint_later_proposals_feasible_and_front_found(name: str) -> None:
    objectives = [("cifar10_valid_acc", "max"), ("raspi4_latency_ms", "min")]
    problem = load_problem(TABLE, objectives, [("cifar10_valid_acc", ">=", 88.0)])
    share = problem.feasible.mean()
    assert share < 0.5  # most of the space is infeasible
    n = 60
    late_rates, gaps = [], []
    for seed in range(2):
        study = search_table(problem, name, seed, n)
        done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
        idx = [nb201.CellSpec.from_params(t.params).to_index() for t in done]
        late_rates.append(problem.feasible[idx[n // 2 :]].mean())
        gaps.append(problem.gap(idx))
        # no evaluation was spent on a degenerate cell
        assert all(is_connected_cell(t.params) for t in done)
    # mostly feasible, and clearly above the feasible share of the space
    assert np.mean(late_rates) >= max(0.5, share + 0.1), late_rates
    assert max(gaps) < 0.6, gaps  # feasible front points found (gap 1: none found)


# -- constraints: errors -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [*OURS, "optuna-nsga2", "optuna-tpe"])
def test_constraints_func_nan_is_a_clear_error(name: str) -> None:
    with pytest.raises(ConfigError, match="NaN"):
        run_toy(name, 3, constraints_func=lambda t: [float("nan")])


@pytest.mark.parametrize("name", [*OURS, "optuna-nsga2"])
def test_constraints_func_changing_length_is_a_clear_error(name: str) -> None:
    with pytest.raises(ConfigError, match="returned 2 values for trial 1, but 1"):
        run_toy(name, 3, constraints_func=lambda t: [1.0] * (1 + min(t.number, 1)))


@pytest.mark.parametrize("name", OURS)
def test_constraints_func_not_numbers_is_a_clear_error(name: str) -> None:
    with pytest.raises(ConfigError, match="sequence of floats"):
        run_toy(name, 2, constraints_func=lambda t: 1.0)


def test_constraints_reach_optunas_samplers_and_random_ignores_them() -> None:
    for name in ("optuna-nsga2", "optuna-tpe", "optuna-gp"):
        assert make_sampler(name, 0, constraints_func=toy_constraint)._constraints_func is not None
    study = run_toy("optuna-random", 3, constraints_func=toy_constraint)
    assert all(_CONSTRAINTS_KEY not in t.system_attrs for t in study.trials)


# -- is_valid and ask_valid --------------------------------------------------------------------


@pytest.mark.parametrize("name", OURS)
def test_nasforge_samplers_never_propose_invalid_points(name: str) -> None:
    sampler = make_sampler(name, 0, nb201.search_space(), is_valid=is_connected_cell)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(60):
        trial = study.ask(DISTS)
        assert is_connected_cell(trial.params)
        study.tell(trial, toy_values(trial.params))


def test_ask_valid_prunes_invalid_proposals_for_optunas_samplers() -> None:
    study = run_toy("optuna-random", 60)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(complete) == 60
    assert all(is_connected_cell(t.params) for t in complete)
    assert all(t.user_attrs[INVALID_ATTR] and not is_connected_cell(t.params) for t in pruned)


def test_ask_valid_gives_up_with_a_clear_error() -> None:
    study = optuna.create_study(sampler=make_sampler("optuna-random", 0))
    with pytest.raises(ConfigError, match="5 invalid points in a row"):
        ask_valid(study, DISTS, lambda p: False, max_tries=5, repair_after=0)
    assert len(study.get_trials(states=(TrialState.PRUNED,))) == 5


def test_is_valid_needs_a_search_space() -> None:
    with pytest.raises(ConfigError, match="is_valid needs an explicit search_space"):
        make_sampler("hybrid", 0, is_valid=is_connected_cell)


# -- options -----------------------------------------------------------------------------------


def test_validate_sampler_options_accepts_constructor_keywords() -> None:
    assert validate_sampler_options("optuna-nsga2", {"population_size": 8}) == {
        "population_size": 8
    }
    assert validate_sampler_options("optuna-tpe", {"n_startup_trials": 5, "multivariate": True})
    assert validate_sampler_options("optuna-gp", {"n_startup_trials": 5})
    assert validate_sampler_options("hybrid", {"n_init": 8, "p_mutation": 0.2})
    assert validate_sampler_options("regevo", {"population_size": 10, "tournament_size": 3})
    for name in STRATEGIES:
        assert validate_sampler_options(name, {}) == {}


def test_validate_sampler_options_errors_name_the_key_or_value() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown option 'populaton_size' for 'optuna-nsga2'; "
        r"allowed: population_size, mutation, mutation_prob",
    ):
        validate_sampler_options("optuna-nsga2", {"populaton_size": 8})
    for key in ("seed", "search_space", "prior", "constraints_func"):
        with pytest.raises(ConfigError, match=f"option '{key}' of 'hybrid' is reserved"):
            validate_sampler_options("hybrid", {key: None})
    with pytest.raises(ConfigError, match="bad options for 'optuna-nsga2'.*population_size"):
        validate_sampler_options("optuna-nsga2", {"population_size": 1})
    with pytest.raises(ConfigError, match="n_init"):
        validate_sampler_options("hybrid", {"n_init": 1})
    with pytest.raises(ConfigError, match="unknown strategy"):
        validate_sampler_options("darwin", {})
    for err in (validate_sampler_options, default_sampler_options):
        with pytest.raises(ConfigError):
            err("darwin", 1)  # type: ignore[arg-type]


def test_default_sampler_options_size_nsga2_to_the_budget() -> None:
    assert default_sampler_options("optuna-nsga2", 30) == {"population_size": 4}
    assert default_sampler_options("optuna-nsga2", 100) == {"population_size": 10}
    assert default_sampler_options("optuna-nsga2", 300) == {"population_size": 30}
    assert default_sampler_options("optuna-nsga2", 10) == {"population_size": 4}
    assert default_sampler_options("optuna-nsga2", 10_000) == {"population_size": 50}
    assert default_sampler_options("hybrid", 30) == {}
    with pytest.raises(ConfigError, match="trials"):
        default_sampler_options("optuna-nsga2", 0)


def test_ask_valid_with_repair_still_names_a_space_with_nothing_valid() -> None:
    study = optuna.create_study(sampler=make_sampler("optuna-random", 0))
    with pytest.raises(ConfigError, match="3 invalid points in a row .*rejects everything"):
        ask_valid(study, DISTS, lambda p: False, max_tries=50, repair_after=3)
