"""Latency of a subnet on a target: one :class:`LatencyModel` protocol, three implementations,
one dispatcher.

Search asks "how fast is this architecture on each target?" many times. Three ways to answer,
each a :class:`LatencyModel` (``predict_ms(spec_or_model, batch_size) -> ms``, ``describe()``):

* :class:`TableColumnLatency` (``table:<column>`` targets): the architecture's value in a
  column of an NB201-style CSV measured elsewhere;
* :class:`ProfiledLatency` (runtime targets): a profiled, calibrated
  :class:`~nasforge.hardware.latency_table.LatencyTable` of the target and network
  configuration, built once (``nasforge profile``) and cached on disk per machine; a
  prediction is a few dictionary lookups;
* :class:`MeasuredLatency` (runtime targets): export the subnet for timing by the target's
  runtime and time it with the harness; exact, ~0.2-1 s per call for small networks (ONNX),
  longer for runtimes that compile a program (ExecuTorch).

:func:`latency_model` picks the one for a target and a mode; :func:`predict_latency_ms` is the
one-call form.

Precision. The pipeline ships INT8 models, and on small networks INT8 can be slower than FP32,
so ``precision="int8"`` predicts the INT8 model's latency: measured on a quickly calibrated
INT8 copy quantized as the runtime deploys it (ONNX: the deployed QDQ layout,
:func:`nasforge.bench.timing_export.quantize_for_timing`; ExecuTorch: its XNNPACK quantizer),
or from an INT8 table whose blocks and calibration networks were quantized the same way (cached
apart from FP32 tables). INT8 targets (``onnxruntime-cpu-int8``) are always INT8. ``table:``
targets are whatever their CSV measured.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from nasforge.bench.harness import LatencyResult, measure
from nasforge.bench.sysinfo import physical_cores
from nasforge.bench.timing_export import PRECISIONS, Exporter, Precision, torch_single_thread
from nasforge.errors import TargetError
from nasforge.hardware.latency_table import LatencyTable, resolve_precision
from nasforge.hardware.spaces import BlockSpace
from nasforge.hardware.table_cache import get_latency_table
from nasforge.hardware.targets import TableTarget, Target, get_target

Mode = Literal["table", "measure"]


@runtime_checkable
class LatencyModel(Protocol):
    """Latency of architectures (or modules) on one target."""

    target: Target

    def predict_ms(self, spec_or_model: Any, batch_size: int = 1) -> float:
        """Latency in ms of one batch of ``batch_size`` samples."""
        ...

    def describe(self) -> dict[str, Any]:
        """How the latency is obtained, and at which precision (for search outputs)."""
        ...


def measure_module(
    module: torch.nn.Module,
    target: Target | str,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    exporter: Exporter = "torchscript",
    precision: Precision | None = None,
    calibration: Any = None,
) -> LatencyResult:
    """Export a torch module for timing by the target's runtime and time it there.

    Args:
        module: The network (put in eval mode; weights do not matter for latency).
        target: Runtime target or its name.
        input_shape: Input shape without batch, e.g. ``(1, 8, 8)``.
        batch_size: Samples per inference.
        threads: Runtime threads (default physical cores).
        warmup: Untimed runs.
        repeats: Timed runs.
        exporter: ONNX runtimes: ``"torchscript"`` (fast) or ``"dynamo"`` (as deployed).
        precision: ``"int8"``: time a quickly calibrated INT8 copy, quantized as the runtime
            deploys INT8 (calibrated on ``calibration`` or a few random batches; see
            :meth:`nasforge.runtimes.base.Runtime.export_for_timing`). Default the target's.
        calibration: INT8 calibration inputs ``(N, *input_shape)`` (array or tensor).

    Returns:
        The harness's :class:`LatencyResult` (``precision`` says what was timed).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    prec = resolve_precision(tgt, precision)
    if calibration is not None:
        calibration = torch.as_tensor(calibration).detach().cpu().float().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        with torch_single_thread():
            path = tgt.backend.export_for_timing(
                module, input_shape, Path(tmp) / "model", prec, calibration, exporter
            )
        return measure(path, tgt, batch_size, input_shape, warmup, repeats, threads)


