"""Every architecture of both search spaces goes through the compression chain.

Regression for the prune crash on ~10% of NB201 cells (a node fed only by ``none`` edges was a
``zeros_like`` tensor without autograd history, so Torch-Pruning left the convs reading it
unpruned). :data:`N_PRUNE` random connected cells and as many random macro specs go through
build -> prune stage -> load -> forward, and :data:`N_CHAIN` of each (drawn among them) on
through the qat and export stages to one inference in ONNX Runtime and OpenVINO, with shapes,
channel counts and parity checked (:mod:`nasforge.space_coverage`, which
``benchmarks/bench_space_coverage.py`` runs over the whole cell space). Prune settings vary per
architecture over what ``params.prune`` allows. Tiny shapes (8x8 digits, 8 cell channels), two
worker processes.
"""

from __future__ import annotations

import random

import pytest

from nasforge import space_coverage as sc
from nasforge.config import PruneParams
from nasforge.errors import ConfigError
from nasforge.space.cell import is_connected
from nasforge.space.macro import MacroSpec
from nasforge.space.nb201 import CellSpec

N_PRUNE = 300
N_CHAIN = 40
SEED = 2026
WORKERS = 2

# node 2 is fed by 'none' edges only and read by a conv: the cell that crashed the prune stage
ZERO_NODE_CELL = "|nor_conv_3x3~0|+|none~0|none~1|+|nor_conv_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"


@pytest.fixture(scope="module")
def coverage_env(tmp_path_factory) -> sc.CoverageEnv:
    work = tmp_path_factory.mktemp("space-coverage")
    params = sc.base_params()
    dataset = sc.prepare_dataset(params, work / "data")
    return sc.CoverageEnv(str(dataset), str(work / "cases"), params)


@pytest.fixture(scope="module")
def records(coverage_env) -> dict[str, list[dict]]:
    """Every sampled case of both spaces, run once in one pool (whole chains first: they are
    the long ones, so the pool ends evenly)."""
    cases = [c for s in sc.SPACES for c in sc.sample_cases(s, N_PRUNE, N_CHAIN, SEED)]
    cases.sort(key=lambda c: not c.chain)
    out: dict[str, list[dict]] = {s: [] for s in sc.SPACES}
    for r in sc.run_cases(cases, coverage_env, workers=WORKERS):
        out[r["space"]].append(r)
    return out


def _failures(rs: list[dict]) -> str:
    return "\n".join(sc.failure_line(r) for r in rs if not r["ok"])


# --- sampling (fast) ----------------------------------------------------------------------------


def test_cells_are_sampled_uniformly_among_connected_cells():
    connected = sc.connected_cells()
    assert len(connected) == 15284
    cases = sc.sample_cases("cell", N_PRUNE, N_CHAIN, SEED)
    assert len({c.arch for c in cases}) == N_PRUNE
    assert sum(c.chain for c in cases) == N_CHAIN
    assert all(is_connected(CellSpec.from_arch_str(c.arch)) for c in cases)
    assert [c.arch for c in cases] == [c.arch for c in sc.sample_cases("cell", N_PRUNE, 0, SEED)]
    everything = sc.sample_cases("cell", 10**6, 5, SEED)
    assert {c.arch for c in everything} == {c.arch_str for c in connected}


def test_macro_specs_come_from_the_configured_space():
    from nasforge.config import params_from_dict

    params = params_from_dict({"space": {"macro": {"kernels": [3], "expands": [3, 6]}}})
    cases = sc.sample_cases("macro", 200, 10, SEED, params)
    specs = [MacroSpec.from_json(c.arch) for c in cases]
    assert len(set(specs)) == 200
    assert all(set(s.kernels) == {3} and set(s.expands) <= {3, 6} for s in specs)
    # uniform per stage and dimension: every choice shows up
    assert {d for s in specs for d in s.depths} == {1, 2, 3}
    assert {e for s in specs for e in s.expands} == {3, 6}


