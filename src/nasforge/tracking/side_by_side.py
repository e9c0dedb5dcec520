"""Time the champion and the challenger side by side, in this process, on the target's runtime.

Both models get sessions from the one measurement harness (:func:`nasforge.bench.harness.
open_session`: fixed threads, OpenVINO pinned to f32) and are timed by the latency tables'
interleaved-rounds timer (:func:`nasforge.hardware.profiling.time_interleaved`): each round
times each model ``repeats`` times after one untimed run and keeps the median, so load from other
processes falls on both models alike. The order of the two alternates between rounds, so neither
always runs first. The per-round values are the paired samples the gate's confidence intervals
are computed from (:func:`nasforge.tracking.gate.compare_rounds`).

Both sessions are opened anew every round (in the round's order). A session keeps its runtime
threads for its life, and on a loaded machine where those threads landed decides its speed: in CI
(two test workers on two cores) one of two byte-identical models measured 1.86x slower than the
other over all 20 rounds, with a tight interval. Fresh sessions turn that lasting placement into
per-round noise, which the bootstrap interval then shows as a wider interval instead of a false
verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nasforge.tracking.gate import GateSettings

CHAMPION, CHALLENGER = "champion", "challenger"


def timing_problem(target: str) -> str | None:
    """Why ``target`` cannot time models in this process, or ``None`` if it can."""
    from nasforge.hardware.targets import get_target

    t = get_target(target)
    if t.kind != "runtime":
        return f"{target} is a latency table (no runtime to run models on)"
    problem = t.availability_problem()
    return f"{target} is not available here: {problem}" if problem else None


def machine(target: str, threads: int) -> dict[str, Any]:
    """What the timings were taken on: CPU model and ISA, threads, runtime and version, host,
    and the load average (a contended machine widens the intervals)."""
    import platform

    from nasforge.bench.sysinfo import system_info
    from nasforge.hardware.latency_table import machine_key
    from nasforge.hardware.targets import get_target

    key = machine_key(get_target(target), threads)
    info = system_info(threads)
    return {
        **key,
        "host": platform.node(),
        "logical_cores": info["logical_cores"],
        "load_avg_1m": info["load_avg_1m"],
    }


def time_side_by_side(
    champion: Path, challenger: Path, target: str, settings: GateSettings
) -> dict[str, Any]:
    """Per-round latencies (ms, batch 1) of both model files on ``target``.

    Returns:
        ``{"champion": [...], "challenger": [...], "input_shapes": {...}, "executed_precision":
        {...}, "machine": {...}}``, one value per round for each model.

    Raises:
        ModelFileError: A model file cannot be loaded.
        TargetError: The target cannot run models here (see :func:`timing_problem`).
    """
    from nasforge.bench.harness import open_session, time_session
    from nasforge.hardware.profiling import time_interleaved

    threads = settings.threads
    paths = {CHAMPION: champion, CHALLENGER: challenger}
    rounds: dict[str, list[float]] = {}
    sessions: dict[str, Any] = {}
    for i in range(settings.rounds):
        order = [CHAMPION, CHALLENGER] if i % 2 == 0 else [CHALLENGER, CHAMPION]
        sessions = {k: open_session(paths[k], target, batch_size=1, threads=threads) for k in order}
        for s in sessions.values():
            time_session(s, warmup=settings.warmup, repeats=1)
        time_interleaved(
            sessions, warmup=0, repeats=settings.repeats, rounds=1, round_values=rounds
        )
    return {
        CHAMPION: rounds[CHAMPION],
        CHALLENGER: rounds[CHALLENGER],
        "input_shapes": {k: list(s.input_shape) for k, s in sessions.items()},
        "executed_precision": {k: s.executed_precision for k, s in sessions.items()},
        "runtime": f"{sessions[CHAMPION].runtime} {sessions[CHAMPION].runtime_version}",
        "machine": machine(target, threads),
    }
