"""Variants loaded from a real MLflow registry (SQLite store), champion alias respected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nasforge.errors import TrackingError
from nasforge.export.onnx import export_fp32
from nasforge.serve.variants import variants_from_registry
from nasforge.tracking.mlflow_runs import client, experiment_id
from nasforge.tracking.registry import Challenger, register_and_promote


def _folder(root: Path, name: str) -> Path:
    d = root / name / "model" / "fp32"
    d.mkdir(parents=True)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 6, 6))
    export_fp32(net, torch.zeros(2, 3, 6, 6), d / "fp32.onnx")
    return d


@pytest.mark.slow
def test_registry_variants_and_champion(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = experiment_id(uri, "serve")
    c = client(uri)
    versions = []
    for name, acc, lat in (("a", 0.90, 2.0), ("b", 0.80, 1.0)):
        run = c.create_run(exp).info.run_id  # one run per version: artifact paths differ
        ch = Challenger(
            "onnxruntime-cpu", _folder(tmp_path, name), acc, lat, 123, "fp32", name, "arch"
        )
        versions.append(register_and_promote(uri, run, "nasforge-onnxruntime-cpu", ch, 0.005, 0.1))
    # "b" is 4 points less accurate and only faster: the gate keeps "a" as champion.
    assert versions[0].promoted and not versions[1].promoted
    specs = variants_from_registry(uri, "onnxruntime-cpu", tmp_path / "cache")
    assert [s.name for s in specs] == ["nasforge-onnxruntime-cpu/v1", "nasforge-onnxruntime-cpu/v2"]
    assert [s.champion for s in specs] == [True, False]
    assert [s.accuracy for s in specs] == [0.90, 0.80]
    assert all(s.path.suffix == ".onnx" and s.path.is_file() for s in specs)
    assert json.dumps([s.size_bytes for s in specs]) == "[123, 123]"
    with pytest.raises(TrackingError, match="no registered versions"):
        variants_from_registry(uri, "openvino-cpu", tmp_path / "cache")
