"""INT8 quantization with torchao pt2e: quantization-aware training (QAT) and post-training (PTQ).

The flow is the one torchao documents for x86 CPUs::

    torch.export.export(model, example, dynamic_shapes=batch)   # ATen graph, dynamic batch
    prepare_qat_pt2e(gm, X86InductorQuantizer(is_qat=True))     # fake-quant + simulated conv-BN fold
    ... fine-tune ...
    convert_pt2e(prepared)                                      # quantize/dequantize ops

The converted graph holds ``quantized_decomposed`` quantize/dequantize ops, which
``torch.onnx.export(dynamo=True)`` turns into ONNX QuantizeLinear/DequantizeLinear (QDQ), so the
same file runs in INT8 in ONNX Runtime and OpenVINO (see :mod:`nasforge.export.onnx`).

Between the qat stage and the export stage the converted model travels as a ``torch.export``
``.pt2`` archive (:func:`save_quantized` / :func:`load_quantized`). ``torch.export.load`` is not
safe on hostile files (pickled payloads are loaded with ``weights_only=False``, guard code is
``exec``-ed, operator names resolve to any ``torch.*`` attribute), so :func:`load_quantized` first
validates the archive against what :func:`save_quantized` writes and refuses anything else.

CPUs without VNNI (AVX512-VNNI, AVX-VNNI or AMX) compute u8*s8 products with ``vpmaddubsw``,
whose 16-bit intermediate sums saturate; the known work-around is 7-bit activations
(``reduce_range=True``). :func:`detect_quant_scheme` reads the CPU flags and returns which was used
so that stages can record it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule
from torchao.quantization.pt2e import (
    disable_observer,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from nasforge import progress
from nasforge.atomic import atomic_file
from nasforge.checkpoint import EpochCheckpoint
from nasforge.errors import ModelFileError

#: CPU flags (as spelled in /proc/cpuinfo) that provide u8*s8 dot products without saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: Largest batch the exported graphs accept; any finite bound works, ONNX keeps it symbolic.
MAX_BATCH = 1 << 16
_META_KEY = "nasforge_quant"
_META_FILE = "nasforge_meta.json"


@dataclass(frozen=True)
class QuantScheme:
    """What quantization scheme was used and why; record :meth:`as_dict` with the model.

    Attributes:
        method: ``"qat"`` or ``"ptq"``.
        reduce_range: True when activations use 7 bits (``quant_max=127``).
        reason: why ``reduce_range`` has its value.
        vnni_flags: the VNNI-class flags found on this CPU.
        activation_bits: 7 or 8.
    """

    method: str
    reduce_range: bool
    reason: str
    vnni_flags: tuple[str, ...] = ()
    activation_bits: int = 8

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict."""
        d = asdict(self)
        d["vnni_flags"] = list(self.vnni_flags)
        return d


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> set[str] | None:
    """Return the CPU's ISA flags from ``/proc/cpuinfo``, or None where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return None


def detect_quant_scheme(
    method: str = "qat",
    reduce_range: bool | None = None,
    cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo",
) -> QuantScheme:
    """Decide whether activations need 7-bit range on this CPU.

    Args:
        method: ``"qat"`` or ``"ptq"`` (recorded only).
        reduce_range: force the choice (True/False); None detects it from the CPU flags.
        cpuinfo: path of the cpuinfo file (a parameter so tests can feed other CPUs).

    Returns:
        The scheme, with the reason for the choice.
    """
    flags = cpu_flags(cpuinfo)
    found = tuple(f for f in VNNI_FLAGS if flags and f in flags)
    if reduce_range is not None:
        reason = f"forced reduce_range={reduce_range} by caller"
        use = reduce_range
    elif flags is None:
        # Unknown ISA: 7-bit activations are correct everywhere, 8-bit only with VNNI.
        use, reason = True, "CPU flags unreadable; reduce_range applied conservatively"
    elif found:
        use, reason = False, f"CPU has {', '.join(found)}: full 8-bit activations"
    else:
        use, reason = True, "CPU lacks VNNI (no avx512_vnni/avx_vnni/amx_int8): 7-bit activations"
    return QuantScheme(
        method=method,
        reduce_range=use,
        reason=reason,
        vnni_flags=found,
        activation_bits=7 if use else 8,
    )


# --- faster pattern capture ---------------------------------------------------------------------
# torchao's prepare/convert/move_exported_model_to_{train,eval} match subgraph patterns that they
# first capture with ``torch.export.export(strict=True)``: 108 dynamo traces in convert_pt2e alone
# (~25 s idle, ~100 s on a loaded 2-core machine). Non-strict capture yields the identical graph
# (checked: same converted graph node by node, identical outputs) at a third of the cost, and the
# captures depend only on the pattern code and input shapes, so they are memoized per process.

_PATTERN_CACHE: dict[Any, GraphModule] = {}


def _freeze(value: Any, tensor_values: bool) -> Any:
    """Hashable key of a pattern ingredient; TypeError where none is safe."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, torch.Tensor):
        key = ("T", tuple(value.shape), str(value.dtype), value.device.type)
        if tensor_values:
            key += (value.detach().cpu().numpy().tobytes(),)
        return key
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v, tensor_values) for v in value)
    code = getattr(value, "__code__", None)
    if code is not None:  # a (possibly nested) function: its code plus what it closes over
        cells = tuple(_freeze(c.cell_contents, True) for c in value.__closure__ or ())
        defaults = _freeze(value.__defaults__ or (), True)
        return ("F", code, cells, defaults)
    if callable(value) and hasattr(value, "__qualname__"):  # builtins, torch ops
        return ("C", getattr(value, "__module__", ""), value.__qualname__, id(value))
    raise TypeError(f"no cache key for {type(value).__name__}")


