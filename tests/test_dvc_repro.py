"""`dvc repro` runs the same stages through the CLI; `dvc status` is clean afterwards, and a
changed dataset in ``data/`` re-runs every stage."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, tiny_params

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


#: The stages `dvc repro` runs for one candidate and the onnxruntime-cpu target.
ONE_CANDIDATE_STAGES = (
    "prepare-data",
    "search",
    "train@0",
    "prune@0",
    "qat@0",
    "export@0",
    "benchmark@onnxruntime-cpu",
    "promote",
    "report",
)


def _project(root: Path, params, *, git: bool = False) -> dict[str, str]:
    """A copy of the repository's DVC project in ``root`` with ``params``; the subprocess env.

    Copies what a clone has: dvc.yaml, .dvcignore, .gitignore and data/README.md (prepare-data
    depends on data/). ``git``: a git repository, so ``dvc add`` applies the real .gitignore.
    """
    for name in ("dvc.yaml", ".gitignore", "data/README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    # DVC needs every section dvc.yaml names to exist in the file: write the full validated form.
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(root), "PYTHONUNBUFFERED": "1"}
    if git:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run(
        [DVC, "init", "-q", *([] if git else ["--no-scm"])], cwd=root, check=True, env=env
    )
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    subprocess.run(
        [DVC, "remote", "add", "-d", "local", str(root / ".dvcstore")],
        cwd=root,
        check=True,
        env=env,
    )
    return env


def _dvc(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [DVC, *args], cwd=root, capture_output=True, text=True, timeout=1800, env=env
    )
    assert proc.returncode == 0, (
        f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    )
    return proc


def test_dvc_repro_runs_every_stage(tmp_path):
    params = tiny_params(search={"max_candidates": 1}, dvc_candidates=[0])
    env = _project(tmp_path, params)
    dvc = DVC
    proc = subprocess.run(
        [dvc, "repro"], cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in (*ONE_CANDIDATE_STAGES, "benchmark@openvino-cpu"):
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


def _write_npz(path: Path, seed: int) -> None:
    """A tiny learnable 4-class dataset: 8x8 grey images, a bright quadrant per class, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 30)
    x = rng.integers(0, 60, size=(len(y), 8, 8))
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 180
    np.savez(path, x=x.astype(np.uint8), y=y)


def test_changed_dataset_reruns_every_stage(tmp_path):
    """`dvc add` a dataset under data/, repro, change it, `dvc add` again: every stage re-runs.

    The rewritten ``data/tiny.npz.dvc`` is what the retraining workflow watches (``**/*.dvc``).
    """
    params = tiny_params(
        data={"source": "data/tiny.npz"},
        search={
            "supernet_epochs": 1,
            "trials": 2,
            "max_candidates": 1,
            "bn_recalibration_batches": 1,
        },
        train={"epochs": 1},
        benchmark={"batch_sizes": [1], "warmup": 1, "repeats": 3},
        targets=["onnxruntime-cpu"],
        dvc_candidates=[0],
    )
    env = _project(tmp_path, params, git=True)
    dataset = tmp_path / "data" / "tiny.npz"
    dvcfile = tmp_path / "data" / "tiny.npz.dvc"
    _write_npz(dataset, seed=0)
    _dvc(tmp_path, env, "add", "data/tiny.npz")  # fails if git ignores the .dvc file
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "data/tiny.npz.dvc"], cwd=tmp_path, env=env
    )
    assert ignored.returncode == 1, "git ignores data/tiny.npz.dvc: the workflow would never see it"
    stages = list(ONE_CANDIDATE_STAGES)
    first = _dvc(tmp_path, env, "repro")
    for stage in stages:
        assert f"Running stage '{stage}'" in first.stdout, stage
    lock_before = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    dvcfile_before = dvcfile.read_text()
    assert "up to date" in _dvc(tmp_path, env, "status").stdout

    _write_npz(dataset, seed=1)  # same shapes and classes, other pixels
    _dvc(tmp_path, env, "add", "data/tiny.npz")
    assert dvcfile.read_text() != dvcfile_before  # the change git (and retrain.yml) sees
    status = _dvc(tmp_path, env, "status").stdout
    assert re.search(r"prepare-data:\s+changed deps:\s+modified:\s+data\s", status), status
    second = _dvc(tmp_path, env, "repro")
    for stage in stages:
        assert f"Running stage '{stage}'" in second.stdout, (stage, second.stdout[-3000:])
    lock_after = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]

    def md5(lock: dict, kind: str, path: str) -> str:
        return next(e["md5"] for e in lock["prepare-data"][kind] if e["path"] == path)

    for kind, path in (("deps", "data"), ("outs", "artifacts/data")):
        assert md5(lock_after, kind, path) != md5(lock_before, kind, path), (kind, path)
    assert "up to date" in _dvc(tmp_path, env, "status").stdout
