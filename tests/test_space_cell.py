"""Cell network, dead-edge elimination and weight sharing with the supernet."""

from __future__ import annotations

import random

import pytest
import torch

from nasforge.space.cell import (
    CellNetworkShape,
    build_cell_network,
    computed_edges,
    count_parameters,
)
from nasforge.space.nb201 import CellSpec
from nasforge.supernet.cell_supernet import LARGEST_SPEC, CellSupernet, recalibrate_bn

SHAPE = CellNetworkShape(in_channels=1, num_classes=10, channels=8)


def _describe_cell(params):
    """A trial record's architecture fields, as the search stage writes them."""
    from nasforge.space.registry import get_space

    space = get_space("cell")(SHAPE, (8, 8))
    return space.spec_record(space.spec_from_params(params))


def test_forward_shape_and_largest_is_biggest():
    x = torch.randn(3, 1, 8, 8)
    big = build_cell_network(LARGEST_SPEC, SHAPE)
    assert big(x).shape == (3, 10)
    small = build_cell_network(CellSpec(("skip_connect",) * 6), SHAPE)
    assert count_parameters(small) < count_parameters(big)


def test_dead_edges_are_not_built():
    # node 1 is computed from the input but nothing reads it: its conv must not exist.
    spec = CellSpec.from_arch_str(
        "|nor_conv_1x1~0|+|nor_conv_3x3~0|none~1|+|nor_conv_1x1~0|none~1|avg_pool_3x3~2|"
    )
    assert computed_edges(spec) == [False, True, False, True, False, True]
    net = build_cell_network(spec, SHAPE)
    names = [n for n, _ in net.named_parameters()]
    assert not any(".edges.0." in n for n in names)
    assert any(".edges.1." in n for n in names)


def test_all_none_cell_outputs_zeros_through_cells():
    net = build_cell_network(CellSpec(("none",) * 6), SHAPE).eval()
    cell = net.cells[0]
    assert torch.count_nonzero(cell(torch.randn(2, 8, 8, 8))) == 0


def test_subnet_inherits_supernet_function():
    torch.manual_seed(0)
    sn = CellSupernet(SHAPE)
    x = torch.randn(16, 1, 8, 8)
    rng = random.Random(0)
    for _ in range(5):
        spec = CellSupernet.sample_spec(rng)
        sn.set_active_subnet(spec)
        sub = sn.get_active_subnet()
        sn.eval()
        sub.eval()
        torch.testing.assert_close(sn(x), sub(x))
    sn.set_active_subnet(LARGEST_SPEC)
    assert sn.active_spec == LARGEST_SPEC


def test_bn_recalibration_changes_running_stats():
    sn = CellSupernet(SHAPE)
    sub = sn.get_active_subnet().eval()
    before = sub.stem[1].running_mean.clone()
    recalibrate_bn(sub, [torch.randn(8, 1, 8, 8) * 3 + 2 for _ in range(3)])
    assert not torch.allclose(before, sub.stem[1].running_mean)
    assert not sub.training  # the caller's mode is restored


def test_is_connected():
    from nasforge.space.cell import is_connected

    assert is_connected(LARGEST_SPEC)
    # output node fed only by 'none': a constant network
    assert not is_connected(
        CellSpec.from_arch_str("|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|none~0|none~1|none~2|")
    )
    # node 1 has no input, so 1->3 carries zeros; 0->2->3 is the only real path
    assert not is_connected(
        CellSpec.from_arch_str("|none~0|+|none~0|none~1|+|none~0|nor_conv_1x1~1|none~2|")
    )
    assert is_connected(
        CellSpec.from_arch_str("|none~0|+|skip_connect~0|none~1|+|none~0|none~1|nor_conv_1x1~2|")
    )


