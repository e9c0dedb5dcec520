"""The promotion gate and MLflow-native registry versions.

Rules and statistics are tested over random inputs; the gate itself against a real
`mlflow server`: identical models never move the champion alias (and byte-identical ones are not
registered again) over 20 promotions, a clearly better model (more accurate, or genuinely faster:
far fewer channels) always does, and the champion is an MLflow model that
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nasforge.bench.harness import predict
from nasforge.config import PromoteParams, params_from_dict
from nasforge.data.prepared import load_prepared
from nasforge.errors import ConfigError
from nasforge.export.onnx import export_fp32
from nasforge.export.openvino import to_openvino_ir
from nasforge.hardware.targets import get_target
from nasforge.serve.variants import variants_from_registry
from nasforge.tracking import gate
from nasforge.tracking.gate import GateSettings, beats, compare_rounds
from nasforge.tracking.mlflow_model import content_sha256, download_version, runtime_file_in
from nasforge.tracking.mlflow_runs import client, open_parent_run, stage_run
from nasforge.tracking.registry import EVIDENCE_TAG, Challenger, register_and_promote
from tests.conftest import REPO

TARGET = "onnxruntime-cpu"
ALIAS = "champion-onnxruntime-cpu"
SHAPE = (3, 32, 32)


# ------------------------------------------------------------------------------ rules, unit


class _C:
    def __init__(self, acc: float, lat: float) -> None:
        self.accuracy, self.latency_p50_ms = acc, lat


accs = st.floats(0.0, 1.0, allow_nan=False)
lats = st.floats(0.001, 100.0, allow_nan=False)
tols = st.floats(0.0, 0.5, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(accs, lats, accs, lats, st.floats(0.0, 0.1), tols, st.floats(0.0, 1.0))
def test_recorded_gate_is_antisymmetric_and_monotone(a1, l1, a2, l2, acc_tol, lat_tol, floor):
    c, inc = _C(a1, l1), {"accuracy": a2, "latency_p50_ms": l2}
    won = beats(c, inc, acc_tol, lat_tol, floor)[0]
    # never both ways: one promotion would undo the other
    assert not (won and beats(_C(a2, l2), {"accuracy": a1, "latency_p50_ms": l1},
                                acc_tol, lat_tol, floor)[0])  # fmt: skip
    # the same model measured the same never wins
    assert not beats(_C(a2, l2), inc, acc_tol, lat_tol, floor)[0]
    if won:  # more accurate or faster never turns a win into a loss
        assert beats(_C(min(1.0, a1 + 0.01), l1), inc, acc_tol, lat_tol, floor)[0]
        assert beats(_C(a1, l1 * 0.9), inc, acc_tol, lat_tol, floor)[0]
    # below the floor latency is a tie: only accuracy decides
    if abs(l1 - l2) < floor:
        assert won == (a1 > a2 + gate.ACC_EPS)


def test_recorded_gate_issue_examples():
    s = GateSettings()
    inc = {"accuracy": 0.9259, "latency_p50_ms": 0.124}
    # the byte-identical model re-measured 0.078 ms was "over 10% faster": below the floor, a tie
    assert not beats(_C(0.9259, 0.078), inc, 0.005, 0.1, s.latency_floor_ms)[0]
    # 5.6 points more accurate and 0.010 ms slower: a tie on latency, accuracy wins
    assert beats(_C(0.9815, 0.134), inc, 0.005, 0.1, s.latency_floor_ms)[0]


def _rounds(rng: random.Random, n: int, base: float, noise: float) -> list[float]:
    return [base * (1 + noise * rng.random()) for _ in range(n)]


def test_compare_rounds_over_random_series():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(5, 40)
        base = rng.uniform(0.01, 20.0)
        s = GateSettings(
            latency_tolerance=rng.uniform(0.0, 0.3),
            latency_floor_ms=rng.choice([0.0, 0.05, 1.0]),
            confidence=rng.choice([0.8, 0.9, 0.95, 0.99]),
        )
        champ = _rounds(rng, n, base, rng.uniform(0, 0.3))
        factor = rng.choice([0.3, 0.5, 1.0, 2.0, 3.0])
        chall = [v * factor for v in champ]  # exactly proportional: a known ratio
        cmp = compare_rounds(champ, chall, s)
        for key in ("champion", "challenger"):
            lo, hi = cmp[f"{key}_ci_ms"]
            assert lo <= cmp[f"{key}_ms"] <= hi
        assert cmp["ratio"] == pytest.approx(factor) and cmp["ratio_ci"] == pytest.approx(
            [factor, factor]
        )
        flipped = compare_rounds(chall, champ, s)["latency_verdict"]
        swap = {"faster": "slower", "slower": "faster"}
        assert flipped == swap.get(cmp["latency_verdict"], cmp["latency_verdict"])
        diff = abs(cmp["difference_ms"])
        if diff < s.latency_floor_ms:
            assert cmp["latency_verdict"] == gate.TIE
        elif factor < 1 - s.latency_tolerance:
            assert cmp["latency_verdict"] == gate.FASTER
        elif factor == 1.0:
            assert cmp["latency_verdict"] in (gate.TIE, gate.WITHIN)
        # noise in both directions: the interval is wide and holds the point estimate
        noisy = [v * (1 + rng.uniform(-0.5, 0.5)) for v in chall]
        c2 = compare_rounds(champ, noisy, s)
        assert c2["ratio_ci"][0] <= c2["ratio"] <= c2["ratio_ci"][1]


def test_compare_rounds_needs_paired_rounds():
    with pytest.raises(ValueError, match="paired"):
        compare_rounds([1.0, 2.0], [1.0], GateSettings())


def test_promote_settings_are_typed_and_documented():
    p = params_from_dict({"promote": {"latency_floor_ms": 0.1, "rounds": 7}})
    assert GateSettings.from_params(p).latency_floor_ms == 0.1 and p.promote.rounds == 7
    for field, bad in (("latency_floor_ms", -1), ("rounds", 2), ("confidence", 1.0),
                       ("repeats", 0), ("latency_tolerance", 1.5), ("warmup", "lots")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"promote.{field}"):
            params_from_dict({"promote": {field: bad}})
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())["promote"]
    assert set(shipped) == set(PromoteParams.model_fields)
    readme = (REPO / "README.md").read_text()
    assert all(f"promote.{k}" in readme or f"{k}:" in readme for k in PromoteParams.model_fields)


# ------------------------------------------------------------------------- models and server


def _net(channels: int, seed: int) -> nn.Module:
    """Two 3x3 convolutions of ``channels`` at 32x32 and a classifier (cost ~ channels^2)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    ).eval()


