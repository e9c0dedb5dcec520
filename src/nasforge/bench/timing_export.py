"""Export a torch module to ONNX for timing (block micro-models, search-time measurements).

This is not the deployment export (``nasforge.export.onnx``): it only needs a graph with the same
operators the deployed one has. Two exporters:

* ``"dynamo"``: ``torch.onnx.export(dynamo=True)``, what the export stage ships (~3 s a model);
* ``"torchscript"``: the TorchScript exporter, ~40x faster; used for block micro-models and for
  quick search-time measurements. Falls back to ``dynamo`` if this torch no longer has it.

The batch dimension is always dynamic so one file serves every batch size.

``precision="int8"`` makes a quickly calibrated post-training INT8 copy of the export
(:func:`quantize_for_timing`): ONNX Runtime static quantization to QDQ, laid out like the
pipeline's deployed INT8 models (see there), so search can time what it will ship.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nasforge.atomic import give_default_mode

Exporter = Literal["dynamo", "torchscript"]
Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8")

#: How :func:`quantize_for_timing` quantizes (recorded with tables and benchmark results).
QUANTIZATION: dict[str, Any] = {
    "method": "onnxruntime.quantization.quantize_static (PTQ)",
    "format": "QDQ",
    "activations": "uint8 asymmetric per-tensor",
    "weights": "int8 symmetric per-channel (axis 0)",
    "op_types": ["Conv", "Gemm", "MatMul"],
    "calibration": "MinMax on random normal batches (latency does not depend on the values)",
    "layout": "deployed: Conv output float before Relu/Clip and where it feeds several "
    "non-conv ops; Gemm/MatMul output float (nasforge.compress.qat.RuntimeX86Quantizer)",
}


@contextlib.contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (exports trace a forward pass).

    On a busy machine torch's multi-threaded CPU kernels spin-wait at barriers: one traced
    forward of a small block measured 0.4 s with 2 threads and 4 ms with 1 here, which made
    exporting the blocks of a space the slowest part of building its table.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    precision: Precision = "fp32",
    calibration: np.ndarray | None = None,
) -> Path:
    """Export ``module`` (in eval mode) to ONNX with a dynamic batch dimension.

    Args:
        module: The network or block.
        input_shape: Input shape without batch, e.g. ``(16, 8, 8)``.
        path: Output ``.onnx`` file; written atomically.
        exporter: ``"torchscript"`` (fast) or ``"dynamo"`` (as deployed).
        precision: ``"fp32"``, or ``"int8"``: the export is then quantized by
            :func:`quantize_for_timing` (QDQ, as the pipeline deploys INT8 models).
        calibration: INT8 only: calibration inputs ``(N, *input_shape)`` (default: random).

    Returns:
        ``path``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    path = Path(path)
    if precision == "int8":
        fd, fp32 = tempfile.mkstemp(suffix=".fp32.onnx", dir=path.parent)
        os.close(fd)
        try:
            export_for_timing(module, input_shape, fp32, exporter)
            return quantize_for_timing(fp32, path, input_shape, calibration)
        finally:
            os.unlink(fp32)
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
        give_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _inline_shared_initializers(model: Any) -> None:
    """Give every ``Identity(initializer)`` output its own initializer copy.

    The TorchScript exporter de-duplicates equal constants (the all-zero biases of freshly
    initialised, BN-folded convs) and feeds them through ``Identity`` nodes. The quantizer then
    leaves those biases float ("Expected bias ... to be an initializer") and ONNX Runtime cannot
    fuse the conv to ``QLinearConv`` (measured: 2-3x slower than the deployed INT8 graph).
    """
    import onnx

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


_ACTIVATIONS = ("Relu", "Clip")
_QUANTIZED_CONSUMERS = ("Conv", "Gemm", "MatMul")


