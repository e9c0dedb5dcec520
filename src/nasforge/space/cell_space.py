"""The cell space: NAS-Bench-201 cells in NAS-Bench-201's network skeleton (``space.kind: cell``).

A spec is a :class:`~nasforge.space.nb201.CellSpec` (one op per edge; sampler parameters
``edge0`` .. ``edge5``), its display string the NAS-Bench-201 ``arch_str``. The network
(:mod:`nasforge.space.cell`) is configured by ``space.channels`` and ``space.cells_per_stage``; the
supernet (:mod:`nasforge.supernet.cell_supernet`) is trained by uniform single-path sampling and
resumes per epoch; a cell without an input-to-output path (a constant network) is never
evaluated; the DARTS prior (``search.prior: darts``) steers the hybrid strategy; ``table:``
targets look latencies up by ``arch_str``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import CategoricalDistribution

from nasforge.errors import ModelFileError
from nasforge.space import nb201
from nasforge.space.base import FeatureFn, IsValid, SearchSpace, TrainedSupernet
from nasforge.space.registry import register

if TYPE_CHECKING:
    from nasforge.space.cell import CellNetworkShape


def connected(params: Mapping[str, Any]) -> bool:
    """Whether the cell of sampler parameters ``params`` has an input-to-output path (the same
    test as :func:`nasforge.space.cell.is_connected`, without torch)."""
    return any(nb201.active_edges(nb201.CellSpec(tuple(params[n] for n in nb201.PARAM_NAMES))))


def nb201_active_features(idx: np.ndarray) -> np.ndarray:
    """Structural features of NB201 cells given as ``(n, 6)`` indices into OPS.

    One-hot of the ops on active edges (on an input-to-output path), op counts over active edges
    and over all edges, a flag for cells with no input-to-output path, and per input-to-output
    path whether it is live and its op counts.
    """
    none = nb201.OPS.index("none")
    live = idx != none
    n = len(idx)
    from_in = np.zeros((n, nb201.N_NODES), dtype=bool)
    from_in[:, 0] = True
    for k, (dst, src) in enumerate(nb201.EDGES):
        from_in[:, dst] |= live[:, k] & from_in[:, src]
    to_out = np.zeros((n, nb201.N_NODES), dtype=bool)
    to_out[:, -1] = True
    for k in reversed(range(len(nb201.EDGES))):
        dst, src = nb201.EDGES[k]
        to_out[:, src] |= live[:, k] & to_out[:, dst]
    active = np.stack(
        [live[:, k] & from_in[:, s] & to_out[:, d] for k, (d, s) in enumerate(nb201.EDGES)], 1
    )
    n_ops = len(nb201.OPS)
    feats = np.eye(n_ops)[idx].reshape(n, len(nb201.EDGES) * n_ops)
    active_oh = feats * np.repeat(active, n_ops, axis=1)
    # Op counts pooled over edges: few features that explain much, so the evidence-maximized
    # regression can lean on them while data are scarce and on the per-edge ones later.
    active_counts = active_oh.reshape(n, len(nb201.EDGES), n_ops).sum(axis=1)
    all_counts = feats.reshape(n, len(nb201.EDGES), n_ops).sum(axis=1)
    disconnected = (~active.any(axis=1)).astype(float)[:, None]
    return np.hstack(
        [active_oh, active_counts, all_counts, disconnected, _path_features(idx, live)]
    )


def _nb201_paths() -> list[list[int]]:
    """Edge indices of every input-to-output path of the NB201 cell DAG."""
    out: list[list[int]] = []

    def walk(node: int, edges: list[int]) -> None:
        if node == nb201.N_NODES - 1:
            out.append(edges)
            return
        for k, (dst, src) in enumerate(nb201.EDGES):
            if src == node:
                walk(dst, [*edges, k])

    walk(0, [])
    return out


def _path_features(idx: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Per input-to-output path: whether it is live, and its op counts when it is (depth: what a
    stack of ops on one path computes, which per-edge features cannot express additively)."""
    n_ops = len(nb201.OPS)
    cols = []
    for path in _nb201_paths():
        ok = live[:, path].all(axis=1)
        counts = np.stack([(idx[:, path] == o).sum(axis=1) for o in range(n_ops)], axis=1)
        cols += [ok[:, None].astype(float), counts * ok[:, None]]
    return np.hstack(cols).astype(float)


