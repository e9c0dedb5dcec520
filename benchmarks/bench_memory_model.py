"""The search's memory objective against measured peak RSS (issue 19).

``memory_mb`` in the search is the memory model of :func:`nasforge.search.subnet_metrics.
model_memory`: weights plus the peak of live activations of the ONNX graph. This benchmark checks
it against what the runtimes really take: for random connected NB201 cells (CIFAR shape, 16
channels, 3x32x32 input) and each CPU runtime, one fresh process per measurement builds the
session and runs it; the measured figure is its peak RSS minus the RSS before the session was
built (:class:`nasforge.bench.harness.LatencyResult.session_rss_bytes`). One process per point,
because an allocator that already holds memory from an earlier session hides the next one's.

Reported per runtime: the Spearman and Kendall rank correlation between model and measurement
across subnets (what the search's ranking needs), the median ratio measured / model, and the
per-sample slope (batch 32 -> 128) of both, which cancels the runtime's fixed overhead.

Usage::

    nice -n 5 .venv/bin/python benchmarks/bench_memory_model.py [--n 16] [--batch-sizes 32,128]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNTIMES = ("onnxruntime-cpu", "openvino-cpu")

_CHILD = """
import json, sys
from nasforge.bench.harness import measure
from nasforge.hardware.targets import get_target
path, target, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = measure(path, get_target(target), bs, (3, 32, 32), 2, 3, 1)
print(json.dumps({"session_rss_bytes": r.session_rss_bytes, "peak_rss_bytes": r.peak_rss_bytes}))
"""


def _measure(path: Path, target: str, bs: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), target, str(bs)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``memory_model.{json,md}``."""
    import numpy as np
    from scipy.stats import kendalltau, spearmanr

    from nasforge.bench.sysinfo import system_info
    from nasforge.search.subnet_metrics import model_memory
    from nasforge.space.cell import CellNetworkShape, build_cell_network, is_connected
    from nasforge.space.nb201 import OPS, CellSpec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rng = random.Random(args.seed)
    shape = CellNetworkShape(3, 10, channels=16, cells_per_stage=1)
    specs: list[CellSpec] = []
    while len(specs) < args.n:
        spec = CellSpec(tuple(rng.choice(OPS) for _ in range(6)))
        if is_connected(spec) and spec not in specs:
            specs.append(spec)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from nasforge.bench.timing_export import export_for_timing

        for i, spec in enumerate(specs):
            net = build_cell_network(spec, shape)
            path = Path(tmp) / f"net{i}.onnx"
            export_for_timing(net, (3, 32, 32), path)
            for bs in batch_sizes:
                model = model_memory(net, (3, 32, 32), "fp32", bs)["memory_mb"]
                for target in RUNTIMES:
                    m = _measure(path, target, bs)
                    rows.append(
                        {
                            "arch_str": spec.arch_str,
                            "runtime": target,
                            "batch_size": bs,
                            "model_mb": model,
                            "measured_mb": m["session_rss_bytes"] / 1e6,
                        }
                    )
            print(f"  {i + 1}/{len(specs)} {spec.arch_str}", flush=True)
    summary: dict[str, dict] = {}
    lo, hi = min(batch_sizes), max(batch_sizes)
    for target in RUNTIMES:
        per_bs = {}
        for bs in batch_sizes:
            r = [x for x in rows if x["runtime"] == target and x["batch_size"] == bs]
            model = np.array([x["model_mb"] for x in r])
            meas = np.array([x["measured_mb"] for x in r])
            per_bs[str(bs)] = {
                "spearman": float(spearmanr(model, meas).statistic),
                "kendall_tau": float(kendalltau(model, meas).statistic),
                "median_ratio_measured_over_model": float(np.median(meas / model)),
            }
        slopes = []
        for spec in specs:
            r = {
                x["batch_size"]: x
                for x in rows
                if x["runtime"] == target and x["arch_str"] == spec.arch_str
            }
            dm = (r[hi]["model_mb"] - r[lo]["model_mb"]) / (hi - lo)
            dr = (r[hi]["measured_mb"] - r[lo]["measured_mb"]) / (hi - lo)
            slopes.append(dr / dm)
        summary[target] = {
            "per_batch_size": per_bs,
            "median_slope_ratio_measured_over_model": statistics.median(slopes),
            "slope_ratio_q25_q75": [
                float(np.quantile(slopes, 0.25)),
                float(np.quantile(slopes, 0.75)),
            ],
        }
    doc = {
        "benchmark": "memory_model",
        "n_subnets": len(specs),
        "batch_sizes": batch_sizes,
        "shape": {"channels": 16, "cells_per_stage": 1, "input": [3, 32, 32]},
        "precision": "fp32",
        "threads": 1,
        "summary": summary,
        "rows": rows,
        "system": system_info(threads=1),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_model.json").write_text(json.dumps(doc, indent=2) + "\n")
    s = doc["system"]
    lines = [
        "# Memory model vs measured peak RSS",
        "",
        f"{len(specs)} random connected NB201 cells (16 channels, 3x32x32 input, fp32), one fresh "
        f"process per measurement, 1 thread; {s['cpu_model']}, onnxruntime "
        f"{s['versions']['onnxruntime']}, openvino {s['versions']['openvino']}; load average "
        f"{load_before:.1f} -> {doc['load_avg_1m_after']:.1f}; {doc['seconds']:.0f} s.",
        "",
        "Model: weights + peak live activations of the ONNX graph "
        "(`nasforge.search.subnet_metrics.model_memory`). Measured: session peak RSS minus RSS "
        "before the session was built.",
        "",
        "| runtime | batch | Spearman | Kendall tau | median measured / model |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for target, v in summary.items():
        for bs, b in v["per_batch_size"].items():
            lines.append(
                f"| {target} | {bs} | {b['spearman']:.3f} | {b['kendall_tau']:.3f} "
                f"| {b['median_ratio_measured_over_model']:.2f} |"
            )
    lines += ["", f"Per-sample slope (batch {lo} -> {hi}), measured / model:", ""]
    for target, v in summary.items():
        q = v["slope_ratio_q25_q75"]
        lines.append(
            f"* {target}: median {v['median_slope_ratio_measured_over_model']:.2f} "
            f"[{q[0]:.2f}, {q[1]:.2f}]"
        )
    (args.out / "memory_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
