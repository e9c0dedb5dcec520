"""Weight-sharing supernet over the macro elastic space (Once-for-All, Cai et al. 2020).

One :class:`MacroSupernet` holds the largest network of :mod:`nasforge.space.macro`; every other
:class:`~nasforge.space.macro.MacroSpec` is a slice of it:

* **elastic kernel**: each depthwise conv stores a 7x7 kernel; the 5x5 kernel is its centre crop
  passed through a learned 25x25 transformation matrix, and the 3x3 kernel the centre crop of that
  5x5 kernel passed through a 9x9 matrix (OFA's kernel transformation; identity at init, so plain
  centre cropping until training moves the matrices). The matrices let small kernels keep their
  own distribution instead of forcing the 7x7 centre to serve every size unchanged.
* **elastic expansion / width**: layers keep their first channels. :meth:`sort_channels`
  (OFA's channel sorting) permutes channels by importance (L1 norm) before shrinking starts, so
  the kept channels are the important ones; the permutation keeps the function unchanged.
* **elastic depth**: a stage runs its first ``depth`` blocks.

:meth:`MacroSupernet.get_active_subnet` copies the sliced weights into a standalone
:class:`~nasforge.space.macro.MacroNetwork` (the class :func:`build_macro_network` builds) that
computes exactly what the supernet computes with that spec active.

Training follows OFA's progressive shrinking (:data:`DEFAULT_PHASES`: largest, then elastic
kernel, depth, width/expansion) with the sandwich rule of BigNAS (each step trains the largest,
the smallest and ``n_random`` random subnets of the phase, the latter distilled in place from the
largest's logits).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasforge.checkpoint import EpochCheckpoint
from nasforge.errors import ConfigError
from nasforge.space.macro import (
    DEPTHS,
    EXPANDS,
    HEAD_CHANNELS,
    KERNELS,
    N_STAGES,
    STAGE_BASE,
    STEM_CHANNELS,
    WIDTHS,
    MacroNetwork,
    MacroSpec,
    stage_channels,
)
from nasforge.training import (
    accuracy,
    iterate_minibatches,
    kd_loss,
    recalibrate_bn,
    sgd_one_cycle,
    steps_per_epoch,
    train_loop,
)

__all__ = [
    "DEFAULT_PHASES",
    "FULL_SPACE",
    "DynamicBatchNorm2d",
    "ElasticChoices",
    "MacroSupernet",
    "evaluate_subnet",
    "recalibrate_bn",
    "train_progressive",
    "train_sandwich",
]


@dataclass(frozen=True)
class ElasticChoices:
    """The choices open per elastic dimension (a progressive-shrinking phase, or the full space).

    Raises:
        ConfigError: a dimension is empty or holds a value outside the macro space.
    """

    name: str = "full"
    depths: tuple[int, ...] = DEPTHS
    widths: tuple[float, ...] = WIDTHS
    kernels: tuple[int, ...] = KERNELS
    expands: tuple[int, ...] = EXPANDS

    def __post_init__(self) -> None:
        for field, full in (
            ("depths", DEPTHS),
            ("widths", WIDTHS),
            ("kernels", KERNELS),
            ("expands", EXPANDS),
        ):
            values = tuple(sorted(getattr(self, field)))
            if not values or any(v not in full for v in values):
                raise ConfigError(
                    f"phase {self.name!r}: {field} must be a non-empty subset of {list(full)}, "
                    f"got {list(values)}"
                )
            object.__setattr__(self, field, values)

    def largest(self) -> MacroSpec:
        """The largest spec of these choices."""
        return MacroSpec(
            (self.depths[-1],) * N_STAGES,
            (self.widths[-1],) * N_STAGES,
            (self.kernels[-1],) * N_STAGES,
            (self.expands[-1],) * N_STAGES,
        )

    def smallest(self) -> MacroSpec:
        """The smallest spec of these choices."""
        return MacroSpec(
            (self.depths[0],) * N_STAGES,
            (self.widths[0],) * N_STAGES,
            (self.kernels[0],) * N_STAGES,
            (self.expands[0],) * N_STAGES,
        )

    def sample(self, rng: random.Random) -> MacroSpec:
        """A spec drawn uniformly, per stage and dimension, from these choices."""
        return MacroSpec(
            tuple(rng.choice(self.depths) for _ in range(N_STAGES)),
            tuple(rng.choice(self.widths) for _ in range(N_STAGES)),
            tuple(rng.choice(self.kernels) for _ in range(N_STAGES)),
            tuple(rng.choice(self.expands) for _ in range(N_STAGES)),
        )


FULL_SPACE = ElasticChoices()
_MAX = dict(depths=(max(DEPTHS),), widths=(max(WIDTHS),), expands=(max(EXPANDS),))
DEFAULT_PHASES: tuple[ElasticChoices, ...] = (
    ElasticChoices("largest", kernels=(max(KERNELS),), **_MAX),
    ElasticChoices("kernel", **_MAX),
    ElasticChoices("depth", widths=_MAX["widths"], expands=_MAX["expands"]),
    ElasticChoices("width"),
)
"""OFA's progressive shrinking: train the largest, then open kernel, depth, width + expansion."""


