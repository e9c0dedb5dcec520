"""Latency of a subnet on a target, for search: profiled table, direct measurement, or lookup.

Search asks "how fast is this architecture on each target?" many times. Three ways to answer:

* ``table`` (runtime targets): a profiled :class:`LatencyTable` for the target and network
  configuration, built once by :func:`profile` (``nasforge profile``) and cached on disk keyed by
  machine; a prediction is a few dictionary lookups.
* ``measure`` (runtime targets): export the subnet (fast TorchScript exporter) and time it with
  the harness; exact, ~0.2-1 s per call for small networks.
* table targets (``table:<column>``) look the ``arch_str`` up in their CSV in either mode.

:class:`LatencyPredictor` wraps all three behind ``predict(spec) -> {target: ms}``.

Precision. The pipeline ships INT8 models, and on small networks INT8 can be slower than FP32,
so ``precision="int8"`` predicts the INT8 model's latency: measured on a quickly calibrated PTQ
copy in the deployed QDQ layout (:func:`nasforge.bench.timing_export.quantize_for_timing`), or
from an INT8 table whose blocks and calibration networks were quantized the same way (cached
apart from FP32 tables: the precision is in the file name and the key). INT8 targets
(``onnxruntime-cpu-int8``) are always INT8. ``table:`` targets are whatever their CSV measured.

Targets that cannot run here (``tensorrt-gpu``, ``onnxruntime-cuda`` on a CPU machine) are
predicted from a table profiled on a machine where they run (``nasforge profile --target
tensorrt-gpu`` on a GPU node, the file copied into ``table_dir``); without one a
:class:`TargetError` says so. Loading a table needs no runtime; building one and measuring do.
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
from nasforge.bench.timing_export import PRECISIONS, Exporter, Precision, export_for_timing
from nasforge.errors import ModelFileError, TargetError
from nasforge.hardware.latency_table import (
    LatencyTable,
    build_latency_table,
    resolve_precision,
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


def table_path(
    target: Target,
    space: BlockSpace,
    threads: int,
    table_dir: Path,
    precision: str | None = None,
) -> Path:
    """File name of the cached table for (machine, target, precision, space config, threads):
    ``<target>__<space>__<precision>__<key>.json``, so FP32 and INT8 tables never mix."""
    prec = resolve_precision(target, precision)
    key = table_key(target, space, threads, prec)
    return table_dir / f"{target.name}__{space.name}__{prec}__{key}.json"


def _foreign_table(
    target: Target,
    space: BlockSpace,
    batch_sizes: Sequence[int],
    threads: int,
    table_dir: Path,
    precision: str,
) -> LatencyTable | None:
    """A table of ``target`` for this space and precision built on another machine (a GPU
    node), found by its file name and contents; the machine cannot be checked here. Prefers
    the same thread count, then the newest."""
    found: list[tuple[bool, str, LatencyTable]] = []
    keys = {blk.key for blk in space.blocks()}
    for path in sorted(table_dir.glob(f"{target.name}__{space.name}__{precision}__*.json")):
        try:
            table = LatencyTable.load(path)
        except ModelFileError:
            continue
        if (table.target, table.space, table.precision) != (target.name, space.name, precision):
            continue
        if table.config != space.config():
            continue
        if not all(b in table.blocks and keys <= set(table.blocks[b]) for b in batch_sizes):
            continue
        same_threads = table.machine.get("threads") == threads
        found.append((same_threads, table.created_utc, table))
    if not found:
        return None
    return max(found, key=lambda f: (f[0], f[1]))[2]


def _cannot_run_message(
    target: Target, space: BlockSpace, precision: str, table_dir: Path, problem: str
) -> str:
    return (
        f"target '{target.name}' cannot run here ({problem}) and {table_dir} has no "
        f"{precision} latency table of it for this {space.name} network: profile it on a GPU "
        f"node (`nasforge profile --target {target.name} --space {space.name} "
        f"--precision {precision} ...`) and copy the table into the table directory, "
        "or use a table:<column> target"
    )


def profile(
    target: Target | str,
    space: BlockSpace,
    batch_sizes: Iterable[int] = (1, 32),
    threads: int | None = None,
    out: Path | str | None = None,
    table_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
    precision: Precision | None = None,
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
        precision: ``"fp32"`` or ``"int8"`` (blocks and networks quantized before timing);
            default the target's (see :func:`resolve_precision`).
        **build_kwargs: Passed to :func:`build_latency_table` (warmup, repeats, rounds, ...).

    Returns:
        The table and the path it was written to (atomically).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    prec = resolve_precision(tgt, precision)
    threads = int(threads or physical_cores())
    table = build_latency_table(
        tgt,
        space,
        batch_sizes=batch_sizes,
        threads=threads,
        progress=progress,
        precision=prec,
        **build_kwargs,
    )
    path = (
        Path(out)
        if out
        else table_path(tgt, space, threads, Path(table_dir or default_table_dir()), prec)
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
    precision: Precision | None = None,
    **build_kwargs: Any,
) -> LatencyTable:
    """The cached table for this machine, target, precision and space; built (and cached) if
    missing.

    A target that cannot run here (a GPU target on a CPU machine) is never built: its table
    must have been profiled where it runs and put in ``table_dir`` (any file
    ``<target>__<space>__<precision>__*.json`` for this network configuration).

    Raises:
        TargetError: No cached table and ``build`` is False, or the target cannot run here
            and there is no table of it.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    prec = resolve_precision(tgt, precision)
    threads = int(threads or physical_cores())
    wanted = sorted({int(b) for b in batch_sizes})
    tdir = Path(table_dir or default_table_dir())
    problem = tgt.availability_problem()
    if problem is not None:
        foreign = _foreign_table(tgt, space, wanted, threads, tdir, prec)
        if foreign is None:
            raise TargetError(_cannot_run_message(tgt, space, prec, tdir, problem))
        return foreign
    path = table_path(tgt, space, threads, tdir, prec)
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
            f"no {prec} latency table for '{tgt.name}' and this network at {path}; "
            "run `nasforge profile` first"
        )
    table, _ = profile(
        tgt,
        space,
        batch_sizes=wanted,
        threads=threads,
        out=path,
        progress=progress,
        precision=prec,
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
    precision: Precision | None = None,
    calibration: Any = None,
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
        precision: ``"int8"``: time a PTQ QDQ copy (static quantization calibrated on
            ``calibration`` or a few random batches; see
            :func:`nasforge.bench.timing_export.quantize_for_timing`). Default the target's.
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
            path = export_for_timing(
                module, input_shape, Path(tmp) / "model.onnx", exporter, prec, calibration
            )
        return measure(path, tgt, batch_size, input_shape, warmup, repeats, threads)


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
    precision: Precision | None = None,
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
        precision: ``"fp32"`` or ``"int8"`` (default the target's; ``table:`` targets ignore
            it).

    Returns:
        Latency in milliseconds (for tables: the calibrated prediction; for measurement: p50).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if tgt.kind == "table":
        return tgt.predict_latency_ms(spec_or_model)
    if isinstance(spec_or_model, torch.nn.Module):
        if input_shape is None:
            raise TargetError("measuring a module needs input_shape (without batch)")
        return measure_module(
            spec_or_model, tgt, input_shape, batch_size, threads, precision=precision
        ).p50_ms
    if space is None:
        raise TargetError(f"predicting '{tgt.name}' latency of a spec needs its space")
    if mode == "measure":
        return measure_module(
            space.build(spec_or_model),
            tgt,
            space.input_shape(),
            batch_size,
            threads,
            precision=precision,
        ).p50_ms
    if table is None:
        table = get_latency_table(
            tgt, space, (batch_size,), threads, table_dir, precision=precision
        )
    return table.predict_counts(
        space.block_counts(spec_or_model, table.folds_constants, table.precision), batch_size
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
        precision: ``"fp32"`` (default) or ``"int8"``: the latency of the INT8 model the
            pipeline ships (measure: a PTQ QDQ copy of each subnet, ~1-2 s more per call;
            table: an INT8 table). INT8 targets (``onnxruntime-cpu-int8``) are INT8 either way;
            ``table:`` targets are what their CSV holds.
        calibration: INT8 measure mode: calibration inputs for the PTQ copies (default a few
            random batches; latency does not depend on them).
        **build_kwargs: Passed to :func:`build_latency_table`.

    Runtime targets that cannot run here (``tensorrt-gpu`` on a CPU machine) work in table mode
    when ``table_dir`` holds a table of them profiled where they run; otherwise, and in
    measure mode, the constructor raises a one-line :class:`TargetError`.

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
        precision: Precision = "fp32",
        calibration: Any = None,
        **build_kwargs: Any,
    ) -> None:
        if mode not in ("table", "measure"):
            raise TargetError(f"latency mode must be 'table' or 'measure', got {mode!r}")
        if precision not in PRECISIONS:
            raise TargetError(
                f"latency precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        self.targets = [
            t if isinstance(t, Target) else get_target(t, table=table_csv) for t in targets
        ]
        self.precision = precision
        self.precisions = {
            t.name: resolve_precision(t, precision) for t in self.targets if t.kind == "runtime"
        }
        for t in self.targets:
            # Tables need their CSV; measuring needs the runtime. Runtime tables are loaded
            # without it (a GPU target profiled elsewhere) and built only where it runs.
            problem = t.availability_problem()
            if problem and t.kind == "runtime" and mode == "measure":
                raise TargetError(
                    f"target '{t.name}' cannot be measured here ({problem}): use mode='table' "
                    f"with a table profiled on a GPU node (`nasforge profile --target {t.name} "
                    "...`, copied into table_dir) or a table:<column> target"
                )
            if t.kind != "runtime":
                t.check_available()
        self.space = space
        self.batch_size = batch_size
        self.mode = mode
        self.threads = int(threads or physical_cores())
        self.calibration = calibration
        self.table_dir = Path(table_dir or default_table_dir())
        self.tables: dict[str, LatencyTable] = {}
        if mode == "table":
            for t in self.targets:
                if t.kind == "runtime":
                    self.tables[t.name] = get_latency_table(
                        t,
                        space,
                        (batch_size,),
                        self.threads,
                        self.table_dir,
                        progress=progress,
                        precision=self.precisions[t.name],
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
                module,
                target,
                self.space.input_shape(),
                self.batch_size,
                self.threads,
                precision=self.precisions[target.name],
                calibration=self.calibration,
            ).p50_ms
        table = self.tables[target.name]
        counts = self.space.block_counts(spec, table.folds_constants, table.precision)
        return table.predict_counts(counts, self.batch_size)

    def describe(self) -> dict[str, Any]:
        """How each target's latency is obtained, and at which precision (for search outputs)."""
        out: dict[str, Any] = {}
        for t in self.targets:
            if t.kind == "table":
                out[t.name] = {
                    "source": "table-csv",
                    "table": str(getattr(t, "table", "")),
                    "precision": "as measured for the CSV (the predictor's precision does not "
                    "apply)",
                }
            elif self.mode == "measure":
                prec = self.precisions[t.name]
                out[t.name] = {"source": "measured", "precision": prec, "threads": self.threads}
                if prec == "int8":
                    out[t.name]["quantization"] = (
                        "PTQ copy, ONNX Runtime static QDQ, deployed layout"
                    )
            else:
                tab = self.tables[t.name]
                out[t.name] = {
                    "source": "profiled-table",
                    "precision": tab.precision,
                    "threads": self.threads,
                    # The in-context block latencies stay in the table file; outputs get
                    # how many blocks the calibration corrected.
                    "calibration": {
                        str(b): {k: v for k, v in vars(c).items() if k != "in_context"}
                        | {"in_context_blocks": len(c.in_context)}
                        for b, c in tab.calibration.items()
                    },
                }
                if not t.is_available():
                    out[t.name]["profiled_elsewhere"] = {
                        "cpu_model": tab.machine.get("cpu_model"),
                        "gpu_model": tab.machine.get("gpu_model"),
                        "runtime_version": tab.machine.get("runtime_version"),
                        "threads": tab.machine.get("threads"),
                        "created_utc": tab.created_utc,
                        "note": "the target cannot run here; its table's machine is not checked",
                    }
        return out
