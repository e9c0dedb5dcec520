"""The one measurement harness: "time this model on this target".

Used by the benchmark stage, by latency-table profiling and by the latency-predictor benchmark, so
every latency in nasforge is measured the same way:

* one inference session per model, built by the target's runtime (:mod:`nasforge.runtimes`:
  ONNX Runtime ``intra_op_num_threads``; OpenVINO ``INFERENCE_NUM_THREADS`` with
  ``PERFORMANCE_HINT=LATENCY`` and pinned to ``INFERENCE_PRECISION_HINT=f32``; ExecuTorch's
  XNNPACK thread pool) with the thread count fixed, and the precision it really executed;
* ``warmup`` untimed runs, then ``repeats`` individually timed runs on a fixed random input;
  p50/p90/p99/mean and throughput from those;
* peak resident memory measured with the kernel's high-water mark (``VmHWM``, reset before the
  session is built), plus the session's own increment over the RSS before it was built.

Nothing here depends on which runtime a target names: sessions, file checks and precision come
from the runtime registry.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from nasforge import progress
from nasforge.bench.sysinfo import physical_cores, system_info
from nasforge.errors import TargetError
from nasforge.hardware.targets import Target, get_target
from nasforge.runtimes.base import Session
from nasforge.runtimes.registry import check_model_file


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    """Latency of one model on one target at one batch size.

    Attributes:
        p50_ms: Median latency of one batch, in milliseconds.
        p90_ms: 90th percentile latency.
        p99_ms: 99th percentile latency.
        mean_ms: Mean latency.
        throughput_ips: Samples per second over the timed runs (``batch_size`` / mean latency).
        batch_size: Samples per inference.
        precision: Model precision, ``"fp32"`` or ``"int8"`` (int8 = the graph has Q/DQ or
            FakeQuantize nodes).
        executed_precision: What the runtime really executed: for OpenVINO the element types of
            the compute layers of the compiled model, most frequent first (e.g. ``"f32"``,
            ``"u8+i8+f32"``; an IR saved with FP16-compressed weights reports ``"f16"`` on the
            layers reading them), for ONNX
            Runtime and ExecuTorch ``"fp32"`` or ``"int8+fp32"`` (quantized kernels).
        peak_rss_bytes: Process resident-memory high-water mark while the session was built and
            run (includes the Python interpreter and runtime libraries).
        session_rss_bytes: Peak RSS minus RSS just before the session was built: the memory the
            session itself needed.
        runtime: The runtime's name (``"onnxruntime"``, ``"openvino"``, ``"executorch"`` ...).
        runtime_version: Version of that runtime.
        device: ``"cpu"`` or ``"cuda"``.
        threads: Threads the runtime was given.
        input_shape: Input shape including the batch dimension.
        warmup: Untimed warm-up runs.
        repeats: Timed runs.
        target: Target name.
        system: :func:`nasforge.bench.sysinfo.system_info` at measurement time.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float
    batch_size: int
    precision: str
    executed_precision: str
    peak_rss_bytes: int
    session_rss_bytes: int
    runtime: str
    runtime_version: str
    device: str
    threads: int
    input_shape: tuple[int, ...]
    warmup: int
    repeats: int
    target: str
    system: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of all fields."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


# --------------------------------------------------------------------------------------------
# memory


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class _PeakRss:
    """Measure the process's peak RSS over a code region.

    On Linux the kernel keeps the high-water mark (VmHWM) and lets a process reset it by writing
    ``5`` to ``/proc/self/clear_refs``; that is exact. Elsewhere a sampling thread (every 2 ms) is
    the fallback.
    """

    def __enter__(self) -> _PeakRss:
        self.baseline = _rss_bytes()
        self.peak = self.baseline
        self._exact = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._exact = True
        except OSError:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = max(self.baseline, int(line.split()[1]) * 1024)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


# --------------------------------------------------------------------------------------------
# sessions