# --------------------------------------------------------------------------------------------
# Elastic layers


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``C`` channels of its input (statistics shared across widths).

    Subclasses :class:`nn.BatchNorm2d`, so :func:`recalibrate_bn` and BN folding find it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        use_batch = self.training or self.running_mean is None
        # Slices are views: batch_norm updates the shared running statistics in place.
        return F.batch_norm(
            x,
            self.running_mean[:c] if self.running_mean is not None else None,
            self.running_var[:c] if self.running_var is not None else None,
            self.weight[:c],
            self.bias[:c],
            use_batch,
            factor,
            self.eps,
        )


def _centre(size: int, sub: int) -> slice:
    start = (size - sub) // 2
    return slice(start, start + sub)


class ElasticInvertedResidual(nn.Module):
    """An inverted-residual block whose input/hidden/output channels and kernel are elastic.

    Holds the largest block (``c_in_max -> c_in_max * max(EXPANDS) -> c_out_max``, 7x7 depthwise)
    and runs the active slice: hidden channels ``c_in * expand`` where ``c_in`` is the width of
    the incoming tensor, as :class:`~nasforge.space.macro.InvertedResidual` does.
    """

    def __init__(self, c_in_max: int, c_out_max: int, stride: int) -> None:
        super().__init__()
        hidden = c_in_max * max(EXPANDS)
        k = max(KERNELS)
        self.stride = stride
        self.expand = nn.Sequential(
            nn.Conv2d(c_in_max, hidden, 1, bias=False), DynamicBatchNorm2d(hidden), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, k, stride, padding=k // 2, groups=hidden, bias=False),
            DynamicBatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(
            nn.Conv2d(hidden, c_out_max, 1, bias=False), DynamicBatchNorm2d(c_out_max)
        )
        kernels = sorted(KERNELS)
        # OFA kernel transformation: one matrix per step down (7->5, 5->3), shared by channels.
        self.kernel_transforms = nn.ParameterDict(
            {
                f"{big}to{small}": nn.Parameter(torch.eye(small * small))
                for small, big in zip(kernels[:-1], kernels[1:], strict=True)
            }
        )
        self.active_kernel = k
        self.active_expand = max(EXPANDS)
        self.active_out = c_out_max

    def active_filter(self, hidden: int, kernel: int) -> torch.Tensor:
        """The depthwise filter ``(hidden, 1, kernel, kernel)`` of the active kernel size."""
        filt = self.depthwise[0].weight[:hidden]
        down = sorted(KERNELS, reverse=True)  # 7, 5, 3: transform step by step to ``kernel``
        for big, small in zip(down[:-1], down[1:], strict=True):
            if small < kernel:
                break
            crop = filt[:, :, _centre(big, small), _centre(big, small)].reshape(hidden, -1)
            filt = F.linear(crop, self.kernel_transforms[f"{big}to{small}"])
            filt = filt.reshape(hidden, 1, small, small)
        return filt

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        c_in = x.shape[1]
        hidden = c_in * self.active_expand
        k = self.active_kernel
        out = self.expand[2](
            self.expand[1](F.conv2d(x, self.expand[0].weight[:hidden, :c_in].contiguous()))
        )
        out = F.conv2d(
            out, self.active_filter(hidden, k), None, self.stride, k // 2, 1, groups=hidden
        )
        out = self.depthwise[2](self.depthwise[1](out))
        out = F.conv2d(out, self.project[0].weight[: self.active_out, :hidden].contiguous())
        out = self.project[1](out)
        if self.stride == 1 and c_in == self.active_out:
            return x + out
        return out


def _bn_slice(bn: nn.BatchNorm2d, prefix: str, c: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": bn.weight[:c],
        f"{prefix}.bias": bn.bias[:c],
        f"{prefix}.running_mean": bn.running_mean[:c],
        f"{prefix}.running_var": bn.running_var[:c],
        f"{prefix}.num_batches_tracked": bn.num_batches_tracked,
    }


def _permute_bn(bn: nn.BatchNorm2d, order: torch.Tensor) -> None:
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.data.copy_(t.data[order])


# --------------------------------------------------------------------------------------------
# The supernet


class MacroSupernet(nn.Module):
    """The largest macro network with every elastic dimension sliceable.

    Args:
        in_channels: Image channels.
        num_classes: Classifier outputs.
        choices: The space sampled by :meth:`sample_active_subnet` (default: the full space).

    Raises:
        ConfigError: ``in_channels`` or ``num_classes`` below 1.
    """

    def __init__(
        self, in_channels: int, num_classes: int, choices: ElasticChoices = FULL_SPACE
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(
                f"need in_channels >= 1 and num_classes >= 1, got {in_channels}, {num_classes}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.choices = choices
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU6(),
        )
        # blocks[stage][j]: the j-th block of a stage; the supernet holds max(DEPTHS) per stage.
        stages = []
        c = STEM_CHANNELS
        for base, stride in STAGE_BASE:
            c_out = stage_channels(base, max(WIDTHS))
            blocks = []
            for j in range(max(DEPTHS)):
                blocks.append(ElasticInvertedResidual(c, c_out, stride if j == 0 else 1))
                c = c_out
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(
            nn.Conv2d(c, HEAD_CHANNELS, 1, bias=False), nn.BatchNorm2d(HEAD_CHANNELS), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self.active_spec = MacroSpec.largest()
        self.set_active_subnet(self.active_spec)

    # ---- spec handling

    @staticmethod
    def largest_spec() -> MacroSpec:
        """The largest spec of the space (the distillation teacher)."""
        return MacroSpec.largest()

    @staticmethod
    def smallest_spec() -> MacroSpec:
        """The smallest spec of the space."""
        return MacroSpec.smallest()

    def set_active_subnet(self, spec: MacroSpec) -> None:
        """Route the forward pass through ``spec``'s slice of the weights."""
        if not isinstance(spec, MacroSpec):
            raise ConfigError(f"set_active_subnet needs a MacroSpec, got {type(spec).__name__}")
        for i, blocks in enumerate(self.stages):
            c_out = stage_channels(STAGE_BASE[i][0], spec.widths[i])
            for block in blocks:
                block.active_kernel = spec.kernels[i]
                block.active_expand = spec.expands[i]
                block.active_out = c_out
        self.active_spec = spec

    def sample_active_subnet(
        self, rng: random.Random, choices: ElasticChoices | None = None
    ) -> MacroSpec:
        """Draw a spec uniformly from ``choices`` (default: the supernet's), activate and return it."""
        spec = (choices or self.choices).sample(rng)
        self.set_active_subnet(spec)
        return spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.stem(x)
        for i, blocks in enumerate(self.stages):
            for block in blocks[: self.active_spec.depths[i]]:
                x = block(x)
        c = x.shape[1]
        x = F.conv2d(x, self.head[0].weight[:, :c].contiguous())
        x = self.head[2](self.head[1](x))
        return self.classifier(torch.flatten(self.pool(x), 1))

    # ---- extraction

    @torch.no_grad()
    def active_state_dict(self, spec: MacroSpec | None = None) -> dict[str, torch.Tensor]:
        """The state dict of the standalone :class:`MacroNetwork` of ``spec`` (default: active)."""
        spec = spec or self.active_spec
        state: dict[str, torch.Tensor] = {}
        for k, v in self.stem.state_dict().items():
            state[f"stem.{k}"] = v
        n = 0
        c_in = STEM_CHANNELS
        for i, blocks in enumerate(self.stages):
            c_out = stage_channels(STAGE_BASE[i][0], spec.widths[i])
            for block in blocks[: spec.depths[i]]:
                hidden = c_in * spec.expands[i]
                p = f"blocks.{n}"
                state[f"{p}.expand.0.weight"] = block.expand[0].weight[:hidden, :c_in]
                state.update(_bn_slice(block.expand[1], f"{p}.expand.1", hidden))
                state[f"{p}.depthwise.0.weight"] = block.active_filter(hidden, spec.kernels[i])
                state.update(_bn_slice(block.depthwise[1], f"{p}.depthwise.1", hidden))
                state[f"{p}.project.0.weight"] = block.project[0].weight[:c_out, :hidden]
                state.update(_bn_slice(block.project[1], f"{p}.project.1", c_out))
                c_in = c_out
                n += 1
        state["head.0.weight"] = self.head[0].weight[:, :c_in]
        for k, v in self.head[1].state_dict().items():
            state[f"head.1.{k}"] = v
        for k, v in self.classifier.state_dict().items():
            state[f"classifier.{k}"] = v
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def get_active_subnet(self, spec: MacroSpec | None = None) -> MacroNetwork:
        """A standalone :class:`MacroNetwork` of ``spec`` (default: the active one) with inherited
        weights and BN statistics; it computes what the supernet computes with ``spec`` active."""
        spec = spec or self.active_spec
        if not isinstance(spec, MacroSpec):
            raise ConfigError(f"get_active_subnet needs a MacroSpec, got {type(spec).__name__}")
        subnet = MacroNetwork(spec, self.in_channels, self.num_classes)
        subnet.load_state_dict(self.active_state_dict(spec))
        subnet.train(self.training)
        return subnet

    # ---- channel sorting

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Sort channels by importance so width/expansion shrinking keeps the important ones.

        OFA's channel sorting: each block's hidden channels by the L1 norm of the projection
        weights that read them; each stage's output channels by the L1 norm of all projection
        weights that write them (stage 0 shares its channels with the stem through the residual,
        so the stem is permuted with it). Every permutation is applied to producer and consumer
        alike, so the largest network computes the same function before and after.
        """
        for blocks in self.stages:
            for block in blocks:
                order = block.project[0].weight.abs().sum(dim=(0, 2, 3)).argsort(descending=True)
                w = block.expand[0].weight
                w.copy_(w[order])
                _permute_bn(block.expand[1], order)
                w = block.depthwise[0].weight
                w.copy_(w[order])
                _permute_bn(block.depthwise[1], order)
                w = block.project[0].weight
                w.copy_(w[:, order])
        for i, blocks in enumerate(self.stages):
            importance = sum(b.project[0].weight.abs().sum(dim=(1, 2, 3)) for b in blocks)
            order = importance.argsort(descending=True)
            for b in blocks:
                w = b.project[0].weight
                w.copy_(w[order])
                _permute_bn(b.project[1], order)
            # Consumers: blocks 1.. of this stage, then the first block of the next stage or head.
            consumers = [b.expand[0].weight for b in blocks[1:]]
            if i + 1 < len(self.stages):
                nxt = self.stages[i + 1][0]
                consumers.append(nxt.expand[0].weight)
            else:
                consumers.append(self.head[0].weight)
            if i == 0:
                # The stem feeds stage 0's first block and its residual: same channel order.
                self.stem[0].weight.copy_(self.stem[0].weight[order])
                _permute_bn(self.stem[1], order)
                consumers.append(blocks[0].expand[0].weight)
            for w in consumers:
                w.copy_(w[:, order])


# --------------------------------------------------------------------------------------------
# Training


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying BN affine parameters, biases or the
    kernel transformation matrices (identity at init) would pull them away from their role."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 and "kernel_transforms" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_sandwich(
    supernet: MacroSupernet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    choices: ElasticChoices,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 3e-5,
    n_random: int = 2,
    kd_temperature: float = 1.0,
    kd_alpha: float = 1.0,
    label_smoothing: float = 0.1,
    seed: int = 0,
    log_every: int = 0,
    checkpoint: EpochCheckpoint | None = None,
) -> list[float]:
    """Train ``supernet`` for ``epochs`` with the sandwich rule over ``choices``.

    Each step accumulates the gradients of the largest subnet of ``choices`` (cross-entropy on the
    labels), its smallest subnet and ``n_random`` uniformly drawn ones (in-place distillation
    from the largest's detached logits, :func:`nasforge.training.kd_loss`), then takes one SGD
    step. When ``choices`` holds a single spec only that spec is trained. With ``checkpoint``, a
    rerun continues after the last finished epoch (same batches and subnets).

    Returns:
        Mean loss of the largest subnet per epoch.
    """
    if epochs <= 0:
        return []
    if n_random < 0:
        raise ConfigError(f"n_random must be >= 0, got {n_random}")
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    opt, sched = sgd_one_cycle(
        _param_groups(supernet, weight_decay),
        lr=lr,
        weight_decay=0.0,
        total_steps=epochs * steps_per_epoch(len(x), batch_size),
        pct_start=0.15,
    )
    largest, smallest = choices.largest(), choices.smallest()
    single = largest == smallest

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = batch
        supernet.set_active_subnet(largest)
        logits = supernet(xb)
        loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
        loss.backward()
        if not single:
            teacher = logits.detach()
            for spec in [smallest] + [choices.sample(rng) for _ in range(n_random)]:
                supernet.set_active_subnet(spec)
                kd_loss(
                    supernet(xb), teacher, yb, kd_temperature, kd_alpha, label_smoothing
                ).backward()
        return loss

    def after_epoch(epoch: int, losses: dict[str, float]) -> None:
        if log_every and (epoch + 1) % log_every == 0:
            print(
                f"  macro supernet [{choices.name}] epoch {epoch + 1}/{epochs} "
                f"loss {losses['loss']:.4f}",
                flush=True,
            )

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
    supernet.set_active_subnet(supernet.largest_spec())
    return history


def train_progressive(
    supernet: MacroSupernet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    phases: Sequence[ElasticChoices] = DEFAULT_PHASES,
    epochs_per_phase: int | Sequence[int] = 5,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 3e-5,
    n_random: int = 2,
    seed: int = 0,
    log_every: int = 0,
    checkpoints: Callable[[str], EpochCheckpoint | None] | None = None,
) -> dict[str, list[float]]:
    """Progressive shrinking: train each phase in turn with :func:`train_sandwich`.

    Channels are sorted (:meth:`MacroSupernet.sort_channels`) before the first phase that opens
    width or expansion, as OFA does; every phase starts a fresh optimizer and one-cycle schedule
    (OFA uses a lower learning rate for later phases: pass ``lr`` per call if wanted).

    Args:
        supernet: The supernet, trained in place.
        x: Training images (normalised, NCHW).
        y: Training labels.
        phases: The choices open in each phase, in order (default :data:`DEFAULT_PHASES`).
        epochs_per_phase: One count for every phase, or one per phase.
        batch_size: Minibatch size.
        lr: Peak learning rate of each phase's one-cycle schedule.
        weight_decay: SGD weight decay.
        n_random: Random subnets per step besides the largest and smallest.
        seed: Random seed.
        log_every: Print the loss every this many epochs (0: silent).
        checkpoints: Gives each phase its epoch checkpoint, called with
            ``"supernet-<phase name>"`` (e.g. :func:`nasforge.checkpoint.checkpoint_for`); a
            rerun then continues after the last finished epoch of the last phase it reached.

    Returns:
        ``{phase name: mean loss of the largest subnet per epoch}``.

    Raises:
        ConfigError: ``phases`` is empty or ``epochs_per_phase`` does not match it.
    """
    if not phases:
        raise ConfigError("train_progressive needs at least one phase")
    epochs = (
        [int(epochs_per_phase)] * len(phases)
        if isinstance(epochs_per_phase, int)
        else list(epochs_per_phase)
    )
    if len(epochs) != len(phases):
        raise ConfigError(f"epochs_per_phase has {len(epochs)} values for {len(phases)} phases")
    history: dict[str, list[float]] = {}
    sorted_once = False
    for k, (phase, ep) in enumerate(zip(phases, epochs, strict=True)):
        if not sorted_once and (len(phase.widths) > 1 or len(phase.expands) > 1):
            supernet.sort_channels()
            sorted_once = True
        history[phase.name] = train_sandwich(
            supernet,
            x,
            y,
            choices=phase,
            epochs=ep,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            n_random=n_random,
            seed=seed + k,
            log_every=log_every,
            checkpoint=checkpoints(f"supernet-{phase.name}") if checkpoints else None,
        )
    return history


def evaluate_subnet(
    supernet: MacroSupernet,
    spec: MacroSpec,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    x_calib: torch.Tensor | None = None,
    *,
    bn_batches: int = 8,
    batch_size: int = 128,
) -> tuple[float, MacroNetwork]:
    """Accuracy of ``spec``'s standalone subnet, BN recalibrated on ``x_calib`` first.

    The supernet's running statistics mix every width and depth trained, so a subnet's own
    statistics are re-estimated from ``bn_batches`` batches of training images (skipped when
    ``x_calib`` is None or ``bn_batches`` is 0).

    Returns:
        ``(accuracy, subnet)``; the subnet holds the recalibrated statistics.
    """
    subnet = supernet.get_active_subnet(spec)
    if x_calib is not None and bn_batches > 0:
        batches = [x_calib[i * batch_size : (i + 1) * batch_size] for i in range(bn_batches)]
        recalibrate_bn(subnet, [b for b in batches if len(b)])
    return accuracy(subnet, x_val, y_val), subnet
