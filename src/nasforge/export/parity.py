"""Numerical parity between a torch model and its exported ONNX / OpenVINO form.

The export stage calls :func:`check_parity` on the test split: FP32 ONNX vs the float torch
model, INT8 QDQ ONNX vs the converted (quantize/dequantize) torch model. The bar is >= 99% top-1
agreement by default (:data:`PARITY_TOP1`; the pipeline's is ``export.parity_min_top1``), and
promotion rejects a model below it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram

from nasforge.errors import ModelFileError

PARITY_TOP1 = 0.99
RUNTIMES = ("onnxruntime", "openvino")


def _torch_callable(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(model, ExportedProgram):
        return model.module()
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        model.eval()  # GraphModules from torch.export ignore .eval(); they are converted in eval
    return model


def onnxruntime_session(onnx_path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """Create an ONNX Runtime CPU session (one-line ModelFileError on a damaged file)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{onnx_path}: ONNX Runtime cannot load it ({first})") from exc


def runtime_runner(
    model_path: str | os.PathLike[str],
    runtime: str = "onnxruntime",
    ov_precision: str | None = "f32",
    threads: int | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """Return ``f(x: ndarray) -> logits ndarray`` running the model in the given runtime."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: model file not found")
    if runtime == "onnxruntime":
        sess = onnxruntime_session(model_path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    if runtime == "openvino":
        from nasforge.export.openvino import compile_model

        compiled = compile_model(model_path, precision=ov_precision, threads=threads)
        request = compiled.create_infer_request()
        out = compiled.output(0)
        return lambda x: np.asarray(request.infer([x])[out]).copy()
    raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")


def check_parity(
    torch_fn: Any,
    model_path: str | os.PathLike[str],
    x: np.ndarray | torch.Tensor,
    runtime: str = "onnxruntime",
    batch_size: int = 256,
    ov_precision: str | None = "f32",
    threads: int | None = None,
    min_top1: float = PARITY_TOP1,
) -> dict[str, Any]:
    """Compare a torch model with its exported form on inputs ``x``.

    Args:
        torch_fn: the reference: an ``nn.Module``, a converted GraphModule, an ExportedProgram
            or any callable ``Tensor -> Tensor`` returning logits.
        model_path: the ``.onnx`` (either runtime) or ``.xml`` (OpenVINO) file.
        x: inputs, NCHW float32 (the test split).
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        batch_size: inference batch size (the last batch is smaller: dynamic batch is exercised).
        ov_precision: OpenVINO inference precision hint (f32 so FP32 is really FP32).
        threads: runtime threads (None = runtime default).
        min_top1: top-1 agreement needed to pass.

    Returns:
        ``{"top1_agreement", "max_abs_diff", "n", "runtime", "passed", "min_top1"}``;
        ``passed`` is ``top1_agreement >= min_top1``.
    """
    fn = _torch_callable(torch_fn)
    run = runtime_runner(model_path, runtime, ov_precision, threads)
    xs = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    agree, max_diff = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(xs), batch_size):
            xb = xs[i : i + batch_size]
            ref = fn(torch.from_numpy(xb)).detach().cpu().numpy()
            got = run(xb)
            if got.shape != ref.shape:
                raise RuntimeError(f"output shape {got.shape} != torch output shape {ref.shape}")
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
    n = len(xs)
    top1 = agree / n if n else 0.0
    return {
        "top1_agreement": top1,
        "max_abs_diff": max_diff,
        "n": n,
        "runtime": runtime,
        "passed": bool(top1 >= min_top1),
        "min_top1": float(min_top1),
    }
