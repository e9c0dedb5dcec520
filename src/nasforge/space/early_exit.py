"""Early exit for cell networks: exit heads, multi-exit training, calibration, staged export.

A :class:`MultiExitNetwork` wraps a :class:`~nasforge.space.cell.CellNetwork` (the backbone is
composed, not changed) and adds an *exit head* (BN-ReLU, global pooling, linear — the backbone's
own head design) after the last cell of chosen stages. The backbone's classifier is the final
exit, so exit ``k`` of ``K`` runs *segment* ``0 .. k`` of the network:

* :func:`fit_multi_exit` trains all exits at once: a weighted sum of per-exit losses, earlier
  exits optionally distilled from the final one (detached, so distillation does not pull the
  final exit towards the weak ones);
* :func:`calibrate_thresholds` picks, on the validation split, a max-softmax confidence threshold
  per intermediate exit: a sample leaves at the first exit whose confidence reaches its threshold;
* :func:`export_staged` writes one ONNX graph per segment (segment ``k`` takes the previous
  segment's features and returns features + exit ``k``'s logits), so a runtime that stops after
  segment ``k`` really skips the rest (see :mod:`nasforge.serve.early_exit`).

Layout of a staged export folder (what ``nasforge serve`` loads as an early-exit variant)::

    early_exit.json    format, stage files, input shape, classes, exit positions, accuracy
    thresholds.json    calibration: one threshold per intermediate exit (+ how it was chosen)
    stage0.onnx ... stage<K-1>.onnx
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasforge.atomic import temp_dir_beside
from nasforge.errors import ConfigError, ModelFileError
from nasforge.space.cell import CellNetwork, ResidualReduction
from nasforge.training import (
    iterate_minibatches,
    kd_loss,
    sgd_one_cycle,
    steps_per_epoch,
    train_loop,
)

FORMAT = "nasforge-early-exit/1"
MANIFEST = "early_exit.json"
THRESHOLDS = "thresholds.json"
NEVER = 2.0
"""A threshold no max-softmax confidence (at most 1) reaches: the exit is never taken."""


class ExitHead(nn.Module):
    """BN-ReLU, global average pooling and a linear classifier (the backbone head's design)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


class _FinalHead(nn.Module):
    """The backbone's own head as an exit (shares its modules)."""

    def __init__(self, backbone: CellNetwork) -> None:
        super().__init__()
        self.head, self.pool, self.classifier = backbone.head, backbone.pool, backbone.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


class StageSegment(nn.Module):
    """Segment ``k`` of a multi-exit network: layers up to exit ``k``, then that exit's head.

    ``forward`` returns ``(features, logits)``; the last segment returns only ``logits`` (no
    later segment needs its features). Holds references to the network's modules, no copies.
    """

    def __init__(
        self, stem: nn.Module | None, layers: Sequence[nn.Module], exit_head: nn.Module, last: bool
    ) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.exit_head = exit_head
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        if self.stem is not None:
            x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        logits = self.exit_head(x)
        return logits if self.last else (x, logits)


def _stage_end_layers(backbone: CellNetwork) -> list[int]:
    """Index in ``backbone.cells`` of the last layer of every stage."""
    ends, n = [], len(backbone.cells)
    for i in range(n):
        if i + 1 == n or isinstance(backbone.cells[i + 1], ResidualReduction):
            ends.append(i)
    return ends


def _channels_after(backbone: CellNetwork, layer: int) -> int:
    c = backbone.shape.channels
    for m in backbone.cells[: layer + 1]:
        if isinstance(m, ResidualReduction):
            c *= 2
    return c


class MultiExitNetwork(nn.Module):
    """A cell network with extra exit heads after chosen stages.

    Args:
        backbone: The network (its classifier becomes the final exit). Not modified.
        exit_stages: Stages (0-based) after whose last cell an exit head is added; the last
            stage is always an exit (the backbone's own head) and may not be listed.

    Raises:
        ConfigError: An exit stage is out of range, repeated or the last stage.
    """

    def __init__(self, backbone: CellNetwork, exit_stages: Sequence[int]) -> None:
        super().__init__()
        stages = backbone.shape.stages
        exit_stages = [int(s) for s in exit_stages]
        if sorted(set(exit_stages)) != exit_stages:
            raise ConfigError(f"exit_stages must be increasing and unique, got {exit_stages}")
        if any(s < 0 or s >= stages - 1 for s in exit_stages):
            raise ConfigError(
                f"exit_stages must lie in [0, {stages - 2}] for a {stages}-stage network "
                f"(the last stage's exit is the backbone head), got {exit_stages}"
            )
        self.backbone = backbone
        self.exit_stages = tuple(exit_stages)
        ends = _stage_end_layers(backbone)
        self.exit_layers = tuple(ends[s] for s in exit_stages)
        self.exits = nn.ModuleList(
            ExitHead(_channels_after(backbone, i), backbone.shape.num_classes)
            for i in self.exit_layers
        )

    @property
    def num_exits(self) -> int:
        """Number of exits, the final one included."""
        return len(self.exit_layers) + 1

    def segments(self) -> list[StageSegment]:
        """The network cut at its exits: ``segments()[k]`` runs up to and including exit ``k``."""
        bb = self.backbone
        bounds = [-1, *self.exit_layers, len(bb.cells) - 1]
        heads: list[nn.Module] = [*self.exits, _FinalHead(bb)]
        out = []
        for k in range(self.num_exits):
            layers = list(bb.cells[bounds[k] + 1 : bounds[k + 1] + 1])
            stem = bb.stem if k == 0 else None
            out.append(StageSegment(stem, layers, heads[k], last=k == self.num_exits - 1))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, the final exit last (equal to ``backbone(x)``)."""
        outs = []
        for seg in self.segments():
            if seg.last:
                outs.append(seg(x))
            else:
                x, logits = seg(x)
                outs.append(logits)
        return outs


def multi_exit_loss(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    weights: Sequence[float] | None = None,
    kd_temperature: float = 4.0,
    kd_alpha: float = 0.0,
) -> torch.Tensor:
    """Weighted sum of per-exit losses, normalised by the weights' sum.

    The final exit gets cross-entropy. Earlier exits get cross-entropy, or with ``kd_alpha > 0``
    :func:`nasforge.training.kd_loss` against the (detached) final exit.

    Args:
        logits: Per-exit logits, final exit last.
        targets: Class labels.
        weights: One weight per exit (default: all 1).
        kd_temperature: Distillation temperature.
        kd_alpha: Share of the distillation term for earlier exits (0 = plain CE).
    """
    weights = [1.0] * len(logits) if weights is None else list(weights)
    if len(weights) != len(logits):
        raise ConfigError(f"{len(weights)} exit weights for {len(logits)} exits")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"exit weights must be >= 0 with a positive sum, got {weights}")
    final = logits[-1]
    total = weights[-1] * F.cross_entropy(final, targets)
    teacher = final.detach()
    for w, lg in zip(weights[:-1], logits[:-1], strict=True):
        if kd_alpha > 0:
            total = total + w * kd_loss(lg, teacher, targets, kd_temperature, kd_alpha)
        else:
            total = total + w * F.cross_entropy(lg, targets)
    return total / sum(weights)


def fit_multi_exit(
    model: MultiExitNetwork,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 5e-4,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    kd_temperature: float = 4.0,
    kd_alpha: float = 0.5,
) -> list[float]:
    """Train every exit jointly (the recipe of :func:`nasforge.training.fit`: SGD + Nesterov,
    one-cycle schedule, same minibatching), with :func:`multi_exit_loss`.

    Returns:
        Mean training loss per epoch.
    """
    if epochs <= 0:
        return []
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt, sched = sgd_one_cycle(
        model.parameters(),
        lr=lr,
        weight_decay=weight_decay,
        total_steps=epochs * steps_per_epoch(len(x), batch_size),
        pct_start=0.2,
    )

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = batch
        loss = multi_exit_loss(model(xb), yb, weights, kd_temperature, kd_alpha)
        loss.backward()
        return loss

    history = train_loop(
        model,
        opt,
        step,
        lambda _: iterate_minibatches(x, y, batch_size, rng),
        epochs=epochs,
        scheduler=sched,
        progress_kind=None,
    )
    model.eval()
    return history


@torch.no_grad()
def exit_logits(
    model: MultiExitNetwork, x: torch.Tensor, batch_size: int = 256
) -> list[np.ndarray]:
    """Per-exit logits of ``model`` on ``x`` (eval mode), as numpy arrays."""
    model.eval()
    parts = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return [torch.cat([p[k] for p in parts]).numpy() for k in range(model.num_exits)]


def confidence(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max-softmax confidence and predicted class per row (numerically stable softmax)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p.max(axis=1), p.argmax(axis=1)


def cascade(
    logits: Sequence[np.ndarray], thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Early-exit decisions from precomputed per-exit logits.

    A sample leaves at the first intermediate exit ``k`` with confidence ``>= thresholds[k]``,
    otherwise at the final exit.

    Args:
        logits: Per-exit logits (same rows), final exit last.
        thresholds: One per intermediate exit (``len(logits) - 1``).

    Returns:
        ``(predicted class, exit index)`` per sample.
    """
    if len(thresholds) != len(logits) - 1:
        raise ConfigError(f"{len(thresholds)} thresholds for {len(logits)} exits (need one less)")
    n = len(logits[0])
    pred = np.full(n, -1, dtype=np.int64)
    where = np.full(n, len(logits) - 1, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    for k, t in enumerate(thresholds):
        conf, cls = confidence(logits[k])
        leave = open_ & (conf >= t)
        pred[leave], where[leave] = cls[leave], k
        open_ &= ~leave
    pred[open_] = logits[-1][open_].argmax(axis=1)
    return pred, where


@dataclasses.dataclass
class Calibration:
    """Thresholds chosen on a validation split and what they gave there.

    Attributes:
        thresholds: One per intermediate exit (``NEVER`` = exit disabled).
        max_drop: Allowed accuracy drop versus the final exit.
        reference_accuracy: Final-exit accuracy on the split.
        accuracy: Early-exit (cascade) accuracy on the split.
        exit_fractions: Share of samples leaving at each exit, final included.
        samples: Split size.
    """

    thresholds: list[float]
    max_drop: float
    reference_accuracy: float
    accuracy: float
    exit_fractions: list[float]
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"criterion": "max_softmax", **dataclasses.asdict(self)}


def calibrate_thresholds(
    logits: Sequence[np.ndarray], y: np.ndarray, max_drop: float = 0.01
) -> Calibration:
    """Lowest confidence threshold per exit that keeps the accuracy within ``max_drop``.

    Exits are calibrated in order (earlier exits save the most compute, so they get the
    accuracy budget first). For exit ``k`` every distinct confidence of the samples still in
    the network is a candidate threshold. The accuracy of the whole cascade — exits ``< k`` at
    their chosen thresholds, samples not leaving at ``k`` answered by the final exit — must be
    at least the final exit's accuracy minus ``max_drop`` at the chosen threshold *and at every
    higher candidate*: candidates are scanned from the top and the scan stops at the first
    violation. (Taking the lowest threshold that happens to satisfy the bound would let a
    few lucky low-confidence samples of a weak exit open it wide; on a validation split of a
    few hundred samples that does not carry over to the test split.) If the highest candidate
    already violates the bound, the exit is disabled (:data:`NEVER`).

    Args:
        logits: Per-exit logits on the validation split, final exit last.
        y: Labels of the split.
        max_drop: Allowed drop of accuracy (fraction, 0.01 = one point) versus the final exit.

    Returns:
        The :class:`Calibration`.

    Raises:
        ConfigError: Mismatched shapes, an empty split or a negative ``max_drop``.
    """
    if len(logits) < 2:
        raise ConfigError("calibration needs at least one intermediate exit")
    y = np.asarray(y)
    if len(y) == 0 or any(len(lg) != len(y) for lg in logits):
        raise ConfigError("calibration needs a non-empty split with logits for every sample")
    if not 0 <= max_drop < 1:
        raise ConfigError(f"max_drop must be in [0, 1), got {max_drop}")
    final_ok = logits[-1].argmax(axis=1) == y
    reference = float(final_ok.mean())
    # A tiny tolerance: the bound is a count of samples, float sums must not miss it.
    need = (reference - max_drop) * len(y) - 1e-9
    thresholds: list[float] = []
    open_ = np.ones(len(y), dtype=bool)
    decided_correct = 0  # samples already answered (correctly) at earlier exits
    for k in range(len(logits) - 1):
        conf, cls = confidence(logits[k])
        ok_k = cls == y
        chosen = NEVER
        for t in np.unique(conf[open_])[::-1]:  # descending: stop at the first violation
            leave = open_ & (conf >= t)
            stay = open_ & ~leave
            correct = decided_correct + ok_k[leave].sum() + final_ok[stay].sum()
            if correct < need:
                break
            chosen = float(t)
        thresholds.append(chosen)
        leave = open_ & (conf >= chosen)
        decided_correct += int(ok_k[leave].sum())
        open_ &= ~leave
    pred, where = cascade(logits, thresholds)
    fractions = np.bincount(where, minlength=len(logits)) / len(y)
    return Calibration(
        thresholds=thresholds,
        max_drop=float(max_drop),
        reference_accuracy=reference,
        accuracy=float((pred == y).mean()),
        exit_fractions=[float(f) for f in fractions],
        samples=len(y),
    )


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def save_thresholds(calibration: Calibration | Sequence[float], folder: Path | str) -> Path:
    """Write ``thresholds.json`` into a staged export folder (atomic)."""
    doc = (
        calibration.to_dict()
        if isinstance(calibration, Calibration)
        else {"criterion": "max_softmax", "thresholds": [float(t) for t in calibration]}
    )
    path = Path(folder) / THRESHOLDS
    _write_json(path, doc)
    return path


def export_staged(
    model: MultiExitNetwork,
    example_input: torch.Tensor,
    out_dir: Path | str,
    calibration: Calibration | Sequence[float] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export one ONNX graph per segment (dynamic batch) plus the manifest and thresholds.

    The folder is built beside ``out_dir`` and renamed into place at the end, so a failed
    export leaves nothing half-written; an existing early-exit export at ``out_dir`` is
    replaced.

    Args:
        model: The trained multi-exit network (put in eval mode).
        example_input: A batch of inputs (NCHW float32).
        out_dir: Folder to write.
        calibration: Thresholds (default: every intermediate exit disabled).
        metadata: Extra manifest fields (e.g. ``candidate``, ``test_accuracy``, normalisation).

    Returns:
        ``out_dir``.

    Raises:
        ModelFileError: ``out_dir`` exists and is not an early-exit export.
    """
    from nasforge.export.onnx import export_fp32

    out = Path(out_dir)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ModelFileError(f"{out} exists and is not an early-exit export; not overwriting it")
    tmp = temp_dir_beside(out)
    try:
        model.eval()
        x = example_input.detach().to(torch.float32)
        files = []
        for k, seg in enumerate(model.segments()):
            name = f"stage{k}.onnx"
            export_fp32(seg, x, tmp / name)
            files.append(name)
            if not seg.last:
                with torch.no_grad():
                    x, _ = seg(x)
        shape = model.backbone.shape
        manifest = {
            "format": FORMAT,
            "stages": files,
            "num_exits": model.num_exits,
            "input_shape": list(example_input.shape[1:]),
            "num_classes": shape.num_classes,
            "exit_stages": [*model.exit_stages, shape.stages - 1],
            "exit_layers": [*model.exit_layers, len(model.backbone.cells) - 1],
            "network": shape.to_dict(),
            **(metadata or {}),
        }
        _write_json(tmp / MANIFEST, manifest)
        save_thresholds(
            calibration if calibration is not None else [NEVER] * (model.num_exits - 1), tmp
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