def open_session(
    model_path: Path | str,
    target: Target | str,
    batch_size: int = 1,
    input_shape: tuple[int, ...] | None = None,
    threads: int | None = None,
) -> Session:
    """Build an inference session for a model on a runtime target.

    Args:
        model_path: A file of the target's runtime (``.onnx``; OpenVINO also ``.xml``;
            ExecuTorch ``.pte``).
        target: A runtime target or its name (see :mod:`nasforge.hardware.targets`).
        batch_size: Batch size the session is built for.
        input_shape: Input shape without batch; read from the model if omitted.
        threads: Runtime threads; default the number of physical cores.

    Returns:
        A :class:`Session`.

    Raises:
        ModelFileError: Missing, corrupt or incompatible model file.
        TargetError: Unknown target, table target, or target not available here.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if tgt.kind != "runtime":
        raise TargetError(f"target '{tgt.name}' is a latency table; it cannot run models")
    tgt.check_available()
    runtime = tgt.backend
    model_path = Path(model_path)
    check_model_file(runtime, model_path)
    threads = int(threads) if threads else physical_cores()
    sess = runtime.open_session(model_path, tgt.device, batch_size, input_shape, threads)
    if tgt.precision == "int8" and sess.precision != "int8":
        raise TargetError(
            f"target '{tgt.name}' runs INT8 models; {model_path} has no quantization nodes "
            "(export the QAT/QDQ model)"
        )
    return sess


def _random_input(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 10, size=shape).astype(dtype)


def time_session(
    session: Session, warmup: int = 10, repeats: int = 50, clock: str = "wall"
) -> np.ndarray:
    """Time ``repeats`` runs of a session after ``warmup`` untimed runs.

    Args:
        session: The session.
        warmup: Untimed runs.
        repeats: Timed runs.
        clock: ``"wall"`` (latency as users see it; the default everywhere) or ``"cpu"``
            (process CPU time: with one runtime thread it is immune to other processes competing
            for the cores, which makes it the clock for validating models on a shared machine;
            with more threads it also counts spin-waiting).

    Returns:
        Per-run times in milliseconds.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = time.perf_counter_ns if clock == "wall" else time.process_time_ns
    x = _random_input(session.input_shape, session.input_dtype)
    for _ in range(warmup):
        session.run(x)
    times = np.empty(repeats, dtype=np.float64)
    for i in range(repeats):
        t0 = now()
        session.run(x)
        times[i] = (now() - t0) / 1e6
        progress.step("timed run", i + 1, repeats, echo=False)
    return times


def measure(
    model_path: Path | str,
    target: Target | str,
    batch_size: int = 1,
    input_shape: tuple[int, ...] | None = None,
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
) -> LatencyResult:
    """Time a model on a runtime target.

    Args:
        model_path: A file of the target's runtime (``.onnx``, OpenVINO ``.xml``, ``.pte``).
        target: Runtime target or its name, e.g. ``"onnxruntime-cpu"``, ``"openvino-cpu"``.
        batch_size: Samples per inference.
        input_shape: Input shape without batch (e.g. ``(1, 8, 8)``); read from the model if omitted.
        warmup: Untimed runs before timing.
        repeats: Timed runs.
        threads: Runtime threads; default the number of physical cores (recorded in the result).

    Returns:
        A :class:`LatencyResult`.

    Raises:
        ModelFileError: Missing, corrupt or incompatible model file.
        TargetError: Unknown target, table target, or target not available here.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch_size and repeats must be >= 1 and warmup >= 0")
    tgt = get_target(target) if isinstance(target, str) else target
    threads = int(threads) if threads else physical_cores()
    with _PeakRss() as mem:
        sess = open_session(model_path, tgt, batch_size, input_shape, threads)
        times = time_session(sess, warmup, repeats)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return LatencyResult(
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=mean,
        throughput_ips=batch_size * 1000.0 / mean,
        batch_size=batch_size,
        precision=sess.precision,
        executed_precision=sess.executed_precision,
        peak_rss_bytes=mem.peak,
        session_rss_bytes=max(0, mem.peak - mem.baseline),
        runtime=sess.runtime,
        runtime_version=sess.runtime_version,
        device=tgt.device,
        threads=threads,
        input_shape=tuple(sess.input_shape),
        warmup=warmup,
        repeats=repeats,
        target=tgt.name,
        system=system_info(threads),
    )


def predict(
    model_path: Path | str,
    target: Target | str,
    x: np.ndarray,
    batch_size: int = 64,
    threads: int | None = None,
) -> np.ndarray:
    """Run an exported model over a dataset on a runtime target and return its outputs.

    Used for the accuracy of *exported* models. The last partial batch is zero-padded to
    ``batch_size`` (the session has a static shape) and the padding rows are dropped.

    Args:
        model_path: A file of the target's runtime.
        target: Runtime target or its name.
        x: Inputs, shape ``(N, *input_shape)``.
        batch_size: Samples per inference.
        threads: Runtime threads; default the number of physical cores.

    Returns:
        First model output (logits) for all ``N`` samples, shape ``(N, ...)``.
    """
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch of inputs, got shape {x.shape}")
    bs = max(1, min(batch_size, len(x)))
    sess = open_session(model_path, target, bs, tuple(x.shape[1:]), threads)
    x = np.ascontiguousarray(x, dtype=sess.input_dtype)
    outs = []
    for start in range(0, len(x), bs):
        chunk = x[start : start + bs]
        n = len(chunk)
        if n < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - n, *x.shape[1:]), dtype=x.dtype)])
        outs.append(np.asarray(sess.run(chunk))[:n])
    return np.concatenate(outs)


def default_threads() -> int:
    """Thread count measurements use unless told otherwise (physical cores available)."""
    return physical_cores()


__all__ = [
    "LatencyResult",
    "Session",
    "default_threads",
    "measure",
    "open_session",
    "predict",
    "time_session",
]
