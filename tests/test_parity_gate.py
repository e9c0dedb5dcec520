"""Export parity as a promotion gate: check_parity's threshold, benchmark carrying parity, and
promote / summary / report rejecting a model whose export disagrees with its torch model."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nasforge.config import Params, load_params, params_from_dict
from nasforge.data.prepared import load_prepared
from nasforge.errors import ConfigError
from nasforge.export.onnx import export_fp32
from nasforge.export.parity import PARITY_TOP1, check_parity
from nasforge.report.html import render
from nasforge.stages.export import EXPORT_JSON, FILES
from nasforge.stages.report import build_summary
from nasforge.stages.runner import execute
from tests.conftest import REPO, tiny_params, with_tracking_db

ARCH = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|none~0|none~1|avg_pool_3x3~2|"
TARGET = "onnxruntime-cpu"


def _linear(x: np.ndarray, y: np.ndarray, steps: int) -> nn.Module:
    """A linear classifier trained for ``steps`` full-batch steps (0: as initialised)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(x.shape[1:])), 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return net.eval()


def _export_folder(root: Path, candidate: str, net: nn.Module, x: np.ndarray, top1: float) -> Path:
    """An export-stage folder for ``net``: its ONNX file (also standing for the INT8 one) and an
    export.json whose onnxruntime parity is ``top1`` for both precisions."""
    d = root / candidate
    d.mkdir(parents=True)
    export_fp32(net, torch.from_numpy(x[:2]), d / FILES[("onnxruntime", "fp32")])
    shutil.copy(d / FILES[("onnxruntime", "fp32")], d / FILES[("onnxruntime", "int8")])
    parity = {
        f"{rt}/{pr}": {
            "top1_agreement": top1,
            "max_abs_diff": 0.5 if top1 < 1 else 1e-6,
            "n": len(x),
            "runtime": rt,
            "passed": top1 >= PARITY_TOP1,
            "min_top1": PARITY_TOP1,
        }
        for rt, pr in FILES
    }
    doc = {"candidate": candidate, "arch_str": ARCH, "parity": parity, "parity_min_top1": 0.99}
    (d / EXPORT_JSON).write_text(json.dumps(doc))
    return d


@pytest.fixture(scope="module")
def bench(tmp_path_factory, digits_dir) -> Path:
    """Real benchmark-stage output on onnxruntime-cpu of two candidates: cand-0 is the more
    accurate but its export fails parity (0.9712), cand-1 is less accurate with full parity."""
    root = tmp_path_factory.mktemp("parity-gate")
    data = load_prepared(digits_dir)
    x, y = data.numpy("train")
    x_test, _ = data.numpy("test")
    accurate = _export_folder(root / "export", "cand-0", _linear(x, y, 150), x_test, 0.9712)
    weaker = _export_folder(root / "export", "cand-1", _linear(x, y, 2), x_test, 1.0)
    out = root / "bench"
    execute(
        "benchmark",
        tiny_params(targets=[TARGET], export={"parity_min_top1": 0.99}),
        out,
        tracking=False,
        dataset=digits_dir,
        exported=[accurate, weaker],
        target=TARGET,
    )
    return out


def _doc(bench: Path, candidate: str) -> dict:
    return json.loads((bench / candidate / "benchmark.json").read_text())


def _promote_and_summarize(bench: Path, tmp_path: Path, monkeypatch) -> tuple[dict, dict, str]:
    """promote (real MLflow SQLite store in ``tmp_path``), then the report's summary and page."""
    monkeypatch.chdir(tmp_path)
    p = with_tracking_db(tiny_params(targets=[TARGET], export={"parity_min_top1": 0.99}), tmp_path)
    execute("promote", p, tmp_path / "promote", benchmarks=[bench])
    prom = json.loads((tmp_path / "promote" / "promotion.json").read_text())
    summary = build_summary(p, "run-1", prom, tmp_path / "search")
    page = render(summary, {"candidates": []}, [], b"png")
    return prom, summary, page


