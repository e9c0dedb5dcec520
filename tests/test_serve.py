"""`nasforge serve`: a real LitServe server on 127.0.0.1 over tiny exported ONNX models."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nasforge.errors import ModelFileError
from nasforge.export.onnx import export_fp32
from nasforge.serve.process import ServerProcess
from nasforge.serve.variants import variants_from_dir

SHAPE = (3, 8, 8)


def _net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # The wide net gets two extra convolutions so its latency is clearly above the narrow one's
    # (variants are ordered by latency measured at start-up).
    extra = [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()] * 2 if width >= 32 else []
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        *extra,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    ).eval()


def _candidate(root: Path, name: str, width: int, acc: float) -> nn.Module:
    """A benchmark-stage candidate folder: benchmark.json + model/fp32/fp32.onnx."""
    net = _net(width, seed=width)
    d = root / name
    (d / "model" / "fp32").mkdir(parents=True)
    export_fp32(net, torch.zeros(2, *SHAPE), d / "model" / "fp32" / "fp32.onnx")
    doc = {"candidate": name, "results": {"fp32": {"test_accuracy": acc}}}
    (d / "benchmark.json").write_text(json.dumps(doc))
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    small = _candidate(root, "small", 4, 0.80)
    big = _candidate(root, "big", 64, 0.90)
    return root, {"small": small, "big": big}


def _request(url: str, body: bytes | None = None, timeout: float = 20) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, {"raw": raw.decode(errors="replace")}


def settled_metrics(url: str, done, timeout_s: float = 10) -> dict:
    """``/metrics`` once ``done(metrics)`` holds: the worker publishes at most every 0.1 s."""
    end = time.monotonic() + timeout_s
    while True:
        _, m = _request(url + "/metrics")
        if done(m) or time.monotonic() > end:
            return m
        time.sleep(0.05)


class Server(ServerProcess):
    """`serve()` on ONNX Runtime with one thread, in its own process group."""

    def __init__(self, source: Path, **kwargs):
        super().__init__(source, "onnxruntime-cpu", **{"threads": 1, **kwargs})


@pytest.fixture(scope="module")
def server(models):
    root, _ = models
    srv = Server(
        root,
        max_batch_size=4,
        max_queue_delay_ms=2,
        slo_ms=500,
        switching=False,
        max_body_bytes=200_000,
        max_items_per_request=8,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_variants_from_dir_finds_candidates(models):
    root, _ = models
    specs = variants_from_dir(root, "onnxruntime-cpu")
    assert sorted(s.name for s in specs) == ["big", "small"]
    assert {s.name: s.accuracy for s in specs} == {"big": 0.90, "small": 0.80}
    with pytest.raises(ModelFileError, match="no int8 onnxruntime model"):
        variants_from_dir(root, "onnxruntime-cpu-int8")


def test_predict_matches_torch(server, models):
    _, nets = models
    x = np.random.default_rng(0).standard_normal((3, *SHAPE)).astype(np.float32)
    status, doc = _request(server.url + "/predict", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200, doc
    # Switching off: the most accurate variant ("big") serves every request.
    assert doc["variant"] == "big"
    ref = nets["big"](torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.array(doc["outputs"]), ref, rtol=1e-4, atol=1e-4)
    assert doc["classes"] == ref.argmax(1).tolist()


def test_malformed_requests_get_4xx_and_server_survives(server):
    good = np.zeros((1, *SHAPE)).tolist()
    cases = {
        "not json": (b"{this is not json", 400, "not valid JSON"),
        "no inputs key": (json.dumps({"x": good}).encode(), 400, '"inputs"'),
        "wrong shape": (
            json.dumps({"inputs": np.zeros((1, 3, 4, 4)).tolist()}).encode(),
            422,
            "shape [3, 8, 8]",
        ),
        "ragged": (json.dumps({"inputs": [[1, 2], [3]]}).encode(), 422, "ragged"),
        "non-numeric": (json.dumps({"inputs": [[["a"] * 8] * 8] * 3}).encode(), 422, "numbers"),
        "booleans": (json.dumps({"inputs": [[[True] * 8] * 8] * 3}).encode(), 422, "numbers"),
        "oversized": (
            json.dumps({"inputs": good, "pad": "x" * 300_000}).encode(),
            413,
            "over 200000 bytes",
        ),
        "too many samples": (
            json.dumps({"inputs": np.zeros((9, *SHAPE)).tolist()}).encode(),
            413,
            "at most 8",
        ),
    }
    for name, (body, code, msg) in cases.items():
        status, doc = _request(server.url + "/predict", body)
        assert status == code, (name, status, doc)
        assert msg in doc.get("error", ""), (name, doc)
    status, doc = _request(server.url + "/predict", json.dumps({"inputs": good}).encode())
    assert status == 200 and len(doc["outputs"]) == 1
    status, m = _request(server.url + "/metrics")
    assert status == 200
    assert sum(m["rejected"].values()) >= len(cases)


def test_concurrent_requests_are_batched_and_counted(server):
    from concurrent.futures import ThreadPoolExecutor

    x = np.zeros((1, *SHAPE)).tolist()
    body = json.dumps({"inputs": x}).encode()
    time.sleep(0.5)  # let the worker publish the previous tests' requests
    _, before = _request(server.url + "/metrics")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _request(server.url + "/predict", body), range(48)))
    assert all(s == 200 for s, _ in results)
    want = before.get("requests", 0) + 48
    m = settled_metrics(server.url, lambda m: m.get("requests", 0) >= want)
    assert m["requests"] - before.get("requests", 0) == 48
    sizes = {int(k): v for k, v in m["batch_sizes"].items()}
    assert max(sizes) <= 4  # max_batch_size requests of one sample each
    assert m["latency_all"]["p99_ms"] is not None
    assert m["active_variant"] == "big"
    assert m["config"]["max_batch_size"] == 4
    assert [v["name"] for v in m["config"]["variants"]] == ["small", "big"]


def test_bad_source_fails_before_serving(tmp_path):
    from nasforge.serve.server import serve

    with pytest.raises(ModelFileError, match="model folder not found"):
        serve(tmp_path / "nope", "onnxruntime-cpu")


def test_switching_moves_to_faster_variant_when_slo_is_missed(models):
    root, _ = models
    # An objective no real request can meet: the policy must step down from "big" to "small"
    # on the first batch and stay there, and the switch must show in the metrics. Batch size 1
    # also covers LitServe's unbatched loop.
    srv = Server(root, max_batch_size=1, max_queue_delay_ms=0, slo_ms=0.001, switching=True)
    try:
        srv.wait_ready()
        body = json.dumps({"inputs": np.zeros((1, *SHAPE)).tolist()}).encode()
        variants = [_request(srv.url + "/predict", body)[1]["variant"] for _ in range(5)]
        assert variants == ["small"] * 5
        m = settled_metrics(srv.url, lambda m: m.get("requests", 0) >= 5)
        assert m["switch_count"] == 1
        assert m["switches"][0]["from"] == "big" and m["switches"][0]["to"] == "small"
        assert m["active_variant"] == "small"
        assert m["samples_per_variant"] == {"small": 5}
    finally:
        srv.stop()


def _post_raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST exactly these headers (urllib adds a form Content-Type when none is given)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request("POST", "/predict", body, headers or {})
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(raw)
    except json.JSONDecodeError:
        return r.status, {"raw": raw.decode(errors="replace")}


def test_json_without_content_type_gets_200(server, models):
    _, nets = models
    x = np.random.default_rng(1).standard_normal((2, *SHAPE)).astype(np.float32)
    body = json.dumps({"inputs": x.tolist()}).encode()
    ref = nets["big"](torch.from_numpy(x)).detach().numpy()
    # No Content-Type at all, and curl -d's default (a form type LitServe would form-parse).
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}):
        status, doc = _post_raw(server.url, body, headers)
        assert status == 200, (headers, doc)
        np.testing.assert_allclose(np.array(doc["outputs"]), ref, rtol=1e-4, atol=1e-4)
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-s", "-w", "\\n%{http_code}", "-d", body.decode(), server.url + "/predict"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        doc, code = out.rsplit("\n", 1)
        assert code == "200", out
        np.testing.assert_allclose(np.array(json.loads(doc)["outputs"]), ref, atol=1e-4)


def test_deep_nesting_gets_422_before_parsing(server):
    deep = b'{"inputs": ' + b"[" * 5000 + b"0" + b"]" * 5000 + b"}"
    status, doc = _request(server.url + "/predict", deep)
    assert status == 422, doc
    assert "5001 levels" in doc["error"] and "nests 5" in doc["error"]
    # One level too deep for samples of rank 3 is refused too; the server keeps answering.
    status, doc = _request(
        server.url + "/predict", json.dumps({"inputs": np.zeros((1, 1, *SHAPE)).tolist()}).encode()
    )
    assert status == 422 and "levels" in doc["error"], doc
    good = json.dumps({"inputs": np.zeros((1, *SHAPE)).tolist()}).encode()
    assert _request(server.url + "/predict", good)[0] == 200


def test_booleans_and_nulls_get_422(server):
    x = np.zeros((1, *SHAPE)).tolist()
    for value in (True, False, None):
        mixed = json.loads(json.dumps(x))
        mixed[0][1][2][3] = value  # one literal among numbers: NumPy would read it as a number
        status, doc = _request(server.url + "/predict", json.dumps({"inputs": mixed}).encode())
        assert status == 422, (value, doc)
        assert "true/false/null" in doc["error"]


def test_non_2xx_responses_are_counted_in_metrics(server):
    time.sleep(0.2)
    _, before = _request(server.url + "/metrics")
    sent = {
        400: [b"{this is not json", b'{"inputs": [], "extra": 1}', b"\xff\xfe\x00"],
        413: [json.dumps({"inputs": np.zeros((9, *SHAPE)).tolist()}).encode()],
        422: [json.dumps({"inputs": [[1, 2], [3]]}).encode()],
    }
    for code, bodies in sent.items():
        for body in bodies:
            assert _request(server.url + "/predict", body)[0] == code
    status, _ = _post_raw(server.url, b"--x--", {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 415
    assert _request(server.url + "/nope")[0] == 404
    assert _request(server.url + "/predict")[0] == 405  # GET on a POST route
    _, after = _request(server.url + "/metrics")
    delta = {k: v - before["rejected"].get(k, 0) for k, v in after["rejected"].items()}
    assert {k: v for k, v in delta.items() if v} == {
        "400": 3,
        "404": 1,
        "405": 1,
        "413": 1,
        "415": 1,
        "422": 1,
    }


def test_non_finite_outputs_get_422_for_that_request_only(server, models):
    from concurrent.futures import ThreadPoolExecutor

    _, nets = models
    extreme = np.full((1, *SHAPE), 3e38, dtype=np.float32)  # finite, but overflows the logits
    assert not np.isfinite(nets["big"](torch.from_numpy(extreme)).detach().numpy()).all()
    normal = np.zeros((1, *SHAPE), dtype=np.float32)
    bodies = [json.dumps({"inputs": a.tolist()}).encode() for a in [extreme] + [normal] * 7]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: _request(server.url + "/predict", b), bodies))
    assert results[0][0] == 422 and "not finite" in results[0][1]["error"], results[0]
    assert all(status == 200 for status, _ in results[1:]), results[1:]


def test_run_folder_yields_one_variant_per_model(tmp_path):
    """A pipeline run folder: each model as export, per-target benchmark and collect copies."""
    from nasforge.export.openvino import to_openvino_ir

    run = tmp_path / "runs" / "kfp-local" / "nasforge-run-1"
    for i, (cand, width) in enumerate([("cand-000", 4), ("cand-001", 8)]):
        export = run / "export" / f"task-{i}" / "exported"
        export.mkdir(parents=True)
        export_fp32(_net(width, seed=width), torch.zeros(2, *SHAPE), export / "fp32.onnx")
        to_openvino_ir(export / "fp32.onnx", export / "openvino" / "fp32.xml")
        (export / "export.json").write_text(json.dumps({"candidate": cand}))
        for j, (target, files, acc) in enumerate(
            [
                ("onnxruntime-cpu", ["fp32.onnx"], 0.8 + i / 100),
                ("openvino-cpu", ["openvino/fp32.xml", "openvino/fp32.bin"], 0.7 + i / 100),
            ]
        ):
            bench = run / f"benchmark-{target}" / f"task-{i}" / "measured" / cand
            (bench / "model" / "fp32").mkdir(parents=True)
            for f in files:
                shutil.copy2(export / f, bench / "model" / "fp32" / Path(f).name)
            doc = {"target": {"name": target}, "candidate": cand}
            doc["results"] = {"fp32": {"test_accuracy": acc}}
            (bench / "benchmark.json").write_text(json.dumps(doc))
            shutil.copytree(bench, run / "collect" / f"task-{i}" / "collected" / f"part-{j}" / cand)

    specs = variants_from_dir(run, "onnxruntime-cpu")
    assert sorted((s.name, s.accuracy) for s in specs) == [("cand-000", 0.8), ("cand-001", 0.81)]
    assert all("benchmark-onnxruntime-cpu" in str(s.path) for s in specs)
    # OpenVINO: the IR copies and the ONNX files it was converted from are one model each.
    specs = variants_from_dir(run, "openvino-cpu")
    assert sorted((s.name, s.accuracy) for s in specs) == [("cand-000", 0.7), ("cand-001", 0.71)]
    assert all(s.path.suffix == ".xml" and "benchmark-openvino" in str(s.path) for s in specs)
    # A different model under a known candidate name (another run) is a variant of its own.
    other = tmp_path / "runs" / "kfp-local" / "nasforge-run-2" / "export" / "exported"
    other.mkdir(parents=True)
    export_fp32(_net(16, seed=16), torch.zeros(2, *SHAPE), other / "fp32.onnx")
    (other / "export.json").write_text(json.dumps({"candidate": "cand-000"}))
    specs = variants_from_dir(tmp_path / "runs", "onnxruntime-cpu")
    assert len(specs) == 3 and len({s.name for s in specs}) == 3
    assert sorted(s.accuracy for s in specs if s.accuracy is not None) == [0.8, 0.81]