class TableColumnLatency:
    """A ``table:<column>`` target: the architecture's value in its CSV column.

    The CSV holds one latency per architecture (as measured for that device, at its own batch
    size and precision); specs are looked up by ``arch_str``.
    """

    def __init__(self, target: TableTarget) -> None:
        self.target = target

    def predict_ms(self, spec_or_model: Any, batch_size: int = 1) -> float:
        """Look the architecture up; ``spec_or_model`` has ``.arch_str`` or is the string."""
        arch = (
            spec_or_model
            if isinstance(spec_or_model, str)
            else getattr(spec_or_model, "arch_str", None)
        )
        if arch is None:
            raise TargetError(
                f"target '{self.target.name}' looks latencies up by NB201 arch_str; got "
                f"{type(spec_or_model).__name__}"
            )
        return self.target.lookup(arch)

    def describe(self) -> dict[str, Any]:
        return {
            "source": "table-csv",
            "table": str(self.target.table),
            "precision": "as measured for the CSV (the predictor's precision does not apply)",
        }


class ProfiledLatency:
    """A runtime target predicted from its profiled, calibrated latency table."""

    def __init__(self, target: Target, space: BlockSpace, table: LatencyTable, threads: int):
        self.target = target
        self.space = space
        self.table = table
        self.threads = threads

    def predict_ms(self, spec_or_model: Any, batch_size: int = 1) -> float:
        counts = self.space.block_counts(
            spec_or_model, self.table.folds_constants, self.table.precision
        )
        return self.table.predict_counts(counts, batch_size)

    def describe(self) -> dict[str, Any]:
        tab = self.table
        out: dict[str, Any] = {
            "source": "profiled-table",
            "precision": tab.precision,
            "threads": self.threads,
            # The in-context block latencies stay in the table file; outputs get how many
            # blocks the calibration corrected.
            "calibration": {
                str(b): {k: v for k, v in vars(c).items() if k != "in_context"}
                | {"in_context_blocks": len(c.in_context)}
                for b, c in tab.calibration.items()
            },
        }
        if not self.target.is_available():
            out["profiled_elsewhere"] = {
                "cpu_model": tab.machine.get("cpu_model"),
                "gpu_model": tab.machine.get("gpu_model"),
                "runtime_version": tab.machine.get("runtime_version"),
                "threads": tab.machine.get("threads"),
                "created_utc": tab.created_utc,
                "note": "the target cannot run here; its table's machine is not checked",
            }
        return out


class MeasuredLatency:
    """A runtime target measured: every architecture exported for timing and timed here."""

    def __init__(
        self,
        target: Target,
        space: BlockSpace | None,
        threads: int,
        precision: str,
        calibration: Any = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.target = target
        self.space = space
        self.threads = threads
        self.precision = precision
        self.calibration = calibration
        self.input_shape = input_shape

    def predict_ms(self, spec_or_model: Any, batch_size: int = 1) -> float:
        if isinstance(spec_or_model, torch.nn.Module):
            module, shape = spec_or_model, self.input_shape
            if shape is None:
                raise TargetError("measuring a module needs input_shape (without batch)")
        else:
            if self.space is None:
                raise TargetError(
                    f"predicting '{self.target.name}' latency of a spec needs its space"
                )
            module, shape = self.space.build(spec_or_model), self.space.input_shape()
        return measure_module(
            module,
            self.target,
            shape,
            batch_size,
            self.threads,
            precision=self.precision,  # type: ignore[arg-type]
            calibration=self.calibration,
        ).p50_ms

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": "measured",
            "precision": self.precision,
            "threads": self.threads,
        }
        if self.precision == "int8":
            out["quantization"] = (
                f"PTQ copy quantized as {self.target.backend.label} deploys INT8"
                " (ONNX: static QDQ, deployed layout)"
            )
        return out


