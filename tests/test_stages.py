"""Each stage function on real upstream artifacts (tiny settings, tracking off except promote)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from nasforge.errors import ConfigError
from nasforge.space.nb201 import CellSpec
from nasforge.stages.runner import execute
from tests.conftest import run_chain, tiny_params, with_tracking_db

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digits_dir):
    """Run search -> train -> prune -> qat -> export once; tests inspect each output."""
    return run_chain(tiny_params(), tmp_path_factory.mktemp("chain"), digits_dir, candidate=0)


def test_prepare_data(digits_dir):
    meta = json.loads((digits_dir / "meta.json").read_text())
    assert meta["counts"] == {"train": 1257, "val": 270, "test": 270}
    assert (digits_dir / "dataset.npz").is_file()


def test_search_writes_pareto_set_and_resumable_study(chain):
    pareto = json.loads((chain["search"] / "pareto.json").read_text())
    assert 1 <= len(pareto["candidates"]) <= 2
    assert (
        pareto["objectives"][0] == "val_error"
        and "latency_ms[onnxruntime-cpu]" in pareto["objectives"]
    )
    for c in pareto["candidates"]:
        assert CellSpec.from_arch_str(c["arch_str"]).ops == tuple(c["ops"])
        assert c["objectives"]["latency_ms[openvino-cpu]"] > 0
    history = json.loads((chain["search"] / "history.json").read_text())
    assert len(history["trials"]) == 6
    assert (chain["search"] / "study.db").is_file() and (
        chain["search"] / "supernet.safetensors"
    ).is_file()
    # no candidate is dominated by another trial
    names = pareto["objectives"]
    vals = np.array([[t["objectives"][n] for n in names] for t in history["trials"]])
    for c in pareto["candidates"]:
        if c["rank"] == 0:
            v = np.array([c["objectives"][n] for n in names])
            assert not np.any(np.all(vals <= v, axis=1) & np.any(vals < v, axis=1))


def test_search_with_hybrid_steered_by_a_darts_prior(digits_dir, tmp_path):
    """The pipeline's search stage runs the same hybrid sampler as bench-search, DARTS-steered."""
    p = tiny_params(search={"strategy": "hybrid", "prior": "darts", "darts_epochs": 1, "trials": 8})
    result = execute("search", p, tmp_path / "s", tracking=False, dataset=digits_dir)
    pareto = json.loads((tmp_path / "s" / "pareto.json").read_text())
    prior = pareto["prior"]
    assert prior["kind"] == "darts" and CellSpec.from_arch_str(prior["derived_arch_str"])
    assert len(prior["op_probabilities"]) == 6
    for probs in prior["op_probabilities"].values():
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.metrics["trials"] == 8 and result.tags["strategy"] == "hybrid"


def test_train_distils_and_improves_on_inherited_weights(chain):
    m = chain["train_result"].metrics
    assert m["val_accuracy"] > m["inherited_val_accuracy"]
    meta = json.loads((chain["train"] / "model.json").read_text())
    assert meta["candidate"] == "cand-0" and meta["history"][0]["stage"] == "train"


def test_train_tunes_hyperparameters_with_bayesian_optimization(chain):
    """BO on: each trial trains a copy; the kept model is the best trial's, scored on val."""
    p = tiny_params(train={"epochs": 1, "tune": {"enabled": True, "trials": 3, "epochs": [1, 2]}})
    out = chain["root"] / "train-bo"
    result = execute(
        "train", p, out, tracking=False, dataset=chain["data"], search=chain["search"], candidate=0
    )
    meta = json.loads((out / "model.json").read_text())
    trials = meta["hparam_trials"]
    assert len(trials) == 3 and len({t["lr"] for t in trials}) == 3
    best = max(trials, key=lambda t: t["val_accuracy"])
    m = result.metrics
    assert m["val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert m["chosen_lr"] == pytest.approx(best["lr"]) and 1 <= m["chosen_epochs"] <= 2
    assert 1e-3 <= m["chosen_lr"] <= 0.1


def test_train_rejects_missing_candidate(chain):
    with pytest.raises(ConfigError, match="candidate 7 does not exist"):
        execute(
            "train",
            chain["params"],
            chain["root"] / "t7",
            tracking=False,
            dataset=chain["data"],
            search=chain["search"],
            candidate=7,
        )
    assert not (chain["root"] / "t7").exists()


def test_prune_removes_parameters(chain):
    m = chain["prune_result"].metrics
    assert m["params"] < m["params_before"]


def test_qat_produces_int8_program(chain):
    m = chain["qat_result"].metrics
    assert 0.0 < m["test_accuracy"] <= 1.0
    meta = json.loads((chain["qat"] / "model.json").read_text())
    assert "reduce_range" in meta["quant_scheme"]


def test_export_files_parity_and_dynamic_batch(chain):
    doc = json.loads((chain["export"] / "export.json").read_text())
    for key, p in doc["parity"].items():
        assert p["top1_agreement"] >= 0.97, key
    assert doc["parity_min_top1"] == chain["params"].export.parity_min_top1
    q = onnx.load(chain["export"] / "int8.onnx")
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert (chain["export"] / "openvino" / "int8.xml").is_file() and (
        chain["export"] / "openvino" / "fp32.bin"
    ).is_file()


def test_benchmark_promote_report(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = with_tracking_db(chain["params"], tmp_path)
    benches = []
    for target in p.targets:
        out = tmp_path / f"bench-{target}"
        execute(
            "benchmark",
            p,
            out,
            tracking=False,
            dataset=chain["data"],
            exported=[chain["export"]],
            target=target,
        )
        doc = json.loads((out / "cand-0" / "benchmark.json").read_text())
        for precision in ("fp32", "int8"):
            r = doc["results"][precision]
            assert set(r["latency"]) == {"1", "4"} and r["latency"]["1"]["p50_ms"] > 0
            assert r["latency"]["4"]["throughput_ips"] > 0 and 0 < r["test_accuracy"] <= 1
            assert r["dvc_md5"].endswith(".dir")
            runtime = "openvino" if target.startswith("openvino") else "onnxruntime"
            assert r["parity"]["runtime"] == runtime and "top1_agreement" in r["parity"]
        assert doc["system"]["cpu_model"]
        benches.append(out)
    # promote needs an MLflow run to hold the registered files: tracking on, local SQLite.
    execute("promote", p, tmp_path / "promote", benchmarks=benches)
    prom = json.loads((tmp_path / "promote" / "promotion.json").read_text())
    assert [d["target"] for d in prom["decisions"]] == p.targets
    assert all(d["promoted"] for d in prom["decisions"]), [d["reason"] for d in prom["decisions"]]
    execute(
        "report",
        p,
        tmp_path / "report",
        search=chain["search"],
        promotion=tmp_path / "promote",
        benchmarks=benches,
    )
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    for target in p.targets:
        s = summary["targets"][target]
        assert (
            s["version"] == "1"
            and s["promoted"]
            and s["size_bytes"] > 0
            and s["latency_p50_ms"] > 0
            and s["rejected"] == []
        )
    html = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "onnxruntime-cpu" in html


def test_failed_stage_leaves_previous_output_untouched(chain, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    from nasforge.errors import ModelFileError

    with pytest.raises(ModelFileError):
        execute(
            "export",
            chain["params"],
            out,
            tracking=False,
            dataset=chain["data"],
            model=chain["prune"],
            quantized=Path(chain["train"]),
        )
    assert (out / "keep.txt").read_text() == "user data"
    assert not list(tmp_path.glob(".export.partial-*"))
