"""DARTS (Liu et al. 2019) on the NAS-Bench-201 cell space.

Continuous relaxation: every edge of the shared cell outputs ``sum_o softmax(alpha_e)_o * o(x)``
over the five NAS-Bench-201 ops (``none`` contributes zeros but still takes softmax mass, as in
the paper). ``alpha`` has shape ``(6, 5)`` (edges x :data:`~nasforge.space.nb201.OPS`) and is
shared by all cells, as NAS-Bench-201 shares one cell. The network weights are the candidate ops
of :class:`~nasforge.space.cell.CellNetwork` (built with :func:`~nasforge.space.cell.make_op`), so
parameter names match the cell supernet and standalone subnets.

Bilevel optimisation alternates an architecture step on one half of the training data (the
"val" half) and a weight step on the other half:

* ``order=1`` (first-order): ``grad_alpha L_val(w, alpha)``;
* ``order=2`` (second-order): the gradient through one virtual SGD step
  ``w' = w - xi * grad_w L_train(w, alpha)``, i.e. ``grad_alpha L_val(w', alpha) - xi * H v``
  with the Hessian-vector product ``H v`` approximated by finite differences
  ``(grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps)``,
  ``w+- = w +- eps v``, ``v = grad_w' L_val(w', alpha)``, ``eps = 0.01 / ||v||``. The virtual step
  uses plain SGD with weight decay (the momentum term of the original code is left out; it only
  rescales ``xi`` early in training).

Anti-collapse measure (``anti_collapse=True``)
-----------------------------------------------
DARTS on NAS-Bench-201 collapses to all ``skip_connect`` cells (54.30 % on CIFAR-10). We use
two measures, both with a stated mechanism and tested:

1. **DARTS- auxiliary skip with beta decay** (Chu et al., ICLR 2021): every searched cell gets
   an extra, architecture-independent residual ``out = cell(x) + beta * x`` with ``beta``
   decaying linearly from 1 to 0 over the search. Skip connections win in DARTS because they
   make the deep supernet easier to optimise (gradient highway), not because they are the best
   op; the auxiliary skip supplies that benefit outside ``alpha``, so ``alpha_skip`` no longer
   has to grow to obtain it. ``beta`` decays per step (by time instead when a time box ends
   the search earlier) and reaches 0 in the last steps, so the final supernet is exactly the
   DARTS one (no train/derive mismatch). We chose it over progressive early stopping (DARTS+) because
   it needs no threshold tuned to the space, and over noise on skip (NoisyDARTS) because its
   effect is deterministic and therefore testable.
2. **Selection by perturbation, not by alpha** (DARTS-PT, Wang et al., ICLR 2021): the cell
   keeps, per edge, the op whose removal costs the trained supernet the most accuracy
   (:func:`derive_spec_by_perturbation`); ``none`` is never selected (NAS-Bench-201's own DARTS
   protocol excludes it from the argmax; ``none`` has the largest weight early on simply because
   zeros are "safe"). ``selection="argmax"`` keeps the argmax without ``none`` instead.
3. **Weight warm-up** (as in PC-DARTS / DARTS+): ``alpha`` is frozen for the first
   ``warmup`` share of the steps (0.3 by default with ``anti_collapse``). Untrained convolutions
   output noise, so any early comparison favours parameter-free ops; with short, time-boxed
   searches this early bias otherwise decides the outcome.

The history records the share of parameter-free ops (``none``, ``skip_connect``,
``avg_pool_3x3``) of the derived cell per epoch so collapse is visible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasforge.errors import ConfigError
from nasforge.space.cell import Cell, CellNetwork, CellNetworkShape
from nasforge.space.nb201 import EDGES, N_NODES, OPS, PARAM_NAMES, CellSpec
from nasforge.training import accuracy, iterate_minibatches, steps_per_epoch, train_loop

PARAMETER_FREE_OPS: tuple[str, ...] = ("none", "skip_connect", "avg_pool_3x3")
"""Ops without weights; DARTS collapses towards these (mostly ``skip_connect``)."""


class DartsNetwork(CellNetwork):
    """A cell network whose edges output the softmax(alpha)-weighted sum of all five ops."""

    def __init__(self, shape: CellNetworkShape) -> None:
        super().__init__(shape, [OPS] * len(EDGES))
        # Small random init breaks ties between ops (as in the DARTS code).
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(OPS)))
        self.aux_skip_beta = 0.0
        # (edges, ops) multipliers applied after the softmax; 0 removes an op (perturbation
        # selection). ``None``: no mask.
        self.op_mask: torch.Tensor | None = None

    def weight_parameters(self) -> list[nn.Parameter]:
        """All network weights except the architecture parameters."""
        return [p for name, p in self.named_parameters() if name != "alpha"]

    def _mixed_cell(self, cell: Cell, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        k = 0
        for node in range(1, N_NODES):
            total = torch.zeros_like(x)
            for src in range(node):
                edge = cell.edges[k]
                for j, name in enumerate(OPS):
                    if name == "none":
                        continue  # contributes zeros; its weight still dilutes the others
                    total = total + weights[k, j] * edge.ops[name](nodes[src])
                k += 1
            nodes.append(total)
        return nodes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        weights = F.softmax(self.alpha, dim=-1)
        if self.op_mask is not None:
            weights = weights * self.op_mask
        x = self.stem(x)
        for layer in self.cells:
            if isinstance(layer, Cell):
                out = self._mixed_cell(layer, x, weights)
                # DARTS- auxiliary skip: architecture-independent residual, decayed to 0.
                x = out + self.aux_skip_beta * x if self.aux_skip_beta > 0 else out
            else:
                x = layer(x)
        x = self.pool(self.head(x))
        return self.classifier(torch.flatten(x, 1))


@dataclass
class DartsResult:
    """Outcome of a DARTS search.

    Attributes:
        alpha: Final architecture weights, shape ``(6, 5)``, columns in :data:`OPS` order.
        spec: The derived cell (:func:`derive_spec`).
        history: One dict per epoch: losses, val accuracy, beta, derived ``arch_str`` and
            ``param_free_share``.
    """

    alpha: torch.Tensor
    spec: CellSpec
    history: list[dict] = field(default_factory=list)
    argmax_spec: CellSpec | None = None
    perturbation: dict[str, dict[str, float]] | None = None


def derive_spec(alpha: torch.Tensor, exclude_none: bool = True) -> CellSpec:
    """Derive a discrete cell: the argmax op per edge.

    Args:
        alpha: Architecture weights of shape ``(6, 5)``.
        exclude_none: Skip ``none`` in the argmax (NAS-Bench-201's DARTS protocol).

    Raises:
        ConfigError: ``alpha`` does not have shape ``(6, 5)``.
    """
    a = torch.as_tensor(alpha).detach().float()
    if tuple(a.shape) != (len(EDGES), len(OPS)):
        raise ConfigError(f"alpha must have shape ({len(EDGES)}, {len(OPS)}), got {tuple(a.shape)}")
    if exclude_none:
        a = a.clone()
        a[:, OPS.index("none")] = -math.inf
    return CellSpec(tuple(OPS[int(i)] for i in a.argmax(dim=1)))


def derive_spec_by_perturbation(
    model: DartsNetwork, x: torch.Tensor, y: torch.Tensor
) -> tuple[CellSpec, dict[str, dict[str, float]]]:
    """Derive a cell by perturbation (DARTS-PT, Wang et al., ICLR 2021), one shot.

    For each edge, each op except ``none`` is removed from the trained supernet in turn and the
    supernet's accuracy on ``(x, y)`` is measured; the edge keeps the op whose removal costs the
    most. ``alpha`` says how much weight an op *got*, not how much the network *needs* it, and
    parameter-free ops collect weight early without being needed; the accuracy drop measures the
    need directly. DARTS-PT discretizes edge by edge with fine-tuning in between; we score all
    edges on the same trained supernet (no fine-tuning), which keeps selection to
    ``6 x 4`` evaluations.

    Returns:
        The derived cell and, per edge, the accuracy drop of removing each op.
    """
    model.eval()
    model.op_mask = None
    base = accuracy(model, x, y)
    ops, drops = [], {}
    try:
        for k, edge in enumerate(PARAM_NAMES):
            drops[edge] = {}
            for j, op in enumerate(OPS):
                if op == "none":
                    continue
                mask = torch.ones(len(EDGES), len(OPS))
                mask[k, j] = 0.0
                model.op_mask = mask
                drops[edge][op] = base - accuracy(model, x, y)
            # Ties (e.g. an op the network ignores entirely): the larger alpha decides.
            ops.append(
                max(
                    drops[edge],
                    key=lambda o, k=k: (
                        drops[edge][o],
                        float(model.alpha[k, OPS.index(o)].detach()),
                    ),
                )
            )
    finally:
        model.op_mask = None
    return CellSpec(tuple(ops)), drops


def op_prior(alpha: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per-edge softmax of ``alpha`` as ``{"edge0": {op: prob}, ...}`` (sampler prior)."""
    a = torch.as_tensor(alpha).detach().float()
    if tuple(a.shape) != (len(EDGES), len(OPS)):
        raise ConfigError(f"alpha must have shape ({len(EDGES)}, {len(OPS)}), got {tuple(a.shape)}")
    probs = F.softmax(a, dim=1)
    return {
        name: {op: float(probs[k, j]) for j, op in enumerate(OPS)}
        for k, name in enumerate(PARAM_NAMES)
    }


def param_free_share(spec: CellSpec) -> float:
    """Share of the cell's edges that carry a parameter-free op."""
    return sum(op in PARAMETER_FREE_OPS for op in spec.ops) / len(spec.ops)


def aux_skip_beta(progress: float) -> float:
    """DARTS- beta at search ``progress`` in [0, 1]: linear decay from 1 to 0."""
    return min(1.0, max(0.0, 1.0 - progress))


def _split_half(y: torch.Tensor, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_np = y.numpy()
    train_idx, val_idx = [], []
    for c in np.unique(y_np):  # stratified so both halves see every class
        idx = rng.permutation(np.flatnonzero(y_np == c))
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(xb), yb)


def _second_order_alpha_grad(
    model: DartsNetwork,
    weights: Sequence[nn.Parameter],
    batch_train: tuple[torch.Tensor, torch.Tensor],
    batch_val: tuple[torch.Tensor, torch.Tensor],
    xi: float,
    weight_decay: float,
    fd_scale: float = 0.01,
) -> torch.Tensor:
    """Unrolled DARTS gradient of alpha with a finite-difference Hessian-vector product.

    ``fd_scale`` is the length of the finite-difference step in weight space (0.01 in DARTS).
    """
    saved = [w.detach().clone() for w in weights]
    # Virtual step w' = w - xi * (grad_w L_train + wd * w).
    grads = torch.autograd.grad(_loss(model, *batch_train), weights, allow_unused=True)
    with torch.no_grad():
        for w, g in zip(weights, grads, strict=True):
            if g is not None:
                w.sub_(xi * (g + weight_decay * w))
    # grad of L_val(w', alpha) w.r.t. alpha and w'.
    out = torch.autograd.grad(_loss(model, *batch_val), [model.alpha, *weights], allow_unused=True)
    d_alpha = out[0]
    v = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, out[1:], strict=True)]
    norm = torch.sqrt(sum((g * g).sum() for g in v))
    eps = fd_scale / (float(norm) + 1e-12)
    hvp = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for w, s, g in zip(weights, saved, v, strict=True):
                w.copy_(s + sign * eps * g)
        (ga,) = torch.autograd.grad(_loss(model, *batch_train), [model.alpha])
        hvp.append(ga)
    with torch.no_grad():
        for w, s in zip(weights, saved, strict=True):
            w.copy_(s)
    return d_alpha - xi * (hvp[0] - hvp[1]) / (2.0 * eps)


