"""Latency lookup tables built by profiling, and the predictor that reads them.

:func:`build_latency_table` measures every block of a search space (see
:mod:`nasforge.hardware.spaces`) on a runtime target through the shared harness, with warm-up,
repetitions and medians, threads fixed, and *interleaved rounds* (every model is timed once per
round; the smallest round median wins) so a burst of load from other processes does not corrupt
one block. Blocks whose output shape equals their input are timed as chains of 1 and 3 copies
and the difference is used, cancelling per-call overhead and graph-boundary layout conversions;
other blocks (stem, reductions, head) are timed alone minus a near-empty baseline model.

Summing blocks misses what the runtime does across block boundaries (fusions, memory reuse),
so the table is then *calibrated* on random full networks measured end to end:
``predicted = scale * sum(blocks) + overhead_ms``, fitted per batch size by a line fit that
minimises relative error and drops outlier networks. Measured on this project's CPU (see
``benchmarks/results/latency_predictor.md``), the scale is far from 1 for OpenVINO at larger
batches (blocks timed alone are slower than inside a compiled network), so a pure additive
overhead is not enough.

A table is versioned JSON (``schema``), keyed by CPU model, ISA flags, thread count, runtime and
version, target, space and network configuration; :meth:`LatencyTable.check_machine` refuses a
table from another machine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.bench.harness import Session, open_session, time_session
from nasforge.bench.sysinfo import physical_cores, system_info
from nasforge.bench.timing_export import Exporter, export_for_timing
from nasforge.errors import ModelFileError, TargetError
from nasforge.hardware.spaces import BlockSpace
from nasforge.hardware.targets import Target, get_target

SCHEMA = "nasforge.latency_table/1"


def machine_key(target: Target, threads: int) -> dict[str, Any]:
    """What makes latencies comparable: CPU, ISA, threads, runtime and its version."""
    info = system_info(threads)
    runtime_version = info["versions"].get(target.runtime) or ""
    return {
        "cpu_model": info["cpu_model"],
        "isa_flags": info["isa_flags"],
        "threads": threads,
        "runtime": target.runtime,
        "runtime_version": runtime_version,
        "target": target.name,
        "precision": target.precision,
    }


def table_key(target: Target, space: BlockSpace, threads: int) -> str:
    """Short stable hash naming a table file for (machine, target, space, network config)."""
    blob = json.dumps(
        {"machine": machine_key(target, threads), "space": space.name, "config": space.config()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass
class Calibration:
    """``predicted = scale * block_sum + overhead_ms`` for one batch size."""

    scale: float = 1.0
    overhead_ms: float = 0.0
    n_networks: int = 0
    fit_median_abs_rel_err: float | None = None


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
    schema: str = SCHEMA

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
        return max(floor, cal.scale * self.block_sum_ms(counts, batch_size) + cal.overhead_ms)

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
        here = machine_key(tgt, int(threads or self.machine["threads"]))
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
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"latency table is malformed: {e!r}") from e

    def save(self, path: Path | str) -> Path:
        """Write the table as JSON atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a table is shared like any result
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
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


# -------------------------------------------------------------------------------- profiling


