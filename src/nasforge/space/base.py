"""The :class:`SearchSpace` protocol: everything nasforge needs to know about one space.

A search space is one module that subclasses :class:`SearchSpace` and registers itself with
:func:`nasforge.space.registry.register` (see :mod:`nasforge.space.cell_space` and
:mod:`nasforge.space.macro_space`). The rest of nasforge never compares a space's name: the search
stage, the search driver, the train stage, the model files, the latency profiler and the hybrid
strategy's surrogate all go through these methods.

A space class describes the family (its ``name``, what it supports); an instance is the family
configured for one run (e.g. the cell network's channels and the input resolution, or the part of
the macro space searched), built by :meth:`SearchSpace.from_params` for a search and by
:meth:`SearchSpace.from_pareto` from a search's output. What an instance provides:

* **spec codec**: sampler parameters <-> spec (:meth:`~SearchSpace.spec_from_params`,
  :meth:`~SearchSpace.spec_to_params`), spec <-> JSON record (:meth:`~SearchSpace.spec_record`,
  :meth:`~SearchSpace.spec_from_record`; a record always holds ``arch_str``) and a one-line
  display string (:meth:`~SearchSpace.display`, the record's ``arch_str``), and a one-line text
  that reads back (:meth:`~SearchSpace.spec_text`, :meth:`~SearchSpace.spec_from_text`);
* **sampler distributions** (:meth:`~SearchSpace.distributions`), **validity**
  (:meth:`~SearchSpace.validity`: points that must never be evaluated, e.g. cells without an
  input-to-output path) and a uniform draw of a valid spec (:meth:`~SearchSpace.sample_spec`);
* **networks**: the standalone network of a spec (:meth:`~SearchSpace.build_network`), the
  architecture fields of ``model.json`` (:meth:`~SearchSpace.model_fields`) and the network back
  from them (:meth:`~SearchSpace.network_from_model`);
* **supernet**: a factory (:meth:`~SearchSpace.new_supernet`), its training
  (:meth:`~SearchSpace.train_supernet`), loading (:meth:`~SearchSpace.load_supernet`) and a subnet
  with inherited weights (:meth:`~SearchSpace.inherited_subnet`); the distillation **teacher**
  (:meth:`~SearchSpace.teacher`); an optional search **prior** (:meth:`~SearchSpace.prior`);
* **block decomposition** for latency tables (:meth:`~SearchSpace.block_space`, a
  :class:`~nasforge.space.blocks.BlockSpace`);
* **surrogate features** for the hybrid strategy (:meth:`~SearchSpace.surrogate_features`).

Keep a space module's own imports light (no torch at module level): the registry imports every
space module to validate ``space.kind`` in params and to find surrogate features, and both happen
in processes that never build a network.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from optuna.distributions import CategoricalDistribution

IsValid = Callable[[Mapping[str, Any]], bool]
FeatureFn = Callable[[Any], Any]
"""Extra surrogate features: ``(n, d)`` choice indices (one column per sampler parameter, a numpy
array) -> ``(n, k)`` features."""


@dataclass
class TrainedSupernet:
    """What :meth:`SearchSpace.train_supernet` reports besides the trained weights.

    Attributes:
        losses: The training losses as ``history.json`` keeps them (``supernet_loss``).
        fields: More ``pareto.json`` fields describing the training (e.g. its phases).
    """

    losses: Any
    fields: dict[str, Any] = field(default_factory=dict)


class SearchSpace(ABC):
    """A family of architectures, configured for one run (see the module docstring).

    Class attributes:
        name: The space's name: ``space.kind`` in params, ``space`` in ``pareto.json`` and
            ``model.json``, the registry key.
        summary: One line for the CLI and the docs.
        study_name: The Optuna study's name inside the search's ``study.db``.
        table_targets: Whether ``table:`` targets (latency CSVs keyed by NAS-Bench-201
            ``arch_str``) can score its architectures.
        priors: The ``search.prior`` values it can compute (besides ``none``).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    study_name: ClassVar[str] = ""
    table_targets: ClassVar[bool] = False
    priors: ClassVar[tuple[str, ...]] = ()

    # -- configuration -----------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_params(
        cls, space_params: Any, input_shape: tuple[int, ...], num_classes: int
    ) -> SearchSpace:
        """The space as ``params.space`` configures it, for data of this shape.

        Args:
            space_params: The ``space`` section of :class:`nasforge.config.Params`.
            input_shape: Input shape without batch (C, H, W).
            num_classes: Classifier outputs.
        """

    @classmethod
    @abstractmethod
    def from_pareto(cls, pareto: Mapping[str, Any], input_shape: tuple[int, ...]) -> SearchSpace:
        """The space a search searched, from its ``pareto.json`` (and the data's input shape).

        Raises:
            ModelFileError: ``pareto`` lacks or mangles the space's fields.
        """

    @abstractmethod
    def pareto_fields(self) -> dict[str, Any]:
        """The ``pareto.json`` fields :meth:`from_pareto` reads back (e.g. the network shape)."""

    # -- spec codec ----------------------------------------------------------------------------

    @abstractmethod
    def spec_from_params(self, params: Mapping[str, Any]) -> Any:
        """The spec of sampler parameters (keys of :meth:`distributions`)."""

    @abstractmethod
    def spec_to_params(self, spec: Any) -> dict[str, Any]:
        """Sampler parameters of ``spec``."""

    @abstractmethod
    def display(self, spec: Any) -> str:
        """A compact one-line name of ``spec``, unique within the space (``arch_str``)."""

    @abstractmethod
    def spec_record(self, spec: Any) -> dict[str, Any]:
        """JSON fields of ``spec`` in trial records, candidates and the teacher: ``arch_str``
        (:meth:`display`) and what :meth:`spec_from_record` reads."""

    @abstractmethod
    def spec_from_record(self, record: Mapping[str, Any]) -> Any:
        """The spec of a record written by :meth:`spec_record` (or of a ``model.json``).

        Raises:
            ModelFileError: the record lacks the fields; ConfigError: they hold no valid spec.
        """

    def spec_text(self, spec: Any) -> str:
        """One line of text naming ``spec`` that :meth:`spec_from_text` reads back (what space
        coverage runs key their cases and checkpoints by). Default: the sampler parameters as
        JSON."""
        return json.dumps(self.spec_to_params(spec), sort_keys=True)

    def spec_from_text(self, text: str) -> Any:
        """The spec of a :meth:`spec_text`.

        Raises:
            ConfigError: ``text`` names no spec of this space.
        """
        from nasforge.errors import ConfigError

        try:
            return self.spec_from_params(json.loads(text))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"not a {self.name} architecture: {text!r} ({err})") from None

    # -- sampler ---------------------------------------------------------------------------------

    @abstractmethod
    def distributions(self) -> dict[str, CategoricalDistribution]:
        """The sampler parameters and their choices (Optuna distributions)."""

    def choices(self) -> dict[str, list[Any]]:
        """``{param: choices}`` for nasforge's joint samplers (from :meth:`distributions`)."""
        return {n: list(d.choices) for n, d in self.distributions().items()}

    def validity(self) -> IsValid | None:
        """``params -> bool`` rejecting points that must never be evaluated; None: all valid."""
        return None

    def sample_spec(self, rng: random.Random) -> Any:
        """A valid spec drawn uniformly, each sampler parameter independently from its choices
        (points :meth:`validity` rejects are drawn again)."""
        choices = self.choices()
        valid = self.validity()
        while True:
            params = {name: rng.choice(values) for name, values in choices.items()}
            if valid is None or valid(params):
                return self.spec_from_params(params)

    @classmethod
    def surrogate_features(cls, names: list[str], choices: list[list[Any]]) -> FeatureFn | None:
        """Structural surrogate features when ``names``/``choices`` are this space's encoding.

        The hybrid strategy adds them to the one-hot encoding of the parameters (see
        :mod:`nasforge.search.hybrid`); None: one-hot only.
        """
        del names, choices
        return None

    # -- networks --------------------------------------------------------------------------------

    @abstractmethod
    def build_network(self, spec: Any) -> Any:
        """The freshly initialised standalone ``nn.Module`` of ``spec``."""

    @abstractmethod
    def model_fields(self, spec: Any) -> dict[str, Any]:
        """The architecture fields of ``model.json`` (besides ``space``): ``arch_str``, ``shape``
        and whatever :meth:`network_from_model` needs."""

    @classmethod
    @abstractmethod
    def network_from_model(cls, meta: Mapping[str, Any]) -> Any:
        """The (unpruned, freshly initialised) network a ``model.json`` describes.

        Raises:
            ConfigError, KeyError, TypeError, ValueError: malformed architecture fields.
        """

    @classmethod
    def model_problem(cls, meta: Mapping[str, Any]) -> str | None:
        """What a ``model.json`` of this space lacks (None: nothing), checked on reading."""
        del meta
        return None

    # -- supernet --------------------------------------------------------------------------------

    @abstractmethod
    def teacher(self) -> Any:
        """The distillation teacher's spec (the largest subnet); the search evaluates it first."""

    @abstractmethod
    def new_supernet(self) -> Any:
        """A freshly initialised weight-sharing supernet (OFA's ``set_active_subnet`` /
        ``get_active_subnet``)."""

    @abstractmethod
    def train_supernet(self, supernet: Any, params: Any, x: Any, y: Any) -> TrainedSupernet:
        """Train ``supernet`` in place as ``params.search`` says (resumable through
        :func:`nasforge.checkpoint.checkpoint_for` where the space supports it)."""

    @abstractmethod
    def load_supernet(self, folder: Path) -> Any:
        """The trained supernet a search wrote into ``folder`` (``supernet.safetensors``).

        Raises:
            ModelFileError: missing, corrupt or not this space's supernet.
        """

    def inherited_subnet(self, supernet: Any, spec: Any, calibration: list[Any]) -> Any:
        """The standalone subnet of ``spec`` with the supernet's weights, its BatchNorm
        statistics re-estimated on the ``calibration`` batches (none: kept as inherited)."""
        from nasforge.training import recalibrate_bn

        supernet.set_active_subnet(spec)
        subnet = supernet.get_active_subnet()
        if calibration:
            recalibrate_bn(subnet, calibration)
        return subnet

    def prior(
        self, kind: str, params: Any, x: Any, y: Any
    ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """A ``search.prior`` of kind ``kind`` (one of :attr:`priors`): the op-probability prior
        ``{param: {choice: p}}`` and a JSON record of how it was obtained."""
        del params, x, y
        raise NotImplementedError(f"the {self.name} space has no {kind!r} prior")

    # -- latency -------------------------------------------------------------------------------

    @abstractmethod
    def block_space(self) -> Any:
        """This configuration as a :class:`~nasforge.space.blocks.BlockSpace` (latency tables)."""
