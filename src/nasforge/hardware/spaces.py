"""Search spaces seen as sums of blocks, for latency tables.

A :class:`BlockSpace` tells the profiler which blocks exist (each op at each stage's channel count
and resolution, node sums, reductions, stem, head) and tells the predictor how many of each block
a given architecture contains. Predicted latency is then a calibrated function of
``sum(count[b] * latency[b])`` (see :mod:`nasforge.hardware.latency_table`).

The cell space (the NAS-Bench-201 network of :mod:`nasforge.space.cell`) is implemented here. A
new space is one more :class:`BlockSpace` subclass registered in :data:`SPACES`.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nasforge.errors import ConfigError
from nasforge.space.cell import (
    CellNetworkShape,
    ReLUConvBN,
    ResidualReduction,
    build_cell_network,
    computed_edges,
    make_op,
)
from nasforge.space.nb201 import EDGES, N_NODES, OPS, CellSpec, active_edges


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


class _Add(nn.Module):
    """A node sum of two same-shaped tensors (the input added to itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + x


class _Zeros(nn.Module):
    """A node with no live input: NB201 makes it zeros shaped like the cell input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.zeros_like(x)


class _Head(nn.Module):
    """BN-ReLU, global average pooling, flatten, linear: the network's classifier head."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


class _Baseline(nn.Module):
    """Per-call runtime overhead: a near-empty graph over the same input (one element out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x[:, :1, :1, :1] + 1.0


def _op_without_relu(op: str, channels: int) -> nn.Module:
    """A cell op as profiled: conv ops without their leading ReLU (counted once per source
    node as a ``relu`` block, since runtimes merge the identical ReLUs of sibling edges)."""
    module = make_op(op, channels)
    assert module is not None
    if isinstance(module, ReLUConvBN):
        return nn.Sequential(*list(module.op.children())[1:])
    return module


def _conv_out(size: int) -> int:
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

    def block_counts(self, spec: Any, folds_constants: bool = False) -> Counter[str]:
        """How many times each block occurs in the network of ``spec``.

        Args:
            spec: An architecture of the space.
            folds_constants: The runtime compiles static shapes and folds computation that does
                not depend on the input (OpenVINO); ONNX Runtime with a dynamic batch does not.
        """
        raise NotImplementedError

    def sample(self, rng: random.Random) -> Any:
        """A uniformly random architecture of the space."""
        raise NotImplementedError

    def build(self, spec: Any) -> nn.Module:
        """The standalone network of ``spec`` (random weights; latency does not depend on them)."""
        raise NotImplementedError

    def input_shape(self) -> tuple[int, ...]:
        """Network input shape without batch."""
        raise NotImplementedError


class CellBlockSpace(BlockSpace):
    """The NAS-Bench-201 cell network of :mod:`nasforge.space.cell` as blocks.

    Args:
        shape: Network shape (channels, cells per stage, stages, input channels, classes).
        resolution: Input height and width.
    """

    name = "cell"

    def __init__(self, shape: CellNetworkShape, resolution: tuple[int, int]) -> None:
        self.shape = shape
        self.resolution = (int(resolution[0]), int(resolution[1]))

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {**self.shape.to_dict(), "resolution": list(self.resolution)}

    def input_shape(self) -> tuple[int, ...]:  # noqa: D102
        return (self.shape.in_channels, *self.resolution)

    def _stages(self) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each stage."""
        c, (h, w) = self.shape.channels, self.resolution
        out = []
        for stage in range(self.shape.stages):
            if stage > 0:
                c, h, w = c * 2, _conv_out(h), _conv_out(w)
            out.append((c, h, w))
        return out

    def _stem_key(self) -> str:
        h, w = self.resolution
        return f"stem:{self.shape.in_channels}->{self.shape.channels}:{h}x{w}"

    def _head_key(self) -> str:
        c, h, w = self._stages()[-1]
        return f"head:{c}:{h}x{w}->{self.shape.num_classes}"

    def blocks(self) -> list[Block]:  # noqa: D102
        s = self.shape

        def stem() -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(s.in_channels, s.channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(s.channels),
            )

        out = [Block(self._stem_key(), stem, self.input_shape())]
        prev: tuple[int, int, int] | None = None
        for c, h, w in self._stages():
            if prev is not None:
                pc, ph, pw = prev
                red = functools.partial(ResidualReduction, pc, c)
                out.append(Block(f"reduction:{pc}->{c}:{ph}x{pw}", red, (pc, ph, pw)))
            for op in OPS:
                if op in ("none", "skip_connect"):
                    continue  # no computation: an Identity is removed by every exporter
                make: Callable[[], nn.Module] = functools.partial(_op_without_relu, op, c)
                out.append(Block(f"op:{op}:c{c}:{h}x{w}", make, (c, h, w), chainable=True))
            out.append(Block(f"add:c{c}:{h}x{w}", _Add, (c, h, w), chainable=True))
            out.append(Block(f"relu:c{c}:{h}x{w}", nn.ReLU, (c, h, w)))
            out.append(Block(f"zeros:c{c}:{h}x{w}", _Zeros, (c, h, w)))
            prev = (c, h, w)
        c, h, w = self._stages()[-1]
        out.append(Block(self._head_key(), functools.partial(_Head, c, s.num_classes), (c, h, w)))
        return out

    def block_counts(self, spec: Any, folds_constants: bool = False) -> Counter[str]:  # noqa: D102
        if not isinstance(spec, CellSpec):
            raise ConfigError(f"cell space expects a CellSpec, got {type(spec).__name__}")
        counts: Counter[str] = Counter({self._stem_key(): 1})
        if folds_constants:
            # Only edges on an input-to-output path compute; a node without such an input is a
            # constant. If the cell output is constant the whole rest of the network is, and the
            # runtime folds it away.
            computed = list(active_edges(spec))
            if not any(computed[k] for k, (dst, _s) in enumerate(EDGES) if dst == N_NODES - 1):
                return counts
        else:
            computed = computed_edges(spec)
        counts[self._head_key()] += 1
        incoming = [
            sum(1 for k, (d, _s) in enumerate(EDGES) if d == node and computed[k])
            for node in range(N_NODES)
        ]
        # Nodes whose value is used: the output and every node some computed edge reads.
        used = {N_NODES - 1} | {src for k, (_d, src) in enumerate(EDGES) if computed[k]}
        # A node whose only input is a skip_connect *is* its source node: ops on both are
        # common subexpressions.
        same_as = list(range(N_NODES))
        for node in range(1, N_NODES):
            ins = [k for k, (d, _s) in enumerate(EDGES) if d == node and computed[k]]
            if len(ins) == 1 and spec.ops[ins[0]] == "skip_connect":
                same_as[node] = same_as[EDGES[ins[0]][1]]
        prev: tuple[int, int, int] | None = None
        for c, h, w in self._stages():
            if prev is not None:
                pc, ph, pw = prev
                counts[f"reduction:{pc}->{c}:{ph}x{pw}"] += 1
            per_cell: Counter[str] = Counter()
            # Exporters and runtimes eliminate common subexpressions: a parameter-free op
            # (avg_pool) or the ReLU in front of convs runs once per source node, not per edge.
            pooled, relu_srcs = set(), set()
            for k, op in enumerate(spec.ops):
                if not computed[k] or op == "skip_connect":
                    continue
                src = same_as[EDGES[k][1]]
                if op == "avg_pool_3x3":
                    pooled.add(src)
                else:
                    per_cell[f"op:{op}:c{c}:{h}x{w}"] += 1
                    relu_srcs.add(src)
            if pooled:
                per_cell[f"op:avg_pool_3x3:c{c}:{h}x{w}"] += len(pooled)
            if relu_srcs:
                per_cell[f"relu:c{c}:{h}x{w}"] += len(relu_srcs)
            for node in range(1, N_NODES):
                if node not in used:
                    continue
                if incoming[node] == 0 and not folds_constants:
                    per_cell[f"zeros:c{c}:{h}x{w}"] += 1
                elif incoming[node] > 1:
                    per_cell[f"add:c{c}:{h}x{w}"] += incoming[node] - 1
            for key, n in per_cell.items():
                counts[key] += n * self.shape.cells_per_stage
            prev = (c, h, w)
        return counts

    def sample(self, rng: random.Random) -> CellSpec:  # noqa: D102
        return CellSpec(tuple(rng.choice(OPS) for _ in EDGES))

    def build(self, spec: Any) -> nn.Module:  # noqa: D102
        return build_cell_network(spec, self.shape).eval()


SPACES: dict[str, type[BlockSpace]] = {"cell": CellBlockSpace}
"""Spaces the profiler knows, by name."""


def get_space(name: str, **kwargs: Any) -> BlockSpace:
    """Build a block space by name.

    Args:
        name: ``"cell"``.
        **kwargs: For ``cell``: ``shape`` (:class:`CellNetworkShape`) and ``resolution``
            ``(h, w)``.

    Raises:
        ConfigError: Unknown space.
    """
    cls = SPACES.get(name)
    if cls is None:
        raise ConfigError(f"unknown search space '{name}'; known: {', '.join(SPACES)}")
    return cls(**kwargs)
