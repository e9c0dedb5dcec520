"""DARTS on the NAS-Bench-201 cell: with and without the anti-collapse measures (issue 3).

First-order DARTS on scikit-learn's digits (epoch-bound, so the result does not depend on the
machine's speed) and on a time-boxed CIFAR-10 JPEG subset, over several seeds. Three selections:

* ``vanilla``: DARTS as published — no warm-up, no auxiliary skip, plain argmax of alpha;
* ``argmax``: nasforge's anti-collapse training (warm-up, DARTS- auxiliary skip), argmax of alpha
  without ``none``;
* ``perturbation``: the same trained supernet, cell selected by perturbation (DARTS-PT).

For each, the derived cell's ``arch_str``, its ``cifar10_valid_acc`` looked up in the
NAS-Bench-201 table (the collapse reference: vanilla DARTS reaches 54.30% there), the share of
parameter-free ops and the wall time go to ``benchmarks/results/darts_cell.{json,md}``.

Usage::

    nice -n 5 python benchmarks/bench_darts.py [--seeds 3] [--cifar-per-class 50] [--budget-s 110]
"""

from __future__ import annotations

import os

# The machine is shared; nested thread pools only add contention. Set before torch is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nasforge.data.sources import load_source  # noqa: E402
from nasforge.space.cell import CellNetworkShape  # noqa: E402
from nasforge.supernet.darts import param_free_share, run_darts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NASFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _normalise(x: np.ndarray) -> torch.Tensor:
    xf = x.astype(np.float32)
    mean = xf.mean(axis=(0, 2, 3), keepdims=True)
    std = xf.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return torch.from_numpy((xf - mean) / std)


def _table(path: Path) -> dict[str, float]:
    with path.open(newline="") as f:
        return {row["arch_str"]: float(row["cifar10_valid_acc"]) for row in csv.DictReader(f)}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    Path(f.name).replace(path)


def main() -> None:
    """Run the settings and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar-per-class", type=int, default=50)
    ap.add_argument("--cifar-size", type=int, default=16, help="resize CIFAR images (time box)")
    ap.add_argument("--digits-epochs", type=int, default=10)
    ap.add_argument("--cifar-epochs", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=110.0, help="time box per setting")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()

    table = _table(SHARED / "nb201" / "nb201_dev.csv")
    datasets = {}
    raw = load_source("digits")
    datasets["digits"] = (
        _normalise(raw.x),
        torch.from_numpy(raw.y),
        CellNetworkShape(1, 10, channels=8, cells_per_stage=1, stages=2),
        args.digits_epochs,
        None,  # epoch-bound: the result does not depend on machine speed
    )
    t0 = time.perf_counter()
    raw = load_source(
        str(SHARED / "cifar10" / "cifar10-jpeg.tar"),
        image_size=args.cifar_size,
        max_per_class=args.cifar_per_class,
    )
    cifar_load_s = time.perf_counter() - t0
    datasets["cifar10_subset"] = (
        _normalise(raw.x),
        torch.from_numpy(raw.y),
        CellNetworkShape(3, 10, channels=8, cells_per_stage=1, stages=3),
        args.cifar_epochs,
        args.budget_s,
    )

    results = []
    for name, (x, y, shape, epochs, budget) in datasets.items():
        for seed in range(args.seeds):
            for anti in (True, False):
                t0 = time.perf_counter()
                res = run_darts(
                    x, y, shape, epochs=epochs, order=1, seed=seed, anti_collapse=anti,
                    time_budget_s=budget,
                )  # fmt: skip
                wall = time.perf_counter() - t0
                picks = (
                    [("perturbation", res.spec), ("argmax", res.argmax_spec)]
                    if anti
                    else [("vanilla", res.spec)]
                )
                for selection, spec in picks:
                    arch = spec.arch_str
                    row = {
                        "dataset": name,
                        "images": len(x),
                        "image_size": int(x.shape[-1]),
                        "seed": seed,
                        "selection": selection,
                        "anti_collapse": anti,
                        "order": 1,
                        "epochs_run": len(res.history),
                        "epochs_planned": epochs,
                        "time_box_s": budget,
                        "shape": shape.to_dict(),
                        "arch_str": arch,
                        "cifar10_valid_acc": table.get(arch),
                        "param_free_share": param_free_share(spec),
                        "wall_s": round(wall, 1),
                    }
                    if selection != "argmax":  # the argmax row shares the perturbation run
                        row.update(history=res.history, alpha=res.alpha.tolist())
                    if selection == "perturbation":
                        row["accuracy_drop_per_op"] = res.perturbation
                    results.append(row)
                    print(
                        f"{name} seed {seed} {selection}: {arch} "
                        f"acc={row['cifar10_valid_acc']} free={row['param_free_share']:.2f} "
                        f"{wall:.0f}s",
                        flush=True,
                    )
    summary = {}
    for name in datasets:
        for selection in ("vanilla", "argmax", "perturbation"):
            accs = [
                r["cifar10_valid_acc"]
                for r in results
                if r["dataset"] == name and r["selection"] == selection
            ]
            accs = [a for a in accs if a is not None]
            free = [
                r["param_free_share"]
                for r in results
                if r["dataset"] == name and r["selection"] == selection
            ]
            summary.setdefault(name, {})[selection] = {
                "mean_cifar10_valid_acc": round(float(np.mean(accs)), 2) if accs else None,
                "min_cifar10_valid_acc": round(float(np.min(accs)), 2) if accs else None,
                "mean_param_free_share": round(float(np.mean(free)), 3),
                "seeds": len(free),
            }

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "note": "shared 2-core machine, run with nice -n 5",
    }
    doc = {
        "benchmark": "darts_cell",
        "table": "nb201_dev.csv (cifar10_valid_acc)",
        "reference": "NAS-Bench-201 reports vanilla DARTS collapsing to 54.30% (all skip_connect)",
        "cifar_load_s": round(cifar_load_s, 1),
        "summary": summary,
        "machine": machine,
        "results": results,
    }
    _write_atomic(args.out / "darts_cell.json", json.dumps(doc, indent=2) + "\n")
    lines = [
        "# DARTS (1st order) on the NAS-Bench-201 cell",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {torch.__version__}"
        " (shared, nice -n 5). Digits runs are epoch-bound; CIFAR-10 subset runs are time-boxed.",
        "Collapse reference: NAS-Bench-201 reports vanilla DARTS at 54.30% (all skip_connect).",
        "",
        "| dataset | selection | seeds | mean NB201 cifar10_valid_acc | worst | "
        "mean param-free share |",
        "|---|---|---|---|---|---|",
    ]
    for name, per in summary.items():
        for selection, m in per.items():
            lines.append(
                f"| {name} | {selection} | {m['seeds']} | {m['mean_cifar10_valid_acc']} | "
                f"{m['min_cifar10_valid_acc']} | {m['mean_param_free_share']:.2f} |"
            )
    lines += [
        "",
        "| dataset | seed | selection | epochs | derived arch_str | NB201 cifar10_valid_acc "
        "| param-free share | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acc = "n/a" if r["cifar10_valid_acc"] is None else f"{r['cifar10_valid_acc']:.2f}"
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['selection']} | {r['epochs_run']}/"
            f"{r['epochs_planned']} | `{r['arch_str']}` | {acc} | {r['param_free_share']:.2f} "
            f"| {r['wall_s']} |"
        )
    _write_atomic(args.out / "darts_cell.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
