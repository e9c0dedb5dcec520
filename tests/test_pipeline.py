"""The KFP pipeline: compiled IR is up to date, and the whole DAG runs with kfp.local."""

from __future__ import annotations

import json
import os
import re
import signal
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
    monkeypatch.delenv("NASFORGE_GPU_IMAGE", raising=False)
    from nasforge.pipelines.nasforge_pipeline import compile_pipeline

    fresh = compile_pipeline(tmp_path / "p.yaml").read_text()
    assert COMPILED.is_file(), "run `make compile` and commit pipelines/compiled/"
    assert list(yaml.safe_load_all(fresh)) == list(yaml.safe_load_all(COMPILED.read_text())), (
        "run `make compile`"
    )


def _inner_tasks(spec: dict) -> dict:
    tasks = spec["root"]["dag"]["tasks"]
    (loop,) = [k for k in tasks if k.startswith("for-loop")]  # the candidates loop
    return spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"]


def test_compiled_dag_shape():
    spec, _ = yaml.safe_load_all(COMPILED.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"prepare-data", "search", "promote", "report"} <= set(tasks)
    inner = _inner_tasks(spec)
    assert {"train", "prune", "qat", "export", "collect-cpu-gpu"} <= set(inner)
    # CPU targets and GPU targets loop separately inside the candidates loop
    assert len([k for k in inner if k.startswith("for-loop")]) == 2
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["targets"]["defaultValue"] == ["onnxruntime-cpu", "openvino-cpu"]
    assert params["gpu_targets"]["defaultValue"] == ["tensorrt-gpu"]


