"""The one minibatch training loop of nasforge, and the small pieces its trainers share.

airbench-style: no framework. Data are whole tensors in memory (digits and CIFAR-10 both fit),
minibatches are index slices, and augmentation for images larger than 16 px is random crop with
padding plus horizontal flip.

:func:`train_loop` runs the epochs: zero the gradients, let the trainer's ``step`` compute them,
clip, step the optimizer and the schedule, average the step's losses per epoch, save the
resumable epoch checkpoint and report progress. A trainer keeps only what is its own:

* :func:`fit` (the train, prune and benchmark fine-tuning): cross-entropy or logit distillation;
* :func:`nasforge.supernet.cell_supernet.train_supernet_uniform`: one random path per step;
* :func:`nasforge.supernet.macro_supernet.train_sandwich`: the sandwich rule, in-place distillation;
* :func:`nasforge.supernet.darts.run_darts`: an architecture step before every weight step;
* :func:`nasforge.space.early_exit.fit_multi_exit`: the weighted loss of every exit;
* :func:`nasforge.compress.qat.finetune_qat`: observer and BatchNorm freezing of a pt2e graph.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasforge import progress
from nasforge.checkpoint import EpochCheckpoint

#: What a step returns: its loss, or named losses (``"loss"`` is the one the history keeps).
StepResult = torch.Tensor | float | dict[str, torch.Tensor | float]


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[Any], StepResult],
    batches: Callable[[int], Iterable[Any]],
    *,
    epochs: int,
    scheduler: Any = None,
    clip_grad_norm: float | None = None,
    train_mode: bool = True,
    checkpoint: EpochCheckpoint | None = None,
    py_rng: random.Random | None = None,
    np_rng: np.random.Generator | None = None,
    save_extra: Callable[[], dict[str, Any]] | None = None,
    on_resume: Callable[[int, dict[str, Any]], None] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    after_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
    progress_kind: str | None = "epoch",
    echo: bool = True,
) -> list[float]:
    """Train ``model`` for ``epochs`` epochs of ``step`` over ``batches``.

    Per batch: ``optimizer.zero_grad``, ``step(batch)`` (it fills the gradients, usually by
    ``loss.backward()``, and returns its loss), gradient-norm clipping, ``optimizer.step()``,
    ``scheduler.step()``. Per epoch: the step's losses averaged over the samples
    (``len(batch[0])`` per batch), the checkpoint, ``after_epoch``, the progress report.

    Args:
        model: The trained network (checkpointed, and put in train mode every epoch).
        optimizer: Steps once per batch.
        step: ``step(batch)`` computes the gradients of one batch and returns its loss, or a dict
            of named losses with ``"loss"`` among them.
        batches: ``batches(epoch)`` yields the epoch's batches, tuples whose first item has one
            row per sample; drawing from a generator inside it keeps resumed runs exact.
        epochs: Epochs to run in all (a resumed run runs the rest).
        scheduler: Learning-rate schedule stepped once per batch, or None.
        clip_grad_norm: Clip the gradient norm of the optimizer's parameters to this.
        train_mode: Call ``model.train()`` at every epoch start (False for graphs that switch
            modes their own way, such as pt2e graphs).
        checkpoint: Save the state after every epoch there and resume after its last one.
        py_rng: A ``random.Random`` the trainer draws from (checkpointed).
        np_rng: A numpy generator the trainer draws from (checkpointed).
        save_extra: More state to checkpoint (plain values and tensors).
        on_resume: ``on_resume(first_epoch, extra)`` after a checkpoint was loaded, to restore
            what the state dicts do not hold.
        before_epoch: ``before_epoch(epoch)`` at every epoch start.
        after_epoch: ``after_epoch(epoch, mean losses)`` after every epoch (and its checkpoint);
            returning True stops training.
        progress_kind: The :func:`nasforge.progress.step` loop name, or None for no report.
        echo: Whether the progress report prints plain lines too.

    Returns:
        The mean ``"loss"`` per epoch, resumed epochs included.
    """
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    clipped = [p for p in model.parameters() if id(p) in owned] if clip_grad_norm else []
    history: list[float] = []
    first = 0
    if checkpoint is not None:
        first, history, extra = checkpoint.resume(model, optimizer, scheduler, py_rng, np_rng)
        if on_resume is not None and first > 0:  # 0: nothing was saved yet
            on_resume(first, extra)
    for epoch in range(first, epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        if train_mode:
            model.train()
        sums: dict[str, float] = {}
        n = 0
        for batch in batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            result = step(batch)
            if clipped:
                nn.utils.clip_grad_norm_(clipped, clip_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            size = len(batch[0])
            for name, value in (result if isinstance(result, dict) else {"loss": result}).items():
                if isinstance(value, torch.Tensor):
                    value = value.detach().item()
                sums[name] = sums.get(name, 0.0) + value * size
            n += size
        means = {"loss": 0.0} | {name: total / max(n, 1) for name, total in sums.items()}
        history.append(means["loss"])
        if checkpoint is not None:
            extra = save_extra() if save_extra is not None else None
            checkpoint.save(epoch, model, optimizer, scheduler, history, py_rng, np_rng, extra)
        stop = after_epoch is not None and after_epoch(epoch, means)
        if progress_kind is not None:
            progress.step(progress_kind, epoch + 1, epochs, echo=echo, loss=history[-1])
        if stop:
            break
    return history


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over ``n`` samples (the last one may be short; at least 1)."""
    return max(1, math.ceil(n / batch_size))


def sgd_one_cycle(
    params: Iterable[Any],
    *,
    lr: float,
    weight_decay: float,
    total_steps: int,
    pct_start: float,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.OneCycleLR]:
    """SGD with Nesterov momentum 0.9 and a one-cycle schedule peaking at ``lr``.

    ``params`` may be parameter groups with their own ``weight_decay``.
    """
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    # OneCycleLR divides by pct_start * total_steps - 1: zero when the warm-up is exactly one
    # step (one epoch of 257-320 images at batch 64 with 0.2 raised ZeroDivisionError), so warm
    # up 1.5 steps there.
    if pct_start * total_steps == 1.0:
        pct_start = 1.5 / total_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps, pct_start=pct_start
    )
    return opt, sched


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
    opt, sched = sgd_one_cycle(
        model.parameters(),
        lr=lr,
        weight_decay=weight_decay,
        total_steps=epochs * steps_per_epoch(len(x), batch_size),
        pct_start=0.2,
    )
    if teacher is not None:
        teacher.eval()

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = batch
        logits = model(xb)
        if teacher is None:
            loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
        else:
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = kd_loss(logits, t_logits, yb, kd_temperature, kd_alpha, label_smoothing)
        loss.backward()
        return loss

    def after_epoch(epoch: int, losses: dict[str, float]) -> None:
        if on_epoch is not None:
            on_epoch(epoch, losses["loss"])

    history = train_loop(
        model,
        opt,
        step,
        lambda _: iterate_minibatches(x, y, batch_size, rng),
        epochs=epochs,
        scheduler=sched,
        checkpoint=checkpoint,
        np_rng=rng,
        after_epoch=after_epoch,
    )
    model.eval()
    return history


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate BatchNorm running statistics of ``model`` from ``batches``.

    Uses a cumulative average (momentum None) so the result does not depend on batch order.
    A subnet cut from a supernet needs this: the supernet's statistics mix all its paths.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    seen = False
    for xb in batches:
        model(xb)
        seen = True
    for m, (momentum, _) in zip(bns, saved, strict=True):
        m.momentum = momentum
    model.train(was_training)
    if not seen:
        raise ValueError("BN recalibration needs at least one batch")


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