def time_interleaved(
    sessions: Mapping[str, Session], warmup: int, repeats: int, rounds: int, clock: str = "wall"
) -> dict[str, float]:
    """Robust latency (ms) per session, timing all sessions once per round.

    Each round times every session ``repeats`` times and takes the median; the result is the
    *smallest* round median. Load from other processes only ever adds time, and it comes in
    bursts, so the quietest round is the best estimate of the uncontended latency; on a quiet
    machine it equals the plain median.

    Args:
        sessions: Sessions by key.
        warmup: Untimed runs per session before the first round.
        repeats: Timed runs per session per round.
        rounds: Number of rounds.
        clock: ``"wall"`` or ``"cpu"`` (see :func:`nasforge.bench.harness.time_session`).

    Returns:
        ``{key: min over rounds of the round's median}``.
    """
    best: dict[str, float] = {k: float("inf") for k in sessions}
    for s in sessions.values():
        time_session(s, warmup=warmup, repeats=1)
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time_session(s, warmup=0, repeats=repeats, clock=clock)
            best[k] = min(best[k], float(np.median(t)))
    return best


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Fit ``y = a x + b`` minimising *relative* error (the acceptance metric).

    Weighted least squares with weights ``1/y``, after dropping calibration networks whose
    measured/summed ratio is an outlier (beyond 3 median absolute deviations: a burst of load
    during their measurement). Falls back to an additive offset for fewer than 3 points or a
    non-positive slope.
    """
    if len(x) == 0:
        return 1.0, 0.0
    ratio = y / np.maximum(x, 1e-9)
    mad = np.median(np.abs(ratio - np.median(ratio))) or 1e-9
    keep = np.abs(ratio - np.median(ratio)) <= 3 * 1.4826 * mad
    x, y = x[keep], y[keep]
    if len(x) >= 3 and np.ptp(x) > 0:
        w = 1.0 / y
        A = np.c_[x, np.ones_like(x)] * w[:, None]
        (slope, intercept), *_ = np.linalg.lstsq(A, y * w, rcond=None)
        if slope > 0:
            return float(slope), float(intercept)
    return 1.0, float(np.median(y - x))


def build_latency_table(
    target: Target | str,
    space: BlockSpace,
    batch_sizes: Iterable[int] = (1,),
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    rounds: int = 3,
    calibration_networks: int = 12,
    exporter: Exporter = "torchscript",
    calibration_exporter: Exporter = "dynamo",
    seed: int = 0,
    clock: str = "wall",
    workdir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Profile every block of ``space`` on ``target`` and calibrate on full networks.

    Args:
        target: Runtime target or its name.
        space: The block space (e.g. ``CellBlockSpace(shape, resolution)``).
        batch_sizes: Batch sizes to profile.
        threads: Runtime threads (default physical cores); part of the table key.
        warmup: Untimed runs per model.
        repeats: Timed runs per model per round.
        rounds: Interleaved rounds (medians over ``rounds * repeats`` runs).
        calibration_networks: Random full networks measured end to end to fit scale and
            per-network overhead (0 disables calibration).
        exporter: Exporter for block micro-models.
        calibration_exporter: Exporter for calibration networks (``dynamo``, as deployed).
        seed: Seed for the calibration networks.
        clock: ``"wall"`` (default) or ``"cpu"`` (validation on a shared machine, 1 thread).
        workdir: Where to put the ONNX files (default: a temporary directory).
        progress: Called with one-line progress messages.

    Returns:
        The :class:`LatencyTable` (not saved; call :meth:`LatencyTable.save`).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if tgt.kind != "runtime":
        raise TargetError(f"target '{tgt.name}' is a latency table; it cannot be profiled")
    tgt.check_available()
    if tgt.precision != "fp32":
        raise TargetError(f"profiling '{tgt.name}': only fp32 targets can be profiled so far")
    threads = int(threads or physical_cores())
    batch_sizes = sorted({int(b) for b in batch_sizes})
    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    folds = bool(getattr(tgt, "folds_constants", False))
    chain = 3
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmpdir = Path(tmp)
        blocks = space.blocks()
        # model key -> (file, input shape); chainable blocks get a 1-chain and a `chain`-chain.
        models: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for i, blk in enumerate([*blocks, space.baseline()]):
            for rep in (1, chain) if blk.chainable else (1,):
                path = tmpdir / f"b{i}x{rep}.onnx"
                export_for_timing(blk.module(rep), blk.input_shape, path, exporter)
                models[f"{blk.key}#{rep}"] = (path, blk.input_shape)
        say(f"exported {len(models)} block models in {time.perf_counter() - t_start:.1f}s")

        rng = random.Random(seed)
        specs = [space.sample(rng) for _ in range(calibration_networks)]
        nets: list[Path] = []
        for i, spec in enumerate(specs):
            p = tmpdir / f"net{i}.onnx"
            nets.append(
                export_for_timing(space.build(spec), space.input_shape(), p, calibration_exporter)
            )
        if nets:
            say(f"exported {len(nets)} calibration networks")

        table_blocks: dict[int, dict[str, float]] = {}
        baselines: dict[int, float] = {}
        calibs: dict[int, Calibration] = {}
        for bs in batch_sizes:
            sessions = {
                k: open_session(p, tgt, bs, shape, threads) for k, (p, shape) in models.items()
            }
            # Calibration networks are timed in the same interleaved rounds as the blocks, so
            # both see the same machine state (load, frequency) and the fit relates like to like.
            for i, p in enumerate(nets):
                sessions[f"net#{i}"] = open_session(p, tgt, bs, space.input_shape(), threads)
            med = time_interleaved(sessions, warmup, repeats, rounds, clock)
            del sessions
            baselines[bs] = med["baseline#1"]
            lat: dict[str, float] = {}
            for blk in blocks:
                if blk.chainable:
                    v = (med[f"{blk.key}#{chain}"] - med[f"{blk.key}#1"]) / (chain - 1)
                else:
                    v = med[f"{blk.key}#1"] - baselines[bs]
                lat[blk.key] = max(0.0, v)
            table_blocks[bs] = lat
            say(f"batch {bs}: profiled {len(blocks)} blocks")
            if nets:
                x = np.array(
                    [
                        sum(n * lat[k] for k, n in space.block_counts(s, folds).items())
                        for s in specs
                    ]
                )
                y = np.array([med[f"net#{i}"] for i in range(len(specs))])
                scale, overhead = _fit_line(x, y)
                fit = np.maximum(scale * x + overhead, baselines[bs])
                calibs[bs] = Calibration(
                    scale=scale,
                    overhead_ms=overhead,
                    n_networks=len(specs),
                    fit_median_abs_rel_err=float(np.median(np.abs(fit - y) / y)),
                )
                say(f"batch {bs}: calibrated scale={scale:.3f} overhead={overhead:.4f} ms")
            else:
                calibs[bs] = Calibration(overhead_ms=baselines[bs])
    return LatencyTable(
        target=tgt.name,
        space=space.name,
        config=space.config(),
        machine=machine_key(tgt, threads),
        folds_constants=folds,
        blocks=table_blocks,
        baseline_ms=baselines,
        calibration=calibs,
        settings={
            "warmup": warmup,
            "repeats": repeats,
            "rounds": rounds,
            "exporter": exporter,
            "calibration_exporter": calibration_exporter,
            "calibration_networks": calibration_networks,
            "chain": chain,
            "seed": seed,
            "clock": clock,
        },
        system=system_info(threads),
        build_seconds=time.perf_counter() - t_start,
        created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
