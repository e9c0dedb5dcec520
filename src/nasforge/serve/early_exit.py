"""Run a staged early-exit export (see :mod:`nasforge.space.early_exit`) on any runtime that reads
ONNX (ONNX Runtime, OpenVINO), letting confident samples leave early.

Per batch: segment 0 runs on every row; rows whose max-softmax confidence at exit ``k`` reaches
threshold ``k`` are answered there, and only the remaining rows' features go on to segment
``k + 1``. The later segments therefore really run on fewer rows (or not at all).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.errors import ModelFileError, TargetError
from nasforge.runtimes.registry import get_runtime
from nasforge.space.early_exit import FORMAT, MANIFEST, NEVER, THRESHOLDS, confidence


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"early-exit export lacks {path.name}: {path.parent}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ModelFileError(f"{path} must hold a JSON object")
    return doc


def load_manifest(folder: Path | str) -> tuple[dict[str, Any], list[float]]:
    """Read and check an early-exit folder's manifest and thresholds.

    Args:
        folder: The folder, or its ``early_exit.json``.

    Returns:
        ``(manifest, thresholds)``.

    Raises:
        ModelFileError: Missing or inconsistent files.
    """
    folder = Path(folder)
    if folder.name == MANIFEST:
        folder = folder.parent
    man = _read_json(folder / MANIFEST)
    if man.get("format") != FORMAT:
        raise ModelFileError(f"{folder / MANIFEST}: format {man.get('format')!r}, want {FORMAT}")
    stages = man.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ModelFileError(f"{folder / MANIFEST}: 'stages' must be a non-empty list")
    for s in stages:
        if not (folder / str(s)).is_file():
            raise ModelFileError(f"early-exit stage file missing: {folder / str(s)}")
    thr = _read_json(folder / THRESHOLDS).get("thresholds")
    if not isinstance(thr, list) or len(thr) != len(stages) - 1:
        raise ModelFileError(
            f"{folder / THRESHOLDS}: need {len(stages) - 1} thresholds for {len(stages)} stages"
        )
    try:
        thresholds = [float(t) for t in thr]
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{folder / THRESHOLDS}: thresholds must be numbers") from e
    return man, thresholds


@dataclasses.dataclass
class EarlyExitResult:
    """Outcome of one batch.

    Attributes:
        logits: Logits of the exit that answered each row.
        exits: Index of that exit per row (``num_exits - 1`` = final).
    """

    logits: np.ndarray
    exits: np.ndarray


class EarlyExitRunner:
    """Staged early-exit inference on one runtime.

    Args:
        folder: A staged export folder (or its ``early_exit.json``).
        runtime: A runtime that reads ONNX (``"onnxruntime"``, ``"openvino"``; CPU, FP32, the
            batch dynamic: each stage sees a different number of rows per call).
        threads: Runtime threads per stage (default: the runtime's choice).
        thresholds: Override the calibrated thresholds (one per intermediate exit).

    Raises:
        ModelFileError: Missing, corrupt or inconsistent files.
        TargetError: Unknown runtime, or one that does not read ONNX.
    """

    def __init__(
        self,
        folder: Path | str,
        runtime: str = "onnxruntime",
        threads: int | None = None,
        thresholds: Sequence[float] | None = None,
    ) -> None:
        rt = get_runtime(runtime)
        if ".onnx" not in rt.suffixes:
            raise TargetError(
                f"early exit runs staged ONNX graphs; runtime '{runtime}' does not read ONNX"
            )
        self.folder = Path(folder)
        if self.folder.name == MANIFEST:
            self.folder = self.folder.parent
        self.manifest, calibrated = load_manifest(self.folder)
        self.runtime = runtime
        self.num_exits = len(self.manifest["stages"])
        self.input_shape = tuple(int(d) for d in self.manifest["input_shape"])
        self.thresholds = list(calibrated)
        if thresholds is not None:
            self.set_thresholds(thresholds)
        self._stages = [
            rt.runner(self.folder / s, threads, all_outputs=True) for s in self.manifest["stages"]
        ]

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Replace the thresholds (one per intermediate exit)."""
        if len(thresholds) != self.num_exits - 1:
            raise ValueError(f"need {self.num_exits - 1} thresholds, got {len(thresholds)}")
        self.thresholds = [float(t) for t in thresholds]

    def run(self, x: np.ndarray) -> EarlyExitResult:
        """Classify a batch, each row leaving at its first confident exit."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(x)
        logits: np.ndarray | None = None
        exits = np.full(n, self.num_exits - 1, dtype=np.int64)
        rows = np.arange(n)  # original row of each row still in the network
        feats = x
        for k, stage in enumerate(self._stages):
            outs = stage(feats)
            if logits is None:
                logits = np.empty((n, outs[-1].shape[1]), dtype=np.float32)
            if k == self.num_exits - 1:
                logits[rows] = outs[0]
                break
            feats, lg = outs[0], outs[1]
            conf, _ = confidence(lg)
            leave = conf >= self.thresholds[k]
            logits[rows[leave]] = lg[leave]
            exits[rows[leave]] = k
            keep = ~leave
            if not keep.any():
                break
            rows, feats = rows[keep], np.ascontiguousarray(feats[keep])
        assert logits is not None
        return EarlyExitResult(logits, exits)

    def run_all_exits(self, x: np.ndarray) -> list[np.ndarray]:
        """Logits of every exit for every row (no exiting; for parity checks)."""
        feats = np.ascontiguousarray(x, dtype=np.float32)
        out = []
        for k, stage in enumerate(self._stages):
            outs = stage(feats)
            if k == self.num_exits - 1:
                out.append(outs[0])
            else:
                feats, lg = outs[0], outs[1]
                out.append(lg)
        return out

    def run_full(self, x: np.ndarray) -> np.ndarray:
        """Final-exit logits with every stage run (the network without early exit)."""
        saved = self.thresholds
        self.thresholds = [NEVER] * (self.num_exits - 1)
        try:
            return self.run(x).logits
        finally:
            self.thresholds = saved

    def size_bytes(self) -> int:
        """Bytes of the stage files."""
        return sum((self.folder / s).stat().st_size for s in self.manifest["stages"])
