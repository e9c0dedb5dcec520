"""nasforge.kfp_client against a fake Kubeflow Pipelines v2beta1 API server on 127.0.0.1.

The fake implements the endpoints kfp.Client calls (healthz, experiments, runs, recurring runs)
and records every request, so the tests check what a real cluster would receive.
"""

# No `from __future__ import annotations`: KFP components need real annotation objects.

import json
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from nasforge.errors import ConfigError, NasforgeError, TrackingError
from nasforge.kfp_client import (
    PipelineRunError,
    PipelineServerError,
    schedule,
    submit,
    validate_cron,
)

API = "/apis/v2beta1"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    authorization: str | None = None


@dataclass
class FakeKfp:
    """State of the fake server: what it was sent and what it answers."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    experiments: dict[str, str] = field(default_factory=dict)  # display_name -> id
    run_states: list[str] = field(default_factory=lambda: ["SUCCEEDED"])
    fail_run_create: bool = False

    def sent(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]


def _handler(state: FakeKfp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> Recorded:
            parsed = urllib.parse.urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            rec = Recorded(
                self.command,
                parsed.path,
                urllib.parse.parse_qs(parsed.query),
                body,
                self.headers.get("Authorization"),
            )
            state.requests.append(rec)
            return rec

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            rec = self._record()
            if rec.path == f"{API}/healthz":
                self._reply(200, {"multi_user": False, "tag_name": "2.5.0"})
            elif rec.path == f"{API}/experiments":
                wanted = json.loads(rec.query["filter"][0])["predicates"][0]["stringValue"]
                found = [
                    {"experiment_id": eid, "display_name": name}
                    for name, eid in state.experiments.items()
                    if name == wanted
                ]
                self._reply(200, {"experiments": found} if found else {})
            elif rec.path.startswith(f"{API}/runs/"):
                run_id = rec.path.rsplit("/", 1)[1]
                now = state.run_states.pop(0) if len(state.run_states) > 1 else state.run_states[0]
                payload: dict[str, Any] = {"run_id": run_id, "state": now}
                if now == "FAILED":
                    payload["error"] = {"code": 2, "message": "task train failed: OOMKilled"}
                self._reply(200, payload)
            else:
                self._reply(404, {"error": f"no route {rec.path}"})

        def do_POST(self) -> None:  # noqa: N802
            rec = self._record()
            if rec.path == f"{API}/experiments":
                eid = f"exp-{len(state.experiments) + 1}"
                state.experiments[rec.body["display_name"]] = eid
                self._reply(200, {"experiment_id": eid, "display_name": rec.body["display_name"]})
            elif rec.path == f"{API}/runs":
                if state.fail_run_create:
                    self._reply(400, {"error": "invalid pipeline spec", "code": 3})
                    return
                self._reply(200, {"run_id": "run-123", "state": "PENDING", **rec.body})
            elif rec.path == f"{API}/recurringruns":
                self._reply(200, {"recurring_run_id": "rr-7", "status": "ENABLED", **rec.body})
            else:
                self._reply(404, {"error": f"no route {rec.path}"})

    return Handler


@pytest.fixture(autouse=True)
def _no_kfp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment defaults must not leak in from the machine running the tests."""
    for name in ("KFP_TOKEN", "NASFORGE_PIPELINE_RUNNER_SA", "KF_PIPELINES_SA_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_kfp() -> Iterator[FakeKfp]:
    state = FakeKfp()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real compiled KFP v2 pipeline with two parameters and a Kubernetes platform spec."""
    from kfp import compiler, dsl, kubernetes

    @dsl.component(base_image="python:3.11-slim")
    def double(x: int) -> int:
        return 2 * x

    @dsl.pipeline(name="nasforge-test-pipeline")
    def pipe(epochs: int = 1, dataset: str = "digits") -> None:
        task = double(x=epochs)
        kubernetes.use_secret_as_env(task, "nasforge-mlflow", {"MLFLOW_TRACKING_TOKEN": "TOKEN"})
        kubernetes.add_node_selector(task, "nvidia.com/gpu.present", "true")

    path = tmp_path_factory.mktemp("pkg") / "pipeline.yaml"
    compiler.Compiler().compile(pipe, str(path))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------- submit
def test_submit_sends_spec_params_and_experiment(fake_kfp: FakeKfp, package: Path) -> None:
    run_id = submit(
        package,
        fake_kfp.url,
        experiment="nightly",
        run_name="retrain-42",
        params={"epochs": 3, "dataset": "cifar10"},
        service_account="nasforge-pipeline",
    )
    assert run_id == "run-123"
    assert fake_kfp.sent("GET", f"{API}/healthz")
    (exp,) = fake_kfp.sent("POST", f"{API}/experiments")
    assert exp.body["display_name"] == "nightly"
    (run,) = fake_kfp.sent("POST", f"{API}/runs")
    assert run.body["display_name"] == "retrain-42"
    assert run.body["experiment_id"] == "exp-1"
    assert run.body["service_account"] == "nasforge-pipeline"
    assert run.authorization is None
    assert run.body["runtime_config"]["parameters"] == {"epochs": 3, "dataset": "cifar10"}
    # The whole compiled spec travels inline with the run, Kubernetes platform spec included.
    spec, platform = yaml.safe_load_all(package.read_text())
    sent_spec = run.body["pipeline_spec"]["pipeline_spec"]
    assert sent_spec["pipelineInfo"]["name"] == spec["pipelineInfo"]["name"]
    assert "comp-double" in sent_spec["components"]
    executor = run.body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"][
        "deploymentSpec"
    ]["executors"]["exec-double"]
    assert executor["secretAsEnv"][0]["secretName"] == "nasforge-mlflow"
    assert executor["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert (
        executor
        == platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-double"]
    )
    # Not waiting: the run's status is never polled.
    assert not [r for r in fake_kfp.requests if r.path.startswith(f"{API}/runs/")]


def test_submit_sends_bearer_token(fake_kfp: FakeKfp, package: Path) -> None:
    submit(package, fake_kfp.url, token="ci-token-123")
    (run,) = fake_kfp.sent("POST", f"{API}/runs")
    assert run.authorization == "Bearer ci-token-123"


def test_token_and_service_account_default_from_env(
    fake_kfp: FakeKfp, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KFP_TOKEN", "env-token")
    monkeypatch.setenv("NASFORGE_PIPELINE_RUNNER_SA", "nasforge-pipeline-runner")
    submit(package, fake_kfp.url)
    schedule(package, fake_kfp.url, cron="@daily")
    (run,) = fake_kfp.sent("POST", f"{API}/runs")
    (rr,) = fake_kfp.sent("POST", f"{API}/recurringruns")
    for sent in (run, rr):
        assert sent.authorization == "Bearer env-token"
        assert sent.body["service_account"] == "nasforge-pipeline-runner"


def test_submit_reuses_existing_experiment(fake_kfp: FakeKfp, package: Path) -> None:
    fake_kfp.experiments["nasforge"] = "exp-existing"
    submit(package, fake_kfp.url)
    assert not fake_kfp.sent("POST", f"{API}/experiments")
    (run,) = fake_kfp.sent("POST", f"{API}/runs")
    assert run.body["experiment_id"] == "exp-existing"
    assert run.body["display_name"].startswith("nasforge ")


def test_submit_wait_polls_until_success(fake_kfp: FakeKfp, package: Path) -> None:
    fake_kfp.run_states = ["PENDING", "RUNNING", "SUCCEEDED"]
    assert submit(package, fake_kfp.url, wait=True, timeout=30, poll_interval=0.01) == "run-123"
    polls = fake_kfp.sent("GET", f"{API}/runs/run-123")
    assert len(polls) == 3


def test_submit_wait_raises_when_run_fails(fake_kfp: FakeKfp, package: Path) -> None:
    fake_kfp.run_states = ["RUNNING", "FAILED"]
    with pytest.raises(PipelineRunError, match=r"run-123 ended FAILED: task train failed"):
        submit(package, fake_kfp.url, wait=True, timeout=30, poll_interval=0.01)


def test_submit_wait_times_out(fake_kfp: FakeKfp, package: Path) -> None:
    fake_kfp.run_states = ["RUNNING"]
    with pytest.raises(PipelineRunError, match="still RUNNING after"):
        submit(package, fake_kfp.url, wait=True, timeout=0.05, poll_interval=0.01)


def test_server_rejection_is_one_line_error(fake_kfp: FakeKfp, package: Path) -> None:
    fake_kfp.fail_run_create = True
    with pytest.raises(PipelineServerError) as info:
        submit(package, fake_kfp.url)
    message = str(info.value)
    assert "HTTP 400" in message and "invalid pipeline spec" in message
    assert "\n" not in message


def test_unreachable_host_is_clear_error(package: Path) -> None:
    host = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(PipelineServerError, match="cannot reach the Kubeflow Pipelines API") as e:
        submit(package, host)
    assert isinstance(e.value, TrackingError) and isinstance(e.value, NasforgeError)
    assert "\n" not in str(e.value)


def test_missing_package_is_config_error(fake_kfp: FakeKfp, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        submit(tmp_path / "nope.yaml", fake_kfp.url)
    with pytest.raises(ConfigError, match="must end with"):
        submit(tmp_path / "pipeline.txt", fake_kfp.url)
    assert fake_kfp.requests == []  # nothing sent for bad input


# ------------------------------------------------------------------------------- schedule
def test_schedule_sends_cron_params_and_spec(fake_kfp: FakeKfp, package: Path) -> None:
    rr_id = schedule(
        package,
        fake_kfp.url,
        experiment="scheduled",
        job_name="nasforge-nightly",
        cron="0  30 2 * * MON-FRI",
        params={"epochs": 5},
    )
    assert rr_id == "rr-7"
    (rr,) = fake_kfp.sent("POST", f"{API}/recurringruns")
    assert rr.body["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * MON-FRI"
    assert "periodic_schedule" not in rr.body["trigger"]
    assert rr.body["display_name"] == "nasforge-nightly"
    assert rr.body["runtime_config"]["parameters"] == {"epochs": 5}
    assert rr.body["mode"] == "ENABLE"
    assert int(rr.body["max_concurrency"]) == 1  # int64: grpc-gateway takes number or string
    assert rr.body["no_catchup"] is True
    assert rr.body["experiment_id"] == fake_kfp.experiments["scheduled"]
    assert rr.body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == (
        "nasforge-test-pipeline"
    )


def test_schedule_rejects_bad_cron_before_sending(fake_kfp: FakeKfp, package: Path) -> None:
    with pytest.raises(ConfigError, match="5 fields; KFP cron has 6"):
        schedule(package, fake_kfp.url, cron="30 2 * * *")
    assert fake_kfp.requests == []


@pytest.mark.parametrize(
    "cron",
    [
        "0 0 3 * * *",
        "*/30 * * * * ?",
        "0 0 0 1,15 JAN-JUN ?",
        "0 5-10/2 * ? * SUN",
        "@daily",
        "@every 6h30m",
    ],
)
def test_valid_crons(cron: str) -> None:
    assert validate_cron(cron) == cron


@pytest.mark.parametrize(
    ("cron", "match"),
    [
        ("", "0 fields"),
        ("0 0 3 * * * *", "7 fields"),
        ("60 0 3 * * *", "outside 0-59 in the second field"),
        ("0 0 24 * * *", "outside 0-23 in the hour field"),
        ("0 0 3 0 * *", "outside 1-31 in the day of month field"),
        ("0 0 3 * 13 *", "outside 1-12 in the month field"),
        ("0 0 3 * * 7", "outside 0-6 in the day of week field"),
        ("0 ? 3 * * *", "'\\?' is only allowed"),
        ("0 */0 * * * *", "step '0'"),
        ("0 10-5 * * * *", "runs backwards"),
        ("0 0 3 * * FOO", "'FOO' is not a number"),
        ("@sometimes", "1 fields"),
    ],
)
def test_invalid_crons(cron: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_cron(cron)


# ------------------------------------------------------------------- through the CLI
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("nasforge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "nasforge.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def nasforge_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real nasforge pipeline compiled for CPU targets."""
    from nasforge.pipelines.nasforge_pipeline import compile_pipeline

    path = tmp_path_factory.mktemp("nf") / "nasforge.yaml"
    return compile_pipeline(path, ["onnxruntime-cpu", "openvino-cpu"])


def _params(tmp_path: Path, tracking_uri: str, targets: str = "[onnxruntime-cpu, openvino-cpu]"):
    path = tmp_path / "params.yaml"
    path.write_text(f"targets: {targets}\ntracking:\n  uri: {tracking_uri}\n")
    return path


def test_cli_submit_and_schedule_reach_the_server(
    fake_kfp: FakeKfp, nasforge_package: Path, tmp_path: Path
) -> None:
    fake_kfp.run_states = ["SUCCEEDED"]  # polling itself is tested above, without 10 s sleeps
    params = _params(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = _cli("pipeline", "submit", "--host", fake_kfp.url, "--package", str(nasforge_package),
                "--params", str(params), "--run-name", "cli-run", "--wait")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "run-123" in done.stdout
    (run,) = fake_kfp.sent("POST", f"{API}/runs")
    assert run.body["display_name"] == "cli-run"
    sent = run.body["runtime_config"]["parameters"]
    assert sent["targets"] == ["onnxruntime-cpu", "openvino-cpu"]
    assert json.loads(sent["params_json"])["targets"] == ["onnxruntime-cpu", "openvino-cpu"]
    assert sent["parent_run_id"] == ""  # a SQLite store is not reachable from the cluster
    done = _cli("pipeline", "schedule", "--host", fake_kfp.url, "--package", str(nasforge_package),
                "--params", str(params), "--cron", "0 0 3 * * *")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (rr,) = fake_kfp.sent("POST", f"{API}/recurringruns")
    assert rr.body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert rr.body["runtime_config"]["parameters"]["targets"] == ["onnxruntime-cpu", "openvino-cpu"]


def test_cli_submit_compiles_for_the_params_targets(fake_kfp: FakeKfp, tmp_path: Path) -> None:
    """Without --package, the pipeline is compiled for the params' targets (GPU loop included)."""
    params = _params(tmp_path, f"sqlite:///{tmp_path / 'm.db'}", "[openvino-cpu, tensorrt-gpu]")
    done = _cli("pipeline", "submit", "--host", fake_kfp.url, "--params", str(params))
    assert done.returncode == 0, done.stderr
    (run,) = fake_kfp.sent("POST", f"{API}/runs")
    sent = run.body["runtime_config"]["parameters"]
    assert sent["targets"] == ["openvino-cpu"] and sent["gpu_targets"] == ["tensorrt-gpu"]
    platform = run.body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]
    gpu = platform["deploymentSpec"]["executors"]["exec-benchmark-2"]
    assert gpu["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}


def test_cli_submit_rejects_package_without_gpu_loop(
    fake_kfp: FakeKfp, nasforge_package: Path, tmp_path: Path
) -> None:
    params = _params(tmp_path, f"sqlite:///{tmp_path / 'm.db'}", "[openvino-cpu, tensorrt-gpu]")
    done = _cli("pipeline", "submit", "--host", fake_kfp.url, "--package", str(nasforge_package),
                "--params", str(params))  # fmt: skip
    assert done.returncode == 2 and "recompile" in done.stderr and "Traceback" not in done.stderr
    assert not fake_kfp.sent("POST", f"{API}/runs")


@pytest.mark.slow
def test_cli_submit_opens_parent_mlflow_run(
    fake_kfp: FakeKfp, nasforge_package: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """With a tracking server, the stage runs on the cluster nest under a run opened at submit."""
    from nasforge.tracking.mlflow_runs import client

    params = _params(tmp_path, mlflow_server)
    done = _cli("pipeline", "submit", "--host", fake_kfp.url, "--package", str(nasforge_package),
                "--params", str(params), "--run-name", "nightly-1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run,) = fake_kfp.sent("POST", f"{API}/runs")
    parent = run.body["runtime_config"]["parameters"]["parent_run_id"]
    info = client(mlflow_server).get_run(parent)
    assert info.info.run_name == "nightly-1" and info.data.tags["nasforge.kind"] == "pipeline"


def test_cli_submit_with_tracking_server_down_sends_nothing(
    fake_kfp: FakeKfp, nasforge_package: Path, tmp_path: Path
) -> None:
    params = _params(tmp_path, "http://127.0.0.1:9")
    done = _cli("pipeline", "submit", "--host", fake_kfp.url, "--package", str(nasforge_package),
                "--params", str(params))  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert "127.0.0.1:9" in done.stderr and done.stderr.count("\n") == 1
    assert not fake_kfp.sent("POST", f"{API}/runs")


def test_cli_fails_cleanly(fake_kfp: FakeKfp, nasforge_package: Path, tmp_path: Path) -> None:
    fake_kfp.run_states = ["FAILED"]
    params = _params(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = _cli("pipeline", "submit", "--host", fake_kfp.url, "--package", str(nasforge_package),
                "--params", str(params), "--wait")  # fmt: skip
    assert done.returncode == 2
    assert "error: pipeline run run-123 ended FAILED" in done.stderr
    assert "Traceback" not in done.stderr
    done = _cli("pipeline", "schedule", "--host", fake_kfp.url, "--package", str(nasforge_package),
                "--params", str(params), "--cron", "0 3 * * *")  # fmt: skip
    assert done.returncode == 2 and "KFP cron has 6" in done.stderr
    assert not fake_kfp.sent("POST", f"{API}/recurringruns")
