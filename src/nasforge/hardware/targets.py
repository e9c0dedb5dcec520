"""Hardware targets: where a model runs, or a table of latencies measured elsewhere.

A target names a runtime, a device and a precision. Two kinds exist:

* ``runtime`` targets run models here through the measurement harness
  (:func:`nasforge.bench.harness.measure`): ``onnxruntime-cpu``, ``onnxruntime-cpu-int8``,
  ``openvino-cpu`` (FP32 pinned), ``openvino-cpu-int8``, ``onnxruntime-cuda`` and
  ``tensorrt-gpu`` (the last two only where an NVIDIA GPU and ``onnxruntime-gpu`` are present;
  elsewhere :meth:`Target.check_available` raises a one-line :class:`TargetError`).
* ``table`` targets, named ``table:<column>``, read latencies per architecture from an
  NB201-style CSV (one row per cell, keyed by ``arch_str``), so search can optimise for a
  Raspberry Pi or an FPGA that nasforge cannot run on. The CSV is given with
  ``get_target("table:raspi4_latency_ms", table=path)``, else the environment variable
  ``NASFORGE_LATENCY_CSV``, else ``<shared data>/nb201/nb201_dev.csv`` (shared data is
  ``NASFORGE_SHARED_DATA``, default ``<repo>/../shared/data``).

Search uses one interface for both kinds: ``target.predict_latency_ms(spec_or_model)``.

Adding a target:

* A device known only from measurements: add a column ``<device>_latency_ms`` (one row per
  ``arch_str``) to a CSV and use ``table:<device>_latency_ms`` with that CSV. No code.
* A new runtime or device: one class deriving from :class:`RuntimeTarget` (or :class:`Target`),
  registered with :func:`register_target`::

      @register_target
      class MyNpuTarget(RuntimeTarget):
          name = "my-npu"
          runtime = "onnxruntime"
          device = "cpu"
          precision = "int8"
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from nasforge.errors import TargetError

_REGISTRY: dict[str, Callable[..., Target]] = {}


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


class Target:
    """Base class of all targets.

    Attributes:
        name: Registry name, e.g. ``"openvino-cpu"`` or ``"table:raspi4_latency_ms"``.
        runtime: ``"onnxruntime"``, ``"openvino"`` or ``"table"``.
        device: ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or, for tables, the CSV column's device.
        precision: ``"fp32"`` or ``"int8"``.
        kind: ``"runtime"`` (runs models here) or ``"table"`` (looks latencies up).
    """

    name: ClassVar[str] = ""
    runtime: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    precision: ClassVar[str] = "fp32"
    kind: ClassVar[str] = "runtime"
    # The runtime compiles static shapes and folds input-independent computation (OpenVINO).
    folds_constants: ClassVar[bool] = False

    def availability_problem(self) -> str | None:
        """Why this target cannot be used here, or ``None`` if it can."""
        return None

    def is_available(self) -> bool:
        """True if this target can be used on this machine."""
        return self.availability_problem() is None

    def check_available(self) -> None:
        """Raise :class:`TargetError` with a one-line reason if the target is unusable here."""
        problem = self.availability_problem()
        if problem:
            raise TargetError(f"target '{self.name}' is not available here: {problem}")

    def measure(self, model_path: Path | str, batch_size: int = 1, **kwargs: Any) -> Any:
        """Time a model file on this target (runtime targets only); see harness ``measure``."""
        raise TargetError(f"target '{self.name}' is a latency table; it cannot run models")

    def lookup(self, arch_str: str) -> float:
        """Latency in ms of an architecture from the target's table (table targets only)."""
        raise TargetError(f"target '{self.name}' has no latency table; use measure or a predictor")

    def predict_latency_ms(self, spec_or_model: Any, **kwargs: Any) -> float:
        """Latency in ms of a subnet on this target, for search; see subclasses."""
        raise NotImplementedError

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
# runtime targets


def _has_nvidia_gpu() -> bool:
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir():
        return True
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidiactl").exists()


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