def test_candidates_exclude_inaccurate_subnets():
    from nasforge.search.driver import select_candidates

    def rec(i, arch, err, lat):
        spec = CellSpec.from_arch_str(arch)
        return {
            "trial": i,
            "ops": list(spec.ops),
            "arch_str": arch,
            "objectives": {"val_error": err, "lat": lat},
        }

    records = [
        rec(0, LARGEST_SPEC.arch_str, 0.02, 1.0),
        rec(
            2, "|skip_connect~0|+|none~0|none~1|+|none~0|skip_connect~1|none~2|", 0.50, 0.1
        ),  # fastest, but too inaccurate
        rec(3, "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|nor_conv_1x1~1|none~2|", 0.06, 0.3),
    ]
    chosen = select_candidates(records, ["val_error", "lat"], 3, accuracy_window=0.10)
    assert [c["trial"] for c in chosen] == [0, 3]
    assert records[1]["rank"] == 0  # on the front, but outside the accuracy window


@pytest.mark.parametrize("strategy", ["optuna-random", "optuna-nsga2", "hybrid", "regevo"])
def test_the_search_never_evaluates_a_disconnected_cell(strategy):
    """Every strategy, over a cheap synthetic objective: no constant network is ever scored."""
    from optuna.distributions import CategoricalDistribution

    from nasforge.search.driver import run_study
    from nasforge.space.cell import is_connected
    from nasforge.space.cell_space import connected as _connected
    from nasforge.space.nb201 import OPS, PARAM_NAMES, search_space

    seen = []

    def evaluate(p):
        spec = CellSpec(tuple(p[n] for n in PARAM_NAMES))
        seen.append(spec)
        # Rewards parameter-free cells: disconnected ones would look best if ever scored.
        convs = sum(op.startswith("nor_conv") for op in spec.ops)
        return {"val_error": 0.5 + 0.01 * convs, "lat": float(convs)}

    records = run_study(
        evaluate,
        objectives=["val_error", "lat"],
        distributions={n: CategoricalDistribution(list(OPS)) for n in PARAM_NAMES},
        strategy=strategy,
        seed=0,
        trials=25,
        storage=None,
        study_name="t",
        is_valid=_connected,
        search_space=search_space(),
        describe=_describe_cell,
    )
    assert len(records) == 25
    assert len(seen) == 25 and all(is_connected(s) for s in seen)


def test_a_deterministic_strategy_stuck_on_a_disconnected_cell_is_repaired():
    """Optuna's GPSampler ignores a rejected proposal and, given the same trials, proposes it
    again forever (seen in bench-search): after a few in a row a random connected cell is
    evaluated instead, tagged as a repair, and the search goes on."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from nasforge.search.base import INVALID_ATTR, REPAIRED_ATTR, ask_valid
    from nasforge.space.cell_space import connected as _connected
    from nasforge.space.nb201 import OPS, PARAM_NAMES

    class Stubborn(optuna.samplers.BaseSampler):
        """Always proposes the all-`none` cell (no input-to-output path)."""

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            return "none"

    study = optuna.create_study(sampler=Stubborn())
    dists = {n: CategoricalDistribution(list(OPS)) for n in PARAM_NAMES}
    for _ in range(5):
        trial = ask_valid(study, dists, _connected, repair_after=3)
        assert _connected(trial.params) and trial.user_attrs[REPAIRED_ATTR] == 3
        study.tell(trial, 1.0)
    invalid = [t for t in study.trials if t.user_attrs.get(INVALID_ATTR)]
    assert len(invalid) == 15 and all(t.state.name == "PRUNED" for t in invalid)
    assert (
        len({tuple(t.params.values()) for t in study.trials if not t.user_attrs.get(INVALID_ATTR)})
        == 5
    )


def test_gaussian_process_search_finishes_on_the_cell_space():
    from optuna.distributions import CategoricalDistribution

    from nasforge.search.driver import run_study
    from nasforge.space.cell_space import connected as _connected
    from nasforge.space.nb201 import OPS, PARAM_NAMES, search_space

    def evaluate(p):
        convs = sum(p[n].startswith("nor_conv") for n in PARAM_NAMES)
        return {"val_error": 0.5 + 0.01 * convs, "lat": float(convs)}

    records = run_study(
        evaluate,
        objectives=["val_error", "lat"],
        distributions={n: CategoricalDistribution(list(OPS)) for n in PARAM_NAMES},
        strategy="optuna-gp",
        seed=0,
        trials=15,
        storage=None,
        study_name="t",
        is_valid=_connected,
        search_space=search_space(),
        describe=_describe_cell,
    )
    assert len(records) == 15