def _folder(root: Path, name: str, net: nn.Module) -> Path:
    d = root / name / "model" / "fp32"
    d.mkdir(parents=True)
    export_fp32(net, torch.zeros(2, *SHAPE), d / "fp32.onnx")
    return d


def _copy_with_other_bytes(src: Path, dest: Path, i: int) -> Path:
    """The same network and weights, saved with a different doc string: other bytes, same model."""
    m = onnx.load(str(src / "fp32.onnx"))
    m.doc_string = f"copy {i}"
    dest.mkdir(parents=True)
    onnx.save(m, str(dest / "fp32.onnx"))
    return dest


def _challenger(files: Path, acc: float, candidate: str = "cand") -> Challenger:
    return Challenger(TARGET, files, acc, 1.0, 100, "fp32", candidate, "arch")


def _champion(uri: str, name: str) -> str:
    return str(client(uri).get_model_version_by_alias(name, ALIAS).version)


#: The gate's defaults, with the threads the machine can give.
SETTINGS = GateSettings(threads=2)


@pytest.mark.slow
def test_identical_artifact_is_never_registered_again(mlflow_server, tmp_path):
    uri, name = mlflow_server, f"same-{tmp_path.name}"
    files = _folder(tmp_path, "wide", _net(32, 0))
    with stage_run(uri, "gate", "promote", None) as run:
        first = register_and_promote(uri, run.run_id, name, _challenger(files, 0.9), 0.005, 0.1)
        assert first.promoted and first.registered and first.version == "1"
        for _ in range(20):
            d = register_and_promote(uri, run.run_id, name, _challenger(files, 0.9), 0.005, 0.1)
            assert not d.promoted and not d.registered and d.identical_to == "1", d.reason
            assert d.reason.startswith("identical to champion v1")
            assert d.evidence["sha256"] == content_sha256(files)
            assert _champion(uri, name) == "1"
    assert len(client(uri).search_model_versions(f"name='{name}'")) == 1


