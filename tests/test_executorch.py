"""The ExecuTorch runtime (XNNPACK delegate): export, parity, sessions, timing, serving, pipeline.

Real ExecuTorch programs throughout: ``.pte`` files lowered to XNNPACK from a trained tiny
network on sklearn digits, loaded by ExecuTorch's runtime bindings. The end-to-end test runs
``nasforge run`` with ``targets: [onnxruntime-cpu, executorch-xnnpack-cpu]`` on tiny settings.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nasforge.bench.harness import measure, open_session, predict
from nasforge.errors import ModelFileError, TargetError
from nasforge.export.parity import check_parity
from nasforge.hardware.latency import latency_model
from nasforge.hardware.targets import get_target, list_targets
from nasforge.runtimes.base import ExportSources
from nasforge.runtimes.registry import get_runtime
from tests.compress_helpers import accuracy, digits, trained_tiny

pytest.importorskip("executorch", reason="ExecuTorch is an optional extra (nasforge[executorch])")

TARGET = "executorch-xnnpack-cpu"
MAX_BATCH = 40


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An export bundle's ExecuTorch files (FP32 and XNNPACK INT8) of a trained tiny network."""
    x, _, x_test, _ = digits()
    net = trained_tiny()
    out = tmp_path_factory.mktemp("executorch")
    sources = ExportSources(
        fp32=net,
        int8=None,  # ExecuTorch quantizes the float model by its own scheme
        # digits() images carry channels-last strides (one channel, numpy's [:, None]): programs
        # exported from such an example once expected NHWC inputs and failed on every batch
        example=torch.from_numpy(x_test[:2]),
        calibration=x[:128],
        max_batch=MAX_BATCH,
    )
    rt = get_runtime("executorch")
    exported = {p: rt.export(sources, p, out) for p in ("fp32", "int8")}
    (out / "export.json").write_text(json.dumps({"candidate": "tiny"}))
    return {"root": out, "net": net, "exported": exported}


def test_target_is_listed_and_usable_here():
    assert TARGET in list_targets() and f"{TARGET}-int8" in list_targets()
    t = get_target(TARGET)
    assert (t.runtime, t.device, t.precision, t.kind) == ("executorch", "cpu", "fp32", "runtime")
    assert t.is_available(), t.availability_problem()
    assert get_target(f"{TARGET}-int8").precision == "int8"
    rt = t.backend
    assert rt.version() and rt.layout("int8") == "executorch/int8.pte"
    assert "on the CPU" in rt.availability_problem("cuda")


def test_bundle_layout_and_quantization(bundle):
    root, ex = bundle["root"], bundle["exported"]
    assert ex["fp32"].path == root / "executorch" / "fp32.pte"
    assert ex["int8"].path == root / "executorch" / "int8.pte"
    assert ex["fp32"].reference is None and ex["fp32"].quantization is None
    # INT8 is XNNPACK's own pt2e PTQ scheme; its ONNX twin is the same converted model
    assert "XNNPACKQuantizer" in ex["int8"].quantization["method"]
    assert ex["int8"].reference is not None
    assert (root / get_runtime("executorch").onnx_twin("int8")).is_file()
    assert ex["int8"].path.stat().st_size < ex["fp32"].path.stat().st_size


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_parity_with_torch_on_the_test_split(bundle, precision):
    _, _, x_test, y_test = digits()
    ex = bundle["exported"][precision]
    ref = ex.reference if ex.reference is not None else bundle["net"]
    # batch 37 leaves a last batch of another size: the dynamic batch is exercised
    p = check_parity(ref, ex.path, x_test, runtime="executorch", batch_size=37, threads=1)
    assert p["passed"] and p["n"] == len(x_test) and p["runtime"] == "executorch"
    if precision == "fp32":
        assert p["top1_agreement"] == 1.0 and p["max_abs_diff"] < 1e-4
    # the exported model's accuracy, as the benchmark stage measures it
    logits = predict(ex.path, TARGET, x_test, batch_size=32, threads=1)
    acc = float((logits.argmax(1) == y_test).mean())
    assert abs(acc - accuracy(bundle["net"], x_test, y_test)) < 0.05


