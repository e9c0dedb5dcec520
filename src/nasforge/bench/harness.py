"""The one measurement harness: "time this model on this target".

Used by the benchmark stage, by latency-table profiling and by the latency-predictor benchmark, so
every latency in nasforge is measured the same way:

* one inference session per runtime with the thread count fixed (ONNX Runtime
  ``intra_op_num_threads``; OpenVINO ``INFERENCE_NUM_THREADS`` with ``PERFORMANCE_HINT=LATENCY``);
* OpenVINO pinned to ``INFERENCE_PRECISION_HINT=f32`` (CPUs with BF16/FP16 otherwise silently run
  reduced precision) and the precision it really executed read back from the compiled model;
* ``warmup`` untimed runs, then ``repeats`` individually timed runs on a fixed random input;
  p50/p90/p99/mean and throughput from those;
* peak resident memory measured with the kernel's high-water mark (``VmHWM``, reset before the
  session is built), plus the session's own increment over the RSS before it was built.

GPU runtimes (``onnxruntime-cuda``, ``tensorrt-gpu``) go through ONNX Runtime's CUDA / TensorRT
execution providers; they need ``onnxruntime-gpu`` and an NVIDIA GPU.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nasforge import progress
from nasforge.bench.sysinfo import physical_cores, system_info
from nasforge.errors import ModelFileError, TargetError

if TYPE_CHECKING:
    from nasforge.hardware.targets import Target

_ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
# OpenVINO runtime-model layer types that only move or hold data: left out of "executed precision".
_OV_NON_COMPUTE = {"Input", "Output", "Const", "Reorder", "Reshape", "Parameter", "Result"}
_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


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
            Runtime ``"fp32"`` or ``"int8+fp32"`` (QDQ kernels).
        peak_rss_bytes: Process resident-memory high-water mark while the session was built and
            run (includes the Python interpreter and runtime libraries).
        session_rss_bytes: Peak RSS minus RSS just before the session was built: the memory the
            session itself needed.
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        runtime_version: Version of that runtime.
        device: ``"cpu"``, ``"cuda"`` or ``"tensorrt"``.
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


def _check_model_file(model_path: Path) -> None:
    if not model_path.is_file():
        raise ModelFileError(f"model file not found: {model_path}")
    if model_path.stat().st_size == 0:
        raise ModelFileError(f"model file is empty: {model_path}")
    if model_path.suffix == ".xml" and not model_path.with_suffix(".bin").is_file():
        raise ModelFileError(f"OpenVINO IR {model_path} has no weights file {model_path.stem}.bin")


def _onnx_is_quantized(model_path: Path) -> bool:
    """True if an ONNX graph holds quantization ops (QDQ or QLinear*)."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / various on corrupt files
        raise ModelFileError(f"cannot read ONNX model {model_path}: {_first_line(e)}") from e
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"})


def _first_line(e: BaseException) -> str:
    """The informative first line of a runtime's (often multi-line) error message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # OpenVINO prefixes messages with source locations ("Exception from src/...:84:").
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    text = (useful or lines or [type(e).__name__])[0]
    return text[:300]


@dataclasses.dataclass
class Session:
    """A ready-to-run inference session on one runtime with a fixed input shape.

    Attributes:
        run: Call with a batch (numpy, shape ``input_shape``) and get the first output.
        input_shape: Full input shape including batch.
        input_dtype: Numpy dtype of the input.
        precision: ``"fp32"`` or ``"int8"`` (from the graph).
        executed_precision: What the runtime executes (see :class:`LatencyResult`).
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        runtime_version: Version string.
    """

    run: Callable[[np.ndarray], np.ndarray]
    input_shape: tuple[int, ...]
    input_dtype: Any
    precision: str
    executed_precision: str
    runtime: str
    runtime_version: str


def _resolve_shape(
    model_shape: list[Any], batch_size: int, input_shape: tuple[int, ...] | None, path: Path
) -> tuple[int, ...]:
    """Full static input shape from the model's (possibly symbolic) shape and the request."""
    if input_shape is not None:
        shape = (batch_size, *(int(d) for d in input_shape))
        if len(model_shape) and len(model_shape) != len(shape):
            raise ModelFileError(
                f"{path}: model input has rank {len(model_shape)}, requested shape {shape}"
            )
        return shape
    rest = model_shape[1:]
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise ModelFileError(
            f"{path}: input shape {model_shape} is not static beyond the batch dimension; "
            "pass input_shape"
        )
    return (batch_size, *rest)


