"""The CPU image builds and runs real pipeline stages.

Builds ``docker/Dockerfile.cpu`` with ``scripts/build_images.sh`` (podman or docker, whichever can
run containers here; with podman as root the base is a locally debootstrapped Debian and the
Python packages come from a wheelhouse, so no registry is needed), then runs stages in the image
the way Kubernetes runs them (non-root uid 10001, read-only root filesystem, writable /tmp and
$HOME only) on tiny inputs in a host folder, and checks their outputs on the host.

Set NASFORGE_TEST_IMAGE to test an image that is already built (CI builds it in its own step).
Skips, saying why, where neither podman nor docker can run a container.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.container, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "scripts" / "build_images.sh"
LOCAL_BASE = "localhost/debian-py:bookworm"
WHEELHOUSE = REPO / "docker" / "wheelhouse"

#: Tiny parameters: the digits dataset (8x8 images shipped with scikit-learn), a few images per
#: class, one epoch everywhere. Only fields of nasforge.config.Params.
TINY_PARAMS = {
    "run": {"name": "container-test", "seed": 0, "threads": 1},
    "data": {"source": "digits", "max_per_class": 12},
    "space": {"channels": 4, "cells_per_stage": 1},
    "search": {
        "supernet_epochs": 1,
        "trials": 2,
        "max_candidates": 1,
        "batch_size": 32,
        "bn_recalibration_batches": 1,
    },
    "train": {"epochs": 1, "batch_size": 32},
    "prune": {"channel_ratio": 0.25, "steps": 1, "finetune_epochs": 1},
    "qat": {"epochs": 1, "batch_size": 32},
    "targets": ["onnxruntime-cpu", "openvino-cpu"],
    "tracking": {"uri": "sqlite:////data/mlflow.db", "dvc_remote": "/data/dvcstore"},
}

#: The stage command lines run in the container (``/data`` is the host folder, also the working
#: directory). One table so the CLI's flags are adjusted in one place.
P = ["--params", "/data/params.yaml"]
DATA = ["--data", "/data/prepared"]
STAGES: dict[str, list[str]] = {
    "prepare-data": [*P, "--output", "/data/prepared"],
    "search": [*P, *DATA, "--output", "/data/search"],
    "train": [*P, *DATA, "--search", "/data/search", "--candidate", "0", "--output", "/data/trained"],
    "prune": [*P, *DATA, "--model", "/data/trained", "--output", "/data/pruned"],
    "qat": [*P, *DATA, "--model", "/data/pruned", "--output", "/data/qat"],
    "export": [*P, *DATA, "--model", "/data/pruned", "--quantized", "/data/qat", "--output", "/data/exported"],
}  # fmt: skip


# --------------------------------------------------------------------------- engine + image
def _run(cmd: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def _podman_env() -> dict[str, str]:
    """Podman settings that work without systemd/cgroup delegation (see DESIGN.md)."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        conf = Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nasforge"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "containers.conf").write_text(
            "[containers]\ndefault_ulimits = []\npids_limit = 0\n\n"
            '[engine]\ncgroup_manager = "cgroupfs"\n'
        )
        env["CONTAINERS_CONF"] = str(conf / "containers.conf")
    return env


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]


@cache
def _engine() -> tuple[str, tuple[str, ...], str]:
    """(name, command prefix, why-not) of the first engine whose daemon/runtime answers."""
    reasons = []
    if shutil.which("docker"):
        probe = _run(["docker", "info"], timeout=30)
        if probe.returncode == 0:
            return "docker", ("docker",), ""
        reasons.append(f"docker: {_last_line(probe)}")
    else:
        reasons.append("docker: not installed")
    if shutil.which("podman"):
        prefix = ("podman", "--runtime", "runc") if shutil.which("runc") else ("podman",)
        probe = _run([*prefix, "info"], timeout=60, env=_podman_env())
        if probe.returncode == 0:
            return "podman", prefix, ""
        reasons.append(f"podman: {_last_line(probe)}")
    else:
        reasons.append("podman: not installed")
    return "", (), "; ".join(reasons)


def _engine_run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    name, prefix, _ = _engine()
    extra = ["--network", "host"] if name == "podman" else []
    return _run([*prefix, "run", "--rm", *extra, *args], timeout=timeout, env=_podman_env())