def test_compiled_pipeline_has_cluster_settings():
    """Requests/limits, retries with backoff, GPU node placement, Secrets as env, the data PVC."""
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    stages = ("prepare-data", "search", "train", "prune", "qat", "export", "promote", "report")
    for stage in stages:
        res = executors[f"exec-{stage}"]["container"]["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit"):
            assert res[key], (stage, key)
        assert res["resourceMemoryRequest"].endswith("Gi") and res["resourceMemoryLimit"]
        env = {
            (s["secretName"], e["envVar"])
            for s in k8s[f"exec-{stage}"]["secretAsEnv"]
            for e in s["keyToEnv"]
        }
        assert ("nasforge-mlflow", "MLFLOW_TRACKING_PASSWORD") in env
        assert ("nasforge-object-store", "AWS_SECRET_ACCESS_KEY") in env
        assert k8s[f"exec-{stage}"]["pvcMount"][0]["mountPath"] == "/data"
    # benchmarks: Guaranteed QoS on CPU; the GPU one on a GPU node, in the GPU image
    cpu = executors["exec-benchmark"]["container"]
    gpu = executors["exec-benchmark-2"]["container"]
    assert cpu["resources"]["resourceCpuRequest"] == cpu["resources"]["resourceCpuLimit"]
    assert "accelerator" not in cpu["resources"]
    assert gpu["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert gpu["resources"]["accelerator"]["resourceCount"] == "1"
    assert "nasforge-gpu" in gpu["image"] and "nasforge-cpu" in cpu["image"]
    assert k8s["exec-benchmark-2"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert k8s["exec-benchmark-2"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in k8s["exec-benchmark"]
    # retries with exponential backoff everywhere but promote (a retry would register twice)
    inner = _inner_tasks(spec)
    for name in ("train", "prune", "qat", "export"):
        policy = inner[name]["retryPolicy"]
        assert policy["maxRetryCount"] == 2 and policy["backoffFactor"] == 2.0
        assert policy["backoffDuration"] == "60s"
    root = spec["root"]["dag"]["tasks"]
    assert "retryPolicy" in root["search"] and "retryPolicy" not in root["promote"]


def test_cpu_only_targets_compile_without_a_gpu_loop(tmp_path):
    from nasforge.errors import ConfigError
    from nasforge.pipelines.nasforge_pipeline import check_package_targets, compile_pipeline

    path = compile_pipeline(tmp_path / "cpu.yaml", ["onnxruntime-cpu"])
    spec, platform = yaml.safe_load_all(path.read_text())
    assert "gpu_targets" not in spec["root"]["inputDefinitions"]["parameters"]
    assert "exec-collect" in spec["deploymentSpec"]["executors"]
    assert "nodeSelector" not in json.dumps(platform)
    check_package_targets(path, ["onnxruntime-cpu", "openvino-cpu"])
    with pytest.raises(ConfigError, match="benchmarks CPU targets but the params list CPU, GPU"):
        check_package_targets(path, ["onnxruntime-cpu", "tensorrt-gpu"])
    with pytest.raises(ConfigError, match="recompile"):
        check_package_targets(COMPILED, ["onnxruntime-cpu"])


def _search_trials_done(root: Path) -> int:
    """Trials the running search reported to ``nasforge run`` (its progress events)."""
    from nasforge.progress import EventReader

    done = 0
    for path in (root / "runs" / ".resume").glob("*/progress/search.jsonl"):
        for e in EventReader(path).read():
            if e["kind"] == "search trial":
                done = max(done, int(e["done"]))
    return done


def _kill_run_during_search(cmd: list[str], cwd: Path, env: dict) -> str:
    """Start ``nasforge run``, SIGKILL it in the middle of the search; return what it printed.

    The search's trials are not on the console (only stage lines are): the run is killed once
    the search's progress file says 3 trials are done. Also checks that its tasks do not go on
    as orphans once it is gone.
    """
    import threading
    import time

    import psutil

    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    reader.start()
    children = []
    deadline = time.monotonic() + 1200
    while proc.poll() is None and time.monotonic() < deadline:
        if _search_trials_done(cwd) >= 3:
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    reader.join(timeout=30)
    out = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, out[-4000:]
    assert children, "the search task was not running"
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"tasks of the killed run are still running: {alive}"
    return out


def _stage_lines(out: str, stage: str, event: str, candidate=None, target=None) -> list[str]:
    """The console's lines ``[ k/N] <stage>  candidate <c> (...) on <target>  <event>...``."""
    found = []
    for line in out.splitlines():
        m = re.match(r"\[ *(\d+)/(\d+)\] (\S+) +(.*)$", line)
        if not m or m.group(3) != stage or event not in m.group(4):
            continue
        if candidate is not None and f"candidate {candidate} " not in m.group(4) + " ":
            continue
        if target is not None and f"on {target}" not in m.group(4):
            continue
        found.append(line)
    return found


def _check_console(out: str, err: str) -> None:
    """The resumed run's console: stage lines only, at most 60 lines (not a terminal)."""
    lines = (out + err).splitlines()
    assert len(lines) <= 60, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert not re.search(r"\x1b\[", out + err), "escape codes without a terminal"
    assert "==> resuming" in out
    # finished before the kill: taken from the run's cache, not started again
    assert _stage_lines(out, "prepare-data", "done earlier (cached)")
    assert not _stage_lines(out, "prepare-data", "started")
    for stage, candidate, target in (
        ("search", None, None),
        ("train", 0, None),
        ("train", 1, None),
        ("prune", 1, None),
        ("qat", 0, None),
        ("export", 1, None),
        ("benchmark", 0, "onnxruntime-cpu"),
        ("benchmark", 1, "openvino-cpu"),
        ("collect", 0, None),
        ("promote", None, None),
        ("report", None, None),
    ):
        assert len(_stage_lines(out, stage, "started", candidate, target)) == 1, (stage, candidate)
        (done,) = _stage_lines(out, stage, "done in", candidate, target)
        assert "elapsed" in done, done
    # k/N: N is every task of the DAG (2 candidates x 2 CPU targets), the last done line N/N
    counts = [
        re.match(r"\[ *(\d+)/(\d+)\]", ln).groups() for ln in _stage_lines(out, "report", "done in")
    ]
    assert counts == [("18", "18")], counts
    # the candidates' architectures are named once the search has chosen them
    assert re.search(r"\] train +candidate 0 \(\|", out)
    # the estimate of the rest, once a task of this attempt has finished
    assert all("left" in ln for ln in _stage_lines(out, "train", "done in"))
    assert "Got executor_input" not in out and "Streamed logs" not in out  # kfp.local's own


def _check_task_logs(logs: Path, out: str) -> None:
    """Each task's output and kfp.local's are in the run's task logs."""
    from nasforge.console import plan

    for ref in plan(2, ["onnxruntime-cpu", "openvino-cpu"]):
        assert (logs / f"{ref.key}.log").is_file(), ref.key
    search = (logs / "search.log").read_text()
    # both attempts of the search, with kfp.local's executor input and the stage's own lines
    assert search.count("Got executor_input") == 2
    kept = int(re.search(r"resumed the search: (\d+) finished trials kept", search).group(1))
    assert kept >= 3
    assert "==> [search] done" in search and "supernet epoch" in search
    assert "epoch 2/2" in (logs / "train-cand-0.log").read_text()  # the loop's plain lines
    assert (logs / "kfp.log").is_file() and "resumed the search" not in out


def _check_file_modes(runs: Path) -> None:
    """Files nasforge writes have the mode an ordinary write gets (not mkstemp's 0600)."""
    import stat

    from nasforge.atomic import default_mode

    models = [
        p
        for p in (runs / "kfp-local").rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".onnx", ".pt2", ".xml", ".bin", ".json")
    ]
    assert {p.suffix for p in models} >= {".safetensors", ".onnx", ".pt2", ".xml", ".bin"}
    for p in models:
        assert stat.S_IMODE(p.stat().st_mode) == default_mode(), p
    for p in (runs / "latest").rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == default_mode(p.is_dir()), p


def _teacher_memory_mb(params: dict) -> float:
    from nasforge.search.subnet_metrics import model_memory
    from nasforge.space.cell import CellNetworkShape, build_cell_network
    from nasforge.supernet.cell_supernet import LARGEST_SPEC

    shape = CellNetworkShape(1, 10, channels=params["space"]["channels"], cells_per_stage=1)
    net = build_cell_network(LARGEST_SPEC, shape)
    return model_memory(net, (1, 8, 8), "int8", 1)["memory_mb"]


def _four_objectives_and_a_gpu_target() -> dict:
    """TINY with objectives error, latency, memory, energy; a memory constraint that the largest
    subnet (always evaluated first: the teacher) breaks; and a GPU target this machine lacks."""
    params = json.loads(json.dumps(TINY))
    params["search"]["objectives"] = ["error", "latency", "memory", "energy"]
    params["search"]["constraints"] = [f"memory_mb <= {0.9 * _teacher_memory_mb(params):.6f}"]
    params["targets"] = [*TINY["targets"], "tensorrt-gpu"]
    return params


def _check_pareto(root: Path, params: dict) -> None:
    """The search's pareto.json: all four objectives, and feasible candidates only."""
    (path,) = {p.resolve() for p in (root / "runs" / "kfp-local").rglob("pareto.json")}
    pareto = json.loads(path.read_text())
    kinds = set(pareto["objective_kinds"].values())
    assert kinds == {"error", "latency", "memory", "energy"}
    assert "latency_ms[onnxruntime-cpu]" in pareto["objectives"]
    assert not any("tensorrt-gpu" in n for n in pareto["objectives"])  # no GPU table here
    assert pareto["latency_sources"]["tensorrt-gpu"]["source"] == "not modelled"
    assert pareto["precision"] == "int8"
    bound = float(params["search"]["constraints"][0].split("<=")[1])
    assert [c["metric"] for c in pareto["constraints"]] == ["memory_mb"]
    history = json.loads((path.parent / "history.json").read_text())["trials"]
    assert any(not t["feasible"] for t in history), "the constraint ruled nothing out"
    assert len(pareto["candidates"]) == 2
    for c in pareto["candidates"]:
        assert c["feasible"] and c["metrics"]["memory_mb"] <= bound
    assert pareto["metric_sources"]["energy_mj[onnxruntime-cpu]"].startswith(
        ("estimated", "measured")
    )


@pytest.mark.slow
def test_whole_dag_runs_with_kfp_local(tmp_path):
    """End to end: nasforge run on tiny settings (2 candidates x 2 targets), then check outputs.

    The first attempt is killed (SIGKILL) in the middle of the search; running the same command
    again resumes it: prepare-data is not run again and the search keeps its finished trials.
    """
    params = _four_objectives_and_a_gpu_target()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "nasforge"), "run", "--params", "params.yaml"]
    first = _kill_run_during_search(cmd, tmp_path, env)
    assert _stage_lines(first, "prepare-data", "done in")
    assert _stage_lines(first, "search", "started")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    _check_console(proc.stdout, proc.stderr)
    assert not (tmp_path / "runs" / ".resume").exists() or not any(
        (tmp_path / "runs" / ".resume").iterdir()
    ), "a finished run left its resume state behind"
    summary = json.loads((tmp_path / "runs" / "latest" / "summary.json").read_text())
    _check_task_logs(tmp_path / "runs" / summary["run_id"] / "logs", proc.stdout)
    _check_file_modes(tmp_path / "runs")
    report = tmp_path / "runs" / summary["run_id"] / "report.html"
    # the GPU target has no model here: its row says "-", not Python's None
    assert report.is_file() and ">None<" not in report.read_text()
    assert set(summary["targets"]) == {"onnxruntime-cpu", "openvino-cpu", "tensorrt-gpu"}
    gpu = summary["targets"].pop("tensorrt-gpu")
    assert not gpu["promoted"] and "needs a GPU node" in gpu["reason"]
    assert "tensorrt-gpu: " in proc.stdout and "its benchmark needs a GPU node" in proc.stdout
    for s in summary["targets"].values():
        assert s["version"] and s["promoted"] and s["precision"] == "int8"
    _check_pareto(tmp_path, params)

    # MLflow: one parent run with a nested run for every stage task, and the aliases.
    db = sqlite3.connect(tmp_path / "mlflow.db")
    parent = summary["run_id"]
    parents = db.execute(
        "select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'nasforge.kind' and t.value = 'pipeline'"
    ).fetchall()
    assert parents == [(parent, "FINISHED")], "the resumed run is the same MLflow run, closed"
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


