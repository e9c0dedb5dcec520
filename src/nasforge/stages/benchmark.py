"""benchmark: measure every candidate's exported models on one target.

For each precision: accuracy of the *exported* model on the test split (run by the target's
runtime), latency p50/p90/p99 after warm-up and throughput per batch size, model size and peak
memory. The models are the target's runtime's files in the export bundle (a runtime that loads
another's files, like TensorRT, measures those). Table targets (``table:<column>``) cannot run
models: their latency is the table's value for the architecture (labelled ``source: table``) and
accuracy is measured on the base runtime (ONNX Runtime). An INT8 target
(``onnxruntime-cpu-int8``) runs only quantized models: its FP32 figures, kept for comparison, come
from the same runtime and device at FP32.
Each precision also records its energy per inference (``energy`` at batch 1, ``energy_per_batch``
per batch size): measured with RAPL/NVML by running the model where such a meter is readable
here, from the table's ``<device>_energy_mj`` column for table targets that have one, otherwise
estimated as documented power x latency; ``source`` and ``method`` always say which. ``memory``
gives the weights per precision, the analytic peak activations at each batch size (ONNX graph)
and the harness's measured peak / session RSS, each with its source.
The models measured are copied into the output, with the ONNX graph that is the same model (the
runtime's ONNX twin), so promotion registers exactly these files.
Each precision's result carries the export's parity check of the runtime measured (``parity``,
absent when the export has none), which promotion requires to pass.
Output: one sub-folder per candidate (``<candidate>/benchmark.json`` and ``<candidate>/model/``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.artifacts.benchmark_report import BENCHMARK_JSON, BenchmarkReport, model_dir
from nasforge.artifacts.export_bundle import (
    EXPORT_JSON,
    ExportBundle,
    find_bundles,
    model_files,
    onnx_twin,
)
from nasforge.bench.harness import measure, predict
from nasforge.bench.sysinfo import system_info
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import ModelFileError
from nasforge.hardware.energy import energy_per_inference
from nasforge.hardware.memory import memory_report
from nasforge.hardware.targets import get_target, runtime_target
from nasforge.runtimes.registry import BASE_RUNTIME, bundle_runtime
from nasforge.stages import NO_CONTEXT, StageContext, StageResult
from nasforge.tracking.dvc import dvc_hash


def run(
    params: Params,
    dataset: Path,
    exported: list[Path],
    target: str,
    output: Path,
    ctx: StageContext = NO_CONTEXT,
) -> StageResult:
    """Benchmark every export folder in ``exported`` on ``target``."""
    t = get_target(target)
    t.check_available()
    data = load_prepared(dataset)
    metrics: dict[str, float] = {}
    # A folder may be one export or a parent of several (DVC passes artifacts/export).
    folders = find_bundles(exported)
    if not folders:
        raise ModelFileError(
            f"no export folders (with {EXPORT_JSON}) in {', '.join(map(str, exported))}"
        )
    for folder in folders:
        doc = benchmark_one(params, data, Path(folder), t, output)
        for precision, r in doc["results"].items():
            prefix = f"{doc['candidate']}_{precision}"
            metrics[f"{prefix}_test_accuracy"] = r["test_accuracy"]
            metrics[f"{prefix}_size_bytes"] = r["size_bytes"]
            for bs, lat in r["latency"].items():
                metrics[f"{prefix}_b{bs}_p50_ms"] = lat["p50_ms"]
                if "throughput_ips" in lat:
                    metrics[f"{prefix}_b{bs}_throughput"] = lat["throughput_ips"]
    return StageResult(
        metrics=metrics,
        tags={"target": t.name},
        artifacts=sorted(output.glob(f"*/{BENCHMARK_JSON}")),
    )


def _parity(export: dict[str, Any], runtime: str, precision: str) -> dict[str, Any] | None:
    """The export's parity check of ``runtime``/``precision`` (None when it has none)."""
    p = (export.get("parity") or {}).get(f"{runtime}/{precision}")
    if not p:
        return None
    min_top1 = p.get("min_top1", export.get("parity_min_top1"))
    return {
        "runtime": runtime,
        "top1_agreement": p["top1_agreement"],
        "max_abs_diff": p.get("max_abs_diff"),
        "n": p.get("n"),
        "passed": p.get("passed"),
        "min_top1": min_top1,
    }


