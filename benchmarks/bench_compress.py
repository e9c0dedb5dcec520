"""Compression benchmark on CIFAR-10 (JPEG): FP32 vs KD student vs pruned vs INT8 (QAT, PTQ).

Trains a reference network on CPU within a stated budget (an airbench-style VGG: conv-BN-ReLU
blocks with max-pool downsampling; SGD + Nesterov, one-cycle LR with linear decay, label
smoothing, per-image flip + translate augmentation, batch 256, channels_last, fp32), derives
every variant from it and measures each *exported* model in ONNX Runtime and OpenVINO (FP32
pinned to f32):

* ``fp32``      the reference;
* ``student``   a half-width network trained without KD (``--seeds`` seeds, mean/std);
* ``kd``        the same student trained with logit KD from the reference (same seeds, same data);
* ``pruned``    the reference, structured-pruned to ``--prune-flops`` of its MACs in
                ``--prune-steps`` steps with fine-tuning between (Torch-Pruning, magnitude);
* ``int8_qat``  nasforge QAT (torchao pt2e, X86 quantizer) -> QDQ ONNX;
* ``int8_ptq``  nasforge PTQ (torchao pt2e) -> QDQ ONNX;
* ``ort_ptq``   ONNX Runtime ``quantize_static`` (QDQ, per-channel, S8S8) of the FP32 ONNX;
* ``nncf_ptq``  ``nncf.quantize`` of the FP32 model (OpenVINO IR), run by OpenVINO only;
* ``ort_ptq_per_tensor`` (MobileNet section only) ``quantize_static`` with per-tensor weights,
                ONNX Runtime's default granularity.

A second, smaller section repeats the INT8 comparison on a depthwise-separable MobileNet-style
network of the macro space (:mod:`nasforge.space.macro`), where PTQ is known to lose more.

Two phases, so that only the timed part holds the shared timing lock::

    nice -n 10 .venv/bin/python benchmarks/bench_compress.py --phase train
    flock /tmp/nasforge-bench.lock nice -n 5 .venv/bin/python benchmarks/bench_compress.py \\
        --phase measure
    .venv/bin/python benchmarks/bench_compress.py --quick --work /tmp/bcq --out /tmp/bcq  # smoke

``train`` writes models and ``train.json`` to ``--work`` (resumable: finished steps are kept);
``measure`` times every exported file (all sessions open, timed round-robin in ``--rounds``
rounds so that every ratio is measured side by side) and writes
``benchmarks/results/compression_cifar10.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasforge.compress.prune import (
    count_macs_params,
    load_model_files,
    prune_structured,
    save_model,
)
from nasforge.compress.qat import (
    freeze_bn_stats,
    load_quantized,
    ptq,
    quantize_qat,
    save_quantized,
)
from nasforge.export.onnx import export_fp32, export_int8
from nasforge.export.parity import check_parity, runtime_runner
from nasforge.training import kd_loss, train_loop

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar"
DEFAULT_WORK = Path("/tmp/nasforge-bench-compress")
MEAN = np.array([0.4913, 0.4821, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1) * 255
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1) * 255
RUNTIMES = {"onnxruntime": "onnxruntime-cpu", "openvino": "openvino-cpu"}
BUDGET_MINUTES = 130


# --- models -------------------------------------------------------------------------------------


class CifarConvNet(nn.Module):
    """airbench-style VGG: a conv-BN-ReLU stem, then per width a conv-BN-ReLU-MaxPool and a
    conv-BN-ReLU; global max pool and a linear classifier.

    A Module (not a top-level ``nn.Sequential``): NNCF 3.4 cannot quantize a top-level
    Sequential. BN directly follows every conv so that the exporters fold it and the INT8
    quantizer's conv-BN(-ReLU) patterns match.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), stem: int = 24) -> None:
        super().__init__()
        self.stem = _cbr(3, stem)
        layers: list[nn.Module] = []
        c = stem
        for w in widths:
            layers += [*_cbr(c, w), nn.MaxPool2d(2), *_cbr(w, w)]
            c = w
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(torch.flatten(self.pool(self.body(self.stem(x))), 1))


def _cbr(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def as_module(net: nn.Module) -> nn.Module:
    """Wrap a top-level ``nn.Sequential`` in a Module (NNCF cannot quantize a bare Sequential)."""
    if type(net) is nn.Sequential:

        class Wrapped(nn.Module):
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.net = inner

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x)

        return Wrapped(net)
    return net


def macro_net(spec_json: str) -> nn.Module:
    from nasforge.space.macro import MacroSpec, build_macro_network

    return build_macro_network(MacroSpec.from_json(spec_json), 3, 10)


# --- data ---------------------------------------------------------------------------------------


def load_cifar_u8(tar: Path, cache_dir: Path) -> tuple[torch.Tensor, ...]:
    """CIFAR-10 as uint8 NCHW tensors; the JPEG tar is decoded once into an .npz cache."""
    st = tar.stat()
    key = hashlib.sha1(f"{tar.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = cache_dir / f"nasforge-cifar10-u8-{key}.npz"
    if not cache.is_file():
        from nasforge.data.sources import load_source

        raw = load_source(str(tar))
        if raw.x_test is None or raw.y_test is None:
            raise SystemExit(f"{tar}: expected train/ and test/ splits")
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=raw.x, y=raw.y, xt=raw.x_test, yt=raw.y_test)
        os.replace(tmp, cache)
    with np.load(cache) as z:
        return tuple(torch.from_numpy(z[k]) for k in ("x", "y", "xt", "yt"))