@pytest.mark.slow
def test_sigterm_stops_a_run_inside_the_candidate_loop_within_seconds(tmp_path):
    """SIGTERM to ``nasforge run`` while a candidate trains (inside kfp.local's ParallelFor).

    kfp.local waits for every running iteration's chain of tasks before it lets an interrupt
    through; before the runner terminated its task subprocesses, the run went on training,
    pruning, exporting and benchmarking for minutes after the signal. Now the running task is
    stopped, no further stage starts, the run says how to resume, and nothing is left running.
    """
    import threading
    import time

    import psutil

    params = json.loads(json.dumps(TINY))
    params["train"]["epochs"] = 40  # the signal lands while it trains
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "nasforge"), "run", "--params", "params.yaml"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 1200
    while proc.poll() is None and time.monotonic() < deadline:
        if _stage_lines("".join(seen), "train", "started", 0):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the train task was not running"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=60)
        pytest.fail("nasforge run went on for more than 60 s after SIGTERM")
    reader.join(timeout=30)
    out = "".join(seen)
    assert proc.returncode == 130, out[-4000:]
    assert "interrupted; the same command resumes it" in out
    assert not _stage_lines(out, "train", "done in", 0), out[-4000:]
    assert not _stage_lines(out, "prune", "started"), out[-4000:]
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"tasks of the stopped run are still running: {alive}"
