"""The on-disk cache of profiled latency tables: where they live, building and finding them.

Tables are cached per machine, target, precision, space configuration and thread count under
:func:`default_table_dir` (:func:`table_path`); :func:`get_latency_table` returns the cached
one or profiles it (:func:`profile`, the function behind ``nasforge profile``). Targets that
cannot run here (``tensorrt-gpu``, ``onnxruntime-cuda`` on a CPU machine) use a table profiled on
a machine where they run (``nasforge profile --target tensorrt-gpu`` on a GPU node, the file
copied into the table directory); without one a :class:`TargetError` says so. Loading a table
needs no runtime; building one does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from nasforge.bench.sysinfo import physical_cores
from nasforge.bench.timing_export import Precision
from nasforge.errors import ModelFileError, TargetError
from nasforge.hardware.latency_table import LatencyTable, resolve_precision, table_key
from nasforge.hardware.profiling import build_latency_table
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
