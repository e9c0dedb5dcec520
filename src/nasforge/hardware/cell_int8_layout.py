"""Moved to :mod:`nasforge.space.cell_int8_layout` (the cell space's INT8 block counting)."""

from nasforge.space.cell_int8_layout import float_output_convs

__all__ = ["float_output_convs"]
