"""The benchmark stage's energy and memory figures on a real tiny ONNX model (runtime and table
targets; the RAPL path through a fake counter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nasforge.data.prepared import load_prepared
from nasforge.export.onnx import export_fp32
from nasforge.hardware import energy
from nasforge.hardware.memory import peak_activation_bytes
from nasforge.hardware.targets import get_target
from nasforge.stages.benchmark import benchmark_one
from nasforge.stages.export import EXPORT_JSON, FILES
from tests.conftest import NB201_CSV, tiny_params

# In the shared NB201 dev table, with a pi5_onnx_energy_mj value of 6.52614.
ARCH = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|none~0|none~1|avg_pool_3x3~2|"


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, digits_dir) -> Path:
    """An export folder: a conv net's ONNX file (also standing for the INT8 one), export.json."""
    d = tmp_path_factory.mktemp("bench-export") / "cand-0"
    d.mkdir()
    x, _ = load_prepared(digits_dir).numpy("test")
    torch.manual_seed(0)
    export_fp32(_Tiny().eval(), torch.from_numpy(x[:2]), d / FILES[("onnxruntime", "fp32")])
    shutil.copy(d / FILES[("onnxruntime", "fp32")], d / FILES[("onnxruntime", "int8")])
    (d / EXPORT_JSON).write_text(json.dumps({"candidate": "cand-0", "arch_str": ARCH}))
    return d


def _run(export_dir, digits_dir, tmp_path, target):
    p = tiny_params(targets=[target])
    t = get_target(target)
    doc = benchmark_one(p, load_prepared(digits_dir), export_dir, t, tmp_path / "bench")
    on_disk = json.loads((tmp_path / "bench" / "cand-0" / "benchmark.json").read_text())
    assert on_disk["results"].keys() == doc["results"].keys()
    return p, on_disk


def test_runtime_target_memory_and_estimated_energy(export_dir, digits_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "rapl_domains", lambda: [])  # no meter here: estimated
    p, doc = _run(export_dir, digits_dir, tmp_path, "onnxruntime-cpu")
    weights = 8 * 1 * 9 + 8 + 8 * 64 * 10 + 10
    for precision in ("fp32", "int8"):
        r = doc["results"][precision]
        # Keys promotion and the report read are still there.
        assert {"test_accuracy", "size_bytes", "latency", "energy", "files", "dvc_md5"} <= set(r)
        assert set(r["latency"]) == {"1", "4"}
        for lat in r["latency"].values():
            assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        e = r["energy"]
        assert e["source"] == "estimated" and e["batch_size"] == 1
        assert e["method"] == "estimated: 6.25 W/core x 2 cores x latency"
        assert e["mj"] == pytest.approx(6.25 * 2 * r["latency"]["1"]["p50_ms"])
        assert set(r["energy_per_batch"]) == {"1", "4"}
        assert r["energy_per_batch"]["4"]["batch_size"] == 4
        m = r["memory"]
        assert m["param_count"] == weights
        assert m["weights_bytes"] == m["weights_bytes_per_precision"][precision]
        assert m["weights_bytes_per_precision"]["fp32"] == 4 * weights
        acts = m["peak_activation_bytes"]
        assert set(acts) == {"1", "4"} and acts["4"] == 4 * acts["1"] > 0
        model = export_dir / FILES[("onnxruntime", precision)]
        assert acts["1"] == peak_activation_bytes(model, 1)
        for bs in ("1", "4"):
            assert m["measured_peak_rss_bytes"][bs] == r["latency"][bs]["peak_rss_bytes"] > 0
            assert m["measured_session_rss_bytes"][bs] == r["latency"][bs]["session_rss_bytes"]
        assert m["source"]["weights"].startswith("model:")
        assert m["source"]["peak_activation"].startswith("model:")
        assert m["source"]["measured_rss"].startswith("measured:")
        assert "onnxruntime" in m["source"]["measured_rss"]


def test_runtime_target_energy_measured_with_a_meter(export_dir, digits_dir, tmp_path, monkeypatch):
    """With a readable RAPL counter the model itself runs under the meter (fake counter: +1 J
    per read)."""
    fake = tmp_path / "intel-rapl:0"
    fake.mkdir()
    (fake / "energy_uj").write_text("0")
    reads = iter(range(0, 10**9, 1_000_000))
    monkeypatch.setattr(energy, "rapl_domains", lambda: [fake])
    monkeypatch.setattr(energy, "_read_rapl", lambda domains: [next(reads)])
    calls = []
    real = energy.model_energy

    def spy(model_path, *a, **k):
        calls.append(Path(model_path))
        return real(model_path, *a, **{**k, "seconds": 0.05})

    monkeypatch.setattr(energy, "model_energy", spy)
    _, doc = _run(export_dir, digits_dir, tmp_path, "onnxruntime-cpu")
    for precision in ("fp32", "int8"):
        for bs, e in doc["results"][precision]["energy_per_batch"].items():
            assert e["source"] == "measured" and e["method"].startswith("rapl"), e
            assert e["mj"] > 0 and e["batch_size"] == int(bs)
    assert sorted({c.name for c in calls}) == ["fp32.onnx", "int8.onnx"] and len(calls) == 4


@pytest.mark.skipif(not NB201_CSV.is_file(), reason="needs the shared NB201 table")
def test_table_target_energy_from_the_table_and_analytic_memory(export_dir, digits_dir, tmp_path):
    _, doc = _run(export_dir, digits_dir, tmp_path, "table:pi5_onnx_latency_ms")
    for precision in ("fp32", "int8"):
        r = doc["results"][precision]
        assert r["latency"]["1"]["source"] == "table"
        e = r["energy"]
        assert e["source"] == "measured" and e["method"] == "table:pi5_onnx_energy_mj"
        assert e["mj"] == pytest.approx(6.52614)
        m = r["memory"]
        assert set(m["peak_activation_bytes"]) == {"1", "4"}
        assert "measured_peak_rss_bytes" not in m
        assert m["source"]["measured_rss"].startswith("not measured")
    assert np.isfinite(doc["results"]["int8"]["test_accuracy"])
