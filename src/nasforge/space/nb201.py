"""NAS-Bench-201 cell encoding (pure Python, no torch).

A NAS-Bench-201 cell is a DAG of 4 nodes; every edge ``(j, i)`` with ``i < j`` carries one of five
operations. The canonical string lists the edges into node 1, then node 2, then node 3::

    |op~0|+|op~0|op~1|+|op~0|op~1|op~2|

:class:`CellSpec` is the one encoding used by the search space, the supernet, the samplers
(parameters ``edge0`` .. ``edge5``) and the tabular benchmark. Two integer indices exist:

* our own canonical index (:meth:`CellSpec.to_index`): the ops as a base-5 number, ``edge0`` the
  most significant digit, digits as positions in :data:`OPS`; a bijection onto ``range(5**6)``;
* the official NAS-Bench-201 ``arch_idx``, which has no closed form: :class:`Nb201IndexTable` maps
  it through a table (CSV with ``arch_idx`` and ``arch_str`` columns).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from nasforge.errors import ConfigError, DataError

OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
"""The five candidate operations, in NAS-Bench-201's order."""

EDGES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
"""Edges as ``(to_node, from_node)``, in ``arch_str`` order (``edge0`` .. ``edge5``)."""

N_NODES = 4
NUM_ARCHS = len(OPS) ** len(EDGES)
PARAM_NAMES: tuple[str, ...] = tuple(f"edge{i}" for i in range(len(EDGES)))
"""Sampler parameter names of a cell, one per edge, each with choices :data:`OPS`."""


def search_space() -> dict[str, list[str]]:
    """Return the cell space as sampler parameters: ``{"edge0": list(OPS), ...}``."""
    return {name: list(OPS) for name in PARAM_NAMES}


@dataclass(frozen=True)
class CellSpec:
    """One NAS-Bench-201 cell: the operation on each of the 6 edges, in :data:`EDGES` order.

    Raises:
        ConfigError: if ``ops`` does not hold exactly 6 names from :data:`OPS`.
    """

    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        ops = self.ops
        if isinstance(ops, str) or not isinstance(ops, tuple | list):
            raise ConfigError(f"CellSpec.ops must be a tuple of {len(EDGES)} op names, got {ops!r}")
        if len(ops) != len(EDGES):
            raise ConfigError(f"CellSpec needs {len(EDGES)} ops (one per edge), got {len(ops)}")
        for i, op in enumerate(ops):
            if op not in OPS:
                raise ConfigError(f"unknown op {op!r} on edge{i}; expected one of {', '.join(OPS)}")
        # A list passed by the caller is stored as a tuple so the spec stays hashable.
        object.__setattr__(self, "ops", tuple(ops))

    @property
    def arch_str(self) -> str:
        """The canonical NAS-Bench-201 string of this cell."""
        nodes = []
        k = 0
        for node in range(1, N_NODES):
            parts = []
            for src in range(node):
                parts.append(f"{self.ops[k]}~{src}")
                k += 1
            nodes.append("|" + "|".join(parts) + "|")
        return "+".join(nodes)

    @classmethod
    def from_arch_str(cls, s: str) -> CellSpec:
        """Parse a canonical ``arch_str``.

        Args:
            s: e.g. ``"|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|..."``.

        Returns:
            The cell.

        Raises:
            ConfigError: if the string is not a well-formed NAS-Bench-201 cell string.
        """
        if not isinstance(s, str):
            raise ConfigError(f"arch_str must be a string, got {type(s).__name__}")
        nodes = s.strip().split("+")
        if len(nodes) != N_NODES - 1:
            raise ConfigError(f"bad arch_str {s!r}: expected {N_NODES - 1} '+'-separated nodes")
        ops: list[str] = []
        for node, text in enumerate(nodes, start=1):
            if len(text) < 2 or not (text.startswith("|") and text.endswith("|")):
                raise ConfigError(f"bad arch_str {s!r}: node {node} must be enclosed in '|'")
            parts = text[1:-1].split("|")
            if len(parts) != node:
                raise ConfigError(f"bad arch_str {s!r}: node {node} needs {node} inputs")
            for src, part in enumerate(parts):
                op, sep, idx = part.partition("~")
                if not sep or idx != str(src):
                    raise ConfigError(
                        f"bad arch_str {s!r}: expected 'op~{src}' for node {node}, got {part!r}"
                    )
                if op not in OPS:
                    raise ConfigError(
                        f"bad arch_str {s!r}: unknown op {op!r}; expected one of {', '.join(OPS)}"
                    )
                ops.append(op)
        return cls(tuple(ops))

    def to_params(self) -> dict[str, str]:
        """Sampler parameters ``{"edge0": op, ...}`` of this cell."""
        return dict(zip(PARAM_NAMES, self.ops, strict=True))

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> CellSpec:
        """Build a cell from sampler parameters ``edge0`` .. ``edge5``.

        Raises:
            ConfigError: if a parameter is missing or not an op name.
        """
        missing = [name for name in PARAM_NAMES if name not in params]
        if missing:
            raise ConfigError(f"cell parameters missing: {', '.join(missing)}")
        return cls(tuple(str(params[name]) for name in PARAM_NAMES))

    def to_json(self) -> str:
        """Serialize as ``{"space": "nb201", "ops": [...], "arch_str": ...}``."""
        return json.dumps({"space": "nb201", "ops": list(self.ops), "arch_str": self.arch_str})

    @classmethod
    def from_json(cls, text: str) -> CellSpec:
        """Inverse of :meth:`to_json`; ``arch_str``, if present, must agree with ``ops``.

        Raises:
            ConfigError: on malformed JSON, a different space, or inconsistent fields.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"cell spec is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("space", "nb201") != "nb201":
            raise ConfigError("cell spec JSON must be an object with space 'nb201'")
        if "ops" in data:
            spec = cls(tuple(data["ops"]) if isinstance(data["ops"], list) else data["ops"])
            if "arch_str" in data and data["arch_str"] != spec.arch_str:
                raise ConfigError("cell spec JSON: 'arch_str' disagrees with 'ops'")
            return spec
        if "arch_str" in data:
            return cls.from_arch_str(data["arch_str"])
        raise ConfigError("cell spec JSON needs 'ops' or 'arch_str'")

    def to_index(self) -> int:
        """Our canonical index in ``range(5**6)``: base-5 digits, ``edge0`` most significant."""
        idx = 0
        for op in self.ops:
            idx = idx * len(OPS) + OPS.index(op)
        return idx

    @classmethod
    def from_index(cls, index: int) -> CellSpec:
        """Inverse of :meth:`to_index`.

        Raises:
            ConfigError: if ``index`` is not an int in ``range(5**6)``.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < NUM_ARCHS:
            raise ConfigError(f"cell index must be an int in [0, {NUM_ARCHS}), got {index!r}")
        digits = []
        for _ in EDGES:
            index, d = divmod(index, len(OPS))
            digits.append(OPS[d])
        return cls(tuple(reversed(digits)))


