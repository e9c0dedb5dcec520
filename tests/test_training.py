"""The one training loop (nasforge.training.train_loop) and its shared schedule."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from nasforge import progress
from nasforge.checkpoint import EpochCheckpoint
from nasforge.training import sgd_one_cycle, steps_per_epoch, train_loop


class _Killed(Exception):
    pass


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def _run(
    n: int,
    batch_size: int,
    epochs: int,
    checkpoint: EpochCheckpoint | None = None,
    kill_after: int | None = None,
) -> tuple[nn.Module, list[float]]:
    """A small regression trained with every source of randomness a trainer may have: numpy
    shuffling, a python RNG choosing a feature mask per step, a torch generator adding noise
    (checkpointed as extra state), and torch's global RNG (dropout)."""
    x, y = _data(n)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    py_rng, np_rng = random.Random(1), np.random.default_rng(2)
    noise = torch.Generator().manual_seed(3)
    opt, sched = sgd_one_cycle(
        model.parameters(),
        lr=0.05,
        weight_decay=1e-4,
        total_steps=epochs * steps_per_epoch(n, batch_size),
        pct_start=0.2,
    )

    def batches(epoch: int):
        order = torch.from_numpy(np_rng.permutation(n))
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]

    def step(batch):
        xb, yb = batch
        mask = torch.tensor([py_rng.random() < 0.8 for _ in range(4)], dtype=torch.float32)
        xb = xb * mask + 0.01 * torch.randn(xb.shape, generator=noise)
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        return loss

    def on_resume(first: int, extra: dict) -> None:
        noise.set_state(extra["noise"])

    def after_epoch(epoch: int, losses: dict) -> None:
        if kill_after is not None and epoch + 1 == kill_after:
            raise _Killed

    history = train_loop(
        model,
        opt,
        step,
        batches,
        epochs=epochs,
        scheduler=sched,
        clip_grad_norm=1.0,
        checkpoint=checkpoint,
        py_rng=py_rng,
        np_rng=np_rng,
        save_extra=lambda: {"noise": noise.get_state()},
        on_resume=on_resume,
        after_epoch=after_epoch,
        progress_kind=None,
    )
    return model, history


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 70),
    batch_size=st.integers(1, 32),
    epochs=st.integers(2, 4),
    data=st.data(),
)
def test_a_resumed_loop_ends_where_an_uninterrupted_one_does(n, batch_size, epochs, data):
    kill_after = data.draw(st.integers(1, epochs - 1))
    ref, ref_history = _run(n, batch_size, epochs)
    with tempfile.TemporaryDirectory() as tmp:
        ck = EpochCheckpoint(Path(tmp) / "loop.ckpt")
        with pytest.raises(_Killed):
            _run(n, batch_size, epochs, ck, kill_after)
        resumed, history = _run(n, batch_size, epochs, ck)
    assert history == ref_history
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    losses=st.data(),
    epochs=st.integers(1, 3),
)
def test_epoch_losses_are_sample_weighted_means_of_every_named_loss(sizes, losses, epochs):
    values = [
        [
            (
                losses.draw(st.floats(0, 10, allow_nan=False)),
                losses.draw(st.floats(-5, 5, allow_nan=False)),
            )
            for _ in sizes
        ]
        for _ in range(epochs)
    ]
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.0)
    seen: list[dict[str, float]] = []

    def batches(epoch: int):
        for k, size in enumerate(sizes):
            yield torch.zeros(size), epoch, k

    def step(batch):
        _, epoch, k = batch
        (w * 0).sum().backward()
        loss, other = values[epoch][k]
        return {"loss": torch.tensor(loss, dtype=torch.float64), "other": other}

    history = train_loop(
        nn.Module(),
        opt,
        step,
        batches,
        epochs=epochs,
        after_epoch=lambda e, m: seen.append(m),
        progress_kind=None,
    )
    total = sum(sizes)
    for e in range(epochs):
        for j, name in enumerate(("loss", "other")):
            expected = sum(v[j] * s for v, s in zip(values[e], sizes, strict=True)) / total
            assert seen[e][name] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert history == [m["loss"] for m in seen]


def test_an_epoch_without_batches_reports_zero_loss_and_after_epoch_can_stop():
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    epochs_seen = []

    def after_epoch(epoch, losses):
        epochs_seen.append((epoch, losses))
        return epoch == 1  # stop after the second epoch

    history = train_loop(
        nn.Module(),
        opt,
        lambda b: 0.0,
        lambda e: [],
        epochs=5,
        after_epoch=after_epoch,
        progress_kind=None,
    )
    assert history == [0.0, 0.0]
    assert epochs_seen == [(0, {"loss": 0.0}), (1, {"loss": 0.0})]
    assert train_loop(nn.Module(), opt, lambda b: 0.0, lambda e: [], epochs=0) == []


