"""promote: per target, register the best model that passes the parity gate and meets the budgets,
and move ``champion-<target>`` only if it beats the current champion.

The parity gate: the exported model the target runs must agree with its torch model on the test
split (top-1) at least ``export.parity_min_top1``; a result without a parity measurement (e.g. a
benchmark.json from before the gate) fails it. Each rejected result and why is in
``promotion.json`` (``rejected`` of each decision).

The champion gate (:mod:`nasforge.tracking.registry`): the chosen model is timed side by side with
the target's current champion, downloaded from the registry, in this process on the target's
runtime, and registered as an MLflow ONNX model with the decision's evidence (both timings with
their intervals, accuracies, content hashes, rounds, runtime, machine) as version tags and in
``promotion.json``; a model identical to a registered version is not registered again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nasforge.artifacts.benchmark_report import find_reports, model_dir
from nasforge.artifacts.promotion import PROMOTION_JSON, Promotion
from nasforge.config import Params
from nasforge.stages import NO_CONTEXT, StageContext, StageResult
from nasforge.tracking.gate import GateSettings
from nasforge.tracking.registry import (
    Challenger,
    Decision,
    alias_for,
    model_name_for,
    register_and_promote,
)


def parity_problem(params: Params, r: dict[str, Any], precision: str) -> str | None:
    """Why a result's exported model fails the parity gate, or None if it passes."""
    p = r.get("parity") or {}
    if p.get("top1_agreement") is None:
        return "no parity measurement"
    top1, need = float(p["top1_agreement"]), params.export.parity_min_top1
    if top1 < need:
        return f"parity top-1 {top1:.4f} < {need} ({p.get('runtime', '?')}/{precision})"
    return None


def budget_problem(params: Params, r: dict[str, Any]) -> str | None:
    """Why a result misses the budgets, or None if it meets them."""
    b = params.budgets
    lat = r["latency"].get("1", next(iter(r["latency"].values())))["p50_ms"]
    if r["test_accuracy"] < b.min_accuracy:
        return f"accuracy {r['test_accuracy']:.4f} < {b.min_accuracy}"
    if b.max_latency_ms is not None and lat > b.max_latency_ms:
        return f"latency {lat:.3f} ms > {b.max_latency_ms} ms"
    if b.max_size_mb is not None and r["size_bytes"] > b.max_size_mb * 1e6:
        return f"size {r['size_bytes'] / 1e6:.3f} MB > {b.max_size_mb} MB"
    return None


def choose(
    params: Params, entries: list[tuple[Path, dict[str, Any]]]
) -> tuple[tuple | None, list[dict[str, str]]]:
    """Best (folder, doc, precision, result) passing parity and the budgets: most accurate, then
    fastest; and the rejected results (``{"candidate", "precision", "gate", "reason"}``)."""
    precisions = (
        ["int8", "fp32"] if params.promote.precision == "any" else [params.promote.precision]
    )
    ok, rejected = [], []
    for d, doc in entries:
        for pr in precisions:
            r = doc["results"][pr]
            gate, problem = "parity", parity_problem(params, r, pr)
            if problem is None:
                gate, problem = "budgets", budget_problem(params, r)
            if problem:
                rejected.append(
                    {
                        "candidate": doc["candidate"],
                        "precision": pr,
                        "gate": gate,
                        "reason": problem,
                    }
                )
            else:
                lat = r["latency"].get("1", next(iter(r["latency"].values())))["p50_ms"]
                ok.append(((-r["test_accuracy"], lat), (d, doc, pr, r)))
    if not ok:
        return None, rejected
    return min(ok, key=lambda t: t[0])[1], rejected


def _rejected_text(x: dict[str, str]) -> str:
    return f"{x['candidate']}/{x['precision']}: {x['reason']}"


def _not_benchmarked(target: str) -> str:
    from nasforge.hardware.targets import get_target

    problem = get_target(target).availability_problem()
    if problem:
        return f"not benchmarked: {problem} here; its benchmark needs a GPU node"
    return "no benchmark results for this target"


def run(
    params: Params, benchmarks: list[Path], output: Path, ctx: StageContext = NO_CONTEXT
) -> StageResult:
    """Decide and register per target; ``ctx.run_id`` is the MLflow run that stores the models."""
    # A folder without results, or a corrupt report, is an error rather than a silent skip.
    entries = [(d, r.to_body()) for d, r in find_reports(benchmarks)]
    by_target: dict[str, list] = {}
    for d, doc in entries:
        by_target.setdefault(doc["target"]["name"], []).append((d, doc))
    decisions: list[dict[str, Any]] = []
    tp = params.tracking
    settings = GateSettings.from_params(params)
    for target in params.targets:
        group = by_target.get(target, [])
        best, rejected = choose(params, group)
        for x in rejected:
            print(f"  {target}: rejected {_rejected_text(x)}", flush=True)
        if best is None:
            why = "; ".join(map(_rejected_text, rejected)) if rejected else _not_benchmarked(target)
            decisions.append(
                Decision(
                    target,
                    model_name_for(tp.model_prefix, target),
                    alias_for(target),
                    None,
                    False,
                    f"no candidate passes parity and the budgets: {why}",
                ).as_dict()
                | {"rejected": rejected}
            )
            continue
        d, doc, precision, r = best
        lat = r["latency"].get("1", next(iter(r["latency"].values())))["p50_ms"]
        challenger = Challenger(
            target=target,
            files=model_dir(d, precision),
            accuracy=r["test_accuracy"],
            latency_p50_ms=lat,
            size_bytes=r["size_bytes"],
            precision=precision,
            candidate=doc["candidate"],
            arch_str=doc["arch_str"],
            tags={"nasforge.dvc_md5": r["dvc_md5"]} if r.get("dvc_md5") else {},
        )
        model_name = model_name_for(tp.model_prefix, target)
        decision = register_and_promote(
            tp.uri,
            ctx.run_id,
            model_name,
            challenger,
            params.promote.accuracy_tolerance,
            params.promote.latency_tolerance,
            settings=settings,
        )
        decisions.append(decision.as_dict() | {"rejected": rejected})
        verdict = "promoted" if decision.promoted else "not promoted"
        print(
            f"  {target}: {model_name} v{decision.version} ({doc['candidate']}, {precision}) {verdict}: {decision.reason}",
            flush=True,
        )
    output.mkdir(parents=True, exist_ok=True)
    gate = dataclasses.asdict(settings)
    Promotion.from_dict({"gate": gate, "decisions": decisions}).write(output)
    metrics = {
        "promoted": sum(1 for d in decisions if d["promoted"]),
        "registered": sum(1 for d in decisions if d.get("registered")),
        "targets": len(decisions),
    }
    return StageResult(metrics=metrics, artifacts=[output / PROMOTION_JSON])
