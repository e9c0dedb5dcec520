"""Search spaces as sums of profiled blocks: moved to :mod:`nasforge.space`.

Each search space owns its block decomposition (:mod:`nasforge.space.blocks` for the interface,
:mod:`nasforge.space.cell_blocks`, :mod:`nasforge.space.macro_blocks`) and hands it out through
:meth:`nasforge.space.base.SearchSpace.block_space`. The names below stay importable from here.
"""

from __future__ import annotations

from typing import Any

from nasforge.errors import ConfigError
from nasforge.space.blocks import Block, BlockSpace
from nasforge.space.cell import computed_edges
from nasforge.space.cell_blocks import CellBlockSpace
from nasforge.space.macro_blocks import MacroBlockSpace

__all__ = [
    "SPACES",
    "Block",
    "BlockSpace",
    "CellBlockSpace",
    "MacroBlockSpace",
    "computed_edges",
    "get_space",
]

SPACES: dict[str, type[BlockSpace]] = {cls.name: cls for cls in (CellBlockSpace, MacroBlockSpace)}
"""The built-in block spaces, by :attr:`BlockSpace.name`."""


def get_space(name: str, **kwargs: Any) -> BlockSpace:
    """Build a built-in block space by name from its constructor's keywords.

    Args:
        name: A key of :data:`SPACES`.
        **kwargs: :class:`CellBlockSpace`'s or :class:`MacroBlockSpace`'s arguments.

    Raises:
        ConfigError: Unknown space.
    """
    cls = SPACES.get(name)
    if cls is None:
        raise ConfigError(f"unknown search space '{name}'; known: {', '.join(SPACES)}")
    return cls(**kwargs)
