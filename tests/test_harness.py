"""Measurement harness: real ONNX Runtime and OpenVINO sessions on a tiny exported model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nasforge.bench.harness import LatencyResult, measure, predict
from nasforge.bench.sysinfo import system_info
from nasforge.errors import ModelFileError, TargetError

RUNTIME_TARGETS = ["onnxruntime-cpu", "openvino-cpu"]


class TwoConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = TwoConv().eval()
    path = tmp_path_factory.mktemp("models") / "two_conv.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 1, 8, 8),),
            str(path),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    return path, model


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
@pytest.mark.parametrize("batch", [1, 4])
def test_measure_real_session(tiny_model: tuple[Path, torch.nn.Module], target: str, batch: int):
    path, _ = tiny_model
    r = measure(path, target, batch_size=batch, warmup=2, repeats=7, threads=1)
    assert isinstance(r, LatencyResult)
    assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
    assert r.mean_ms > 0
    assert r.throughput_ips == pytest.approx(batch * 1000 / r.mean_ms)
    assert r.batch_size == batch and r.threads == 1 and r.repeats == 7
    assert r.input_shape == (batch, 1, 8, 8)  # read from the model
    assert r.precision == "fp32"
    assert r.peak_rss_bytes > 10 * 2**20  # at least the interpreter and the runtime library
    assert r.runtime == target.split("-")[0]
    assert r.runtime_version
    assert r.system["cpu_model"] and r.system["threads"] == 1
    json.dumps(r.as_dict())  # serialisable for benchmark records


def test_openvino_fp32_is_pinned(tiny_model: tuple[Path, torch.nn.Module]):
    # Where the CPU supports bf16 the plugin would otherwise execute bf16.
    r = measure(tiny_model[0], "openvino-cpu", batch_size=1, warmup=1, repeats=2)
    assert r.executed_precision == "f32"


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_predict_matches_torch(tiny_model: tuple[Path, torch.nn.Module], target: str):
    path, model = tiny_model
    x = np.random.default_rng(0).standard_normal((11, 1, 8, 8)).astype(np.float32)
    logits = predict(path, target, x, batch_size=4)  # 11 = 2 full batches + a padded one
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert logits.shape == (11, 10)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_explicit_input_shape(tiny_model: tuple[Path, torch.nn.Module]):
    r = measure(tiny_model[0], "openvino-cpu", 2, input_shape=(1, 12, 12), warmup=0, repeats=2)
    assert r.input_shape == (2, 1, 12, 12)


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_corrupt_and_missing_model(tmp_path: Path, target: str):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="bad.onnx"):
        measure(bad, target, repeats=1)
    with pytest.raises(ModelFileError, match="not found"):
        measure(tmp_path / "missing.onnx", target, repeats=1)


def test_ir_without_weights(tmp_path: Path):
    xml = tmp_path / "model.xml"
    xml.write_text("<net/>")
    with pytest.raises(ModelFileError, match="model.bin"):
        measure(xml, "openvino-cpu", repeats=1)


def test_int8_target_rejects_fp32_model(tiny_model: tuple[Path, torch.nn.Module]):
    with pytest.raises(TargetError, match="no quantization nodes"):
        measure(tiny_model[0], "openvino-cpu-int8", repeats=1)


def test_table_target_cannot_measure(tiny_model: tuple[Path, torch.nn.Module]):
    with pytest.raises(TargetError, match="latency table"):
        measure(tiny_model[0], "table:raspi4_latency_ms", repeats=1)


def test_system_info_fields():
    info = system_info(3)
    assert info["threads"] == 3
    assert info["physical_cores"] >= 1 and info["logical_cores"] >= info["physical_cores"]
    assert set(info["versions"]) >= {"onnxruntime", "openvino", "torch", "python"}
    assert isinstance(info["has_vnni"], bool)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " avx2 " in cpuinfo.read_text():
        assert "avx2" in info["isa_flags"]


@pytest.fixture(scope="module")
def int8_model(tiny_model: tuple[Path, torch.nn.Module], tmp_path_factory) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)}] * 4)

        def get_next(self):
            return next(self.batches, None)

    out = tmp_path_factory.mktemp("q") / "two_conv_int8.onnx"
    quantize_static(
        str(tiny_model[0]),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


@pytest.mark.parametrize("target", ["onnxruntime-cpu-int8", "openvino-cpu-int8", "openvino-cpu"])
def test_int8_qdq_model(int8_model: Path, target: str):
    r = measure(int8_model, target, batch_size=2, warmup=1, repeats=3, threads=1)
    assert r.precision == "int8"
    if r.runtime == "openvino":
        # OpenVINO runs the quantized convolutions in integer precision
        assert "i8" in r.executed_precision or "u8" in r.executed_precision


def test_openvino_ir_xml(tiny_model: tuple[Path, torch.nn.Module], tmp_path: Path):
    import openvino as ov

    path, model = tiny_model
    xml = tmp_path / "two_conv.xml"
    ov.save_model(ov.convert_model(str(path)), str(xml))
    r = measure(xml, "openvino-cpu", batch_size=3, warmup=1, repeats=2, threads=1)
    # save_model compresses weights to FP16; OpenVINO then reports f16 on the layers that read
    # them, but never bf16 (the pin to f32 holds).
    assert r.input_shape == (3, 1, 8, 8) and "bf16" not in r.executed_precision
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    # FP16-compressed weights: agreement to FP16 rounding
    np.testing.assert_allclose(predict(xml, "openvino-cpu", x, 2), expected, atol=3e-3)
    with pytest.raises(ModelFileError, match="cannot read OpenVINO IR"):
        measure(xml, "onnxruntime-cpu", repeats=1)
