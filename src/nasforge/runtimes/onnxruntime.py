"""ONNX Runtime: the base runtime. It owns the bundle's ONNX graphs, exported from torch.

* files: ``fp32.onnx`` (the float model) and ``int8.onnx`` (the QAT program as a QDQ graph), both
  with a dynamic batch (:mod:`nasforge.export.onnx`); every other runtime converts or sits
  beside them;
* sessions: the CPU execution provider, or CUDA on an NVIDIA GPU (``onnxruntime-gpu``), with
  ``intra_op_num_threads`` fixed, one inter-op thread, sequential execution, all graph
  optimizations;
* targets: ``onnxruntime-cpu``, ``onnxruntime-cpu-int8``, ``onnxruntime-cuda``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from nasforge.errors import ModelFileError, TargetError
from nasforge.runtimes.base import (
    ONNX_DTYPES,
    Exported,
    ExportSources,
    Runtime,
    Session,
    TritonModel,
    first_line,
    onnx_is_quantized,
    resolve_shape,
)
from nasforge.runtimes.registry import register_runtime

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def has_nvidia_gpu() -> bool:
    """True if an NVIDIA GPU and its driver are visible here."""
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir():
        return True
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidiactl").exists()


def ort_providers() -> list[str]:
    """Execution providers of the installed ONNX Runtime (empty if none is installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def ort_session(
    path: Path, providers: list[str], threads: int | None, label: str = "ONNX Runtime"
) -> Any:
    """An ``InferenceSession`` with nasforge's settings (one-line ModelFileError on a bad file)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if providers[0] not in ort.get_available_providers():
        raise TargetError(
            f"ONNX Runtime here has no {providers[0]} (install onnxruntime-gpu on an NVIDIA host)"
        )
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # ORT raises InvalidProtobuf / Fail / InvalidGraph
        raise ModelFileError(f"cannot load {path} in {label}: {first_line(e)}") from e


@register_runtime
class OnnxRuntime(Runtime):
    """ONNX Runtime on the CPU or CUDA execution provider."""

    name = "onnxruntime"
    label = "ONNX Runtime"
    file_kind = "ONNX model"
    packages = ("onnxruntime", "onnxruntime-gpu")
    suffixes = (".onnx",)
    targets = (
        ("onnxruntime-cpu", "cpu", "fp32"),
        ("onnxruntime-cpu-int8", "cpu", "int8"),
        ("onnxruntime-cuda", "cuda", "fp32"),
    )
    exported_by_default = True
    triton = TritonModel("onnxruntime")
    providers: ClassVar[dict[str, list[str]]] = PROVIDERS

    def availability_problem(self, device: str = "cpu") -> str | None:
        providers = ort_providers()
        if device == "cpu":
            return None if "CPUExecutionProvider" in providers else "onnxruntime not installed"
        if device not in self.providers:
            return f"ONNX Runtime has no device '{device}'"
        if not has_nvidia_gpu():
            return "no NVIDIA GPU found"
        if self.providers[device][0] not in providers:
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        return None

    def layout(self, precision: str) -> str:
        return f"{precision}.onnx"

    def export(self, sources: ExportSources, precision: str, bundle: Path) -> Exported:
        """The bundle's ONNX graph of ``precision``, exported from torch (dynamic batch)."""
        from nasforge.export.onnx import export_fp32, export_int8

        path = Path(bundle) / self.layout(precision)
        if precision == "fp32":
            export_fp32(sources.fp32, sources.example, path)
        else:
            export_int8(sources.int8, sources.example, path)
        return Exported(path)

    def open_session(
        self,
        path: Path,
        device: str,
        batch_size: int,
        input_shape: tuple[int, ...] | None,
        threads: int,
    ) -> Session:
        import onnxruntime as ort

        quantized = onnx_is_quantized(path)
        sess = ort_session(path, self.providers[device], threads, self.label)
        inp = sess.get_inputs()[0]
        model_shape = list(inp.shape)
        shape = resolve_shape(model_shape, batch_size, input_shape, path)
        if model_shape and isinstance(model_shape[0], int) and model_shape[0] != batch_size:
            raise ModelFileError(
                f"{path}: batch dimension is fixed to {model_shape[0]}; export it with a "
                f"dynamic batch to run batch {batch_size}"
            )
        name = inp.name

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: x})[0]

        return Session(
            run=run,
            input_shape=shape,
            input_dtype=ONNX_DTYPES.get(inp.type, np.float32),
            precision="int8" if quantized else "fp32",
            executed_precision="int8+fp32" if quantized else "fp32",
            runtime=self.name,
            runtime_version=ort.__version__,
            dynamic_batch=not (model_shape and isinstance(model_shape[0], int)),
        )

    def runner(
        self,
        path: Path,
        threads: int | None = None,
        all_outputs: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> Callable[[np.ndarray], Any]:
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        sess = ort_session(path, PROVIDERS["cpu"], threads, self.label)
        name = sess.get_inputs()[0].name
        if all_outputs:
            return lambda x: sess.run(None, {name: x})
        return lambda x: sess.run(None, {name: x})[0]
