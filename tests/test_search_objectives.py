"""Objectives, constraints and candidate choice of the pipeline's search (nasforge.search)."""

from __future__ import annotations

import random

import pytest

from nasforge.config import params_from_dict
from nasforge.errors import ConfigError
from nasforge.search.driver import select_candidates
from nasforge.search.objectives import (
    Constraint,
    budget_constraints,
    check_feasible,
    column_kind,
    explain_infeasible,
    objective_columns,
    parse_constraint,
)

TARGETS = ["onnxruntime-cpu", "openvino-cpu"]


def test_objective_columns_follow_the_documented_order():
    cols = objective_columns(["memory", "energy", "error", "latency"], TARGETS)
    assert cols == [
        "val_error",
        "latency_ms[onnxruntime-cpu]",
        "latency_ms[openvino-cpu]",
        "memory_mb",
        "energy_mj[onnxruntime-cpu]",
        "energy_mj[openvino-cpu]",
    ]
    assert [column_kind(c) for c in cols] == [
        "error",
        "latency",
        "latency",
        "memory",
        "energy",
        "energy",
    ]
    assert objective_columns(["error", "params", "macs"], TARGETS) == [
        "val_error",
        "params",
        "macs",
    ]


@pytest.mark.parametrize(
    ("text", "metrics"),
    [
        ("memory_mb <= 0.5", ["memory_mb"]),
        ("accuracy >= 0.9", ["val_accuracy"]),
        ("latency <= 2", ["latency_ms[onnxruntime-cpu]", "latency_ms[openvino-cpu]"]),
        ("latency_ms[openvino-cpu] <= 0.2", ["latency_ms[openvino-cpu]"]),
        ("energy_mj >= 1e-3", ["energy_mj[onnxruntime-cpu]", "energy_mj[openvino-cpu]"]),
        ("  size<=1.5 ", ["size_mb"]),
    ],
)
def test_constraints_parse_and_expand_per_target(text, metrics):
    got = parse_constraint(text, TARGETS)
    assert [c.metric for c in got] == metrics


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("memory_mb < 0.5", "is not 'METRIC <= VALUE'"),
        ("speed <= 1", "unknown metric 'speed'"),
        ("memory_mb <= lots", "not a number"),
        ("memory_mb <= inf", "must be finite"),
        ("memory_mb[openvino-cpu] <= 1", "not per target"),
        ("latency_ms[tensorrt-gpu] <= 1", "not one of targets"),
    ],
)
def test_bad_constraints_are_one_line_errors(text, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_constraint(text, TARGETS)
    assert "\n" not in str(err.value)


def test_violation_follows_optunas_sign_convention():
    le = Constraint("memory_mb", "<=", 1.0)
    ge = Constraint("val_accuracy", ">=", 0.9)
    assert le.violation({"memory_mb": 0.5}) == pytest.approx(-0.5)
    assert le.violation({"memory_mb": 1.5}) == pytest.approx(0.5)
    assert ge.violation({"val_accuracy": 0.95}) == pytest.approx(-0.05)
    assert ge.violation({"val_accuracy": 0.8}) == pytest.approx(0.1)
    assert le.violation({"memory_mb": float("nan")}) == float("inf")
    with pytest.raises(ConfigError, match="not measured"):
        le.violation({})
    ok, broken = check_feasible({"memory_mb": 1.5, "val_accuracy": 0.95}, [le, ge])
    assert not ok and list(broken) == ["memory_mb <= 1"]


def test_budgets_become_constraints():
    p = params_from_dict({"budgets": {"min_accuracy": 0.95, "max_latency_ms": 2, "max_size_mb": 1}})
    cons, notes = budget_constraints(p.budgets, TARGETS, 0.05, 1)
    assert {c.text for c in cons} == {
        "val_accuracy >= 0.9",
        "latency_ms[onnxruntime-cpu] <= 2",
        "latency_ms[openvino-cpu] <= 2",
        "size_mb <= 1",
    }
    assert not notes
    cons, notes = budget_constraints(p.budgets, TARGETS, 0.05, 8)
    assert not any(c.metric.startswith("latency") for c in cons)
    assert "batch 8" in notes[0]
    assert budget_constraints(params_from_dict({}).budgets, TARGETS, 0.05, 1) == ([], [])


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        m = {"val_error": rng.random(), "latency_ms[a]": rng.random(), "memory_mb": rng.random()}
        m["val_accuracy"] = 1 - m["val_error"]
        out.append({"trial": i, "arch_str": f"a{i}", "objectives": dict(m), "metrics": m})
    return out


@pytest.mark.parametrize("seed", range(20))
def test_candidates_are_feasible_and_on_the_feasible_front(seed):
    cons = [Constraint("memory_mb", "<=", 0.5)]
    records = _records(60, seed)
    for r in records:
        r["feasible"], r["violations"] = check_feasible(r["metrics"], cons)
    names = ["val_error", "latency_ms[a]", "memory_mb"]
    chosen = select_candidates(records, names, 3, 1.0, cons)
    assert chosen and all(r["feasible"] for r in chosen)
    assert min(r["rank"] for r in chosen) == 0
    # Every infeasible trial ranks behind every feasible one.
    worst_feasible = max(r["rank"] for r in records if r["feasible"])
    assert all(r["rank"] > worst_feasible for r in records if not r["feasible"])


def test_no_feasible_trial_names_the_constraint_that_held_everything_back():
    cons = [
        Constraint("memory_mb", "<=", -1.0, "search.constraints"),
        Constraint("val_accuracy", ">=", 0.0),
    ]
    records = _records(10)
    for r in records:
        r["feasible"], r["violations"] = check_feasible(r["metrics"], cons)
    with pytest.raises(
        ConfigError, match=r"memory_mb <= -1 \(search.constraints\) rules out 10 of 10"
    ):
        select_candidates(records, ["val_error", "memory_mb"], 2, 1.0, cons)
    assert "closest" in explain_infeasible(records, cons)


def test_params_validate_search_settings():
    p = params_from_dict(
        {"search": {"objectives": ["error", "energy"], "constraints": ["memory_mb <= 1"]}}
    )
    assert p.search.objectives == ["error", "energy"]
    bad = [
        ({"search": {"objectives": ["latency"]}}, "must include 'error'"),
        ({"search": {"objectives": ["error", "speed"]}}, "unknown objective 'speed'"),
        ({"search": {"objectives": ["error", "error"]}}, "twice"),
        ({"search": {"constraints": ["memory_mb < 1"]}}, "search.constraints"),
        ({"search": {"constraints": ["latency_ms[tensorrt-gpu] <= 1"]}}, "not one of targets"),
        ({"search": {"population_size": 8}}, "moved to search.sampler_options"),
        ({"search": {"strategy": "annealing"}}, "unknown strategy 'annealing'"),
    ]
    for data, match in bad:
        with pytest.raises(ConfigError, match=match) as err:
            params_from_dict(data, "p.yaml")
        assert "\n" not in str(err.value)


def test_subnet_metrics_of_a_real_cell_network():
    """Latency (ORT, INT8 as deployed), memory, size, energy with its source, params and MACs."""
    from nasforge.hardware.predictor import LatencyPredictor
    from nasforge.search.subnet_metrics import SubnetMetrics, model_memory
    from nasforge.space.cell import CellNetworkShape, build_cell_network, count_parameters
    from nasforge.space.cell_blocks import CellBlockSpace
    from nasforge.space.nb201 import CellSpec

    shape = CellNetworkShape(1, 10, channels=8, cells_per_stage=1)
    spec = CellSpec.from_arch_str(
        "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|skip_connect~2|"
    )
    net = build_cell_network(spec, shape)
    pred = LatencyPredictor(
        ["onnxruntime-cpu"],
        CellBlockSpace(shape, (8, 8)),
        mode="measure",
        threads=1,
        precision="int8",
    )
    m = SubnetMetrics(pred, (1, 8, 8), "int8", 1, 1)
    out = m.measure(net, spec, spec.arch_str)
    assert out["params"] == count_parameters(net)
    assert out["macs"] > out["params"]  # convs over an 8x8 map reuse each weight
    assert out["size_mb"] == pytest.approx(out["params"] / 1e6, rel=0.2)  # 1 byte per weight
    assert out["memory_mb"] > out["size_mb"]
    assert out["latency_ms[onnxruntime-cpu]"] > 0
    assert out["energy_mj[onnxruntime-cpu]"] > 0
    src = m.sources()
    assert src["energy_mj[onnxruntime-cpu]"].startswith(("estimated", "measured"))
    assert "int8" in src["latency_ms[onnxruntime-cpu]"]
    # Activations scale with the batch, weights do not.
    m1, m8 = model_memory(net, (1, 8, 8), "int8", 1), model_memory(net, (1, 8, 8), "int8", 8)
    assert m8["size_mb"] == m1["size_mb"]
    act1, act8 = m1["memory_mb"] - m1["size_mb"], m8["memory_mb"] - m8["size_mb"]
    assert 6 * act1 < act8 <= 8 * act1 + 1e-12  # (a few batch-independent tensors are live too)
    assert model_memory(net, (1, 8, 8), "fp32", 1)["size_mb"] > 3.5 * m1["size_mb"]
