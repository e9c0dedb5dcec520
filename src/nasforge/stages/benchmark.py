"""benchmark: measure every candidate's exported models on one target.

For each precision: accuracy of the *exported* model on the test split (run by the target's
runtime), latency p50/p90/p99 after warm-up and throughput per batch size, model size and peak
memory. Table targets (``table:<column>``) cannot run models: their latency is the table's value
for the architecture (labelled ``source: table``) and accuracy is measured with ONNX Runtime.
The models measured are copied into the output so promotion registers exactly these files.
Each precision's result carries the export's parity check of the runtime measured (``parity``,
absent when the export has none), which promotion requires to pass.
Output: one sub-folder per candidate (``<candidate>/benchmark.json`` and ``<candidate>/model/``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.bench.harness import predict
from nasforge.bench.sysinfo import system_info
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.errors import ModelFileError
from nasforge.hardware.energy import energy_per_inference
from nasforge.hardware.targets import get_target
from nasforge.stages import StageResult
from nasforge.stages.export import EXPORT_JSON, model_files
from nasforge.tracking.dvc import dvc_hash

BENCHMARK_JSON = "benchmark.json"


def run(
    params: Params, dataset: Path, exported: list[Path], target: str, output: Path
) -> StageResult:
    """Benchmark every export folder in ``exported`` on ``target``."""
    t = get_target(target)
    t.check_available()
    data = load_prepared(dataset)
    metrics: dict[str, float] = {}
    # A folder may be one export or a parent of several (DVC passes artifacts/export).
    folders = sorted({f.parent for d in exported for f in Path(d).rglob(EXPORT_JSON)})
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


def benchmark_one(params: Params, data, exported: Path, t, output_root: Path) -> dict[str, Any]:
    """Benchmark one export folder on target ``t``; write ``<output_root>/<candidate>/``."""
    f = Path(exported) / EXPORT_JSON
    if not f.is_file():
        raise ModelFileError(f"not an export folder (no {EXPORT_JSON}): {exported}")
    export = json.loads(f.read_text())
    output = output_root / export["candidate"]
    x_test, y_test = data.numpy("test")
    runtime = t.runtime if t.kind == "runtime" else "onnxruntime"
    run_target = t if t.kind == "runtime" else get_target("onnxruntime-cpu")
    bp = params.benchmark
    threads = params.run.threads
    results: dict[str, Any] = {}
    output.mkdir(parents=True, exist_ok=True)
    for precision in ("fp32", "int8"):
        files = model_files(exported, runtime, precision)
        logits = predict(files[0], run_target, x_test, batch_size=64, threads=threads)
        acc = float((np.argmax(logits, axis=1) == y_test).mean())
        latency = {}
        if t.kind == "runtime":
            for bs in bp.batch_sizes:
                res = t.measure(
                    files[0],
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
        dest = output / "model" / precision
        dest.mkdir(parents=True, exist_ok=True)
        for src in files:
            shutil.copy2(src, dest / src.name)
        p50_b1 = latency.get("1", next(iter(latency.values())))["p50_ms"]
        results[precision] = {
            "test_accuracy": acc,
            "size_bytes": sum(s.stat().st_size for s in files),
            "latency": latency,
            "energy": energy_per_inference(t, p50_b1),
            "files": [f"model/{precision}/{s.name}" for s in files],
        }
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
        results[precision]["dvc_md5"] = dvc_hash(output / "model" / precision)
    doc["results"] = results
    (output / BENCHMARK_JSON).write_text(json.dumps(doc, indent=2, default=str))
    print(
        f"  {export['candidate']} on {t.name}: int8 acc {results['int8']['test_accuracy']:.4f}, "
        f"p50@1 {results['int8']['latency'].get('1', {}).get('p50_ms', float('nan')):.3f} ms; "
        f"fp32 acc {results['fp32']['test_accuracy']:.4f}, p50@1 {results['fp32']['latency'].get('1', {}).get('p50_ms', float('nan')):.3f} ms",
        flush=True,
    )
    return doc
