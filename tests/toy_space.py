"""A third search space in one module, as a contributor would add one (tests only).

``toy``: a stem conv, ``depth`` residual conv blocks of ``width`` channels, pooling and a
classifier. Its supernet is the widest, deepest network (trained as a whole: a toy); a subnet is
its first channels and blocks. Importing this module registers the space; nothing else in
nasforge is touched.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution
from torch import nn

from nasforge.errors import ConfigError, ModelFileError
from nasforge.space.base import SearchSpace, TrainedSupernet
from nasforge.space.blocks import Block, BlockSpace
from nasforge.space.registry import register

WIDTHS = (4, 8)
DEPTHS = (1, 2)
MAX_W, MAX_D = max(WIDTHS), max(DEPTHS)


def _check(spec: tuple[int, int]) -> tuple[int, int]:
    width, depth = spec
    if width not in WIDTHS or depth not in DEPTHS:
        raise ConfigError(f"toy spec needs width in {WIDTHS} and depth in {DEPTHS}, got {spec}")
    return int(width), int(depth)


class ToyNet(nn.Module):
    """The standalone network of one ``(width, depth)``."""

    def __init__(self, spec: tuple[int, int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        width, depth = _check(spec)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
            for _ in range(depth)
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ToySupernet(ToyNet):
    """The widest, deepest toy network; the active subnet is its first channels and blocks."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__((MAX_W, MAX_D), in_channels, num_classes)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.active = (MAX_W, MAX_D)

    def set_active_subnet(self, spec: tuple[int, int]) -> None:  # noqa: D102
        self.active = _check(spec)

    def get_active_subnet(self) -> ToyNet:  # noqa: D102
        subnet = ToyNet(self.active, self.in_channels, self.num_classes)
        own = self.state_dict()
        state = {}
        for k, v in subnet.state_dict().items():
            src = own[k]
            state[k] = src if src.dim() == 0 else src[tuple(slice(0, n) for n in v.shape)]
        subnet.load_state_dict({k: v.clone() for k, v in state.items()})
        return subnet


class ToyBlocks(BlockSpace):
    """Blocks: stem, one block per width, head; enough for measured latency (``build``)."""

    name = "toy"

    def __init__(self, in_channels: int, num_classes: int, resolution: tuple[int, int]) -> None:
        self.in_channels, self.num_classes, self.resolution = in_channels, num_classes, resolution

    def config(self) -> dict[str, Any]:  # noqa: D102
        return {"in": self.in_channels, "classes": self.num_classes, "res": list(self.resolution)}

    def input_shape(self) -> tuple[int, ...]:  # noqa: D102
        return (self.in_channels, *self.resolution)

    def blocks(self) -> list[Block]:  # noqa: D102
        c, (h, w) = self.in_channels, self.resolution
        out = []
        for width in WIDTHS:
            stem = functools.partial(nn.Conv2d, c, width, 3, padding=1)
            conv = functools.partial(nn.Conv2d, width, width, 3, padding=1)
            head = functools.partial(nn.Linear, width, self.num_classes)
            out += [
                Block(f"stem:{width}", stem, (c, h, w)),
                Block(f"block:{width}", conv, (width, h, w), chainable=True),
                Block(f"head:{width}", head, (width,)),
            ]
        return out

    def block_counts(self, spec: Any, folds_constants: bool = False, precision: str = "fp32"):  # noqa: D102
        width, depth = _check(spec)
        return Counter({f"stem:{width}": 1, f"block:{width}": depth, f"head:{width}": 1})

    def build(self, spec: Any) -> nn.Module:  # noqa: D102
        return ToyNet(spec, self.in_channels, self.num_classes).eval()


@register
class ToySpace(SearchSpace):
    """The toy space for one input shape."""

    name = "toy"
    summary = "two-parameter residual conv nets (tests)"
    study_name = "nasforge-toy-search"

    def __init__(self, in_channels: int, num_classes: int, resolution: tuple[int, int]) -> None:
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.resolution = (int(resolution[0]), int(resolution[1]))

    @classmethod
    def from_params(cls, space_params, input_shape, num_classes):  # noqa: D102
        return cls(input_shape[0], num_classes, (input_shape[1], input_shape[2]))

    @classmethod
    def from_pareto(cls, pareto, input_shape):  # noqa: D102
        return cls(pareto["shape"]["in_channels"], pareto["shape"]["num_classes"], input_shape[1:])

    def pareto_fields(self) -> dict[str, Any]:  # noqa: D102
        return {"shape": {"in_channels": self.in_channels, "num_classes": self.num_classes}}

    def spec_from_params(self, params: Mapping[str, Any]) -> tuple[int, int]:  # noqa: D102
        return _check((params["width"], params["depth"]))

    def spec_to_params(self, spec: tuple[int, int]) -> dict[str, Any]:  # noqa: D102
        return {"width": spec[0], "depth": spec[1]}

    def display(self, spec: tuple[int, int]) -> str:  # noqa: D102
        return f"toy:w={spec[0]};d={spec[1]}"

    def spec_record(self, spec: tuple[int, int]) -> dict[str, Any]:  # noqa: D102
        return {"arch_str": self.display(spec), "toy": list(spec)}

    def spec_from_record(self, record: Mapping[str, Any]) -> tuple[int, int]:  # noqa: D102
        if "toy" not in record:
            raise ModelFileError("a toy architecture needs its toy field")
        return _check(tuple(record["toy"]))

    def distributions(self) -> dict[str, CategoricalDistribution]:  # noqa: D102
        return {"width": CategoricalDistribution(WIDTHS), "depth": CategoricalDistribution(DEPTHS)}

    def build_network(self, spec: tuple[int, int]) -> nn.Module:  # noqa: D102
        return ToyNet(spec, self.in_channels, self.num_classes)

    def model_fields(self, spec: tuple[int, int]) -> dict[str, Any]:  # noqa: D102
        return {"arch_str": self.display(spec), "toy": list(spec), **self.pareto_fields()}

    @classmethod
    def network_from_model(cls, meta: Mapping[str, Any]) -> nn.Module:  # noqa: D102
        shape = meta["shape"]
        return ToyNet(tuple(meta["toy"]), shape["in_channels"], shape["num_classes"])

    @classmethod
    def model_problem(cls, meta: Mapping[str, Any]) -> str | None:  # noqa: D102
        return None if "toy" in meta else "a toy model needs its toy field"

    def teacher(self) -> tuple[int, int]:  # noqa: D102
        return (MAX_W, MAX_D)

    def new_supernet(self) -> ToySupernet:  # noqa: D102
        return ToySupernet(self.in_channels, self.num_classes)

    def train_supernet(self, supernet, params, x, y) -> TrainedSupernet:  # noqa: D102
        from nasforge.training import fit

        sp = params.search
        losses = fit(
            supernet, x, y, epochs=sp.supernet_epochs, batch_size=sp.batch_size, lr=sp.lr, seed=0
        )
        return TrainedSupernet(losses, {"toy_epochs": len(losses)})

    def load_supernet(self, folder: Path) -> ToySupernet:  # noqa: D102
        from safetensors.torch import load_file

        net = self.new_supernet()
        net.load_state_dict(load_file(str(Path(folder) / "supernet.safetensors")))
        return net

    def block_space(self) -> ToyBlocks:  # noqa: D102
        return ToyBlocks(self.in_channels, self.num_classes, self.resolution)