def _image_name() -> str:
    from nasforge.images import cpu_image

    return cpu_image()


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image: given by NASFORGE_TEST_IMAGE, or built now with scripts/build_images.sh."""
    name, prefix, why = _engine()
    if not name:
        pytest.skip(f"no container engine can run containers here ({why})")
    given = os.environ.get("NASFORGE_TEST_IMAGE")
    if given:
        return given
    args = ["bash", str(BUILD_SCRIPT), "--engine", name]
    air_gapped = name == "podman" and os.geteuid() == 0 and shutil.which("debootstrap")
    if air_gapped:
        # No registry: a debootstrapped base and a wheelhouse refreshed from pyproject.toml
        # (cheap when the wheels are already there).
        args += ["--local-base", "--wheelhouse"]
    args.append("cpu")
    built = _run(args, timeout=3600, env=_podman_env(), cwd=REPO)
    if built.returncode != 0:
        pytest.fail(f"image build failed:\n{built.stderr[-4000:]}")
    tag = _image_name()
    # The engine must be able to *run* a container, not only build: try it.
    probe = _engine_run([tag, "--version"], timeout=300)
    if probe.returncode != 0 and "nasforge" not in probe.stdout + probe.stderr:
        probe = _engine_run(["--entrypoint", "python", tag, "-c", "print('ok')"], timeout=300)
        if probe.returncode != 0:
            pytest.skip(f"{name} builds but cannot run containers here: {probe.stderr[-500:]}")
    return tag


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host folder mounted at /data; writable by the image's uid 10001."""
    path = tmp_path_factory.mktemp("container-data")
    path.chmod(0o777)
    (path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    return path


def _in_container(image: str, data_dir: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run argv in the image as Kubernetes would (read-only root, non-root, tmpfs /tmp, $HOME)."""
    mount = f"{data_dir}:/data" + (":Z" if _engine()[0] == "podman" else "")
    return _engine_run(
        [
            "--read-only",
            "--tmpfs", "/tmp:rw,exec,size=2g",
            "--tmpfs", "/home/nasforge:rw,size=256m",
            "--user", "10001:10001",
            "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "-v", mount,
            "--workdir", "/data",
            "--entrypoint", argv[0],
            image,
            *argv[1:],
        ]
    )  # fmt: skip


def _host_cli_has(stage: str) -> bool:
    """Whether this checkout's CLI has the stage (then the image built from it must, too)."""
    probe = _run([sys.executable, "-m", "nasforge.cli", stage, "--help"], timeout=120, cwd=REPO)
    return probe.returncode == 0


def _stage(image: str, data_dir: Path, stage: str) -> None:
    if not _host_cli_has(stage):
        pytest.skip(f"`nasforge {stage}` is not in this checkout's CLI yet (nasforge.cli)")
    result = _in_container(image, data_dir, ["nasforge", stage, *STAGES[stage]])
    assert result.returncode == 0, (
        f"nasforge {stage} failed in the container (rc {result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


# ----------------------------------------------------------------------------------- tests
def test_image_runs_as_non_root_with_pinned_runtimes(image: str, data_dir: Path) -> None:
    code = (
        "import os, json, nasforge, torch, onnxruntime, openvino, mlflow, kfp;"
        "print(json.dumps({'uid': os.getuid(), 'nasforge': nasforge.__version__,"
        " 'torch': torch.__version__, 'onnxruntime': onnxruntime.__version__,"
        " 'openvino': openvino.__version__, 'mlflow': mlflow.__version__,"
        " 'kfp': kfp.__version__, 'cuda': torch.cuda.is_available()}))"
    )
    # No --user: the image's own USER must be non-root.
    result = _engine_run(["--entrypoint", "python", image, "-c", code], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    import nasforge

    assert info["uid"] == 10001
    assert info["nasforge"] == nasforge.__version__
    assert info["torch"].startswith("2.13.0") and info["cuda"] is False
    assert info["onnxruntime"] == "1.32.0"
    assert info["openvino"].startswith("2026.4.1")
    assert info["mlflow"] == "3.17.2"
    assert info["kfp"] == "2.17.0"


def test_image_labels(image: str) -> None:
    _, prefix, _ = _engine()
    result = _run(
        [*prefix, "image", "inspect", "--format", "{{json .Config.Labels}}", image],
        env=_podman_env(),
    )
    assert result.returncode == 0, result.stderr
    labels = json.loads(result.stdout)
    import nasforge

    assert labels["org.opencontainers.image.version"] == nasforge.__version__
    assert labels["org.opencontainers.image.title"] == "nasforge-cpu"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_prepare_data_in_container(image: str, data_dir: Path) -> None:
    _stage(image, data_dir, "prepare-data")
    prepared = data_dir / "prepared"
    meta = json.loads((prepared / "meta.json").read_text())
    import numpy as np

    with np.load(prepared / "dataset.npz", allow_pickle=False) as arrays:
        labels = [arrays[k] for k in arrays.files if k.startswith("y_")]
        images = [arrays[k] for k in arrays.files if k.startswith("x_")]
    assert meta["source"] == "digits"
    assert len(meta["classes"]) == 10
    assert meta["input_shape"][-2:] == [8, 8]  # digits are 8x8
    assert sum(meta["counts"].values()) == 10 * 12  # max_per_class honoured
    assert sum(len(y) for y in labels) == 10 * 12
    assert all(x.shape[1:] == tuple(meta["input_shape"]) for x in images)


def test_export_in_container(image: str, data_dir: Path) -> None:
    if not (data_dir / "prepared" / "meta.json").is_file():
        _stage(image, data_dir, "prepare-data")
    for stage in ("search", "train", "prune", "qat", "export"):
        _stage(image, data_dir, stage)
    exported = data_dir / "exported"
    onnx_files = sorted(exported.rglob("*.onnx"))
    ir_files = sorted(exported.rglob("*.xml"))
    names = {p.name for p in onnx_files}
    assert {"fp32.onnx", "int8.onnx"} <= names, f"exported: {sorted(names)}"
    assert {p.name for p in ir_files} >= {"fp32.xml", "int8.xml"}, "OpenVINO IR missing"
    # The exported models are valid, self-contained artifacts on the host too; INT8 is QDQ.
    import numpy as np
    import onnx
    import onnxruntime as ort

    int8_ops = {node.op_type for node in onnx.load(str(exported / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= int8_ops
    session = ort.InferenceSession(str(exported / "fp32.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    (logits,) = session.run(None, {inp.name: np.zeros(shape, dtype=np.float32)})[:1]
    assert logits.shape[-1] == 10


def test_mlflow_server_runs_as_the_manifests_run_it(image: str, tmp_path: Path) -> None:
    """The MLflow Deployment's exact command, env and read-only root work in the image."""
    import socket
    import time
    import urllib.error
    import urllib.request

    docs = yaml.safe_load_all((REPO / "manifests" / "base" / "mlflow.yaml").read_text())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*container["command"], *container["args"]]
    for key, value in env.items():  # Kubernetes' $(VAR) expansion
        argv = [a.replace(f"$({key})", value) for a in argv]
    argv = [f"--port={port}" if a == "--port=5000" else a for a in argv]
    for sub in ("db", "artifacts"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub).chmod(0o777)
    engine, prefix, _ = _engine()
    name = f"nasforge-mlflow-test-{port}"
    z = ":Z" if engine == "podman" else ""
    start = _run(
        [
            *prefix, "run", "-d", "--rm", "--name", name, "--network", "host",
            "--read-only", "--tmpfs", "/tmp:rw,size=1g", "--tmpfs", "/home/nasforge:rw,size=64m",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "-v", f"{tmp_path / 'db'}:/mlflow/db{z}",
            "-v", f"{tmp_path / 'artifacts'}:/mlflow/artifacts{z}",
            *[x for k, v in env.items() for x in ("-e", f"{k}={v}")],
            "--entrypoint", argv[0], image, *argv[1:],
        ],
        env=_podman_env(),
    )  # fmt: skip
    assert start.returncode == 0, start.stderr

    def get(path: str, host: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if get("/health", "localhost") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = _run([*prefix, "logs", name], env=_podman_env())
                pytest.fail(
                    f"MLflow did not become healthy:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
                )
            time.sleep(2)
        api = "/api/2.0/mlflow/experiments/search?max_results=1"
        # Clients inside the cluster use the Service name; the allowed-hosts list admits it...
        assert get(api, "mlflow.nasforge-dev.svc.cluster.local:5000") == 200
        assert get(api, "mlflow:5000") == 200
        # ... and DNS-rebinding protection still rejects foreign Host headers.
        assert get(api, "attacker.example.com") == 403
        assert (tmp_path / "db" / "mlflow.db").is_file()  # SQLite landed on the volume
    finally:
        _run([*prefix, "rm", "-f", name], env=_podman_env())