def _match_deployed_layout(model: Any) -> int:
    """Drop the activation Q/DQ pairs ORT adds where the deployed INT8 graphs keep floats.

    The pipeline's INT8 models (torchao pt2e, ``RuntimeX86Quantizer``, exported by
    ``nasforge.export.onnx.export_int8``; checked on cell and macro networks, QAT and PTQ)
    quantize the inputs and weights of every Conv/Gemm, the output of a conv that feeds one
    non-activation op (a sum, another conv), and the output of Relu/Clip after a conv, which
    runtimes fuse into the conv. They leave float: a conv's output before its Relu/Clip, a conv
    output that fans out to several non-conv ops (the cell stem), and Gemm/MatMul outputs.
    ``quantize_static`` (asked for Conv, Gemm, MatMul, Relu and Clip, activations kept)
    quantizes the inputs and outputs of all of them; left so, ONNX Runtime runs e.g. the cell
    stem's pool as ``QLinearAveragePool`` (9 ms of a 35 ms INT8 network at batch 32, a kernel
    the deployed graph never runs). An activation Q/DQ pair is kept only where the deployed
    graphs have one: a Conv/Gemm/MatMul reads the tensor, or a conv made it and one op other
    than Relu/Clip reads it, or a Relu/Clip made it from a conv's output.

    Returns:
        Number of Q/DQ pairs removed.
    """
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def made_by(name: str) -> Any:
        """The producer of a tensor, looking through a Q/DQ pair."""
        n = producer.get(name)
        while n is not None and n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n = producer.get(n.input[0])
        return n

    drop: set[int] = set()
    rename: dict[str, str] = {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        tensor = q.input[0]
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        readers = [c for d in dqs for c in consumers.get(d.output[0], [])]
        readers += [c for c in consumers.get(tensor, []) if c is not q]
        src = producer.get(tensor)
        if src is None or any(r.op_type in _QUANTIZED_CONSUMERS for r in readers):
            continue
        if src.op_type == "Conv" and len(readers) == 1 and readers[0].op_type not in _ACTIVATIONS:
            continue  # a lone conv into a sum: quantized in the deployed graph
        if src.op_type in _ACTIVATIONS:
            before = made_by(src.input[0])
            if before is not None and before.op_type == "Conv":
                continue  # conv + Relu/Clip: the activation's output is quantized
        drop.add(id(q))
        for d in dqs:
            drop.add(id(d))
            rename[d.output[0]] = tensor
    if not drop:
        return 0
    keep = [n for n in graph.node if id(n) not in drop]
    for n in keep:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    for o in graph.output:
        if o.name in rename:  # a graph output read through Q/DQ: rename its producer instead
            src = producer[rename[o.name]]
            for k, out in enumerate(src.output):
                if out == rename[o.name]:
                    src.output[k] = o.name
            for n in keep:
                for k, i in enumerate(n.input):
                    if i == rename[o.name]:
                        n.input[k] = o.name
    del graph.node[:]
    graph.node.extend(keep)
    # The removed pairs' scales and zero points: unused initializers make runtimes warn.
    used = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return len(rename)


def quantize_for_timing(
    fp32_path: Path | str,
    path: Path | str,
    input_shape: tuple[int, ...],
    calibration: np.ndarray | None = None,
    batches: int = 2,
    batch_size: int = 4,
    seed: int = 0,
) -> Path:
    """A quickly calibrated INT8 (QDQ) copy of an FP32 ONNX export, for timing.

    ONNX Runtime static quantization (``quantize_static``: QDQ format, uint8 per-tensor
    activations, int8 symmetric per-channel weights, MinMax calibration) of the Conv, Gemm and
    MatMul nodes, then the activation quantization the deployed graphs do not have is removed
    (:func:`_match_deployed_layout`), so the file runs the same INT8 kernels in ONNX Runtime
    and OpenVINO as the pipeline's QAT export does. Latency does not depend on the weights or
    the calibrated ranges (only on which tensors are quantized), so random calibration batches
    are enough; pass real inputs to get meaningful outputs as well. 7-bit activations
    (``reduce_range`` on CPUs without VNNI) change ranges, not kernels, so are not simulated.

    Args:
        fp32_path: The FP32 ONNX file (e.g. from :func:`export_for_timing`).
        path: Output ``.onnx`` file; written atomically.
        input_shape: Input shape without batch.
        calibration: Calibration inputs ``(N, *input_shape)``; default ``batches`` random
            normal batches of ``batch_size``.
        batches: Random calibration batches (when ``calibration`` is None).
        batch_size: Samples per calibration batch.
        seed: Seed of the random batches.

    Returns:
        ``path``.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    path = Path(path)
    model = onnx.load(str(fp32_path))
    _inline_shared_initializers(model)
    name = model.graph.input[0].name
    if calibration is None:
        rng = np.random.default_rng(seed)
        data = [
            rng.standard_normal((batch_size, *input_shape)).astype(np.float32)
            for _ in range(max(1, batches))
        ]
    else:
        arr = np.asarray(calibration, dtype=np.float32)
        data = [arr[i : i + batch_size] for i in range(0, len(arr), batch_size)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(data)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {name: x}

    import onnxruntime

    # The calibrator's own ONNX Runtime session logs warnings (unused initializers of its
    # augmented graph) to stderr; the harness's sessions log errors only, so do the same.
    onnxruntime.set_default_logger_severity(3)
    root = logging.getLogger()  # quantize_static warns on the root logger
    level = root.level
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp, _quiet():
            root.setLevel(logging.ERROR)
            src = Path(tmp) / "fp32.onnx"
            onnx.save(model, str(src))
            out = Path(tmp) / "int8.onnx"
            quantize_static(
                str(src),
                str(out),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=[*_QUANTIZED_CONSUMERS, *_ACTIVATIONS],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "WeightSymmetric": True,
                    "ActivationSymmetric": False,
                    "QDQKeepRemovableActivations": True,
                    "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                },
            )
            qmodel = onnx.load(str(out))
            _match_deployed_layout(qmodel)
            onnx.save(qmodel, str(out))
            os.replace(out, path)
    finally:
        root.setLevel(level)
    return path
