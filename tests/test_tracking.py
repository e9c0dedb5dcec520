"""MLflow runs and registry gates, DVC hashes — against real stores (SQLite and `mlflow server`)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from nasforge.errors import TrackingError
from nasforge.export.onnx import export_fp32
from nasforge.tracking.dvc import dvc_hash, push
from nasforge.tracking.mlflow_runs import check_reachable, client, open_parent_run, stage_run
from nasforge.tracking.registry import (
    Challenger,
    alias_for,
    beats,
    register_and_promote,
    rollback,
    settle_champion,
)


def _onnx(folder: Path, seed: int, channels: int = 4) -> Path:
    """A tiny real ONNX classifier (input 1x8x8) whose weights depend on ``seed``."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, channels, 3), nn.Flatten(), nn.LazyLinear(10))
    net(torch.zeros(1, 1, 8, 8))
    folder.mkdir(parents=True)
    return export_fp32(net.eval(), torch.zeros(2, 1, 8, 8), folder / "int8.onnx")


def _challenger(tmp_path: Path, acc: float, lat: float, tag: str = "a") -> Challenger:
    # Registered versions are MLflow ONNX models now: the files must be a real ONNX graph.
    files = tmp_path / f"model-{tag}-{acc}-{lat}"
    _onnx(files, zlib.crc32(tag.encode()))
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


def _promote(uri: str, run_id: str, tmp_path: Path, acc: float, lat: float, tag: str):
    return register_and_promote(uri, run_id, "m", _challenger(tmp_path, acc, lat, tag), 0.005, 0.1)


def _champion(uri: str, name: str = "m") -> str:
    return str(client(uri).get_model_version_by_alias(name, "champion-onnxruntime-cpu").version)


@pytest.mark.slow
def test_racing_promotions_leave_one_consistent_champion(mlflow_server, tmp_path):
    """Six promoters at once, through a real server: the alias ends on the best, whatever order."""
    uri = mlflow_server
    name = f"race-{tmp_path.name}"
    parent = open_parent_run(uri, "race", "p", {})
    accs = [0.90, 0.95, 0.91, 0.97, 0.93, 0.92]  # equal latency: the most accurate must win
    barrier = threading.Barrier(len(accs))
    decisions: dict[float, object] = {}
    errors: list[BaseException] = []

    # torch's ONNX export is not thread-safe: the challengers' models are made up front.
    challengers = {acc: _challenger(tmp_path, acc, 1.0, f"r{acc}") for acc in accs}

    def promote(acc: float) -> None:
        try:
            with stage_run(uri, "race", f"promote-{acc}", parent) as run:
                ch = challengers[acc]
                barrier.wait(timeout=60)
                decisions[acc] = register_and_promote(uri, run.run_id, name, ch, 0.005, 0.1)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=promote, args=(a,)) for a in accs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    best = decisions[0.97]
    assert _champion(uri, name) == best.version
    # a promoter that reports a promotion was the best of everything registered before it (a
    # sequential history); one registered after a better version never took the alias
    by_version = {int(d.version): a for a, d in decisions.items()}
    for acc, d in decisions.items():
        earlier = [a for v, a in by_version.items() if v < int(d.version)]
        if d.promoted:
            assert all(acc > a for a in earlier), (acc, d.reason)
    tags = client(uri).get_model_version(name, best.version).tags
    assert tags["nasforge.decision"] == "promoted"


