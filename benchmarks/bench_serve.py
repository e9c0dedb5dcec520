"""Serving benchmark: batch-1 vs dynamic batching vs dynamic batching + variant switching.

For each mode a real ``nasforge serve`` server is started on 127.0.0.1 (subprocess, own process
group, stopped at the end); an open-loop load generator sends Poisson arrivals at each offered
rate for a fixed duration and stops by itself. Latency is client-side, from the *scheduled* send
time (so a backed-up client does not hide queueing) to the response.

``served_accuracy`` is the test accuracy recorded for each variant (benchmark.json or registry
tag) weighted by the samples that variant served in the run (from ``/metrics``); with synthetic
models (``--synthetic``) accuracies are placeholders and the figure is only a plumbing check.

    python benchmarks/bench_serve.py --models runs/benchmark --target onnxruntime-cpu \
        --rates 50 200 800 --duration 20 --slo-ms 50
    python benchmarks/bench_serve.py --synthetic --rates 20 80 --duration 3   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from nasforge.serve.process import ServerProcess

MODES = {
    "batch1": {"max_batch_size": 1, "switching": False},
    "dynamic": {"switching": False},
    "dynamic_switching": {"switching": True},
}


def _get(url: str, timeout: float = 5) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def synthetic_models(root: Path, shape: tuple[int, ...]) -> Path:
    """Two candidates (narrow/wide CNN) in benchmark-output layout, placeholder accuracies."""
    import torch
    from torch import nn

    from nasforge.export.onnx import export_fp32

    for name, width, depth, acc in (("narrow", 8, 0, 0.85), ("wide", 64, 3, 0.92)):
        torch.manual_seed(width)
        layers: list[nn.Module] = [nn.Conv2d(shape[0], width, 3, padding=1), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
        d = root / name / "model" / "fp32"
        d.mkdir(parents=True)
        export_fp32(net.eval(), torch.zeros(2, *shape), d / "fp32.onnx")
        doc = {"candidate": name, "results": {"fp32": {"test_accuracy": acc}}}
        (root / name / "benchmark.json").write_text(json.dumps(doc))
    return root


def _server(models: Path, target: str, args: dict[str, Any]) -> ServerProcess:
    return ServerProcess(models, target, **args)


def open_loop(
    url: str, body: bytes, rate: float, duration_s: float, timeout_s: float, seed: int = 0
) -> dict[str, Any]:
    """Send Poisson arrivals at ``rate``/s for ``duration_s``; return latencies and counts."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration_s * 2) + 10)
    sched = np.cumsum(gaps)
    sched = sched[sched < duration_s]
    lat: list[float] = []
    errors = 0
    done_at: list[float] = []
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.05

    def send(at: float) -> None:
        nonlocal errors
        req = urllib.request.Request(
            url, data=body, method="POST", headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                r.read()
                ok = r.status == 200
        except (urllib.error.URLError, OSError):
            ok = False
        end = time.perf_counter()
        with lock:
            if ok:
                lat.append((end - (t0 + at)) * 1000)
                done_at.append(end)
            else:
                errors += 1

    with ThreadPoolExecutor(max_workers=64) as pool:
        for at in sched:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, float(at))
    span = (max(done_at) - t0) if done_at else float("nan")
    return {"latencies_ms": lat, "errors": errors, "sent": len(sched), "span_s": span}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every mode at every rate; return the results document."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    shape = tuple(args.shape)
    models = synthetic_models(work / "models", shape) if args.synthetic else Path(args.models)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    body = json.dumps({"inputs": x.tolist()}).encode()
    results: dict[str, Any] = {}
    for mode, overrides in MODES.items():
        server_args = {
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "slo_ms": args.slo_ms,
            "threads": args.threads,
            **overrides,
        }
        results[mode] = {}
        for rate in args.rates:
            # A fresh server per point: metrics and the policy start from the same state.
            srv = _server(models, args.target, server_args)
            try:
                srv.wait_ready()
                r = open_loop(srv.url + "/predict", body, rate, args.duration, args.timeout)
                m = _get(srv.url + "/metrics")
            finally:
                srv.stop()
            acc = {v["name"]: v["accuracy"] for v in m["config"]["variants"]}
            served = m.get("samples_per_variant", {})
            total = sum(served.values())
            known = all(acc.get(k) is not None for k in served)
            lat = np.array(r["latencies_ms"])
            results[mode][str(rate)] = {
                "offered_rps": rate,
                "throughput_rps": len(lat) / r["span_s"] if len(lat) else 0.0,
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                "served_accuracy": (
                    sum(acc[k] * n for k, n in served.items()) / total if total and known else None
                ),
                "slo_ms": args.slo_ms,
                "sent": r["sent"],
                "errors": r["errors"],
                "switch_count": m.get("switch_count", 0),
                "samples_per_variant": served,
                "batch_sizes": m.get("batch_sizes", {}),
                "max_batch_size": server_args["max_batch_size"],
            }
            print(f"{mode:>18} @ {rate:>6} rps: {json.dumps(results[mode][str(rate)])[:200]}")
    return {
        "modes": results,
        "duration_s": args.duration,
        "target": args.target,
        "synthetic_models": bool(args.synthetic),
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "note": "smoke run on a shared CPU" if args.smoke_note else "",
    }


def main() -> None:
    """CLI entry."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--models", help="benchmark/export folder of the target's candidates")
    src.add_argument("--synthetic", action="store_true", help="build two tiny CNNs instead")
    p.add_argument("--target", default="onnxruntime-cpu")
    p.add_argument("--shape", type=int, nargs="+", default=[3, 32, 32])
    p.add_argument("--rates", type=float, nargs="+", default=[50, 200, 800])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke-note", action="store_true", help="mark the results as a smoke run")
    p.add_argument("--out", default="benchmarks/results/serving.json")
    args = p.parse_args()
    if args.duration <= 0 or args.duration > 600 or any(r <= 0 for r in args.rates):
        p.error("--duration must be in (0, 600] and rates > 0")
    doc = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
