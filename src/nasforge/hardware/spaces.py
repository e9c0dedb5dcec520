"""Search spaces seen as sums of blocks, for latency tables.

A :class:`BlockSpace` tells the profiler which blocks exist (cell space: each op at each stage's
channel count and resolution, node sums, reductions, stem, head; macro space: every
inverted-residual configuration, stem, head) and tells the predictor how many of each block a
given architecture contains. Predicted latency is then a calibrated regression on block sums
(``sum(count[b] * latency[b])``, optionally per kind of block: :meth:`BlockSpace.feature_sets`;
see :mod:`nasforge.hardware.latency_table`).

Two spaces are implemented here: the cell space (the NAS-Bench-201 network of
:mod:`nasforge.space.cell`) and the macro space (the elastic MobileNet of
:mod:`nasforge.space.macro`). A new space is one more :class:`BlockSpace` subclass registered in
:data:`SPACES`.
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
from nasforge.hardware.cell_int8_layout import float_output_convs
from nasforge.space.cell import (
    CellNetworkShape,
    ReLUConvBN,
    ResidualReduction,
    build_cell_network,
    computed_edges,
    make_op,
)
from nasforge.space.macro import (
    DEPTHS,
    EXPANDS,
    HEAD_CHANNELS,
    KERNELS,
    STAGE_BASE,
    STEM_CHANNELS,
    WIDTHS,
    InvertedResidual,
    MacroSpec,
    build_macro_network,
    stage_channels,
)
from nasforge.space.nb201 import EDGES, N_NODES, OPS, CellSpec


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
        # A conv with a float output in the INT8 graph (see nasforge.hardware.cell_int8_layout)
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


class _MacroStem(nn.Module):
    """Conv 3x3 - BN - ReLU6: the macro network's stem."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU6(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.stem(x)


