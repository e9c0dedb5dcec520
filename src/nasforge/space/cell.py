"""NAS-Bench-201-style cell network (spec -> ``nn.Module``).

The network follows NAS-Bench-201's macro skeleton: a 3x3 stem, ``stages`` groups of
``cells_per_stage`` searched cells separated by ResNet basic blocks that halve the resolution and
double the channels, then BN-ReLU, global average pooling and a linear classifier.

One class serves both the supernet and its subnets: an edge holds a ``ModuleDict`` of candidate
operations keyed by op name. A standalone subnet holds one candidate per edge, the supernet all of
them, and a parameter has the same name in both (``cells.0.edges.3.ops.nor_conv_3x3.op.1.weight``),
so weight inheritance is a filtered ``load_state_dict`` rather than a hand-written copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nasforge.space.nb201 import EDGES, N_NODES, OPS, CellSpec

PARAMETRIC_OPS = ("nor_conv_1x1", "nor_conv_3x3")


class ReLUConvBN(nn.Module):
    """ReLU -> Conv -> BN, NAS-Bench-201's ``nor_conv_kxk``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.op(x)


def make_op(name: str, channels: int) -> nn.Module | None:
    """Build the module of one candidate op (None for ``none``, which computes nothing)."""
    if name == "none":
        return None
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if name == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"unknown op {name!r}; expected one of {', '.join(OPS)}")


class MixedEdge(nn.Module):
    """An edge with one or more candidate ops; ``active`` selects the one that runs."""

    def __init__(self, channels: int, candidates: Sequence[str]) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        self.ops = nn.ModuleDict()
        for name in self.candidates:
            module = make_op(name, channels)
            if module is not None:
                self.ops[name] = module
        self.active = self.candidates[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Apply the active op; ``None`` means the edge contributes nothing."""
        if self.active == "none":
            return None
        return self.ops[self.active](x)


class Cell(nn.Module):
    """A 4-node NAS-Bench-201 cell; node ``j`` is the sum of its incoming edges."""

    def __init__(self, channels: int, candidates: Sequence[Sequence[str]]) -> None:
        super().__init__()
        self.edges = nn.ModuleList(MixedEdge(channels, c) for c in candidates)

    def set_ops(self, ops: Sequence[str]) -> None:
        """Select the active op of every edge."""
        for edge, op in zip(self.edges, ops, strict=True):
            if op not in edge.candidates:
                raise ValueError(f"op {op!r} is not a candidate of this edge")
            edge.active = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        nodes = [x]
        k = 0
        for node in range(1, N_NODES):
            total = None
            for _src in range(node):
                out = self.edges[k](nodes[_src])
                k += 1
                if out is not None:
                    total = out if total is None else total + out
            # A node with only 'none' inputs is all zeros (as in NAS-Bench-201). It is written
            # ``x * 0``, not ``zeros_like(x)``: a zeros_like tensor has no autograd history, so
            # Torch-Pruning's dependency graph saw the ops reading that node as unconnected to
            # ``x`` and left their input channels unpruned while ``x`` lost channels (the
            # 'expected input[1, 12, 8, 8] to have 16 channels' crash of ~10% of the cells).
            nodes.append(total if total is not None else x * 0.0)
        return nodes[-1]


class ResidualReduction(nn.Module):
    """NAS-Bench-201's ResNet basic block with stride 2 between stages."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2, stride=2), nn.Conv2d(c_in, c_out, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.conv_b(self.conv_a(x)) + self.shortcut(x)


@dataclass(frozen=True)
class CellNetworkShape:
    """Everything besides the cell ops that fixes a network's architecture."""

    in_channels: int
    num_classes: int
    channels: int = 16
    cells_per_stage: int = 1
    stages: int = 3

    def to_dict(self) -> dict[str, int]:
        """Plain-dict form for JSON metadata."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "cells_per_stage": self.cells_per_stage,
            "stages": self.stages,
        }


class CellNetwork(nn.Module):
    """A stack of NAS-Bench-201 cells; a subnet when each edge has one candidate."""

    def __init__(self, shape: CellNetworkShape, candidates: Sequence[Sequence[str]]) -> None:
        super().__init__()
        if len(candidates) != len(EDGES):
            raise ValueError(f"need candidates for {len(EDGES)} edges, got {len(candidates)}")
        self.shape = shape
        c = shape.channels
        self.stem = nn.Sequential(
            nn.Conv2d(shape.in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        )
        layers: list[nn.Module] = []
        for stage in range(shape.stages):
            if stage > 0:
                layers.append(ResidualReduction(c, c * 2))
                c *= 2
            layers.extend(Cell(c, candidates) for _ in range(shape.cells_per_stage))
        self.cells = nn.ModuleList(layers)
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, shape.num_classes)

    def set_ops(self, ops: Sequence[str]) -> None:
        """Select the same cell ops in every cell (NAS-Bench-201 shares one cell)."""
        for layer in self.cells:
            if isinstance(layer, Cell):
                layer.set_ops(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.stem(x)
        for layer in self.cells:
            x = layer(x)
        x = self.pool(self.head(x))
        return self.classifier(torch.flatten(x, 1))


def computed_edges(spec: CellSpec) -> list[bool]:
    """Which edges contribute to the cell output.

    An edge counts iff its op is not ``none`` and its destination node feeds the output node
    (directly or through later edges). Edges into a dead node compute something nobody reads.
    """
    used = [False] * N_NODES
    used[N_NODES - 1] = True
    for node in range(N_NODES - 2, -1, -1):
        used[node] = any(
            spec.ops[k] != "none" and used[dst] for k, (dst, src) in enumerate(EDGES) if src == node
        )
    return [spec.ops[k] != "none" and used[dst] for k, (dst, _src) in enumerate(EDGES)]


def is_connected(spec: CellSpec) -> bool:
    """Whether the cell output depends on its input (some path of non-``none`` edges 0 -> 3).

    A disconnected cell outputs zeros, so a network of such cells is a constant function.
    """
    reached = [True] + [False] * (N_NODES - 1)
    for k, (dst, src) in enumerate(EDGES):  # EDGES is ordered by destination node
        if spec.ops[k] != "none" and reached[src]:
            reached[dst] = True
    return reached[N_NODES - 1]


def effective_ops(spec: CellSpec) -> tuple[str, ...]:
    """The spec's ops with dead edges replaced by ``none`` (the same function, less work)."""
    live = computed_edges(spec)
    return tuple(op if keep else "none" for op, keep in zip(spec.ops, live, strict=True))


def build_cell_network(spec: CellSpec, shape: CellNetworkShape) -> CellNetwork:
    """Build the standalone network of one cell spec.

    Edges into dead nodes are left out (see :func:`effective_ops`): they cannot change the
    output, would be counted as parameters, and leave dangling conv-BN pairs in exported graphs
    that break quantizer pattern matching.

    Args:
        spec: The cell (one op per edge).
        shape: Channels, cells per stage, input channels and classes.

    Returns:
        A freshly initialised network whose parameter names match the supernet's.
    """
    ops = effective_ops(spec)
    net = CellNetwork(shape, [[op] for op in ops])
    net.set_ops(ops)
    return net


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
