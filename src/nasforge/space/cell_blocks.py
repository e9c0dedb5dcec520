"""The NAS-Bench-201 cell network of :mod:`nasforge.space.cell` as profiled blocks."""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nasforge.errors import ConfigError
from nasforge.space.blocks import Block, BlockSpace, conv_out
from nasforge.space.cell import (
    CellNetworkShape,
    ReLUConvBN,
    ResidualReduction,
    build_cell_network,
    computed_edges,
    make_op,
)
from nasforge.space.cell_int8_layout import float_output_convs
from nasforge.space.nb201 import EDGES, N_NODES, OPS, CellSpec


class _Add(nn.Module):
    """A node sum of two same-shaped tensors (the input added to itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + x


class _Zeros(nn.Module):
    """A node with no live input: zeros shaped like the cell input, as ``Cell.forward`` makes
    them (``x * 0``, an op on the input that no runtime folds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * 0.0


class _Head(nn.Module):
    """BN-ReLU, global average pooling, flatten, linear: the network's classifier head."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


def _op_without_relu(op: str, channels: int) -> nn.Module:
    """A cell op as profiled: conv ops without their leading ReLU (counted once per source
    node as a ``relu`` block, since runtimes merge the identical ReLUs of sibling edges)."""
    module = make_op(op, channels)
    assert module is not None
    if isinstance(module, ReLUConvBN):
        return nn.Sequential(*list(module.op.children())[1:])
    return module


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
                c, h, w = c * 2, conv_out(h), conv_out(w)
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

    def block_counts(  # noqa: D102
        self, spec: Any, folds_constants: bool = False, precision: str = "fp32"
    ) -> Counter[str]:
        # ``folds_constants`` changes nothing here: a node fed by ``none`` edges only is ``x * 0``
        # (see ``Cell.forward``), which depends on the input, so no runtime folds it or the convs
        # reading it (OpenVINO's compiled graph runs them: checked in the tests).
        del folds_constants
        if not isinstance(spec, CellSpec):
            raise ConfigError(f"cell space expects a CellSpec, got {type(spec).__name__}")
        counts: Counter[str] = Counter({self._stem_key(): 1, self._head_key(): 1})
        computed = computed_edges(spec)
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
                if incoming[node] == 0:
                    per_cell[f"zeros:c{c}:{h}x{w}"] += 1
                elif incoming[node] > 1:
                    per_cell[f"add:c{c}:{h}x{w}"] += incoming[node] - 1
            for key, n in per_cell.items():
                counts[key] += n * self.shape.cells_per_stage
            prev = (c, h, w)
        if precision == "int8":
            stages = self._stages()
            fp = float_output_convs(spec, self.shape.stages, self.shape.cells_per_stage)
            for (op, stage), n in fp.items():
                c, h, w = stages[stage]
                counts[f"fpconv:{op}:c{c}:{h}x{w}"] += n
        return counts

    def derived_blocks(self, precision: str) -> dict[str, str]:  # noqa: D102
        # A conv with a float output in the INT8 graph (see nasforge.space.cell_int8_layout)
        # starts from the cost of the same conv: a float kernel plus the layout transposes
        # around it cost about as much again as the fused INT8 conv (1.0x fitted best of
        # 0, 0.5, 1 and 2x in the INT8 cell benchmark).
        if precision != "int8":
            return {}
        return {
            f"fpconv:{op}:c{c}:{h}x{w}": f"op:{op}:c{c}:{h}x{w}"
            for c, h, w in self._stages()
            for op in ("nor_conv_1x1", "nor_conv_3x3")
        }

    def feature_sets(self) -> list[tuple[str, ...]]:  # noqa: D102
        # Per op kind: runtimes fuse node sums and ReLUs into neighbouring convs, and ops
        # profiled in chains relate differently to the network than the stem, reductions and
        # head profiled alone.
        kinds = (
            "sum[op:nor_conv_3x3]",
            "sum[op:nor_conv_1x1]",
            "sum[op:avg_pool_3x3]",
            "sum[add:,relu:,zeros:]",
            "sum[stem:,reduction:,head:]",
            "const",
        )
        return [*super().feature_sets(), kinds]

    def sample(self, rng: random.Random) -> CellSpec:  # noqa: D102
        return CellSpec(tuple(rng.choice(OPS) for _ in EDGES))

    def build(self, spec: Any) -> nn.Module:  # noqa: D102
        return build_cell_network(spec, self.shape).eval()