class _MacroHead(nn.Module):
    """Conv 1x1 to the head width - BN - ReLU6, pooling, classifier: the macro network's head."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, HEAD_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(HEAD_CHANNELS),
            nn.ReLU6(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


@dataclass(frozen=True)
class _IrConfig:
    """One inverted-residual configuration at one input resolution."""

    c_in: int
    c_out: int
    kernel: int
    expand: int
    stride: int
    h: int
    w: int

    @property
    def key(self) -> str:
        # Residual (shape-keeping) blocks are "ir-res:", the others "ir:".
        kind = "ir-res" if self.chainable else "ir"
        return (
            f"{kind}:{self.c_in}->{self.c_out}:k{self.kernel}:e{self.expand}:s{self.stride}:"
            f"{self.h}x{self.w}"
        )

    @property
    def chainable(self) -> bool:
        # Residual blocks keep their shape, so the profiler can time chains of copies.
        return self.stride == 1 and self.c_in == self.c_out


class MacroBlockSpace(BlockSpace):
    """The macro elastic MobileNet space of :mod:`nasforge.space.macro` as blocks.

    Blocks: the stem, every inverted-residual configuration a network can contain (input and
    output channels, kernel, expansion, stride, input resolution) and the head for each width of
    the last stage. With the default choices that is 369 blocks (45 in stage 0, 108 per later
    stage).

    Args:
        in_channels: Image channels.
        num_classes: Classifier outputs.
        resolution: Input height and width.
        shape: Optional :class:`CellNetworkShape` to take ``in_channels`` and ``num_classes``
            from (what ``nasforge profile`` passes for every space); other fields are ignored.
        depths, widths, kernels, expands: Restrict the space to these choices (subsets of
            :mod:`nasforge.space.macro`'s; default all): a search over a sub-space needs only
            its blocks profiled.

    Raises:
        ConfigError: Bad channels/classes, or a restriction outside the space's choices.
    """

    name = "macro"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        resolution: tuple[int, int] = (32, 32),
        shape: CellNetworkShape | None = None,
        depths: tuple[int, ...] = DEPTHS,
        widths: tuple[float, ...] = WIDTHS,
        kernels: tuple[int, ...] = KERNELS,
        expands: tuple[int, ...] = EXPANDS,
    ) -> None:
        if shape is not None:
            in_channels, num_classes = shape.in_channels, shape.num_classes
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(
                f"macro space needs in_channels >= 1 and num_classes >= 1, "
                f"got {in_channels}, {num_classes}"
            )
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.choices: dict[str, tuple] = {}
        for name, given, full in (
            ("depths", depths, DEPTHS),
            ("widths", widths, WIDTHS),
            ("kernels", kernels, KERNELS),
            ("expands", expands, EXPANDS),
        ):
            bad = [v for v in given if v not in full]
            if bad or not given:
                raise ConfigError(
                    f"macro space {name} must be a non-empty subset of {list(full)}, got "
                    f"{list(given)}"
                )
            self.choices[name] = tuple(sorted(set(given)))

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "resolution": list(self.resolution),
            "stages": [list(s) for s in STAGE_BASE],
            **{k: list(v) for k, v in self.choices.items()},
            "stem": STEM_CHANNELS,
            "head": HEAD_CHANNELS,
        }

    def input_shape(self) -> tuple[int, ...]:  # noqa: D102
        return (self.in_channels, *self.resolution)

    def _stem_key(self) -> str:
        h, w = self.resolution
        return f"stem:{self.in_channels}->{STEM_CHANNELS}:{h}x{w}"

    def _head_key(self, c: int, h: int, w: int) -> str:
        return f"head:{c}:{h}x{w}->{HEAD_CHANNELS}->{self.num_classes}"

    def _layout(self, spec: MacroSpec) -> tuple[list[_IrConfig], tuple[int, int, int]]:
        """The inverted-residual configurations of ``spec`` in order, and the head input."""
        c, (h, w) = STEM_CHANNELS, self.resolution
        out = []
        for i, (base, stride) in enumerate(STAGE_BASE):
            c_out = stage_channels(base, spec.widths[i])
            for d in range(spec.depths[i]):
                s = stride if d == 0 else 1
                out.append(_IrConfig(c, c_out, spec.kernels[i], spec.expands[i], s, h, w))
                if s == 2:
                    h, w = _conv_out(h), _conv_out(w)
                c = c_out
        return out, (c, h, w)

    def _all_configs(self) -> tuple[list[_IrConfig], list[tuple[int, int, int]]]:
        """Every reachable inverted-residual configuration (deduplicated) and head input."""
        seen: dict[str, _IrConfig] = {}
        ins, (h, w) = [STEM_CHANNELS], self.resolution
        heads: list[tuple[int, int, int]] = []
        ch = self.choices
        for base, stride in STAGE_BASE:
            outs = sorted({stage_channels(base, wd) for wd in ch["widths"]})
            ho, wo = (_conv_out(h), _conv_out(w)) if stride == 2 else (h, w)
            for k in ch["kernels"]:
                for e in ch["expands"]:
                    for c_out in outs:
                        for c_in in ins:
                            cfg = _IrConfig(c_in, c_out, k, e, stride, h, w)
                            seen.setdefault(cfg.key, cfg)
                        if max(ch["depths"]) > 1:
                            cfg = _IrConfig(c_out, c_out, k, e, 1, ho, wo)
                            seen.setdefault(cfg.key, cfg)
            ins, (h, w) = outs, (ho, wo)
            heads = [(c, h, w) for c in outs]
        return list(seen.values()), heads

    def blocks(self) -> list[Block]:  # noqa: D102
        configs, heads = self._all_configs()
        out = [
            Block(
                self._stem_key(),
                functools.partial(_MacroStem, self.in_channels),
                self.input_shape(),
            )
        ]
        for cfg in configs:
            make = functools.partial(
                InvertedResidual, cfg.c_in, cfg.c_out, cfg.kernel, cfg.stride, cfg.expand
            )
            out.append(Block(cfg.key, make, (cfg.c_in, cfg.h, cfg.w), chainable=cfg.chainable))
        for c, h, w in heads:
            make = functools.partial(_MacroHead, c, self.num_classes)
            out.append(Block(self._head_key(c, h, w), make, (c, h, w)))
        return out

    def block_counts(  # noqa: D102
        self, spec: Any, folds_constants: bool = False, precision: str = "fp32"
    ) -> Counter[str]:
        if not isinstance(spec, MacroSpec):
            raise ConfigError(f"macro space expects a MacroSpec, got {type(spec).__name__}")
        configs, (c, h, w) = self._layout(spec)
        counts: Counter[str] = Counter({self._stem_key(): 1, self._head_key(c, h, w): 1})
        for cfg in configs:
            counts[cfg.key] += 1
        return counts

    def feature_sets(self) -> list[tuple[str, ...]]:  # noqa: D102
        # Residual blocks are profiled in chains (in context), the others alone: their sums
        # may need different scales.
        kinds = ("sum[ir-res:]", "sum[ir:]", "sum[stem:,head:]", "const")
        return [*super().feature_sets(), kinds, (*kinds[:-1], "n_blocks", "const")]

    def sample(self, rng: random.Random) -> MacroSpec:  # noqa: D102
        ch = self.choices
        return MacroSpec(
            tuple(rng.choice(ch["depths"]) for _ in STAGE_BASE),
            tuple(rng.choice(ch["widths"]) for _ in STAGE_BASE),
            tuple(rng.choice(ch["kernels"]) for _ in STAGE_BASE),
            tuple(rng.choice(ch["expands"]) for _ in STAGE_BASE),
        )

    def build(self, spec: Any) -> nn.Module:  # noqa: D102
        if not isinstance(spec, MacroSpec):
            raise ConfigError(f"macro space expects a MacroSpec, got {type(spec).__name__}")
        return build_macro_network(spec, self.in_channels, self.num_classes).eval()


SPACES: dict[str, type[BlockSpace]] = {"cell": CellBlockSpace, "macro": MacroBlockSpace}
"""Spaces the profiler knows, by name."""


def get_space(name: str, **kwargs: Any) -> BlockSpace:
    """Build a block space by name.

    Args:
        name: ``"cell"`` or ``"macro"``.
        **kwargs: For ``cell``: ``shape`` (:class:`CellNetworkShape`) and ``resolution``
            ``(h, w)``. For ``macro``: ``in_channels``, ``num_classes`` (or ``shape`` to take
            them from) and ``resolution``.

    Raises:
        ConfigError: Unknown space.
    """
    cls = SPACES.get(name)
    if cls is None:
        raise ConfigError(f"unknown search space '{name}'; known: {', '.join(SPACES)}")
    return cls(**kwargs)
