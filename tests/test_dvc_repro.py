"""`dvc repro` runs the same stages through the CLI; `dvc status` is clean afterwards."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_params

pytestmark = pytest.mark.slow


def test_dvc_repro_runs_every_stage(tmp_path):
    bin_dir = Path(sys.executable).parent
    dvc = str(bin_dir / "dvc")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    # DVC needs every section dvc.yaml names to exist in the file: write the full validated form.
    params = tiny_params(search={"max_candidates": 1}, dvc_candidates=[0])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run(
        [dvc, "remote", "add", "-d", "local", str(tmp_path / ".dvcstore")],
        cwd=tmp_path,
        check=True,
        env=env,
    )
    proc = subprocess.run(
        [dvc, "repro"], cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in (
        "prepare-data",
        "search",
        "train@0",
        "prune@0",
        "qat@0",
        "export@0",
        "benchmark@onnxruntime-cpu",
        "benchmark@openvino-cpu",
        "promote",
        "report",
    ):
        assert f"Running stage '{stage}'" in proc.stdout, stage
    status = subprocess.run([dvc, "status"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    export_md5 = next(o["md5"] for o in lock["stages"]["export@0"]["outs"])
    # the model's DVC hash is a tag on its MLflow run, and the stage pushed it to the remote
    import sqlite3

    db = sqlite3.connect(tmp_path / "mlflow.db")
    tags = {v for (v,) in db.execute("select value from tags where key = 'dvc.md5'")}
    assert export_md5 in tags
    assert (tmp_path / ".dvcstore" / "files" / "md5" / export_md5[:2] / export_md5[2:]).is_file()
    push = subprocess.run([dvc, "push"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert push.returncode == 0, push.stderr
