"""train: fine-tune one Pareto candidate from inherited supernet weights, distilling from the
largest subnet (logit KD, Hinton et al. 2015).

Both search spaces: a cell candidate carries its NB201 ``arch_str``, a macro candidate
(``pareto.json`` with ``space: macro``) its :class:`~nasforge.space.macro.MacroSpec` as
``spec``; either way the subnet and the teacher are cut from the trained supernet with
recalibrated BatchNorm and fine-tuned by the same ``fit`` (or BO tuning) loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nasforge.checkpoint import EpochCheckpoint, checkpoint_for
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


def _calibration_batches(x_train: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [
        x_train[i : i + batch_size] for i in range(0, min(len(x_train), 8 * batch_size), batch_size)
    ]


def extract(
    supernet: torch.nn.Module, spec: Any, x_train: torch.Tensor, batch_size: int
) -> torch.nn.Module:
    """Standalone subnet with inherited weights and recalibrated BatchNorm.

    Works for a :class:`CellSupernet` with a :class:`CellSpec` and for a
    :class:`~nasforge.supernet.macro_supernet.MacroSupernet` with a
    :class:`~nasforge.space.macro.MacroSpec` (both follow OFA's ``set_active_subnet`` /
    ``get_active_subnet``).
    """
    supernet.set_active_subnet(spec)
    subnet = supernet.get_active_subnet()
    recalibrate_bn(subnet, _calibration_batches(x_train, batch_size))
    return subnet


def _cell_networks(
    pareto: dict[str, Any], cand: dict[str, Any], search: Path, x_train: torch.Tensor, bs: int
) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """(teacher, student, architecture fields of model.json) for a cell-space candidate."""
    shape = CellNetworkShape(**pareto["shape"])
    supernet = load_supernet(search, shape)
    spec = CellSpec.from_arch_str(cand["arch_str"])
    teacher = extract(supernet, LARGEST_SPEC, x_train, bs)
    student = extract(supernet, spec, x_train, bs)
    return teacher, student, {"space": "cell", "arch_str": spec.arch_str, "shape": shape.to_dict()}


def _macro_networks(
    pareto: dict[str, Any], cand: dict[str, Any], search: Path, x_train: torch.Tensor, bs: int
) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """(teacher, student, architecture fields of model.json) for a macro-space candidate; the
    teacher is the largest spec of the searched part of the space."""
    from nasforge.space.macro import MacroSpec
    from nasforge.supernet.macro_search import load_macro_supernet, macro_arch_str

    shape = {
        "in_channels": int(pareto["input_shape"][0]),
        "num_classes": int(pareto["num_classes"]),
    }
    supernet = load_macro_supernet(search, shape["in_channels"], shape["num_classes"])
    if "spec" not in cand:
        raise ModelFileError(f"macro candidate {cand.get('id')} in {search} has no spec")
    spec = MacroSpec.from_json(json.dumps(cand["spec"]))
    teacher_spec = MacroSpec.from_json(json.dumps(pareto["teacher"]["spec"]))
    teacher = extract(supernet, teacher_spec, x_train, bs)
    student = extract(supernet, spec, x_train, bs)
    arch = {
        "space": "macro",
        "arch_str": macro_arch_str(spec),
        "spec": json.loads(spec.to_json()),
        "shape": shape,
    }
    return teacher, student, arch


def run(params: Params, dataset: Path, search: Path, candidate: int, output: Path) -> StageResult:
    """Fine-tune candidate ``candidate`` of ``search``'s Pareto set and write a model artifact."""
    tp = params.train
    pareto = load_pareto(search)
    cands = pareto["candidates"]
    if not 0 <= candidate < len(cands):
        raise ConfigError(f"candidate {candidate} does not exist; the search produced {len(cands)}")
    cand = cands[candidate]
    data = load_prepared(dataset)
    x_train, y_train = data.tensors("train")
    x_val, y_val = data.tensors("val")
    x_test, y_test = data.tensors("test")
    networks = _macro_networks if pareto.get("space") == "macro" else _cell_networks
    teacher, student, arch = networks(pareto, cand, search, x_train, tp.batch_size)
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
        artifacts=[output / "model.json"],
    )