def test_clipping_touches_only_the_optimizers_parameters():
    model = nn.Linear(3, 1)
    frozen = nn.Parameter(torch.ones(3))  # gets a gradient but is not the optimizer's
    model.register_parameter("frozen", frozen)
    opt = torch.optim.SGD([model.weight, model.bias], lr=0.0)
    grads = {}

    def step(batch):
        (1000.0 * (model(batch[0]) + (frozen * batch[0]).sum(1, keepdim=True)).sum()).backward()
        return 0.0

    def after_epoch(epoch, losses):
        grads["weight"] = model.weight.grad.clone()
        grads["frozen"] = frozen.grad.clone()

    train_loop(
        model,
        opt,
        step,
        lambda e: [(torch.ones(2, 3),)],
        epochs=1,
        clip_grad_norm=1.0,
        after_epoch=after_epoch,
        progress_kind=None,
    )
    clipped = torch.cat([grads["weight"].flatten(), model.bias.grad.flatten()])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(grads["frozen"], torch.full((3,), 2000.0))


def test_train_mode_is_set_every_epoch_unless_the_graph_switches_its_own():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    modes = []

    def step(batch):
        modes.append(model.training)
        model.eval()  # e.g. an evaluation inside the step; the next epoch is in train mode again
        model(batch[0]).sum().backward()
        return 0.0

    batches = lambda e: [(torch.ones(1, 2),)]  # noqa: E731
    model.eval()
    train_loop(model, opt, step, batches, epochs=2, progress_kind=None)
    assert modes == [True, True]
    modes.clear()
    train_loop(model, opt, step, batches, epochs=2, train_mode=False, progress_kind=None)
    assert modes == [False, False]


def test_progress_is_reported_per_epoch_after_its_checkpoint(tmp_path, monkeypatch):
    events = tmp_path / "progress.jsonl"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(events))
    ck = EpochCheckpoint(tmp_path / "loop.ckpt")
    saved_epochs = []
    real_step = progress.step

    def watching_step(kind, done, total, **kw):
        state = ck.load()
        saved_epochs.append(None if state is None else state["epoch"] + 1)
        real_step(kind, done, total, **kw)

    monkeypatch.setattr(progress, "step", watching_step)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(batch):
        loss = model(batch[0]).pow(2).mean()
        loss.backward()
        return loss

    train_loop(
        model,
        opt,
        step,
        lambda e: [(torch.ones(4, 2),)],
        epochs=3,
        checkpoint=ck,
        progress_kind="epoch",
        echo=False,
    )
    # whoever sees "epoch k done" finds epoch k's checkpoint already on disk
    assert saved_epochs == [1, 2, 3]
    reported = [json.loads(line) for line in events.read_text().splitlines()]
    # the file gets the first and the last epoch at least (rate-limited in between)
    done = [(e["kind"], e["done"], e["total"]) for e in reported]
    assert done[0] == ("epoch", 1, 3) and done[-1] == ("epoch", 3, 3)
    assert all(e["info"]["loss"] >= 0 for e in reported)


@pytest.mark.parametrize("pct_start", [0.15, 0.2, 0.3])
def test_one_cycle_schedule_runs_every_step_count(pct_start):
    """Every schedule length steps through without error, peaks at ``lr`` and ends near zero
    (OneCycleLR alone divides by zero when the warm-up is exactly one step)."""
    w = nn.Parameter(torch.zeros(1))
    for total in range(1, 130):
        opt, sched = sgd_one_cycle(
            [w], lr=0.1, weight_decay=0.0, total_steps=total, pct_start=pct_start
        )
        lrs = []  # the learning rate of every optimizer step
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(lrs) <= 0.1 * (1 + 1e-9), total
        if total >= 4:
            assert max(lrs) == pytest.approx(0.1, rel=0.3), total
            assert lrs[-1] < 0.01, total


@pytest.mark.parametrize(("n", "batch", "steps"), [(1, 64, 1), (64, 64, 1), (65, 64, 2), (0, 8, 1)])
def test_steps_per_epoch_counts_the_short_last_batch(n, batch, steps):
    assert steps_per_epoch(n, batch) == steps