def latency_model(
    target: Target | str,
    space: BlockSpace | None = None,
    *,
    mode: Mode = "table",
    batch_sizes: Iterable[int] = (1,),
    threads: int | None = None,
    table: LatencyTable | None = None,
    table_dir: Path | str | None = None,
    table_csv: Path | str | None = None,
    precision: Precision | None = None,
    calibration: Any = None,
    input_shape: tuple[int, ...] | None = None,
    progress: Callable[[str], None] | None = None,
    **build_kwargs: Any,
) -> LatencyModel:
    """The latency model of one target: the one dispatcher.

    Args:
        target: Target or name (runtime or ``table:``).
        space: Block space of the architectures (network configuration included); needed for
            specs on runtime targets.
        mode: ``"table"``: a profiled table (built and cached on first use where the target
            runs; loaded from the table directory where it does not); ``"measure"``: export and
            time every architecture (the target must run here).
        batch_sizes: Batch sizes the table must hold (table mode).
        threads: Runtime threads (default physical cores).
        table: A loaded table to use instead of the cache.
        table_dir: Table cache directory (default
            :func:`nasforge.hardware.table_cache.default_table_dir`).
        table_csv: CSV of ``table:`` targets given by name.
        precision: ``"fp32"`` or ``"int8"`` (default the target's; ``table:`` targets ignore
            it).
        calibration: Measure mode, INT8: calibration inputs of the timing copies.
        input_shape: Measure mode: input shape (without batch) of modules.
        progress: One-line progress callback for table builds.
        **build_kwargs: Passed to :func:`nasforge.hardware.profiling.build_latency_table`.

    Raises:
        TargetError: Unknown mode or precision; a ``table:`` target whose CSV or column is
            missing; measure mode on a target that cannot run here; table mode on a target that
            cannot run here without a table of it.
    """
    if mode not in ("table", "measure"):
        raise TargetError(f"latency mode must be 'table' or 'measure', got {mode!r}")
    if precision is not None and precision not in PRECISIONS:
        raise TargetError(
            f"latency precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    tgt = get_target(target, table=table_csv) if isinstance(target, str) else target
    if isinstance(tgt, TableTarget):
        tgt.check_available()
        return TableColumnLatency(tgt)
    threads = int(threads or physical_cores())
    prec = resolve_precision(tgt, precision)
    if mode == "measure":
        problem = tgt.availability_problem()
        if problem:
            raise TargetError(
                f"target '{tgt.name}' cannot be measured here ({problem}): use mode='table' "
                f"with a table profiled on a GPU node (`nasforge profile --target {tgt.name} "
                "...`, copied into table_dir) or a table:<column> target"
            )
        return MeasuredLatency(tgt, space, threads, prec, calibration, input_shape)
    if space is None:
        raise TargetError(f"predicting '{tgt.name}' latency from a table needs its space")
    if table is None:
        table = get_latency_table(
            tgt,
            space,
            batch_sizes,
            threads,
            table_dir,
            progress=progress,
            precision=prec,  # type: ignore[arg-type]
            **build_kwargs,
        )
    return ProfiledLatency(tgt, space, table, threads)


def predict_latency_ms(
    target: Target | str,
    spec_or_model: Any,
    *,
    space: BlockSpace | None = None,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 1,
    table: LatencyTable | None = None,
    threads: int | None = None,
    table_dir: Path | str | None = None,
    mode: Mode = "table",
    precision: Precision | None = None,
) -> float:
    """Latency in ms of one subnet on one target (see :func:`latency_model`).

    Args:
        target: Target or name.
        spec_or_model: A space spec (``CellSpec``, ``MacroSpec``) or a torch module (always
            measured).
        space: The block space the spec belongs to (needed for specs on runtime targets).
        input_shape: Input shape without batch (modules only; specs take it from ``space``).
        batch_size: Samples per inference.
        table: A loaded table to use instead of the cache.
        threads: Runtime threads (default physical cores).
        table_dir: Table cache directory.
        mode: ``"table"`` (profiled prediction; builds the table on first use) or
            ``"measure"`` (export and time).
        precision: ``"fp32"`` or ``"int8"`` (default the target's; ``table:`` targets ignore
            it).

    Returns:
        Latency in milliseconds (for tables: the calibrated prediction; for measurement: p50).
    """
    if isinstance(spec_or_model, torch.nn.Module) and not isinstance(
        get_target(target) if isinstance(target, str) else target, TableTarget
    ):
        mode = "measure"
    model = latency_model(
        target,
        space,
        mode=mode,
        batch_sizes=(batch_size,),
        threads=threads,
        table=table,
        table_dir=table_dir,
        precision=precision,
        input_shape=input_shape,
    )
    return model.predict_ms(spec_or_model, batch_size)