def normalize(xu8: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 NCHW -> normalized float32 NCHW (contiguous), the input every exported model takes."""
    x = np.asarray(xu8, dtype=np.float32)
    return np.ascontiguousarray((x - MEAN) / STD)


def _norm_cl(xu8: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(normalize(xu8)).contiguous(memory_format=torch.channels_last)


def augment(xu8: torch.Tensor, rng: np.random.Generator, pad: int = 2) -> torch.Tensor:
    """Per-image random translate (reflect pad + crop) and horizontal flip, on uint8 data."""
    n, _, h, w = xu8.shape
    padded = torch.from_numpy(
        np.pad(xu8.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    )
    out = torch.empty_like(xu8)
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    for a in range(2 * pad + 1):
        for b in range(2 * pad + 1):
            idx = torch.from_numpy(np.flatnonzero((dy == a) & (dx == b)))
            out[idx] = padded[idx, :, a : a + h, b : b + w]
    flip = torch.from_numpy(np.flatnonzero(rng.random(n) < 0.5))
    out[flip] = out[flip].flip(-1)
    return out


# --- training -----------------------------------------------------------------------------------


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    *,
    lr: float = 0.4,
    batch: int = 512,
    wd: float = 5e-4,
    label_smoothing: float = 0.2,
    seed: int = 0,
    views: list[torch.Tensor] | None = None,
    teacher_logits: list[torch.Tensor] | None = None,
    kd_temp: float = 4.0,
    kd_alpha: float = 0.7,
    log: str = "",
) -> float:
    """Train in place (airbench-style recipe); return the CPU seconds used.

    SGD + Nesterov, one-cycle LR (linear warm-up over 20% of the steps, then linear decay),
    weight decay on conv/linear weights only, label smoothing, channels_last, fp32. ``views``
    are pre-augmented copies of ``x`` (epoch ``e`` uses ``views[e % len]``), so that students
    with and without KD see the same images and the teacher's logits on them are computed once
    (``teacher_logits[e]``); otherwise each epoch is augmented afresh.
    """
    start = time.process_time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    steps = len(x) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=lr,
        total_steps=max(1, epochs * steps),
        pct_start=0.2,
        anneal_strategy="linear",
        div_factor=10,
        final_div_factor=100,
    )

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        xa = views[epoch % len(views)] if views is not None else augment(x, rng)
        tl = teacher_logits[epoch % len(teacher_logits)] if teacher_logits is not None else None
        perm = torch.from_numpy(rng.permutation(len(x)))
        for s in range(steps):  # whole batches only
            idx = perm[s * batch : (s + 1) * batch]
            yield _norm_cl(xa[idx]), y[idx], *(() if tl is None else (tl[idx],))

    def step(b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = model(b[0])
        if len(b) == 3:
            loss = kd_loss(out, b[2], b[1], kd_temp, kd_alpha, label_smoothing)
        else:
            loss = F.cross_entropy(out, b[1], label_smoothing=label_smoothing)
        loss.backward()
        return loss

    t0 = time.time()

    def before_epoch(epoch: int) -> None:
        nonlocal t0
        t0 = time.time()

    def after_epoch(epoch: int, losses: dict[str, float]) -> None:
        if log:
            print(
                f"  {log} epoch {epoch + 1}/{epochs}: loss {losses['loss']:.3f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )

    train_loop(
        model,
        opt,
        step,
        batches,
        epochs=epochs,
        scheduler=sched,
        before_epoch=before_epoch,
        after_epoch=after_epoch,
        progress_kind=None,
    )
    model.eval()
    return time.process_time() - start


@torch.no_grad()
def logits_of(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray) -> np.ndarray:
    """Logits of a torch callable on normalized float inputs, in batches of 500."""
    return np.concatenate(
        [fn(torch.from_numpy(x[i : i + 500])).numpy() for i in range(0, len(x), 500)]
    )


def torch_acc(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, y: np.ndarray) -> float:
    if isinstance(fn, nn.Module) and not isinstance(fn, torch.fx.GraphModule):
        fn.eval()
    return float((logits_of(fn, x).argmax(1) == y).mean())


def exported_acc(path: Path, runtime: str, x: np.ndarray, y: np.ndarray) -> float:
    run = runtime_runner(path, runtime, ov_precision="f32")
    pred = np.concatenate([run(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).mean())


# --- baselines ----------------------------------------------------------------------------------


def ort_static_ptq(fp32: Path, out: Path, calib: np.ndarray, per_channel: bool = True) -> Path:
    """ONNX Runtime static PTQ: QDQ, per-channel, S8S8 (what a user would pick).

    ``per_channel=False`` is the per-tensor variant (ONNX Runtime's own default), which is what
    makes PTQ lose accuracy on depthwise convolutions.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(fp32)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({name: calib[i : i + 32]} for i in range(0, len(calib), 32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    # the symbolic shape pass cannot follow the exporter's dynamic-batch Reshape; ONNX shape
    # inference and the graph optimizations still run
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    tmp = out.with_suffix(".tmp.onnx")
    quantize_static(
        str(pre),
        str(tmp),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    pre.unlink()
    os.replace(tmp, out)
    return out


def nncf_ptq(fp32: Path, out_xml: Path, calib: np.ndarray) -> Path:
    """``nncf.quantize`` (default performance preset) of the FP32 model, saved as OpenVINO IR.

    NNCF quantizes the OpenVINO model read from the FP32 ONNX file (the OpenVINO user's path;
    the torch model is a Module, not a top-level Sequential, should one quantize it in torch).
    """
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(min(len(calib), 300))])
    quantized = nncf.quantize(model, dataset, subset_size=300)
    tmp = out_xml.with_name(out_xml.stem + ".tmp.xml")
    ov.save_model(quantized, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), out_xml.with_suffix(".bin"))
    os.replace(tmp, out_xml)
    return out_xml


# --- the train phase ----------------------------------------------------------------------------


class Work:
    """The work folder: models and ``train.json``, written after every finished step."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.json = root / "train.json"
        self.state: dict[str, Any] = (
            json.loads(self.json.read_text()) if self.json.is_file() else {}
        )

    def done(self, step: str) -> bool:
        return step in self.state.get("done", [])

    def finish(self, step: str, **entries: Any) -> None:
        for key, value in entries.items():
            section = self.state.setdefault(key, {})
            section.update(value)
        self.state.setdefault("done", []).append(step)
        self.save()

    def save(self) -> None:
        tmp = self.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        os.replace(tmp, self.json)


def parity_all(torch_fn: Any, path: Path, x: np.ndarray) -> dict[str, Any]:
    return {rt: check_parity(torch_fn, path, x, rt, threads=2) for rt in RUNTIMES}


def accs_all(path: Path, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    runtimes = ["openvino"] if path.suffix == ".xml" else list(RUNTIMES)
    return {rt: exported_acc(path, rt, x, y) for rt in runtimes}


def file_entry(path: Path, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    size = path.stat().st_size + (
        path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0
    )
    by_rt = accs_all(path, x, y)
    return {
        "file": path.name,
        "size_bytes": size,
        "test_acc_by_runtime": by_rt,
        "test_acc": by_rt.get("onnxruntime", by_rt.get("openvino")),
    }


@dataclass(frozen=True)
class QatRecipe:
    """How the benchmark fine-tunes a QAT-prepared graph (SGD + Nesterov, linear decay).

    Attributes:
        epochs: passes over ``samples`` random, freshly augmented train images.
        samples: images per epoch.
        batch: batch size.
        lr: initial learning rate (decays linearly to 0).
        freeze_bn: share of the steps after which BatchNorm statistics stop updating
            (1.0: never). Observers always freeze after half the steps.
    """

    epochs: int
    samples: int
    batch: int
    lr: float
    freeze_bn: float = 1.0

    def describe(self) -> str:
        bn = (
            f", BN statistics frozen after {self.freeze_bn:.0%} of the steps"
            if self.freeze_bn < 1.0
            else ""
        )
        return (
            f"{self.epochs} epoch(s) on {self.samples} train images, batch {self.batch}, SGD lr "
            f"{self.lr} linear decay, observers frozen after half the steps{bn}"
        )


def int8_suite(
    work: Work,
    prefix: str,
    ref: nn.Module,
    fp32_path: Path,
    x: torch.Tensor,
    y: torch.Tensor,
    xt: np.ndarray,
    yt: np.ndarray,
    calib: np.ndarray,
    qat_recipe: QatRecipe,
    per_tensor_baseline: bool = False,
) -> dict[str, dict[str, Any]]:
    """nasforge QAT and PTQ, ORT static PTQ and NNCF PTQ, all from the same FP32 model.

    ``per_tensor_baseline`` adds ``ort_ptq_per_tensor`` (ONNX Runtime's default granularity).
    """
    example = torch.from_numpy(xt[:8])
    out: dict[str, dict[str, Any]] = {}
    d = work.root

    # nasforge QAT: torchao pt2e, fine-tuned on a random subset with augmentation
    def qat_loop(prepared: torch.fx.GraphModule) -> None:
        from torchao.quantization.pt2e import disable_observer

        r = qat_recipe
        rng = np.random.default_rng(0)
        opt = torch.optim.SGD(prepared.parameters(), lr=r.lr, momentum=0.9, nesterov=True)
        n = min(len(x), r.samples)
        steps = r.epochs * (n // r.batch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
        taken = 0

        def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            sub = torch.from_numpy(rng.permutation(len(x))[:n])
            xa = augment(x[sub], rng)
            for i in range(0, n - r.batch + 1, r.batch):
                yield torch.from_numpy(normalize(xa[i : i + r.batch])), y[sub[i : i + r.batch]]

        def step(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            nonlocal taken
            if taken == steps // 2:  # freeze the quantization grid for the second half
                prepared.apply(disable_observer)
            if r.freeze_bn < 1.0 and taken == int(steps * r.freeze_bn):
                freeze_bn_stats(prepared)
            taken += 1
            loss = F.cross_entropy(prepared(b[0]), b[1], label_smoothing=0.1)
            loss.backward()
            return loss

        train_loop(
            prepared,
            opt,
            step,
            batches,
            epochs=r.epochs,
            scheduler=sched,
            train_mode=False,  # a pt2e graph: prepare_qat left it in train mode
            progress_kind=None,
        )

    t0 = time.process_time()
    qat = quantize_qat(ref.eval(), example, qat_loop)
    qat_s = time.process_time() - t0
    pt2 = save_quantized(qat.model, example, d / f"{prefix}int8_qat.pt2")
    qat_path = export_int8(pt2, example, d / f"{prefix}int8_qat.onnx")
    reloaded = load_quantized(pt2).module()  # the model the export stage would see
    out["int8_qat"] = {
        **file_entry(qat_path, xt, yt),
        "torch_acc": torch_acc(qat.model, xt, yt),
        "quant_scheme": qat.scheme,
        "train_cpu_seconds": qat_s,
        "recipe": replace(qat_recipe, samples=min(qat_recipe.samples, len(x))).describe(),
        "parity": parity_all(reloaded, qat_path, xt),
    }
    print(f"{prefix}int8_qat: {out['int8_qat']['test_acc']:.4f} ({qat_s:.0f} CPU s)", flush=True)

    t0 = time.process_time()
    p = ptq(ref.eval(), example, calib)
    ptq_path = export_int8(p.model, example, d / f"{prefix}int8_ptq.onnx")
    out["int8_ptq"] = {
        **file_entry(ptq_path, xt, yt),
        "torch_acc": torch_acc(p.model, xt, yt),
        "quant_scheme": p.scheme,
        "calibration_images": len(calib),
        "cpu_seconds": time.process_time() - t0,
        "parity": parity_all(p.model, ptq_path, xt),
    }
    t0 = time.process_time()
    ort_path = ort_static_ptq(fp32_path, d / f"{prefix}ort_ptq.onnx", calib)
    out["ort_ptq"] = {
        **file_entry(ort_path, xt, yt),
        "method": "onnxruntime.quantization.quantize_static(QDQ, per_channel=True, S8S8), "
        f"{len(calib)} calibration images after quant_pre_process",
        "cpu_seconds": time.process_time() - t0,
    }
    t0 = time.process_time()
    nncf_path = nncf_ptq(fp32_path, d / f"{prefix}nncf_ptq.xml", calib)
    out["nncf_ptq"] = {
        **file_entry(nncf_path, xt, yt),
        "method": "nncf.quantize(openvino model from the FP32 ONNX, subset_size=300), "
        "defaults (performance preset)",
        "cpu_seconds": time.process_time() - t0,
    }
    if per_tensor_baseline:
        t0 = time.process_time()
        pt_path = ort_static_ptq(
            fp32_path, d / f"{prefix}ort_ptq_per_tensor.onnx", calib, per_channel=False
        )
        out["ort_ptq_per_tensor"] = {
            **file_entry(pt_path, xt, yt),
            "method": "onnxruntime.quantization.quantize_static(QDQ, per_channel=False, S8S8), "
            f"{len(calib)} calibration images after quant_pre_process",
            "cpu_seconds": time.process_time() - t0,
        }
    for k in ("int8_ptq", "ort_ptq", "nncf_ptq", "ort_ptq_per_tensor"):
        if k in out:
            print(f"{prefix}{k}: {out[k]['test_acc']:.4f}", flush=True)
    return out


def phase_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    work = Work(args.work)
    wall0 = time.time()
    work.state.setdefault("settings", {}).update(
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    )
    xu, y, xtu, ytt = load_cifar_u8(args.data, args.cache_dir)
    if args.max_per_class:
        keep = np.concatenate(
            [np.flatnonzero(y.numpy() == c)[: args.max_per_class] for c in range(10)]
        )
        xu, y = xu[keep], y[keep]
    if args.max_test:  # the test split is sorted by class: take a random subset
        keep_t = torch.from_numpy(np.random.default_rng(0).permutation(len(xtu))[: args.max_test])
        xtu, ytt = xtu[keep_t], ytt[keep_t]
    xt, yt = normalize(xtu), ytt.numpy()
    calib = normalize(xu[np.random.default_rng(0).permutation(len(xu))[:512]])
    print(f"data: {len(xu)} train, {len(xt)} test", flush=True)
    if "main" in args.sections:
        train_main(args, work, xu, y, xt, yt, calib)
    # 5. secondary: MobileNet-style depthwise-separable network from the macro space
    if "mobilenet" in args.sections and args.mobilenet_epochs > 0:
        train_mobilenet(args, work, xu, y, xt, yt, calib)
    work.state["train_wall_seconds"] = work.state.get("train_wall_seconds", 0.0) + (
        time.time() - wall0
    )
    work.save()


def train_main(
    args: argparse.Namespace,
    work: Work,
    xu: torch.Tensor,
    y: torch.Tensor,
    xt: np.ndarray,
    yt: np.ndarray,
    calib: np.ndarray,
) -> None:
    """Reference, students with/without KD, pruned and INT8 variants (resumable steps)."""
    example = torch.from_numpy(xt[:8])
    d = work.root
    widths = tuple(args.widths)
    s_widths = tuple(max(4, w // 2) for w in widths)

    def ref_net() -> CifarConvNet:
        return CifarConvNet(widths, args.stem)

    # 1. reference
    ref = ref_net()
    if not work.done("fp32"):
        torch.manual_seed(0)
        ref = ref_net()
        secs = train(ref, xu, y, args.epochs, lr=args.lr, batch=args.batch, log="fp32")
        save_model(ref, d / "fp32", {"arch": "CifarConvNet", "widths": widths})
        path = export_fp32(ref, example, d / "fp32.onnx")
        macs, params = count_macs_params(ref, example)
        work.finish(
            "fp32",
            variants={
                "fp32": {
                    **file_entry(path, xt, yt),
                    "torch_acc": torch_acc(ref, xt, yt),
                    "train_cpu_seconds": secs,
                    "epochs": args.epochs,
                    "macs": macs,
                    "params": params,
                    "parity": parity_all(ref, path, xt),
                }
            },
            reference={
                "arch": f"CifarConvNet(widths={list(widths)}, stem={args.stem})",
                "macs": macs,
                "params": params,
                "recipe": f"{args.epochs} epochs, batch {args.batch}, SGD Nesterov lr {args.lr} "
                "one-cycle "
                "(20% linear warm-up, linear decay), wd 5e-4, label smoothing 0.2, "
                "flip + 2-px translate, channels_last, fp32",
            },
        )
    state, _, _ = load_model_files(d / "fp32")
    ref.load_state_dict(state)
    ref.eval()
    print(f"fp32: {work.state['variants']['fp32']['test_acc']:.4f}", flush=True)

    # 2. students with and without KD over seeds, on the same pre-augmented views
    if not work.done("students"):
        rng = np.random.default_rng(1234)
        sub = torch.from_numpy(rng.permutation(len(xu))[: args.student_samples])
        xs, ys = xu[sub], y[sub]
        views = [augment(xs, rng) for _ in range(args.student_epochs)]
        ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last).eval()
        with torch.no_grad():
            t_logits = [
                torch.cat([ref_cl(_norm_cl(v[i : i + 1000])) for i in range(0, len(v), 1000)])
                for v in views
            ]
        entries: dict[str, Any] = {}
        for name, tl in (("student", None), ("kd", t_logits)):
            accs, exp_accs, secs, parities = [], [], 0.0, []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                st = CifarConvNet(s_widths, max(4, args.stem // 2))
                secs += train(
                    st,
                    xs,
                    ys,
                    args.student_epochs,
                    lr=args.lr,
                    batch=args.batch,
                    seed=seed,
                    views=views,
                    teacher_logits=tl,
                    log=f"{name} seed {seed}",
                )
                path = export_fp32(st, example, d / f"{name}_seed{seed}.onnx")
                accs.append(torch_acc(st, xt, yt))
                exp_accs.append(exported_acc(path, "onnxruntime", xt, yt))
                parities.append(parity_all(st, path, xt))
                if seed == 0:
                    entry = file_entry(path, xt, yt)
                    macs, params = count_macs_params(st, example)
            entries[name] = {
                **entry,
                "file": f"{name}_seed0.onnx",
                "test_acc": statistics.mean(exp_accs),
                "test_acc_std": statistics.stdev(exp_accs) if len(exp_accs) > 1 else 0.0,
                "test_acc_seeds": exp_accs,
                "torch_acc_seeds": accs,
                "seeds": args.seeds,
                "epochs": args.student_epochs,
                "train_images": len(xs),
                "train_cpu_seconds": secs,
                "macs": macs,
                "params": params,
                "arch": f"CifarConvNet(widths={list(s_widths)}, stem={max(4, args.stem // 2)})",
                "parity": {
                    rt: {
                        "top1_agreement": min(p[rt]["top1_agreement"] for p in parities),
                        "passed": all(p[rt]["passed"] for p in parities),
                        "note": "worst seed",
                    }
                    for rt in RUNTIMES
                },
            }
            if tl is not None:
                entries[name]["kd"] = {"temperature": 4.0, "alpha": 0.7, "teacher": "fp32"}
            print(f"{name}: {exp_accs}", flush=True)
        del views, t_logits
        work.finish("students", variants=entries)

    # 3. structured pruning, gradual with fine-tuning between steps
    if not work.done("pruned"):
        t0 = time.process_time()
        psub = torch.from_numpy(np.random.default_rng(7).permutation(len(xu))[: args.prune_samples])
        xp, yp = xu[psub], y[psub]
        ft_epochs = iter(
            [args.prune_finetune_epochs] * (args.prune_steps - 1) + [args.prune_final_epochs]
        )
        pruned, report = prune_structured(
            copy.deepcopy(ref).to(memory_format=torch.contiguous_format),
            example,
            target_flops_ratio=args.prune_flops,
            steps=args.prune_steps,
            finetune=lambda m: train(
                m, xp, yp, next(ft_epochs), lr=args.prune_lr, batch=args.batch, log="prune ft"
            ),
            round_to=8,
        )
        pruned.eval()
        path = export_fp32(pruned, example, d / "pruned.onnx")
        save_model(pruned, d / "pruned", {"prune": report})
        work.finish(
            "pruned",
            variants={
                "pruned": {
                    **file_entry(path, xt, yt),
                    "torch_acc": torch_acc(pruned, xt, yt),
                    "prune": report,
                    "finetune_epochs": [args.prune_finetune_epochs] * (args.prune_steps - 1)
                    + [args.prune_final_epochs],
                    "finetune_images": len(xp),
                    "train_cpu_seconds": time.process_time() - t0,
                    "parity": parity_all(pruned, path, xt),
                }
            },
        )
        print(
            f"pruned: {work.state['variants']['pruned']['test_acc']:.4f} "
            f"flops ratio {report['flops_ratio']:.3f}",
            flush=True,
        )

    # 4. INT8, all from the same FP32 reference
    if not work.done("int8"):
        recipe = QatRecipe(args.qat_epochs, args.qat_samples, args.qat_batch, args.qat_lr)
        out = int8_suite(work, "", ref, d / "fp32.onnx", xu, y, xt, yt, calib, recipe)
        work.finish("int8", variants=out)


def train_mobilenet(
    args: argparse.Namespace,
    work: Work,
    xu: torch.Tensor,
    y: torch.Tensor,
    xt: np.ndarray,
    yt: np.ndarray,
    calib: np.ndarray,
) -> None:
    """Secondary section: FP32 and the four INT8 variants of a macro-space MobileNet-style net.

    Two resumable steps: ``mobilenet_fp32`` trains and checkpoints the float model
    (``mb_fp32.pt``), ``mobilenet_int8`` quantizes that checkpoint, so a different INT8 recipe
    can be re-run on the same trained model.
    """
    example = torch.from_numpy(xt[:8])
    d = work.root
    msub = torch.from_numpy(
        np.random.default_rng(11).permutation(len(xu))[: args.mobilenet_samples]
    )
    xm, ym = xu[msub], y[msub]
    ckpt = d / "mb_fp32.pt"
    if not work.done("mobilenet_fp32") or not ckpt.is_file():
        t0 = time.process_time()
        torch.manual_seed(0)
        mb = as_module(macro_net(args.mobilenet_spec))
        secs = train(mb, xm, ym, args.mobilenet_epochs, lr=args.mobilenet_lr, log="mobilenet")
        mb = mb.to(memory_format=torch.contiguous_format).eval()
        tmp = ckpt.with_suffix(".pt.tmp")
        torch.save(mb.state_dict(), tmp)
        os.replace(tmp, ckpt)
        path = export_fp32(mb, example, d / "mb_fp32.onnx")
        macs, params = count_macs_params(mb, example)
        fp32 = {
            **file_entry(path, xt, yt),
            "torch_acc": torch_acc(mb, xt, yt),
            "train_cpu_seconds": secs,
            "epochs": args.mobilenet_epochs,
            "train_images": len(xm),
            "parity": parity_all(mb, path, xt),
        }
        print(f"mb_fp32: {fp32['test_acc']:.4f}", flush=True)
        work.state.pop("mobilenet", None)  # a new float model invalidates the old INT8 ones
        work.state["done"] = [s for s in work.state.get("done", []) if s != "mobilenet_int8"]
        work.finish(
            "mobilenet_fp32",
            mobilenet={
                "spec": json.loads(args.mobilenet_spec),
                "macs": macs,
                "params": params,
                "variants": {"fp32": fp32},
                "cpu_seconds": time.process_time() - t0,
            },
        )
    if work.done("mobilenet_int8"):
        return
    t0 = time.process_time()
    mb = as_module(macro_net(args.mobilenet_spec))
    mb.load_state_dict(torch.load(ckpt, weights_only=True))
    mb.eval()
    recipe = QatRecipe(
        epochs=args.mobilenet_qat_epochs,
        samples=args.mobilenet_qat_samples,
        batch=args.qat_batch,
        lr=args.mobilenet_qat_lr,
        freeze_bn=args.mobilenet_qat_freeze_bn,
    )
    section = work.state["mobilenet"]
    int8 = int8_suite(
        work, "mb_", mb, d / "mb_fp32.onnx", xm, ym, xt, yt, calib, recipe, per_tensor_baseline=True
    )
    work.finish(
        "mobilenet_int8",
        mobilenet={
            "variants": section["variants"] | int8,
            "cpu_seconds": section.get("cpu_seconds", 0.0) + time.process_time() - t0,
        },
    )


# --- the measure phase --------------------------------------------------------------------------


def phase_measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time every exported file in both runtimes at batch 1 and 32, round-robin over rounds."""
    from nasforge.bench.harness import open_session, time_session
    from nasforge.bench.sysinfo import system_info

    work = Work(args.work)
    st = work.state
    if not st.get("done"):
        raise SystemExit(f"{work.json}: run --phase train first")
    wall0 = time.time()
    all_groups = {"": st.get("variants", {}), "mb_": st.get("mobilenet", {}).get("variants", {})}
    wanted = {"": "main", "mb_": "mobilenet"}
    groups = {p: g for p, g in all_groups.items() if wanted[p] in args.sections}
    sessions: dict[tuple[str, str, str, int], Any] = {}
    for prefix, variants in groups.items():
        for name, v in variants.items():
            path = work.root / v["file"]
            runtimes = ["openvino"] if path.suffix == ".xml" else list(RUNTIMES)
            for rt in runtimes:
                for b in (1, 32):
                    sessions[(prefix, name, rt, b)] = open_session(
                        path, RUNTIMES[rt], batch_size=b, threads=args.threads
                    )
    rounds: dict[tuple[str, str, str, int], list[list[float]]] = {k: [] for k in sessions}
    for r in range(args.rounds):
        for key, sess in sessions.items():
            reps = args.repeats if key[3] == 1 else max(10, args.repeats // 4)
            rounds[key].append(time_session(sess, warmup=5, repeats=reps).tolist())
        print(f"round {r + 1}/{args.rounds} done ({time.time() - wall0:.0f} s)", flush=True)
    for (prefix, name, rt, b), times in rounds.items():
        v = groups[prefix][name]
        all_t = np.concatenate(times)
        p50s = [float(np.median(t)) for t in times]
        v.setdefault("latency", {}).setdefault(rt, {})[str(b)] = {
            "p50_ms": float(np.median(all_t)),
            "p90_ms": float(np.percentile(all_t, 90)),
            "round_p50_ms": p50s,
            "spread": (max(p50s) - min(p50s)) / float(np.median(p50s)),
            "executed_precision": sessions[(prefix, name, rt, b)].executed_precision,
            "runs": int(len(all_t)),
        }
    # latencies persist in train.json so a later measure of another section keeps them
    st["measure_wall_seconds"] = st.get("measure_wall_seconds", 0.0) + time.time() - wall0
    work.save()
    results = {
        "benchmark": "compression_cifar10",
        "dataset": "CIFAR-10 (JPEG), 50,000 train / 10,000 test",
        "budget": {
            "stated_minutes": BUDGET_MINUTES,
            "statement": f"whole run (train phase at nice 10 + measure phase) <= {BUDGET_MINUTES} "
            "min wall on this 2-core machine (shared with other jobs)",
            "train_wall_seconds": st.get("train_wall_seconds"),
            "measure_wall_seconds": st["measure_wall_seconds"],
            "train_cpu_seconds": sum(
                float(v.get("train_cpu_seconds", 0.0)) for v in st["variants"].values()
            )
            + float(st.get("mobilenet", {}).get("cpu_seconds", 0.0)),
        },
        "reference": st.get("reference"),
        "variants": st["variants"],
        "settings": st.get("settings"),
        "precision": {
            "fp32": "fp32 (OpenVINO INFERENCE_PRECISION_HINT=f32)",
            "int8": "QDQ INT8 (conv/matmul in int8, the rest fp32)",
        },
        "timing": {
            "threads": args.threads,
            "rounds": args.rounds,
            "repeats_batch1": args.repeats,
            "repeats_batch32": max(10, args.repeats // 4),
            "how": "all sessions open at once and timed round-robin (side by side); p50 over all "
            "rounds; under flock /tmp/nasforge-bench.lock at nice 5",
            "openvino": "PERFORMANCE_HINT=LATENCY, NUM_STREAMS=1, static shape per batch",
        },
        "system": system_info(args.threads),
    }
    if "mobilenet" in st:
        results["mobilenet"] = st["mobilenet"]
    results["acceptance"] = acceptance(results)
    results["notes"] = list(args.note)
    write(results, args.out)
    return results


def _p50(v: dict[str, Any], rt: str, b: int) -> float | None:
    try:
        return float(v["latency"][rt][str(b)]["p50_ms"])
    except KeyError:
        return None


def _speedup(base: dict[str, Any], v: dict[str, Any], rt: str, b: int) -> float | None:
    a, c = _p50(base, rt, b), _p50(v, rt, b)
    return a / c if a and c else None


def _noise(v: dict[str, Any], rt: str, b: int) -> float:
    try:
        return float(v["latency"][rt][str(b)]["spread"])
    except KeyError:
        return 0.0


def acceptance(res: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the issue's acceptance lines on the measured figures."""
    v = res["variants"]
    fp, qat = v["fp32"], v["int8_qat"]
    out: dict[str, Any] = {}
    speed = {f"{rt}_b{b}": _speedup(fp, qat, rt, b) for rt in RUNTIMES for b in (1, 32)}
    drop = (fp["test_acc"] - qat["test_acc"]) * 100
    size_ratio = fp["size_bytes"] / qat["size_bytes"]
    out["int8_qat_vs_fp32"] = {
        "acc_drop_points": drop,
        "speedup": speed,
        "size_ratio": size_ratio,
        "passed": {
            "acc_drop_le_0.5": drop <= 0.5,
            "speedup_b32_ge_2": all((speed[f"{rt}_b32"] or 0) >= 2.0 for rt in RUNTIMES),
            "speedup_b1_ge_1.5": all((speed[f"{rt}_b1"] or 0) >= 1.5 for rt in RUNTIMES),
            "size_ratio_ge_3.5": size_ratio >= 3.5,
        },
    }
    out["int8_vs_baselines"] = _vs_baselines(v)
    if "mobilenet" in res:
        out["mobilenet_int8_vs_baselines"] = _vs_baselines(res["mobilenet"]["variants"])
        mv = res["mobilenet"]["variants"]
        out["mobilenet_qat_recovery_points"] = {
            k: (mv["int8_qat"]["test_acc"] - mv[k]["test_acc"]) * 100
            for k in ("int8_ptq", "ort_ptq", "nncf_ptq", "ort_ptq_per_tensor")
            if k in mv
        }
    pr = v["pruned"]
    pdrop = (fp["test_acc"] - pr["test_acc"]) * 100
    psp = _speedup(fp, pr, "onnxruntime", 32)
    out["pruning"] = {
        "flops_ratio": pr["prune"]["flops_ratio"],
        "acc_drop_points": pdrop,
        "speedup_onnxruntime_b32": psp,
        "speedup_openvino_b32": _speedup(fp, pr, "openvino", 32),
        "passed": {
            "half_flops": pr["prune"]["flops_ratio"] <= 0.5 + 0.02,
            "acc_drop_le_1": pdrop <= 1.0,
            "ort_b32_speedup_ge_1.6": (psp or 0) >= 1.6,
        },
    }
    s, k = v["student"], v["kd"]
    out["distillation"] = {
        "student_mean": s["test_acc"],
        "student_std": s["test_acc_std"],
        "kd_mean": k["test_acc"],
        "kd_std": k["test_acc_std"],
        "gain_points": (k["test_acc"] - s["test_acc"]) * 100,
        "passed": k["test_acc"] > s["test_acc"],
    }
    parity = {}
    for name, var in v.items():
        for rt, p in var.get("parity", {}).items():
            parity[f"{name}/{rt}"] = p["top1_agreement"]
    for name, var in res.get("mobilenet", {}).get("variants", {}).items():
        for rt, p in var.get("parity", {}).items():
            parity[f"mobilenet/{name}/{rt}"] = p["top1_agreement"]
    out["export_parity"] = {
        "top1_agreement": parity,
        "passed": all(a >= 0.99 for a in parity.values()),
    }
    out["reference_ge_85"] = fp["test_acc"] >= 0.85
    return out


def _vs_baselines(v: dict[str, Any]) -> dict[str, Any]:
    qat = v["int8_qat"]
    best = max(v["ort_ptq"]["test_acc"], v["nncf_ptq"]["test_acc"])
    checks: dict[str, Any] = {}
    for rt, base in (("onnxruntime", "ort_ptq"), ("openvino", "nncf_ptq")):
        for b in (1, 32):
            q, o = _p50(qat, rt, b), _p50(v[base], rt, b)
            tol = max(0.05, _noise(qat, rt, b), _noise(v[base], rt, b))
            checks[f"{rt}_b{b}_vs_{base}"] = {
                "int8_qat_ms": q,
                "baseline_ms": o,
                "tolerance": tol,
                "passed": bool(q is not None and o is not None and q <= o * (1 + tol)),
                "passed_strict": bool(q is not None and o is not None and q <= o),
            }
    return {
        "int8_qat_acc": qat["test_acc"],
        "int8_ptq_acc": v["int8_ptq"]["test_acc"],
        "ort_ptq_acc": v["ort_ptq"]["test_acc"],
        "nncf_ptq_acc": v["nncf_ptq"]["test_acc"],
        "fp32_acc": v["fp32"]["test_acc"],
        "acc_passed": qat["test_acc"] >= best,
        "speed": checks,
        "speed_passed": all(c["passed"] for c in checks.values()),
        "speed_passed_strict": all(c["passed_strict"] for c in checks.values()),
    }


# --- output -------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _table(variants: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | test acc | size (bytes) | ORT b1 p50 ms | ORT b32 p50 ms | OV b1 p50 ms "
        "| OV b32 p50 ms | parity ORT / OV |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in variants.items():
        acc = f"{v['test_acc']:.4f}"
        if "test_acc_std" in v:
            acc += f" ± {v['test_acc_std']:.4f} ({v['seeds']} seeds)"
        par = " / ".join(
            f"{v['parity'][rt]['top1_agreement']:.4f}" if rt in v.get("parity", {}) else "-"
            for rt in RUNTIMES
        )
        lines.append(
            f"| {name} | {acc} | {v['size_bytes']} | {_fmt(_p50(v, 'onnxruntime', 1))} | "
            f"{_fmt(_p50(v, 'onnxruntime', 32))} | {_fmt(_p50(v, 'openvino', 1))} | "
            f"{_fmt(_p50(v, 'openvino', 32))} | {par} |"
        )
    return lines


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "compression_cifar10.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, json_path)
    s, acc, b = results["system"], results["acceptance"], results["budget"]
    q = acc["int8_qat_vs_fp32"]
    lines = [
        "# Compression on CIFAR-10 (JPEG)",
        "",
        f"CPU: {s.get('cpu_model')}; ISA: {' '.join(s.get('isa_flags', []))}; "
        f"threads {s.get('threads')}; VNNI {s.get('has_vnni')}; AMX {s.get('has_amx')}; "
        f"ONNX Runtime {s['versions'].get('onnxruntime')}, OpenVINO {s['versions'].get('openvino')}, "
        f"torch {s['versions'].get('torch')}; load avg at measure {s.get('load_avg_1m')}.",
        "",
        f"Budget: {b['statement']}. Measured: train phase {_fmt((b['train_wall_seconds'] or 0) / 60, '.1f')} "
        f"min wall ({_fmt(b['train_cpu_seconds'] / 60, '.1f')} CPU min in training loops), "
        f"measure phase {_fmt(b['measure_wall_seconds'] / 60, '.1f')} min.",
        "",
        f"Reference: {results['reference']['arch']}, {results['reference']['macs'] / 1e6:.1f} M MACs, "
        f"{results['reference']['params']} params; {results['reference']['recipe']}.",
        "",
        "Latency: p50 over all timed runs; FP32 in OpenVINO pinned to f32; INT8 = QDQ. "
        "Test accuracy is that of the exported file (ONNX Runtime; OpenVINO for nncf_ptq); "
        "student/kd: mean ± std over seeds. Parity: top-1 agreement of the exported file with "
        "its torch model (INT8: the converted fake-quant torch model).",
        f"INT8 QAT: {results['variants']['int8_qat'].get('recipe', '-')}.",
        "",
        *_table(results["variants"]),
        "",
        "## Acceptance",
        "",
        f"* INT8 QAT vs FP32: accuracy drop {q['acc_drop_points']:.2f} points; speedup "
        + ", ".join(f"{k} {_fmt(x)}x" for k, x in q["speedup"].items())
        + f"; file {q['size_ratio']:.2f}x smaller. Passed: {q['passed']}",
    ]
    for key, title in (
        ("int8_vs_baselines", "reference network"),
        ("mobilenet_int8_vs_baselines", "MobileNet-style network"),
    ):
        if key not in acc:
            continue
        c = acc[key]
        lines.append(
            f"* INT8 vs PTQ baselines ({title}): QAT {c['int8_qat_acc']:.4f}, nasforge PTQ "
            f"{c['int8_ptq_acc']:.4f}, ORT PTQ {c['ort_ptq_acc']:.4f}, NNCF PTQ "
            f"{c['nncf_ptq_acc']:.4f} (FP32 {c['fp32_acc']:.4f}); as accurate as the better "
            f"baseline: {c['acc_passed']}; as fast in each runtime: within round-to-round noise "
            f"{c['speed_passed']}, strictly {c['speed_passed_strict']} ("
            + ", ".join(
                f"{k} {_fmt(x['int8_qat_ms'])} vs {_fmt(x['baseline_ms'])} ms"
                for k, x in c["speed"].items()
            )
            + ")"
        )
    if "mobilenet_qat_recovery_points" in acc:
        lines.append(
            "* MobileNet-style: QAT minus each PTQ, points: "
            + ", ".join(f"{k} {x:+.2f}" for k, x in acc["mobilenet_qat_recovery_points"].items())
        )
    p = acc["pruning"]
    lines.append(
        f"* Pruning: MACs ratio {p['flops_ratio']:.3f}, accuracy drop {p['acc_drop_points']:.2f} "
        f"points, ORT b32 speedup {_fmt(p['speedup_onnxruntime_b32'])}x (OV "
        f"{_fmt(p['speedup_openvino_b32'])}x). Passed: {p['passed']}"
    )
    dd = acc["distillation"]
    lines.append(
        f"* Distillation: KD {dd['kd_mean']:.4f} ± {dd['kd_std']:.4f} vs no KD "
        f"{dd['student_mean']:.4f} ± {dd['student_std']:.4f} ({dd['gain_points']:+.2f} points). "
        f"Passed: {dd['passed']}"
    )
    ep = acc["export_parity"]
    lines.append(
        f"* Export parity (top-1 agreement >= 0.99): min "
        f"{min(ep['top1_agreement'].values()):.4f}. Passed: {ep['passed']}"
    )
    lines.append(f"* Reference >= 85%: {acc['reference_ge_85']}")
    if "mobilenet" in results:
        m = results["mobilenet"]
        lines += [
            "",
            "## MobileNet-style network (macro space), INT8 side by side",
            "",
            f"Spec {json.dumps(m['spec'])}, {m['macs'] / 1e6:.1f} M MACs, {m['params']} params, "
            f"{m['variants']['fp32']['epochs']} epochs. INT8 QAT: "
            f"{m['variants']['int8_qat'].get('recipe', '-')}.",
            "",
            *_table(m["variants"]),
        ]
    if results.get("notes"):
        lines += ["", "## Notes", "", *(f"* {n}" for n in results["notes"])]
    (out / "compression_cifar10.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path}")


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=("train", "measure", "all"), default="all")
    ap.add_argument(
        "--sections",
        nargs="+",
        choices=("main", "mobilenet"),
        default=["main", "mobilenet"],
        help="what to train / time (mobilenet is the secondary MobileNet-style section)",
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--widths", type=int, nargs=3, default=[48, 96, 192])
    ap.add_argument("--stem", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=14, help="reference training epochs")
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=256, help="reference and student batch size")
    ap.add_argument("--student-epochs", type=int, default=3)
    ap.add_argument("--student-samples", type=int, default=50000, help="train images")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prune-flops", type=float, default=0.5)
    ap.add_argument("--prune-steps", type=int, default=2)
    ap.add_argument("--prune-finetune-epochs", type=int, default=1, help="after each step")
    ap.add_argument("--prune-final-epochs", type=int, default=8, help="after the last step")
    ap.add_argument("--prune-lr", type=float, default=0.1)
    ap.add_argument("--prune-samples", type=int, default=50000, help="fine-tuning images")
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--qat-samples", type=int, default=10000)
    ap.add_argument("--qat-batch", type=int, default=128)
    ap.add_argument("--qat-lr", type=float, default=0.005)
    ap.add_argument("--mobilenet-epochs", type=int, default=10, help="0 skips the section")
    ap.add_argument(
        "--mobilenet-spec",
        default='{"depths": [1, 2, 2, 1], "widths": [1.0, 1.0, 1.0, 1.0], '
        '"kernels": [3, 3, 3, 3], "expands": [4, 4, 4, 4]}',
    )
    ap.add_argument("--mobilenet-lr", type=float, default=0.2)
    ap.add_argument("--mobilenet-samples", type=int, default=50000, help="train images")
    ap.add_argument("--mobilenet-qat-epochs", type=int, default=2)
    ap.add_argument("--mobilenet-qat-samples", type=int, default=50000)
    ap.add_argument("--mobilenet-qat-lr", type=float, default=0.002)
    ap.add_argument(
        "--mobilenet-qat-freeze-bn",
        type=float,
        default=0.5,
        help="share of the QAT steps after which BN statistics stop updating (1 = never)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=400, help="per round at batch 1 (/4 at 32)")
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--note", action="append", default=[], help="free text for the results")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = args.student_epochs = args.mobilenet_epochs = 1
        args.seeds, args.prune_steps, args.prune_finetune_epochs = 2, 2, 1
        args.prune_final_epochs, args.qat_samples = 1, 512
        args.mobilenet_qat_epochs = 1
        args.student_samples = args.prune_samples = args.mobilenet_samples = 1000
        args.max_per_class, args.max_test, args.repeats, args.rounds = 100, 500, 5, 1
    if args.phase in ("train", "all"):
        phase_train(args)
    if args.phase in ("measure", "all"):
        phase_measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
