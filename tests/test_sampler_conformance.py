"""Optuna's own sampler conformance suites, unmodified, against nasforge's strategies.

``optuna.testing.pytest_samplers`` holds the contract Optuna checks its samplers with: numerical
and categorical parameters, conditional and dynamic spaces, NaN objectives, fixed parameters,
relative (joint) sampling of numerical, categorical and mixed spaces, threads, multi-objective
independent sampling. nasforge's samplers propose categorical parameters jointly and must handle
everything else too (numerical parameters fall back to univariate TPE), never crash.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
from optuna.samplers import BaseSampler
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    MultiObjectiveSamplerTestCase,
    RelativeSamplerTestCase,
)

from nasforge.search.samplers import NASFORGE_SAMPLERS, make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Each strategy plain, and with a constraint that trials 0 and 2 violate (feasibility-aware
# ranking and acquisition must keep the contract too; the suite's NaN test expects trials 8 and
# 10, its best values, to count, so they must be feasible).
NAMES = [*sorted(NASFORGE_SAMPLERS), *(f"{n}+constraints" for n in sorted(NASFORGE_SAMPLERS))]


def _half_infeasible(trial: optuna.trial.FrozenTrial) -> list[float]:
    return [0.5 if trial.number in (0, 2) else -0.5]


def _factory(name: str) -> Callable[[], BaseSampler]:
    base, _, extra = name.partition("+")
    func = _half_infeasible if extra else None
    return lambda: make_sampler(base, 0, constraints_func=func)


class TestBasic(BasicSamplerTestCase):
    @pytest.fixture(params=NAMES)
    def sampler(self, request: pytest.FixtureRequest) -> Callable[[], BaseSampler]:
        return _factory(request.param)


class TestRelative(RelativeSamplerTestCase):
    @pytest.fixture(params=NAMES)
    def sampler(self, request: pytest.FixtureRequest) -> Callable[[], BaseSampler]:
        return _factory(request.param)


class TestMultiObjective(MultiObjectiveSamplerTestCase):
    @pytest.fixture(params=NAMES)
    def sampler(self, request: pytest.FixtureRequest) -> Callable[[], BaseSampler]:
        return _factory(request.param)
