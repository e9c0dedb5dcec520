"""train: fine-tune one Pareto candidate from inherited supernet weights, distilling from the
largest subnet (logit KD, Hinton et al. 2015).

Every search space alike (:mod:`nasforge.space.registry`, the space ``pareto.json`` names): the
candidate's architecture is read from its record
(:meth:`~nasforge.space.base.SearchSpace.spec_from_record`), the subnet and the teacher are cut
from the trained supernet with recalibrated BatchNorm and fine-tuned by the same ``fit`` (or BO
tuning) loop, and ``model.json`` gets the space's architecture fields.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from nasforge.artifacts.search_result import read_pareto
from nasforge.checkpoint import EpochCheckpoint, checkpoint_for
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import ConfigError, ModelFileError
from nasforge.models import MODEL_JSON, save_model
from nasforge.search.hparams import tune
from nasforge.space.cell import count_parameters
from nasforge.space.registry import space_of
from nasforge.stages import NO_CONTEXT, StageContext, StageResult
from nasforge.training import accuracy, fit, recalibrate_bn


def _calibration_batches(x_train: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [
        x_train[i : i + batch_size] for i in range(0, min(len(x_train), 8 * batch_size), batch_size)
    ]


def extract(
    supernet: torch.nn.Module, spec: Any, x_train: torch.Tensor, batch_size: int
) -> torch.nn.Module:
    """Standalone subnet with inherited weights and recalibrated BatchNorm.

    Works for the supernet of every search space (they follow OFA's ``set_active_subnet`` /
    ``get_active_subnet``).
    """
    supernet.set_active_subnet(spec)
    subnet = supernet.get_active_subnet()
    recalibrate_bn(subnet, _calibration_batches(x_train, batch_size))
    return subnet


def networks(
    pareto: dict[str, Any],
    cand: dict[str, Any],
    search: Path,
    x_train: torch.Tensor,
    input_shape: tuple[int, ...],
    batch_size: int,
) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """(teacher, student, architecture fields of model.json) of a candidate of ``search``.

    Raises:
        ModelFileError: the search output names an unknown space, or lacks the candidate's or
            the teacher's architecture.
    """
    try:
        space = space_of(pareto).from_pareto(pareto, input_shape)
    except ConfigError as err:
        raise ModelFileError(f"{search}: {err}") from None
    supernet = space.load_supernet(search)
    try:
        spec = space.spec_from_record(cand)
        teacher_spec = space.spec_from_record(pareto["teacher"])
    except (KeyError, ModelFileError) as err:
        raise ModelFileError(f"candidate {cand.get('id')} in {search}: {err}") from None
    teacher = extract(supernet, teacher_spec, x_train, batch_size)
    student = extract(supernet, spec, x_train, batch_size)
    return teacher, student, {"space": space.name, **space.model_fields(spec)}


def run(
    params: Params,
    dataset: Path,
    search: Path,
    candidate: int,
    output: Path,
    ctx: StageContext = NO_CONTEXT,
) -> StageResult:
    """Fine-tune candidate ``candidate`` of ``search``'s Pareto set and write a model artifact."""
    tp = params.train
    pareto = read_pareto(search)
    cands = pareto["candidates"]
    if not 0 <= candidate < len(cands):
        raise ConfigError(f"candidate {candidate} does not exist; the search produced {len(cands)}")
    cand = cands[candidate]
    data = load_prepared(dataset)
    x_train, y_train = data.tensors("train")
    x_val, y_val = data.tensors("val")
    x_test, y_test = data.tensors("test")
    teacher, student, arch = networks(
        pareto, cand, search, x_train, data.input_shape, tp.batch_size
    )
    inherited_acc = accuracy(student, x_val, y_val)
    teacher_acc = accuracy(teacher, x_val, y_val)
    torch.manual_seed(params.run.seed)
    t0 = time.perf_counter()

    def train_fn(
        model: torch.nn.Module,
        lr: float,
        weight_decay: float,
        epochs: int,
        checkpoint: EpochCheckpoint | None = None,
    ) -> None:
        fit(
            model,
            x_train,
            y_train,
            epochs=epochs,
            batch_size=tp.batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=params.run.seed,
            teacher=teacher,
            kd_temperature=tp.kd_temperature,
            kd_alpha=tp.kd_alpha,
            checkpoint=checkpoint,
        )

    chosen = {"lr": tp.lr, "weight_decay": tp.weight_decay, "epochs": tp.epochs}
    tuning = None
    if tp.tune.enabled:
        tuning = tune(
            student, train_fn, lambda m: accuracy(m, x_val, y_val), tp.tune, params.run.seed
        )
        student, chosen = tuning.model, tuning.params
        print(f"  BO ({tp.tune.sampler}, {tp.tune.trials} trials) chose {chosen}", flush=True)
    else:
        # A killed run continues after its last finished epoch (tuning trials start over).
        train_fn(student, tp.lr, tp.weight_decay, tp.epochs, checkpoint_for("train"))
    seconds = time.perf_counter() - t0
    metrics = {
        "chosen_lr": float(chosen["lr"]),
        "chosen_weight_decay": float(chosen["weight_decay"]),
        "chosen_epochs": int(chosen["epochs"]),
        "inherited_val_accuracy": inherited_acc,
        "teacher_val_accuracy": teacher_acc,
        "val_accuracy": accuracy(student, x_val, y_val),
        "test_accuracy": accuracy(student, x_test, y_test),
        "params": count_parameters(student),
        "train_seconds": seconds,
    }
    meta = {
        "candidate": cand["id"],
        **arch,
        "input_shape": list(data.input_shape),
        "mean": data.mean,
        "std": data.std,
        "classes": data.classes,
        "search_objectives": cand["objectives"],
        "history": [{"stage": "train", **metrics}],
        "hparam_trials": tuning.trials if tuning else [],
    }
    save_model(student, output, meta)
    print(
        f"  {cand['id']} {arch['arch_str']}: val {metrics['val_accuracy']:.4f} (inherited {inherited_acc:.4f}, teacher {teacher_acc:.4f})",
        flush=True,
    )
    return StageResult(
        metrics=metrics,
        tags={"candidate": cand["id"], "arch_str": arch["arch_str"], "space": arch["space"]},
        model_dir=output,
        artifacts=[output / MODEL_JSON],
    )
