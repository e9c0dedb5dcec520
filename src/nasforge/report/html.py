"""The run report: one self-contained HTML page (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto_plot_png(pareto: dict[str, Any]) -> bytes:
    """Validation accuracy vs latency of every searched subnet, per target, front highlighted."""
    lat_names = [n for n in pareto["objectives"] if n.startswith("latency_ms[")]
    front_ids = {r["trial"] for r in pareto["front"]}
    cand_ids = {c["trial"] for c in pareto["candidates"]}
    trials = pareto.get("trials", pareto["front"])
    fig, axes = plt.subplots(
        1, max(1, len(lat_names)), figsize=(5.5 * max(1, len(lat_names)), 4), squeeze=False
    )
    for ax, name in zip(axes[0], lat_names, strict=False):
        for group, style in (
            ("other", dict(c="#bbb", s=14)),
            ("front", dict(c="#1f77b4", s=30)),
            ("cand", dict(c="#d62728", s=70, marker="*")),
        ):
            pts = [
                (r["objectives"][name], 100 * (1 - r["objectives"]["val_error"]))
                for r in trials
                if (group == "cand" and r["trial"] in cand_ids)
                or (group == "front" and r["trial"] in front_ids and r["trial"] not in cand_ids)
                or (group == "other" and r["trial"] not in front_ids)
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(
                    xs,
                    ys,
                    label={"other": "searched", "front": "Pareto front", "cand": "candidates"}[
                        group
                    ],
                    **style,
                )
        ax.set_xlabel(f"{name.removeprefix('latency_ms[').rstrip(']')} latency (ms)")
        ax.set_ylabel("validation accuracy (%), inherited weights")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(
    summary: dict[str, Any], pareto: dict[str, Any], bench_rows: list[dict[str, Any]], png: bytes
) -> str:
    """Render the report page."""
    img = base64.b64encode(png).decode()
    target_rows = [
        {
            "target": t,
            "model": f"{s.get('model_name')} v{s.get('version')}" if s.get("version") else "-",
            "candidate": s.get("candidate", "-"),
            "test accuracy": f"{s['accuracy']:.4f}" if s.get("accuracy") is not None else "-",
            "p50 batch 1 (ms)": f"{s['latency_p50_ms']:.3f}"
            if s.get("latency_p50_ms") is not None
            else "-",
            "size (bytes)": s.get("size_bytes", "-"),
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
    cand_rows = [
        {
            "id": c["id"],
            "arch_str": c["arch_str"],
            **{k: f"{v:.4g}" for k, v in c["objectives"].items()},
        }
        for c in pareto["candidates"]
    ]
    links = "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>"
        for k, v in summary.get("links", {}).items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nasforge report {html.escape(summary["run_id"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}th{{background:#f3f3f3}}code{{font-size:12px}}</style></head>
<body><h1>nasforge run {html.escape(summary["run_id"])}</h1>
<p>dataset <code>{html.escape(str(summary.get("dataset")))}</code>, targets {html.escape(", ".join(summary["targets"]))},
search strategy <code>{html.escape(str(summary.get("strategy")))}</code></p>
<h2>Per-target decision</h2>{_table(target_rows, list(target_rows[0]) if target_rows else [])}
<h2>Pareto front (search, inherited weights)</h2><img alt="Pareto front" src="data:image/png;base64,{img}">
<h2>Candidates</h2>{_table(cand_rows, list(cand_rows[0]) if cand_rows else [])}
<h2>Benchmarks (exported models, test split)</h2>{_table(bench_rows, list(bench_rows[0]) if bench_rows else [])}
<h2>Links</h2><ul>{links}</ul>
<p>Energy figures are labelled <em>measured</em> or <em>estimated</em> in each benchmark.json.</p>
</body></html>
"""
