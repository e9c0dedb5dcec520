"""The pipeline on the macro elastic space (``space.kind: macro``): search -> train -> prune ->
qat -> export -> benchmark on digits through the stage runner, and macro model files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nasforge.errors import ConfigError, ModelFileError
from nasforge.models import load_model, read_meta, save_model
from nasforge.space.macro import MacroNetwork, MacroSpec, build_macro_network
from nasforge.stages.runner import execute
from nasforge.supernet.macro_search import macro_arch_str, progressive_phases
from nasforge.supernet.macro_supernet import ElasticChoices
from tests.conftest import run_chain, tiny_params, with_tracking_db

# A cheap corner of the space: one 3x3, expansion-3 block per stage, two widths. The largest
# network of the full space (3 blocks, 7x7, expansion 6) is ~30x slower to train on CPU.
CHEAP = {"depths": [1], "widths": [0.5, 1.0], "kernels": [3], "expands": [3], "sandwich_random": 1}


def macro_params(**overrides):
    """Tiny settings on the cheap macro corner, one thread, one runtime target."""
    sections = {
        "run": {"name": "tiny-macro", "threads": 1},
        "space": {"kind": "macro", "macro": CHEAP},
        "search": {"supernet_epochs": 6, "trials": 6, "max_candidates": 2, "lr": 0.1},
        "train": {"epochs": 3},
        "targets": ["onnxruntime-cpu"],
        "dvc_candidates": [0],
    }
    for k, v in overrides.items():
        sections[k] = {**sections.get(k, {}), **v} if isinstance(v, dict) else v
    return tiny_params(**sections)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the networks are tiny, and on a shared machine two spinning OpenMP
    threads made macro-supernet training ~8x slower in wall time than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- fast unit tests ------------------------------------------------------------------------


def test_space_kind_macro_is_validated():
    p = macro_params()
    assert p.space.kind == "macro" and p.space.macro.kernels == [3]
    with pytest.raises(ConfigError, match=r"space\.macro\.kernels"):
        macro_params(space={"macro": {"kernels": [4]}})
    with pytest.raises(ConfigError, match=r"space\.kind"):
        macro_params(space={"kind": "macr"})
    with pytest.raises(ConfigError, match=r"space\.macro\.depth: unknown field"):
        macro_params(space={"macro": {"depth": [1]}})


def test_progressive_phases_skip_dimensions_with_one_choice():
    cheap = ElasticChoices("cheap", depths=(1,), widths=(0.5, 1.0), kernels=(3,), expands=(3,))
    phases = progressive_phases(cheap)
    assert [p.name for p in phases] == ["largest", "width"]
    assert phases[0].largest() == phases[0].smallest() == cheap.largest()
    assert phases[-1].widths == (0.5, 1.0)


def _macro_meta(spec: MacroSpec, in_channels: int = 1, num_classes: int = 10) -> dict:
    return {
        "candidate": "cand-0",
        "space": "macro",
        "arch_str": macro_arch_str(spec),
        "spec": json.loads(spec.to_json()),
        "shape": {"in_channels": in_channels, "num_classes": num_classes},
        "input_shape": [in_channels, 8, 8],
    }


def test_model_json_round_trips_a_macro_model(tmp_path):
    spec = MacroSpec((1, 2, 1, 3), (0.5, 1.0, 0.75, 1.0), (3, 5, 7, 3), (3, 6, 4, 3))
    torch.manual_seed(0)
    net = build_macro_network(spec, 1, 10).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer changes the output
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_model(net, tmp_path / "m", _macro_meta(spec))
    loaded, meta = load_model(tmp_path / "m")
    assert isinstance(loaded, MacroNetwork) and loaded.spec == spec
    assert meta["arch_str"] == macro_arch_str(spec) and meta["space"] == "macro"
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    # A different spec in model.json does not fit the weights: a clear error, not a crash.
    other = _macro_meta(MacroSpec.smallest())
    (tmp_path / "m" / "model.json").write_text(json.dumps(other))
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(json.dumps({**other, "spec": {"depths": [9]}}))
    with pytest.raises(ModelFileError, match="bad architecture"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(json.dumps({**other, "space": "tree"}))
    with pytest.raises(ModelFileError, match="unknown search space"):
        read_meta(tmp_path / "m")


def test_pruned_macro_model_reloads(tmp_path):
    from nasforge.compress.prune import prune_structured

    spec = MacroSpec((1, 2, 1, 1), (1.0,) * 4, (3, 5, 3, 3), (3, 3, 6, 3))
    torch.manual_seed(1)
    net = build_macro_network(spec, 1, 10).eval()
    x = torch.randn(4, 1, 8, 8)
    before = sum(p.numel() for p in net.parameters())
    pruned, report = prune_structured(net, x, channel_ratio=0.3)
    assert report["params_after"] < before
    save_model(pruned, tmp_path / "p", _macro_meta(spec))
    loaded, _ = load_model(tmp_path / "p")
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"]
    pruned.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))


# --- the chain through the stage runner ---------------------------------------------------------


@pytest.fixture(scope="module")
def macro_chain(tmp_path_factory, digits_dir):
    """search -> train -> prune -> qat -> export on the macro space, run once.

    The second candidate is trained: the first is the most accurate subnet, which in this small
    corner is usually the teacher itself, and distilling a network into itself tests little.
    """
    return run_chain(
        macro_params(), tmp_path_factory.mktemp("macro-chain"), digits_dir, candidate=1
    )


@pytest.mark.slow
def test_macro_search_stage_writes_macro_candidates(macro_chain):
    pareto = json.loads((macro_chain["search"] / "pareto.json").read_text())
    assert pareto["space"] == "macro"
    assert pareto["objectives"] == ["val_error", "latency_ms[onnxruntime-cpu]", "memory_mb"]
    assert pareto["phases"] == ["largest", "width"]
    teacher = MacroSpec.from_json(json.dumps(pareto["teacher"]["spec"]))
    assert teacher == MacroSpec((1,) * 4, (1.0,) * 4, (3,) * 4, (3,) * 4)
    assert len(pareto["candidates"]) == 2
    for c in pareto["candidates"]:
        spec = MacroSpec.from_json(json.dumps(c["spec"]))
        assert c["arch_str"] == macro_arch_str(spec)
        assert set(spec.depths) == {1} and set(spec.kernels) == {3} and set(spec.expands) == {3}
        assert c["objectives"]["latency_ms[onnxruntime-cpu]"] > 0
    history = json.loads((macro_chain["search"] / "history.json").read_text())
    assert len(history["trials"]) == 6
    assert macro_chain["search_result"].metrics["best_val_accuracy"] > 0.3  # chance is 0.1


@pytest.mark.slow
def test_macro_train_prune_qat_export_benchmark_report(macro_chain, tmp_path, monkeypatch):
    m = macro_chain["train_result"].metrics
    assert m["val_accuracy"] > 0.5 and m["test_accuracy"] > 0.5  # chance is 0.1
    meta = json.loads((macro_chain["train"] / "model.json").read_text())
    pareto = json.loads((macro_chain["search"] / "pareto.json").read_text())
    cand = pareto["candidates"][1]
    assert meta["candidate"] == "cand-1" and meta["space"] == "macro"
    assert meta["arch_str"] == cand["arch_str"] and meta["spec"] == cand["spec"]
    net, _ = load_model(macro_chain["train"])
    assert isinstance(net, MacroNetwork) and net.spec == MacroSpec.from_json(
        json.dumps(cand["spec"])
    )

    pr = macro_chain["prune_result"].metrics
    assert pr["params"] < pr["params_before"]
    pruned, _ = load_model(macro_chain["prune"])  # pruned shapes restored from the weights
    assert sum(p.numel() for p in pruned.parameters()) == pr["params"]

    assert macro_chain["qat_result"].metrics["test_accuracy"] > 0.3

    doc = json.loads((macro_chain["export"] / "export.json").read_text())
    assert doc["arch_str"] == meta["arch_str"]
    for key, parity in doc["parity"].items():
        assert parity["top1_agreement"] >= 0.97, key

    out = tmp_path / "bench"
    p = macro_chain["params"]
    execute(
        "benchmark",
        p,
        out,
        tracking=False,
        dataset=macro_chain["data"],
        exported=[macro_chain["export"]],
        target="onnxruntime-cpu",
    )
    bench = json.loads((out / "cand-1" / "benchmark.json").read_text())
    assert bench["arch_str"] == meta["arch_str"]
    for precision in ("fp32", "int8"):
        r = bench["results"][precision]
        assert r["latency"]["1"]["p50_ms"] > 0 and r["test_accuracy"] > 0.3

    # promote (MLflow in a local SQLite file, as in the cell chain's test) and report read
    # arch_str from the benchmark and the candidates.
    monkeypatch.chdir(tmp_path)
    p = with_tracking_db(p, tmp_path)
    execute("promote", p, tmp_path / "promote", benchmarks=[out])
    prom = json.loads((tmp_path / "promote" / "promotion.json").read_text())
    assert [d["promoted"] for d in prom["decisions"]] == [True]
    execute(
        "report",
        p,
        tmp_path / "report",
        search=macro_chain["search"],
        promotion=tmp_path / "promote",
        benchmarks=[out],
    )
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["targets"]["onnxruntime-cpu"]["arch_str"] == meta["arch_str"]
    assert meta["arch_str"] in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.slow
def test_macro_train_with_bayesian_tuning(macro_chain):
    p = macro_params(train={"epochs": 1, "tune": {"enabled": True, "trials": 2, "epochs": [1, 2]}})
    out = macro_chain["root"] / "train-bo"
    result = execute(
        "train",
        p,
        out,
        tracking=False,
        dataset=macro_chain["data"],
        search=macro_chain["search"],
        candidate=1,
    )
    trials = read_meta(out)["hparam_trials"]
    assert len(trials) == 2
    best = max(t["val_accuracy"] for t in trials)
    assert result.metrics["val_accuracy"] == pytest.approx(best)
    assert np.isfinite(result.metrics["chosen_lr"])


def test_macro_search_rejects_table_targets_and_darts_prior(digits_dir, tmp_path):
    with pytest.raises(ConfigError, match="runtime targets"):
        execute(
            "search",
            macro_params(targets=["table:raspi4_latency_ms"]),
            tmp_path / "s",
            tracking=False,
            dataset=digits_dir,
        )
    p = macro_params(search={"strategy": "hybrid", "prior": "darts"})
    with pytest.raises(ConfigError, match="cell space only"):
        execute("search", p, tmp_path / "s", tracking=False, dataset=digits_dir)
    assert not (tmp_path / "s").exists()
