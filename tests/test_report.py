"""The report: per-target 2-D fronts, hypervolume vs trials, the page and summary.json with new-
and old-format search output, with MLflow reachable (SQLite, server) or not."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from nasforge.report import analysis
from nasforge.report import tracking as rtrack
from nasforge.search.pareto import hypervolume
from nasforge.stages import StageContext, report
from tests.conftest import tiny_params, with_tracking_db

T1, T2 = "onnxruntime-cpu", "openvino-cpu"
L1, L2 = f"latency_ms[{T1}]", f"latency_ms[{T2}]"
SUMMARY_KEYS = {"run_id", "dataset", "strategy", "targets", "links"}
TARGET_KEYS = {
    "model_name",
    "version",
    "alias",
    "candidate",
    "arch_str",
    "precision",
    "accuracy",
    "latency_p50_ms",
    "size_bytes",
    "promoted",
    "reason",
    "rejected",
    "champion_version",
}


def _trial(n, err, l1, l2, params, *, feasible=None, new=True):
    obj = {"val_error": err, L1: l1, L2: l2, "params": params}
    r = {"trial": n, "arch_str": f"arch-{n}", "objectives": obj, "rank": 0}
    if new:
        obj["memory_mb"] = params / 1e5
        r["metrics"] = {**obj, "val_accuracy": 1 - err, "size_mb": params * 4 / 1e6}
        r["feasible"] = True if feasible is None else feasible
        r["violations"] = {} if r["feasible"] else {f"{L1} <= 1.0": l1 - 1.0}
    return r


def _tiny_run_trials(new=True):
    """The tiny run's situation: trial 0 sits at 15% accuracy and is on the study's 4-objective
    front only because it has the fewest parameters; the two candidates are more accurate and
    faster on both targets."""
    return [
        _trial(0, 0.85, 0.9, 1.2, 1000, new=new),
        _trial(1, 0.10, 0.5, 0.8, 9000, new=new),
        _trial(2, 0.12, 0.4, 0.7, 8000, new=new),
        _trial(3, 0.30, 0.95, 1.3, 20000, new=new),
    ]


# --------------------------------------------------------------------------------------------
# analysis


def test_plane_front_is_computed_in_each_plane():
    trials = _tiny_run_trials()
    for target in (T1, T2):
        front = analysis.plane_front(trials, target)
        assert 0 not in front and 3 not in front
        assert front == [2, 1]  # by latency: the fastest first, then the more accurate
    # Old-format records (objectives only) give the same front.
    assert analysis.plane_front(_tiny_run_trials(new=False), T1) == [2, 1]


def test_plane_front_differs_per_target_and_skips_infeasible():
    trials = [
        _trial(0, 0.10, 1.0, 0.2, 1),  # most accurate; fast only on T2
        _trial(1, 0.20, 0.3, 2.0, 1),  # fast only on T1
        _trial(2, 0.05, 5.0, 5.0, 1, feasible=False),  # best accuracy but infeasible
    ]
    assert analysis.plane_front(trials, T1) == [1, 0]
    assert analysis.plane_front(trials, T2) == [0]
    assert analysis.latency_targets({"objectives": ["val_error", L1]}, trials) == [T1, T2]


def test_latency_targets_from_metrics_when_latency_is_not_an_objective():
    r = {"trial": 0, "objectives": {"val_error": 0.2, "memory_mb": 1.0}}
    r["metrics"] = {**r["objectives"], L2: 0.5, "val_accuracy": 0.8}
    assert analysis.latency_targets({"objectives": ["val_error", "memory_mb"]}, [r]) == [T2]
    assert analysis.plane_front([r], T2) == [0]


def test_hypervolume_curve_is_monotone_and_ends_at_the_front_of_all_feasible():
    rng = np.random.default_rng(0)
    names = ["val_error", L1, "params"]
    trials = []
    for n in range(40):
        e, lat, p = rng.uniform(0.05, 0.9), rng.uniform(0.2, 3.0), rng.uniform(1e3, 1e5)
        trials.append(_trial(n, e, lat, lat, p, feasible=bool(n % 5)))
    curve = analysis.hypervolume_curve(trials, names)
    assert [n for n, _ in curve] == list(range(1, 41))
    hv = [v for _, v in curve]
    assert all(b >= a for a, b in zip(hv, hv[1:], strict=False)) and hv[-1] > 0
    # Infeasible trials (every fifth) never change it.
    for n in range(5, 40, 5):
        assert hv[n] == hv[n - 1]
    arr = np.array([[t["objectives"][k] for k in names] for t in trials])
    lo, hi = arr.min(0), arr.max(0)
    feas = (arr[[t["feasible"] for t in trials]] - lo) / (hi - lo)
    assert hv[-1] == pytest.approx(hypervolume(feas, [analysis.HV_REFERENCE] * 3))
    assert hv[-1] <= analysis.HV_REFERENCE**3 and curve.method == "exact (WFG)"
    # The Monte Carlo estimate (used for many objectives) is monotone too and close to exact.
    mc = analysis.hypervolume_curve(trials, names, exact=False)
    est = [v for _, v in mc]
    assert all(b >= a for a, b in zip(est, est[1:], strict=False))
    assert est[-1] == pytest.approx(hv[-1], abs=4 * mc.std_error) and mc.std_error > 0
    assert mc.method.startswith("Monte Carlo")


# --------------------------------------------------------------------------------------------
# tracking helpers


def test_ui_links_and_command():
    uri = "http://mlflow.example:5000/"
    assert rtrack.run_url(uri, "3", "abc") == "http://mlflow.example:5000/#/experiments/3/runs/abc"
    assert (
        rtrack.model_version_url(uri, "nasforge-onnxruntime-cpu", 2)
        == "http://mlflow.example:5000/#/models/nasforge-onnxruntime-cpu/versions/2"
    )
    assert rtrack.run_url("sqlite:///mlflow.db", "1", "abc") is None
    cmd = rtrack.ui_command("sqlite:///mlflow.db")
    assert cmd.startswith("mlflow ui --backend-store-uri sqlite:////") and cmd.endswith("mlflow.db")


# --------------------------------------------------------------------------------------------
# the stage on synthetic artifacts


def _bench_doc(candidate, target, new=True):
    def lat(bs, p50):
        d = {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.5, "mean_ms": p50}
        d |= {"throughput_ips": bs / p50 * 1e3, "batch_size": bs}
        d |= {"peak_rss_bytes": 300_000_000, "session_rss_bytes": 5_000_000}
        d |= {"runtime": "onnxruntime", "executed_precision": "fp32"}
        return d

    results = {}
    for precision, f in (("fp32", 1.0), ("int8", 0.6)):
        r = {
            "test_accuracy": 0.9,
            "size_bytes": 40_000,
            "latency": {"1": lat(1, 0.2 * f), "4": lat(4, 0.5 * f)},
            "energy": {
                "mj": 2.5 * f,
                "mj_per_batch": 2.5 * f,
                "source": "estimated",
                "method": "estimated: 6.25 W/core x 2 cores x latency",
            },
            "files": [f"model/{precision}/{precision}.onnx"],
            "parity": {"runtime": "onnxruntime", "top1_agreement": 1.0, "passed": True},
        }
        if new:
            r["energy_per_batch"] = {"1": r["energy"], "4": {**r["energy"], "mj": 6.0 * f}}
            r["memory"] = {
                "precision": precision,
                "param_count": 10_000,
                "weights_bytes": 40_000 if precision == "fp32" else 10_050,
                "peak_activation_bytes": {"1": 2048, "4": 8192},
                "measured_peak_rss_bytes": {"1": 300_000_000, "4": 301_000_000},
                "measured_session_rss_bytes": {"1": 5_000_000, "4": 5_100_000},
                "source": {"weights": "model: ...", "measured_rss": "measured: psutil"},
            }
        results[precision] = r
    return {
        "target": {"name": target},
        "candidate": candidate,
        "arch_str": "arch-1",
        "results": results,
    }


def _artifacts(root: Path, new: bool) -> dict:
    """search/ (pareto.json, history.json), promote/ and bench-*/ folders of a tiny run."""
    trials = _tiny_run_trials(new)
    objectives = ["val_error", L1, L2, "params"] + (["memory_mb"] if new else [])
    cands = [{"id": f"cand-{i}", **trials[t]} for i, t in enumerate((1, 2))]
    pareto = {"objectives": objectives, "candidates": cands, "front": trials[:3]}
    if new:
        pareto |= {
            "objective_kinds": {
                "val_error": "error",
                L1: "latency",
                L2: "latency",
                "params": "params",
                "memory_mb": "memory",
            },
            "metric_sources": {
                "val_error": "measured: supernet inherited weights, val split",
                L1: "measured: onnxruntime-cpu int8 batch 1",
                L2: "measured: openvino-cpu int8 batch 1",
                "params": "model: parameter count",
                "memory_mb": "model: weights + peak live activations (ONNX graph)",
                "size_mb": "model: weights x bytes",
            },
            "precision": "int8",
            "constraints": [
                {"metric": L1, "op": "<=", "value": 1.0, "source": "budgets.max_latency_ms"},
                # 1 - 0.1 is 0.8999999999999999 in floating point: the report writes 0.9
                {
                    "metric": "val_accuracy",
                    "op": ">=",
                    "value": 1 - 0.1,
                    "source": "budgets.min_accuracy",
                },
            ],
        }
        trials.append(_trial(4, 0.05, 1.4, 1.5, 30000, feasible=False))
    search = root / "search"
    search.mkdir(parents=True)
    (search / "pareto.json").write_text(json.dumps(pareto))
    (search / "history.json").write_text(json.dumps({"trials": trials, "strategy": "nsga2"}))
    decisions = []
    for target in (T1, T2):
        decisions.append(
            {
                "target": target,
                "model_name": f"nasforge-{target}",
                "alias": f"champion-{target}",
                "version": "1",
                "promoted": True,
                "reason": "first model",
                "challenger": {
                    "candidate": "cand-0",
                    "arch_str": "arch-1",
                    "precision": "int8",
                    "accuracy": 0.9,
                    "latency_p50_ms": 0.12,
                    "size_bytes": 40_000,
                },
                "rejected": [],
            }
        )
    (root / "promote").mkdir()
    (root / "promote" / "promotion.json").write_text(json.dumps({"decisions": decisions}))
    benches = []
    for target in (T1, T2):
        d = root / f"bench-{target}" / "cand-0"
        d.mkdir(parents=True)
        (d / "benchmark.json").write_text(json.dumps(_bench_doc("cand-0", target, new)))
        benches.append(d.parent)
    return {"search": search, "promotion": root / "promote", "benchmarks": benches}


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _params(uri: str):
    p = tiny_params()
    return p.model_copy(update={"tracking": p.tracking.model_copy(update={"uri": uri})})


@pytest.mark.parametrize("new", [True, False], ids=["new-format", "old-format"])
def test_report_with_unreachable_tracking_server(tmp_path, new):
    art = _artifacts(tmp_path, new)
    out = tmp_path / "report"
    result = report.run(
        _params(_closed_port_uri()), output=out, ctx=StageContext(parent_run_id="abc123"), **art
    )
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["run_id"] == "abc123"
    assert {"mlflow_tracking_uri", "search"} <= set(summary["links"])
    for t in (T1, T2):
        assert TARGET_KEYS <= set(summary["targets"][t])
        assert summary["targets"][t]["champion_version"] is None  # not looked up: unreachable
        # The 15%-accuracy trial is not on the plane's front; the candidates are.
        assert summary["search"]["front_per_target"][t] == [2, 1]
    assert summary["stage_seconds"] == {} and not summary["mlflow"]["available"]
    assert "unreachable" in summary["mlflow"]["reason"]
    page = (out / "report.html").read_text()
    assert "Stage wall time (MLflow)" in page and "not available: MLflow tracking server" in page
    assert page.count("data:image/png;base64,") == 3  # two targets and the hypervolume
    assert "Search progress: hypervolume" in page and "just beyond the worst" in page
    assert "0.120 / 0.132 / 0.180" in page  # int8 b1 p50 / p90 / p99
    for name in ("pareto.png", f"pareto_{T1}.png", f"pareto_{T2}.png", "hypervolume.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert out / name in result.artifacts
    if new:
        assert "4 of 5 trials are feasible" in page and "budgets.max_latency_ms" in page
        assert "val_accuracy &gt;= 0.9<" in page and "0.8999999" not in page
        assert "measured: onnxruntime-cpu int8 batch 1" in page
        assert "estimated: 6.25 W/core x 2 cores x latency" in page
        assert "b4: 0.008" in page  # analytic peak activations at batch 4 (MB)
        assert "measured: psutil" in page
        assert summary["search"]["hypervolume"] > 0
        assert summary["search"]["hypervolume_method"] == "exact (WFG)"
        assert "Computed exact (WFG)" in page
    else:
        assert "benchmark.json predates memory figures" in page


def test_report_alone_without_parent_run(tmp_path):
    art = _artifacts(tmp_path, True)
    report.run(
        _params(f"sqlite:///{tmp_path / 'none.db'}"),
        output=tmp_path / "r",
        **art,
    )
    page = (tmp_path / "r" / "report.html").read_text()
    assert "not available: no pipeline parent run" in page
    assert "mlflow ui --backend-store-uri" in page


def _parent_with_stage_runs(uri: str, experiment: str) -> tuple[str, dict[str, str]]:
    from nasforge.tracking.mlflow_runs import open_parent_run, stage_run

    parent = open_parent_run(uri, experiment, "pipeline", {"run": {"name": "tiny"}})
    ids = {}
    for stage, name, seconds in (
        ("search", "search", 12.5),
        ("train", "train-cand-0", 30.0),
        ("train", "train-cand-1", 20.0),
    ):
        with stage_run(uri, experiment, stage, parent, run_name=name) as run:
            run.log_metrics({"stage_seconds": seconds})
            ids[name] = run.run_id
    with stage_run(uri, experiment, "report", parent) as run:
        ids["report"] = run.run_id  # left without stage_seconds: the report reads while running
    return parent, ids


def test_report_reads_stage_seconds_from_sqlite_store(tmp_path):
    p = with_tracking_db(tiny_params(), tmp_path)
    parent, ids = _parent_with_stage_runs(p.tracking.uri, p.tracking.experiment)
    art = _artifacts(tmp_path, True)
    ctx = StageContext(run_id=ids["report"], parent_run_id=parent)
    report.run(p, output=tmp_path / "r", ctx=ctx, **art)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["stage_seconds"] == {
        "search": 12.5,
        "train-cand-0": 30.0,
        "train-cand-1": 20.0,
    }
    assert summary["stage_totals"]["train"] == {"runs": 2, "seconds": 50.0}
    assert summary["mlflow"]["available"] and summary["mlflow"]["parent"]["run_id"] == parent
    page = (tmp_path / "r" / "report.html").read_text()
    assert "this stage (still running)" in page and "train-cand-1" in page
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}" in page


@pytest.mark.slow
def test_report_links_to_runs_and_models_on_a_tracking_server(tmp_path, mlflow_server):
    p = _params(mlflow_server)
    parent, ids = _parent_with_stage_runs(mlflow_server, p.tracking.experiment)
    art = _artifacts(tmp_path, True)
    ctx = StageContext(run_id=ids["report"], parent_run_id=parent)
    report.run(p, output=tmp_path / "r", ctx=ctx, **art)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    exp = summary["mlflow"]["parent"]["experiment_id"]
    page = (tmp_path / "r" / "report.html").read_text()
    assert f'href="{mlflow_server}/#/experiments/{exp}/runs/{parent}"' in page
    assert f'href="{mlflow_server}/#/experiments/{exp}/runs/{ids["train-cand-0"]}"' in page
    assert f'href="{mlflow_server}/#/models/nasforge-{T1}/versions/1"' in page
    assert summary["links"]["mlflow_parent_run"].endswith(f"/runs/{parent}")
    assert summary["stage_seconds"]["search"] == 12.5
