"""What machine a measurement was taken on.

Every benchmark and every latency table records :func:`system_info` so that figures from different
machines, thread counts or runtime versions are never compared by accident. The ISA subset matters
for INT8 (VNNI / AMX decide whether INT8 is fast and whether it can saturate) and for OpenVINO's
default precision (BF16/FP16-capable CPUs silently run reduced precision unless pinned to f32).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

from nasforge.runtimes.registry import versions as runtime_versions

# The flags that change what a runtime executes or how fast; the full list is long and noisy.
RELEVANT_ISA_FLAGS: tuple[str, ...] = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "avx_vnni_int8",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
    "asimd",  # ARM NEON
    "asimddp",  # ARM dot product (the ARM analogue of VNNI)
    "sve",
)


def _cpuinfo() -> tuple[str, set[str]]:
    """Return the CPU model name and the full set of ISA flags from /proc/cpuinfo."""
    model, flags = "", set()
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "processor name", "hardware") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def physical_cores() -> int:
    """Number of physical cores this process may run on (the default thread count).

    Hyper-threads share execution units, so runtimes are pinned to physical cores; CPU affinity
    (containers, taskset) can lower that number further.
    """
    try:
        import psutil

        phys = psutil.cpu_count(logical=False) or 1
    except ImportError:  # psutil is a dependency; stay usable without it anyway
        phys = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    return max(1, min(phys, allowed))


@functools.cache
def _static_info() -> dict[str, Any]:
    model, flags = _cpuinfo()
    isa = sorted(f for f in RELEVANT_ISA_FLAGS if f in flags)
    has_vnni = any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))
    return {
        "cpu_model": model,
        "isa_flags": isa,
        "has_vnni": has_vnni,
        "has_amx": any(f.startswith("amx") for f in flags),
        "logical_cores": os.cpu_count() or 1,
        "physical_cores": physical_cores(),
        "versions": {
            "python": platform.python_version(),
            # every registered runtime's own version (None when it is not installed)
            **{name: version or None for name, version in runtime_versions().items()},
            "torch": _version("torch"),
            "numpy": _version("numpy"),
        },
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python_executable": sys.executable,
    }


def system_info(threads: int | None = None) -> dict[str, Any]:
    """Describe this machine for a benchmark record.

    Args:
        threads: Threads the measurement used; defaults to the number of physical cores.

    Returns:
        A JSON-serialisable dict with ``cpu_model``, ``isa_flags`` (relevant subset), ``has_vnni``,
        ``has_amx``, ``logical_cores``, ``physical_cores``, ``threads``, ``versions`` (python,
        every runtime of :mod:`nasforge.runtimes`, torch, numpy), ``os``, ``machine`` and ``load_avg_1m``
        (the 1-minute load average when measured, to flag a contended machine).
    """
    info = dict(_static_info())
    info["versions"] = dict(info["versions"])
    info["isa_flags"] = list(info["isa_flags"])
    info["threads"] = int(threads) if threads else info["physical_cores"]
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_avg_1m"] = None
    return info
