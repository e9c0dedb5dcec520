"""OpenVINO IR conversion and compilation with a pinned inference precision.

On CPUs with bf16 support (AVX512-BF16, AMX) the OpenVINO CPU plugin's default
``INFERENCE_PRECISION_HINT`` is bf16, so an "FP32" model silently runs in bf16. nasforge always
compiles with an explicit hint (``f32`` by default) and reports the precision that was used.
For INT8 (QDQ) models the hint governs the layers that stay in floating point; the quantized
Conv/MatMul run in INT8 either way (see :func:`runtime_precisions`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import openvino as ov

from nasforge.errors import ModelFileError

#: Hint values accepted by :func:`compile_model`; None keeps the plugin default.
PRECISIONS = ("f32", "bf16", "f16")


def _core() -> ov.Core:
    return ov.Core()


def to_openvino_ir(
    onnx_path: str | os.PathLike[str],
    xml_path: str | os.PathLike[str],
    compress_to_fp16: bool = False,
) -> Path:
    """Convert an ONNX model to OpenVINO IR (``.xml`` + ``.bin``), written atomically.

    Args:
        onnx_path: the ONNX model (FP32 or QDQ INT8).
        xml_path: the ``.xml`` to write; the ``.bin`` goes beside it.
        compress_to_fp16: store float weights as fp16 (False keeps FP32 weights, as the FP32
            baseline needs; QDQ INT8 weights are stored as int8 regardless).

    Returns:
        The ``.xml`` path.

    Raises:
        ModelFileError: the ONNX file is missing, truncated or not convertible.
    """
    from nasforge.export.onnx import load_onnx

    onnx_path, xml_path = Path(onnx_path), Path(xml_path)
    load_onnx(onnx_path)  # one-line ModelFileError on a damaged file
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{onnx_path}: OpenVINO cannot convert it ({first})") from exc
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{xml_path.stem}.", dir=xml_path.parent))
    try:
        tmp_xml = tmpdir / xml_path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
        # bin first: the xml appearing is the signal that the IR is complete
        os.replace(tmp_xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(tmp_xml, xml_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return xml_path


def compile_model(
    model_path: str | os.PathLike[str],
    precision: str | None = "f32",
    threads: int | None = None,
    performance_hint: str | None = None,
    device: str = "CPU",
) -> ov.CompiledModel:
    """Compile an ONNX or IR model on the OpenVINO CPU plugin with a pinned precision.

    Args:
        model_path: ``.onnx`` or ``.xml``.
        precision: ``INFERENCE_PRECISION_HINT`` (``"f32"`` default; None = plugin default).
        threads: ``INFERENCE_NUM_THREADS`` (None = plugin default).
        performance_hint: ``"LATENCY"`` or ``"THROUGHPUT"`` (None = plugin default).
        device: OpenVINO device name.

    Raises:
        ModelFileError: the file is missing or OpenVINO cannot read it.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: model file not found")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, not {precision!r}")
    config: dict[str, Any] = {}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if performance_hint is not None:
        config["PERFORMANCE_HINT"] = performance_hint
    core = _core()
    try:
        model = core.read_model(str(model_path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{model_path}: OpenVINO cannot read it ({first})") from exc
    return core.compile_model(model, device, config)


def compiled_precision(compiled: ov.CompiledModel) -> str:
    """Return the inference precision hint the compiled model actually uses (e.g. ``"f32"``)."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return str(getattr(value, "to_string", lambda: value)()).replace("<Type: '", "").rstrip("'>")


def runtime_precisions(compiled: ov.CompiledModel) -> dict[str, int]:
    """Count the executed layers by runtime precision (``u8``/``i8`` means INT8 kernels ran)."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "runtimePrecision" in info:
            counts[str(info["runtimePrecision"].astype(str))] += 1
    return dict(counts)


def runtime_layer_types(compiled: ov.CompiledModel) -> dict[str, str]:
    """Map each executed Convolution/FullyConnected layer to its runtime precision."""
    out: dict[str, str] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].astype(str)) if "layerType" in info else ""
        if layer in ("Convolution", "FullyConnected") and "runtimePrecision" in info:
            out[op.get_friendly_name()] = str(info["runtimePrecision"].astype(str))
    return out