@register
class CellSearchSpace(SearchSpace):
    """The NAS-Bench-201 cell space configured with a network shape and input resolution.

    Args:
        shape: Channels, cells per stage, input channels and classes.
        resolution: Input height and width (latency tables need it).
    """

    name = "cell"
    summary = "NAS-Bench-201 cells in NAS-Bench-201's network (space.channels, cells_per_stage)"
    # The name the pipeline's study had before spaces were plug-ins: kept, so a study.db of an
    # earlier search loads by the same name.
    study_name = "nasforge-search"
    table_targets = True
    priors = ("darts",)

    def __init__(self, shape: CellNetworkShape, resolution: tuple[int, int]) -> None:
        self.shape = shape
        self.resolution = (int(resolution[0]), int(resolution[1]))

    # -- configuration

    @classmethod
    def from_params(  # noqa: D102
        cls, space_params: Any, input_shape: tuple[int, ...], num_classes: int
    ) -> CellSearchSpace:
        from nasforge.space.cell import CellNetworkShape

        shape = CellNetworkShape(
            in_channels=input_shape[0],
            num_classes=num_classes,
            channels=space_params.channels,
            cells_per_stage=space_params.cells_per_stage,
        )
        return cls(shape, (input_shape[1], input_shape[2]))

    @classmethod
    def from_pareto(  # noqa: D102
        cls, pareto: Mapping[str, Any], input_shape: tuple[int, ...]
    ) -> CellSearchSpace:
        from nasforge.space.cell import CellNetworkShape

        try:
            shape = CellNetworkShape(**pareto["shape"])
        except (KeyError, TypeError) as err:
            raise ModelFileError(f"pareto.json has no valid cell network shape: {err}") from None
        return cls(shape, (input_shape[1], input_shape[2]))

    def pareto_fields(self) -> dict[str, Any]:  # noqa: D102
        return {"shape": self.shape.to_dict()}

    # -- spec codec

    def spec_from_params(self, params: Mapping[str, Any]) -> nb201.CellSpec:  # noqa: D102
        return nb201.CellSpec(tuple(params[n] for n in nb201.PARAM_NAMES))

    def spec_to_params(self, spec: nb201.CellSpec) -> dict[str, Any]:  # noqa: D102
        return dict(zip(nb201.PARAM_NAMES, spec.ops, strict=True))

    def display(self, spec: nb201.CellSpec) -> str:  # noqa: D102
        return spec.arch_str

    def spec_record(self, spec: nb201.CellSpec) -> dict[str, Any]:  # noqa: D102
        return {"arch_str": spec.arch_str, "ops": list(spec.ops)}

    def spec_from_record(self, record: Mapping[str, Any]) -> nb201.CellSpec:  # noqa: D102
        if "arch_str" not in record:
            raise ModelFileError("a cell architecture needs its arch_str")
        return nb201.CellSpec.from_arch_str(record["arch_str"])

    def spec_text(self, spec: nb201.CellSpec) -> str:  # noqa: D102
        return spec.arch_str

    def spec_from_text(self, text: str) -> nb201.CellSpec:  # noqa: D102
        return nb201.CellSpec.from_arch_str(text)

    # -- sampler

    def distributions(self) -> dict[str, CategoricalDistribution]:  # noqa: D102
        return {n: CategoricalDistribution(list(nb201.OPS)) for n in nb201.PARAM_NAMES}

    def choices(self) -> dict[str, list[Any]]:  # noqa: D102
        return nb201.search_space()

    def validity(self) -> IsValid:
        """Cells without an input-to-output path output zeros: never evaluated."""
        return connected

    @classmethod
    def surrogate_features(  # noqa: D102
        cls, names: list[str], choices: list[list[Any]]
    ) -> FeatureFn | None:
        if tuple(names) == nb201.PARAM_NAMES and all(tuple(c) == nb201.OPS for c in choices):
            return nb201_active_features
        return None

    # -- networks

    def build_network(self, spec: nb201.CellSpec) -> Any:  # noqa: D102
        from nasforge.space.cell import build_cell_network

        return build_cell_network(spec, self.shape)

    def model_fields(self, spec: nb201.CellSpec) -> dict[str, Any]:  # noqa: D102
        return {"arch_str": spec.arch_str, "shape": self.shape.to_dict()}

    @classmethod
    def network_from_model(cls, meta: Mapping[str, Any]) -> Any:  # noqa: D102
        from nasforge.space.cell import CellNetworkShape, build_cell_network

        return build_cell_network(
            nb201.CellSpec.from_arch_str(meta["arch_str"]), CellNetworkShape(**meta["shape"])
        )

    # -- supernet

    def teacher(self) -> nb201.CellSpec:  # noqa: D102
        from nasforge.supernet.cell_supernet import LARGEST_SPEC

        return LARGEST_SPEC

    def new_supernet(self) -> Any:  # noqa: D102
        from nasforge.supernet.cell_supernet import CellSupernet

        return CellSupernet(self.shape)

    def train_supernet(self, supernet: Any, params: Any, x: Any, y: Any) -> TrainedSupernet:
        """Uniform single-path training (SPOS), resumable after every epoch."""
        from nasforge.checkpoint import checkpoint_for
        from nasforge.supernet.cell_supernet import train_supernet_uniform

        sp = params.search
        losses = train_supernet_uniform(
            supernet,
            x,
            y,
            epochs=sp.supernet_epochs,
            batch_size=sp.batch_size,
            lr=sp.lr,
            weight_decay=sp.weight_decay,
            seed=params.run.seed,
            log_every=max(1, sp.supernet_epochs // 5),
            checkpoint=checkpoint_for("supernet"),
        )
        return TrainedSupernet(losses)

    def load_supernet(self, folder: Path) -> Any:  # noqa: D102
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from nasforge.supernet.cell_supernet import CellSupernet

        f = Path(folder) / "supernet.safetensors"
        try:
            state = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelFileError(f"corrupt or missing supernet weights {f}: {err}") from None
        supernet = CellSupernet(self.shape)
        try:
            supernet.load_state_dict(state)
        except RuntimeError as err:
            raise ModelFileError(
                f"supernet weights {f} do not match the search space: {err}"
            ) from None
        return supernet

    def prior(
        self, kind: str, params: Any, x: Any, y: Any
    ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """Run DARTS (first order, anti-collapse on) and return its op probabilities.

        Returns:
            The prior ``{edge: {op: probability}}`` for the hybrid sampler, and a JSON record of
            the run (derived cell, its share of parameter-free ops, per-edge probabilities,
            seconds).
        """
        import time

        from nasforge.supernet.darts import op_prior, param_free_share, run_darts

        if kind not in self.priors:
            return super().prior(kind, params, x, y)
        sp = params.search
        t0 = time.perf_counter()
        result = run_darts(
            x, y, self.shape, epochs=sp.darts_epochs, seed=params.run.seed, batch_size=sp.batch_size
        )
        prior = op_prior(result.alpha)
        record = {
            "kind": "darts",
            "epochs": sp.darts_epochs,
            "derived_arch_str": result.spec.arch_str,
            "param_free_share": param_free_share(result.spec),
            "op_probabilities": prior,
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"  DARTS prior ({sp.darts_epochs} epochs): derived {result.spec.arch_str}", flush=True
        )
        return prior, record

    # -- latency

    def block_space(self) -> Any:  # noqa: D102
        from nasforge.space.cell_blocks import CellBlockSpace

        return CellBlockSpace(self.shape, self.resolution)