@pytest.mark.slow
def test_identical_models_never_move_the_alias(mlflow_server, tmp_path):
    """20 promotions of the same network (other bytes each time, so each is registered and timed
    side by side against the champion) never move the alias."""
    uri, name = mlflow_server, f"twins-{tmp_path.name}"
    src = _folder(tmp_path, "wide", _net(48, 0))
    with stage_run(uri, "gate", "promote", None) as run:
        register_and_promote(uri, run.run_id, name, _challenger(src, 0.9), 0.005, 0.1, SETTINGS)
        for i in range(20):
            twin = _copy_with_other_bytes(src, tmp_path / f"twin-{i}", i)
            d = register_and_promote(
                uri, run.run_id, name, _challenger(twin, 0.9), 0.005, 0.1, SETTINGS
            )
            ev = d.evidence
            assert d.registered and not d.promoted, d.reason
            assert ev["method"] == "side-by-side" and ev["rounds"] == SETTINGS.rounds
            assert ev["latency_verdict"] in (gate.TIE, gate.WITHIN), d.reason
            assert _champion(uri, name) == "1"
    tags = client(uri).get_model_version(name, "21").tags
    ev = json.loads(tags[EVIDENCE_TAG])
    assert (
        ev["champion"]["version"] == "1" and ev["champion"]["sha256"] != ev["challenger"]["sha256"]
    )
    for side in ("champion", "challenger"):
        lo, hi = ev[side]["latency_ci_ms"]
        assert lo <= ev[side]["latency_ms"] <= hi and ev[side]["accuracy"] == 0.9
    assert len(ev["round_ms"]["champion"]) == SETTINGS.rounds
    assert ev["machine"]["cpu_model"] and ev["runtime"].startswith("onnxruntime")
    assert tags["nasforge.decision"] == "kept-incumbent" and tags["nasforge.verdict"] == "loses"


@pytest.mark.slow
def test_clearly_better_model_always_moves_the_alias(mlflow_server, tmp_path):
    uri = mlflow_server
    wide = _folder(tmp_path, "wide", _net(48, 0))
    narrow = _folder(tmp_path, "narrow", _net(4, 1))  # ~1/150 of the multiply-adds
    with stage_run(uri, "gate", "promote", None) as run:
        for i in range(5):
            # genuinely faster at the same accuracy
            name = f"faster-{tmp_path.name}-{i}"
            register_and_promote(uri, run.run_id, name, _challenger(wide, 0.9), 0.005, 0.1)
            d = register_and_promote(uri, run.run_id, name, _challenger(narrow, 0.9), 0.005, 0.1)
            assert d.promoted and d.evidence["latency_verdict"] == gate.FASTER, d.reason
            assert d.evidence["ratio_ci"][1] < 0.9 and _champion(uri, name) == "2"
            assert d.reason.startswith("beats champion v1: faster")
            # more accurate at the same speed (the same network, retrained: other weights)
            name = f"accurate-{tmp_path.name}-{i}"
            other = _folder(tmp_path / f"a{i}", "wide", _net(48, 2 + i))
            register_and_promote(uri, run.run_id, name, _challenger(wide, 0.90), 0.005, 0.1)
            d = register_and_promote(uri, run.run_id, name, _challenger(other, 0.93), 0.005, 0.1)
            assert d.promoted and _champion(uri, name) == "2", d.reason
            assert d.evidence["latency_verdict"] != gate.SLOWER


