"""Memory model: parameter bytes per precision, analytic peak activation memory, measured RSS.

* Parameter bytes: parameter count x bytes per element of the precision (fp32 4, fp16/bf16 2,
  int8 1; INT8 scales/zero-points are per output channel and counted separately).
* Peak activation memory is computed from the ONNX graph: shapes come from ONNX shape inference
  at the requested batch size; nodes run in graph (topological) order; a tensor is live from the
  node that produces it (or from the start, for the graph input) until its last consumer ran;
  the peak of the live bytes is the answer. This is what a runtime without in-place reuse needs;
  runtimes that reuse buffers in place need at most this.
* Measured peak RSS comes from the harness (:class:`nasforge.bench.harness.LatencyResult`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.errors import ModelFileError

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Memory of one model at one batch size.

    Attributes:
        param_count: Number of weights (ONNX initializers of float type, or module parameters).
        param_bytes: ``{precision: bytes}`` for fp32, fp16, int8.
        peak_activation_bytes: Analytic peak of live activations (see module docstring).
        batch_size: Batch size of the activation figure.
        measured_peak_rss_bytes: Peak RSS measured by the harness, if given.
        measured_session_rss_bytes: RSS increment of the runtime session, if given.
    """

    param_count: int
    param_bytes: dict[str, int]
    peak_activation_bytes: int
    batch_size: int
    measured_peak_rss_bytes: int | None = None
    measured_session_rss_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return dataclasses.asdict(self)


def param_bytes(param_count: int, channel_count: int = 0) -> dict[str, int]:
    """Bytes of ``param_count`` weights per precision.

    Args:
        param_count: Number of weights.
        channel_count: Output channels of quantized layers: INT8 adds a fp32 scale and an int8
            zero-point per channel.
    """
    out = {p: param_count * b for p, b in BYTES_PER_ELEMENT.items()}
    out["int8"] += channel_count * 5
    return out


def module_param_count(module: Any) -> int:
    """Parameters of a torch module (all, trainable or not)."""
    return int(sum(p.numel() for p in module.parameters()))


def _onnx_elem_size(elem_type: int) -> int:
    from onnx import helper

    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError):
        return 4


def _load_with_batch(model_path: Path, batch_size: int) -> Any:
    import onnx

    try:
        model = onnx.load(str(model_path))
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {model_path}") from None
    except Exception as e:
        raise ModelFileError(f"cannot read ONNX model {model_path}: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].Clear()
            dims[0].dim_value = batch_size
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise ModelFileError(f"ONNX shape inference failed on {model_path}: {e}") from e


def peak_activation_bytes(model_path: Path | str, batch_size: int = 1) -> int:
    """Analytic peak activation memory of an ONNX model at ``batch_size``.

    Raises:
        ModelFileError: Missing or unreadable model, or shapes that inference cannot resolve.
    """
    model = _load_with_batch(Path(model_path), batch_size)
    g = model.graph
    inits = {i.name for i in g.initializer}
    sizes: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None for d in dims):
            continue
        sizes[vi.name] = int(np.prod(dims, dtype=np.int64)) * _onnx_elem_size(tt.elem_type)
    last_use: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for name in node.input:
            last_use[name] = i
    outputs = {o.name for o in g.output}
    live: dict[str, int] = {i.name: sizes.get(i.name, 0) for i in g.input if i.name not in inits}
    peak = sum(live.values())
    for i, node in enumerate(g.node):
        if node.op_type in ("Constant",):
            continue
        for name in node.output:
            if name:
                live[name] = sizes.get(name, 0)
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if name not in outputs and last_use.get(name, -1) <= i:
                del live[name]
    return int(peak)


def onnx_param_count(model_path: Path | str) -> tuple[int, int]:
    """(weights, output channels of conv/gemm weights) of an ONNX model's float initializers."""
    import onnx

    model = onnx.load(str(model_path))
    count, channels = 0, 0
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for init in model.graph.initializer:
        if init.data_type in float_types or init.data_type == onnx.TensorProto.INT8:
            n = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
            count += n
            if len(init.dims) >= 2:
                channels += int(init.dims[0])
    return count, channels


def memory_report(
    model_path: Path | str, batch_size: int = 1, latency: Any | None = None
) -> MemoryReport:
    """Memory of an ONNX model: parameters per precision, analytic activations, measured RSS.

    Args:
        model_path: ``.onnx`` file.
        batch_size: Batch size for activations.
        latency: Optional :class:`~nasforge.bench.harness.LatencyResult` with measured RSS.
    """
    count, channels = onnx_param_count(model_path)
    return MemoryReport(
        param_count=count,
        param_bytes=param_bytes(count, channels),
        peak_activation_bytes=peak_activation_bytes(model_path, batch_size),
        batch_size=batch_size,
        measured_peak_rss_bytes=getattr(latency, "peak_rss_bytes", None),
        measured_session_rss_bytes=getattr(latency, "session_rss_bytes", None),
    )
