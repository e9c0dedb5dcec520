"""Bayesian optimization of training hyper-parameters (learning rate, weight decay, epochs).

Optuna's TPE or GP sampler proposes; each trial fine-tunes a fresh copy of the model and is scored
by validation accuracy. The study is in memory: trials are minutes of CPU at most, and the train
stage's atomic output means an interrupted stage simply runs again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from torch import nn

from nasforge.config import TuneParams


@dataclass
class TuneResult:
    """The best trial: its hyper-parameters, validation score and trained model, plus all trials."""

    params: dict[str, Any]
    value: float
    model: nn.Module
    trials: list[dict[str, Any]] = field(default_factory=list)


def make_hparam_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's own Bayesian samplers: ``tpe`` (Parzen estimators) or ``gp`` (Gaussian process)."""
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def tune(
    model: nn.Module,
    train_fn: Callable[[nn.Module, float, float, int], None],
    score_fn: Callable[[nn.Module], float],
    cfg: TuneParams,
    seed: int = 0,
) -> TuneResult:
    """Search ``lr`` (log), ``weight_decay`` (log) and ``epochs`` for the highest score.

    Args:
        model: Starting point; every trial trains its own deep copy.
        train_fn: ``train_fn(model, lr, weight_decay, epochs)`` trains in place.
        score_fn: Validation score of a trained model (higher is better).
        cfg: Ranges, number of trials and sampler.
        seed: Sampler seed (the same seed gives the same proposals).

    Returns:
        The best trial's hyper-parameters, score and model, and every trial's record.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=make_hparam_sampler(cfg.sampler, seed)
    )
    best: dict[str, Any] = {"value": float("-inf"), "model": None}

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", *cfg.lr, log=True)
        wd = trial.suggest_float("weight_decay", *cfg.weight_decay, log=True)
        epochs = trial.suggest_int("epochs", *cfg.epochs)
        candidate = copy.deepcopy(model)
        train_fn(candidate, lr, wd, epochs)
        value = float(score_fn(candidate))
        # Keep only the best model in memory; ties keep the earlier (cheaper to explain) trial.
        if value > best["value"]:
            best.update(value=value, model=candidate)
        return value

    study.optimize(objective, n_trials=cfg.trials)
    trials = [
        {"number": t.number, **t.params, "val_accuracy": t.value}
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]
    return TuneResult(
        params=dict(study.best_trial.params),
        value=float(study.best_value),
        model=best["model"],
        trials=trials,
    )
