"""Profiling: building a latency table by timing every block of a search space on a target.

:func:`build_latency_table` measures every block of a search space (see
:mod:`nasforge.hardware.spaces`) on a runtime target through the shared harness, with warm-up,
repetitions and medians, threads fixed, and *interleaved rounds* (:func:`time_interleaved`: every
model is timed once per round; the smallest round value wins) so a burst of load from other
processes does not corrupt one block. Blocks whose output shape equals their input are timed as
chains of 1 and 3 copies and the difference is used, cancelling per-call overhead and
graph-boundary layout conversions; other blocks (stem, reductions, head) are timed alone minus a
near-empty baseline model. Every model is exported for timing by the target's runtime
(:meth:`nasforge.runtimes.base.Runtime.export_for_timing`: ONNX for ONNX Runtime and OpenVINO, a
``.pte`` for ExecuTorch).

The table is then calibrated on random full networks measured end to end in the same rounds
(:func:`nasforge.hardware.calibration.fit_calibration`).

INT8 tables (``precision="int8"``, or an ``-int8`` target) time every block model and every
calibration network quantized as the runtime deploys INT8 (ONNX: a PTQ copy in the deployed QDQ
layout, :func:`nasforge.bench.timing_export.quantize_for_timing`); the rest of the method is the
same.
"""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from nasforge.bench.harness import Session, open_session, time_session
from nasforge.bench.sysinfo import physical_cores, system_info
from nasforge.bench.timing_export import QUANTIZATION, Exporter, Precision, torch_single_thread
from nasforge.errors import TargetError
from nasforge.hardware.calibration import Calibration, block_stats, fit_calibration
from nasforge.hardware.latency_table import LatencyTable, machine_key, resolve_precision
from nasforge.hardware.spaces import BlockSpace
from nasforge.hardware.targets import Target, get_target, runtime_target


def session_target(target: Target) -> Target:
    """The target to open timing sessions on: an INT8 target's FP32 twin (same runtime and
    device), as the harness refuses files without Q/DQ nodes on INT8 targets, and an INT8
    table also times blocks that have nothing to quantize (sums, pools, the baseline)."""
    if target.precision != "int8":
        return target
    try:
        return runtime_target(target.runtime, target.device, "fp32")
    except TargetError:
        return target