def _capture_pattern(
    pattern: Callable, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any
) -> GraphModule:
    """Drop-in for torchao's ``_get_aten_graph_module_for_pattern``: non-strict and memoized."""
    import copy

    try:
        fn = getattr(pattern, "fn", pattern)
        key: Any = (
            _freeze(fn, True),
            _freeze(tuple(example_inputs), False),
            is_cuda,
            tuple(sorted((k, _freeze(v, True)) for k, v in kwargs.items())),
        )
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _PATTERN_CACHE:
        return copy.deepcopy(_PATTERN_CACHE[key])
    if is_cuda:
        example_inputs = tuple(
            x.cuda() if isinstance(x, torch.Tensor) else x for x in example_inputs
        )
    gm = torch.export.export(pattern, example_inputs, kwargs, strict=False).module()
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        # ep.module() adds copy_ nodes for mutated inputs; patterns do not need them
        if node.op == "call_function" and node.target == torch.ops.aten.copy_.default:
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if key is not None:
        _PATTERN_CACHE[key] = gm
        return copy.deepcopy(gm)
    return gm


@contextlib.contextmanager
def fast_pattern_capture() -> Iterator[None]:
    """Within the block, torchao pt2e captures its rewrite patterns non-strictly, memoized.

    Wrap calls to torchao's ``prepare_*``/``convert_pt2e``/``move_exported_model_to_*`` in it
    (the functions of this module already do).
    """
    from torchao.quantization.pt2e import qat_utils, utils

    saved = (utils._get_aten_graph_module_for_pattern, qat_utils._get_aten_graph_module_for_pattern)
    utils._get_aten_graph_module_for_pattern = _capture_pattern
    qat_utils._get_aten_graph_module_for_pattern = _capture_pattern
    try:
        yield
    finally:
        utils._get_aten_graph_module_for_pattern, qat_utils._get_aten_graph_module_for_pattern = (
            saved
        )