@pytest.mark.parametrize("space", sc.SPACES)
def test_spaces_are_sampled_through_the_registry(space):
    # Space coverage names no space: each draws, writes and reads back its own specs.
    from nasforge.space.registry import get_space

    sampled = sc.coverage_space(space)
    assert isinstance(sampled, get_space(space))
    valid = sampled.validity()
    rng = random.Random(SEED)
    for _ in range(300):
        spec = sampled.sample_spec(rng)
        assert valid is None or valid(sampled.spec_to_params(spec))
        text = sampled.spec_text(spec)
        assert "\n" not in text and sampled.spec_from_text(text) == spec
    for bad in ("", "{", "[1, 2]", '{"nope": 1}', "|bogus~0|"):
        with pytest.raises(ConfigError):
            sampled.spec_from_text(bad)
    net, meta = sc._build(
        sc.sample_cases(space, 1, 0, SEED)[0], _DIGITS, sc.CoverageEnv("", "", {})
    )
    assert meta["space"] == space and meta["arch_str"]
    assert get_space(space).network_from_model(meta) is not None


class _DIGITS:  # the coverage dataset's shape, without preparing it
    input_shape, num_classes = sc.DIGITS_SHAPE, sc.DIGITS_CLASSES
    mean, std, classes = [0.0], [1.0], list(range(10))


def test_prune_settings_span_what_the_config_allows():
    rng = random.Random(0)
    drawn = [sc.sample_prune_settings(rng) for _ in range(300)]
    for s in drawn:
        PruneParams(**s)
        assert 0 < s["channel_ratio"] < 1
    assert {s["importance"] for s in drawn} == {"magnitude", "taylor"}
    assert {s["steps"] for s in drawn} == {1, 2, 3, 4}
    assert {s["finetune_epochs"] for s in drawn} == {0, 1}
    ratios = sorted(s["channel_ratio"] for s in drawn)
    assert ratios[0] < 0.1 and ratios[-1] > 0.9
    # a resumed run draws the same settings for the same architecture
    a = sc.sample_cases("cell", 20, 0, SEED)
    b = sc.sample_cases("cell", 20, 0, SEED)
    assert [c.prune for c in a] == [c.prune for c in b]


# --- one case in-process (seconds) --------------------------------------------------------------


def test_zero_node_cell_prunes_loads_and_runs(coverage_env):
    settings = {"channel_ratio": 0.25, "importance": "magnitude", "steps": 1, "finetune_epochs": 0}
    r = sc.run_case(sc.Case("cell", ZERO_NODE_CELL, settings), coverage_env)
    assert r["ok"], sc.failure_line(r)
    assert r["channels_after"] < r["channels_before"]
    assert r["params_after"] < r["params_before"]


def test_a_failing_architecture_is_named_in_one_line(coverage_env):
    settings = {"channel_ratio": 0.25, "importance": "magnitude", "steps": 1, "finetune_epochs": 0}
    r = sc.run_case(sc.Case("cell", "|bogus~0|+|none~0|none~1|", settings), coverage_env)
    assert not r["ok"] and r["stage"] == "build"
    line = sc.failure_line(r)
    assert "\n" not in line
    assert "|bogus~0|" in line and "build" in line and ConfigError.__name__ in r["error"]


# --- the sampled spaces (minutes) ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("space", sc.SPACES)
def test_sampled_architectures_prune_and_run(records, space):
    rs = records[space]
    assert len(rs) == N_PRUNE
    assert all(r["ok"] for r in rs), _failures(rs)
    # the ratio asked for channels to go, and they went
    assert all(
        r["channels_after"] < r["channels_before"] for r in rs if r["prune"]["channel_ratio"] <= 0.8
    )
    assert all(r["params_after"] <= r["params_before"] for r in rs)


@pytest.mark.slow
@pytest.mark.parametrize("space", sc.SPACES)
def test_sampled_architectures_go_through_the_whole_chain(records, space):
    chain = [r for r in records[space] if r["chain"]]
    assert len(chain) == N_CHAIN
    assert all(r["ok"] for r in chain), _failures(chain)
    for r in chain:
        assert set(r["parity"]) == {
            "onnxruntime/fp32",
            "onnxruntime/int8",
            "openvino/fp32",
            "openvino/int8",
        }
