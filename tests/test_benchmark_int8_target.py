"""The benchmark stage on an INT8-only target (``onnxruntime-cpu-int8``).

Such a target refuses float models, yet the stage measures both precisions of a candidate; the
FP32 figures come from the same runtime and device at FP32. It used to fail at the FP32 pass, so
``targets: [onnxruntime-cpu-int8]`` ran the whole pipeline only to stop at benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from torch import nn

from nasforge.data.prepared import load_prepared
from nasforge.export.onnx import export_fp32
from nasforge.stages.export import EXPORT_JSON, FILES
from nasforge.stages.runner import execute
from tests.conftest import tiny_params

ARCH = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|none~0|none~1|avg_pool_3x3~2|"
TARGET = "onnxruntime-cpu-int8"


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray) -> None:
        self._it = iter([{name: x[i : i + 16]} for i in range(0, 64, 16)])

    def get_next(self):  # noqa: D102
        return next(self._it, None)


def _export_folder(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """An export folder with a trained linear classifier: FP32 ONNX and its QDQ INT8 twin."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(x.shape[1:])), 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    d = root / "cand-0"
    d.mkdir(parents=True)
    fp32 = export_fp32(net.eval(), xt[:2], d / FILES[("onnxruntime", "fp32")])
    quantize_static(
        str(fp32),
        str(d / FILES[("onnxruntime", "int8")]),
        _Batches(_input_name(fp32), x),
        quant_format=QuantFormat.QDQ,
    )
    parity = {
        f"onnxruntime/{p}": {"top1_agreement": 1.0, "max_abs_diff": 1e-6, "n": len(x),
                             "runtime": "onnxruntime", "passed": True, "min_top1": 0.99}
        for p in ("fp32", "int8")
    }  # fmt: skip
    doc = {"candidate": "cand-0", "arch_str": ARCH, "parity": parity, "parity_min_top1": 0.99}
    (d / EXPORT_JSON).write_text(json.dumps(doc))
    return d


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path)).graph.input[0].name


def test_an_int8_target_benchmarks_both_precisions(tmp_path, digits_dir):
    data = load_prepared(digits_dir)
    x, y = data.numpy("train")
    exported = _export_folder(tmp_path / "export", x, y)
    out = tmp_path / "bench"
    execute(
        "benchmark",
        tiny_params(targets=[TARGET]),
        out,
        tracking=False,
        dataset=digits_dir,
        exported=[exported],
        target=TARGET,
    )
    doc = json.loads((out / "cand-0" / "benchmark.json").read_text())
    assert set(doc["results"]) == {"fp32", "int8"}
    for precision, r in doc["results"].items():
        assert r["test_accuracy"] > 0.8, (precision, r["test_accuracy"])
        assert r["latency"]["1"]["p50_ms"] > 0
