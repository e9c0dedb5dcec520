"""INT8 quantization with torchao pt2e: quantization-aware training (QAT) and post-training (PTQ).

The flow is the one torchao documents for x86 CPUs::

    torch.export.export(model, example, dynamic_shapes=batch)   # ATen graph, dynamic batch
    prepare_qat_pt2e(gm, X86InductorQuantizer(is_qat=True))     # fake-quant + simulated conv-BN fold
    ... fine-tune ...
    convert_pt2e(prepared)                                      # quantize/dequantize ops

The converted graph holds ``quantized_decomposed`` quantize/dequantize ops, which
``torch.onnx.export(dynamo=True)`` turns into ONNX QuantizeLinear/DequantizeLinear (QDQ), so the
same file runs in INT8 in ONNX Runtime and OpenVINO (see :mod:`nasforge.export.onnx`).

This module is the flow (prepare, fine-tune, convert; PTQ). Its neighbours hold the other jobs,
and their public names are importable from here too:

* :mod:`nasforge.compress.quant_scheme`: VNNI detection (7-bit activations where it is missing),
  :class:`QuantScheme`, the x86 quantizer;
* :mod:`nasforge.compress.quant_archive`: the ``.pt2`` archive between the qat and export stages
  (:func:`save_quantized`, and :func:`load_quantized`, which validates it first);
* :mod:`nasforge.compress.pattern_capture`: torchao's pattern capture, made fast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e import (
    disable_observer,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

from nasforge.checkpoint import EpochCheckpoint
from nasforge.compress.pattern_capture import (  # _capture_pattern: tests check it is patched in
    _capture_pattern as _capture_pattern,
)
from nasforge.compress.pattern_capture import fast_pattern_capture, with_fast_capture
from nasforge.compress.quant_archive import (
    MAX_BATCH,
    batch_dynamic_shapes,
    example_batch,
    load_quantized,
    read_quantized_meta,
    save_quantized,
    to_exported_program,
)
from nasforge.compress.quant_scheme import (
    SCHEME_META_KEY,
    VNNI_FLAGS,
    QuantScheme,
    RuntimeX86Quantizer,
    cpu_flags,
    detect_quant_scheme,
    make_quantizer,
)
from nasforge.training import train_loop

__all__ = [
    "MAX_BATCH",
    "VNNI_FLAGS",
    "QuantResult",
    "QuantScheme",
    "RuntimeX86Quantizer",
    "convert_qat",
    "cpu_flags",
    "detect_quant_scheme",
    "export_graph",
    "fast_pattern_capture",
    "finetune_qat",
    "freeze_bn_stats",
    "load_quantized",
    "make_quantizer",
    "prepare_qat",
    "ptq",
    "quantize_qat",
    "read_quantized_meta",
    "save_quantized",
    "to_exported_program",
]


def export_graph(model: nn.Module, example_input: torch.Tensor) -> GraphModule:
    """Capture ``model`` (in eval mode) as an ATen GraphModule with a dynamic batch dimension.

    The graph gets its own copy of the weights: ``torch.export`` shares parameter and buffer
    tensors with the module it captures, so QAT fine-tuning the graph (or folding BN into it)
    would otherwise rewrite the caller's float model in place. Measured before this copy: a
    PTQ run after QAT of the same model quantized the QAT-trained weights, not the float ones.
    The caller's model, its weights and its train/eval mode are left as they were.
    """
    own = copy.deepcopy(model).eval()
    ep = torch.export.export(
        own, (example_batch(example_input),), dynamic_shapes=batch_dynamic_shapes()
    )
    return ep.module()


@with_fast_capture
def prepare_qat(
    model: nn.Module,
    example_input: torch.Tensor,
    reduce_range: bool | None = None,
    conv_add_fusion: bool = False,
) -> GraphModule:
    """Export ``model`` and insert QAT fake-quantization (conv-BN folding is simulated).

    Args:
        model: float model (NCHW input); it is not modified.
        example_input: a batch of real inputs (shape and dtype are what matter).
        reduce_range: None to detect from the CPU, or force 7-bit (True) / 8-bit (False).
        conv_add_fusion: see :func:`make_quantizer` (False: runtime-friendly QDQ graph).

    Returns:
        The prepared GraphModule, in train mode. ``gm.meta["nasforge_quant"]`` holds the
        :class:`QuantScheme` dict.
    """
    scheme = detect_quant_scheme("qat", reduce_range)
    # exported in eval mode; move_exported_model_to_train flips BN/dropout after
    gm = export_graph(model, example_input)
    prepared = prepare_qat_pt2e(gm, make_quantizer(True, scheme.reduce_range, conv_add_fusion))
    prepared.meta[SCHEME_META_KEY] = scheme.as_dict() | {"conv_add_fusion": conv_add_fusion}
    move_exported_model_to_train(prepared)
    return prepared


_BATCH_NORM_OPS = (
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten.cudnn_batch_norm.default,
)


def freeze_bn_stats(prepared: GraphModule) -> int:
    """Stop BatchNorm statistics updating in a QAT-prepared graph that stays in train mode.

    The usual late-QAT step: with small fine-tuning batches the batch statistics are noisy, and
    the simulated conv-BN folding then uses a scale that differs from the running-statistics
    scale the converted model folds in. Freezing makes training see the deployed folding while
    weights and fake-quant still train. It is one-way: ``move_exported_model_to_train`` does
    not undo it (checked: a second call after it finds nothing left to freeze).

    Returns:
        How many BatchNorm nodes were frozen.
    """
    count = 0
    for node in prepared.graph.nodes:
        if node.op == "call_function" and node.target in _BATCH_NORM_OPS:
            args = list(node.args)
            if args[5] is True:  # (input, weight, bias, mean, var, training, momentum, eps...)
                args[5] = False
                node.args = tuple(args)
                count += 1
    prepared.recompile()
    return count


@with_fast_capture
def finetune_qat(
    prepared: GraphModule,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    freeze_observers_last_epoch: bool = True,
    freeze_bn_after_epochs: int | None = None,
    checkpoint: EpochCheckpoint | None = None,
) -> list[float]:
    """Fine-tune a QAT-prepared graph with SGD+momentum and cross-entropy.

    With ``checkpoint`` the state after each epoch (weights, fake-quant scales and observer
    switches, optimizer, shuffling generator) is saved, and a rerun on a graph prepared the same
    way continues after the last finished epoch.

    Observers are frozen for the last epoch (when ``epochs > 1``) so the scales stop moving and
    the weights adapt to the final quantization grid, the usual QAT recipe. With
    ``freeze_bn_after_epochs=k`` BatchNorm statistics also stop updating from epoch ``k`` on
    (see :func:`freeze_bn_stats`).

    Returns:
        The mean training loss per epoch.
    """
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    move_exported_model_to_train(prepared)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) >= 2:  # BatchNorm in train mode needs more than one value per channel
                yield xt[idx], yt[idx]

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        loss = nn.functional.cross_entropy(prepared(batch[0]), batch[1])
        loss.backward()
        return loss

    def before_epoch(epoch: int) -> None:
        if freeze_observers_last_epoch and epochs > 1 and epoch == epochs - 1:
            prepared.apply(disable_observer)
        if freeze_bn_after_epochs is not None and epoch == freeze_bn_after_epochs:
            freeze_bn_stats(prepared)

    def on_resume(first: int, extra: dict[str, Any]) -> None:
        if "generator" in extra:
            gen.set_state(extra["generator"])
        # Graph edits are not in the state dict: redo the BN freeze an earlier epoch made.
        if freeze_bn_after_epochs is not None and first > freeze_bn_after_epochs:
            freeze_bn_stats(prepared)

    losses = train_loop(
        prepared,
        opt,
        step,
        batches,
        epochs=epochs,
        train_mode=False,  # pt2e graphs switch modes with move_exported_model_to_train/eval
        checkpoint=checkpoint,
        save_extra=lambda: {"generator": gen.get_state()},
        on_resume=on_resume,
        before_epoch=before_epoch,
    )
    move_exported_model_to_eval(prepared)
    return losses


@with_fast_capture
def convert_qat(prepared: GraphModule) -> GraphModule:
    """Convert a prepared (QAT or PTQ) graph to quantize/dequantize ops, in eval mode."""
    move_exported_model_to_eval(prepared)
    meta = prepared.meta.get(SCHEME_META_KEY)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    if meta is not None:
        converted.meta[SCHEME_META_KEY] = meta
    return converted


@dataclass
class QuantResult:
    """A converted INT8 model and how it was made.

    Attributes:
        model: the converted GraphModule (eval mode); call it like the float model.
        scheme: the :class:`QuantScheme` as a dict (record it).
        losses: training loss per epoch (QAT) or empty (PTQ).
    """

    model: GraphModule
    scheme: dict[str, Any]
    losses: list[float] = field(default_factory=list)


@with_fast_capture
def quantize_qat(
    model: nn.Module,
    example_input: torch.Tensor,
    train: Callable[[GraphModule], None] | tuple[np.ndarray, np.ndarray],
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 64,
    reduce_range: bool | None = None,
    seed: int = 0,
    conv_add_fusion: bool = False,
    freeze_bn_after_epochs: int | None = None,
    checkpoint: EpochCheckpoint | None = None,
) -> QuantResult:
    """Run INT8 QAT end to end: prepare, fine-tune, convert.

    Args:
        model: trained float model.
        example_input: a batch of inputs.
        train: either a callback that fine-tunes the prepared graph in place (it gets the
            graph in train mode; use ``torchao.quantization.pt2e.move_exported_model_to_eval``
            and not ``.eval()`` for evaluation), or ``(x, y)`` numpy arrays for the built-in loop.
        epochs, lr, batch_size, seed, freeze_bn_after_epochs: settings of the built-in loop
            (see :func:`finetune_qat`).
        reduce_range: None to detect from the CPU, or force it.
        conv_add_fusion: see :func:`make_quantizer` (False: runtime-friendly QDQ graph).
        checkpoint: resume the built-in loop from its last finished epoch (see
            :func:`finetune_qat`).

    Returns:
        The converted model, the scheme used and the losses.
    """
    prepared = prepare_qat(model, example_input, reduce_range, conv_add_fusion)
    losses: list[float] = []
    if callable(train):
        train(prepared)
    else:
        x, y = train
        losses = finetune_qat(
            prepared,
            x,
            y,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            freeze_bn_after_epochs=freeze_bn_after_epochs,
            checkpoint=checkpoint,
        )
    converted = convert_qat(prepared)
    return QuantResult(converted, converted.meta[SCHEME_META_KEY], losses)


@with_fast_capture
def ptq(
    model: nn.Module,
    example_input: torch.Tensor,
    calibration: Iterable[torch.Tensor] | np.ndarray | torch.Tensor,
    reduce_range: bool | None = None,
    batch_size: int = 128,
    max_samples: int = 1024,
    conv_add_fusion: bool = False,
) -> QuantResult:
    """Post-training static INT8 quantization (histogram observers + calibration).

    Args:
        model: trained float model.
        example_input: a batch of inputs.
        calibration: an array of inputs (the first ``max_samples`` are used, in batches) or an
            iterable of input batches.
        reduce_range: None to detect from the CPU, or force it.
        conv_add_fusion: see :func:`make_quantizer` (False: runtime-friendly QDQ graph).

    Returns:
        The converted model and the scheme used.
    """
    scheme = detect_quant_scheme("ptq", reduce_range)
    gm = export_graph(model, example_input)
    prepared = prepare_pt2e(gm, make_quantizer(False, scheme.reduce_range, conv_add_fusion))
    prepared.meta[SCHEME_META_KEY] = scheme.as_dict() | {"conv_add_fusion": conv_add_fusion}
    move_exported_model_to_eval(prepared)
    if isinstance(calibration, (np.ndarray, torch.Tensor)):
        data = torch.as_tensor(np.asarray(calibration), dtype=torch.float32)[:max_samples]
        batches: Iterable[torch.Tensor] = data.split(batch_size)
    else:
        batches = calibration
    with torch.no_grad():
        for xb in batches:
            prepared(torch.as_tensor(xb, dtype=torch.float32))
    converted = convert_qat(prepared)
    return QuantResult(converted, converted.meta[SCHEME_META_KEY], [])
