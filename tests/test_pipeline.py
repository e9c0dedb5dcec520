"""The KFP pipeline: compiled IR is up to date, and the whole DAG runs with kfp.local."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY

COMPILED = REPO / "pipelines" / "compiled" / "nasforge_pipeline.yaml"


def test_compiled_pipeline_is_up_to_date(tmp_path, monkeypatch):
    monkeypatch.delenv("NASFORGE_IMAGE", raising=False)
    from nasforge.pipelines.nasforge_pipeline import compile_pipeline

    fresh = compile_pipeline(tmp_path / "p.yaml").read_text()
    assert COMPILED.is_file(), "run `make compile` and commit pipelines/compiled/"
    assert yaml.safe_load(fresh) == yaml.safe_load(COMPILED.read_text()), "run `make compile`"


def test_compiled_dag_shape():
    spec = yaml.safe_load(COMPILED.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"prepare-data", "search", "promote", "report"} <= set(tasks)
    loops = [k for k in tasks if k.startswith("for-loop")]
    assert len(loops) == 1  # the candidates loop
    comps = spec["components"]
    inner = comps[tasks[loops[0]]["componentRef"]["name"]]["dag"]["tasks"]
    assert {"train", "prune", "qat", "export", "collect"} <= set(inner)
    assert any(k.startswith("for-loop") for k in inner)  # targets loop nested in candidates loop
    assert tasks[loops[0]]["parameterIterator"]["items"]["inputParameter"]


@pytest.mark.slow
def test_whole_dag_runs_with_kfp_local(tmp_path):
    """End to end: nasforge run on tiny settings (2 candidates x 2 targets), then check outputs."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "nasforge"), "run", "--params", "params.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for stage in (
        "prepare-data",
        "search",
        "train-cand-0",
        "train-cand-1",
        "qat",
        "export",
        "benchmark-openvino-cpu",
        "promote",
        "report",
    ):
        assert f"[{stage}] done" in proc.stdout, stage
    summary = json.loads((tmp_path / "runs" / "latest" / "summary.json").read_text())
    assert (tmp_path / "runs" / summary["run_id"] / "report.html").is_file()
    assert set(summary["targets"]) == {"onnxruntime-cpu", "openvino-cpu"}
    for s in summary["targets"].values():
        assert s["version"] and s["promoted"] and s["precision"] == "int8"

    # MLflow: one parent run with a nested run for every stage task, and the aliases.
    db = sqlite3.connect(tmp_path / "mlflow.db")
    parent = summary["run_id"]
    rows = db.execute(
        "select t.value, r.name from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'mlflow.parentRunId'"
    ).fetchall()
    children = [name for value, name in rows if value == parent]
    expected = {
        "prepare-data",
        "search",
        "train-cand-0",
        "train-cand-1",
        "benchmark-onnxruntime-cpu",
        "benchmark-openvino-cpu",
        "promote",
        "report",
    }
    assert expected <= set(children)
    assert (
        sum(1 for n in children if n == "export") == 2
        and sum(1 for n in children if n == "qat") == 2
    )
    aliases = {a for (a,) in db.execute("select alias from registered_model_aliases")}
    assert aliases == {"champion-onnxruntime-cpu", "champion-openvino-cpu"}
    dvc_tags = db.execute("select count(*) from tags where key = 'dvc.md5'").fetchone()[0]
    assert dvc_tags >= 2 + 2 * 4  # data, search, and train/prune/qat/export per candidate
