"""export: ONNX (fp32 and INT8 QDQ, dynamic batch) and OpenVINO IR of one candidate, each checked
for parity with its torch counterpart on the test split.

Parity below ``export.parity_min_top1`` does not fail the stage (it is a measurement): it is
recorded in ``export.json`` and promotion rejects that runtime/precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nasforge.compress.qat import load_quantized
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import ModelFileError, naming_architecture
from nasforge.export.onnx import export_fp32, export_int8
from nasforge.export.openvino import to_openvino_ir
from nasforge.export.parity import check_parity
from nasforge.models import MODEL_JSON, load_model, read_meta
from nasforge.stages import StageResult
from nasforge.stages.qat import QUANTIZED

# File layout of an export folder, shared with the benchmark stage.
FILES = {
    ("onnxruntime", "fp32"): "fp32.onnx",
    ("onnxruntime", "int8"): "int8.onnx",
    ("openvino", "fp32"): "openvino/fp32.xml",
    ("openvino", "int8"): "openvino/int8.xml",
}
EXPORT_JSON = "export.json"


def model_files(export_dir: Path, runtime: str, precision: str) -> list[Path]:
    """Files making up one exported model (the IR has a ``.bin`` beside its ``.xml``)."""
    main = Path(export_dir) / FILES[(runtime, precision)]
    return [main, main.with_suffix(".bin")] if main.suffix == ".xml" else [main]


def run(params: Params, dataset: Path, model: Path, quantized: Path, output: Path) -> StageResult:
    """Export the fp32 model artifact ``model`` and the INT8 artifact ``quantized`` to ``output``."""
    net, meta = load_model(model)
    qmeta = read_meta(quantized)
    if qmeta.get("candidate") != meta.get("candidate"):
        raise ModelFileError(
            f"fp32 model {model} ({meta.get('candidate')}) and INT8 model {quantized} "
            f"({qmeta.get('candidate')}) are different candidates"
        )
    qprog = load_quantized(Path(quantized) / QUANTIZED)
    data = load_prepared(dataset)
    x_test, _ = data.numpy("test")
    example = torch.from_numpy(x_test[:2])
    output.mkdir(parents=True, exist_ok=True)
    with naming_architecture("export", meta["arch_str"]):
        export_fp32(net, example, output / FILES[("onnxruntime", "fp32")])
        export_int8(qprog, example, output / FILES[("onnxruntime", "int8")])
        for precision in ("fp32", "int8"):
            to_openvino_ir(
                output / FILES[("onnxruntime", precision)],
                output / FILES[("openvino", precision)],
            )

    threads = params.run.threads
    min_top1 = params.export.parity_min_top1
    qmodule = qprog.module()
    parity = {}
    for (runtime, precision), rel in FILES.items():
        ref = net if precision == "fp32" else qmodule
        parity[f"{runtime}/{precision}"] = check_parity(
            ref, output / rel, x_test, runtime=runtime, threads=threads, min_top1=min_top1
        )
    sizes = {
        f"{rt}/{pr}": sum(f.stat().st_size for f in model_files(output, rt, pr)) for rt, pr in FILES
    }
    doc = {
        "candidate": meta["candidate"],
        "arch_str": meta["arch_str"],
        "files": {f"{rt}/{pr}": rel for (rt, pr), rel in FILES.items()},
        "size_bytes": sizes,
        "parity": parity,
        "parity_min_top1": min_top1,
        "quant_scheme": qmeta.get("quant_scheme"),
        "model": {k: meta[k] for k in ("input_shape", "mean", "std", "classes", "shape")},
        "history": qmeta.get("history", []),
    }
    (output / EXPORT_JSON).write_text(json.dumps(doc, indent=2))
    (output / MODEL_JSON).write_text(json.dumps(qmeta, indent=2))
    metrics = {}
    for key, p in parity.items():
        tag = key.replace("/", "_")
        metrics[f"parity_top1_{tag}"] = p["top1_agreement"]
        metrics[f"parity_maxabs_{tag}"] = p["max_abs_diff"]
    metrics.update({f"size_bytes_{k.replace('/', '_')}": v for k, v in sizes.items()})
    worst = min(p["top1_agreement"] for p in parity.values())
    print(
        f"  exported {meta['candidate']}: worst top-1 parity {worst:.4f}; int8 onnx {sizes['onnxruntime/int8']} B vs fp32 {sizes['onnxruntime/fp32']} B",
        flush=True,
    )
    failed = [f"{k} ({p['top1_agreement']:.4f})" for k, p in parity.items() if not p["passed"]]
    if failed:
        print(
            f"  {meta['candidate']}: parity below {min_top1} for {', '.join(failed)}: "
            "these models will not be promoted",
            flush=True,
        )
    return StageResult(
        metrics=metrics,
        tags={"candidate": meta["candidate"]},
        model_dir=output,
        artifacts=[output / EXPORT_JSON],
    )
