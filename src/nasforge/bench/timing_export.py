"""Export a torch module to ONNX for timing (block micro-models, search-time measurements).

This is not the deployment export (``nasforge.export.onnx``): it only needs a graph with the same
operators the deployed one has. Two exporters:

* ``"dynamo"``: ``torch.onnx.export(dynamo=True)``, what the export stage ships (~3 s a model);
* ``"torchscript"``: the TorchScript exporter, ~40x faster; used for block micro-models and for
  quick search-time measurements. Falls back to ``dynamo`` if this torch no longer has it.

The batch dimension is always dynamic so one file serves every batch size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch

Exporter = Literal["dynamo", "torchscript"]


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints and warnings (they go to stdout/stderr)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def export_for_timing(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    path: Path | str,
    exporter: Exporter = "torchscript",
) -> Path:
    """Export ``module`` (in eval mode) to ONNX with a dynamic batch dimension.

    Args:
        module: The network or block.
        input_shape: Input shape without batch, e.g. ``(16, 8, 8)``.
        path: Output ``.onnx`` file; written atomically.
        exporter: ``"torchscript"`` (fast) or ``"dynamo"`` (as deployed).

    Returns:
        ``path``.
    """
    path = Path(path)
    module = module.eval()
    example = (torch.randn(2, *input_shape),)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with _quiet(), torch.no_grad():
            if exporter == "torchscript":
                try:
                    torch.onnx.export(
                        module,
                        example,
                        tmp,
                        dynamo=False,
                        input_names=["x"],
                        output_names=["y"],
                        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                        opset_version=17,
                    )
                except (TypeError, RuntimeError, AttributeError):
                    exporter = "dynamo"
            if exporter == "dynamo":
                torch.onnx.export(
                    module,
                    example,
                    tmp,
                    dynamo=True,
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    verbose=False,
                )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
