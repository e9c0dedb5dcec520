"""MLflow runs and registry gates, DVC hashes — against real stores (SQLite and `mlflow server`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nasforge.errors import TrackingError
from nasforge.tracking.dvc import dvc_hash, push
from nasforge.tracking.mlflow_runs import check_reachable, client, open_parent_run, stage_run
from nasforge.tracking.registry import Challenger, alias_for, beats, register_and_promote


def _challenger(tmp_path: Path, acc: float, lat: float, tag: str = "a") -> Challenger:
    files = tmp_path / f"model-{tag}-{acc}-{lat}"
    files.mkdir()
    (files / "model.onnx").write_bytes(b"onnx-bytes-" + tag.encode())
    return Challenger(
        "onnxruntime-cpu",
        files,
        acc,
        lat,
        100,
        "int8",
        "cand-0",
        "|skip_connect~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    )


def test_beats_rules():
    inc = {"accuracy": 0.95, "latency_p50_ms": 1.0}
    c = lambda acc, lat: Challenger("t", Path("."), acc, lat, 1, "int8", "c", "a")  # noqa: E731
    assert beats(c(0.96, 1.05), inc, 0.005, 0.1)[0]  # more accurate, within latency tolerance
    assert not beats(c(0.96, 1.2), inc, 0.005, 0.1)[0]  # more accurate but much slower
    assert beats(c(0.947, 0.8), inc, 0.005, 0.1)[0]  # much faster, accuracy within tolerance
    assert not beats(c(0.95, 0.98), inc, 0.005, 0.1)[0]  # same model re-run: noise only
    assert not beats(c(0.90, 0.5), inc, 0.005, 0.1)[0]  # faster but too inaccurate


def test_alias_names_are_registry_safe():
    assert alias_for("openvino-cpu") == "champion-openvino-cpu"
    assert alias_for("table:raspi4_latency_ms") == "champion-table-raspi4_latency_ms"


def test_registry_gate_never_moves_alias_to_worse(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = open_parent_run(uri, "t", "p", {"a": {"b": 1}})
    with stage_run(uri, "t", "promote", parent) as run:
        first = register_and_promote(
            uri, run.run_id, "m", _challenger(tmp_path, 0.95, 1.0, "1"), 0.005, 0.1
        )
        worse = register_and_promote(
            uri, run.run_id, "m", _challenger(tmp_path, 0.93, 1.0, "2"), 0.005, 0.1
        )
        better = register_and_promote(
            uri, run.run_id, "m", _challenger(tmp_path, 0.97, 1.0, "3"), 0.005, 0.1
        )
    assert first.promoted and first.reason == "no champion yet"
    assert not worse.promoted and "kept champion" in worse.reason
    assert better.promoted and better.incumbent_version == first.version
    c = client(uri)
    assert (
        str(c.get_model_version_by_alias("m", "champion-onnxruntime-cpu").version) == better.version
    )
    tags = c.get_model_version("m", worse.version).tags
    assert (
        tags["nasforge.decision"] == "kept-incumbent" and "kept champion" in tags["nasforge.reason"]
    )
    # the stage run is nested under the parent
    assert c.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent


def test_identical_accuracy_survives_tag_round_trip(tmp_path):
    """A rerun with the same test accuracy (265/270) and noise-level latency keeps the champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    acc = 265 / 270
    with stage_run(uri, "t", "promote", None) as run:
        first = register_and_promote(
            uri, run.run_id, "m", _challenger(tmp_path, acc, 0.070, "1"), 0.005, 0.1
        )
        again = register_and_promote(
            uri, run.run_id, "m", _challenger(tmp_path, acc, 0.064, "2"), 0.005, 0.1
        )
    assert first.promoted and not again.promoted, again.reason
    assert (
        str(client(uri).get_model_version_by_alias("m", "champion-onnxruntime-cpu").version)
        == first.version
    )


def test_failed_stage_marks_run_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError), stage_run(uri, "t", "train", None) as run:
        raise ValueError("boom")
    assert client(uri).get_run(run.run_id).info.status == "FAILED"


def test_unreachable_server_is_one_line_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port} is unreachable"):
        check_reachable(f"http://127.0.0.1:{port}", timeout_s=2)


def test_dvc_hash_matches_dvc_add(tmp_path):
    d = tmp_path / "ws"
    (d / "model").mkdir(parents=True)
    (d / "model" / "w.bin").write_bytes(b"\x00\x01weights")
    (d / "model" / "meta.json").write_text("{}")
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "dvc", "init", "--no-scm", "-q"], cwd=d, check=True)
    subprocess.run([bin_dir / "dvc", "add", "-q", "model"], cwd=d, check=True)
    recorded = (d / "model.dvc").read_text()
    h = dvc_hash(d / "model")
    assert h.endswith(".dir") and f"md5: {h}" in recorded
    assert push(d / "model", tmp_path / "remote") == h
    assert (tmp_path / "remote" / "files" / "md5" / h[:2] / h[2:]).is_file()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend)."""
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


@pytest.mark.slow
def test_registry_on_real_mlflow_server(mlflow_server, tmp_path):
    uri = mlflow_server
    parent = open_parent_run(uri, "srv", "p", {"x": 1})
    with stage_run(uri, "srv", "promote", parent) as run:
        d = register_and_promote(
            uri, run.run_id, "srv-model", _challenger(tmp_path, 0.9, 2.0), 0.005, 0.1
        )
    assert d.promoted
    c = client(uri)
    mv = c.get_model_version_by_alias("srv-model", "champion-onnxruntime-cpu")
    assert str(mv.version) == d.version and mv.tags["nasforge.test_accuracy"].startswith("0.9")
    assert c.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent
