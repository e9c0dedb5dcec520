"""TensorRT through ONNX Runtime's TensorRT execution provider, on an NVIDIA GPU.

It loads the bundle's ONNX graphs (TensorRT builds its engine from them when the session is
made, on the GPU it runs on), so it exports nothing of its own and carries ONNX Runtime's parity.
Only where an NVIDIA GPU and ``onnxruntime-gpu`` with the TensorRT provider exist; elsewhere
every use is a one-line "not available here", and search predicts its latency from a table
profiled on a GPU node. Triton serves it as the ONNX Runtime backend with TensorRT as GPU
execution accelerator. Target: ``tensorrt-gpu``.
"""

from __future__ import annotations

from nasforge.runtimes.base import TritonModel
from nasforge.runtimes.onnxruntime import OnnxRuntime, has_nvidia_gpu, ort_providers
from nasforge.runtimes.registry import register_runtime


@register_runtime
class TensorRt(OnnxRuntime):
    """ONNX Runtime's TensorRT execution provider (CUDA as fallback for unsupported nodes)."""

    name = "tensorrt"
    label = "TensorRT"
    packages = ("tensorrt",)
    targets = (("tensorrt-gpu", "cuda", "fp32"),)
    reads = "onnxruntime"
    exported_by_default = False
    triton = TritonModel(
        "onnxruntime",
        gpu=True,
        accelerator={
            "name": "tensorrt",
            "parameters": {"precision_mode": "FP32", "max_workspace_size_bytes": str(1 << 30)},
        },
    )
    providers = {
        "cuda": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    }

    def availability_problem(self, device: str = "cuda") -> str | None:
        if not has_nvidia_gpu() or "TensorrtExecutionProvider" not in ort_providers():
            return "no NVIDIA GPU / TensorRT found"
        return None

    def export_problem(self) -> str | None:
        return None  # it writes nothing: the bundle's ONNX graphs are its files
