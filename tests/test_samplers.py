"""Search strategies as Optuna samplers: registry, validity, no repeats, prior, shrinking."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from nasforge.errors import ConfigError
from nasforge.search.evolution import ProgressiveSampler
from nasforge.search.samplers import NASFORGE_SAMPLERS, STRATEGIES, make_sampler
from nasforge.space import nb201

optuna.logging.set_verbosity(optuna.logging.WARNING)

COST = {"none": 0.0, "skip_connect": 0.1, "avg_pool_3x3": 0.3, "nor_conv_1x1": 1.0}
COST["nor_conv_3x3"] = 3.0
GAIN = {"none": 0.0, "skip_connect": 0.5, "avg_pool_3x3": 0.2, "nor_conv_1x1": 1.0}
GAIN["nor_conv_3x3"] = 2.0


def toy_objective(trial: optuna.Trial) -> tuple[float, float]:
    """Additive two-objective toy on the cell space: 'accuracy' up, 'latency' down."""
    ops = [trial.suggest_categorical(p, list(nb201.OPS)) for p in nb201.PARAM_NAMES]
    active = nb201.active_edges(nb201.CellSpec(tuple(ops)))
    acc = sum(GAIN[o] for o, a in zip(ops, active, strict=True) if a)
    lat = 1.0 + sum(COST[o] for o in ops)
    return acc, lat


def run(name: str, n: int, seed: int = 0, **kw) -> optuna.Study:
    sampler = make_sampler(name, seed, search_space=nb201.search_space(), **kw)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(toy_objective, n_trials=n)
    return study


def test_registry_names() -> None:
    assert {"optuna-random", "optuna-tpe", "optuna-nsga2", "optuna-gp"} <= set(STRATEGIES)
    assert {"regevo", "progressive", "hybrid"} <= set(STRATEGIES)
    for name in STRATEGIES:
        assert isinstance(make_sampler(name, 0), optuna.samplers.BaseSampler)


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_sampler("darwin", 0)
    with pytest.raises(ConfigError, match="cannot use a prior"):
        make_sampler("optuna-tpe", 0, prior={"edge0": {"none": 1.0}})
    with pytest.raises(ConfigError, match="unknown choices"):
        make_sampler("hybrid", 0, nb201.search_space(), prior={"edge0": {"conv7": 1.0}})
    with pytest.raises(ConfigError, match="not in the search space"):
        make_sampler("hybrid", 0, nb201.search_space(), prior={"edge9": {"none": 1.0}})
    with pytest.raises(ConfigError, match="non-negative"):
        make_sampler("regevo", 0, nb201.search_space(), prior={"edge0": {"none": -1.0}})
    with pytest.raises(ConfigError, match="needs an explicit search_space"):
        make_sampler("hybrid", 0, None, prior={"edge0": {"none": 1.0}})
    with pytest.raises(ConfigError, match="n_init"):
        make_sampler("hybrid", 0, nb201.search_space(), options={"n_init": 1})
    with pytest.raises(ConfigError, match="unknown option 'colour' for 'hybrid'; allowed: "):
        make_sampler("hybrid", 0, nb201.search_space(), options={"colour": "red"})
    with pytest.raises(ConfigError, match="unknown option 'colour' for 'optuna-tpe'"):
        make_sampler("optuna-tpe", 0, options={"colour": "red"})


@pytest.mark.parametrize("name", sorted(NASFORGE_SAMPLERS))
def test_nasforge_samplers_propose_valid_distinct_cells(name: str) -> None:
    study = run(name, 60)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 60
    cells = [nb201.CellSpec.from_params(t.params) for t in trials]
    assert len(set(cells)) == 60  # the samplers never repeat an evaluated cell


@pytest.mark.parametrize("name", sorted(NASFORGE_SAMPLERS))
def test_seeded_runs_are_reproducible(name: str) -> None:
    a = [t.params for t in run(name, 25, seed=3).trials]
    b = [t.params for t in run(name, 25, seed=3).trials]
    c = [t.params for t in run(name, 25, seed=4).trials]
    assert a == b
    assert a != c


def test_hybrid_initial_population_follows_prior() -> None:
    prior = {p: {"nor_conv_3x3": 1.0} for p in nb201.PARAM_NAMES}
    study = run("hybrid", 1, prior=prior)
    assert set(study.trials[0].params.values()) == {"nor_conv_3x3"}


def test_hybrid_finds_more_of_the_toy_front_than_random() -> None:
    # Exact toy front from full enumeration; compare how many front cells each finds in 60 trials.
    vals = []
    for i in range(nb201.NUM_ARCHS):
        t = optuna.trial.FixedTrial(nb201.CellSpec.from_index(i).to_params())
        vals.append(toy_objective(t))
    losses = np.array(vals) * np.array([-1.0, 1.0])
    from nasforge.search.pareto import is_non_dominated

    front = {i for i, f in enumerate(is_non_dominated(losses)) if f}

    def found(name: str, seed: int) -> int:
        s = run(name, 60, seed=seed)
        return sum(nb201.CellSpec.from_params(t.params).to_index() in front for t in s.trials)

    hybrid = sum(found("hybrid", s) for s in range(2))
    random = sum(found("optuna-random", s) for s in range(2))
    assert hybrid > random


def test_progressive_drops_bad_choices_over_stages() -> None:
    sampler = ProgressiveSampler(seed=0, search_space=nb201.search_space(), stage_size=20)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        ops = [trial.suggest_categorical(p, list(nb201.OPS)) for p in nb201.PARAM_NAMES]
        # avg_pool is dominated everywhere: less gain than conv1x1 and more cost than skip.
        acc = sum({"avg_pool_3x3": -5.0}.get(o, GAIN[o]) for o in ops)
        return acc, 1.0 + sum(COST[o] for o in ops)

    study.optimize(objective, n_trials=100)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    choices = [list(nb201.OPS)] * 6
    idx = np.array([[nb201.OPS.index(t.params[p]) for p in nb201.PARAM_NAMES] for t in done])
    losses = np.array([[-t.values[0], t.values[1]] for t in done])
    assert all(len(a) == 5 for a in sampler.allowed_choices(choices, idx[:10], losses[:10]))
    allowed = sampler.allowed_choices(choices, idx, losses)
    pool = nb201.OPS.index("avg_pool_3x3")
    assert sum(pool in a for a in allowed) <= 2  # dropped on most edges
    assert all(len(a) >= 2 for a in allowed)


def test_samplers_share_one_study_and_respect_other_params() -> None:
    # A study can switch strategies mid-way and keep numeric params (sampled independently).
    study = optuna.create_study(
        directions=["maximize", "minimize"],
        sampler=make_sampler("optuna-random", 0),
    )

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        acc, lat = toy_objective(trial)
        return acc - lr, lat

    study.optimize(objective, n_trials=10)
    study.sampler = make_sampler("hybrid", 0, nb201.search_space())
    study.optimize(objective, n_trials=15)
    assert len(study.trials) == 25
    assert all(1e-4 <= t.params["lr"] <= 1e-1 for t in study.trials)
    cells = {nb201.CellSpec.from_params(t.params) for t in study.trials[10:]}
    assert len(cells) == 15
