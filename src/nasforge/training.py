"""Small, readable training and evaluation loops shared by the stages (airbench-style: no framework).

Data are whole tensors in memory (digits and CIFAR-10 both fit), minibatches are index slices, and
augmentation for images larger than 16 px is random crop with padding plus horizontal flip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasforge import progress
from nasforge.checkpoint import EpochCheckpoint


def iterate_minibatches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    rng: np.random.Generator | None = None,
    augment: bool | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(xb, yb)`` batches; shuffled (and augmented) when ``rng`` is given.

    Augmentation defaults to on for images of at least 16 px when shuffling.
    """
    n = len(x)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if augment is None:
        augment = rng is not None and x.shape[-1] >= 16
    for start in range(0, n, batch_size):
        idx = torch.from_numpy(order[start : start + batch_size])
        xb, yb = x[idx], y[idx]
        if augment and rng is not None:
            xb = _augment(xb, rng)
        yield xb, yb


def _augment(xb: torch.Tensor, rng: np.random.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after reflection padding, and horizontal flip of half the batch."""
    h, w = xb.shape[-2:]
    padded = F.pad(xb, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    out = padded[..., dy : dy + h, dx : dx + w]
    flip = torch.from_numpy(rng.random(len(xb)) < 0.5)
    out[flip] = out[flip].flip(-1)
    return out


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton et al. logit distillation: ``alpha * T^2 * KL(teacher || student) + (1-alpha) * CE``."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * (t * t) * soft + (1.0 - alpha) * hard


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 5e-4,
    seed: int = 0,
    teacher: nn.Module | None = None,
    kd_temperature: float = 4.0,
    kd_alpha: float = 0.7,
    label_smoothing: float = 0.0,
    on_epoch: Callable[[int, float], None] | None = None,
    checkpoint: EpochCheckpoint | None = None,
) -> list[float]:
    """Train with SGD + Nesterov and a one-cycle schedule; distil from ``teacher`` if given.

    With ``checkpoint``, the state after every epoch is saved there and a rerun continues after
    the last finished epoch, with the result of an uninterrupted run.

    Returns:
        Mean training loss per epoch.
    """
    if epochs <= 0:
        return []
    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True
    )
    steps = epochs * max(1, (len(x) + batch_size - 1) // batch_size)
    # OneCycleLR divides by pct_start * total_steps - 1: zero at exactly 5 steps with 0.2 (one
    # epoch of 257-320 images at batch 64 raised ZeroDivisionError), so warm up 1.5 steps there.
    pct_start = 0.3 if steps == 5 else 0.2
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=pct_start
    )
    if teacher is not None:
        teacher.eval()
    history: list[float] = []
    first = 0
    if checkpoint is not None:
        first, history, _ = checkpoint.resume(model, opt, sched, np_rng=rng)
    for epoch in range(first, epochs):
        model.train()
        total, n = 0.0, 0
        for xb, yb in iterate_minibatches(x, y, batch_size, rng):
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(xb)
                loss = kd_loss(logits, t_logits, yb, kd_temperature, kd_alpha, label_smoothing)
            else:
                loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(xb)
            n += len(xb)
        history.append(total / max(n, 1))
        if checkpoint is not None:
            checkpoint.save(epoch, model, opt, sched, history, np_rng=rng)
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
        progress.step("epoch", epoch + 1, epochs, loss=history[-1])
    model.eval()
    return history


@torch.no_grad()
def predict_logits(
    model: nn.Module | Callable, x: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched."""
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except NotImplementedError:
            pass  # torch.export graphs are fixed at export time (converted INT8 models are eval)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module | Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    if len(x) == 0:
        raise ValueError("accuracy of an empty split")
    return float((predict_logits(model, x).argmax(1) == y).float().mean())