def _digits_model(digits_dir: Path, root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A linear classifier trained on digits, exported; the folder and the test split."""
    data = load_prepared(digits_dir)
    x, y = data.numpy("train")
    x_test, y_test = data.numpy("test")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(x.shape[1:])), 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    d = root / "digits" / "model" / "fp32"
    d.mkdir(parents=True)
    export_fp32(net.eval(), torch.from_numpy(x[:2]), d / "fp32.onnx")
    return d, x_test, y_test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_champion_is_an_mlflow_model_pyfunc_and_serve(mlflow_server, digits_dir, tmp_path):
    import mlflow

    uri = mlflow_server
    name = "nasforge-onnxruntime-cpu"
    files, x_test, y_test = _digits_model(digits_dir, tmp_path)
    logits = predict(files / "fp32.onnx", TARGET, x_test, threads=2)
    acc = float((logits.argmax(1) == y_test).mean())
    parent = open_parent_run(uri, "gate", "p", {})
    with stage_run(uri, "gate", "promote", parent) as run:
        d = register_and_promote(uri, run.run_id, name, _challenger(files, acc), 0.005, 0.1)
    assert d.promoted
    mlflow.set_tracking_uri(uri)
    model_uri = f"models:/{name}@{ALIAS}"
    info = mlflow.models.get_model_info(model_uri)
    assert "onnx" in info.flavors and "python_function" in info.flavors
    assert info.signature.inputs.inputs[0].shape == (-1, *x_test.shape[1:])
    assert info.saved_input_example_info is not None
    run_outputs = client(uri).get_run(run.run_id).outputs.model_outputs
    assert [m.model_id for m in run_outputs] == [info.model_id]
    model = mlflow.pyfunc.load_model(model_uri)
    out = np.asarray(next(iter(model.predict(x_test).values())))
    np.testing.assert_allclose(out, logits, rtol=1e-4, atol=1e-4)
    assert float((out.argmax(1) == y_test).mean()) == acc

    port = _free_port()
    bin_dir = Path(sys.executable).parent  # as with an activated venv: it runs `uvicorn`
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    exe = bin_dir / "mlflow"
    server = subprocess.Popen(
        [exe, "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"mlflow models serve exited: {server.stderr.read()[-2000:]}")
                if time.time() > deadline:
                    pytest.fail("mlflow models serve did not answer /ping in 240 s")
                time.sleep(1)
        body = json.dumps({"inputs": x_test[:8].tolist()}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            answer = json.loads(resp.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    served = np.asarray(next(iter(answer["predictions"].values())))
    np.testing.assert_allclose(served, logits[:8], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_openvino_version_carries_its_ir_and_is_timed_on_openvino(mlflow_server, tmp_path):
    uri, target = mlflow_server, "openvino-cpu"
    name = f"nasforge-ov-{tmp_path.name}"
    folders = []
    for tag, channels in (("a", 16), ("b", 16)):
        d = _folder(tmp_path, tag, _net(channels, ord(tag)))
        to_openvino_ir(d / "fp32.onnx", d / "fp32.xml")
        folders.append(d)
    with stage_run(uri, "gate", "promote", None) as run:
        for d, acc in zip(folders, (0.9, 0.9), strict=True):
            ch = Challenger(target, d, acc, 1.0, 100, "fp32", d.parent.parent.name, "arch")
            last = register_and_promote(uri, run.run_id, name, ch, 0.005, 0.1)
    assert not last.promoted and last.evidence["method"] == "side-by-side"
    assert last.evidence["runtime"].startswith("openvino")
    local = download_version(uri, name, "1", tmp_path / "dl")
    assert (local / "MLmodel").is_file() and (local / "model.onnx").is_file()
    assert sorted(p.name for p in (local / "extra_files").iterdir()) == ["fp32.bin", "fp32.xml"]
    assert runtime_file_in(local, "openvino") == local / "extra_files" / "fp32.xml"


@pytest.mark.slow
def test_serve_registry_picks_the_openvino_ir(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    d = _folder(tmp_path, "a", _net(8, 0))
    to_openvino_ir(d / "fp32.onnx", d / "fp32.xml")
    with stage_run(uri, "serve", "promote", None) as run:
        ch = Challenger("openvino-cpu", d, 0.9, 1.0, 100, "fp32", "a", "arch")
        register_and_promote(uri, run.run_id, "nasforge-openvino-cpu", ch, 0.005, 0.1)
    (spec,) = variants_from_registry(uri, "openvino-cpu", tmp_path / "cache")
    assert spec.champion and spec.path.name == "fp32.xml" and spec.path.parent.name == "extra_files"


@pytest.mark.slow
def test_target_that_cannot_run_here_falls_back_to_recorded_latencies(tmp_path):
    target = "tensorrt-gpu"
    if get_target(target).is_available():
        pytest.skip("a GPU is present: the side-by-side path applies")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "nasforge-tensorrt-gpu"
    with stage_run(uri, "gate", "promote", None) as run:
        for tag, acc, lat in (("a", 0.90, 2.0), ("b", 0.90, 1.0)):
            d = _folder(tmp_path, tag, _net(8, ord(tag)))
            ch = Challenger(target, d, acc, lat, 100, "fp32", tag, "arch")
            last = register_and_promote(uri, run.run_id, name, ch, 0.005, 0.1)
    ev = last.evidence
    assert (
        ev["method"] == "recorded"
        and "tensorrt-gpu is not available here" in ev["not_timed_because"]
    )
    assert last.promoted and ev["latency_verdict"] == gate.FASTER  # 2.0 -> 1.0 ms recorded
    assert "recorded benchmark latencies" in last.reason
    tags = client(uri).get_model_version(name, last.version).tags
    assert tags["nasforge.gate.method"] == "recorded"


def _export(root: Path, candidate: str, net: nn.Module, x: np.ndarray) -> Path:
    """An export-stage folder: ONNX (also standing for INT8), OpenVINO IR, full parity."""
    from nasforge.stages.export import EXPORT_JSON, FILES

    d = root / candidate
    (d / "openvino").mkdir(parents=True)
    export_fp32(net, torch.from_numpy(x[:2]), d / "fp32.onnx")
    (d / "int8.onnx").write_bytes((d / "fp32.onnx").read_bytes())
    for precision in ("fp32", "int8"):
        to_openvino_ir(d / f"{precision}.onnx", d / "openvino" / f"{precision}.xml")
    parity = {
        f"{rt}/{pr}": {"top1_agreement": 1.0, "max_abs_diff": 0.0, "n": len(x), "passed": True,
                       "min_top1": 0.99}
        for rt, pr in FILES
    }  # fmt: skip
    (d / EXPORT_JSON).write_text(json.dumps({"candidate": candidate, "arch_str": "arch",
                                             "parity": parity, "parity_min_top1": 0.99}))  # fmt: skip
    return d


@pytest.mark.slow
def test_promote_stage_reruns_identical_then_times_a_new_model(digits_dir, tmp_path, monkeypatch):
    """The promote stage over real benchmark output, for an ONNX Runtime and an OpenVINO target:
    the same benchmark promoted again registers nothing ("identical to champion v1"); a retrained
    model is timed side by side with the champion on each runtime, evidence in promotion.json,
    summary.json and the version's tags."""
    from nasforge.stages.report import build_summary
    from nasforge.stages.runner import execute
    from tests.conftest import tiny_params, with_tracking_db

    monkeypatch.chdir(tmp_path)
    targets = ["onnxruntime-cpu", "openvino-cpu"]
    p = with_tracking_db(
        tiny_params(targets=targets, promote={"precision": "fp32", "rounds": 6, "repeats": 5},
                    benchmark={"batch_sizes": [1], "warmup": 2, "repeats": 5}),
        tmp_path,
    )  # fmt: skip
    data = load_prepared(digits_dir)
    x, y = data.numpy("train")

    def bench(tag: str, steps: int) -> list[Path]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
        exported = _export(tmp_path / f"export-{tag}", "cand-0", net.eval(), x)
        outs = []
        for target in targets:
            out = tmp_path / f"bench-{tag}-{target}"
            execute("benchmark", p, out, tracking=False, dataset=digits_dir, exported=[exported],
                    target=target)  # fmt: skip
            outs.append(out)
        return outs

    def promote(benches: list[Path], name: str) -> dict:
        execute("promote", p, tmp_path / name, benchmarks=benches)
        return json.loads((tmp_path / name / "promotion.json").read_text())

    first = bench("a", 5)
    assert [d["version"] for d in promote(first, "p1")["decisions"]] == ["1", "1"]
    again = promote(first, "p2")
    assert again["gate"]["rounds"] == 6 and again["gate"]["latency_floor_ms"] == 0.05
    for d in again["decisions"]:
        assert not d["registered"] and d["identical_to"] == "1" and not d["promoted"]
        assert d["reason"].startswith("identical to champion v1")
    summary = build_summary(p, "run", again, tmp_path / "search")
    assert all(
        s["version"] == "1" and s["registered"] is False for s in summary["targets"].values()
    )
    newer = promote(bench("b", 150), "p3")  # trained longer: more accurate
    for d in newer["decisions"]:
        ev = d["evidence"]
        assert d["registered"] and d["version"] == "2" and ev["method"] == "side-by-side"
        assert ev["runtime"].split()[0] == ("openvino" if d["target"] == "openvino-cpu"
                                            else "onnxruntime")  # fmt: skip
        assert ev["champion"]["version"] == "1" and len(ev["round_ms"]["challenger"]) == 6
        assert d["promoted"] == (ev["challenger"]["accuracy"] > ev["champion"]["accuracy"])
        tags = client(p.tracking.uri).get_model_version(d["model_name"], "2").tags
        assert json.loads(tags[EVIDENCE_TAG])["ratio_ci"] == ev["ratio_ci"]
    summary = build_summary(p, "run", newer, tmp_path / "search")
    gates = [s["gate"] for s in summary["targets"].values()]
    assert all(g["method"] == "side-by-side" and "round_ms" not in g for g in gates)
