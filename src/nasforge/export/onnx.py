"""ONNX export: FP32 and INT8 (QDQ) graphs with a dynamic batch dimension.

Both go through ``torch.onnx.export(dynamo=True)``: the FP32 path exports the ``nn.Module``; the
INT8 path exports the pt2e-converted program from :mod:`nasforge.compress.qat`, whose
``quantized_decomposed`` quantize/dequantize ops become ONNX ``QuantizeLinear``/
``DequantizeLinear`` pairs around Conv/Gemm, the explicit-QDQ form that ONNX Runtime, OpenVINO
and TensorRT execute in INT8.

Every file is written to a temporary name in the target folder, checked with ``onnx.checker``
and renamed into place, so a failed export never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule

from nasforge.atomic import atomic_file
from nasforge.errors import ModelFileError

DEFAULT_OPSET = 18
BATCH_DIM_NAME = "batch"
_MAX_BATCH = 1 << 16
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    with atomic_file(path, suffix=suffix or ".tmp") as tmp:
        yield tmp


def load_onnx(path: str | os.PathLike[str], full_check: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX file.

    Raises:
        ModelFileError: the file is missing, truncated or not a valid ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=full_check)
    except Exception as exc:  # protobuf DecodeError, checker errors: a damaged or foreign file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: invalid ONNX model ({type(exc).__name__}: {first})") from exc
    return model


def op_counts(model: onnx.ModelProto | str | os.PathLike[str]) -> dict[str, int]:
    """Return how many nodes of each op type the (top-level) graph has."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model, full_check=False)
    return dict(Counter(node.op_type for node in model.graph.node))


def _dynamic_shapes() -> tuple[dict[int, Any]]:
    return ({0: Dim(BATCH_DIM_NAME, min=1, max=_MAX_BATCH)},)


def _example(example_input: torch.Tensor) -> torch.Tensor:
    x = example_input.detach().to(torch.float32)
    if x.shape[0] < 2:  # a batch of 1 would be specialized by torch.export
        x = torch.cat([x, x], dim=0)
    return x[:8].clone().contiguous()


def _rename_dim(model: onnx.ModelProto, old: str, new: str) -> None:
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = new


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (FX node text, class paths, stack traces).

    It is often larger than the weights of a small model (measured: 164 KB -> 98 KB for an INT8
    ResNet-8 of 80 KB of weights) and records local source paths. Intermediate ``value_info``
    shapes go too. The computation graph is unchanged.
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    # intermediate shapes: both runtimes infer them at load; inputs/outputs keep theirs
    del model.graph.value_info[:]
    for value in (*model.graph.input, *model.graph.output):
        del value.metadata_props[:]
        value.doc_string = ""


def _save_checked(program: Any, path: Path, require_qdq: bool) -> Path:
    with atomic_output(path, suffix=".onnx") as tmp:
        # external_data=False: one self-contained file (our models are far below protobuf's 2 GB)
        program.save(str(tmp), external_data=False)
        model = onnx.load(str(tmp))
        dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise RuntimeError(f"ONNX export lost the dynamic batch dimension ({dim})")
        if dim.dim_param != BATCH_DIM_NAME:
            # a reloaded ExportedProgram names it after its symbol (s77): give it a stable name
            _rename_dim(model, dim.dim_param, BATCH_DIM_NAME)
        _strip_debug_info(model)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
        if require_qdq:
            counts = Counter(n.op_type for n in model.graph.node)
            if not all(counts.get(op) for op in QDQ_OPS):
                raise RuntimeError(f"INT8 export has no QuantizeLinear/DequantizeLinear: {counts}")
    return path


def _quiet_onnx_export(*args: Any, **kwargs: Any) -> Any:
    # the exporter logs a warning per missing torchvision op; they do not concern our models
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return torch.onnx.export(*args, dynamo=True, verbose=False, **kwargs)
    finally:
        logger.setLevel(level)


def export_fp32(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export a float model to ONNX with a dynamic batch dimension (atomic write).

    BatchNorm is left to the runtimes, which fold it into the preceding Conv when the
    session is built (see :mod:`nasforge.compress.transform` for the measurement).

    Args:
        model: the float model; it is put in eval mode.
        example_input: a batch of inputs (NCHW float32).
        path: the ``.onnx`` file to write.
        opset: ONNX opset (>= 18).

    Returns:
        The path written.
    """
    model = model.eval()
    with torch.no_grad():
        program = _quiet_onnx_export(
            model, (_example(example_input),), dynamic_shapes=_dynamic_shapes(), opset_version=opset
        )
    return _save_checked(program, Path(path), require_qdq=False)


def export_int8(
    quantized: GraphModule | ExportedProgram | str | os.PathLike[str],
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export a pt2e-converted INT8 model to a QDQ ONNX graph with a dynamic batch (atomic write).

    Args:
        quantized: the converted GraphModule, its ExportedProgram, or a ``.pt2`` path written by
            :func:`nasforge.compress.qat.save_quantized`.
        example_input: a batch of inputs (NCHW float32).
        path: the ``.onnx`` file to write.
        opset: ONNX opset (>= 18).

    Returns:
        The path written.

    Raises:
        ModelFileError: ``quantized`` is a path to a missing, truncated or corrupt file.
    """
    from nasforge.compress.qat import load_quantized, to_exported_program

    if isinstance(quantized, (str, os.PathLike)):
        quantized = load_quantized(quantized)
    ep = to_exported_program(quantized, _example(example_input))
    program = _quiet_onnx_export(ep, opset_version=opset)
    return _save_checked(program, Path(path), require_qdq=True)
