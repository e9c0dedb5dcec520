"""Energy per inference: measured where a meter exists, otherwise estimated, always labelled.

Meters:

* Intel/AMD RAPL through Linux powercap (``/sys/class/powercap/intel-rapl:N/energy_uj``, package
  domains; needs read permission, often root-only since 2020 for security reasons);
* NVML on NVIDIA GPUs (``nvmlDeviceGetTotalEnergyConsumption``, Volta and newer; needs
  ``pynvml``).

Without a meter the energy is **estimated** as device power x latency, with the documented power
figures in :data:`DEVICE_POWER_W` (override with ``NASFORGE_CPU_WATTS_PER_CORE`` /
``NASFORGE_GPU_WATTS``). Every result carries ``source`` = ``"measured"`` or ``"estimated"`` and
the ``method`` used, and table targets report their CSV's ``<device>_energy_mj`` column as
``measured`` when present.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nasforge.hardware.targets import GPU_DEVICES

POWERCAP = Path("/sys/class/powercap")

DEVICE_POWER_W: dict[str, float] = {
    # Per busy core of a server CPU: TDP / cores of current Xeons (e.g. 350 W / 56 cores).
    "cpu_per_core": 6.25,
    # A data-centre GPU under inference load (H100 PCIe TDP 350 W; A100 PCIe 300 W).
    "gpu": 300.0,
    # Devices of the NB201 latency tables (board/chip power under load, vendor or paper figures):
    "raspi4": 6.4,  # Raspberry Pi 4 B, all cores busy (Raspberry Pi documentation: ~6.4 W)
    "pi5_onnx": 8.0,  # Raspberry Pi 5 under CPU load (~8 W)
    "pixel3": 5.0,  # phone SoC, big cores busy (Snapdragon 845 class)
    "gold_6226": 125.0,  # Intel Xeon Gold 6226 TDP
    "1080ti_1": 250.0,  # GTX 1080 Ti board power
    "1080ti_32": 250.0,
    "titan_rtx_256": 280.0,  # Titan RTX board power
    "eyeriss": 0.278,  # Eyeriss ASIC (Chen et al., JSSC 2017: 278 mW)
    "fpga": 10.0,  # mid-range FPGA accelerator board (assumed)
}


@dataclasses.dataclass(frozen=True)
class EnergyResult:
    """Energy of one batch.

    Attributes:
        mj_per_batch: Millijoules for one inference of ``batch_size`` samples.
        mj_per_sample: ``mj_per_batch / batch_size``.
        source: ``"measured"`` or ``"estimated"``.
        method: ``"rapl"``, ``"nvml"``, ``"table:<column>"`` or the estimate's formula.
        power_w: Average power (measured or assumed) in watts, when known.
        batch_size: Samples per inference.
    """

    mj_per_batch: float
    mj_per_sample: float
    source: str
    method: str
    power_w: float | None
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return dataclasses.asdict(self)


def rapl_domains() -> list[Path]:
    """Readable RAPL package-domain energy counters (empty if none)."""
    out = []
    if not POWERCAP.is_dir():
        return out
    for d in sorted(POWERCAP.glob("intel-rapl:*")):
        if d.name.count(":") != 1:
            continue  # sub-domains (core, uncore, dram) are inside the package figure
        f = d / "energy_uj"
        try:
            int(f.read_text())
            out.append(d)
        except (OSError, ValueError):
            continue
    return out


def _read_rapl(domains: list[Path]) -> list[int]:
    return [int((d / "energy_uj").read_text()) for d in domains]


def _rapl_delta_uj(domains: list[Path], before: list[int], after: list[int]) -> int:
    total = 0
    for d, b, a in zip(domains, before, after, strict=True):
        if a < b:  # counter wrapped
            try:
                a += int((d / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
        total += a - b
    return total


def _nvml_handle() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no pynvml, no driver, no GPU
        return None


def meter_for(device: str) -> str | None:
    """The energy meter available for a target device here: ``"rapl"``, ``"nvml"`` or None."""
    if device in GPU_DEVICES:
        return "nvml" if _nvml_handle() is not None else None
    return "rapl" if rapl_domains() else None


def estimated_power_w(device: str, threads: int) -> tuple[float, str]:
    """Assumed power of a device and the formula, for estimates."""
    if device in GPU_DEVICES:
        w = float(os.environ.get("NASFORGE_GPU_WATTS", DEVICE_POWER_W["gpu"]))
        return w, f"estimated: {w:g} W GPU x latency"
    per_core = float(os.environ.get("NASFORGE_CPU_WATTS_PER_CORE", DEVICE_POWER_W["cpu_per_core"]))
    return per_core * threads, f"estimated: {per_core:g} W/core x {threads} cores x latency"


def estimate_energy(latency_ms: float, batch_size: int, device: str, threads: int) -> EnergyResult:
    """Energy estimated from latency and the documented device power."""
    power, method = estimated_power_w(device, threads)
    mj = power * latency_ms  # W * ms = mJ
    return EnergyResult(mj, mj / batch_size, "estimated", method, power, batch_size)


def measure_energy(
    run: Callable[[], object],
    device: str,
    batch_size: int,
    latency_ms: float,
    threads: int,
    seconds: float = 1.0,
) -> EnergyResult:
    """Energy per inference of ``run``: measured with a meter if one exists, else estimated.

    Args:
        run: One inference (already warmed up).
        device: ``"cpu"`` or ``"cuda"``.
        batch_size: Samples per call.
        latency_ms: Measured latency, used for the estimate when there is no meter.
        threads: Threads used (for the estimate).
        seconds: How long to run under the meter (meters update every ~1 ms to 100 ms).
    """
    meter = meter_for(device)
    if meter is None:
        return estimate_energy(latency_ms, batch_size, device, threads)
    n = 0
    if meter == "rapl":
        domains = rapl_domains()
        before, t0 = _read_rapl(domains), time.perf_counter()
        while time.perf_counter() - t0 < seconds or n == 0:
            run()
            n += 1
        after, dt = _read_rapl(domains), time.perf_counter() - t0
        joules = _rapl_delta_uj(domains, before, after) / 1e6
    else:
        import pynvml

        handle = _nvml_handle()
        e0, t0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), time.perf_counter()
        while time.perf_counter() - t0 < seconds or n == 0:
            run()
            n += 1
        e1, dt = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), time.perf_counter() - t0
        joules = (e1 - e0) / 1e3  # NVML counts millijoules
    mj = joules * 1e3 / n
    # RAPL measures the whole package (other processes too): label it so.
    method = "rapl (package, whole socket)" if meter == "rapl" else "nvml (whole GPU)"
    return EnergyResult(mj, mj / batch_size, "measured", method, joules / dt, batch_size)


def model_energy(
    model_path: Path | str,
    target: Any,
    batch_size: int = 1,
    latency_ms: float | None = None,
    threads: int | None = None,
    seconds: float = 1.0,
) -> EnergyResult:
    """Energy per inference of a model file on a runtime target (measured or estimated).

    Args:
        model_path: ``.onnx`` or ``.xml``.
        target: Runtime target or name.
        batch_size: Samples per inference.
        latency_ms: Known latency (p50); measured here if omitted.
        threads: Runtime threads (default physical cores).
        seconds: Time under the meter.
    """
    from nasforge.bench.harness import open_session, time_session
    from nasforge.bench.sysinfo import physical_cores
    from nasforge.hardware.targets import get_target

    tgt = get_target(target) if isinstance(target, str) else target
    threads = int(threads or physical_cores())
    sess = open_session(model_path, tgt, batch_size, None, threads)
    times = time_session(sess, warmup=3, repeats=10)
    lat = latency_ms if latency_ms is not None else float(sorted(times)[len(times) // 2])
    import numpy as np

    x = np.random.default_rng(0).standard_normal(sess.input_shape).astype(sess.input_dtype)
    return measure_energy(lambda: sess.run(x), tgt.device, batch_size, lat, threads, seconds)


def table_energy(target: Any, arch_str: str, batch_size: int = 1) -> EnergyResult | None:
    """Energy of an architecture on a ``table:`` target from its CSV's energy column, if any.

    The column is ``<device>_energy_mj`` next to ``<device>_latency_ms`` (e.g. ``pi5_onnx``).
    Returns None when the CSV has no such column or no value.
    """
    import csv

    column = target.column.replace("_latency_ms", "_energy_mj")
    if column == target.column:
        return None
    with Path(target.table).open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("arch_str") == arch_str:
                try:
                    mj = float(row.get(column) or "")
                except ValueError:
                    return None
                return EnergyResult(
                    mj, mj / batch_size, "measured", f"table:{column}", None, batch_size
                )
    return None


def energy_per_inference(
    target: Any,
    latency_ms: float,
    batch_size: int = 1,
    threads: int | None = None,
    model_path: Path | str | None = None,
    arch_str: str | None = None,
) -> dict[str, Any]:
    """Energy of one inference on a target, as a labelled dict (what stages record).

    Measured when possible: with a meter here (RAPL/NVML) and ``model_path`` given, by running the
    model; for ``table:`` targets from the CSV's ``<device>_energy_mj`` column when ``arch_str``
    is given and the column exists. Otherwise estimated as documented power x latency.

    Args:
        target: Target or name.
        latency_ms: Latency of one batch (p50).
        batch_size: Samples per batch.
        threads: Threads used (CPU estimate); default physical cores.
        model_path: Model file, for a real measurement where a meter exists.
        arch_str: NB201 architecture, for table targets' energy columns.

    Returns:
        :meth:`EnergyResult.as_dict` plus ``"mj"`` (= ``mj_per_batch``).
    """
    from nasforge.bench.sysinfo import physical_cores
    from nasforge.hardware.targets import get_target

    tgt = get_target(target) if isinstance(target, str) else target
    threads = int(threads or physical_cores())
    result: EnergyResult | None = None
    if tgt.kind == "table":
        if arch_str:
            result = table_energy(tgt, arch_str, batch_size)
        if result is None:
            power = DEVICE_POWER_W.get(tgt.device)
            if power is None:
                d = {
                    "source": "not available",
                    "mj": None,
                    "method": f"no power figure for {tgt.device}",
                }
                return d
            mj = power * latency_ms
            result = EnergyResult(
                mj,
                mj / batch_size,
                "estimated",
                f"estimated: {power:g} W x latency",
                power,
                batch_size,
            )
    elif model_path is not None and meter_for(tgt.device):
        result = model_energy(model_path, tgt, batch_size, latency_ms, threads)
    else:
        result = estimate_energy(latency_ms, batch_size, tgt.device, threads)
    d = result.as_dict()
    d["mj"] = result.mj_per_batch
    return d
