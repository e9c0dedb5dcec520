"""The macro space: MobileNetV2 / Once-for-All elastic networks (``space.kind: macro``).

A spec is a :class:`~nasforge.space.macro.MacroSpec` (per-stage depth, width, kernel and
expansion; sampler parameters ``stage0_depth`` ...), its display string
:func:`~nasforge.space.macro.macro_arch_str` and its record the spec as a JSON object. A run
searches the part of the space ``space.macro`` configures; the supernet
(:mod:`nasforge.supernet.macro_supernet`) is trained by progressive shrinking with the sandwich
rule (``search.supernet_epochs`` split over the phases; resumable per phase and epoch), and its
teacher is the largest spec of that part. Every spec is valid; latency comes from runtime targets
(``table:`` CSVs are keyed by NAS-Bench-201 cells).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.distributions import CategoricalDistribution

from nasforge.errors import ModelFileError
from nasforge.space.base import SearchSpace, TrainedSupernet
from nasforge.space.registry import register

if TYPE_CHECKING:
    from nasforge.space.macro import MacroSpec
    from nasforge.supernet.macro_supernet import ElasticChoices


@register
class MacroSearchSpace(SearchSpace):
    """The macro elastic space configured for one input shape and a part of its choices.

    Args:
        in_channels: Image channels.
        num_classes: Classifier outputs.
        resolution: Input height and width.
        choices: The part of the space searched (default: all of it).
        sandwich_random: Random subnets per supernet step besides the largest and smallest.
    """

    name = "macro"
    summary = "MobileNetV2 / Once-for-All elastic networks (the space.macro section)"
    study_name = "nasforge-macro-search"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: tuple[int, int],
        choices: ElasticChoices | None = None,
        sandwich_random: int = 2,
    ) -> None:
        from nasforge.supernet.macro_supernet import FULL_SPACE

        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.elastic = choices or FULL_SPACE
        self.sandwich_random = int(sandwich_random)

    # -- configuration

    @classmethod
    def from_params(  # noqa: D102
        cls, space_params: Any, input_shape: tuple[int, ...], num_classes: int
    ) -> MacroSearchSpace:
        from nasforge.supernet.macro_search import configured_choices

        macro = space_params.macro
        return cls(
            input_shape[0],
            num_classes,
            (input_shape[1], input_shape[2]),
            configured_choices(macro),
            macro.sandwich_random,
        )

    @classmethod
    def from_pareto(  # noqa: D102
        cls, pareto: Mapping[str, Any], input_shape: tuple[int, ...]
    ) -> MacroSearchSpace:
        from nasforge.supernet.macro_supernet import ElasticChoices

        try:
            shape = [int(v) for v in pareto["input_shape"]]
            num_classes = int(pareto["num_classes"])
            ch = pareto.get("choices")
            choices = (
                ElasticChoices("configured", **{k: tuple(v) for k, v in ch.items()}) if ch else None
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"pareto.json has no valid macro space fields: {err}") from None
        return cls(shape[0], num_classes, (shape[1], shape[2]), choices)

    def pareto_fields(self) -> dict[str, Any]:  # noqa: D102
        ch = self.elastic
        return {
            "input_shape": [self.in_channels, *self.resolution],
            "num_classes": self.num_classes,
            "shape": {"in_channels": self.in_channels, "num_classes": self.num_classes},
            "choices": {
                "depths": list(ch.depths),
                "widths": list(ch.widths),
                "kernels": list(ch.kernels),
                "expands": list(ch.expands),
            },
        }

    # -- spec codec

    def spec_from_params(self, params: Mapping[str, Any]) -> MacroSpec:  # noqa: D102
        from nasforge.space.macro import MacroSpec

        return MacroSpec.from_params(params)

    def spec_to_params(self, spec: MacroSpec) -> dict[str, Any]:  # noqa: D102
        return spec.to_params()

    def display(self, spec: MacroSpec) -> str:  # noqa: D102
        from nasforge.space.macro import macro_arch_str

        return macro_arch_str(spec)

    def spec_record(self, spec: MacroSpec) -> dict[str, Any]:  # noqa: D102
        return {"spec": json.loads(spec.to_json()), "arch_str": self.display(spec)}

    def spec_from_record(self, record: Mapping[str, Any]) -> MacroSpec:  # noqa: D102
        from nasforge.space.macro import MacroSpec

        if "spec" not in record:
            raise ModelFileError("a macro architecture needs its spec")
        return MacroSpec.from_json(json.dumps(record["spec"]))

    def spec_text(self, spec: MacroSpec) -> str:  # noqa: D102
        return spec.to_json()

    def spec_from_text(self, text: str) -> MacroSpec:  # noqa: D102
        from nasforge.space.macro import MacroSpec

        return MacroSpec.from_json(text)

    # -- sampler

    def distributions(self) -> dict[str, CategoricalDistribution]:  # noqa: D102
        from nasforge.supernet.macro_search import macro_distributions

        return macro_distributions(self.elastic)

    def choices(self) -> dict[str, list[Any]]:  # noqa: D102
        from nasforge.supernet.macro_search import choices_search_space

        return choices_search_space(self.elastic)

    def sample_spec(self, rng: random.Random) -> MacroSpec:
        """A spec drawn uniformly per stage and dimension, in the supernet's own order (depths,
        widths, kernels, expansions), so a seeded draw is the one the supernet would make."""
        return self.elastic.sample(rng)

    # -- networks

    def build_network(self, spec: MacroSpec) -> Any:  # noqa: D102
        from nasforge.space.macro import build_macro_network

        return build_macro_network(spec, self.in_channels, self.num_classes)

    def model_fields(self, spec: MacroSpec) -> dict[str, Any]:  # noqa: D102
        return {
            "arch_str": self.display(spec),
            "spec": json.loads(spec.to_json()),
            "shape": {"in_channels": self.in_channels, "num_classes": self.num_classes},
        }

    @classmethod
    def network_from_model(cls, meta: Mapping[str, Any]) -> Any:  # noqa: D102
        from nasforge.space.macro import MacroSpec, build_macro_network

        shape = meta["shape"]
        spec = MacroSpec.from_json(json.dumps(meta["spec"]))
        return build_macro_network(spec, int(shape["in_channels"]), int(shape["num_classes"]))

    @classmethod
    def model_problem(cls, meta: Mapping[str, Any]) -> str | None:  # noqa: D102
        return None if "spec" in meta else "a macro model needs its spec"

    # -- supernet

    def teacher(self) -> MacroSpec:
        """The largest spec of the searched part of the space."""
        return self.elastic.largest()

    def new_supernet(self) -> Any:  # noqa: D102
        from nasforge.supernet.macro_supernet import MacroSupernet

        return MacroSupernet(self.in_channels, self.num_classes, self.elastic)

    def train_supernet(self, supernet: Any, params: Any, x: Any, y: Any) -> TrainedSupernet:
        """Progressive shrinking (largest -> kernel -> depth -> width/expansion, the phases that
        open something within the searched choices), resumable per phase and epoch."""
        from nasforge.checkpoint import checkpoint_for
        from nasforge.supernet.macro_search import progressive_phases, split_epochs
        from nasforge.supernet.macro_supernet import train_progressive

        sp = params.search
        phases = progressive_phases(self.elastic)
        losses = train_progressive(
            supernet,
            x,
            y,
            phases=phases,
            epochs_per_phase=split_epochs(sp.supernet_epochs, len(phases)),
            batch_size=sp.batch_size,
            lr=sp.lr,
            weight_decay=sp.weight_decay,
            n_random=self.sandwich_random,
            seed=params.run.seed,
            log_every=1,
            checkpoints=checkpoint_for,
        )
        return TrainedSupernet(losses, {"phases": [p.name for p in phases]})

    def load_supernet(self, folder: Path) -> Any:  # noqa: D102
        from nasforge.supernet.macro_search import load_macro_supernet

        return load_macro_supernet(folder, self.in_channels, self.num_classes)

    # -- latency

    def block_space(self) -> Any:
        """Only the blocks the searched choices can contain (a smaller table to profile)."""
        from nasforge.space.macro_blocks import MacroBlockSpace

        ch = self.elastic
        return MacroBlockSpace(
            self.in_channels,
            self.num_classes,
            self.resolution,
            depths=ch.depths,
            widths=ch.widths,
            kernels=ch.kernels,
            expands=ch.expands,
        )
