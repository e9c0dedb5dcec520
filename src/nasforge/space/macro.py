"""Macro elastic search space (MobileNetV2 / Once-for-All style).

A network is a stem, :data:`N_STAGES` stages of MobileNetV2 inverted-residual blocks and a head.
Each stage has four elastic dimensions:

* ``depth``: number of blocks, from :data:`DEPTHS`;
* ``width``: multiplier on the stage's base channels (:data:`STAGE_BASE`), from :data:`WIDTHS`;
* ``kernel``: depthwise kernel size of every block of the stage, from :data:`KERNELS`;
* ``expand``: expansion ratio of every block of the stage, from :data:`EXPANDS`.

:class:`MacroSpec` is the encoding; its sampler parameters (``stage0_depth`` ... ) mirror
:func:`nasforge.space.nb201.search_space`, and it round-trips through JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from nasforge.errors import ConfigError

DEPTHS: tuple[int, ...] = (1, 2, 3)
WIDTHS: tuple[float, ...] = (0.5, 0.75, 1.0)
KERNELS: tuple[int, ...] = (3, 5, 7)
EXPANDS: tuple[int, ...] = (3, 4, 6)
STAGE_BASE: tuple[tuple[int, int], ...] = ((16, 1), (24, 2), (40, 2), (80, 2))
"""``(base output channels, stride of the first block)`` per stage; small inputs (8-32 px)."""
N_STAGES = len(STAGE_BASE)
STEM_CHANNELS = 16
HEAD_CHANNELS = 256
_FIELDS: dict[str, tuple] = {"depth": DEPTHS, "width": WIDTHS, "kernel": KERNELS, "expand": EXPANDS}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` (MobileNet convention), never below it."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def stage_channels(base: int, width: float) -> int:
    """Output channels of a stage with base channels ``base`` at width multiplier ``width``.

    Rounded to multiples of 4 (not 8) so every width multiplier gives distinct channels.
    """
    return make_divisible(base * width, 4)


def macro_search_space() -> dict[str, list]:
    """The macro space as sampler parameters: ``{"stage0_depth": [1, 2, 3], ...}``."""
    return {
        f"stage{i}_{name}": list(choices)
        for i in range(N_STAGES)
        for name, choices in _FIELDS.items()
    }


@dataclass(frozen=True)
class MacroSpec:
    """One architecture of the macro space: per-stage depth, width, kernel and expansion.

    Raises:
        ConfigError: a field does not hold :data:`N_STAGES` values from its choices.
    """

    depths: tuple[int, ...]
    widths: tuple[float, ...]
    kernels: tuple[int, ...]
    expands: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, choices in _FIELDS.items():
            values = getattr(self, name + "s")
            if isinstance(values, str) or not isinstance(values, tuple | list):
                raise ConfigError(f"MacroSpec.{name}s must be a sequence, got {values!r}")
            if len(values) != N_STAGES:
                raise ConfigError(
                    f"MacroSpec.{name}s needs {N_STAGES} values, one per stage, got {len(values)}"
                )
            for i, v in enumerate(values):
                if isinstance(v, bool) or v not in choices:
                    raise ConfigError(
                        f"stage{i}_{name}={v!r} is not one of {', '.join(map(str, choices))}"
                    )
            # Store as tuples of canonical values so specs are hashable and compare equal.
            canon = tuple(choices[choices.index(v)] for v in values)
            object.__setattr__(self, name + "s", canon)

    @classmethod
    def largest(cls) -> MacroSpec:
        """The spec with every dimension at its maximum."""
        return cls(
            (max(DEPTHS),) * N_STAGES,
            (max(WIDTHS),) * N_STAGES,
            (max(KERNELS),) * N_STAGES,
            (max(EXPANDS),) * N_STAGES,
        )

    @classmethod
    def smallest(cls) -> MacroSpec:
        """The spec with every dimension at its minimum."""
        return cls(
            (min(DEPTHS),) * N_STAGES,
            (min(WIDTHS),) * N_STAGES,
            (min(KERNELS),) * N_STAGES,
            (min(EXPANDS),) * N_STAGES,
        )

    def to_params(self) -> dict[str, int | float]:
        """Sampler parameters (keys of :func:`macro_search_space`)."""
        return {
            f"stage{i}_{name}": getattr(self, name + "s")[i]
            for i in range(N_STAGES)
            for name in _FIELDS
        }

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> MacroSpec:
        """Build from sampler parameters.

        Raises:
            ConfigError: a parameter is missing or out of its choices.
        """
        missing = [k for k in macro_search_space() if k not in params]
        if missing:
            raise ConfigError(f"macro spec parameters missing: {', '.join(missing)}")
        fields = {
            name + "s": tuple(params[f"stage{i}_{name}"] for i in range(N_STAGES))
            for name in _FIELDS
        }
        return cls(**fields)  # type: ignore[arg-type]

    def to_json(self) -> str:
        """JSON form (an object of four per-stage lists)."""
        return json.dumps(
            {
                "depths": list(self.depths),
                "widths": list(self.widths),
                "kernels": list(self.kernels),
                "expands": list(self.expands),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> MacroSpec:
        """Parse :meth:`to_json` output.

        Raises:
            ConfigError: not valid JSON or not a valid spec.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"macro spec is not valid JSON: {exc}") from exc
        keys = {"depths", "widths", "kernels", "expands"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ConfigError(f"macro spec JSON must be an object with keys {sorted(keys)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def macro_arch_str(spec: MacroSpec) -> str:
    """A compact, readable one-line name of ``spec`` (what ``arch_str`` holds for the cell space),
    e.g. ``macro:d=1,2,1,1;w=0.5,1,1,1;k=3,3,5,3;e=3,3,3,3``: per-stage depth, width, kernel and
    expansion."""

    def join(values: tuple) -> str:
        return ",".join(f"{v:g}" for v in values)

    return (
        f"macro:d={join(spec.depths)};w={join(spec.widths)};"
        f"k={join(spec.kernels)};e={join(spec.expands)}"
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> kxk depthwise -> 1x1 project, residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(
                hidden, hidden, kernel, stride, padding=kernel // 2, groups=hidden, bias=False
            ),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MacroNetwork(nn.Module):
    """The standalone network of one :class:`MacroSpec`."""

    def __init__(self, spec: MacroSpec, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(
                f"need in_channels >= 1 and num_classes >= 1, got {in_channels}, {num_classes}"
            )
        self.spec = spec
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU6(),
        )
        blocks: list[nn.Module] = []
        c = STEM_CHANNELS
        for i, (base, stride) in enumerate(STAGE_BASE):
            c_out = stage_channels(base, spec.widths[i])
            for d in range(spec.depths[i]):
                blocks.append(
                    InvertedResidual(
                        c, c_out, spec.kernels[i], stride if d == 0 else 1, spec.expands[i]
                    )
                )
                c = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.Conv2d(c, HEAD_CHANNELS, 1, bias=False), nn.BatchNorm2d(HEAD_CHANNELS), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


def build_macro_network(spec: MacroSpec, in_channels: int, num_classes: int) -> MacroNetwork:
    """Build the (freshly initialised) network of ``spec``.

    Args:
        spec: The architecture.
        in_channels: Image channels.
        num_classes: Classifier outputs.

    Returns:
        A :class:`MacroNetwork` (an ``nn.Module`` subclass, not a bare ``nn.Sequential``, so
        quantizers that trace modules by class can handle it).
    """
    return MacroNetwork(spec, in_channels, num_classes)
