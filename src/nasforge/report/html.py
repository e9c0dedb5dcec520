"""The run report: one self-contained HTML page (plots embedded as PNG data URIs).

Plots:

* per target, validation accuracy against that target's latency for every searched trial, with
  the 2-D Pareto front of that plane (:func:`nasforge.report.analysis.plane_front`) drawn as a
  staircase, infeasible trials (violating a search constraint) drawn apart, and the candidates;
* the hypervolume of the search's front against the number of trials
  (:func:`nasforge.report.analysis.hypervolume_curve`).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nasforge.report import analysis  # noqa: E402

_STYLE = {
    "feasible": dict(c="#9a9a9a", s=16, marker="o", label="searched trials"),
    "infeasible": dict(c="#e8a33d", s=22, marker="x", label="infeasible (violates a constraint)"),
    # Hollow rings drawn over the stars, so a candidate on the front stays visible as one.
    "front": dict(
        facecolors="none",
        edgecolors="#1f77b4",
        linewidths=1.6,
        s=110,
        marker="o",
        label="Pareto front in this plane",
        zorder=5,
    ),
    "cand": dict(
        c="#d62728", s=120, marker="*", label="candidates", zorder=4, edgecolors="k", linewidths=0.4
    ),
}


def _trials(pareto: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pareto.get("trials") or pareto.get("front") or [])


def _has_constraints(pareto: dict[str, Any], trials: Sequence[dict[str, Any]]) -> bool:
    return bool(pareto.get("constraints")) or any("feasible" in r for r in trials)


def _draw_target(ax: Any, pareto: dict[str, Any], target: str) -> None:
    trials = _trials(pareto)
    pts = analysis.plane_points(trials, target)
    front = analysis.plane_front(trials, target)
    front_ids = set(front)
    cand = {c.get("trial"): c.get("id", "") for c in pareto.get("candidates", [])}
    split = _has_constraints(pareto, trials)
    for group in ("feasible", "infeasible"):
        sel = [
            (lat, 100 * acc)
            for r, lat, acc in pts
            if r["trial"] not in front_ids
            and (analysis.is_feasible(r) or not split) == (group == "feasible")
        ]
        if sel:
            style = dict(_STYLE[group])
            if group == "feasible" and split:
                style["label"] = "feasible trials"
            xs, ys = zip(*sel, strict=True)
            ax.scatter(xs, ys, **style)
    by_id = {r["trial"]: (lat, 100 * acc) for r, lat, acc in pts}
    if front:
        xs, ys = zip(*(by_id[t] for t in front), strict=True)
        # The staircase bounds what the front dominates (lower accuracy, higher latency).
        ax.plot(xs, ys, drawstyle="steps-post", c="#1f77b4", lw=1.2, zorder=2)
        ax.scatter(xs, ys, **_STYLE["front"])
    cpts = [(by_id[t], name) for t, name in cand.items() if t in by_id]
    if cpts:
        ax.scatter([p[0] for p, _ in cpts], [p[1] for p, _ in cpts], **_STYLE["cand"])
        # Candidates are often close together: alternate label sides so the names stay legible.
        for i, ((x, y), name) in enumerate(sorted(cpts)):
            ax.annotate(
                name,
                (x, y),
                textcoords="offset points",
                xytext=(7, 5) if i % 2 == 0 else (7, -11),
                fontsize=7,
            )
    for c in pareto.get("constraints") or []:
        metric, v = c.get("metric"), c.get("value")
        if v is None:
            continue
        if metric == analysis.latency_name(target):
            ax.axvline(v, ls="--", c="#e8a33d", lw=1, label=f"constraint {c.get('op')} {v:g} ms")
        elif metric == "val_accuracy":
            ax.axhline(100 * v, ls="--", c="#e8a33d", lw=1, label=f"accuracy {c.get('op')} {v:g}")
        elif metric == "val_error":
            ax.axhline(
                100 * (1 - v), ls="--", c="#e8a33d", lw=1, label=f"error {c.get('op')} {v:g}"
            )
    ax.set_xlabel(f"{target} latency (ms)")
    ax.set_ylabel("validation accuracy (%), inherited weights")
    ax.set_title(f"{target}: {len(pts)} trials, {len(front)} on the 2-D front", fontsize=9)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no trial has this latency", ha="center", transform=ax.transAxes)


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def target_plot_png(pareto: dict[str, Any], target: str) -> bytes:
    """Accuracy vs ``target`` latency of every trial, that plane's front and the candidates."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _draw_target(ax, pareto, target)
    return _png(fig)


