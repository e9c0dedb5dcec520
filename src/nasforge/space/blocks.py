"""A search space seen as a sum of blocks, for latency tables (the interface).

A :class:`BlockSpace` tells the profiler which blocks exist (for the cell space: each op at each
stage's channel count and resolution, node sums, reductions, stem, head; for the macro space:
every inverted-residual configuration, stem, head) and tells the predictor how many of each block
a given architecture contains. Predicted latency is then a calibrated regression on block sums
(``sum(count[b] * latency[b])``, optionally per kind of block: :meth:`BlockSpace.feature_sets`;
see :mod:`nasforge.hardware.latency_table`).

Each search space implements its decomposition next to its network
(:mod:`nasforge.space.cell_blocks`, :mod:`nasforge.space.macro_blocks`) and hands it out through
:meth:`nasforge.space.base.SearchSpace.block_space`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Block:
    """One profiled block.

    Attributes:
        key: Table key, e.g. ``"op:nor_conv_3x3:c16:32x32"``.
        make: Builds a fresh instance of the block's module.
        input_shape: Input shape without batch.
        chainable: Output shape equals input shape, so the profiler times a chain of blocks and
            takes the per-block difference ``(L(k) - L(1)) / (k - 1)``: that cancels the
            per-call overhead and the layout conversions a runtime does at graph boundaries
            (OpenVINO reorders to blocked layouts), which in a network happen once, not per
            block. Other blocks are timed alone minus a near-empty baseline.
    """

    key: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    chainable: bool = False

    def module(self, repeat: int = 1) -> nn.Module:
        """The block, or a chain of ``repeat`` independent copies."""
        if repeat == 1:
            return self.make()
        return nn.Sequential(*(self.make() for _ in range(repeat)))


class _Baseline(nn.Module):
    """Per-call runtime overhead: a near-empty graph over the same input (one element out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x[:, :1, :1, :1] + 1.0


def conv_out(size: int) -> int:
    """Spatial size after the stride-2, pad-1, 3x3 conv of a reduction block."""
    return (size - 1) // 2 + 1


class BlockSpace:
    """A search space decomposed into profiled blocks (interface).

    Attributes:
        name: Space name used in table keys (``"cell"``).
    """

    name: str = ""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable network configuration (part of a table's key)."""
        raise NotImplementedError

    def blocks(self) -> list[Block]:
        """All blocks a network of this space can contain."""
        raise NotImplementedError

    def baseline(self) -> Block:
        """Near-empty model whose latency is subtracted from non-chainable blocks."""
        return Block("baseline", _Baseline, self.input_shape())

    def feature_sets(self) -> list[tuple[str, ...]]:
        """Candidate calibration regressions for this space (see
        :func:`nasforge.hardware.latency_table.network_feature`); the fit keeps the one with
        the best leave-one-out error."""
        analytic = ("stat[mmacs_dense]", "stat[mmacs_depthwise]", "stat[mact]")
        return [
            ("block_sum", "const"),
            ("block_sum", "n_blocks", "const"),
            # Multiply-adds and activations: hardware-independent, so immune to profiling noise.
            (*analytic, "n_blocks", "const"),
            ("block_sum", *analytic, "const"),
            # Every block's latency in context: the table's, corrected block by block by the
            # calibration networks (ridge towards the profile; needs >= 8 networks).
            ("in_context", "const"),
        ]

    def block_counts(
        self, spec: Any, folds_constants: bool = False, precision: str = "fp32"
    ) -> Counter[str]:
        """How many times each block occurs in the network of ``spec``.

        Args:
            spec: An architecture of the space.
            folds_constants: The runtime compiles static shapes and folds computation that does
                not depend on the input (OpenVINO); ONNX Runtime with a dynamic batch does not.
            precision: ``"int8"`` counts blocks of the deployed INT8 graph, which may differ
                (see :meth:`derived_blocks`).
        """
        raise NotImplementedError

    def derived_blocks(self, precision: str) -> dict[str, str]:
        """Blocks counted but not profiled at ``precision``: ``{key: profiled key}``.

        Such a block starts from the latency of the profiled block it names; the calibration's
        in-context regression corrects it on the calibration networks (see
        :func:`nasforge.hardware.latency_table.fit_calibration`).
        """
        return {}

    def sample(self, rng: random.Random) -> Any:
        """A uniformly random architecture of the space."""
        raise NotImplementedError

    def build(self, spec: Any) -> nn.Module:
        """The standalone network of ``spec`` (random weights; latency does not depend on them)."""
        raise NotImplementedError

    def input_shape(self) -> tuple[int, ...]:
        """Network input shape without batch."""
        raise NotImplementedError
