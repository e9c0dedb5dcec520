"""The export bundle: every runtime's files of one candidate, described by ``export.json``.

Where each runtime's file of each precision lies is the runtime's own layout
(:meth:`nasforge.runtimes.base.Runtime.layout`); ``files`` records the paths written. The
bundle also holds ``model.json``, the INT8 model's description
(:class:`~nasforge.artifacts.quantized_model.QuantizedModel`'s document).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nasforge.artifacts.base import JsonArtifact
from nasforge.runtimes.base import Runtime
from nasforge.runtimes.registry import bundle_runtime, get_runtime

EXPORT_JSON = "export.json"


@dataclass
class ExportBundle(JsonArtifact):
    """``export.json``.

    Attributes:
        candidate: The candidate exported.
        arch_str: Its architecture.
        files: ``runtime/precision`` -> path of the model file in the bundle.
        size_bytes: ``runtime/precision`` -> bytes of the model's files.
        parity: ``runtime/precision`` -> the parity check against the torch model.
        parity_min_top1: The top-1 agreement the parity check asked for.
        quant_scheme: The INT8 scheme of the QAT stage.
        model: What serving needs: ``input_shape``, ``mean``, ``std``, ``classes``, ``shape``.
        history: Every stage that touched the model, with its metrics.
        quantization: ``runtime/precision`` -> the scheme of a runtime that quantized by its
            own scheme (absent otherwise).
        extra: Fields this version does not name.
    """

    SCHEMA: ClassVar[str] = "nasforge.export-bundle"
    FILE: ClassVar[str] = EXPORT_JSON
    WHAT: ClassVar[str] = "export folder"

    candidate: str | None = None
    arch_str: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    parity_min_top1: float | None = None
    quant_scheme: dict[str, Any] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:  # noqa: D102
        body = super().to_body()
        if body["quantization"] is None:  # only runtimes with their own scheme write one
            del body["quantization"]
        return body

    def parity_of(self, runtime: str, precision: str) -> dict[str, Any] | None:
        """The parity check of ``runtime``'s file of ``precision`` (None when it has none)."""
        return self.parity.get(f"{runtime}/{precision}")


def find_bundles(roots: list[Path] | list[str]) -> list[Path]:
    """Export folders (holding ``export.json``) below each root, sorted, each once."""
    return sorted({f.parent for d in roots for f in Path(d).rglob(EXPORT_JSON)})


def runtime_file(folder: str | Path, runtime: Runtime, precision: str) -> Path:
    """Where ``runtime``'s own file of ``precision`` lies in bundle ``folder``."""
    return Path(folder) / runtime.layout(precision)


def model_files(folder: str | Path, runtime: str, precision: str) -> list[Path]:
    """Files making up one exported model of a runtime (an IR has a ``.bin`` beside its
    ``.xml``); a runtime that loads another's files gets those."""
    rt = bundle_runtime(get_runtime(runtime))
    return rt.model_files(runtime_file(folder, rt, precision))


def onnx_twin(folder: str | Path, runtime: str | Runtime, precision: str) -> Path:
    """The ONNX graph in bundle ``folder`` that is the same model as ``runtime``'s file of
    ``precision`` (what the memory model reads and promotion registers)."""
    rt = get_runtime(runtime) if isinstance(runtime, str) else runtime
    return Path(folder) / bundle_runtime(rt).onnx_twin(precision)
