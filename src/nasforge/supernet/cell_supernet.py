"""Weight-sharing supernet over the NAS-Bench-201 cell space.

Once-for-All style: one object with :meth:`CellSupernet.set_active_subnet` /
:meth:`CellSupernet.get_active_subnet`. Training samples one path per step uniformly at random
(SPOS, Guo et al. 2020) so every op's weights see comparable updates. Because parameter names are
shared with standalone subnets (see :mod:`nasforge.space.cell`), extracting a subnet is a filtered
state-dict load; its BatchNorm statistics are then recalibrated on training data, since the
supernet's running statistics mix all paths and misjudge any single one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
import torch

from nasforge import progress
from nasforge.checkpoint import EpochCheckpoint
from nasforge.space.cell import CellNetwork, CellNetworkShape, build_cell_network, effective_ops
from nasforge.space.nb201 import EDGES, OPS, CellSpec
from nasforge.training import iterate_minibatches

LARGEST_SPEC = CellSpec(("nor_conv_3x3",) * len(EDGES))
"""The subnet with the most parameters and FLOPs: the distillation teacher."""


class CellSupernet(CellNetwork):
    """A cell network whose edges hold all five candidate ops."""

    def __init__(self, shape: CellNetworkShape) -> None:
        super().__init__(shape, [OPS] * len(EDGES))
        self.active_spec = LARGEST_SPEC
        self.set_active_subnet(LARGEST_SPEC)

    def set_active_subnet(self, spec: CellSpec) -> None:
        """Route the forward pass through ``spec``'s ops (dead edges skipped)."""
        self.set_ops(effective_ops(spec))
        self.active_spec = spec

    def get_active_subnet(self) -> CellNetwork:
        """A standalone copy of the active subnet with inherited weights."""
        subnet = build_cell_network(self.active_spec, self.shape)
        own = self.state_dict()
        subnet.load_state_dict({k: own[k].clone() for k in subnet.state_dict()})
        return subnet

    @staticmethod
    def sample_spec(rng: random.Random) -> CellSpec:
        """Draw a cell uniformly from the space."""
        return CellSpec(tuple(rng.choice(OPS) for _ in EDGES))


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate BatchNorm running statistics of ``model`` from ``batches``.

    Uses a cumulative average (momentum None) so the result does not depend on batch order.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
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


def train_supernet_uniform(
    supernet: CellSupernet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    log_every: int = 0,
    checkpoint: EpochCheckpoint | None = None,
) -> list[float]:
    """Train the supernet with uniform single-path sampling (one random subnet per step).

    With ``checkpoint``, a rerun continues after the last finished epoch (same sampled subnets
    and batches as an uninterrupted run).

    Returns:
        Mean training loss per epoch.
    """
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(
        supernet.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True
    )
    steps = epochs * max(1, (len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    history: list[float] = []
    first = 0
    if checkpoint is not None:
        first, history, _ = checkpoint.resume(supernet, opt, sched, py_rng=rng, np_rng=np_rng)
    supernet.train()
    for epoch in range(first, epochs):
        total, n = 0.0, 0
        for xb, yb in iterate_minibatches(x, y, batch_size, np_rng):
            supernet.set_active_subnet(CellSupernet.sample_spec(rng))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(supernet(xb), yb)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(supernet.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item() * len(xb)
            n += len(xb)
        history.append(total / max(n, 1))
        if checkpoint is not None:
            checkpoint.save(epoch, supernet, opt, sched, history, py_rng=rng, np_rng=np_rng)
        progress.step("supernet epoch", epoch + 1, epochs, echo=False, loss=history[-1])
        if log_every and (epoch + 1) % log_every == 0:
            print(f"  supernet epoch {epoch + 1}/{epochs} loss {history[-1]:.4f}", flush=True)
    supernet.set_active_subnet(LARGEST_SPEC)
    return history
