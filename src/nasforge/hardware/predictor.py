"""Latency of a subnet on a target, for search: profiled table, direct measurement, or lookup.

Search asks "how fast is this architecture on each target?" many times. Three ways to answer:

* ``table`` (runtime targets): a profiled :class:`LatencyTable` for the target and network
  configuration, built once by :func:`profile` (``nasforge profile``) and cached on disk keyed by
  machine; a prediction is a few dictionary lookups.
* ``measure`` (runtime targets): export the subnet (fast TorchScript exporter) and time it with
  the harness; exact, ~0.2-1 s per call for small networks.
* table targets (``table:<column>``) look the ``arch_str`` up in their CSV in either mode.

:class:`LatencyPredictor` wraps all three behind ``predict(spec) -> {target: ms}``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from nasforge.bench.harness import LatencyResult, measure
from nasforge.bench.sysinfo import physical_cores
from nasforge.bench.timing_export import Exporter, export_for_timing
from nasforge.errors import ModelFileError, TargetError
from nasforge.hardware.latency_table import (
    LatencyTable,
    build_latency_table,
    table_key,
    torch_single_thread,
)
from nasforge.hardware.spaces import BlockSpace
from nasforge.hardware.targets import Target, get_target


def default_table_dir() -> Path:
    """Where profiled tables are cached: ``$NASFORGE_LATENCY_TABLES`` or
    ``~/.cache/nasforge/latency_tables``."""
    env = os.environ.get("NASFORGE_LATENCY_TABLES")
    return Path(env) if env else Path.home() / ".cache" / "nasforge" / "latency_tables"


def table_path(target: Target, space: BlockSpace, threads: int, table_dir: Path) -> Path:
    """File name of the cached table for (machine, target, space config, threads)."""
    return table_dir / f"{target.name}__{space.name}__{table_key(target, space, threads)}.json"


def profile(
    target: Target | str,
    space: BlockSpace,
    batch_sizes: Iterable[int] = (1, 32),
    threads: int | None = None,
    out: Path | str | None = None,
    table_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
    **build_kwargs: Any,
) -> tuple[LatencyTable, Path]:
    """Build and save a latency table: the function behind ``nasforge profile``.

    Args:
        target: Runtime target or its name.
        space: Block space (e.g. ``CellBlockSpace(shape, (32, 32))``).
        batch_sizes: Batch sizes to profile.
        threads: Runtime threads (default physical cores).
        out: Output JSON path; default the cache path under ``table_dir``.
        table_dir: Cache directory (default :func:`default_table_dir`).
        progress: One-line progress callback.
        **build_kwargs: Passed to :func:`build_latency_table` (warmup, repeats, rounds, ...).

    Returns:
        The table and the path it was written to (atomically).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    threads = int(threads or physical_cores())
    table = build_latency_table(
        tgt, space, batch_sizes=batch_sizes, threads=threads, progress=progress, **build_kwargs
    )
    path = (
        Path(out)
        if out
        else table_path(tgt, space, threads, Path(table_dir or default_table_dir()))
    )
    table.save(path)
    return table, path