def test_sessions_take_random_batches_and_agree_with_torch(bundle):
    # A seeded sampler over batch sizes, thread counts and inputs.
    rng = random.Random(0)
    net = bundle["net"]
    for _ in range(12):
        precision = rng.choice(["fp32", "int8"])
        path = bundle["exported"][precision].path
        bs, threads = rng.randint(1, MAX_BATCH), rng.choice([1, 2])
        target = TARGET if precision == "fp32" else f"{TARGET}-int8"
        sess = open_session(path, target, bs, (1, 8, 8), threads)
        assert sess.precision == precision and sess.input_shape == (bs, 1, 8, 8)
        assert sess.executed_precision == ("fp32" if precision == "fp32" else "int8+fp32")
        x = np.random.default_rng(rng.randrange(1 << 30)).random((bs, 1, 8, 8), np.float32)
        got = sess.run(x)
        assert got.shape == (bs, 10) and np.isfinite(got).all()
        if precision == "fp32":
            with torch.no_grad():
                ref = net(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_measure_records_what_ran(bundle):
    for precision, target in (("fp32", TARGET), ("int8", f"{TARGET}-int8")):
        for bs in (1, 32):
            r = measure(bundle["exported"][precision].path, target, bs, warmup=1, repeats=3)
            assert (r.runtime, r.device, r.batch_size, r.precision) == (
                "executorch",
                "cpu",
                bs,
                precision,
            )
            assert r.p50_ms > 0 and r.runtime_version and r.input_shape == (bs, 1, 8, 8)


def test_bad_files_and_requests_fail_in_one_line(bundle, tmp_path):
    root = bundle["root"]
    fp32 = bundle["exported"]["fp32"].path
    empty = tmp_path / "empty.pte"
    empty.write_bytes(b"")
    # not UTF-8 where a program has its identifier: ExecuTorch's log of it once aborted Python
    junk = tmp_path / "junk.pte"
    junk.write_bytes(b"\x1c\x00\x00\x00\xff\xfe\xfd\xfc" + os.urandom(4096))
    cut = tmp_path / "cut.pte"
    cut.write_bytes(fp32.read_bytes()[:300])
    onnx = root / "executorch" / "int8.onnx"
    cases = [
        (tmp_path / "missing.pte", TARGET, 1, None, ModelFileError, "not found"),
        (empty, TARGET, 1, None, ModelFileError, "empty"),
        (junk, TARGET, 1, None, ModelFileError, "not an ExecuTorch program"),
        (cut, TARGET, 1, None, ModelFileError, "cannot load"),
        (onnx, TARGET, 1, None, ModelFileError, "ExecuTorch cannot read ONNX model"),
        (fp32, TARGET, MAX_BATCH + 1, None, ModelFileError, f"{MAX_BATCH} rows"),
        (fp32, TARGET, 1, (3, 8, 8), ModelFileError, "shape"),
        (fp32, f"{TARGET}-int8", 1, None, TargetError, "no quantization nodes"),
    ]
    for path, target, bs, shape, err, match in cases:
        with pytest.raises(err, match=match) as exc:
            open_session(path, target, bs, shape, 1)
        assert "\n" not in str(exc.value)


def test_export_for_timing_and_measured_latency(tmp_path):
    # The search's measured latency model and the profiler time .pte files the runtime writes.
    net = trained_tiny()
    rt = get_runtime("executorch")
    path = rt.export_for_timing(net, (1, 8, 8), tmp_path / "block.onnx", "int8")
    assert path.suffix == ".pte" and path.is_file()
    assert open_session(path, f"{TARGET}-int8", 4, None, 1).precision == "int8"
    model = latency_model(TARGET, mode="measure", threads=1, input_shape=(1, 8, 8))
    assert model.predict_ms(net, 1) > 0
    assert model.describe()["source"] == "measured"


def test_serve_finds_and_serves_the_pte(bundle):
    import urllib.request

    from nasforge.serve.process import ServerProcess
    from nasforge.serve.variants import variants_from_dir

    root = bundle["root"]
    (v,) = variants_from_dir(root, TARGET)
    assert v.path == bundle["exported"]["fp32"].path and v.name == "tiny"
    (q,) = variants_from_dir(root, f"{TARGET}-int8")
    assert q.path.suffix == ".pte" and q.path.name == "int8.pte"
    srv = ServerProcess(root, TARGET, threads=1, max_batch_size=4, switching=False)
    try:
        srv.wait_ready()
        x = np.random.default_rng(1).random((3, 1, 8, 8), np.float32)
        req = urllib.request.Request(
            srv.url + "/predict",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            doc = json.loads(r.read())
    finally:
        srv.stop()
    with torch.no_grad():
        ref = bundle["net"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(doc["outputs"]), ref, atol=1e-4, rtol=1e-4)
    assert doc["variant"] == "tiny"


@pytest.mark.slow
def test_pipeline_runs_with_the_executorch_target(tmp_path):
    """`nasforge run` with targets [onnxruntime-cpu, executorch-xnnpack-cpu] on tiny settings:
    the ExecuTorch benchmark has p50 at batch 1 and 32 and the exported models' accuracy, both
    precisions exported, parity-checked and benchmarked, and a champion is promoted."""
    from tests.conftest import TINY

    params = json.loads(json.dumps(TINY))
    params["targets"] = ["onnxruntime-cpu", TARGET]
    params["search"].update(trials=3, max_candidates=1)
    params["benchmark"]["batch_sizes"] = [1, 32]
    params["dvc_candidates"] = [0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [str(Path(sys.executable).parent / "nasforge"), "run", "--params", "params.yaml"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=3600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((tmp_path / "runs" / "latest" / "summary.json").read_text())
    assert summary["targets"][TARGET]["promoted"], summary["targets"][TARGET]
    (export_json,) = (tmp_path / "runs" / "kfp-local").rglob("export/**/export.json")
    export = json.loads(export_json.read_text())
    for precision in ("fp32", "int8"):
        assert export["files"][f"executorch/{precision}"] == f"executorch/{precision}.pte"
        assert export["parity"][f"executorch/{precision}"]["passed"]
    benchmarks = [
        json.loads(p.read_text())
        for p in (tmp_path / "runs" / "kfp-local").rglob("benchmark.json")
        if "collect" not in p.parts
    ]
    (bench,) = [b for b in benchmarks if b["target"]["name"] == TARGET]
    for precision in ("fp32", "int8"):
        res = bench["results"][precision]
        assert set(res["latency"]) == {"1", "32"}
        for bs in ("1", "32"):
            lat = res["latency"][bs]
            assert lat["p50_ms"] > 0 and lat["runtime"] == "executorch"
            assert lat["precision"] == precision
        assert 0.0 < res["test_accuracy"] <= 1.0
        assert res["files"] == [f"model/{precision}/{precision}.pte"]
    assert "XNNPACKQuantizer" in bench["results"]["int8"]["quantization"]["method"]