def all_cells() -> Iterator[CellSpec]:
    """All ``5**6`` cells in canonical-index order."""
    for i in range(NUM_ARCHS):
        yield CellSpec.from_index(i)


class Nb201IndexTable:
    """Maps the official NAS-Bench-201 ``arch_idx`` to cells and back, through a table.

    Args:
        mapping: ``arch_idx -> CellSpec``; must be one-to-one.

    Raises:
        DataError: if two indices share a cell.
    """

    def __init__(self, mapping: Mapping[int, CellSpec]) -> None:
        self._by_idx = dict(mapping)
        self._by_spec: dict[CellSpec, int] = {}
        for idx, spec in self._by_idx.items():
            if spec in self._by_spec:
                raise DataError(
                    f"arch_idx {self._by_spec[spec]} and {idx} share cell {spec.arch_str}"
                )
            self._by_spec[spec] = idx

    @classmethod
    def from_csv(cls, path: str | Path) -> Nb201IndexTable:
        """Load from a CSV with ``arch_idx`` and ``arch_str`` columns (other columns ignored).

        Raises:
            DataError: if the file is missing, lacks the columns, or has bad or duplicate rows.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"NB201 table not found: {path}")
        mapping: dict[int, CellSpec] = {}
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            if "arch_idx" not in cols or "arch_str" not in cols:
                raise DataError(f"{path}: needs columns 'arch_idx' and 'arch_str', has {cols}")
            for line, row in enumerate(reader, start=2):
                try:
                    idx = int(row["arch_idx"])
                    spec = CellSpec.from_arch_str(row["arch_str"])
                except (ValueError, ConfigError) as exc:
                    raise DataError(f"{path}:{line}: {exc}") from exc
                if idx in mapping:
                    raise DataError(f"{path}:{line}: duplicate arch_idx {idx}")
                mapping[idx] = spec
        return cls(mapping)

    def __len__(self) -> int:
        return len(self._by_idx)

    def spec(self, arch_idx: int) -> CellSpec:
        """The cell of an official ``arch_idx``.

        Raises:
            ConfigError: if the index is not in the table.
        """
        try:
            return self._by_idx[arch_idx]
        except KeyError:
            raise ConfigError(f"arch_idx {arch_idx} not in the NB201 index table") from None

    def arch_idx(self, spec: CellSpec) -> int:
        """The official ``arch_idx`` of a cell.

        Raises:
            ConfigError: if the cell is not in the table.
        """
        try:
            return self._by_spec[spec]
        except KeyError:
            raise ConfigError(f"cell {spec.arch_str} not in the NB201 index table") from None


def active_edges(spec: CellSpec) -> tuple[bool, ...]:
    """Which edges lie on some input-to-output path of non-``none`` edges.

    Ops on other edges cannot change the cell's output (they may still cost compute), which makes
    this a cheap structural feature computable without training.
    """
    live = [op != "none" for op in spec.ops]
    from_input = [True] + [False] * (N_NODES - 1)
    for k, (dst, src) in enumerate(EDGES):  # EDGES is topologically ordered by dst
        if live[k] and from_input[src]:
            from_input[dst] = True
    to_output = [False] * (N_NODES - 1) + [True]
    for k in reversed(range(len(EDGES))):
        dst, src = EDGES[k]
        if live[k] and to_output[dst]:
            to_output[src] = True
    return tuple(
        live[k] and from_input[src] and to_output[dst] for k, (dst, src) in enumerate(EDGES)
    )
