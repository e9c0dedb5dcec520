"""train: fine-tune one Pareto candidate from inherited supernet weights, distilling from the
largest subnet (logit KD, Hinton et al. 2015)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import ConfigError, ModelFileError
from nasforge.models import save_model
from nasforge.search.hparams import tune
from nasforge.space.cell import CellNetworkShape, count_parameters
from nasforge.space.nb201 import CellSpec
from nasforge.stages import StageResult
from nasforge.stages.search import load_pareto
from nasforge.supernet.cell_supernet import LARGEST_SPEC, CellSupernet, recalibrate_bn
from nasforge.training import accuracy, fit


def load_supernet(search_dir: Path, shape: CellNetworkShape) -> CellSupernet:
    """Rebuild the trained supernet saved by the search stage."""
    f = Path(search_dir) / "supernet.safetensors"
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"corrupt or missing supernet weights {f}: {err}") from None
    supernet = CellSupernet(shape)
    try:
        supernet.load_state_dict(state)
    except RuntimeError as err:
        raise ModelFileError(f"supernet weights {f} do not match the search space: {err}") from None
    return supernet


def extract(
    supernet: CellSupernet, spec: CellSpec, x_train: torch.Tensor, batch_size: int
) -> torch.nn.Module:
    """Standalone subnet with inherited weights and recalibrated BatchNorm."""
    supernet.set_active_subnet(spec)
    subnet = supernet.get_active_subnet()
    recalibrate_bn(
        subnet,
        [
            x_train[i : i + batch_size]
            for i in range(0, min(len(x_train), 8 * batch_size), batch_size)
        ],
    )
    return subnet


def run(params: Params, dataset: Path, search: Path, candidate: int, output: Path) -> StageResult:
    """Fine-tune candidate ``candidate`` of ``search``'s Pareto set and write a model artifact."""
    tp = params.train
    pareto = load_pareto(search)
    cands = pareto["candidates"]
    if not 0 <= candidate < len(cands):
        raise ConfigError(f"candidate {candidate} does not exist; the search produced {len(cands)}")
    cand = cands[candidate]
    data = load_prepared(dataset)
    shape = CellNetworkShape(**pareto["shape"])
    x_train, y_train = data.tensors("train")
    x_val, y_val = data.tensors("val")
    x_test, y_test = data.tensors("test")
    supernet = load_supernet(search, shape)
    spec = CellSpec.from_arch_str(cand["arch_str"])
    teacher = extract(supernet, LARGEST_SPEC, x_train, tp.batch_size)
    student = extract(supernet, spec, x_train, tp.batch_size)
    inherited_acc = accuracy(student, x_val, y_val)
    teacher_acc = accuracy(teacher, x_val, y_val)
    torch.manual_seed(params.run.seed)
    t0 = time.perf_counter()

    def train_fn(model: torch.nn.Module, lr: float, weight_decay: float, epochs: int) -> None:
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
        train_fn(student, tp.lr, tp.weight_decay, tp.epochs)
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
        "arch_str": spec.arch_str,
        "shape": shape.to_dict(),
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
        f"  {cand['id']} {spec.arch_str}: val {metrics['val_accuracy']:.4f} (inherited {inherited_acc:.4f}, teacher {teacher_acc:.4f})",
        flush=True,
    )
    return StageResult(
        metrics=metrics,
        tags={"candidate": cand["id"], "arch_str": spec.arch_str},
        model_dir=output,
        artifacts=[output / "model.json"],
    )