def _energy(
    t, latency: dict[str, dict[str, Any]], model: Path, arch_str: str, threads: int
) -> dict[str, dict[str, Any]]:
    """Energy per inference at each measured batch size, labelled measured or estimated.

    A runtime target is measured by running ``model`` under a meter (RAPL, NVML) when one is
    readable here; a table target reads its CSV's energy column when it has one; anything else is
    estimated from the latency (see :func:`nasforge.hardware.energy.energy_per_inference`).
    """
    out = {}
    for bs, lat in latency.items():
        out[bs] = energy_per_inference(
            t,
            float(lat["p50_ms"]),
            batch_size=int(bs),
            threads=threads,
            model_path=model if t.kind == "runtime" else None,
            arch_str=arch_str,
        )
    return out


MEMORY_SOURCES = {
    "weights": "model: weight count of the ONNX initializers x bytes per element "
    "(fp32 4, fp16 2, int8 1 + 5 bytes per output channel for scale and zero-point)",
    "peak_activation": "model: peak live activations in ONNX graph order, shapes from ONNX "
    "shape inference at each batch size (no in-place reuse; an upper bound)",
    "measured_rss": "measured: process resident-memory high-water mark (psutil) while the "
    "benchmark harness built and ran the session; session = peak minus RSS before the session",
}


def _memory(
    onnx_file: Path,
    precision: str,
    batch_sizes: list[int],
    latency: dict[str, dict[str, Any]],
    size_bytes: int,
    t,
) -> dict[str, Any]:
    """Memory of one exported model: weights, analytic peak activations, measured RSS."""
    out: dict[str, Any] = {"precision": precision, "file_bytes": size_bytes}
    sources = dict(MEMORY_SOURCES)
    try:
        reports = {str(bs): memory_report(onnx_file, int(bs)) for bs in batch_sizes}
    except Exception as err:  # noqa: BLE001 - memory is informative; never fail the benchmark
        out.update(source={"weights": f"not available: {err}"}, error=str(err))
        return out
    first = reports[next(iter(reports))]
    out["param_count"] = first.param_count
    out["weights_bytes"] = first.param_bytes.get(precision, first.param_bytes["fp32"])
    out["weights_bytes_per_precision"] = first.param_bytes
    out["peak_activation_bytes"] = {bs: r.peak_activation_bytes for bs, r in reports.items()}
    measured = {bs: lat for bs, lat in latency.items() if "peak_rss_bytes" in lat}
    if measured:
        out["measured_peak_rss_bytes"] = {bs: m["peak_rss_bytes"] for bs, m in measured.items()}
        out["measured_session_rss_bytes"] = {
            bs: m.get("session_rss_bytes") for bs, m in measured.items()
        }
        runtime = next(iter(measured.values())).get("runtime", t.name)
        sources["measured_rss"] += f" ({runtime} on {t.name})"
    else:
        sources["measured_rss"] = f"not measured: {t.name} is a table target (no model runs)"
    out["source"] = sources
    return out


