"""Latency lookup tables: the versioned schema, its JSON form and what keys a table to a machine.

A table (:class:`LatencyTable`) holds the profiled latency of every block of a search space (see
:mod:`nasforge.hardware.spaces`) on one runtime target per batch size, the per-call baseline, and
the calibration that turns block sums into end-to-end latency (:mod:`nasforge.hardware.
calibration`). It is built by :func:`nasforge.hardware.profiling.build_latency_table` and cached
by :mod:`nasforge.hardware.table_cache`.

A table is versioned JSON (``schema``), keyed by CPU model, ISA flags, thread count, runtime and
version, target, precision, space and network configuration (:func:`machine_key`);
:meth:`LatencyTable.check_machine` refuses a table from another machine.
:meth:`LatencyTable.calibrate` refits its calibration from networks measured later (the
benchmark stage, or a predictor benchmark on a busy machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nasforge.atomic import atomic_file
from nasforge.bench.sysinfo import system_info
from nasforge.errors import ModelFileError, TargetError
from nasforge.hardware.calibration import Calibration, fit_calibration
from nasforge.hardware.spaces import BlockSpace
from nasforge.hardware.targets import Target, get_target
from nasforge.runtimes.base import PRECISIONS

#: 2: cell zero nodes are computed by every runtime (no folding); INT8 cell tables count convs
#: with a float output as blocks of their own (``fpconv:``). Tables of an older schema are
#: rebuilt, not reused.
SCHEMA = "nasforge.latency_table/2"


def resolve_precision(target: Target, precision: str | None = None) -> str:
    """The precision a target is timed at: ``int8`` if asked or if the target is an INT8 one
    (``onnxruntime-cpu-int8``), else ``fp32``.

    Raises:
        TargetError: Unknown precision.
    """
    if precision is not None and precision not in PRECISIONS:
        raise TargetError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "int8" if "int8" in (precision, target.precision) else "fp32"


def _gpu_model() -> str:
    """Name of the first NVIDIA GPU (``nvidia-smi``), or ``""``."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return ""
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.strip().splitlines() or [""])[0].strip()


def machine_key(target: Target, threads: int, precision: str | None = None) -> dict[str, Any]:
    """What makes latencies comparable: CPU, ISA, threads, runtime and its version, precision
    (see :func:`resolve_precision`) and, for GPU targets, the GPU model."""
    info = system_info(threads)
    runtime_version = info["versions"].get(target.runtime) or ""
    key = {
        "cpu_model": info["cpu_model"],
        "isa_flags": info["isa_flags"],
        "threads": threads,
        "runtime": target.runtime,
        "runtime_version": runtime_version,
        "target": target.name,
        "precision": resolve_precision(target, precision),
    }
    if target.device != "cpu":
        key["gpu_model"] = _gpu_model()
    return key


