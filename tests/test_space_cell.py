"""Cell network, dead-edge elimination and weight sharing with the supernet."""

from __future__ import annotations

import random

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


def test_candidates_exclude_constant_and_inaccurate_subnets():
    from nasforge.stages.search import select_candidates

    def rec(i, arch, err, lat):
        spec = CellSpec.from_arch_str(arch)
        return {
            "trial": i,
            "ops": list(spec.ops),
            "arch_str": arch,
            "objectives": {"val_error": err, "lat": lat},
        }

    dead = "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|none~0|none~1|none~2|"
    records = [
        rec(0, LARGEST_SPEC.arch_str, 0.02, 1.0),
        rec(1, dead, 0.90, 0.01),  # fastest, but a constant function
        rec(
            2, "|skip_connect~0|+|none~0|none~1|+|none~0|skip_connect~1|none~2|", 0.50, 0.1
        ),  # too inaccurate
        rec(3, "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|nor_conv_1x1~1|none~2|", 0.06, 0.3),
    ]
    chosen = select_candidates(records, ["val_error", "lat"], 3, accuracy_window=0.10)
    assert [c["trial"] for c in chosen] == [0, 3]
    assert (
        records[1]["rank"] == 0
    )  # it is on the raw front, which is exactly why it must be excluded
