"""The macro supernet's side of the search: its configured choices, phases and saved weights.

The macro search space (:mod:`nasforge.space.macro_space`) trains and loads its supernet through
these: the part of the space a run searches (:func:`choices_from_params`, as Optuna
distributions: :func:`macro_distributions`), Once-for-All's progressive-shrinking phases within it
(:func:`progressive_phases`, :func:`split_epochs`) and the trained supernet a search wrote
(:func:`load_macro_supernet`). The search itself is the one driver of every space
(:mod:`nasforge.search.driver`, run by :mod:`nasforge.stages.search`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from nasforge.space.macro import macro_arch_str, macro_search_space
from nasforge.supernet.macro_supernet import FULL_SPACE, ElasticChoices, MacroSupernet

__all__ = [
    "choices_from_params",
    "choices_search_space",
    "configured_choices",
    "load_macro_supernet",
    "macro_arch_str",
    "macro_distributions",
    "progressive_phases",
    "split_epochs",
]


def choices_search_space(choices: ElasticChoices = FULL_SPACE) -> dict[str, list]:
    """Sampler parameters (``stage0_depth`` ...) restricted to ``choices``."""
    by_field = {
        "depth": choices.depths,
        "width": choices.widths,
        "kernel": choices.kernels,
        "expand": choices.expands,
    }
    return {name: list(by_field[name.split("_", 1)[1]]) for name in macro_search_space()}


def macro_distributions(
    choices: ElasticChoices = FULL_SPACE,
) -> dict[str, optuna.distributions.CategoricalDistribution]:
    """Optuna distributions of the macro space's sampler parameters (within ``choices``)."""
    return {
        name: optuna.distributions.CategoricalDistribution(values)
        for name, values in choices_search_space(choices).items()
    }


def progressive_phases(choices: ElasticChoices = FULL_SPACE) -> tuple[ElasticChoices, ...]:
    """OFA's progressive-shrinking phases inside ``choices``: the largest network, then elastic
    kernel, depth, and width + expansion (:data:`DEFAULT_PHASES` for the full space).

    A phase that opens nothing new (its dimension has one choice in ``choices``) is dropped.
    """
    top = dict(
        depths=choices.depths[-1:],
        widths=choices.widths[-1:],
        kernels=choices.kernels[-1:],
        expands=choices.expands[-1:],
    )
    candidates = [
        ElasticChoices("largest", **top),
        ElasticChoices("kernel", **{**top, "kernels": choices.kernels}),
        ElasticChoices("depth", **{**top, "kernels": choices.kernels, "depths": choices.depths}),
        ElasticChoices(
            "width",
            depths=choices.depths,
            widths=choices.widths,
            kernels=choices.kernels,
            expands=choices.expands,
        ),
    ]

    def dims(c: ElasticChoices) -> tuple:
        return (c.depths, c.widths, c.kernels, c.expands)

    phases = [candidates[0]]
    for c in candidates[1:]:
        if dims(c) != dims(phases[-1]):
            phases.append(c)
    return tuple(phases)


def choices_from_params(params: Any) -> ElasticChoices:
    """The part of the macro space configured in ``params.space.macro`` (full space if absent)."""
    space = getattr(params, "space", None)
    return configured_choices(None if space is None else space.macro)


def configured_choices(macro: Any) -> ElasticChoices:
    """The part of the macro space a ``space.macro`` section configures (None: all of it)."""
    if macro is None:
        return FULL_SPACE
    return ElasticChoices(
        "configured",
        depths=tuple(macro.depths),
        widths=tuple(macro.widths),
        kernels=tuple(macro.kernels),
        expands=tuple(macro.expands),
    )


def load_macro_supernet(search_dir: Path, in_channels: int, num_classes: int) -> MacroSupernet:
    """The trained supernet a macro search saved (``supernet.safetensors``).

    Raises:
        ModelFileError: the file is missing or does not match the macro supernet.
    """
    from safetensors.torch import load_file

    from nasforge.errors import ModelFileError

    f = Path(search_dir) / "supernet.safetensors"
    if not f.is_file():
        raise ModelFileError(f"not a macro search output (no supernet.safetensors): {search_dir}")
    supernet = MacroSupernet(in_channels, num_classes)
    try:
        supernet.load_state_dict(load_file(str(f)))
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0]
        raise ModelFileError(f"{f} is not a macro supernet checkpoint: {first}") from None
    return supernet.eval()


def split_epochs(total: int, n_phases: int) -> list[int]:
    """Spread ``total`` supernet epochs over ``n_phases`` phases (the first, largest-only phase
    gets the remainder: OFA trains the full network longest); every phase gets at least one."""
    base = max(1, total // n_phases)
    epochs = [base] * n_phases
    epochs[0] += max(0, total - base * n_phases)
    return epochs
