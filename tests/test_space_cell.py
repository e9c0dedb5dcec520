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
