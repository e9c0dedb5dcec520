"""Bayesian optimization of training hyper-parameters (real Optuna samplers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nasforge.config import TuneParams
from nasforge.search.hparams import tune


def _train_fn(model: nn.Module, lr: float, weight_decay: float, epochs: int) -> None:
    # Record what the trial trained with in the model itself, so the test can tell which
    # trial's model came back.
    with torch.no_grad():
        model.weight.fill_(math.log10(lr))
        model.bias.fill_(float(epochs))


def _score(model: nn.Module) -> float:
    # Peak at lr = 1e-2 and 6 epochs.
    log_lr, epochs = float(model.weight.flatten()[0]), float(model.bias[0])
    return -((log_lr + 2.0) ** 2) - 0.01 * (epochs - 6) ** 2


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_tune_finds_the_optimum_and_returns_its_model(sampler):
    cfg = TuneParams(enabled=True, trials=20, sampler=sampler, lr=(1e-4, 1.0), epochs=(1, 12))
    start = nn.Linear(1, 1)
    before = start.weight.detach().clone()
    result = tune(start, _train_fn, _score, cfg, seed=3)
    assert 10**-2.5 < result.params["lr"] < 10**-1.5
    assert len(result.trials) == 20
    # the returned model is the best trial's own copy; the starting model is untouched
    assert _score(result.model) == pytest.approx(result.value)
    assert result.value == max(t["val_accuracy"] for t in result.trials)
    assert torch.equal(start.weight, before)


def test_tune_is_reproducible_with_a_seed():
    cfg = TuneParams(enabled=True, trials=6)
    a = tune(nn.Linear(1, 1), _train_fn, _score, cfg, seed=7)
    b = tune(nn.Linear(1, 1), _train_fn, _score, cfg, seed=7)
    assert [t["lr"] for t in a.trials] == [t["lr"] for t in b.trials]