def time_interleaved(
    sessions: Mapping[str, Session],
    warmup: int,
    repeats: int,
    rounds: int,
    clock: str = "wall",
    budget_ms: float | None = None,
    min_repeats: int = 3,
    quantile: float = 0.5,
    samples: dict[str, list[float]] | None = None,
    round_values: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Robust latency (ms) per session, timing all sessions once per round.

    Each round times every session up to ``repeats`` times and takes the ``quantile`` of those
    runs (default the median); the result is the *smallest* round value. Load from other
    processes only ever adds time, and it comes in bursts, so the quietest round is the best
    estimate of the uncontended latency; on a quiet machine it equals the plain median. On a
    heavily shared machine a low quantile (down to 0: the fastest run) is more robust still: a
    run during which another process took one of the runtime's cores is slow, never fast.

    Args:
        sessions: Sessions by key.
        warmup: Untimed runs per session before the first round.
        repeats: Timed runs per session per round (at most, with ``budget_ms``).
        rounds: Number of rounds.
        clock: ``"wall"`` or ``"cpu"`` (see :func:`nasforge.bench.harness.time_session`).
        budget_ms: If given, a session whose last warm-up run took ``t`` ms gets only
            ``max(min_repeats, budget_ms / t)`` runs per round: slow models (large batches)
            have little relative noise and would otherwise dominate the profiling time.
        min_repeats: Fewest runs per round under a budget.
        quantile: Per-round statistic (0.5: median).
        samples: If given, filled with every timed run (ms) per key.
        round_values: If given, filled with each round's value (ms) per key, in round order
            (split-half repeatability: compare the minimum over even and odd rounds).

    Returns:
        ``{key: min over rounds of the round's quantile}``.
    """
    best: dict[str, float] = {k: float("inf") for k in sessions}
    reps: dict[str, int] = {}
    for k, s in sessions.items():
        if warmup > 1:
            time_session(s, warmup=warmup - 1, repeats=1, clock=clock)
        t = time_session(s, warmup=0, repeats=1, clock=clock)
        if budget_ms is None:
            reps[k] = repeats
        else:
            reps[k] = int(min(repeats, max(min_repeats, budget_ms // max(float(t[0]), 1e-3))))
    for _ in range(rounds):
        for k, s in sessions.items():
            # One untimed run first: the previous session's runtime threads may still be
            # spinning (ONNX Runtime spins idle workers) and would slow this session's first run.
            t = time_session(s, warmup=1, repeats=reps[k], clock=clock)
            value = float(np.quantile(t, quantile))
            best[k] = min(best[k], value)
            if round_values is not None:
                round_values.setdefault(k, []).append(value)
            if samples is not None:
                samples.setdefault(k, []).extend(t.tolist())
    return best


def build_latency_table(
    target: Target | str,
    space: BlockSpace,
    batch_sizes: Iterable[int] = (1,),
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    rounds: int = 6,
    calibration_networks: int = 32,
    exporter: Exporter = "torchscript",
    calibration_exporter: Exporter = "dynamo",
    seed: int = 0,
    clock: str = "wall",
    workdir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
    budget_ms: float | None = 25.0,
    quantile: float = 0.0,
    precision: Precision | None = None,
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
        budget_ms: Per model and round, time at most about this many ms of runs (at least 3;
            see :func:`time_interleaved`); ``None`` always runs ``repeats``.
        quantile: Per-round statistic of the runs (see :func:`time_interleaved`). The default,
            the fastest run, was the most repeatable estimate on this project's shared 2-core
            machine (split-half difference 7% at batch 1, against 22% for the 10% quantile
            and 55% for the median, under a load average of 8-10); use 0.5 on a quiet machine.
        precision: ``"int8"`` times every block model and calibration network as a PTQ QDQ
            copy (:func:`nasforge.bench.timing_export.quantize_for_timing`); default the
            target's own precision (see :func:`resolve_precision`).

    Returns:
        The :class:`LatencyTable` (not saved; call :meth:`LatencyTable.save`).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if rounds < 1 or repeats < 1 or warmup < 0 or calibration_networks < 0:
        raise TargetError(
            "profiling needs rounds >= 1, repeats >= 1, warmup >= 0 and calibration networks "
            f">= 0, got {rounds}, {repeats}, {warmup}, {calibration_networks}"
        )
    if tgt.kind != "runtime":
        raise TargetError(f"target '{tgt.name}' is a latency table; it cannot be profiled")
    prec = resolve_precision(tgt, precision)
    tgt.check_available()
    threads = int(threads or physical_cores())
    batch_sizes = sorted({int(b) for b in batch_sizes})
    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    folds = tgt.folds_constants
    runtime = tgt.backend
    chain = 3
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, torch_single_thread():
        tmpdir = Path(tmp)
        blocks = space.blocks()
        # model key -> (file, input shape); chainable blocks get a 1-chain and a `chain`-chain.
        models: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for i, blk in enumerate([*blocks, space.baseline()]):
            for rep in (1, chain) if blk.chainable else (1,):
                path = runtime.export_for_timing(
                    blk.module(rep), blk.input_shape, tmpdir / f"b{i}x{rep}", prec, None, exporter
                )
                models[f"{blk.key}#{rep}"] = (path, blk.input_shape)
        say(f"exported {len(models)} {prec} block models in {time.perf_counter() - t_start:.1f}s")
        stats = {blk.key: block_stats(blk.module(), blk.input_shape) for blk in blocks}
        for key, source in space.derived_blocks(prec).items():
            stats[key] = stats[source]

        rng = random.Random(seed)
        specs = [space.sample(rng) for _ in range(calibration_networks)]
        nets: list[Path] = []
        for i, spec in enumerate(specs):
            nets.append(
                runtime.export_for_timing(
                    space.build(spec),
                    space.input_shape(),
                    tmpdir / f"net{i}",
                    prec,
                    None,
                    calibration_exporter,
                )
            )
        if nets:
            say(f"exported {len(nets)} calibration networks")

        table_blocks: dict[int, dict[str, float]] = {}
        baselines: dict[int, float] = {}
        calibs: dict[int, Calibration] = {}
        for bs in batch_sizes:
            run_on = session_target(tgt)
            sessions = {
                k: open_session(p, run_on, bs, shape, threads) for k, (p, shape) in models.items()
            }
            # Calibration networks are timed in the same interleaved rounds as the blocks, so
            # both see the same machine state (load, frequency) and the fit relates like to like.
            for i, p in enumerate(nets):
                sessions[f"net#{i}"] = open_session(p, run_on, bs, space.input_shape(), threads)
            med = time_interleaved(
                sessions, warmup, repeats, rounds, clock, budget_ms, quantile=quantile
            )
            del sessions
            baselines[bs] = med["baseline#1"]
            lat: dict[str, float] = {}
            for blk in blocks:
                if blk.chainable:
                    v = (med[f"{blk.key}#{chain}"] - med[f"{blk.key}#1"]) / (chain - 1)
                else:
                    v = med[f"{blk.key}#1"] - baselines[bs]
                lat[blk.key] = max(0.0, v)
            for key, source in space.derived_blocks(prec).items():
                lat[key] = lat[source]
            table_blocks[bs] = lat
            say(f"batch {bs}: profiled {len(blocks)} blocks")
            if nets:
                counts = [space.block_counts(s, folds, prec) for s in specs]
                y = [med[f"net#{i}"] for i in range(len(specs))]
                calibs[bs] = cal = fit_calibration(counts, lat, y, space.feature_sets(), stats)
                say(
                    f"batch {bs}: calibrated {dict(zip(cal.features, cal.coefs, strict=True))} "
                    f"(leave-one-out median error {cal.loo_median_abs_rel_err:.3f})"
                )
            else:
                calibs[bs] = Calibration(overhead_ms=baselines[bs])
    return LatencyTable(
        target=tgt.name,
        space=space.name,
        config=space.config(),
        machine=machine_key(tgt, threads, prec),
        precision=prec,
        folds_constants=folds,
        block_stats=stats,
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
            "budget_ms": budget_ms,
            "quantile": quantile,
            "precision": prec,
            **({"quantization": QUANTIZATION} if prec == "int8" else {}),
        },
        system=system_info(threads),
        build_seconds=time.perf_counter() - t_start,
        created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
