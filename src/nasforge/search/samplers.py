"""Registry of search strategies, all of them Optuna samplers.

Every strategy shares Optuna's studies, storages (SQLite, RDB), resumption and plots. Names:

* ``optuna-random``, ``optuna-tpe``, ``optuna-nsga2``, ``optuna-gp``: Optuna's own samplers, the
  baselines, with Optuna's defaults except what ``options`` (or :func:`default_sampler_options`)
  sets.
* ``regevo``: multi-objective regularized evolution (:mod:`nasforge.search.evolution`).
* ``progressive``: progressive shrinking of the space (:mod:`nasforge.search.evolution`).
* ``hybrid``: prior-steered evolution with a surrogate screen (:mod:`nasforge.search.hybrid`).

Constraints (``constraints_func``, Optuna's convention: ``<= 0`` satisfied) reach
``optuna-nsga2``, ``optuna-tpe``, ``optuna-gp`` (Optuna's own constrained variants) and nasforge's
three strategies (Deb's constrained domination; ``hybrid`` also models feasibility).
``optuna-random`` ignores constraints: it does not learn anything. ``is_valid`` reaches nasforge's
strategies only; with Optuna's, ask through :func:`nasforge.search.base.ask_valid`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.samplers import BaseSampler

from nasforge.errors import ConfigError
from nasforge.search.base import (
    ConstraintsFunc,
    IsValid,
    Prior,
    SearchSpace,
    checked_constraints_func,
    validate_prior,
)
from nasforge.search.evolution import ProgressiveSampler, RegularizedEvolutionSampler
from nasforge.search.hybrid import HybridSampler

OPTUNA_SAMPLERS: Mapping[str, Callable[..., BaseSampler]] = {
    "optuna-random": optuna.samplers.RandomSampler,
    "optuna-tpe": optuna.samplers.TPESampler,
    "optuna-nsga2": optuna.samplers.NSGAIISampler,
    "optuna-gp": optuna.samplers.GPSampler,
}
NASFORGE_SAMPLERS: Mapping[str, Callable[..., BaseSampler]] = {
    "regevo": RegularizedEvolutionSampler,
    "progressive": ProgressiveSampler,
    "hybrid": HybridSampler,
}
STRATEGIES: tuple[str, ...] = (*OPTUNA_SAMPLERS, *NASFORGE_SAMPLERS)
#: Set by :func:`make_sampler` itself, never through ``options``.
RESERVED_OPTIONS: tuple[str, ...] = (
    "seed",
    "search_space",
    "prior",
    "constraints_func",
    "is_valid",
)
#: Strategies that take a ``constraints_func``.
CONSTRAINED: frozenset[str] = frozenset(
    {"optuna-nsga2", "optuna-tpe", "optuna-gp", *NASFORGE_SAMPLERS}
)
#: NSGA-II population: about ``trials / NSGA2_GENERATIONS`` (so a budget runs about that many
#: generations), clamped to ``NSGA2_POPULATION_RANGE``; see :func:`default_sampler_options`.
NSGA2_GENERATIONS = 10
NSGA2_POPULATION_RANGE = (4, 50)


def _factory(name: str) -> Callable[..., BaseSampler]:
    if name in OPTUNA_SAMPLERS:
        return OPTUNA_SAMPLERS[name]
    if name in NASFORGE_SAMPLERS:
        return NASFORGE_SAMPLERS[name]
    raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


def allowed_options(name: str) -> tuple[str, ...]:
    """The constructor keywords a strategy accepts through ``options``."""
    params = inspect.signature(_factory(name)).parameters
    return tuple(
        p
        for p, spec in params.items()
        if p not in RESERVED_OPTIONS and spec.kind not in (spec.VAR_POSITIONAL, spec.VAR_KEYWORD)
    )


def _check_option_keys(name: str, options: Mapping[str, Any]) -> None:
    if not isinstance(options, Mapping):
        raise ConfigError(f"options for {name!r} must be a mapping, got {type(options).__name__}")
    allowed = allowed_options(name)
    for key in options:
        if key in RESERVED_OPTIONS:
            raise ConfigError(
                f"option {key!r} of {name!r} is reserved (set by nasforge, not through options); "
                f"allowed: {', '.join(allowed)}"
            )
        if key not in allowed:
            raise ConfigError(
                f"unknown option {key!r} for {name!r}; allowed: {', '.join(allowed) or 'none'}"
            )


def make_sampler(
    name: str,
    seed: int,
    search_space: SearchSpace | None = None,
    prior: Prior | None = None,
    *,
    constraints_func: ConstraintsFunc | None = None,
    is_valid: IsValid | None = None,
    options: Mapping[str, Any] | None = None,
) -> BaseSampler:
    """Build a search strategy by name.

    Args:
        name: one of :data:`STRATEGIES`.
        seed: random seed.
        search_space: ``{param: choices}`` proposed jointly by nasforge's samplers (for a cell:
            :func:`nasforge.space.nb201.search_space`); Optuna's samplers infer it from the
            trials and ignore it.
        prior: op-probability prior ``{param: {choice: weight}}`` (e.g. the softmax of DARTS
            architecture weights per edge); used by ``hybrid``, ``regevo`` and ``progressive``,
            rejected for Optuna's samplers.
        constraints_func: ``FrozenTrial -> Sequence[float]``, Optuna's convention (a value
            ``<= 0`` is satisfied), evaluated after each COMPLETE or PRUNED trial and stored
            under Optuna's constraints system attribute. Passed to ``optuna-nsga2``,
            ``optuna-tpe`` and ``optuna-gp``; honoured by nasforge's strategies;
            ``optuna-random`` ignores it. A NaN, a non-number or a change in the number of
            values raises :class:`ConfigError`.
        is_valid: ``params -> bool`` on the jointly proposed parameters; nasforge's strategies
            never propose a point it rejects (needs ``search_space``). Optuna's samplers cannot
            be told: ask with :func:`nasforge.search.base.ask_valid` (it works for every
            strategy).
        options: the strategy's own constructor keywords (see :func:`validate_sampler_options`).

    Returns:
        The sampler.

    Raises:
        ConfigError: unknown name, a prior for a sampler that cannot use it, bad options.
    """
    factory = _factory(name)
    _check_option_keys(name, options or {})
    opts = dict(options or {})
    if constraints_func is not None and not callable(constraints_func):
        raise ConfigError("constraints_func must be callable: FrozenTrial -> [float, ...]")
    if is_valid is not None and not callable(is_valid):
        raise ConfigError("is_valid must be callable: params -> bool")
    kw: dict[str, Any] = {"seed": seed, **opts}
    if name in OPTUNA_SAMPLERS:
        if prior is not None:
            raise ConfigError(f"strategy {name!r} cannot use a prior; use 'hybrid'")
        validate_prior(None, search_space)
        if constraints_func is not None and name in CONSTRAINED:
            kw["constraints_func"] = checked_constraints_func(constraints_func)
    else:
        kw.update(search_space=search_space, prior=prior, is_valid=is_valid)
        if constraints_func is not None:
            kw["constraints_func"] = constraints_func
    try:
        with warnings.catch_warnings():
            # Optuna 5 deprecates constraints_func in favour of Trial.set_constraint (both feed
            # the same system attribute); nasforge keeps the callable, which works with storage
            # written by either.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return factory(**kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad options for {name!r}: {exc}".splitlines()[0]) from exc


def validate_sampler_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check a strategy's ``options`` by introspecting and constructing its sampler once.

    Args:
        name: one of :data:`STRATEGIES`.
        options: constructor keywords of the strategy, e.g. ``{"population_size": 8}`` for
            ``optuna-nsga2``, ``{"n_startup_trials": 5, "multivariate": True}`` for
            ``optuna-tpe``, ``{"n_init": 8}`` for ``hybrid``. The keys of
            :data:`RESERVED_OPTIONS` are set by nasforge and refused here.

    Returns:
        The options, as a new dict.

    Raises:
        ConfigError: one line naming the bad key (and the allowed ones) or the bad value.
    """
    _factory(name)
    _check_option_keys(name, options or {})
    opts = dict(options or {})
    space = None
    if name in NASFORGE_SAMPLERS:
        from nasforge.space import nb201

        space = nb201.search_space()
    make_sampler(name, 0, search_space=space, options=opts)
    return opts