def pareto_plot_png(pareto: dict[str, Any]) -> bytes:
    """All targets side by side (one panel per target, as in :func:`target_plot_png`)."""
    targets = analysis.latency_targets(pareto, _trials(pareto))
    n = max(1, len(targets))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=False):
        _draw_target(ax, pareto, target)
    return _png(fig)


def hypervolume_plot_png(curve: Sequence[tuple[int, float]], n_objectives: int) -> bytes:
    """Hypervolume of the search's front against the number of trials."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if curve:
        xs, ys = zip(*curve, strict=True)
        ax.plot(xs, ys, drawstyle="steps-post", c="#1f77b4", marker=".", ms=4)
    ax.set_xlabel("trials evaluated")
    ax.set_ylabel("hypervolume (normalised objectives)")
    ax.set_title(
        f"front of feasible trials, {n_objectives} objectives, "
        f"reference {analysis.HV_REFERENCE:g} per objective",
        fontsize=9,
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _png(fig)


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any) -> str:
    """A number as a person writes it: 0.9, not 0.8999999999999999 (12 significant digits)."""
    return f"{v:.12g}" if isinstance(v, float) else str(v)


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Link(str):
    """A table cell that renders as a link (``text`` to ``href``)."""

    href: str

    def __new__(cls, text: str, href: str | None) -> Link:
        obj = super().__new__(cls, text)
        obj.href = href or ""
        return obj


def _cell(v: Any) -> str:
    if isinstance(v, Link) and v.href:
        return f'<a href="{_esc(v.href)}">{_esc(str.__str__(v))}</a>'
    return _esc(v)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _objectives_section(pareto: dict[str, Any]) -> str:
    names = pareto.get("objectives") or []
    if not names:
        return ""
    kinds = pareto.get("objective_kinds") or {}
    sources = pareto.get("metric_sources") or {}
    rows = [
        {"objective (minimised)": n, "kind": kinds.get(n, "-"), "source": sources.get(n, "-")}
        for n in names
    ]
    extra = [
        {"figure (not an objective)": n, "source": s} for n, s in sources.items() if n not in names
    ]
    cons = [
        {
            "constraint": f"{c.get('metric')} {c.get('op')} {_num(c.get('value'))}",
            "from": c.get("source", "-"),
        }
        for c in pareto.get("constraints") or []
    ]
    precision = pareto.get("precision")
    prec = f"<p>latency measured in <code>{_esc(precision)}</code></p>" if precision else ""
    return (
        "<h2>Search objectives</h2>"
        + _table(rows)
        + (_table(extra) if extra else "")
        + prec
        + ("<h3>Constraints</h3>" + _table(cons) if cons else "<p>no search constraints</p>")
    )


def _candidate_rows(pareto: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for c in pareto.get("candidates", []):
        row: dict[str, Any] = {"id": c.get("id", "-"), "trial": c.get("trial", "-")}
        row["arch_str"] = c.get("arch_str", "-")
        for k, v in (c.get("objectives") or {}).items():
            row[k] = analysis.fmt_metric(k, analysis._finite(v))
        if "val_accuracy" in (c.get("metrics") or {}):
            row["val_accuracy"] = analysis.fmt_metric("", c["metrics"]["val_accuracy"])
        if "feasible" in c:
            row["feasible"] = (
                "yes" if c["feasible"] else "no: " + "; ".join(c.get("violations", {}))
            )
        rows.append(row)
    return rows


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _tracking_section(info: dict[str, Any] | None) -> str:
    if info is None:
        return ""
    out = ["<h2>Stage wall time (MLflow)</h2>"]
    if not info.get("available"):
        out.append(f"<p>not available: {_esc(info.get('reason') or 'unknown')}</p>")
    else:
        p = info["parent"]
        out.append(
            f"<p>pipeline run <code>{_esc(p['run_id'])}</code> ({_esc(p.get('status'))}), "
            f"{_fmt_s(p.get('elapsed_s'))} s since it started; <code>stage_seconds</code> of "
            "each stage run nested under it:</p>"
        )
        rows = [
            {
                "stage": s["stage"],
                "run": Link(s.get("run_name") or s["run_id"], s.get("url")),
                "status": s["status"],
                "seconds": "this stage (still running)"
                if s.get("this") and s.get("stage_seconds") is None
                else _fmt_s(s.get("stage_seconds")),
            }
            for s in info["stages"]
        ]
        out.append(_table(rows, ["stage", "run", "status", "seconds"]))
    return "".join(out)


def _links_section(summary: dict[str, Any], info: dict[str, Any] | None) -> str:
    items = [
        f"<li>{_esc(k)}: <code>{_esc(v)}</code></li>"
        for k, v in summary.get("links", {}).items()
        if not str(k).startswith("mlflow_") or k == "mlflow_tracking_uri"
    ]
    if info is not None:
        if info.get("server"):
            p = info.get("parent")
            if p and p.get("url"):
                items.append(
                    f'<li>pipeline run: <a href="{_esc(p["url"])}">{_esc(p["url"])}</a></li>'
                )
            for s in info.get("stages", []):
                if s.get("url"):
                    name = s.get("run_name") or s["run_id"]
                    items.append(
                        f'<li>stage run {_esc(name)}: <a href="{_esc(s["url"])}">{_esc(s["url"])}</a></li>'
                    )
            for m in info.get("models", []):
                if m.get("url"):
                    items.append(
                        f"<li>registered model {_esc(m['model_name'])} v{_esc(m['version'])} "
                        f"({_esc(m.get('target', ''))}): "
                        f'<a href="{_esc(m["url"])}">{_esc(m["url"])}</a></li>'
                    )
        else:
            items.append(
                "<li>the tracking store is not a server; open it with "
                f"<code>{_esc(info.get('ui_command'))}</code> (then runs and registered models "
                "are under the experiment and Models tabs)</li>"
            )
            for m in info.get("models", []):
                items.append(
                    f"<li>registered model {_esc(m['model_name'])} v{_esc(m['version'])} "
                    f"({_esc(m.get('target', ''))})</li>"
                )
    return f"<h2>Links</h2><ul>{''.join(items)}</ul>"


def render(
    summary: dict[str, Any],
    pareto: dict[str, Any],
    bench_rows: list[dict[str, Any]],
    png: bytes | None = None,
    *,
    target_plots: dict[str, bytes] | None = None,
    hv_png: bytes | None = None,
    hv_curve: Sequence[tuple[int, float]] | None = None,
    resource_rows: list[dict[str, Any]] | None = None,
    tracking: dict[str, Any] | None = None,
) -> str:
    """Render the report page.

    Args:
        summary: :func:`nasforge.stages.report.build_summary`.
        pareto: ``pareto.json`` plus ``trials`` (history).
        bench_rows: Latency table rows (one per candidate, target, precision).
        png: All targets' plot (used when ``target_plots`` is not given).
        target_plots: One plot per target.
        hv_png: Hypervolume-vs-trials plot.
        hv_curve: Its data (final value shown in text).
        resource_rows: Memory and energy table rows.
        tracking: :func:`nasforge.report.tracking.tracking_info`.
    """
    target_rows = [
        {
            "target": t,
            "model": f"{s.get('model_name')} v{s.get('version')}" if s.get("version") else "-",
            "candidate": s.get("candidate") or "-",
            "test accuracy": f"{s['accuracy']:.4f}" if s.get("accuracy") is not None else "-",
            "p50 batch 1 (ms)": f"{s['latency_p50_ms']:.3f}"
            if s.get("latency_p50_ms") is not None
            else "-",
            "size (bytes)": s["size_bytes"] if s.get("size_bytes") is not None else "-",
            "promoted": "yes" if s.get("promoted") else "no",
            "champion": f"v{s['champion_version']}" if s.get("champion_version") else "-",
            "why": s.get("reason", ""),
            "rejected": "; ".join(
                f"{x['candidate']}/{x['precision']}: {x['reason']}" for x in s.get("rejected", [])
            )
            or "-",
        }
        for t, s in summary["targets"].items()
    ]
    if target_plots:
        plots = "".join(
            f"<h3>{_esc(t)}</h3>{_img(b, f'accuracy vs {t} latency')}"
            for t, b in target_plots.items()
        )
    elif png:
        plots = _img(png, "Pareto front")
    else:
        plots = "<p>no trials with latency figures</p>"
    hv = ""
    if hv_png is not None:
        n_obj = len(pareto.get("objectives") or [])
        last = hv_curve[-1][1] if hv_curve else 0.0
        method = getattr(hv_curve, "method", "exact (WFG)")
        std = getattr(hv_curve, "std_error", 0.0)
        se = f" (standard error {std:.2g})" if std else ""
        hv = (
            "<h2>Search progress: hypervolume</h2>"
            f"<p>Hypervolume of the non-dominated feasible trials among the first <em>n</em> "
            f"trials, over the study's {n_obj} objectives "
            f"({_esc(', '.join(pareto.get('objectives') or []))}, all minimised), each normalised "
            "to [0, 1] by the minimum and maximum seen over the whole search, with the reference "
            f"point at {analysis.HV_REFERENCE:g} in every objective (just beyond the worst). "
            f"Largest possible value {analysis.HV_REFERENCE**n_obj:.3g}; final value "
            f"{last:.4g}{se}. Computed {_esc(method)}.</p>{_img(hv_png, 'hypervolume vs trials')}"
        )
    constraints = bool(pareto.get("constraints"))
    trials = _trials(pareto)
    n_feasible = sum(1 for r in trials if analysis.is_feasible(r))
    feasible_text = (
        f" {n_feasible} of {len(trials)} trials are feasible (meet every search constraint)."
        if constraints
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nasforge report {_esc(summary["run_id"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}th{{background:#f3f3f3}}code{{font-size:12px}}</style></head>
<body><h1>nasforge run {_esc(summary["run_id"])}</h1>
<p>dataset <code>{_esc(summary.get("dataset"))}</code>, targets {_esc(", ".join(summary["targets"]))},
search strategy <code>{_esc(summary.get("strategy"))}</code></p>
<h2>Per-target decision</h2>{_table(target_rows)}
<h2>Accuracy vs latency per target (search, inherited weights)</h2>
<p>Every searched trial is drawn. The front marked on each plot is the Pareto front of that plane
only (higher validation accuracy, lower latency on that target), computed among the
{"feasible " if constraints else ""}trials{"; trials that violate a search constraint are drawn as crosses" if constraints else ""}.
Stars are the candidates the search passed on to training (chosen on all objectives, so a candidate
need not lie on every 2-D front).{feasible_text}</p>
{plots}
{hv}
{_objectives_section(pareto)}
<h2>Candidates</h2>{_table(_candidate_rows(pareto))}
<h2>Benchmarks: latency (exported models, test split)</h2>
<p>p50 / p90 / p99 of one batch in ms after warm-up, per batch size; table targets give one
latency looked up in their table.</p>{_table(bench_rows)}
{_resource_section(resource_rows)}
{_tracking_section(tracking)}
{_links_section(summary, tracking)}
<p>Energy figures are labelled <em>measured</em> or <em>estimated</em> in each benchmark.json.</p>
</body></html>
"""


def _resource_section(rows: list[dict[str, Any]] | None) -> str:
    if rows is None:
        return ""
    sources = [s for r in rows for s in r.get("_sources", [])]
    shown = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    listed = "".join(f"<li>{_esc(s)}</li>" for s in dict.fromkeys(sources))
    return (
        "<h2>Benchmarks: memory and energy</h2>"
        + _resource_note()
        + _table(shown)
        + (f"<p>Memory sources:</p><ul>{listed}</ul>" if listed else "")
    )


def _resource_note() -> str:
    return (
        "<p>Weights: weight count x bytes per element of the precision. Peak activations: "
        "analytic, live tensors in ONNX graph order at each batch size. RSS: measured by the "
        "benchmark harness (process high-water mark, and the session's own increment). Energy: "
        "per inference at batch 1 (per batch at larger sizes); <em>measured</em> with a meter "
        "(RAPL, NVML) or a table's energy column, otherwise <em>estimated</em> from power x "
        "latency, the method given in each cell.</p>"
    )
