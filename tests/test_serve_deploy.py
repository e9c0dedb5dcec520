"""Triton repository and KServe manifest generators.

Kinds of check: every config.pbtxt is parsed by Triton's own ``inference.ModelConfig`` protobuf
schema (from tritonclient; unknown fields or wrong types fail) plus semantic checks against the
model; the InferenceService is checked against a hand-written JSON Schema subset of the KServe
CRD (no package here ships the CRD's schema).
"""

from __future__ import annotations

import stat

import pytest
import torch
import yaml
from google.protobuf import text_format
from torch import nn

from nasforge.atomic import default_mode
from nasforge.errors import ConfigError, ModelFileError
from nasforge.export.onnx import export_fp32
from nasforge.export.openvino import to_openvino_ir
from nasforge.serve.kserve import (
    inference_service,
    validate_inference_service,
    write_inference_service,
)
from nasforge.serve.triton import export_triton_repository, model_config_module, parse_config


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton-model")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    path = export_fp32(net, torch.zeros(2, 3, 16, 16), d / "fp32.onnx")
    xml = d / "openvino" / "fp32.xml"
    to_openvino_ir(path, xml)
    return path, xml


def test_triton_repository_parses_with_triton_schema(onnx_model, tmp_path):
    onnx_path, xml = onnx_model
    repo = export_triton_repository(
        onnx_path,
        tmp_path / "repo",
        "cifar",
        runtime_files={"openvino": xml},
        max_batch_size=16,
        max_queue_delay_ms=2.5,
    )
    # a normal folder's mode (readable by the model server's user), not mkdtemp's 0700
    assert stat.S_IMODE(repo.stat().st_mode) == default_mode(directory=True)
    pb = model_config_module()
    seen = {}
    for backend in ("onnxruntime", "openvino", "tensorrt"):
        mdir = repo / f"cifar-{backend}"
        cfg = parse_config((mdir / "config.pbtxt").read_text())
        seen[backend] = cfg
        assert cfg.name == f"cifar-{backend}"
        assert cfg.max_batch_size == 16
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 2500
        assert list(cfg.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8, 16]
        assert list(cfg.input[0].dims) == [3, 16, 16] and list(cfg.output[0].dims) == [10]
        assert cfg.input[0].data_type == pb.DataType.Value("TYPE_FP32")
    assert seen["onnxruntime"].backend == "onnxruntime"
    assert (repo / "cifar-onnxruntime" / "1" / "model.onnx").is_file()
    assert seen["openvino"].backend == "openvino"
    assert (repo / "cifar-openvino" / "1" / "model.bin").is_file()
    trt = seen["tensorrt"]
    assert trt.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert trt.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert seen["onnxruntime"].instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU


def test_triton_schema_check_can_fail():
    with pytest.raises(text_format.ParseError):
        parse_config('name: "x" max_batch_size: 8 dynamic_batching { max_queue_delay_ms: 5 }')
    with pytest.raises(text_format.ParseError):
        parse_config('name: "x" max_batch_size: "eight"')


def test_triton_export_bad_input_leaves_nothing(onnx_model, tmp_path):
    onnx_path, _ = onnx_model
    with pytest.raises(ConfigError, match="unknown Triton backend"):
        export_triton_repository(onnx_path, tmp_path / "r1", "m", backends=("onnxruntime", "tf"))
    assert not (tmp_path / "r1").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ModelFileError, match="not found"):
        export_triton_repository(tmp_path / "missing.onnx", tmp_path / "r2", "m")
    with pytest.raises(ConfigError, match="preferred batch sizes"):
        export_triton_repository(
            onnx_path, tmp_path / "r3", "m", max_batch_size=4, preferred_batch_sizes=[8]
        )


def test_inference_service_validates_and_round_trips(tmp_path):
    doc = inference_service("nasforge-cifar", "s3://models/nasforge/repo", namespace="ml", gpu=True)
    path = write_inference_service(doc, tmp_path / "isvc.yaml")
    assert stat.S_IMODE(path.stat().st_mode) == default_mode()  # not mkstemp's 0600
    loaded = yaml.safe_load(path.read_text())
    assert loaded == doc
    validate_inference_service(loaded)
    model = loaded["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda d: d["metadata"].update(name="Bad_Name"), "metadata/name"),
        (lambda d: d["spec"]["predictor"]["model"].update(storageUri="/local/path"), "storageUri"),
        (lambda d: d["spec"]["predictor"]["model"].update(storgeUri="s3://x/y"), "storgeUri"),
        (lambda d: d.update(kind="Deployment"), "kind"),
        (
            lambda d: d["spec"]["predictor"]["model"]["resources"]["limits"].update(cpu="two"),
            "limits",
        ),
        (lambda d: d["spec"]["predictor"].update(minReplicas=3), "minReplicas"),
    ],
)
def test_inference_service_check_can_fail(mutate, msg):
    doc = inference_service("svc", "pvc://vol/repo")
    mutate(doc)
    with pytest.raises(ConfigError, match=msg):
        validate_inference_service(doc)
    with pytest.raises(ConfigError):
        inference_service("UPPER", "s3://b/r")
