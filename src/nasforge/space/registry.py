"""The search spaces nasforge knows, by name.

Each space is one module that subclasses :class:`~nasforge.space.base.SearchSpace` and decorates
the class with :func:`register`. The built-in modules are listed in :data:`BUILTIN_MODULES` and
imported on first use (they are light: no torch at import), so ``get_space("macro")`` works
without importing anything by hand; a space defined elsewhere is available once its module is
imported. Adding a space to nasforge is its module plus one line in :data:`BUILTIN_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from nasforge.errors import ConfigError
from nasforge.space.base import FeatureFn, SearchSpace

BUILTIN_MODULES: tuple[str, ...] = (
    "nasforge.space.cell_space",
    "nasforge.space.macro_space",
)
"""The modules of the built-in spaces (each registers its space when imported)."""

DEFAULT_SPACE = "cell"
"""``space.kind`` when params do not say, and the space of a ``model.json`` or ``pareto.json``
written before files named their space."""

_SPACES: dict[str, type[SearchSpace]] = {}
_loaded = False


def register(cls: type[SearchSpace]) -> type[SearchSpace]:
    """Class decorator: make ``cls`` available as ``get_space(cls.name)``.

    Raises:
        ConfigError: another class is registered under the same name.
    """
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"search space class {cls.__name__} needs a non-empty name")
    other = _SPACES.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ConfigError(
            f"search space {name!r} is registered twice: {other.__module__}.{other.__qualname__}"
            f" and {cls.__module__}.{cls.__qualname__}"
        )
    _SPACES[name] = cls
    return cls


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def space_names() -> tuple[str, ...]:
    """Names of every registered space (built-in ones first)."""
    _load_builtin()
    return tuple(_SPACES)


def get_space(name: str) -> type[SearchSpace]:
    """The space class registered as ``name``.

    Raises:
        ConfigError: no space has that name (the message lists the known ones).
    """
    _load_builtin()
    cls = _SPACES.get(name)
    if cls is None:
        raise ConfigError(f"unknown search space '{name}'; known: {', '.join(_SPACES)}")
    return cls


def space_of(doc: Mapping[str, Any]) -> type[SearchSpace]:
    """The space a ``pareto.json`` or ``model.json`` names (:data:`DEFAULT_SPACE` if none).

    Raises:
        ConfigError: it names an unknown space.
    """
    return get_space(str(doc.get("space", DEFAULT_SPACE)))


def surrogate_features(names: list[str], choices: list[list[Any]]) -> FeatureFn | None:
    """The structural surrogate features of the space whose encoding ``names``/``choices`` are
    (:meth:`SearchSpace.surrogate_features`), or None when no registered space claims them."""
    _load_builtin()
    for cls in _SPACES.values():
        fn = cls.surrogate_features(names, choices)
        if fn is not None:
            return fn
    return None
