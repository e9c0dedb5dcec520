"""The benchmark report: one candidate measured on one target (``<candidate>/benchmark.json``).

Beside it, ``model/<precision>/`` holds the model files measured (the target's runtime's files
and their ONNX twin), which promotion registers and a server serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nasforge.artifacts.base import JsonArtifact
from nasforge.errors import ModelFileError

BENCHMARK_JSON = "benchmark.json"
MODEL_DIR = "model"


@dataclass
class BenchmarkReport(JsonArtifact):
    """``benchmark.json``.

    Attributes:
        candidate: The candidate measured (``cand-<i>``).
        results: Per precision: test accuracy, size, latency per batch size, energy, memory,
            files, parity, DVC hash.
        target: The target as :meth:`nasforge.hardware.targets.Target.describe` gives it (older
            files: its name).
        arch_str: The candidate's architecture.
        quant_scheme: The INT8 scheme of the QAT stage.
        system: CPU model, ISA flags, threads, runtime versions.
        extra: Fields this version does not name.
    """

    SCHEMA: ClassVar[str] = "nasforge.benchmark-report"
    FILE: ClassVar[str] = BENCHMARK_JSON
    WHAT: ClassVar[str] = "benchmark folder"
    JSON_DEFAULT: ClassVar[Any] = str

    candidate: str | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: dict[str, Any] | str | None = None
    arch_str: str | None = None
    quant_scheme: dict[str, Any] | None = None
    system: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target_name(self) -> str | None:
        """The name of the target measured."""
        t = self.target
        return t.get("name") if isinstance(t, dict) else t


def model_dir(folder: str | Path, precision: str) -> Path:
    """The folder of the measured model files of ``precision`` beside a ``benchmark.json``."""
    return Path(folder) / MODEL_DIR / precision


def find_reports(
    dirs: list[Path] | list[str], required: bool = True
) -> list[tuple[Path, BenchmarkReport]]:
    """Every ``benchmark.json`` below each folder (a benchmark output or a parent of several).

    Args:
        dirs: Folders to search recursively.
        required: A folder without any report is an error rather than a silent skip.

    Returns:
        ``(candidate folder, report)`` pairs, sorted by path within each folder.

    Raises:
        ModelFileError: No report below a folder (when ``required``) or a corrupt report.
        ArtifactVersionError: A report of a version this nasforge does not read.
    """
    out = []
    for d in dirs:
        files = sorted(Path(d).rglob(BENCHMARK_JSON))
        if not files and required:
            raise ModelFileError(f"not a benchmark folder (no */{BENCHMARK_JSON}): {d}")
        out.extend((f.parent, BenchmarkReport.read(f.parent)) for f in files)
    return out