def benchmark_one(params: Params, data, exported: Path, t, output_root: Path) -> dict[str, Any]:
    """Benchmark one export folder on target ``t``; write ``<output_root>/<candidate>/``."""
    bundle = ExportBundle.read(exported)
    if bundle.candidate is None or bundle.arch_str is None:
        raise ModelFileError(f"{Path(exported) / EXPORT_JSON}: names no candidate/arch_str")
    export = bundle.to_body()
    output = output_root / export["candidate"]
    x_test, y_test = data.numpy("test")
    run_target = t if t.kind == "runtime" else runtime_target(BASE_RUNTIME)
    runtime = bundle_runtime(run_target.backend).name
    missing = model_files(exported, runtime, "fp32")[0]
    if not missing.is_file():
        raise ModelFileError(
            f"export folder {exported} has no {runtime} model ({missing.name}) for target "
            f"'{t.name}': export with this target among params.targets"
        )
    bp = params.benchmark
    threads = params.run.threads
    results: dict[str, Any] = {}
    output.mkdir(parents=True, exist_ok=True)
    for precision in ("fp32", "int8"):
        files = model_files(exported, runtime, precision)
        # An INT8 target (onnxruntime-cpu-int8) refuses float files: the FP32 figures, kept for
        # comparison, come from the same runtime and device at FP32.
        mt = run_target
        if precision == "fp32" and run_target.precision == "int8":
            mt = runtime_target(run_target.runtime, run_target.device, "fp32")
        logits = predict(files[0], mt, x_test, batch_size=64, threads=threads)
        acc = float((np.argmax(logits, axis=1) == y_test).mean())
        latency = {}
        if t.kind == "runtime":
            for bs in bp.batch_sizes:
                res = measure(
                    files[0],
                    mt,
                    batch_size=bs,
                    input_shape=data.input_shape,
                    warmup=bp.warmup,
                    repeats=bp.repeats,
                    threads=threads,
                )
                latency[str(bs)] = res.as_dict()
                latency[str(bs)].pop("system", None)
        else:
            ms = float(t.lookup(export["arch_str"]))
            latency["1"] = {"p50_ms": ms, "source": "table", "batch_size": 1}
        dest = model_dir(output, precision)
        dest.mkdir(parents=True, exist_ok=True)
        # Promotion registers an MLflow ONNX model with the runtime's own files alongside, so the
        # ONNX of this precision travels with a runtime that reads another format (OpenVINO IR).
        twin = onnx_twin(exported, runtime, precision)
        for src in dict.fromkeys([*files, twin]):
            shutil.copy2(src, dest / src.name)
        energy = _energy(t, latency, files[0], export["arch_str"], threads)
        first = "1" if "1" in energy else next(iter(energy))
        size = sum(s.stat().st_size for s in files)
        results[precision] = {
            "test_accuracy": acc,
            "size_bytes": size,
            "latency": latency,
            "energy": energy[first],
            "energy_per_batch": energy,
            "memory": _memory(twin, precision, bp.batch_sizes, latency, size, t),
            "files": [f"model/{precision}/{s.name}" for s in files],
        }
        scheme = (export.get("quantization") or {}).get(f"{runtime}/{precision}")
        if scheme is not None:  # quantized by the runtime's own scheme, not the QAT stage's
            results[precision]["quantization"] = scheme
        parity = _parity(export, runtime, precision)
        if parity is not None:
            results[precision]["parity"] = parity
    doc = {
        "target": t.describe(),
        "candidate": export["candidate"],
        "arch_str": export["arch_str"],
        "quant_scheme": export.get("quant_scheme"),
        "results": results,
        "system": system_info(threads),
    }
    for precision in results:
        results[precision]["dvc_md5"] = dvc_hash(model_dir(output, precision))
    doc["results"] = results
    BenchmarkReport.from_dict(doc).write(output)
    print(
        f"  {export['candidate']} on {t.name}: int8 acc {results['int8']['test_accuracy']:.4f}, "
        f"p50@1 {results['int8']['latency'].get('1', {}).get('p50_ms', float('nan')):.3f} ms; "
        f"fp32 acc {results['fp32']['test_accuracy']:.4f}, p50@1 {results['fp32']['latency'].get('1', {}).get('p50_ms', float('nan')):.3f} ms",
        flush=True,
    )
    return doc
