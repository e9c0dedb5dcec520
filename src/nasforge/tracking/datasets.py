"""Prepared datasets as MLflow dataset inputs of the stage runs that produce or read them.

A prepared dataset (``dataset.npz`` + ``meta.json``, see :mod:`nasforge.data.prepared`) is logged
with ``MlflowClient.log_inputs`` as an :class:`mlflow.data.meta_dataset.MetaDataset` (MLflow
keeps the metadata, not a copy of the data): its digest is the DVC hash of the folder (the hash
``dvc.lock`` records and the DVC remote stores it under, so ``dvc pull`` fetches exactly it), its
schema the image and label tensors, and its input tags the ``meta.json`` SHA-256 of
``dataset.npz``, the split sizes and how the stage used it (``mlflow.data.context``). The runs
table's Dataset column shows it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

#: How each stage uses the prepared dataset (MLflow's ``mlflow.data.context`` input tag).
CONTEXTS = {
    "prepare-data": "prepared",
    "search": "training",
    "train": "training",
    "prune": "training",
    "qat": "training",
    "export": "parity check",
    "benchmark": "evaluation",
}
_MAX_INPUT_TAG = 500  # MLflow's limit on an input tag value


def dataset_input(dataset_dir: Path, context: str, dvc_md5: str | None = None):
    """The :class:`mlflow.entities.DatasetInput` of a prepared dataset folder.

    Args:
        dataset_dir: The prepared dataset (with ``meta.json``).
        context: How the run used it (``training``, ``evaluation``, ...).
        dvc_md5: Its DVC hash if already known (computed otherwise).

    Raises:
        DataError: ``meta.json`` is missing or corrupt.
    """
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    from nasforge.artifacts.dataset import Dataset as PreparedDataset
    from nasforge.tracking.dvc import dvc_hash

    dataset_dir = Path(dataset_dir).absolute()
    meta = PreparedDataset.read(dataset_dir).to_body()
    schema = Schema(
        [
            TensorSpec(np.dtype("uint8"), (-1, *meta["input_shape"]), "images"),
            TensorSpec(np.dtype("int64"), (-1,), "labels"),
        ]
    )
    md5 = dvc_md5 or dvc_hash(dataset_dir)
    with warnings.catch_warnings():
        # MLflow registers the local source for both "" and "file" URIs and warns that a path
        # matches both; they are the same source.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(dataset_dir))
    ds = MetaDataset(
        source,
        name=Path(str(meta.get("source", dataset_dir.name))).name,
        digest=md5,
        schema=schema,
    )
    tags = {
        "mlflow.data.context": context,
        "dvc.md5": md5,
        "nasforge.sha256": str(meta.get("sha256", "")),
        "nasforge.source": str(meta.get("source", "")),
        "nasforge.counts": json.dumps(meta.get("counts", {}), separators=(",", ":")),
        "nasforge.classes": str(len(meta.get("classes", []))),
    }
    d = ds.to_dict()
    entity = Dataset(
        name=d["name"],
        digest=d["digest"],
        source_type=d["source_type"],
        source=d["source"],
        schema=d.get("schema"),
    )
    return DatasetInput(
        entity,
        tags=[InputTag(k, v[:_MAX_INPUT_TAG]) for k, v in tags.items() if v],
    )


def log_dataset(
    uri: str, run_id: str, dataset_dir: Path, stage: str, dvc_md5: str | None = None
) -> None:
    """Log a prepared dataset as an input of run ``run_id`` (context from the stage)."""
    from nasforge.tracking.mlflow_runs import client

    entry = dataset_input(dataset_dir, CONTEXTS.get(stage, stage), dvc_md5)
    client(uri).log_inputs(run_id, datasets=[entry])
