"""Compression benchmark on CIFAR-10 (JPEG): FP32 vs KD student vs pruned vs INT8 (QAT, PTQ).

Trains a reference network (a small ResNet, airbench-style recipe: SGD + Nesterov, one-cycle LR,
label smoothing, flip + pad-crop augmentation), then derives every variant from it and measures
each *exported* model in ONNX Runtime and OpenVINO (FP32 pinned to f32):

* ``fp32``      the reference;
* ``student``   a half-width network trained without KD (mean/std over ``--seeds``);
* ``kd``        the same student trained with logit KD from the reference (same seeds);
* ``pruned``    the reference, structured-pruned to ``--prune-flops`` of its MACs in
                ``--prune-steps`` steps with fine-tuning (Torch-Pruning, magnitude);
* ``int8_qat``  nasforge QAT (torchao pt2e, X86InductorQuantizer) -> QDQ ONNX;
* ``int8_ptq``  nasforge PTQ (torchao pt2e) -> QDQ ONNX;
* ``ort_ptq``   ONNX Runtime ``quantize_static`` (QDQ, per-channel, S8S8) of the FP32 ONNX;
* ``nncf_ptq``  ``nncf.quantize`` of the FP32 ONNX, run by OpenVINO only.

Writes ``benchmarks/results/compression_cifar10.{json,md}`` with, per variant, ``test_acc``,
``size_bytes`` and ``latency[runtime][batch]["p50_ms"]``, plus the CPU model, ISA flags, threads
and versions. The CPU time budget of each training phase is recorded (``train_seconds``)::

    nice -n 5 .venv/bin/python benchmarks/bench_compress.py                 # full run (hours)
    .venv/bin/python benchmarks/bench_compress.py --quick --out /tmp/bc     # smoke run (minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nasforge.compress.prune import count_macs_params, prune_structured
from nasforge.compress.qat import ptq, quantize_qat, save_quantized
from nasforge.export.onnx import export_fp32, export_int8
from nasforge.export.parity import check_parity, runtime_runner
from nasforge.training import fit as train_fit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar"
MEAN = np.array([0.4913, 0.4821, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)
RUNTIMES = {"onnxruntime": "onnxruntime-cpu", "openvino": "openvino-cpu"}


# --- model --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """ResNet-(6n+2)-style CIFAR network; ``width`` channels in the first stage."""

    def __init__(self, width: int = 32, blocks: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c = width
        for stage in range(3):
            c_out = width * 2**stage
            for b in range(blocks):
                layers.append(BasicBlock(c, c_out, 2 if (stage > 0 and b == 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


# --- data and training --------------------------------------------------------------------------


def load_cifar(path: Path, max_per_class: int | None, max_test: int | None):
    from nasforge.data.sources import load_source

    raw = load_source(str(path), max_per_class=max_per_class)
    if raw.x_test is None or raw.y_test is None:
        raise SystemExit(f"{path}: expected train/ and test/ splits")

    def norm(x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)

    xt, yt = raw.x_test, raw.y_test
    if max_test:
        keep = np.random.default_rng(0).permutation(len(xt))[:max_test]
        xt, yt = xt[keep], yt[keep]
    return norm(raw.x), raw.y.astype(np.int64), norm(xt), yt.astype(np.int64)


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float = 0.2,
    batch: int = 256,
    seed: int = 0,
    teacher: nn.Module | None = None,
    kd_temp: float = 4.0,
    kd_alpha: float = 0.9,
) -> float:
    """Train with nasforge's loop (one-cycle SGD, crop+flip, label smoothing 0.1; logit KD with
    ``teacher``). Returns the CPU seconds used."""
    start = time.process_time()
    torch.manual_seed(seed)
    train_fit(
        model,
        torch.from_numpy(x),
        torch.from_numpy(y),
        epochs=epochs,
        batch_size=batch,
        lr=lr,
        seed=seed,
        teacher=teacher,
        kd_temperature=kd_temp,
        kd_alpha=kd_alpha,
        label_smoothing=0.1,
    )
    return time.process_time() - start


def torch_acc(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, y: np.ndarray) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            correct += int(
                (fn(torch.from_numpy(x[i : i + 500])).argmax(1).numpy() == y[i : i + 500]).sum()
            )
    return correct / len(x)


def exported_acc(path: Path, runtime: str, x: np.ndarray, y: np.ndarray) -> float:
    run = runtime_runner(path, runtime, ov_precision="f32")
    correct = sum(
        int((run(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum()) for i in range(0, len(x), 500)
    )
    return correct / len(x)


# --- baselines ----------------------------------------------------------------------------------


def ort_static_ptq(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    """ONNX Runtime static PTQ: QDQ, per-channel, S8S8 (what a user would pick)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            import onnx

            name = onnx.load(str(fp32)).graph.input[0].name
            self.it = iter({name: calib[i : i + 32]} for i in range(0, len(calib), 32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    pre.unlink()
    return out


def nncf_ptq(fp32: Path, out_xml: Path, calib: np.ndarray) -> Path | None:
    """NNCF PTQ of the FP32 model (OpenVINO), or None where nncf is missing."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(min(len(calib), 300))])
    quantized = nncf.quantize(model, dataset, subset_size=300)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml


# --- measuring ----------------------------------------------------------------------------------


def latency(path: Path, runtime: str, batch: int, threads: int, repeats: int) -> dict[str, Any]:
    from nasforge.bench.harness import measure

    res = measure(path, RUNTIMES[runtime], batch_size=batch, threads=threads, repeats=repeats)
    return {
        "p50_ms": res.p50_ms,
        "p90_ms": res.p90_ms,
        "executed_precision": res.executed_precision,
    }


def file_size(path: Path) -> int:
    size = path.stat().st_size
    if path.suffix == ".xml":
        size += path.with_suffix(".bin").stat().st_size
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--epochs", type=int, default=30, help="reference training epochs")
    ap.add_argument("--student-epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prune-flops", type=float, default=0.5)
    ap.add_argument("--prune-steps", type=int, default=3)
    ap.add_argument("--prune-finetune-epochs", type=int, default=3, help="per step")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = args.student_epochs = 1
        args.seeds, args.prune_steps, args.prune_finetune_epochs, args.qat_epochs = 1, 1, 1, 1
        args.max_per_class, args.max_test, args.repeats, args.width = 50, 500, 5, 16
    torch.set_num_threads(args.threads)
    from nasforge.bench.sysinfo import system_info

    t0 = time.time()
    x, y, xt, yt = load_cifar(args.data, args.max_per_class, args.max_test)
    print(f"data: {len(x)} train, {len(xt)} test ({time.time() - t0:.0f} s)", flush=True)
    example = torch.from_numpy(x[:8])
    calib = x[np.random.default_rng(0).permutation(len(x))[:512]]
    work = Path(tempfile.mkdtemp(prefix="bench_compress_"))
    results: dict[str, Any] = {"variants": {}, "settings": vars(args) | {"data": str(args.data)}}
    variants: dict[str, dict[str, Any]] = {}

    # reference
    ref = SmallResNet(args.width, args.blocks)
    train_s = fit(ref, x, y, args.epochs)
    print(f"fp32: {torch_acc(ref, xt, yt):.4f} ({train_s:.0f} CPU s)", flush=True)
    files: dict[str, Path] = {"fp32": export_fp32(ref, example, work / "fp32.onnx")}
    variants["fp32"] = {"torch_acc": torch_acc(ref, xt, yt), "train_cpu_seconds": train_s}

    # student with and without KD, over seeds
    for name, teacher in (("student", None), ("kd", ref)):
        accs, secs, last = [], [], None
        for seed in range(args.seeds):
            student = SmallResNet(args.width // 2, args.blocks)
            secs.append(fit(student, x, y, args.student_epochs, seed=seed, teacher=teacher))
            accs.append(torch_acc(student, xt, yt))
            last = student
        assert last is not None
        files[name] = export_fp32(last, example, work / f"{name}.onnx")
        variants[name] = {
            "torch_acc_mean": statistics.mean(accs),
            "torch_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "torch_acc_seeds": accs,
            "train_cpu_seconds": sum(secs),
        }
        print(f"{name}: {accs}", flush=True)

    # structured pruning with a gradual schedule
    start = time.process_time()
    pruned, report = prune_structured(
        copy.deepcopy(ref),
        example,
        target_flops_ratio=args.prune_flops,
        steps=args.prune_steps,
        finetune=lambda m: fit(m, x, y, args.prune_finetune_epochs, lr=0.05),
    )
    files["pruned"] = export_fp32(pruned, example, work / "pruned.onnx")
    variants["pruned"] = {
        "torch_acc": torch_acc(pruned, xt, yt),
        "prune": report,
        "train_cpu_seconds": time.process_time() - start,
    }
    print(f"pruned: {variants['pruned']['torch_acc']:.4f} flops {report['flops_ratio']:.3f}")

    # INT8: nasforge QAT and PTQ, ORT static PTQ, NNCF PTQ
    start = time.process_time()
    qat_res = quantize_qat(ref, example, (x, y), epochs=args.qat_epochs, lr=1e-3, batch_size=128)
    qat_s = time.process_time() - start
    pt2 = save_quantized(qat_res.model, example, work / "int8_qat.pt2")
    files["int8_qat"] = export_int8(pt2, example, work / "int8_qat.onnx")
    variants["int8_qat"] = {
        "torch_acc": torch_acc(qat_res.model, xt, yt),
        "quant_scheme": qat_res.scheme,
        "train_cpu_seconds": qat_s,
        "parity": {rt: check_parity(qat_res.model, files["int8_qat"], xt, rt) for rt in RUNTIMES},
    }
    ptq_res = ptq(ref, example, calib)
    files["int8_ptq"] = export_int8(ptq_res.model, example, work / "int8_ptq.onnx")
    variants["int8_ptq"] = {
        "torch_acc": torch_acc(ptq_res.model, xt, yt),
        "quant_scheme": ptq_res.scheme,
    }
    files["ort_ptq"] = ort_static_ptq(files["fp32"], work / "ort_ptq.onnx", calib)
    variants["ort_ptq"] = {}
    nncf_xml = nncf_ptq(files["fp32"], work / "nncf_ptq.xml", calib)
    if nncf_xml is not None:
        files["nncf_ptq"] = nncf_xml
        variants["nncf_ptq"] = {}
    variants["fp32"]["parity"] = {rt: check_parity(ref, files["fp32"], xt, rt) for rt in RUNTIMES}

    # accuracy of the exported files and latency, per runtime and batch
    for name, path in files.items():
        v = variants[name]
        v["size_bytes"] = file_size(path)
        v["file"] = path.name
        runtimes = ["openvino"] if path.suffix == ".xml" else list(RUNTIMES)
        v["test_acc_by_runtime"] = {rt: exported_acc(path, rt, xt, yt) for rt in runtimes}
        v["test_acc"] = v["test_acc_by_runtime"][runtimes[0]]
        v["latency"] = {
            rt: {str(b): latency(path, rt, b, args.threads, args.repeats) for b in (1, 32)}
            for rt in runtimes
        }
        print(name, json.dumps({k: v[k] for k in ("test_acc", "size_bytes")}), flush=True)
    macs, params = count_macs_params(ref, example)
    results["variants"] = variants
    results["reference"] = {
        "arch": f"SmallResNet(width={args.width}, blocks={args.blocks})",
        "macs": macs,
        "params": params,
    }
    results["system"] = system_info(args.threads)
    results["wall_seconds"] = time.time() - t0
    write(results, args.out)
    return 0


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "compression_cifar10.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, json_path)
    sysinfo = results["system"]
    lines = [
        "# Compression on CIFAR-10 (JPEG)",
        "",
        f"CPU: {sysinfo.get('cpu_model')}; threads {sysinfo.get('threads')}; "
        f"VNNI {sysinfo.get('has_vnni')}; AMX {sysinfo.get('has_amx')}; "
        f"load {sysinfo.get('load_avg_1m')}",
        "",
        "| variant | test acc | size (bytes) | ORT b1 p50 ms | ORT b32 p50 ms | OV b1 p50 ms "
        "| OV b32 p50 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in results["variants"].items():
        lat = v.get("latency", {})

        def cell(rt: str, b: str, lat: dict[str, Any] = lat) -> str:
            return f"{lat[rt][b]['p50_ms']:.2f}" if rt in lat else "-"

        lines.append(
            f"| {name} | {v.get('test_acc', float('nan')):.4f} | {v.get('size_bytes', 0)} | "
            f"{cell('onnxruntime', '1')} | {cell('onnxruntime', '32')} | "
            f"{cell('openvino', '1')} | {cell('openvino', '32')} |"
        )
    (out / "compression_cifar10.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    sys.exit(main())