def run_darts(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    shape: CellNetworkShape,
    epochs: int,
    order: int = 1,
    seed: int = 0,
    anti_collapse: bool = True,
    *,
    val_fraction: float = 0.5,
    batch_size: int = 64,
    w_lr: float = 0.025,
    w_momentum: float = 0.9,
    w_weight_decay: float = 3e-4,
    alpha_lr: float = 3e-4,
    alpha_weight_decay: float = 1e-3,
    grad_clip: float = 5.0,
    x_eval: torch.Tensor | None = None,
    y_eval: torch.Tensor | None = None,
    time_budget_s: float | None = None,
    warmup: float | None = None,
    selection: str = "perturbation",
) -> DartsResult:
    """Search the NAS-Bench-201 cell with DARTS.

    Args:
        x_train: Normalised images ``(N, C, H, W)``; split into a weight half and an alpha half.
        y_train: Labels ``(N,)``.
        shape: Network skeleton (channels, cells per stage, ...).
        epochs: Search epochs (one pass over the weight half each).
        order: 1 (first-order) or 2 (second-order, finite-difference Hessian-vector product).
        seed: Seeds the split, minibatch order and initialisation.
        anti_collapse: DARTS- auxiliary skip with beta decay and ``none`` excluded from the argmax
            (see the module docstring); ``False`` is vanilla DARTS with a plain argmax.
        val_fraction: Share of ``x_train`` used for the architecture step.
        batch_size: Minibatch size of both steps.
        w_lr: Peak weight learning rate (cosine-annealed, SGD with momentum); also ``xi``.
        w_momentum: Weight SGD momentum.
        w_weight_decay: Weight decay of the weights.
        alpha_lr: Adam learning rate of alpha (betas 0.5, 0.999 as in DARTS).
        alpha_weight_decay: Weight decay of alpha.
        grad_clip: Gradient-norm clip of the weights.
        x_eval: Optional held-out images whose supernet accuracy is logged per epoch.
        y_eval: Labels of ``x_eval``.
        selection: With ``anti_collapse``, how the cell is derived: ``"perturbation"``
            (:func:`derive_spec_by_perturbation` on the alpha half) or ``"argmax"`` of alpha
            (without ``none``). Without ``anti_collapse``: always the plain argmax.
        warmup: Share of the search (by progress, see ``beta``) during which alpha is frozen;
            ``None`` means 0.3 with ``anti_collapse`` and 0 without.
        time_budget_s: Stop at the first step after this many seconds (the epoch in progress
            is recorded as it stands).

    Returns:
        The final alpha, the derived spec and the per-epoch history.

    Raises:
        ConfigError: Bad ``order``, ``epochs`` or data.
    """
    if order not in (1, 2):
        raise ConfigError(f"DARTS order must be 1 or 2, got {order!r}")
    if epochs < 1:
        raise ConfigError(f"DARTS needs at least 1 epoch, got {epochs}")
    if len(x_train) != len(y_train) or len(x_train) < 4:
        raise ConfigError("DARTS needs at least 4 training images with one label each")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if selection not in ("perturbation", "argmax"):
        raise ConfigError(f"DARTS selection must be 'perturbation' or 'argmax', got {selection!r}")
    if warmup is None:
        warmup = 0.3 if anti_collapse else 0.0
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"warmup must be in [0, 1), got {warmup}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr_idx, va_idx = _split_half(y_train, val_fraction, seed)
    xt, yt = x_train[torch.from_numpy(tr_idx)], y_train[torch.from_numpy(tr_idx)]
    xv, yv = x_train[torch.from_numpy(va_idx)], y_train[torch.from_numpy(va_idx)]

    model = DartsNetwork(shape)
    weights = model.weight_parameters()
    w_opt = torch.optim.SGD(weights, lr=w_lr, momentum=w_momentum, weight_decay=w_weight_decay)
    steps = epochs * steps_per_epoch(len(xt), batch_size)
    w_sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=steps, eta_min=w_lr * 0.04)
    a_opt = torch.optim.Adam(
        [model.alpha], lr=alpha_lr, betas=(0.5, 0.999), weight_decay=alpha_weight_decay
    )
    history: list[dict] = []
    start = time.perf_counter()
    taken, out_of_time = 0, False

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """A weight batch and an alpha batch per step (the alpha half is cycled through)."""
        nonlocal out_of_time
        val_batches = iterate_minibatches(xv, yv, batch_size, rng)
        for xb, yb in iterate_minibatches(xt, yt, batch_size, rng):
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                out_of_time = True
                return
            vb = next(val_batches, None)
            if vb is None:
                val_batches = iterate_minibatches(xv, yv, batch_size, rng)
                vb = next(val_batches)
            yield xb, yb, *vb

    def step(batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        nonlocal taken
        xb, yb, xa, ya = batch
        # Progress counts steps, or time when a time box would end the search first, so beta
        # reaches 0 in the last steps either way.
        done = taken / max(1, steps - 1)
        if time_budget_s is not None:
            done = max(done, (time.perf_counter() - start) / (0.9 * time_budget_s))
        model.aux_skip_beta = aux_skip_beta(done) if anti_collapse else 0.0
        taken += 1
        # Architecture step (none during warm-up).
        a_opt.zero_grad(set_to_none=True)
        if done < warmup:
            with torch.no_grad():
                loss_a = _loss(model, xa, ya)
        elif order == 1:
            loss_a = _loss(model, xa, ya)
            (grad_a,) = torch.autograd.grad(loss_a, [model.alpha])
        else:
            xi = w_sched.get_last_lr()[0]
            grad_a = _second_order_alpha_grad(
                model, weights, (xb, yb), (xa, ya), xi, w_weight_decay
            )
            with torch.no_grad():
                loss_a = _loss(model, xa, ya)
        if done >= warmup:
            model.alpha.grad = grad_a
            a_opt.step()
        # Weight step: gradients of the weights only (the loop clips and steps them).
        loss_w = _loss(model, xb, yb)
        grads = torch.autograd.grad(loss_w, weights, allow_unused=True)
        for w, g in zip(weights, grads, strict=True):
            w.grad = g
        return {"loss": loss_w, "val_loss": loss_a}

    def after_epoch(epoch: int, losses: dict[str, float]) -> bool:
        spec = derive_spec(model.alpha, exclude_none=anti_collapse)
        record = {
            "epoch": epoch + 1,
            "train_loss": losses["loss"],
            "val_loss": losses.get("val_loss", 0.0),
            "beta": model.aux_skip_beta,
            "arch_str": spec.arch_str,
            "param_free_share": param_free_share(spec),
            "elapsed_s": time.perf_counter() - start,
        }
        if x_eval is not None and y_eval is not None:
            record["supernet_eval_acc"] = accuracy(model, x_eval, y_eval)
        history.append(record)
        return out_of_time

    train_loop(
        model,
        w_opt,
        step,
        batches,
        epochs=epochs,
        scheduler=w_sched,
        clip_grad_norm=grad_clip,
        after_epoch=after_epoch,
        progress_kind=None,
    )
    alpha = model.alpha.detach().clone()
    model.aux_skip_beta = 0.0
    argmax_spec = derive_spec(alpha, exclude_none=anti_collapse)
    if anti_collapse and selection == "perturbation":
        spec, drops = derive_spec_by_perturbation(model, xv, yv)
    else:
        spec, drops = argmax_spec, None
    return DartsResult(
        alpha=alpha, spec=spec, history=history, argmax_spec=argmax_spec, perturbation=drops
    )
