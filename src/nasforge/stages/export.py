"""export: one candidate's export bundle, every file checked for parity with its torch model.

The bundle holds the ONNX graphs (fp32 and INT8 QDQ, dynamic batch; written by the base runtime,
ONNX Runtime) and the files of every other runtime the run needs: the runtimes of
``params.targets`` plus those exported by default (OpenVINO IR), each written by its runtime
(:meth:`nasforge.runtimes.base.Runtime.export`) from the ONNX graphs or from torch. Each file's
parity on the test split is that runtime's run against the torch model it came from.

Parity below ``export.parity_min_top1`` does not fail the stage (it is a measurement): it is
recorded in ``export.json`` and promotion rejects that runtime/precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nasforge.artifacts.export_bundle import EXPORT_JSON, ExportBundle
from nasforge.artifacts.quantized_model import QuantizedModel, load_program
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import ModelFileError, TargetError, naming_architecture
from nasforge.hardware.targets import get_target
from nasforge.models import load_model
from nasforge.runtimes.base import PRECISIONS, Exported, ExportSources, Runtime
from nasforge.runtimes.registry import BASE_RUNTIME, bundle_runtime, get_runtime, list_runtimes
from nasforge.stages import NO_CONTEXT, StageContext, StageResult

#: Files of the runtimes every bundle has (exported by default), ``{(runtime, precision): path}``
#: relative to the bundle; a bundle may hold more (``export.json``'s ``files`` lists them).
FILES = {
    (rt.name, p): rt.layout(p)
    for rt in list_runtimes()
    if rt.exported_by_default and not rt.reads
    for p in PRECISIONS
}
#: Training images runtimes with their own INT8 scheme calibrate on.
CALIBRATION_SAMPLES = 256


def bundle_runtimes(targets: list[str]) -> list[Runtime]:
    """Runtimes whose files a bundle holds for these targets: the base runtime first, every
    runtime exported by default that is installed here, and each target's (a table target's
    models run on the base runtime).

    Raises:
        TargetError: A target's runtime cannot write its files here.
    """
    wanted = {BASE_RUNTIME}
    for name in targets:
        t = get_target(name)
        wanted.add(bundle_runtime(t.backend).name if t.kind == "runtime" else BASE_RUNTIME)
    out = []
    for rt in list_runtimes():
        if rt.reads:
            continue  # loads another runtime's files
        problem = rt.export_problem()
        if rt.name in wanted:
            if problem:
                raise TargetError(f"cannot export for runtime '{rt.name}' here: {problem}")
            out.append(rt)
        elif rt.exported_by_default and problem is None:
            out.append(rt)
    return out


def run(
    params: Params,
    dataset: Path,
    model: Path,
    quantized: Path,
    output: Path,
    ctx: StageContext = NO_CONTEXT,
) -> StageResult:
    """Export the fp32 model artifact ``model`` and the INT8 artifact ``quantized`` to ``output``."""
    net, meta = load_model(model)
    qmodel = QuantizedModel.read(quantized)
    qmeta = qmodel.meta
    if qmeta.get("candidate") != meta.get("candidate"):
        raise ModelFileError(
            f"fp32 model {model} ({meta.get('candidate')}) and INT8 model {quantized} "
            f"({qmeta.get('candidate')}) are different candidates"
        )
    runtimes = bundle_runtimes(params.targets)
    qprog = load_program(quantized)
    data = load_prepared(dataset)
    x_test, _ = data.numpy("test")
    x_train, _ = data.numpy("train")
    rng = np.random.default_rng(params.run.seed)
    pick = rng.choice(len(x_train), size=min(CALIBRATION_SAMPLES, len(x_train)), replace=False)
    sources = ExportSources(
        fp32=net.eval(),
        int8=qprog,
        example=torch.from_numpy(x_test[:2]),
        calibration=x_train[np.sort(pick)],
        max_batch=max(128, *params.benchmark.batch_sizes),
    )
    output.mkdir(parents=True, exist_ok=True)
    exported: dict[tuple[str, str], Exported] = {}
    with naming_architecture("export", meta["arch_str"]):
        for rt in runtimes:  # the base runtime first: the others may convert its graphs
            for precision in PRECISIONS:
                exported[(rt.name, precision)] = rt.export(sources, precision, output)
            if rt.name == BASE_RUNTIME:
                onnx = {p: exported[(rt.name, p)].path for p in PRECISIONS}
                sources = ExportSources(**{**vars(sources), "onnx": onnx})

    threads = params.run.threads
    min_top1 = params.export.parity_min_top1
    qmodule = qprog.module()
    parity, files, sizes, quantization = {}, {}, {}, {}
    for (name, precision), ex in exported.items():
        key = f"{name}/{precision}"
        ref = ex.reference
        if ref is None:
            ref = net if precision == "fp32" else qmodule
        parity[key] = get_runtime(name).parity(
            ref, ex.path, x_test, threads=threads, min_top1=min_top1
        )
        files[key] = ex.path.relative_to(output).as_posix()
        sizes[key] = sum(f.stat().st_size for f in get_runtime(name).model_files(ex.path))
        if ex.quantization is not None:
            quantization[key] = dict(ex.quantization)
    doc = {
        "candidate": meta["candidate"],
        "arch_str": meta["arch_str"],
        "files": files,
        "size_bytes": sizes,
        "parity": parity,
        "parity_min_top1": min_top1,
        "quant_scheme": qmodel.quant_scheme,
        "model": {k: meta[k] for k in ("input_shape", "mean", "std", "classes", "shape")},
        "history": qmeta.get("history", []),
    }
    if quantization:
        doc["quantization"] = quantization  # runtimes that quantize by their own scheme
    ExportBundle.from_dict(doc).write(output)
    qmodel.write(output)  # the INT8 model's description travels with its files
    metrics = {}
    for key, p in parity.items():
        tag = key.replace("/", "_")
        metrics[f"parity_top1_{tag}"] = p["top1_agreement"]
        metrics[f"parity_maxabs_{tag}"] = p["max_abs_diff"]
    metrics.update({f"size_bytes_{k.replace('/', '_')}": v for k, v in sizes.items()})
    worst = min(p["top1_agreement"] for p in parity.values())
    base = BASE_RUNTIME
    print(
        f"  exported {meta['candidate']} for {', '.join(rt.name for rt in runtimes)}: worst "
        f"top-1 parity {worst:.4f}; int8 onnx {sizes[f'{base}/int8']} B vs fp32 "
        f"{sizes[f'{base}/fp32']} B",
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