def _ort_session(
    model_path: Path,
    device: str,
    batch_size: int,
    input_shape: tuple[int, ...] | None,
    threads: int,
) -> Session:
    import onnxruntime as ort

    if model_path.suffix == ".xml":
        raise ModelFileError(f"ONNX Runtime cannot read OpenVINO IR {model_path}; pass the .onnx")
    quantized = _onnx_is_quantized(model_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers = _ORT_PROVIDERS[device]
    if providers[0] not in ort.get_available_providers():
        raise TargetError(
            f"ONNX Runtime here has no {providers[0]} (install onnxruntime-gpu on an NVIDIA host)"
        )
    try:
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
    except Exception as e:  # ORT raises InvalidProtobuf / Fail / InvalidGraph
        raise ModelFileError(f"cannot load {model_path} in ONNX Runtime: {_first_line(e)}") from e
    inp = sess.get_inputs()[0]
    model_shape = list(inp.shape)
    shape = _resolve_shape(model_shape, batch_size, input_shape, model_path)
    if model_shape and isinstance(model_shape[0], int) and model_shape[0] != batch_size:
        raise ModelFileError(
            f"{model_path}: batch dimension is fixed to {model_shape[0]}; export it with a "
            f"dynamic batch to run batch {batch_size}"
        )
    name = inp.name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: x})[0]

    return Session(
        run=run,
        input_shape=shape,
        input_dtype=_ONNX_DTYPES.get(inp.type, np.float32),
        precision="int8" if quantized else "fp32",
        executed_precision="int8+fp32" if quantized else "fp32",
        runtime="onnxruntime",
        runtime_version=ort.__version__,
    )


def _ov_executed_precision(compiled: Any) -> str:
    """Element types the compiled OpenVINO model's compute layers really run in."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "runtimePrecision" not in info or "layerType" not in info:
            continue
        if info["layerType"].astype(str) in _OV_NON_COMPUTE:
            continue
        prec = info["runtimePrecision"].astype(str)
        counts[prec] = counts.get(prec, 0) + 1
    if not counts:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return "+".join(p for p, _ in sorted(counts.items(), key=lambda kv: -kv[1]))


def _ov_session(
    model_path: Path, batch_size: int, input_shape: tuple[int, ...] | None, threads: int
) -> Session:
    import openvino as ov

    # Parse ONNX with onnx first: a clean error for corrupt files, and OpenVINO does not then
    # probe every frontend (the TF frontend logs parse errors to stderr).
    onnx_quantized = model_path.suffix == ".onnx" and _onnx_is_quantized(model_path)
    core = ov.Core()
    try:
        model = core.read_model(str(model_path))
    except Exception as e:  # OpenVINO raises RuntimeError with a multi-line message
        raise ModelFileError(f"cannot load {model_path} in OpenVINO: {_first_line(e)}") from e
    quantized = onnx_quantized or any(
        op.get_type_name() == "FakeQuantize" for op in model.get_ops()
    )
    port = model.inputs[0]
    pshape = port.get_partial_shape()
    model_shape = [d.get_length() if d.is_static else -1 for d in pshape]
    shape = _resolve_shape(model_shape, batch_size, input_shape, model_path)
    # A static shape lets the CPU plugin pick its best kernels; what we time is what we deploy.
    model.reshape({port: ov.PartialShape(list(shape))})
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    try:
        compiled = core.compile_model(model, "CPU", config)
    except Exception as e:
        raise ModelFileError(f"OpenVINO cannot compile {model_path}: {_first_line(e)}") from e
    request = compiled.create_infer_request()
    dtype = port.get_element_type().to_dtype()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()

    return Session(
        run=run,
        input_shape=shape,
        input_dtype=dtype,
        precision="int8" if quantized else "fp32",
        executed_precision=_ov_executed_precision(compiled),
        runtime="openvino",
        runtime_version=ov.__version__,
    )


def open_session(
    model_path: Path | str,
    target: Target | str,
    batch_size: int = 1,
    input_shape: tuple[int, ...] | None = None,
    threads: int | None = None,
) -> Session:
    """Build an inference session for a model on a runtime target.

    Args:
        model_path: ``.onnx`` (both runtimes) or OpenVINO IR ``.xml`` (OpenVINO only).
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
    from nasforge.hardware.targets import get_target

    tgt = get_target(target) if isinstance(target, str) else target
    if tgt.kind != "runtime":
        raise TargetError(f"target '{tgt.name}' is a latency table; it cannot run models")
    tgt.check_available()
    model_path = Path(model_path)
    _check_model_file(model_path)
    threads = int(threads) if threads else physical_cores()
    if tgt.runtime == "openvino":
        sess = _ov_session(model_path, batch_size, input_shape, threads)
    elif tgt.runtime == "onnxruntime":
        sess = _ort_session(model_path, tgt.device, batch_size, input_shape, threads)
    else:
        raise TargetError(f"target '{tgt.name}': unsupported runtime '{tgt.runtime}'")
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
        model_path: ``.onnx`` or OpenVINO ``.xml`` file.
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
    from nasforge.hardware.targets import get_target

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
        model_path: ``.onnx`` or OpenVINO ``.xml`` file.
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