class RuntimeTarget(Target):
    """A target that runs models here through :mod:`nasforge.bench.harness`."""

    kind: ClassVar[str] = "runtime"

    def measure(self, model_path: Path | str, batch_size: int = 1, **kwargs: Any) -> Any:
        """Time a model file; arguments as :func:`nasforge.bench.harness.measure`."""
        from nasforge.bench.harness import measure

        return measure(model_path, self, batch_size, **kwargs)

    def predict_latency_ms(self, spec_or_model: Any, **kwargs: Any) -> float:
        """Predicted latency (ms) of a subnet from this target's profiled latency table.

        Args:
            spec_or_model: A ``CellSpec`` (needs ``net=`` the network config) or a torch module.
            **kwargs: Passed to :func:`nasforge.hardware.predictor.predict_latency_ms`
                (``batch_size``, ``net``, ``table``, ``threads`` ...).
        """
        from nasforge.hardware.predictor import predict_latency_ms

        return predict_latency_ms(self, spec_or_model, **kwargs)


class _OrtCpu(RuntimeTarget):
    name = "onnxruntime-cpu"
    runtime = "onnxruntime"
    device = "cpu"

    def availability_problem(self) -> str | None:
        return None if "CPUExecutionProvider" in _ort_providers() else "onnxruntime not installed"


class _OrtCpuInt8(_OrtCpu):
    name = "onnxruntime-cpu-int8"
    precision = "int8"


class _OpenVinoCpu(RuntimeTarget):
    name = "openvino-cpu"
    runtime = "openvino"
    device = "cpu"
    folds_constants = True

    def availability_problem(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino not installed (pip install 'nasforge[openvino]')"
        return None


class _OpenVinoCpuInt8(_OpenVinoCpu):
    name = "openvino-cpu-int8"
    precision = "int8"


class _OrtCuda(RuntimeTarget):
    name = "onnxruntime-cuda"
    runtime = "onnxruntime"
    device = "cuda"

    def availability_problem(self) -> str | None:
        if not _has_nvidia_gpu():
            return "no NVIDIA GPU found"
        if "CUDAExecutionProvider" not in _ort_providers():
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        return None


class _TensorRtGpu(RuntimeTarget):
    name = "tensorrt-gpu"
    runtime = "onnxruntime"  # ONNX Runtime's TensorRT execution provider builds the engine
    device = "tensorrt"

    def availability_problem(self) -> str | None:
        if not _has_nvidia_gpu() or "TensorrtExecutionProvider" not in _ort_providers():
            return "no NVIDIA GPU / TensorRT found"
        return None


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


class TableTarget(Target):
    """Latencies of a device we cannot run on, from one column of an NB201-style CSV.

    The values describe the network the table was measured with (for NB201 tables the standard
    NB201 CIFAR network, C=16, N=5); the network config of the search does not change them.
    """

    runtime: ClassVar[str] = "table"
    kind: ClassVar[str] = "table"

    def __init__(self, column: str, table: Path | str | None = None) -> None:
        self.column = column
        self.table = Path(table) if table else default_table_csv()
        self._name = f"table:{column}"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    @property
    def device(self) -> str:  # type: ignore[override]
        return self.column.removesuffix("_ms").removesuffix("_latency")

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

    def predict_latency_ms(self, spec_or_model: Any, **kwargs: Any) -> float:
        """Look the architecture up; ``spec_or_model`` has ``.arch_str`` or is the string."""
        arch = (
            spec_or_model
            if isinstance(spec_or_model, str)
            else getattr(spec_or_model, "arch_str", None)
        )
        if arch is None:
            raise TargetError(
                f"target '{self.name}' looks latencies up by NB201 arch_str; got {type(spec_or_model).__name__}"
            )
        return self.lookup(arch)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["table"] = str(self.table)
        d["column"] = self.column
        return d


# --------------------------------------------------------------------------------------------
# registry


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: make a target class available under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (_OrtCpu, _OrtCpuInt8, _OpenVinoCpu, _OpenVinoCpuInt8, _OrtCuda, _TensorRtGpu):
    register_target(_cls)


def list_targets(table: Path | str | None = None) -> list[str]:
    """Names of all known targets: registered runtime targets, then ``table:<column>`` for every
    ``*_ms`` column of the latency CSV (if it exists)."""
    names = list(_REGISTRY)
    path = Path(table) if table else default_table_csv()
    if path.is_file():
        try:
            columns, _ = _read_table(path, path.stat().st_mtime_ns)
            names += [f"table:{c}" for c in columns if c.endswith("_latency_ms")]
        except TargetError:
            pass
    return names


def get_target(name: str, table: Path | str | None = None) -> Target:
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
        return TableTarget(column, table)
    factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(list_targets(table)) + ", table:<column>"
        raise TargetError(f"unknown target '{name}'; known targets: {known}")
    return factory()
