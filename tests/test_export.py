"""ONNX FP32 / INT8 QDQ export, OpenVINO IR, and parity, on tiny models and sklearn digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from nasforge.compress.qat import save_quantized
from nasforge.errors import ModelFileError
from nasforge.export import onnx as onnx_export
from nasforge.export import openvino as ov_export
from nasforge.export.parity import check_parity, runtime_runner
from tests.compress_helpers import accuracy, digits, qat_bundle, trained_tiny


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def int8_files(out_dir: Path) -> dict[str, Path]:
    """The qat stage's artifact (.pt2) and the export stage's INT8 ONNX made from it."""
    x, _, _, _ = digits()
    _, result = qat_bundle()
    pt2 = save_quantized(result.model, torch.from_numpy(x[:8]), out_dir / "int8.pt2")
    onnx_path = onnx_export.export_int8(pt2, torch.from_numpy(x[:8]), out_dir / "int8.onnx")
    return {"pt2": pt2, "onnx": onnx_path}


@pytest.fixture(scope="module")
def fp32_onnx(out_dir: Path) -> Path:
    x, _, _, _ = digits()
    return onnx_export.export_fp32(trained_tiny(), torch.from_numpy(x[:8]), out_dir / "fp32.onnx")


def _batch_dim(path: Path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


def test_int8_onnx_is_qdq_with_dynamic_batch(int8_files: dict[str, Path]) -> None:
    counts = onnx_export.op_counts(int8_files["onnx"])
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    assert counts["Conv"] > 0
    assert _batch_dim(int8_files["onnx"]).dim_param == "batch"
    onnx.checker.check_model(str(int8_files["onnx"]), full_check=True)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_runs_batch_1_and_7(int8_files: dict[str, Path], runtime: str) -> None:
    _, _, xt, _ = digits()
    run = runtime_runner(int8_files["onnx"], runtime)
    for batch in (1, 7):
        assert run(xt[:batch]).shape == (batch, 10)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_parity_with_converted_torch_model(int8_files: dict[str, Path], runtime: str) -> None:
    _, _, xt, yt = digits()
    _, result = qat_bundle()
    report = check_parity(result.model, int8_files["onnx"], xt, runtime, batch_size=100)
    assert report["n"] == len(xt)
    assert report["top1_agreement"] >= 0.99 and report["passed"], report
    assert report["max_abs_diff"] < 0.5, report
    # the exported model is as accurate as the torch one
    acc = float((runtime_runner(int8_files["onnx"], runtime)(xt).argmax(1) == yt).mean())
    assert acc > 0.9


def test_int8_executes_int8_kernels_in_openvino(int8_files: dict[str, Path]) -> None:
    compiled = ov_export.compile_model(int8_files["onnx"], precision="f32")
    layers = ov_export.runtime_layer_types(compiled)
    assert layers and all(p in ("u8", "i8") for p in layers.values()), layers


def test_fp32_export_parity_and_openvino_ir(fp32_onnx: Path, out_dir: Path) -> None:
    _, _, xt, _ = digits()
    model = trained_tiny()
    assert _batch_dim(fp32_onnx).dim_param == "batch"
    assert "QuantizeLinear" not in onnx_export.op_counts(fp32_onnx)
    xml = ov_export.to_openvino_ir(fp32_onnx, out_dir / "fp32.xml")
    assert xml.with_suffix(".bin").stat().st_size > 0
    compiled = ov_export.compile_model(xml, precision="f32")
    assert ov_export.compiled_precision(compiled) == "f32"
    assert "bf16" not in ov_export.runtime_precisions(compiled)
    for path, runtime in ((fp32_onnx, "onnxruntime"), (fp32_onnx, "openvino"), (xml, "openvino")):
        report = check_parity(model, path, xt, runtime, batch_size=64)
        assert report["top1_agreement"] >= 0.99, (runtime, report)
        assert report["max_abs_diff"] < 1e-3, (runtime, report)


def test_int8_openvino_ir(int8_files: dict[str, Path], out_dir: Path) -> None:
    _, _, xt, _ = digits()
    _, result = qat_bundle()
    xml = ov_export.to_openvino_ir(int8_files["onnx"], out_dir / "int8.xml")
    report = check_parity(result.model, xml, xt, "openvino")
    assert report["passed"], report
    # int8 weights and no exporter debug metadata: the QDQ file is far smaller than the FP32 one
    fp32 = onnx_export.export_fp32(
        trained_tiny(), torch.from_numpy(digits()[0][:8]), out_dir / "f.onnx"
    )
    assert int8_files["onnx"].stat().st_size < fp32.stat().st_size / 2.5
    assert not any(n.metadata_props for n in onnx.load(str(int8_files["onnx"])).graph.node)
    # int8 weights: the IR is much smaller than the fp32 one would be
    fp32_params = sum(p.numel() for p in trained_tiny().parameters()) * 4
    assert xml.with_suffix(".bin").stat().st_size < fp32_params / 2


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def test_corrupt_pt2_gives_model_file_error_and_no_output(
    int8_files: dict[str, Path], tmp_path: Path
) -> None:
    x, _, _, _ = digits()
    bad = _truncated(int8_files["pt2"], tmp_path / "bad.pt2")
    out = tmp_path / "out" / "int8.onnx"
    with pytest.raises(ModelFileError) as err:
        onnx_export.export_int8(bad, torch.from_numpy(x[:8]), out)
    assert "\n" not in str(err.value)
    assert not out.exists() and not any(out.parent.glob("*")) if out.parent.exists() else True


def test_corrupt_onnx_gives_model_file_error_and_no_output(fp32_onnx: Path, tmp_path: Path) -> None:
    _, _, xt, _ = digits()
    bad = _truncated(fp32_onnx, tmp_path / "bad.onnx")
    with pytest.raises(ModelFileError):
        ov_export.to_openvino_ir(bad, tmp_path / "ir" / "m.xml")
    assert not (tmp_path / "ir" / "m.xml").exists() and not (tmp_path / "ir" / "m.bin").exists()
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(ModelFileError):
            check_parity(trained_tiny(), bad, xt[:4], runtime)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError):
        onnx_export.load_onnx(garbage)


def test_failed_export_leaves_no_file(tmp_path: Path) -> None:
    class Bad(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x
            return -x

    out = tmp_path / "bad.onnx"
    with pytest.raises(Exception):  # noqa: B017 - any export failure will do
        onnx_export.export_fp32(Bad(), torch.randn(2, 1, 8, 8), out)
    assert list(tmp_path.iterdir()) == []


def test_lead_cell_network_exports_with_parity(tmp_path: Path) -> None:
    cell = pytest.importorskip("nasforge.space.cell")
    from nasforge.space.nb201 import CellSpec

    spec = CellSpec(
        ("nor_conv_3x3", "skip_connect", "nor_conv_1x1", "avg_pool_3x3", "none", "skip_connect")
    )
    torch.manual_seed(0)
    net = cell.build_cell_network(spec, cell.CellNetworkShape(1, 10, channels=8, stages=2)).eval()
    x = np.random.default_rng(0).random((33, 1, 8, 8), dtype=np.float32)
    path = onnx_export.export_fp32(net, torch.from_numpy(x[:4]), tmp_path / "cell.onnx")
    for runtime in ("onnxruntime", "openvino"):
        report = check_parity(net, path, x, runtime, batch_size=16)
        assert report["top1_agreement"] >= 0.99 and report["max_abs_diff"] < 1e-3, report


def test_conv_bn_folding_matches_exporter(tmp_path: Path) -> None:
    from nasforge.compress.transform import count_batchnorm, fold_conv_bn

    x, _, xt, _ = digits()
    model = trained_tiny()
    folded, n = fold_conv_bn(model)
    assert n == 7 and count_batchnorm(folded) == 1 and count_batchnorm(model) == 8
    with torch.no_grad():
        diff = (folded(torch.from_numpy(xt)) - model(torch.from_numpy(xt))).abs().max()
    assert float(diff) < 1e-4
    a = onnx_export.export_fp32(model, torch.from_numpy(x[:4]), tmp_path / "a.onnx")
    b = onnx_export.export_fp32(folded, torch.from_numpy(x[:4]), tmp_path / "b.onnx")
    # the exporter already folds Conv->BN: only the BN after a sum is left, in both graphs
    assert onnx_export.op_counts(a) == onnx_export.op_counts(b)
    assert onnx_export.op_counts(a)["BatchNormalization"] == 1


@pytest.mark.slow
def test_lead_cell_network_pruned_qat_int8_end_to_end(tmp_path: Path) -> None:
    cell = pytest.importorskip("nasforge.space.cell")
    from nasforge.compress.prune import prune_structured
    from nasforge.compress.qat import quantize_qat
    from nasforge.space.nb201 import CellSpec

    x, y, xt, yt = digits()
    spec = CellSpec(
        ("nor_conv_3x3", "skip_connect", "nor_conv_1x1", "avg_pool_3x3", "none", "nor_conv_3x3")
    )
    torch.manual_seed(0)
    net = cell.build_cell_network(spec, cell.CellNetworkShape(1, 10, channels=8, stages=2))
    from tests.compress_helpers import train

    train(net, x[:1000], y[:1000], epochs=3)
    net, _ = prune_structured(
        net,
        torch.from_numpy(x[:4]),
        channel_ratio=0.25,
        finetune=lambda m: train(m, x[:1000], y[:1000], epochs=2, lr=1e-3),
    )
    acc_pruned = accuracy(net, xt, yt)
    result = quantize_qat(net, torch.from_numpy(x[:8]), (x[:512], y[:512]), epochs=1)
    assert accuracy(result.model, xt, yt) >= acc_pruned - 0.05
    pt2 = save_quantized(result.model, torch.from_numpy(x[:8]), tmp_path / "m.pt2")
    path = onnx_export.export_int8(pt2, torch.from_numpy(x[:8]), tmp_path / "m.onnx")
    assert onnx_export.op_counts(path)["QuantizeLinear"] > 0
    # OpenVINO's INT8 pipeline rounds differently from the reference (e.g. pooling on u8):
    # logits differ by < 0.1, which flips only near-ties of this small, briefly trained model
    for runtime, bar in (("onnxruntime", 0.99), ("openvino", 0.98)):
        report = check_parity(result.model, path, xt, runtime)
        assert report["top1_agreement"] >= bar and report["max_abs_diff"] < 0.2, (runtime, report)


def _ort_optimized_ops(path: Path, tmp_path: Path) -> dict[str, int]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"opt_{path.name}")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx_export.op_counts(onnx.load(opts.optimized_model_filepath))


def test_runtime_quantizer_lets_onnxruntime_run_all_convs_in_int8(tmp_path: Path) -> None:
    from nasforge.compress.qat import ptq

    x, _, xt, _ = digits()
    model = trained_tiny()
    ops = {}
    for fuse in (True, False):
        result = ptq(model, torch.from_numpy(x[:8]), x[:64], conv_add_fusion=fuse)
        assert result.scheme["conv_add_fusion"] is fuse
        path = onnx_export.export_int8(
            result.model, torch.from_numpy(x[:8]), tmp_path / f"{fuse}.onnx"
        )
        ops[fuse] = _ort_optimized_ops(path, tmp_path)
        assert check_parity(result.model, path, xt, "onnxruntime")["passed"]
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    # torchao's Inductor-oriented default leaves convs before residual sums in float ...
    assert ops[True].get("QLinearConv", 0) < n_conv
    # ... the runtime quantizer (nasforge's default) gets (nearly) every conv into QLinearConv
    assert ops[False].get("QLinearConv", 0) > ops[True].get("QLinearConv", 0)
    assert ops[False].get("QLinearConv", 0) >= n_conv - 1, ops[False]


def test_ptq_quantizes_the_conv_relu_before_a_global_max(tmp_path: Path) -> None:
    """torchao leaves a Conv+ReLU output in float unless an int8 op follows; before a global max
    (amax) that made ONNX Runtime run the last conv as an fp32 FusedConv."""
    from torch import nn

    from nasforge.compress.qat import ptq

    class GlobalMaxNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            )  # fmt: skip
            self.fc = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.amax(self.body(x), dim=(2, 3)))

    x, _, xt, _ = digits()
    torch.manual_seed(0)
    model = GlobalMaxNet().eval()
    result = ptq(model, torch.from_numpy(x[:8]), x[:64])
    path = onnx_export.export_int8(result.model, torch.from_numpy(x[:8]), tmp_path / "m.onnx")
    ops = _ort_optimized_ops(path, tmp_path)
    assert ops.get("QLinearConv", 0) == 2 and "FusedConv" not in ops and "Conv" not in ops, ops
    assert check_parity(result.model, path, xt, "onnxruntime")["passed"]
