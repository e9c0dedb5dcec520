"""prune: structured channel pruning with Torch-Pruning (channels physically removed), with
fine-tuning between steps."""

from __future__ import annotations

from pathlib import Path

import torch

from nasforge.checkpoint import checkpoint_for
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import naming_architecture
from nasforge.models import MODEL_JSON, load_model, save_model
from nasforge.space.cell import count_parameters
from nasforge.stages import NO_CONTEXT, StageContext, StageResult
from nasforge.training import accuracy, fit


def run(
    params: Params, dataset: Path, model: Path, output: Path, ctx: StageContext = NO_CONTEXT
) -> StageResult:
    """Prune the model artifact ``model`` and write the smaller one to ``output``."""
    pp = params.prune
    net, meta = load_model(model)
    data = load_prepared(dataset)
    x_train, y_train = data.tensors("train")
    x_val, y_val = data.tensors("val")
    x_test, y_test = data.tensors("test")
    before = {"val_accuracy": accuracy(net, x_val, y_val), "params": count_parameters(net)}
    torch.manual_seed(params.run.seed)
    epochs_per_step = max(1, pp.finetune_epochs // pp.steps) if pp.finetune_epochs else 0

    def finetune(m: torch.nn.Module) -> None:
        # Inside prune_structured's step folder: a killed fine-tuning resumes from its epoch.
        fit(
            m,
            x_train,
            y_train,
            epochs=epochs_per_step,
            batch_size=params.train.batch_size,
            lr=pp.lr,
            seed=params.run.seed,
            checkpoint=checkpoint_for("finetune"),
        )

    def gradients(m: torch.nn.Module) -> None:
        # Taylor importance: |w * dL/dw| from a few training batches.
        m.train()
        for i in range(0, 256, 64):
            torch.nn.functional.cross_entropy(
                m(x_train[i : i + 64]), y_train[i : i + 64]
            ).backward()

    if pp.channel_ratio > 0:
        from nasforge.compress.prune import prune_structured

        with naming_architecture("prune", meta["arch_str"]):
            net, report = prune_structured(
                net,
                x_train[:2],
                channel_ratio=pp.channel_ratio,
                importance=pp.importance,
                steps=pp.steps,
                finetune=finetune if epochs_per_step else None,
                grad_fn=gradients if pp.importance == "taylor" else None,
                checkpoint_dir=ctx.work_dir,
            )
    else:
        report = {"skipped": True}
    metrics = {
        "val_accuracy_before": before["val_accuracy"],
        "params_before": before["params"],
        "val_accuracy": accuracy(net, x_val, y_val),
        "test_accuracy": accuracy(net, x_test, y_test),
        "params": count_parameters(net),
    }
    for k, v in report.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            metrics[f"prune_{k}"] = v
    meta["history"] = [*meta.get("history", []), {"stage": "prune", **metrics}]
    save_model(net, output, meta, pruned=pp.channel_ratio > 0)
    print(
        f"  pruned {meta['candidate']}: params {before['params']} -> {metrics['params']}, val {before['val_accuracy']:.4f} -> {metrics['val_accuracy']:.4f}",
        flush=True,
    )
    return StageResult(
        metrics=metrics,
        tags={"candidate": meta["candidate"]},
        model_dir=output,
        artifacts=[output / MODEL_JSON],
    )
