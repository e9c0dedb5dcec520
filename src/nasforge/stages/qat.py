"""qat: INT8 quantization-aware training with torchao pt2e (X86InductorQuantizer, is_qat=True),
converted and saved as a ``torch.export`` program for the export stage."""

from __future__ import annotations

from pathlib import Path

import torch

from nasforge.artifacts.quantized_model import (
    MODEL_JSON,
    PROGRAM,
    QuantizedModel,
    load_program,
    save_program,
)
from nasforge.checkpoint import checkpoint_for
from nasforge.compress.qat import quantize_qat
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import naming_architecture
from nasforge.models import load_model
from nasforge.stages import NO_CONTEXT, StageContext, StageResult
from nasforge.training import accuracy

#: The INT8 program of the folder (the name lives with the artifact).
QUANTIZED = PROGRAM


def run(
    params: Params, dataset: Path, model: Path, output: Path, ctx: StageContext = NO_CONTEXT
) -> StageResult:
    """Quantize the model artifact ``model`` with QAT; write ``model_int8.pt2`` + ``model.json``."""
    qp = params.qat
    net, meta = load_model(model)
    data = load_prepared(dataset)
    x_train, y_train = data.numpy("train")
    x_val, y_val = data.tensors("val")
    x_test, y_test = data.tensors("test")
    fp32_val = accuracy(net, x_val, y_val)
    torch.manual_seed(params.run.seed)
    example = torch.from_numpy(x_train[:2])
    with naming_architecture("qat", meta["arch_str"]):
        result = quantize_qat(
            net,
            example,
            (x_train, y_train),
            epochs=qp.epochs,
            lr=qp.lr,
            batch_size=qp.batch_size,
            seed=params.run.seed,
            freeze_bn_after_epochs=qp.freeze_bn_after_epochs,
            checkpoint=checkpoint_for("qat"),
        )
    save_program(result.model, example, output, result.scheme)
    # Accuracy of what was saved, reloaded, so the number is the artifact's and not the in-memory graph's.
    reloaded = load_program(output).module()
    metrics = {
        "fp32_val_accuracy": fp32_val,
        "val_accuracy": accuracy(reloaded, x_val, y_val),
        "test_accuracy": accuracy(reloaded, x_test, y_test),
    }
    meta["history"] = [
        *meta.get("history", []),
        {"stage": "qat", **metrics, "scheme": result.scheme},
    ]
    meta.pop("quant_scheme", None)
    QuantizedModel(quant_scheme=result.scheme, meta=meta).write(output)
    print(
        f"  QAT {meta['candidate']}: val {fp32_val:.4f} (fp32) -> {metrics['val_accuracy']:.4f} (int8), scheme {result.scheme}",
        flush=True,
    )
    tags = {
        "candidate": meta["candidate"],
        **{f"quant.{k}": str(v) for k, v in result.scheme.items()},
    }
    return StageResult(
        metrics=metrics, tags=tags, model_dir=output, artifacts=[output / MODEL_JSON]
    )