def test_check_parity_threshold(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8).numpy()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    path = export_fp32(net, torch.from_numpy(x[:2]), tmp_path / "m.onnx")
    same = check_parity(net, path, x)
    assert same["top1_agreement"] == 1.0 and same["passed"] and same["min_top1"] == PARITY_TOP1
    assert check_parity(net, path, x, min_top1=1.0)["passed"]  # the bar is inclusive
    # A reference that disagrees on part of the inputs: logits with class 0 boosted.
    logits = net(torch.from_numpy(x)).detach()
    boost = float(torch.quantile(logits.max(1).values - logits[:, 0], 0.5))

    def ref(t: torch.Tensor) -> torch.Tensor:
        out = net(t).clone()
        out[:, 0] += boost
        return out

    got = check_parity(ref, path, x)
    a = got["top1_agreement"]
    assert 0.2 < a < PARITY_TOP1 and not got["passed"]
    assert check_parity(ref, path, x, min_top1=a)["passed"]
    low = check_parity(ref, path, x, min_top1=a + 1 / len(x))
    assert not low["passed"] and low["min_top1"] == pytest.approx(a + 1 / len(x))


def test_parity_threshold_is_configured():
    assert Params().export.parity_min_top1 == 0.99
    assert load_params(REPO / "params.yaml").export.parity_min_top1 == 0.99
    assert params_from_dict({"export": {"parity_min_top1": 0.95}}).export.parity_min_top1 == 0.95
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="export.parity_min_top1"):
            params_from_dict({"export": {"parity_min_top1": bad}})


def test_benchmark_records_parity_of_the_runtime_measured(bench):
    for candidate, top1 in (("cand-0", 0.9712), ("cand-1", 1.0)):
        for precision in ("fp32", "int8"):
            parity = _doc(bench, candidate)["results"][precision]["parity"]
            assert parity["runtime"] == "onnxruntime"
            assert parity["top1_agreement"] == top1 and parity["min_top1"] == PARITY_TOP1
            assert parity["passed"] is (top1 >= PARITY_TOP1) and "max_abs_diff" in parity


def test_promote_skips_more_accurate_candidate_failing_parity(bench, tmp_path, monkeypatch):
    acc = {c: _doc(bench, c)["results"]["int8"]["test_accuracy"] for c in ("cand-0", "cand-1")}
    assert acc["cand-0"] > acc["cand-1"], acc  # without the gate, cand-0 would be chosen
    prom, summary, page = _promote_and_summarize(bench, tmp_path, monkeypatch)
    (d,) = prom["decisions"]
    assert d["promoted"] and d["version"] == "1" and d["challenger"]["candidate"] == "cand-1"
    reason = "parity top-1 0.9712 < 0.99 (onnxruntime/int8)"
    rejected = {"candidate": "cand-0", "precision": "int8", "gate": "parity", "reason": reason}
    assert d["rejected"] == [rejected]
    s = summary["targets"][TARGET]
    assert s["candidate"] == "cand-1" and s["promoted"] and str(s["champion_version"]) == "1"
    assert s["rejected"] == [rejected]
    assert html.escape(f"cand-0/int8: {reason}") in page  # per-target table


def test_promote_without_parity_measurement_registers_no_champion(bench, tmp_path, monkeypatch):
    """cand-0 fails parity; cand-1's benchmark.json predates the gate (no parity): no champion."""
    old = tmp_path / "bench"
    shutil.copytree(bench, old)
    f = old / "cand-1" / "benchmark.json"
    doc = json.loads(f.read_text())
    for r in doc["results"].values():
        del r["parity"]
    f.write_text(json.dumps(doc))
    prom, summary, page = _promote_and_summarize(old, tmp_path, monkeypatch)
    (d,) = prom["decisions"]
    assert not d["promoted"] and d["version"] is None and d["challenger"] is None
    assert "parity top-1 0.9712 < 0.99" in d["reason"]
    assert "cand-1/int8: no parity measurement" in d["reason"]
    s = summary["targets"][TARGET]
    assert not s["promoted"] and s["champion_version"] is None
    assert [(x["candidate"], x["gate"], x["reason"]) for x in s["rejected"]] == [
        ("cand-0", "parity", "parity top-1 0.9712 < 0.99 (onnxruntime/int8)"),
        ("cand-1", "parity", "no parity measurement"),
    ]
    assert "cand-1/int8: no parity measurement" in page
