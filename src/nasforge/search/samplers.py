"""Registry of search strategies, all of them Optuna samplers.

Every strategy shares Optuna's studies, storages (SQLite, RDB), resumption and plots. Names:

* ``optuna-random``, ``optuna-tpe``, ``optuna-nsga2``, ``optuna-gp``: Optuna's own samplers with
  default settings (only the seed set), the baselines.
* ``regevo``: multi-objective regularized evolution (:mod:`nasforge.search.evolution`).
* ``progressive``: progressive shrinking of the space (:mod:`nasforge.search.evolution`).
* ``hybrid``: prior-steered evolution with a surrogate screen (:mod:`nasforge.search.hybrid`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.samplers import BaseSampler

from nasforge.errors import ConfigError
from nasforge.search.base import Prior, SearchSpace, validate_prior
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


def make_sampler(
    name: str,
    seed: int,
    search_space: SearchSpace | None = None,
    prior: Prior | None = None,
    **kw: Any,
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
        **kw: extra keyword arguments for the sampler's constructor.

    Returns:
        The sampler.

    Raises:
        ConfigError: unknown name, a prior for a sampler that cannot use it, or bad arguments.
    """
    if name in OPTUNA_SAMPLERS:
        if prior is not None:
            raise ConfigError(f"strategy {name!r} cannot use a prior; use 'hybrid'")
        validate_prior(None, search_space)
        factory = OPTUNA_SAMPLERS[name]
        try:
            return factory(seed=seed, **kw)
        except TypeError as exc:
            raise ConfigError(f"bad arguments for {name!r}: {exc}") from exc
    if name in NASFORGE_SAMPLERS:
        try:
            return NASFORGE_SAMPLERS[name](seed=seed, search_space=search_space, prior=prior, **kw)
        except TypeError as exc:
            raise ConfigError(f"bad arguments for {name!r}: {exc}") from exc
    raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