def table_key(target: Target, space: BlockSpace, threads: int, precision: str | None = None) -> str:
    """Short stable hash naming a table file for (machine, target, precision, space, config)."""
    machine = machine_key(target, threads, precision)
    blob = json.dumps(
        {"machine": machine, "space": space.name, "config": space.config()}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass
class LatencyTable:
    """Profiled block latencies of one space on one target, plus calibration.

    Attributes:
        target: Target name.
        space: Space name.
        config: Network configuration of the space.
        machine: :func:`machine_key` of the machine that built it.
        blocks: ``{batch_size: {block_key: latency_ms}}`` (baseline subtracted, >= 0).
        baseline_ms: ``{batch_size: per-call overhead in ms}``.
        calibration: ``{batch_size: Calibration}``.
        settings: Warm-up, repeats, rounds, exporter used.
        folds_constants: The runtime folds input-independent computation (block counting).
        system: Full :func:`system_info` at build time.
        build_seconds: Wall time to build.
        created_utc: ISO timestamp.
        precision: ``"fp32"`` or ``"int8"`` (blocks and networks timed as PTQ QDQ models).
    """

    target: str
    space: str
    config: dict[str, Any]
    machine: dict[str, Any]
    blocks: dict[int, dict[str, float]]
    baseline_ms: dict[int, float]
    calibration: dict[int, Calibration]
    settings: dict[str, Any]
    system: dict[str, Any]
    build_seconds: float = 0.0
    created_utc: str = ""
    folds_constants: bool = False
    block_stats: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    schema: str = SCHEMA
    precision: str = "fp32"

    @property
    def batch_sizes(self) -> list[int]:
        """Batch sizes profiled."""
        return sorted(self.blocks)

    def block_sum_ms(self, counts: Mapping[str, int], batch_size: int) -> float:
        """Sum of block latencies for given block counts (no calibration).

        Raises:
            TargetError: Batch size not profiled or a block missing from the table.
        """
        table = self._batch(batch_size)
        missing = [k for k in counts if k not in table]
        if missing:
            raise TargetError(
                f"latency table for '{self.target}' has no block {missing[0]} "
                f"(built for {self.config}); rebuild it for this network"
            )
        return float(sum(n * table[k] for k, n in counts.items()))

    def predict_counts(self, counts: Mapping[str, int], batch_size: int) -> float:
        """Calibrated latency (ms) of a network given its block counts."""
        cal = self.calibration.get(batch_size, Calibration())
        # Never below one near-empty inference: a network folded to a constant still costs a call.
        floor = self.baseline_ms.get(batch_size, 0.0)
        self.block_sum_ms(counts, batch_size)  # a clear error for blocks not in the table
        return max(floor, cal.apply(counts, self.blocks[batch_size], self.block_stats))

    def calibrate(
        self,
        space: BlockSpace,
        specs: list[Any],
        measured_ms: Iterable[float],
        batch_size: int,
    ) -> Calibration:
        """Refit this table's calibration for one batch size from networks measured end to end.

        Use it when real networks of the space have been timed (through the harness, as
        profiling does) after the table was built, e.g. by the benchmark stage: the fit then
        reflects the machine as it is now. Replaces ``calibration[batch_size]``.

        Args:
            space: The table's block space.
            specs: Architectures that were measured.
            measured_ms: Their measured latencies (ms), same order.
            batch_size: Batch size they were measured at.

        Returns:
            The new :class:`Calibration`.
        """
        counts = [space.block_counts(s, self.folds_constants, self.precision) for s in specs]
        for c in counts:
            self.block_sum_ms(c, batch_size)  # a clear error for blocks not in the table
        cal = fit_calibration(
            counts, self._batch(batch_size), measured_ms, space.feature_sets(), self.block_stats
        )
        self.calibration[batch_size] = cal
        return cal

    def _batch(self, batch_size: int) -> dict[str, float]:
        if batch_size not in self.blocks:
            raise TargetError(
                f"latency table for '{self.target}' has batch sizes {self.batch_sizes}, "
                f"not {batch_size}"
            )
        return self.blocks[batch_size]

    def check_machine(self, threads: int | None = None) -> None:
        """Raise :class:`TargetError` if this table was built on other hardware or software."""
        tgt = get_target(self.target)
        here = machine_key(tgt, int(threads or self.machine["threads"]), self.precision)
        diff = [k for k in here if here[k] != self.machine.get(k)]
        if diff:
            k = diff[0]
            raise TargetError(
                f"latency table was built with {k}={self.machine.get(k)!r}, "
                f"this machine has {here[k]!r}; rebuild it with `nasforge profile`"
            )

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (integer batch keys become strings)."""
        return {
            "schema": self.schema,
            "target": self.target,
            "space": self.space,
            "config": self.config,
            "machine": self.machine,
            "blocks": {str(b): v for b, v in self.blocks.items()},
            "baseline_ms": {str(b): v for b, v in self.baseline_ms.items()},
            "calibration": {str(b): dataclasses.asdict(c) for b, c in self.calibration.items()},
            "settings": self.settings,
            "system": self.system,
            "build_seconds": self.build_seconds,
            "created_utc": self.created_utc,
            "folds_constants": self.folds_constants,
            "block_stats": self.block_stats,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyTable:
        """Inverse of :meth:`to_dict`.

        Raises:
            ModelFileError: Wrong schema or missing fields.
        """
        if d.get("schema") != SCHEMA:
            raise ModelFileError(f"not a latency table of schema {SCHEMA}: {d.get('schema')!r}")
        try:
            return cls(
                target=d["target"],
                space=d["space"],
                config=dict(d["config"]),
                machine=dict(d["machine"]),
                blocks={int(b): dict(v) for b, v in d["blocks"].items()},
                baseline_ms={int(b): float(v) for b, v in d["baseline_ms"].items()},
                calibration={int(b): Calibration(**c) for b, c in d["calibration"].items()},
                settings=dict(d["settings"]),
                system=dict(d["system"]),
                build_seconds=float(d.get("build_seconds", 0.0)),
                created_utc=str(d.get("created_utc", "")),
                folds_constants=bool(d.get("folds_constants", False)),
                block_stats={k: dict(v) for k, v in d.get("block_stats", {}).items()},
                precision=str(d.get("precision", d["machine"].get("precision", "fp32"))),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"latency table is malformed: {e!r}") from e

    def save(self, path: Path | str) -> Path:
        """Write the table as JSON atomically (temp file + rename)."""
        path = Path(path)
        with atomic_file(path, suffix=".json") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: Path | str) -> LatencyTable:
        """Read a table written by :meth:`save`.

        Raises:
            ModelFileError: Missing or malformed file.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFileError(f"latency table not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(f"latency table {path} is not valid JSON: {e}") from e
        return cls.from_dict(data)
