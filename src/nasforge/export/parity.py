"""Numerical parity between a torch model and its exported form, on any runtime.

The export stage checks every file of the bundle on the test split against its torch model
(FP32 files vs the float model, INT8 QDQ files vs the converted quantize/dequantize model, a
runtime's own INT8 scheme vs its own converted model) through the runtime's
:meth:`~nasforge.runtimes.base.Runtime.parity`. The bar is >= 99% top-1 agreement by default
(:data:`PARITY_TOP1`; the pipeline's is ``export.parity_min_top1``), and promotion rejects a
model below it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasforge.runtimes.registry import get_runtime

PARITY_TOP1 = 0.99


def runtime_runner(
    model_path: str | os.PathLike[str],
    runtime: str = "onnxruntime",
    ov_precision: str | None = "f32",
    threads: int | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """Return ``f(x: ndarray) -> logits ndarray`` running the model in the given runtime.

    Args:
        model_path: A file the runtime loads.
        runtime: A registered runtime's name.
        ov_precision: OpenVINO's inference precision hint (``f32`` so FP32 is really FP32).
        threads: Runtime threads (None = the runtime's default).

    Raises:
        ModelFileError: Missing or unloadable file.
        TargetError: Unknown runtime.
    """
    options = {"inference_precision": ov_precision}
    return get_runtime(runtime).runner(Path(model_path), threads, options=options)


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
        model_path: a file the runtime loads (``.onnx``, OpenVINO ``.xml``, ExecuTorch ``.pte``).
        x: inputs, NCHW float32 (the test split).
        runtime: a registered runtime's name (``"onnxruntime"``, ``"openvino"``, ...).
        batch_size: inference batch size (the last batch is smaller: dynamic batch is exercised).
        ov_precision: OpenVINO inference precision hint (f32 so FP32 is really FP32).
        threads: runtime threads (None = runtime default).
        min_top1: top-1 agreement needed to pass.

    Returns:
        ``{"top1_agreement", "max_abs_diff", "n", "runtime", "passed", "min_top1"}``;
        ``passed`` is ``top1_agreement >= min_top1``.
    """
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return get_runtime(runtime).parity(
        torch_fn,
        Path(model_path),
        x,
        batch_size=batch_size,
        threads=threads,
        min_top1=min_top1,
        options={"inference_precision": ov_precision},
    )
