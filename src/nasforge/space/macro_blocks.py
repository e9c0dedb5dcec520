"""The macro elastic MobileNet space of :mod:`nasforge.space.macro` as profiled blocks."""

from __future__ import annotations

import functools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nasforge.errors import ConfigError
from nasforge.space.blocks import Block, BlockSpace, conv_out
from nasforge.space.cell import CellNetworkShape
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
                    h, w = conv_out(h), conv_out(w)
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
            ho, wo = (conv_out(h), conv_out(w)) if stride == 2 else (h, w)
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
