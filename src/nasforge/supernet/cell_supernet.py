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

import numpy as np
import torch

from nasforge.checkpoint import EpochCheckpoint
from nasforge.space.cell import CellNetwork, CellNetworkShape, build_cell_network, effective_ops
from nasforge.space.nb201 import EDGES, OPS, CellSpec
from nasforge.training import (
    iterate_minibatches,
    recalibrate_bn,
    sgd_one_cycle,
    steps_per_epoch,
    train_loop,
)

__all__ = ["LARGEST_SPEC", "CellSupernet", "recalibrate_bn", "train_supernet_uniform"]

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
    opt, sched = sgd_one_cycle(
        supernet.parameters(),
        lr=lr,
        weight_decay=weight_decay,
        total_steps=epochs * steps_per_epoch(len(x), batch_size),
        pct_start=0.15,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = batch
        supernet.set_active_subnet(CellSupernet.sample_spec(rng))
        loss = loss_fn(supernet(xb), yb)
        loss.backward()
        return loss

    def after_epoch(epoch: int, losses: dict[str, float]) -> None:
        if log_every and (epoch + 1) % log_every == 0:
            print(f"  supernet epoch {epoch + 1}/{epochs} loss {losses['loss']:.4f}", flush=True)

    history = train_loop(
        supernet,
        opt,
        step,
        lambda _: iterate_minibatches(x, y, batch_size, np_rng),
        epochs=epochs,
        scheduler=sched,
        clip_grad_norm=5.0,
        checkpoint=checkpoint,
        py_rng=rng,
        np_rng=np_rng,
        after_epoch=after_epoch,
        progress_kind="supernet epoch",
        echo=False,
    )
    supernet.set_active_subnet(LARGEST_SPEC)
    return history