def test_simultaneous_alias_writes_settle_without_error(mlflow_server, tmp_path):
    """Eight settlers writing an unset alias at once (MLflow's alias write is read-then-insert,
    so concurrent first writes collide on the alias row): every one returns the same champion."""
    uri = mlflow_server
    c = client(uri)
    for round_ in range(12):
        name = f"settle-{tmp_path.name}-{round_}"
        c.create_registered_model(name)
        for acc in (0.90, 0.97, 0.93):
            tags = {"nasforge.test_accuracy": repr(acc), "nasforge.latency_p50_ms": "1.0",
                    "nasforge.size_bytes": "100"}  # fmt: skip
            c.create_model_version(name, source="s3://nasforge-test/model", tags=tags)
        barrier = threading.Barrier(8)
        results: list[object] = []

        def settle(
            name: str = name, barrier: threading.Barrier = barrier, results: list = results
        ) -> None:
            try:
                barrier.wait(timeout=60)
                results.append(settle_champion(uri, name, "champion-x", 0.005, 0.1))
            except BaseException as err:  # noqa: BLE001 - checked in the main thread
                results.append(err)

        threads = [threading.Thread(target=settle) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert results == [2] * 8, results
        assert int(c.get_model_version_by_alias(name, "champion-x").version) == 2


def test_rollback_restores_previous_champion(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = open_parent_run(uri, "t", "p", {})
    with stage_run(uri, "t", "promote", parent) as run:
        v1 = _promote(uri, run.run_id, tmp_path, 0.95, 1.0, "1")
        v2 = _promote(uri, run.run_id, tmp_path, 0.97, 1.0, "2")
    assert _champion(uri) == v2.version
    back = rollback(uri, "m", "onnxruntime-cpu", 0.005, 0.1)
    assert back.version == v1.version and _champion(uri) == v1.version
    tags = client(uri).get_model_version("m", v2.version).tags
    assert tags["nasforge.rolled_back"] == "true" and tags["nasforge.decision"] == "rolled-back"
    # the withdrawn version never comes back: a later, worse challenger is judged against v1
    with stage_run(uri, "t", "promote", parent) as run:
        v3 = _promote(uri, run.run_id, tmp_path, 0.94, 1.0, "3")
    assert not v3.promoted and v3.incumbent_version == v1.version
    assert _champion(uri) == v1.version
    # rolling back the only remaining champion removes the alias
    rollback(uri, "m", "onnxruntime-cpu", 0.005, 0.1)  # v1 out: v3 is the only one left
    assert _champion(uri) == v3.version
    rollback(uri, "m", "onnxruntime-cpu", 0.005, 0.1)
    with pytest.raises(TrackingError, match="no champion"):
        rollback(uri, "m", "onnxruntime-cpu", 0.005, 0.1)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("nasforge")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_rollback(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "p.yaml").write_text(f"tracking:\n  uri: {uri}\n  model_prefix: nf\n")
    parent = open_parent_run(uri, "t", "p", {})
    with stage_run(uri, "t", "promote", parent) as run:
        for acc, tag in ((0.95, "1"), (0.97, "2")):
            register_and_promote(
                uri, run.run_id, "nf-onnxruntime-cpu", _challenger(tmp_path, acc, 1.0, tag),
                0.005, 0.1,
            )  # fmt: skip
    assert _champion(uri, "nf-onnxruntime-cpu") == "2"
    done = _cli(["promote", "--params", "p.yaml", "--rollback", "onnxruntime-cpu"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rolled back v2; champion is now v1" in done.stdout
    assert _champion(uri, "nf-onnxruntime-cpu") == "1"
    # unknown target: one line naming the known ones; nothing changes
    done = _cli(["promote", "--params", "p.yaml", "--rollback", "quantum-tpu"], tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "quantum-tpu" in done.stderr
    assert _champion(uri, "nf-onnxruntime-cpu") == "1"


def test_promote_with_tracking_server_down_changes_nothing(tmp_path):
    """Promote and rollback against a dead server: exit 2, one line, no output folder."""
    (tmp_path / "p.yaml").write_text("tracking:\n  uri: http://127.0.0.1:9\n")
    (tmp_path / "bench").mkdir()
    for args in (
        ["promote", "--params", "p.yaml", "--output", "out", "--benchmarks", "bench"],
        ["promote", "--params", "p.yaml", "--rollback", "onnxruntime-cpu"],
    ):
        done = _cli(args, tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
        assert "127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_stage_runs_log_dataset_inputs_source_and_errors(tmp_path, monkeypatch, digits_dir):
    from nasforge.stages.runner import execute, one_line
    from tests.conftest import tiny_params, with_tracking_db

    monkeypatch.chdir(tmp_path)  # the DVC remote .dvcstore is relative
    p = with_tracking_db(tiny_params(), tmp_path)
    uri = p.tracking.uri
    parent = open_parent_run(uri, p.tracking.experiment, "p", {})
    execute("prepare-data", p, tmp_path / "data", parent_run_id=parent)
    c = client(uri)
    exp = c.get_experiment_by_name(p.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    def stage_run_of(stage: str):
        (r,) = c.search_runs([exp.experiment_id], f"tags.`nasforge.stage` = '{stage}'")
        return r

    prep = stage_run_of("prepare-data")
    (inp,) = prep.inputs.dataset_inputs
    tags = {t.key: t.value for t in inp.tags}
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert inp.dataset.digest == prep.data.tags["dvc.md5"] == tags["dvc.md5"]
    assert inp.dataset.name == "digits" and tags["nasforge.sha256"] == meta["sha256"]
    assert tags["mlflow.data.context"] == "prepared"
    assert json.loads(tags["nasforge.counts"]) == meta["counts"]
    assert prep.data.tags["mlflow.source.name"] == "nasforge prepare-data"
    assert prep.data.tags["mlflow.source.type"] == "LOCAL"
    # a consumer stage that fails: FAILED, its one-line error, and the dataset it read
    with pytest.raises(Exception) as failed:
        execute(
            "train", p, tmp_path / "train", parent_run_id=parent,
            dataset=tmp_path / "data", search=tmp_path / "no-search", candidate=0,
        )  # fmt: skip
    train = stage_run_of("train")
    assert train.info.status == "FAILED"
    assert train.data.tags["nasforge.error"] == one_line(failed.value)
    assert "\n" not in train.data.tags["nasforge.error"]
    (inp,) = train.inputs.dataset_inputs
    assert inp.dataset.digest == prep.data.tags["dvc.md5"]
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"


def test_experiment_made_elsewhere_is_marked_as_model_training(tmp_path):
    from nasforge.tracking.mlflow_runs import experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    made = c.create_experiment("old")
    assert "mlflow.experimentKind" not in c.get_experiment(made).tags
    assert experiment_id(uri, "old") == made
    assert c.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"
    c.set_experiment_tag(made, "mlflow.experimentKind", "genai_development")  # a user's choice
    experiment_id(uri, "old")
    assert c.get_experiment(made).tags["mlflow.experimentKind"] == "genai_development"


def test_stage_run_links_the_kfp_plugin_task_run(tmp_path, monkeypatch):
    """In a KFP task tracked by KFP's MLflow plugin (MLFLOW_RUN_ID on the pod), the stage run and
    the plugin's task run point at each other; elsewhere the variable is ignored."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    kfp_run = c.create_run(c.create_experiment("Default-kfp")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", kfp_run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run(uri, "t", "train", None) as run:  # not in a KFP pod: no link
        pass
    assert "kfp.mlflow_run_id" not in c.get_run(run.run_id).data.tags
    monkeypatch.setenv("KFP_POD_NAME", "nasforge-train-abc")
    with stage_run(uri, "t", "train", None) as run:
        pass
    assert c.get_run(run.run_id).data.tags["kfp.mlflow_run_id"] == kfp_run
    assert c.get_run(kfp_run).data.tags["nasforge.stage_run_id"] == run.run_id
