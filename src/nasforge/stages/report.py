"""report: one HTML page and ``summary.json`` for the whole run.

The page (see :mod:`nasforge.report.html`) shows the per-target decision, per target the accuracy
vs latency plane of the search with that plane's own Pareto front, the hypervolume of the
search's front against the number of trials, the search's objectives, sources and constraints,
the candidates, the benchmark tables (latency p50/p90/p99 per batch size; memory and energy with
their sources), the wall time of each stage from MLflow, and links to the MLflow runs and
registered models. Besides ``report.html`` and ``summary.json`` it writes ``pareto.png`` (all
targets), ``pareto_<target>.png`` per target and ``hypervolume.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nasforge.artifacts.benchmark_report import find_reports
from nasforge.artifacts.promotion import Promotion
from nasforge.artifacts.search_result import SearchHistory, read_pareto
from nasforge.config import Params
from nasforge.report import analysis
from nasforge.report import tracking as tracking_info
from nasforge.report.html import hypervolume_plot_png, pareto_plot_png, render, target_plot_png
from nasforge.stages import NO_CONTEXT, StageContext, StageResult
from nasforge.tracking.registry import alias_for


def _champion_version(uri: str, model_name: str, target: str) -> str | None:
    from nasforge.tracking.mlflow_runs import client

    try:
        with tracking_info._short_http():
            return client(uri).get_model_version_by_alias(model_name, alias_for(target)).version
    except Exception:  # noqa: BLE001 - no alias yet
        return None


def _gate_evidence(ev: dict[str, Any] | None) -> dict[str, Any] | None:
    """The promotion gate's evidence without the per-round samples (those stay in
    promotion.json and on the model version)."""
    if not ev:
        return None
    return {k: v for k, v in ev.items() if k != "round_ms"}


def build_summary(
    params: Params,
    run_id: str,
    promotion: dict[str, Any],
    search_dir: Path,
    *,
    tracking_problem: str | None = None,
) -> dict[str, Any]:
    """Per target: model name/version, accuracy, latency p50 (batch 1), size, promoted or not, why,
    the gate's evidence (``gate``: method, both latencies with intervals, ratio, accuracies,
    hashes; ``registered`` False and ``identical_to`` for an artifact identical to a registered
    version), and the results promotion rejected (``rejected``: candidate, precision, gate,
    reason).

    ``tracking_problem`` (why MLflow cannot be reached) skips the champion look-ups.
    """
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
            "registered": d.get("registered", d["version"] is not None),
            "identical_to": d.get("identical_to"),
            "gate": _gate_evidence(d.get("evidence")),
            "rejected": d.get("rejected", []),
            "champion_version": None
            if tracking_problem
            else _champion_version(params.tracking.uri, d["model_name"], d["target"]),
        }
    return {
        "run_id": run_id,
        "dataset": params.data.source,
        "strategy": params.search.strategy,
        "targets": targets,
        "links": {"mlflow_tracking_uri": params.tracking.uri, "search": str(search_dir)},
    }


def _lat_cell(v: dict[str, Any]) -> str:
    if v.get("source") == "table":
        return f"{v['p50_ms']:.3f} (table)"
    parts = [v.get(k) for k in ("p50_ms", "p90_ms", "p99_ms")]
    return " / ".join("-" if x is None else f"{x:.3f}" for x in parts)


def _mb(b: Any) -> str:
    return "-" if b is None else f"{b / 1e6:.3f}"


def _per_bs(d: dict[str, Any] | None, fmt: Any = _mb) -> str:
    if not d:
        return "-"
    return ", ".join(f"b{bs}: {fmt(v)}" for bs, v in d.items())


def _energy_cell(e: dict[str, Any] | None) -> str:
    if not e:
        return "not recorded"
    mj = e.get("mj", e.get("mj_per_batch"))
    src, method = e.get("source", "?"), e.get("method", "")
    value = "-" if mj is None else f"{mj:.4g} mJ"
    return (
        f"{value} ({src}: {method})"
        if method and not method.startswith(src)
        else (f"{value} ({method or src})")
    )


def benchmark_tables(
    params: Params, docs: list[tuple[Path, dict[str, Any]]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The report's benchmark tables: latency rows and memory/energy rows.

    Works on benchmark.json files with or without ``memory`` / ``energy_per_batch``.
    """
    lat_rows, res_rows = [], []
    sources: dict[str, None] = {}
    for _, doc in docs:
        for precision, r in doc["results"].items():
            lat = r["latency"]
            parity = (r.get("parity") or {}).get("top1_agreement")
            if parity is None:
                parity_text = "missing"
            else:
                below = parity < params.export.parity_min_top1
                parity_text = f"{parity:.4f}" + (" (below gate)" if below else "")
            first = next(iter(lat.values()), {})
            executed = first.get("executed_precision")
            key = {
                "candidate": doc["candidate"],
                "target": doc["target"]["name"],
                "precision": precision + (f" (ran {executed})" if executed else ""),
            }
            lat_rows.append(
                {
                    **key,
                    "test accuracy": f"{r['test_accuracy']:.4f}",
                    "size (bytes)": r["size_bytes"],
                    **{f"b{bs} p50/p90/p99 (ms)": _lat_cell(v) for bs, v in lat.items()},
                    **{
                        f"b{bs} throughput (/s)": f"{v['throughput_ips']:.0f}"
                        for bs, v in lat.items()
                        if "throughput_ips" in v
                    },
                    "parity top-1": parity_text,
                    "energy": (r.get("energy") or {}).get("source", ""),
                }
            )
            mem = r.get("memory") or {}
            src = mem.get("source") or {}
            for k, v in src.items():
                sources[f"{k}: {v}"] = None
            per_batch = r.get("energy_per_batch") or {}
            energy = _energy_cell(r.get("energy"))
            more = [f"b{bs}: {_energy_cell(e)}" for bs, e in per_batch.items() if bs != "1"]
            res_rows.append(
                {
                    **key,
                    "weights (MB)": _mb(mem.get("weights_bytes"))
                    + (f" ({mem['param_count']:,} weights)" if "param_count" in mem else ""),
                    "peak activations (MB, analytic)": _per_bs(mem.get("peak_activation_bytes")),
                    "peak RSS (MB, measured)": _per_bs(mem.get("measured_peak_rss_bytes")),
                    "session RSS (MB, measured)": _per_bs(mem.get("measured_session_rss_bytes")),
                    # The full source texts are listed once under the table (see render).
                    "memory source": "; ".join(
                        f"{k}: {str(v).split(':', 1)[0]}" for k, v in src.items()
                    )
                    or "not recorded (benchmark.json predates memory figures)",
                    "energy per inference (b1)": energy,
                    "energy, other batch sizes": "; ".join(more) or "-",
                }
            )
    if res_rows:
        res_rows[0]["_sources"] = list(sources)
    return lat_rows, res_rows


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run(
    params: Params,
    search: Path,
    promotion: Path,
    benchmarks: list[Path],
    output: Path,
    ctx: StageContext = NO_CONTEXT,
) -> StageResult:
    """Write ``report.html`` and ``summary.json`` to ``output``.

    The summary's ``run_id`` is the pipeline's parent MLflow run (the report's own run when the
    stage runs alone), which also names ``runs/<run-id>/``.
    """
    own_run_id = ctx.run_id
    run_id = ctx.parent_run_id or own_run_id or "untracked"
    pareto = {**read_pareto(search), "trials": SearchHistory.read(search).trials}
    prom = Promotion.read(promotion).to_body()
    problem = tracking_info.reachable(params.tracking.uri)
    summary = build_summary(params, run_id, prom, Path(search), tracking_problem=problem)
    docs = [(d, r.to_body()) for d, r in find_reports(benchmarks)]
    rows, resource_rows = benchmark_tables(params, docs)
    models = [
        {"target": t, "model_name": s["model_name"], "version": s["version"]}
        for t, s in summary["targets"].items()
        if s.get("version")
    ]
    info = tracking_info.tracking_info(params.tracking.uri, ctx.parent_run_id, own_run_id, models)
    trials = pareto["trials"]
    objectives = list(pareto.get("objectives") or [])
    curve = analysis.hypervolume_curve(trials, objectives)
    targets = analysis.latency_targets(pareto, trials)
    fronts = {t: analysis.plane_front(trials, t) for t in targets}
    summary["stage_seconds"] = tracking_info.stage_seconds(info)
    summary["stage_totals"] = tracking_info.stage_totals(info)
    summary["mlflow"] = {
        k: info[k] for k in ("available", "reason", "tracking_uri", "ui_command", "parent")
    } | {"stage_runs": info["stages"], "models": info["models"]}
    if info.get("parent") and info["parent"].get("url"):
        summary["links"]["mlflow_parent_run"] = info["parent"]["url"]
    summary["search"] = {
        "objectives": objectives,
        "trials": len(trials),
        "hypervolume": curve[-1][1] if len(curve) else None,
        "hypervolume_method": curve.method,
        "hypervolume_curve": [v for _, v in curve],
        "hypervolume_reference": analysis.HV_REFERENCE,
        "front_per_target": fronts,
    }
    output.mkdir(parents=True, exist_ok=True)
    png = pareto_plot_png(pareto)
    (output / "pareto.png").write_bytes(png)
    plots = {t: target_plot_png(pareto, t) for t in targets}
    plot_files = []
    for t, b in plots.items():
        f = output / f"pareto_{_safe(t)}.png"
        f.write_bytes(b)
        plot_files.append(f)
    hv_png = hypervolume_plot_png(curve, len(objectives))
    (output / "hypervolume.png").write_bytes(hv_png)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    page = render(
        summary,
        pareto,
        rows,
        png,
        target_plots=plots,
        hv_png=hv_png,
        hv_curve=curve,
        resource_rows=resource_rows,
        tracking=info,
    )
    (output / "report.html").write_text(page)
    return StageResult(
        metrics={"promoted": sum(1 for t in summary["targets"].values() if t["promoted"])},
        artifacts=[
            output / "report.html",
            output / "summary.json",
            output / "pareto.png",
            output / "hypervolume.png",
            *plot_files,
        ],
    )