def default_sampler_options(name: str, trials: int) -> dict[str, Any]:
    """Options nasforge sets for a strategy given the trial budget (user options win).

    * ``optuna-nsga2``: ``population_size = clamp(round(trials / 10), 4, 50)``, i.e. about 10
      generations. Optuna's default (50) never leaves the random first generation within a 30-50
      trial budget. Measured on the NAS-Bench-201 table (problems a, b, c of
      ``benchmarks/bench_search_nb201.py``, degenerate cells skipped, 20 seeds; median HV gap
      averaged over the three problems) for population 4 / 6 / 10 / 20 / 30 / 50: at 100 trials
      0.202 / 0.194 / **0.178** / 0.191 / 0.209 / 0.235; at 300 trials 0.113 / 0.096 / 0.076 /
      **0.068** / 0.087 / 0.103; at 30 trials all within noise (0.37-0.38). ``trials / 10`` is
      best at 100 and second at 300; ``trials / 5`` would be 0.191 and 0.103.
    * others: nothing (their defaults already scale with the budget).

    Raises:
        ConfigError: unknown strategy or ``trials < 1``.
    """
    _factory(name)
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    if name == "optuna-nsga2":
        lo, hi = NSGA2_POPULATION_RANGE
        return {"population_size": int(min(hi, max(lo, round(trials / NSGA2_GENERATIONS))))}
    return {}
