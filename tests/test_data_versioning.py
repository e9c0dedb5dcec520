"""Data changes retrain: datasets live in data/, prepare-data depends on that folder, and the .dvc
file that `dvc add data/<name>` writes is kept by git and watched by the retraining workflow.

The end-to-end check (a changed dataset re-runs every stage of `dvc repro`) is in
tests/test_dvc_repro.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO


def _github_glob(pattern: str) -> re.Pattern[str]:
    """A GitHub Actions path filter as a regex: ``*`` stops at ``/``, ``**`` does not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def test_prepare_data_depends_on_the_data_folder() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "data" in stages["prepare-data"].get("deps", [])
    # the folder exists in every clone (else `dvc repro` fails on a missing dependency) and its
    # README is no part of the data
    assert (REPO / "data" / "README.md").is_file()
    assert "/data/README.md" in (REPO / ".dvcignore").read_text().splitlines()


def test_retrain_workflow_triggers_on_dataset_dvc_files() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "retrain.yml").read_text())
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as True
    filters = [_github_glob(p) for p in on["push"]["paths"]]

    def triggers(path: str) -> bool:
        return any(f.match(path) for f in filters)

    for changed in ("data/cifar10.tar.dvc", "data/cifar10.dvc", "data/tiny.npz.dvc", "dvc.lock"):
        assert triggers(changed), changed
    assert not triggers("data/README.md")


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout"
)
def test_git_keeps_dataset_dvc_files_and_ignores_the_data() -> None:
    def ignored(path: str) -> bool:
        proc = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, capture_output=True
        )
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode == 0

    for data in ("data/cifar10.tar", "data/cifar10/train/cat/0.png", "data/tiny.npz"):
        assert ignored(data), data
    for kept in ("data/README.md", "data/cifar10.tar.dvc", "data/cifar10.dvc"):
        assert not ignored(kept), kept
