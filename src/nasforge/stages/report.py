"""report: one HTML page and ``summary.json`` for the whole run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nasforge.config import Params
from nasforge.report.html import pareto_plot_png, render
from nasforge.stages import StageResult
from nasforge.stages.promote import PROMOTION_JSON, load_benchmarks
from nasforge.stages.search import load_pareto
from nasforge.tracking.registry import alias_for


def _champion_version(uri: str, model_name: str, target: str) -> str | None:
    from nasforge.tracking.mlflow_runs import client

    try:
        return client(uri).get_model_version_by_alias(model_name, alias_for(target)).version
    except Exception:  # noqa: BLE001 - no alias yet
        return None


def build_summary(
    params: Params, run_id: str, promotion: dict[str, Any], search_dir: Path
) -> dict[str, Any]:
    """Per target: model name/version, accuracy, latency p50 (batch 1), size, promoted or not, why,
    and the results promotion rejected (``rejected``: candidate, precision, gate, reason)."""
    targets: dict[str, Any] = {}
    for d in promotion["decisions"]:
        ch = d.get("challenger") or {}
        targets[d["target"]] = {
            "model_name": d["model_name"],
            "version": d["version"],
            "alias": d["alias"],
            "candidate": ch.get("candidate"),
            "arch_str": ch.get("arch_str"),
            "precision": ch.get("precision"),
            "accuracy": ch.get("accuracy"),
            "latency_p50_ms": ch.get("latency_p50_ms"),
            "size_bytes": ch.get("size_bytes"),
            "promoted": d["promoted"],
            "reason": d["reason"],
            "rejected": d.get("rejected", []),
            "champion_version": _champion_version(
                params.tracking.uri, d["model_name"], d["target"]
            ),
        }
    return {
        "run_id": run_id,
        "dataset": params.data.source,
        "strategy": params.search.strategy,
        "targets": targets,
        "links": {"mlflow_tracking_uri": params.tracking.uri, "search": str(search_dir)},
    }


def run(
    params: Params,
    search: Path,
    promotion: Path,
    benchmarks: list[Path],
    output: Path,
    run_id: str | None,
    parent_run_id: str | None = None,
) -> StageResult:
    """Write ``report.html`` and ``summary.json`` to ``output``.

    The summary's ``run_id`` is the pipeline's parent MLflow run (the report's own run when the
    stage runs alone), which also names ``runs/<run-id>/``.
    """
    run_id = parent_run_id or run_id or "untracked"
    pareto = load_pareto(search)
    history = json.loads((Path(search) / "history.json").read_text())
    pareto = {**pareto, "trials": history["trials"]}
    prom = json.loads((Path(promotion) / PROMOTION_JSON).read_text())
    summary = build_summary(params, run_id, prom, Path(search))
    rows = []
    for _, doc in load_benchmarks(benchmarks):
        for precision, r in doc["results"].items():
            lat = r["latency"]
            parity = (r.get("parity") or {}).get("top1_agreement")
            if parity is None:
                parity_text = "missing"
            else:
                below = parity < params.export.parity_min_top1
                parity_text = f"{parity:.4f}" + (" (below gate)" if below else "")
            rows.append(
                {
                    "candidate": doc["candidate"],
                    "target": doc["target"]["name"],
                    "precision": precision,
                    "test accuracy": f"{r['test_accuracy']:.4f}",
                    "size (bytes)": r["size_bytes"],
                    **{f"p50 b{bs} (ms)": f"{v['p50_ms']:.3f}" for bs, v in lat.items()},
                    "parity top-1": parity_text,
                    "energy": r.get("energy", {}).get("source", ""),
                }
            )
    output.mkdir(parents=True, exist_ok=True)
    png = pareto_plot_png(pareto)
    (output / "pareto.png").write_bytes(png)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "report.html").write_text(render(summary, pareto, rows, png))
    return StageResult(
        metrics={"promoted": sum(1 for t in summary["targets"].values() if t["promoted"])},
        artifacts=[output / "report.html", output / "summary.json", output / "pareto.png"],
    )
