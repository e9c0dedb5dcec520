"""Serving benchmark: batch 1, dynamic batching, variant switching and early exit on digits.

Two phases (``--phase prepare`` is untimed; only ``--phase run`` needs the timing lock):

1. **prepare** trains the served models on scikit-learn's digits (8x8, the embedded dataset),
   quickly and for real, and exports them in the folder layouts ``nasforge serve`` loads:

   * ``small``: a narrow NB201 cell network (the fast Pareto variant);
   * ``large``: a wide multi-exit NB201 cell network (exit heads after every stage but the
     last), trained with the multi-exit loss; served two ways: ``large`` = the backbone alone
     (one ONNX graph, no early exit) and ``large-ee`` = the staged graphs with thresholds
     calibrated on the validation split (``--max-drop``);
   * ``wide``: a fully connected network (the 64 pixels -> ``--wide-layers`` hidden layers of
     ``--wide-hidden`` units -> 10), the kind of model whose batch-1 cost is streaming its
     weights from memory (each weight is used once per sample), so batching amortises it.

   Why two kinds for dynamic batching. Batching pays on a CPU only where batch 1 leaves the
   hardware idle. ``large`` (3x3 convolutions, its MACs ~3x its weights) is compute-bound at
   batch 1 already: batching can only save the per-call overhead and gains little. ``wide``
   (MACs = weights) is bound by memory bandwidth at batch 1 and by arithmetic when batched, the
   case (fully connected heads, MLPs, transformer projections at short sequences) where a
   dynamic batcher multiplies throughput. The benchmark reports both.

   Test accuracies are measured on the exported ONNX models (ONNX Runtime).

2. **run** starts a real ``nasforge serve`` server (subprocess, own process group) per mode and
   offered rate on 127.0.0.1 and drives it open-loop: Poisson arrivals at the rate for a fixed
   duration, each request one test image of digits, then it stops by itself. Latency is taken
   client-side from the *scheduled* send time (a backed-up client cannot hide queueing) to the
   response; a request that fails or times out counts with the timeout as its latency.
   ``served_accuracy`` is the accuracy of the answers actually returned.

   Modes: ``batch1`` (wide, max_batch_size 1), ``dynamic`` (wide, batching), ``batch1_conv`` and
   ``dynamic_conv`` (the same two on large), ``dynamic_switching`` (small + large, batching,
   SLO-aware switching, judged against ``dynamic_conv``: fixed serving of its largest variant),
   ``early_exit`` (large-ee, batching, judged against ``dynamic_conv``: the same backbone).

    python benchmarks/bench_serve.py --phase prepare --models-dir /tmp/nasforge-bench-serve
    flock /tmp/nasforge-bench.lock nice -n 5 python benchmarks/bench_serve.py --phase run \\
        --models-dir /tmp/nasforge-bench-serve      # defaults: the committed run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "batch1": ("wide", {"max_batch_size": 1, "switching": False}),
    "dynamic": ("wide", {"switching": False}),
    "batch1_conv": ("large", {"max_batch_size": 1, "switching": False}),
    "dynamic_conv": ("large", {"switching": False}),
    "dynamic_switching": ("switch", {"switching": True}),
    "early_exit": ("early", {"switching": False}),
}
#: Offered rates per mode (requests/s) unless --rates is given: each pair of batch-1 / dynamic
#: modes spans its model's batch-1 saturation up to the batcher's.
DEFAULT_RATES: dict[str, list[float]] = {
    "batch1": [25, 50, 100, 200],
    "dynamic": [25, 50, 100, 200, 300],
    "batch1_conv": [20, 40, 80, 120],
    "dynamic_conv": [20, 40, 80, 120],
    "dynamic_switching": [20, 40, 80, 120],
    "early_exit": [20, 40, 80, 120],
}
SETS = {
    "wide": ["wide"],
    "large": ["large"],
    "switch": ["small", "large"],
    "early": ["large-ee"],
}
SMALL_OPS = ("nor_conv_3x3", "skip_connect", "none", "skip_connect", "none", "nor_conv_1x1")
LARGE_OPS = ("nor_conv_3x3",) * 6


# ----------------------------------------------------------------------------- prepare


def digits_mlp(n_in: int, hidden: int, layers: int, n_out: int) -> Any:
    """The ``wide`` model (see the module docstring); torch is imported only by the phases
    that need it, so the load generator's process stays light."""
    from torch import nn

    class MLP(nn.Module):  # a Module, not a bare Sequential (quantizers trace module classes)
        def __init__(self) -> None:
            super().__init__()
            dims = [n_in] + [hidden] * layers
            blocks: list[nn.Module] = []
            for a, b in zip(dims, dims[1:], strict=False):
                blocks += [nn.Linear(a, b), nn.ReLU()]
            self.body = nn.Sequential(*blocks)
            self.head = nn.Linear(dims[-1], n_out)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.head(self.body(x.flatten(1)))

    return MLP()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def _ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from nasforge.export.parity import runtime_runner

    run = runtime_runner(path, "onnxruntime", threads=1)
    pred = np.concatenate([run(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).mean())


def prepare(models: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train and export the served models into ``models``; return ``models.json``."""
    import torch

    from nasforge.artifacts.benchmark_report import BenchmarkReport
    from nasforge.compress.prune import count_macs_params
    from nasforge.data.prepared import load_prepared, save_prepared, split_raw
    from nasforge.data.sources import load_source
    from nasforge.export.onnx import export_fp32
    from nasforge.serve.early_exit import EarlyExitRunner
    from nasforge.space.cell import CellNetworkShape, build_cell_network, count_parameters
    from nasforge.space.early_exit import (
        MultiExitNetwork,
        calibrate_thresholds,
        exit_logits,
        export_staged,
        fit_multi_exit,
    )
    from nasforge.space.nb201 import CellSpec
    from nasforge.training import fit

    torch.set_num_threads(1)  # small batches on a shared 2-core machine: threads only spin
    raw = load_source("digits")
    save_prepared(split_raw(raw, 0.15, 0.15, 0), raw.classes, "digits", 0, models / "data")
    data = load_prepared(models / "data")
    xtr, ytr = data.tensors("train")
    xva, yva = data.tensors("val")
    xte, yte = data.tensors("test")
    xte_np, yte_np = xte.numpy(), yte.numpy()
    variants = models / "variants"
    if variants.exists():
        shutil.rmtree(variants)
    info: dict[str, Any] = {"dataset": "digits", "splits": data.meta["counts"], "models": {}}

    def candidate(name: str, net: torch.nn.Module, acc: float, extra: dict[str, Any]) -> None:
        d = variants / name
        onnx = export_fp32(net, xtr[:8], d / "model" / "fp32" / "fp32.onnx")
        test_acc = _ort_accuracy(onnx, xte_np, yte_np)
        BenchmarkReport(candidate=name, results={"fp32": {"test_accuracy": test_acc}}).write(d)
        macs, params = count_macs_params(net, xtr[:1])
        info["models"][name] = {
            "test_accuracy": test_acc,
            "torch_test_accuracy": acc,
            "params": params,
            "macs": macs,
            "onnx_bytes": onnx.stat().st_size,
            **extra,
        }

    # small: plain training
    shape = CellNetworkShape(1, 10, args.small_channels, 1, args.stages)
    torch.manual_seed(0)
    small = build_cell_network(CellSpec(SMALL_OPS), shape)
    t0 = time.perf_counter()
    fit(small, xtr, ytr, epochs=args.epochs, batch_size=64, lr=0.1)
    acc = float((small(xte).argmax(1) == yte).float().mean())
    candidate(
        "small",
        small,
        acc,
        {
            "arch": CellSpec(SMALL_OPS).arch_str,
            "network": shape.to_dict(),
            "train_s": time.perf_counter() - t0,
            "epochs": args.epochs,
        },
    )
    print(f"small: {info['models']['small']}", flush=True)

    # large: multi-exit training, calibration on val, staged export
    shape = CellNetworkShape(1, 10, args.large_channels, args.large_cells, args.stages)
    torch.manual_seed(0)
    large = MultiExitNetwork(
        build_cell_network(CellSpec(LARGE_OPS), shape), list(range(args.stages - 1))
    )
    t0 = time.perf_counter()
    fit_multi_exit(large, xtr, ytr, epochs=args.epochs, batch_size=64, lr=0.05, kd_alpha=0.5)
    train_s = time.perf_counter() - t0
    exits_test = exit_logits(large, xte)
    exit_acc = [float((lg.argmax(1) == yte_np).mean()) for lg in exits_test]
    cal = calibrate_thresholds(exit_logits(large, xva), yva.numpy(), max_drop=args.max_drop)
    candidate(
        "large",
        large.backbone,
        exit_acc[-1],
        {
            "arch": CellSpec(LARGE_OPS).arch_str,
            "network": shape.to_dict(),
            "train_s": train_s,
            "epochs": args.epochs,
        },
    )
    ee_dir = variants / "large-ee"
    export_staged(large, xtr[:8], ee_dir, cal, metadata={"candidate": "large-ee"})
    runner = EarlyExitRunner(ee_dir, "onnxruntime", threads=1)
    res = runner.run(xte_np)
    ee_acc = float((res.logits.argmax(1) == yte_np).mean())
    man = json.loads((ee_dir / "early_exit.json").read_text())
    man["test_accuracy"] = ee_acc  # what variants_from_dir reports as the variant's accuracy
    _write_json(ee_dir / "early_exit.json", man)
    info["models"]["large-ee"] = {
        "test_accuracy": ee_acc,
        "test_accuracy_per_exit": exit_acc,
        "test_exit_fractions": (np.bincount(res.exits, minlength=runner.num_exits) / len(res.exits))
        .round(4)
        .tolist(),
        "calibration": cal.to_dict(),
        "stage_bytes": [(ee_dir / s).stat().st_size for s in man["stages"]],
        "params": count_parameters(large),
        "exit_stages": man["exit_stages"],
    }
    print(f"large-ee: {info['models']['large-ee']}", flush=True)

    # wide: fully connected, weight-bandwidth-bound at batch 1
    torch.manual_seed(0)
    wide = digits_mlp(64, args.wide_hidden, args.wide_layers, 10)
    t0 = time.perf_counter()
    fit(wide, xtr, ytr, epochs=args.epochs, batch_size=64, lr=0.02)
    with torch.no_grad():
        acc = float((wide(xte).argmax(1) == yte).float().mean())
    candidate(
        "wide",
        wide,
        acc,
        {
            "arch": f"MLP 64-{'-'.join([str(args.wide_hidden)] * args.wide_layers)}-10 (ReLU)",
            "train_s": time.perf_counter() - t0,
            "epochs": args.epochs,
        },
    )
    print(f"wide: {info['models']['wide']}", flush=True)
    info["sizes_note"] = "params/MACs per sample at batch 1 (MACs via nasforge.compress.prune)"
    _write_json(models / "models.json", info)
    return info


def _make_sets(models: Path) -> dict[str, Path]:
    """One folder per served set, holding hard links to the variants it serves."""
    out = {}
    for name, members in SETS.items():
        d = models / "sets" / name
        if d.exists():
            shutil.rmtree(d)
        for m in members:
            shutil.copytree(models / "variants" / m, d / m, copy_function=os.link)
        out[name] = d
    return out


# ----------------------------------------------------------------------------- load


def open_loop(
    host: str,
    port: int,
    bodies: list[bytes],
    labels: np.ndarray,
    profile: list[tuple[float, float]],
    timeout_s: float,
    seed: int = 0,
    workers: int = 64,
) -> dict[str, Any]:
    """Poisson arrivals following ``profile`` = [(rate per s, seconds), ...]; one test image
    per request.

    Each client thread keeps one HTTP/1.1 keep-alive connection (connection set-up would
    otherwise cost the client more CPU than the request on a small machine).
    """
    rng = np.random.default_rng(seed)
    parts, offset = [], 0.0
    for rate, seconds in profile:
        gaps = rng.exponential(1.0 / rate, size=int(rate * seconds * 2) + 10)
        t = np.cumsum(gaps)
        parts.append(offset + t[t < seconds])
        offset += seconds
    sched = np.concatenate(parts)
    order = rng.permutation(len(bodies))
    local = threading.local()
    lock = threading.Lock()
    # latency ms, ok, correct, variant, exit, scheduled send time
    records: list[tuple[float, bool, bool, str, int, float]] = []
    t0 = time.perf_counter() + 0.05

    def conn() -> http.client.HTTPConnection:
        if getattr(local, "c", None) is None:
            local.c = http.client.HTTPConnection(host, port, timeout=timeout_s)
        return local.c

    def send(i: int, at: float) -> None:
        k = int(order[i % len(order)])
        ok, correct, variant, exit_ = False, False, "", -1
        try:
            c = conn()
            c.request("POST", "/predict", bodies[k], {"content-type": "application/json"})
            r = c.getresponse()
            raw = r.read()
            if r.status == 200:
                doc = json.loads(raw)
                ok = True
                correct = doc["classes"][0] == int(labels[k])
                variant = doc.get("variant", "")
                exit_ = int(doc["exits"][0]) if "exits" in doc else -1
        except (OSError, http.client.HTTPException, ValueError):
            local.c = None  # reconnect next time
        end = time.perf_counter()
        lat = (end - (t0 + at)) * 1000 if ok else timeout_s * 1000
        with lock:
            records.append((lat, ok, correct, variant, exit_, at))
            if ok:
                done_at.append(end)

    done_at: list[float] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, at in enumerate(sched):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, i, float(at))
    span = (max(done_at) - t0) if done_at else float("nan")
    return {"records": records, "sent": len(sched), "span_s": span}


def _summarise(r: dict[str, Any], slo_ms: float) -> dict[str, Any]:
    rec = r["records"]
    lat = np.array([x[0] for x in rec])
    ok = np.array([x[1] for x in rec])
    correct = np.array([x[2] for x in rec])
    exits = [x[4] for x in rec if x[1] and x[4] >= 0]
    variants: dict[str, int] = {}
    for x in rec:
        if x[1]:
            variants[x[3]] = variants.get(x[3], 0) + 1
    n_ok = int(ok.sum())
    out = {
        "throughput_rps": n_ok / r["span_s"] if n_ok else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
        "served_accuracy": float(correct[ok].mean()) if n_ok else None,
        "slo_ms": slo_ms,
        "slo_met": bool(len(lat) and np.percentile(lat, 99) <= slo_ms),
        "sent": r["sent"],
        "answered": n_ok,
        "errors": int(len(rec) - n_ok),
        "answers_per_variant": variants,
    }
    if exits:
        counts = np.bincount(exits)
        out["answers_per_exit"] = {str(i): int(c) for i, c in enumerate(counts)}
    return out


def _metrics(port: int) -> dict[str, Any]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", "/metrics")
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def _start(folder: Path, args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from nasforge.serve.process import ServerProcess

    server_args = {
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "slo_ms": args.slo_ms,
        "threads": args.threads,
        **overrides,
    }
    srv = ServerProcess(folder, args.target, **server_args)
    try:
        srv.wait_ready(timeout_s=600)
    except BaseException:
        srv.stop()
        raise
    srv.max_batch_size = server_args["max_batch_size"]
    return srv


def _run_point(
    srv: Any, args: argparse.Namespace, profile: list[tuple[float, float]], data: Any
) -> dict[str, Any]:
    """Drive a running server with one load profile; server counters as differences."""
    bodies, labels = data
    m0 = _metrics(srv.port)
    t_start = time.time()
    r = open_loop("127.0.0.1", srv.port, bodies, labels, profile, args.timeout)
    m = _metrics(srv.port)
    out = {"offered_rps": profile[-1][0], **_summarise(r, args.slo_ms)}
    if len(profile) > 1:  # a load step: also the requests sent after it
        after = sum(sec for _, sec in profile[:-1])
        late = {**r, "records": [x for x in r["records"] if x[5] >= after]}
        late["span_s"] = r["span_s"] - after
        late["sent"] = len(late["records"])
        out["profile"] = [{"rate_rps": a, "seconds": b} for a, b in profile]
        out["after_step"] = _summarise(late, args.slo_ms)
    out.update(
        {
            "max_batch_size": srv.max_batch_size,
            "switch_count": m.get("switch_count", 0) - m0.get("switch_count", 0),
            "switches": [
                {k: s[k] for k in ("from", "to", "reason")}
                for s in m.get("switches", [])
                if s["time"] >= t_start
            ][:10],
            "batch_sizes": _diff(m.get("batch_sizes", {}), m0.get("batch_sizes", {})),
            "server_samples_per_exit": {
                v: _diff(c, m0.get("samples_per_exit", {}).get(v, {}))
                for v, c in m.get("samples_per_exit", {}).items()
            },
            "variants": m.get("config", {}).get("variants"),
        }
    )
    return out


def _acceptance(modes: dict[str, dict[str, Any]], slo: float) -> dict[str, Any]:
    """The issue's acceptance checks computed from the measured points."""

    def pts(mode: str) -> list[dict[str, Any]]:
        return list(modes.get(mode, {}).values())

    def batching(b1_mode: str, dyn_mode: str) -> dict[str, Any] | None:
        b1, dyn = pts(b1_mode), pts(dyn_mode)
        if not (b1 and dyn):
            return None
        b1_sat = max(p["throughput_rps"] for p in b1)
        ok = [p for p in dyn if p["p99_ms"] is not None and p["p99_ms"] <= slo]
        best = max(ok, key=lambda p: p["throughput_rps"]) if ok else None
        ratio = best["throughput_rps"] / b1_sat if best else None
        return {
            "modes": [b1_mode, dyn_mode],
            "batch1_saturation_rps": b1_sat,
            "dynamic_best_rps_within_slo": best["throughput_rps"] if best else None,
            "at_offered_rps": best["offered_rps"] if best else None,
            "p99_ms": best["p99_ms"] if best else None,
            "ratio": ratio,
            "pass": bool(ratio is not None and ratio >= 3.0),
        }

    acc: dict[str, Any] = {}
    if (wide := batching("batch1", "dynamic")) is not None:
        acc["dynamic_batching"] = {**wide, "model": "wide (weight-bandwidth-bound at batch 1)"}
    if (conv := batching("batch1_conv", "dynamic_conv")) is not None:
        acc["dynamic_batching_conv"] = {
            **conv,
            "model": "large (compute-bound at batch 1)",
            "note": "for the record: where batch 1 already saturates the arithmetic units, "
            "batching saves only per-call overhead",
        }
    dyn = pts("dynamic_conv")
    sw = modes.get("dynamic_switching", {})
    if dyn and sw:
        over = [p for p in dyn if p["p99_ms"] > slo]
        rows = []
        for p in over:
            q = sw.get(str(p["offered_rps"]))
            if q is None:
                continue
            rows.append(
                {
                    "offered_rps": p["offered_rps"],
                    "fixed_large_p99_ms": p["p99_ms"],
                    "fixed_large_served_accuracy": p["served_accuracy"],
                    "switching_p99_ms": q["p99_ms"],
                    "switching_served_accuracy": q["served_accuracy"],
                    "switching_holds_slo": q["p99_ms"] <= slo,
                }
            )
        acc["switching"] = {
            "rates_where_fixed_large_misses_slo": rows,
            "pass": bool(rows) and all(r["switching_holds_slo"] for r in rows),
        }
    ee = modes.get("early_exit", {})
    if dyn and ee:
        rows = []
        for p in dyn:
            q = ee.get(str(p["offered_rps"]))
            if q is None or p["p99_ms"] > slo:  # compare where neither is overloaded
                continue
            rows.append(
                {
                    "offered_rps": p["offered_rps"],
                    "mean_ms_without": p["mean_ms"],
                    "mean_ms_with": q["mean_ms"],
                    "mean_latency_cut": 1 - q["mean_ms"] / p["mean_ms"],
                    "served_accuracy_without": p["served_accuracy"],
                    "served_accuracy_with": q["served_accuracy"],
                    "accuracy_loss_points": 100 * (p["served_accuracy"] - q["served_accuracy"]),
                }
            )
        acc["early_exit"] = {
            "points": rows,
            "pass": bool(rows)
            and all(
                r["mean_latency_cut"] >= 0.30 and r["accuracy_loss_points"] <= 1.0 for r in rows
            ),
        }
    return acc


def rates_for(mode: str, args: argparse.Namespace) -> list[float]:
    """The offered rates of ``mode``: ``--rates`` if given, else its default."""
    return [float(r) for r in (args.rates or DEFAULT_RATES[mode])]


def run(models: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every selected mode at every rate; returns the results document."""
    from nasforge.bench.sysinfo import system_info
    from nasforge.data.prepared import load_prepared

    info = json.loads((models / "models.json").read_text())
    sets = _make_sets(models)
    data = load_prepared(models / "data")
    x, y = data.numpy("test")
    bodies = [json.dumps({"inputs": x[i : i + 1].tolist()}).encode() for i in range(len(x))]
    started = time.time()
    results: dict[str, Any] = {}
    for mode in args.modes:
        set_name, overrides = MODES[mode]
        results[mode] = {}
        srv = None
        try:
            for rate in sorted(rates_for(mode, args)):
                # One server per mode, rates ascending with an idle pause between them (start-up
                # of the large model costs more than a point). Switching gets a fresh server per
                # rate so its policy always starts from the same state: the most accurate
                # variant, idle — every point is then also a load step from 0 to the rate.
                if srv is None or mode == "dynamic_switching":
                    if srv is not None:
                        srv.stop()
                    srv = _start(sets[set_name], args, overrides)
                else:
                    time.sleep(args.pause)
                p = _run_point(srv, args, [(rate, args.duration)], (bodies, y))
                results[mode][str(rate)] = p
                keys = ("throughput_rps", "p50_ms", "p99_ms", "mean_ms", "served_accuracy")
                print(
                    f"{mode:>18} @ {rate:>6} rps: "
                    + " ".join(f"{k}={p[k]:.4g}" for k in keys if p[k] is not None)
                    + f" errors={p['errors']} switches={p['switch_count']}",
                    flush=True,
                )
        finally:
            if srv is not None:
                srv.stop()
    step: dict[str, Any] = {}
    if args.step and min(args.step) > 0:
        low, high = args.step
        profile = [(low, args.duration / 3), (high, 2 * args.duration / 3)]
        for mode in ("dynamic_conv", "dynamic_switching"):
            set_name, overrides = MODES[mode]
            srv = _start(sets[set_name], args, overrides)
            try:
                p = _run_point(srv, args, profile, (bodies, y))
            finally:
                srv.stop()
            step[mode] = p
            print(
                f"load step {low:g}->{high:g} rps, {mode}: p99 {p['p99_ms']:.4g} ms (after "
                f"step {p['after_step']['p99_ms']:.4g} ms), served acc {p['served_accuracy']:.4f}"
                f", switches {p['switch_count']}",
                flush=True,
            )
    acceptance = _acceptance(results, args.slo_ms)
    if step:
        fixed, sw = step["dynamic_conv"], step["dynamic_switching"]
        acceptance["load_step"] = {
            "profile": fixed["profile"],
            "fixed_large_p99_ms": fixed["p99_ms"],
            "fixed_large_served_accuracy": fixed["served_accuracy"],
            "switching_p99_ms": sw["p99_ms"],
            "switching_served_accuracy": sw["served_accuracy"],
            "switch_count": sw["switch_count"],
            "pass": fixed["p99_ms"] > args.slo_ms >= sw["p99_ms"],
        }
    return {
        "modes": results,
        "load_step": step,
        "acceptance": acceptance,
        "models": info,
        "settings": {
            "target": args.target,
            "precision": "fp32",
            "duration_s": args.duration,
            "rates": {mode: rates_for(mode, args) for mode in args.modes},
            "slo_ms": args.slo_ms,
            "max_batch_size": args.max_batch_size,
            "batch1_max_batch_size": 1,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "runtime_threads_per_session": args.threads,
            "request": "one digits test image (1x8x8, normalised) per request, JSON",
            "client": "open loop, Poisson arrivals, 64 threads with keep-alive connections",
            "latency": "client-side, scheduled send time to response; failures count as timeout",
            "server": "nasforge serve (LitServe 1 worker), fresh server per point, 127.0.0.1",
        },
        "system": system_info(args.threads),
        "wall_s": time.time() - started,
        "note": args.note,
    }


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    """Summary table of ``serving.json``."""
    s, sysi = doc["settings"], doc["system"]
    lines = [
        "# Serving benchmark (digits, `nasforge serve`)",
        "",
        f"CPU: {sysi['cpu_model']} ({sysi['logical_cores']} logical cores, shared), ISA: "
        f"{', '.join(sysi['isa_flags'])}; load avg at end {sysi.get('load_avg_1m')}; "
        f"ONNX Runtime {sysi['versions']['onnxruntime']}, OpenVINO {sysi['versions']['openvino']}"
        f"; target {s['target']} ({s['precision']}), {s['runtime_threads_per_session']} runtime "
        f"thread(s); max batch {s['max_batch_size']} (batch1 mode: 1), queue delay "
        f"{s['max_queue_delay_ms']} ms; p99 objective {s['slo_ms']} ms; {s['duration_s']} s "
        "per point, fresh server per point.",
        "",
        "## Models (trained on digits by the benchmark's prepare phase)",
        "",
        "| model | test acc (ONNX) | params | MACs/sample | file bytes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in doc["models"]["models"].items():
        size = m.get("onnx_bytes", sum(m.get("stage_bytes", [])))
        macs = f"{m['macs']:,}" if "macs" in m else "as large, up to its exit"
        lines.append(f"| {name} | {m['test_accuracy']:.4f} | {m['params']:,} | {macs} | {size:,} |")
    ee = doc["models"]["models"].get("large-ee")
    if ee:
        lines += [
            "",
            f"large-ee: exits after stages {ee['exit_stages']}; per-exit test accuracy "
            f"{[round(a, 4) for a in ee['test_accuracy_per_exit']]}; thresholds "
            f"{[round(t, 4) for t in ee['calibration']['thresholds']]} (val, max drop "
            f"{ee['calibration']['max_drop']}); test exit fractions {ee['test_exit_fractions']}.",
        ]
    lines += [
        "",
        "## Results per mode and offered rate",
        "",
        "| mode | served | offered rps | throughput rps | p50 ms | p99 ms | mean ms | served acc "
        "| p99 ≤ SLO | errors | switches |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, pts in doc["modes"].items():
        served = " + ".join(SETS[MODES[mode][0]]) if mode in MODES else "?"
        for p in pts.values():
            acc = p["served_accuracy"]
            lines.append(
                f"| {mode} | {served} | {p['offered_rps']:g} | {p['throughput_rps']:.1f} | "
                f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['mean_ms']:.1f} | "
                f"{acc:.4f} | {'yes' if p['slo_met'] else 'no'} | {p['errors']} | "
                f"{p['switch_count']} |"
                if acc is not None
                else f"| {mode} | {served} | {p['offered_rps']:g} | no answers | | | | | no | "
                f"{p['errors']} | |"
            )
    if doc.get("load_step"):
        lines += [
            "",
            "## Load step",
            "",
            "| mode | profile | p99 ms (all) | p99 ms (after step) | served acc | switches |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for mode, p in doc["load_step"].items():
            prof = " -> ".join(f"{x['rate_rps']:g} rps {x['seconds']:g} s" for x in p["profile"])
            lines.append(
                f"| {mode} | {prof} | {p['p99_ms']:.1f} | {p['after_step']['p99_ms']:.1f} | "
                f"{p['served_accuracy']:.4f} | {p['switch_count']} |"
            )
    lines += ["", "## Acceptance", "", "```json", json.dumps(doc["acceptance"], indent=2), "```"]
    if doc.get("note"):
        lines += ["", doc["note"]]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main() -> None:
    """CLI entry."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--phase",
        choices=["prepare", "run", "all", "markdown"],
        default="all",
        help="markdown: rewrite the .md summary from an existing --out JSON (with --note)",
    )
    p.add_argument("--models-dir", default="/tmp/nasforge-bench-serve")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--small-channels", type=int, default=16)
    p.add_argument("--large-channels", type=int, default=96)
    p.add_argument("--large-cells", type=int, default=2)
    p.add_argument("--max-drop", type=float, default=0.005)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--target", default="onnxruntime-cpu")
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=None,
        help="offered rates for every mode (default: per mode, see DEFAULT_RATES)",
    )
    p.add_argument("--wide-hidden", type=int, default=4096)
    p.add_argument("--wide-layers", type=int, default=4)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--slo-ms", type=float, default=250.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--step",
        type=float,
        nargs=2,
        default=[20, 120],
        metavar=("LOW", "HIGH"),
        help="also run a load step LOW -> HIGH rps (1/3 + 2/3 of --duration) for fixed "
        "large serving and for switching (default 20 120; 0 0 = skip)",
    )
    p.add_argument("--pause", type=float, default=3.0, help="idle seconds between rates")
    p.add_argument("--note", default="")
    p.add_argument("--out", default="benchmarks/results/serving.json")
    args = p.parse_args()
    if not 0 < args.duration <= 120 or any(r <= 0 for r in args.rates or []):
        p.error("--duration must be in (0, 120] s and rates > 0")
    models = Path(args.models_dir)
    if args.phase == "markdown":
        out = Path(args.out)
        doc = json.loads(out.read_text())
        if args.note:
            doc["note"] = args.note
            _write_json(out, doc)
        write_markdown(doc, out.with_suffix(".md"))
        return
    if args.phase in ("prepare", "all"):
        models.mkdir(parents=True, exist_ok=True)
        prepare(models, args)
    if args.phase in ("run", "all"):
        if not (models / "models.json").is_file():
            p.error(f"no prepared models in {models}; run --phase prepare first")
        doc = run(models, args)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(out, doc)
        write_markdown(doc, out.with_suffix(".md"))
        print(json.dumps(doc["acceptance"], indent=2))
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