def _with_fast_capture(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with fast_pattern_capture():
            return func(*args, **kwargs)

    return wrapper


class RuntimeX86Quantizer(X86InductorQuantizer):
    """X86InductorQuantizer without the Conv(+BN)+Add(+ReLU) fusion patterns.

    torchao's x86 quantizer targets Inductor, which fuses a residual Add into the convolution,
    so it leaves the conv output *unquantized* before the sum. In a QDQ ONNX graph that conv
    then has no QuantizeLinear after it: ONNX Runtime cannot form a QLinearConv and runs it in
    float with the weights dequantized every call (measured, ResNet-8 width 32, 1 thread:
    INT8 2.3x *slower* than FP32 at batch 32). Without those patterns every Conv(+BN) output is
    quantized, ONNX Runtime fuses all convs to QLinearConv and the sums to QLinearAdd (measured:
    1.5x faster than FP32 at batch 32, 1.7x at batch 1). Other annotations are unchanged.
    """

    def _annotate_qat_conv2d_bn_binary_unary(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _annotate_qat_conv2d_bn_binary(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _annotate_conv2d_binary_unary(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _annotate_conv2d_binary(self, *args: Any, **kwargs: Any) -> None:
        return None

    def annotate(self, model: GraphModule) -> GraphModule:
        """Annotate as torchao does, then quantize every conv output left in float."""
        super().annotate(model)
        if self.global_config is None or self.global_config.output_activation is None:
            return model
        output_spec = self.global_config.output_activation
        relus = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
        for node in model.graph.nodes:
            ann = node.meta.get("quantization_annotation")
            if ann is None or ann.output_qspec is not None:
                continue
            if not getattr(ann, "_is_output_of_quantized_pattern", False):
                continue
            # PTQ folds BN before annotation, so a lone conv is the pattern's output node
            # (QAT's conv-BN pattern already quantizes the BN output) ...
            lone_conv = node.target == torch.ops.aten.conv2d.default and ann.input_qspec_map
            # ... and of Conv+ReLU the ReLU is. torchao quantizes that output only when an
            # int8-in/int8-out op (max pool, ...) follows; before a global max (amax), a mean or
            # a flatten it stays float, and ONNX Runtime then runs the conv as an fp32 FusedConv
            # (measured: nasforge PTQ 2x slower than QAT at batch 32, its last conv in float).
            conv_relu = (
                node.target in relus
                and isinstance(node.args[0], torch.fx.Node)
                and node.args[0].target == torch.ops.aten.conv2d.default
            )
            if lone_conv or conv_relu:
                ann.output_qspec = output_spec
        return model


def make_quantizer(
    is_qat: bool, reduce_range: bool, conv_add_fusion: bool = False
) -> X86InductorQuantizer:
    """Return the x86 quantizer: per-channel symmetric s8 weights, per-tensor u8 activations.

    Args:
        is_qat: fake-quant modules for QAT (else observers for PTQ).
        reduce_range: 7-bit activations (CPUs without VNNI).
        conv_add_fusion: keep torchao's Inductor-oriented Conv+Add fusion (conv outputs feeding
            a sum stay float). False (default) quantizes them, which is what ONNX Runtime and
            OpenVINO need to run those convs in INT8 (see :class:`RuntimeX86Quantizer`).
    """
    config = get_default_x86_inductor_quantization_config(is_qat=is_qat, reduce_range=reduce_range)
    cls = X86InductorQuantizer if conv_add_fusion else RuntimeX86Quantizer
    return cls().set_global(config)


def _example(example_input: torch.Tensor) -> torch.Tensor:
    """Return a contiguous example with batch >= 2 (torch.export specializes a batch of 1)."""
    x = example_input.detach().to(torch.float32)
    if x.shape[0] < 2:
        x = torch.cat([x, x], dim=0)
    # clone: a view would make torch.export.save store the whole underlying storage
    return x[:8].clone().contiguous()


def _batch_dynamic_shapes() -> tuple[dict[int, Any]]:
    return ({0: Dim("batch", min=1, max=MAX_BATCH)},)


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
        own, (_example(example_input),), dynamic_shapes=_batch_dynamic_shapes()
    )
    return ep.module()


@_with_fast_capture
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
    prepared.meta[_META_KEY] = scheme.as_dict() | {"conv_add_fusion": conv_add_fusion}
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


@_with_fast_capture
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
    losses: list[float] = []
    first = 0
    if checkpoint is not None:
        first, losses, extra = checkpoint.resume(prepared, opt)
        if "generator" in extra:
            gen.set_state(extra["generator"])
        # Graph edits are not in the state dict: redo the BN freeze an earlier epoch made.
        if freeze_bn_after_epochs is not None and first > freeze_bn_after_epochs:
            freeze_bn_stats(prepared)
    for epoch in range(first, epochs):
        if freeze_observers_last_epoch and epochs > 1 and epoch == epochs - 1:
            prepared.apply(disable_observer)
        if freeze_bn_after_epochs is not None and epoch == freeze_bn_after_epochs:
            freeze_bn_stats(prepared)
        perm = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm in train mode needs more than one value per channel
                continue
            loss = nn.functional.cross_entropy(prepared(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
        progress.step("epoch", epoch + 1, epochs, loss=losses[-1])
        if checkpoint is not None:
            checkpoint.save(
                epoch, prepared, opt, history=losses, extra={"generator": gen.get_state()}
            )
    move_exported_model_to_eval(prepared)
    return losses


@_with_fast_capture
def convert_qat(prepared: GraphModule) -> GraphModule:
    """Convert a prepared (QAT or PTQ) graph to quantize/dequantize ops, in eval mode."""
    move_exported_model_to_eval(prepared)
    meta = prepared.meta.get(_META_KEY)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    if meta is not None:
        converted.meta[_META_KEY] = meta
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


@_with_fast_capture
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
    return QuantResult(converted, converted.meta[_META_KEY], losses)


@_with_fast_capture
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
    prepared.meta[_META_KEY] = scheme.as_dict() | {"conv_add_fusion": conv_add_fusion}
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
    return QuantResult(converted, converted.meta[_META_KEY], [])


def to_exported_program(gm_or_ep: GraphModule | ExportedProgram, example_input: torch.Tensor):
    """Return an ExportedProgram with a dynamic batch for a converted GraphModule (or pass one)."""
    if isinstance(gm_or_ep, ExportedProgram):
        return gm_or_ep
    return torch.export.export(
        gm_or_ep, (_example(example_input),), dynamic_shapes=_batch_dynamic_shapes()
    )


def save_quantized(
    gm_or_ep: GraphModule | ExportedProgram,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save a converted INT8 model as a ``torch.export`` ``.pt2`` archive (atomic write).

    Args:
        gm_or_ep: the converted GraphModule (from :func:`convert_qat`/:func:`ptq`) or an
            ExportedProgram of it.
        example_input: a batch of inputs (to re-export with a dynamic batch).
        path: the ``.pt2`` file to write.
        meta: JSON-serializable metadata stored inside the archive (the quant scheme is added).

    Returns:
        The path written.
    """
    path = Path(path)
    meta = dict(meta or {})
    if isinstance(gm_or_ep, GraphModule) and _META_KEY in gm_or_ep.meta:
        meta.setdefault("quant_scheme", gm_or_ep.meta[_META_KEY])
    ep = to_exported_program(gm_or_ep, example_input)
    with atomic_file(path, suffix=".tmp.pt2") as tmp:
        torch.export.save(ep, tmp, extra_files={_META_FILE: json.dumps(meta, sort_keys=True)})
    return path


# --- safe loading -------------------------------------------------------------------------------

_ALLOWED_ENTRY = re.compile(
    r"^[^/]+/("
    r"archive_format|archive_version|byteorder|version|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/(weight_\d+|model_weights_config\.json)"
    r"|data/constants/(tensor_\d+|constant_\d+|model_constants_config\.json)"
    rf"|extra/{re.escape(_META_FILE)}"
    r")$"
)
_ALLOWED_TARGET = re.compile(
    r"^(torch\.ops\.(aten|quantized_decomposed)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+"
    r"|_operator\.(getitem|add|mul|sub|floordiv|truediv))$"
)
# sympy parses symbolic-shape expressions (``Symbol('s77', positive=True, integer=True)``) with
# eval: allow quoted symbol names, arithmetic, and a short list of sympy constructors only.
_QUOTED_NAME = re.compile(r"'[A-Za-z_][A-Za-z0-9_]*'")
_EXPR_CHARS = re.compile(r"^[A-Za-z0-9_ +\-*/(),.<>=%]*$")
_EXPR_WORDS = frozenset(
    "Symbol Integer Mul Add Pow Rational Mod FloorDiv CeilToInt FloorToInt IntTrueDiv Max Min "
    "True False positive integer nonnegative negative real finite oo".split()
)


def _safe_expr(expr: str) -> bool:
    rest = _QUOTED_NAME.sub("", expr)
    if not _EXPR_CHARS.match(rest):
        return False
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest)
    return all(w in _EXPR_WORDS or re.fullmatch(r"[su]\d+", w) for w in words)


def _walk(obj: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _validate_pt2(path: Path) -> dict[str, Any]:
    """Check that a .pt2 holds only what save_quantized writes; return the nasforge metadata."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{path}: not a valid .pt2 archive ({exc})") from exc
    with zf:
        names = zf.namelist()
        bad = [n for n in names if not _ALLOWED_ENTRY.match(n)]
        if bad:
            raise ModelFileError(f"{path}: unexpected entry {bad[0]!r}; refusing to load")
        try:
            model_json = next(n for n in names if n.endswith("/models/model.json"))
            for name in names:
                if name.endswith("_config.json"):
                    config = json.loads(zf.read(name))
                    if any(k == "use_pickle" and v for k, v in _walk(config)):
                        raise ModelFileError(f"{path}: pickled payload in {name}; refusing to load")
            program = json.loads(zf.read(model_json))
            for name in names:
                if name.endswith("sample_inputs/model.pt"):
                    # torch.export.load retries failed loads with weights_only=False
                    torch.load(io.BytesIO(zf.read(name)), weights_only=True)
            meta_name = next((n for n in names if n.endswith(f"/extra/{_META_FILE}")), None)
            meta = json.loads(zf.read(meta_name)) if meta_name else {}
        except ModelFileError:
            raise
        except StopIteration as exc:
            raise ModelFileError(f"{path}: no models/model.json in archive") from exc
        except Exception as exc:  # zlib, JSON, unpickling: all mean a damaged or foreign file
            raise ModelFileError(f"{path}: corrupt .pt2 archive ({type(exc).__name__})") from exc
    if program.get("guards_code"):
        raise ModelFileError(f"{path}: archive carries guard code; refusing to load")
    if program.get("graph_module", {}).get("graph", {}).get("custom_obj_values"):
        raise ModelFileError(f"{path}: archive carries custom objects; refusing to load")
    for key, value in _walk(program):
        if key == "target" and isinstance(value, str) and not _ALLOWED_TARGET.match(value):
            raise ModelFileError(f"{path}: operator {value!r} not allowed; refusing to load")
        if key == "expr_str" and isinstance(value, str) and not _safe_expr(value):
            raise ModelFileError(f"{path}: malformed shape expression; refusing to load")
    return meta


def load_quantized(path: str | os.PathLike[str]) -> ExportedProgram:
    """Load a ``.pt2`` written by :func:`save_quantized`, refusing anything that could run code.

    Args:
        path: the archive.

    Returns:
        The ExportedProgram (call ``.module()`` for a runnable GraphModule). Its nasforge
        metadata (quant scheme, ...) is available via :func:`read_quantized_meta`.

    Raises:
        ModelFileError: the file is missing, truncated, corrupt or holds unexpected content.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    _validate_pt2(path)
    try:
        return torch.export.load(path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: cannot load .pt2 ({type(exc).__name__}: {first})") from exc


def read_quantized_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the JSON metadata stored by :func:`save_quantized` (validates the archive)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    return _validate_pt2(path)
