"""Which INT8 scheme to use on this CPU, and the x86 quantizer that applies it.

CPUs without VNNI (AVX512-VNNI, AVX-VNNI or AMX) compute u8*s8 products with ``vpmaddubsw``,
whose 16-bit intermediate sums saturate; the known work-around is 7-bit activations
(``reduce_range=True``). :func:`detect_quant_scheme` reads the CPU flags and returns which was used
so that stages can record it; :func:`make_quantizer` builds the torchao pt2e quantizer for it,
one whose QDQ graphs ONNX Runtime and OpenVINO run in INT8 (:class:`RuntimeX86Quantizer`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

#: CPU flags (as spelled in /proc/cpuinfo) that provide u8*s8 dot products without saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: Where a prepared or converted graph keeps its :meth:`QuantScheme.as_dict` (``gm.meta[...]``).
SCHEME_META_KEY = "nasforge_quant"


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