def get_latency_table(
    target: Target | str,
    space: BlockSpace,
    batch_sizes: Iterable[int] = (1,),
    threads: int | None = None,
    table_dir: Path | str | None = None,
    build: bool = True,
    progress: Callable[[str], None] | None = None,
    **build_kwargs: Any,
) -> LatencyTable:
    """The cached table for this machine, target and space; built (and cached) if missing.

    Raises:
        TargetError: No cached table and ``build`` is False.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    threads = int(threads or physical_cores())
    wanted = sorted({int(b) for b in batch_sizes})
    path = table_path(tgt, space, threads, Path(table_dir or default_table_dir()))
    if path.is_file():
        try:
            table = LatencyTable.load(path)
            table.check_machine(threads)
            keys = {blk.key for blk in space.blocks()}
            # A table from an older nasforge may lack blocks the space now counts: rebuild.
            if all(b in table.blocks and keys <= set(table.blocks[b]) for b in wanted):
                return table
            wanted = sorted(set(wanted) | set(table.batch_sizes))
        except (ModelFileError, TargetError):
            pass  # stale or foreign table: rebuild below
    if not build:
        raise TargetError(
            f"no latency table for '{tgt.name}' and this network at {path}; "
            "run `nasforge profile` first"
        )
    table, _ = profile(
        tgt,
        space,
        batch_sizes=wanted,
        threads=threads,
        out=path,
        progress=progress,
        **build_kwargs,
    )
    return table


def measure_module(
    module: torch.nn.Module,
    target: Target | str,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    exporter: Exporter = "torchscript",
) -> LatencyResult:
    """Export a torch module to a temporary ONNX file and time it on a runtime target.

    Args:
        module: The network (put in eval mode; weights do not matter for latency).
        target: Runtime target or its name.
        input_shape: Input shape without batch, e.g. ``(1, 8, 8)``.
        batch_size: Samples per inference.
        threads: Runtime threads (default physical cores).
        warmup: Untimed runs.
        repeats: Timed runs.
        exporter: ``"torchscript"`` (fast) or ``"dynamo"`` (as deployed).

    Returns:
        The harness's :class:`LatencyResult`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        with torch_single_thread():
            path = export_for_timing(module, input_shape, Path(tmp) / "model.onnx", exporter)
        return measure(path, target, batch_size, input_shape, warmup, repeats, threads)


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
    mode: Literal["table", "measure"] = "table",
) -> float:
    """Latency in ms of one subnet on one target.

    Args:
        target: Target or name.
        spec_or_model: A space spec (``CellSpec``, ``MacroSpec``) or, for ``measure``, a torch
            module.
        space: The block space the spec belongs to (needed for specs on runtime targets).
        input_shape: Input shape without batch (modules only; specs take it from ``space``).
        batch_size: Samples per inference.
        table: A loaded table to use instead of the cache.
        threads: Runtime threads (default physical cores).
        table_dir: Table cache directory.
        mode: ``"table"`` (profiled prediction; builds the table on first use) or
            ``"measure"`` (export and time). Modules are always measured.

    Returns:
        Latency in milliseconds (for tables: the calibrated prediction; for measurement: p50).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if tgt.kind == "table":
        return tgt.predict_latency_ms(spec_or_model)
    if isinstance(spec_or_model, torch.nn.Module):
        if input_shape is None:
            raise TargetError("measuring a module needs input_shape (without batch)")
        return measure_module(spec_or_model, tgt, input_shape, batch_size, threads).p50_ms
    if space is None:
        raise TargetError(f"predicting '{tgt.name}' latency of a spec needs its space")
    if mode == "measure":
        return measure_module(
            space.build(spec_or_model), tgt, space.input_shape(), batch_size, threads
        ).p50_ms
    if table is None:
        table = get_latency_table(tgt, space, (batch_size,), threads, table_dir)
    return table.predict_counts(
        space.block_counts(spec_or_model, table.folds_constants), batch_size
    )


class LatencyPredictor:
    """Latency of architectures on several targets: what the search stage calls per trial.

    Args:
        targets: Target names or objects (runtime and ``table:`` targets may be mixed).
        space: Block space of the architectures (network configuration included).
        batch_size: Samples per inference.
        mode: ``"table"``: profiled tables, built once per target and cached in ``table_dir``
            (cost: one table build per target, then microseconds per prediction); ``"measure"``:
            export and time every architecture (exact; ~0.2-1 s per target for small networks).
        threads: Runtime threads (default physical cores).
        table_dir: Table cache directory (default :func:`default_table_dir`).
        table_csv: CSV for ``table:`` targets.
        progress: One-line progress callback for table builds.
        **build_kwargs: Passed to :func:`build_latency_table`.

    Example::

        space = CellBlockSpace(CellNetworkShape(1, 10, channels=16), resolution=(8, 8))
        pred = LatencyPredictor(["onnxruntime-cpu", "openvino-cpu"], space, batch_size=1)
        pred.predict(CellSpec.from_arch_str(arch))  # {"onnxruntime-cpu": 0.05, ...}
    """

    def __init__(
        self,
        targets: Sequence[Target | str],
        space: BlockSpace,
        batch_size: int = 1,
        mode: Literal["table", "measure"] = "table",
        threads: int | None = None,
        table_dir: Path | str | None = None,
        table_csv: Path | str | None = None,
        progress: Callable[[str], None] | None = None,
        **build_kwargs: Any,
    ) -> None:
        if mode not in ("table", "measure"):
            raise TargetError(f"latency mode must be 'table' or 'measure', got {mode!r}")
        self.targets = [
            t if isinstance(t, Target) else get_target(t, table=table_csv) for t in targets
        ]
        for t in self.targets:
            t.check_available()
        self.space = space
        self.batch_size = batch_size
        self.mode = mode
        self.threads = int(threads or physical_cores())
        self.tables: dict[str, LatencyTable] = {}
        if mode == "table":
            for t in self.targets:
                if t.kind == "runtime":
                    self.tables[t.name] = get_latency_table(
                        t,
                        space,
                        (batch_size,),
                        self.threads,
                        table_dir,
                        progress=progress,
                        **build_kwargs,
                    )

    def predict(self, spec: Any) -> dict[str, float]:
        """Latency in ms of ``spec`` on every target, keyed by target name."""
        return {t.name: self.predict_one(t, spec) for t in self.targets}

    def predict_one(self, target: Target, spec: Any) -> float:
        """Latency in ms of ``spec`` on one of this predictor's targets."""
        if target.kind == "table":
            return target.predict_latency_ms(spec)
        if self.mode == "measure":
            module = self.space.build(spec)
            return measure_module(
                module, target, self.space.input_shape(), self.batch_size, self.threads
            ).p50_ms
        table = self.tables[target.name]
        counts = self.space.block_counts(spec, table.folds_constants)
        return table.predict_counts(counts, self.batch_size)

    def describe(self) -> dict[str, Any]:
        """How each target's latency is obtained (for search outputs)."""
        out: dict[str, Any] = {}
        for t in self.targets:
            if t.kind == "table":
                out[t.name] = {"source": "table-csv", "table": str(getattr(t, "table", ""))}
            elif self.mode == "measure":
                out[t.name] = {"source": "measured", "threads": self.threads}
            else:
                tab = self.tables[t.name]
                out[t.name] = {
                    "source": "profiled-table",
                    "threads": self.threads,
                    # The in-context block latencies stay in the table file; outputs get
                    # how many blocks the calibration corrected.
                    "calibration": {
                        str(b): {k: v for k, v in vars(c).items() if k != "in_context"}
                        | {"in_context_blocks": len(c.in_context)}
                        for b, c in tab.calibration.items()
                    },
                }
        return out
