"""Shared fixtures: tiny settings, the shared data folder, and a prepared digits dataset."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NASFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR_TAR = SHARED_DATA / "cifar10" / "cifar10-jpeg.tar"
NB201_CSV = SHARED_DATA / "nb201" / "nb201_dev.csv"

TINY = {
    "run": {"name": "tiny", "threads": 2},
    "space": {"channels": 8},
    # A wide accuracy window: after 3 supernet epochs subnets are far apart, and the DAG tests
    # need two candidates to exercise both loops.
    "search": {
        "supernet_epochs": 3,
        "trials": 6,
        "max_candidates": 2,
        "candidate_accuracy_window": 1.0,
    },
    "train": {"epochs": 2},
    "prune": {"finetune_epochs": 1, "channel_ratio": 0.25},
    "qat": {"epochs": 1},
    "benchmark": {"batch_sizes": [1, 4], "warmup": 2, "repeats": 5},
    # Models trained for 2 epochs (~60-70% on digits) have near-tied logits, so INT8 rounding
    # flips a few more test answers than on a trained model: which candidates the search picks
    # decides whether 0.99 holds. The gate itself is tested in test_parity_gate.py.
    "export": {"parity_min_top1": 0.95},
    "targets": ["onnxruntime-cpu", "openvino-cpu"],  # dvc.yaml's foreach reads it from the file
    "dvc_candidates": [0, 1],
}


def tiny_params(**overrides):
    """Tiny-settings Params with section overrides merged in."""
    from nasforge.config import params_from_dict

    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    return params_from_dict(data, "tiny")


def with_tracking_db(params, folder: Path):
    """``params`` with its MLflow store in ``folder``, as an absolute URI.

    MLflow caches its SQL store per URI string, so a relative ``sqlite:///mlflow.db`` keeps
    pointing at whichever folder the first test used in this process.
    """
    uri = f"sqlite:///{Path(folder).absolute() / 'mlflow.db'}"
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"uri": uri})})


def run_chain(params, root: Path, dataset: Path, candidate: int = 0) -> dict:
    """search -> train(candidate) -> prune -> qat -> export with tracking off; outputs and results.

    Returns:
        ``{"data", "root", "params", <stage>, <stage>_result}`` for each stage.
    """
    from nasforge.stages.runner import execute

    out = {"data": dataset, "root": root, "params": params}

    def run(stage: str, **inputs) -> None:
        out[stage] = root / stage
        out[f"{stage}_result"] = execute(
            stage, params, out[stage], tracking=False, dataset=dataset, **inputs
        )

    run("search")
    run("train", search=out["search"], candidate=candidate)
    run("prune", model=out["train"])
    run("qat", model=out["prune"])
    run("export", model=out["prune"], quantized=out["qat"])
    return out


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A prepared digits dataset (tracking off)."""
    from nasforge.stages.runner import execute

    out = tmp_path_factory.mktemp("data") / "digits"
    execute("prepare-data", tiny_params(), out, tracking=False)
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend), shared by the session."""
    from nasforge.errors import TrackingError
    from nasforge.tracking.mlflow_runs import check_reachable

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", str(root / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            check_reachable(uri, timeout_s=1)
            break
        except TrackingError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited during start-up")
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start in 120 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


# The longest test files first: with `pytest -n auto --dist loadfile` (make test) each file runs
# on one worker, so a long file that starts last would finish long after the rest.
LONG_FILES = (
    "test_space_coverage.py",
    "test_pipeline.py",
    "test_dvc_repro.py",
    "test_macro_supernet.py",
    "test_promotion_gate.py",
    "test_tracking.py",
    "test_resume.py",
)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    """Order the long files first (see :data:`LONG_FILES`); the rest keep their order."""

    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)
