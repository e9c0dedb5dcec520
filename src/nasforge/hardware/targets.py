"""Hardware targets: data naming where a model runs, or a table of latencies measured elsewhere.

A :class:`Target` is a name, a runtime, a device, a precision and runtime options; what it can
do comes from its runtime (:mod:`nasforge.runtimes`). Two kinds exist:

* ``runtime`` targets run models here through the measurement harness
  (:func:`nasforge.bench.harness.measure`). Each runtime module declares its targets
  (:attr:`nasforge.runtimes.base.Runtime.targets`): ``onnxruntime-cpu``,
  ``onnxruntime-cpu-int8``, ``openvino-cpu`` (FP32 pinned), ``openvino-cpu-int8``,
  ``executorch-xnnpack-cpu``, ``executorch-xnnpack-cpu-int8``, ``onnxruntime-cuda`` and
  ``tensorrt-gpu`` (the last two only where an NVIDIA GPU and ``onnxruntime-gpu`` are present;
  elsewhere :meth:`Target.check_available` raises a one-line :class:`TargetError`).
* ``table`` targets, named ``table:<column>``, read latencies per architecture from an
  NB201-style CSV (one row per cell, keyed by ``arch_str``), so search can optimise for a
  Raspberry Pi or an FPGA that nasforge cannot run on. The CSV is given with
  ``get_target("table:raspi4_latency_ms", table=path)``, else the environment variable
  ``NASFORGE_LATENCY_CSV``, else ``<shared data>/nb201/nb201_dev.csv`` (shared data is
  ``NASFORGE_SHARED_DATA``, default ``<repo>/../shared/data``).

Latency for search comes through one interface for both kinds, the latency models of
:mod:`nasforge.hardware.latency`.

Adding a target:

* A device known only from measurements: add a column ``<device>_latency_ms`` (one row per
  ``arch_str``) to a CSV and use ``table:<device>_latency_ms`` with that CSV. No code.
* Another device or precision of an existing runtime: register the data,
  ``register_target(Target("my-cpu-int8", "onnxruntime", "cpu", "int8"))``.
* A new runtime: one module in :mod:`nasforge.runtimes` (its targets come with it).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nasforge.errors import TargetError
from nasforge.runtimes.base import TABLE, Runtime
from nasforge.runtimes.registry import get_runtime, list_runtimes

#: Devices of targets that need a GPU node.
GPU_DEVICES = ("cuda",)

_REGISTRY: dict[str, Target] = {}


def shared_data_dir() -> Path:
    """The shared data folder: ``$NASFORGE_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("NASFORGE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def default_table_csv() -> Path:
    """CSV a ``table:<column>`` target reads when none is given."""
    env = os.environ.get("NASFORGE_LATENCY_CSV")
    return Path(env) if env else shared_data_dir() / "nb201" / "nb201_dev.csv"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a model runs: data, resolved through the runtime registry.

    Attributes:
        name: Registry name, e.g. ``"openvino-cpu"`` or ``"table:raspi4_latency_ms"``.
        runtime: A registered runtime's name (``"onnxruntime"``, ``"openvino"``,
            ``"executorch"``, ``"tensorrt"``) or ``"table"``.
        device: ``"cpu"``, ``"cuda"`` or, for tables, the CSV column's device.
        precision: ``"fp32"`` or ``"int8"``.
        options: Runtime options (for tables: the CSV ``table`` and its ``column``).
    """

    name: str
    runtime: str
    device: str = "cpu"
    precision: str = "fp32"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        """``"runtime"`` (runs models here) or ``"table"`` (looks latencies up)."""
        return "table" if self.runtime == TABLE else "runtime"

    @property
    def backend(self) -> Runtime:
        """The runtime that runs this target's models.

        Raises:
            TargetError: A table target (runs nothing) or an unknown runtime.
        """
        if self.kind == "table":
            raise TargetError(f"target '{self.name}' is a latency table; it cannot run models")
        return get_runtime(self.runtime)

    @property
    def folds_constants(self) -> bool:
        """The runtime folds input-independent computation (latency-table block counting)."""
        return self.kind == "runtime" and self.backend.folds_constants

    @property
    def needs_gpu(self) -> bool:
        """Its models run on a GPU (benchmarked on a GPU node)."""
        return self.kind == "runtime" and self.device in GPU_DEVICES

    def availability_problem(self) -> str | None:
        """Why this target cannot be used here, or ``None`` if it can."""
        return self.backend.availability_problem(self.device)

    def is_available(self) -> bool:
        """True if this target can be used on this machine."""
        return self.availability_problem() is None

    def check_available(self) -> None:
        """Raise :class:`TargetError` with a one-line reason if the target is unusable here."""
        problem = self.availability_problem()
        if problem:
            raise TargetError(f"target '{self.name}' is not available here: {problem}")

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description of the target."""
        return {
            "name": self.name,
            "runtime": self.runtime,
            "device": self.device,
            "precision": self.precision,
            "kind": self.kind,
            "available": self.is_available(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------------------
# table targets


@functools.cache
def _read_table(path: Path, mtime_ns: int) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Read a CSV keyed by ``arch_str``; cached per file version."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        if "arch_str" not in columns:
            raise TargetError(f"latency table {path} has no 'arch_str' column")
        rows = {row["arch_str"]: row for row in reader}
    return columns, rows


@dataclasses.dataclass(frozen=True, repr=False)
class TableTarget(Target):
    """Latencies of a device we cannot run on, from one column of an NB201-style CSV.

    The values describe the network the table was measured with (for NB201 tables the standard
    NB201 CIFAR network, C=16, N=5); the network config of the search does not change them.
    """

    @classmethod
    def for_column(cls, column: str, table: Path | str | None = None) -> TableTarget:
        """The target of ``column`` in ``table`` (default :func:`default_table_csv`)."""
        path = Path(table) if table else default_table_csv()
        device = column.removesuffix("_ms").removesuffix("_latency")
        return cls(f"table:{column}", TABLE, device, "fp32", {"table": path, "column": column})

    @property
    def table(self) -> Path:
        """The CSV."""
        return Path(self.options["table"])

    @property
    def column(self) -> str:
        """The latency column."""
        return str(self.options["column"])

    def _rows(self) -> dict[str, dict[str, str]]:
        if not self.table.is_file():
            raise TargetError(
                f"target '{self.name}': latency table {self.table} not found "
                "(pass table=PATH or set NASFORGE_LATENCY_CSV)"
            )
        columns, rows = _read_table(self.table, self.table.stat().st_mtime_ns)
        if self.column not in columns:
            known = ", ".join(c for c in columns if c.endswith("_ms")) or ", ".join(columns)
            raise TargetError(
                f"target '{self.name}': no column '{self.column}' in {self.table} (has: {known})"
            )
        return rows

    def availability_problem(self) -> str | None:
        try:
            self._rows()
        except TargetError as e:
            return str(e).split(": ", 1)[-1]
        return None

    def lookup(self, arch_str: str) -> float:
        """Latency in ms of an NB201 ``arch_str``.

        Raises:
            TargetError: Table missing, column missing, architecture not in the table, or the
                cell is empty.
        """
        row = self._rows().get(arch_str)
        if row is None:
            raise TargetError(
                f"target '{self.name}': architecture {arch_str!r} not in {self.table}"
            )
        value = row.get(self.column, "")
        try:
            return float(value)
        except ValueError:
            raise TargetError(
                f"target '{self.name}': no latency for {arch_str!r} in {self.table}"
            ) from None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["table"] = str(self.table)
        d["column"] = self.column
        return d


# --------------------------------------------------------------------------------------------
# registry


def register_target(target: Target) -> Target:
    """Make a target available under its name (its runtime must be registered).

    Raises:
        TargetError: Unknown runtime.
        ValueError: The target has no name.
    """
    if not target.name:
        raise ValueError(f"{target!r} has no name")
    get_runtime(target.runtime)  # one-line error for an unknown runtime
    _REGISTRY[target.name] = target
    return target


def _registered() -> dict[str, Target]:
    """Targets declared by the runtimes, then those registered with :func:`register_target`."""
    out = {
        name: Target(name, rt.name, device, precision)
        for rt in list_runtimes()
        for name, device, precision in rt.targets
    }
    out.update(_REGISTRY)
    return out


def runtime_target(runtime: str, device: str = "cpu", precision: str = "fp32") -> Target:
    """The registered target of a runtime on a device at a precision (the first one).

    Raises:
        TargetError: The runtime has no such target.
    """
    for t in _registered().values():
        if (t.runtime, t.device, t.precision) == (runtime, device, precision):
            return t
    raise TargetError(f"runtime '{runtime}' has no {precision} target on '{device}'")


def list_targets(table: Path | str | None = None) -> list[str]:
    """Names of all known targets: runtime targets, then ``table:<column>`` for every
    ``*_ms`` column of the latency CSV (if it exists)."""
    names = list(_registered())
    path = Path(table) if table else default_table_csv()
    if path.is_file():
        try:
            columns, _ = _read_table(path, path.stat().st_mtime_ns)
            names += [f"table:{c}" for c in columns if c.endswith("_latency_ms")]
        except TargetError:
            pass
    return names


def get_target(name: str | Target, table: Path | str | None = None) -> Target:
    """Return the target called ``name``.

    Args:
        name: A registered name (``"onnxruntime-cpu"``, ``"openvino-cpu"``, ...) or
            ``"table:<column>"``.
        table: CSV for ``table:`` targets (default: ``NASFORGE_LATENCY_CSV`` or the shared
            ``nb201/nb201_dev.csv``).

    Raises:
        TargetError: Unknown name (the message lists the known ones). Availability is checked
            separately with :meth:`Target.check_available`.
    """
    if isinstance(name, Target):
        return name
    if name.startswith("table:"):
        column = name.removeprefix("table:").strip()
        if not column:
            raise TargetError(
                "table target needs a column: table:<column>, e.g. table:raspi4_latency_ms"
            )
        return TableTarget.for_column(column, table)
    target = _registered().get(name)
    if target is None:
        known = ", ".join(list_targets(table)) + ", table:<column>"
        raise TargetError(f"unknown target '{name}'; known targets: {known}")
    return target
