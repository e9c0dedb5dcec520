"""Macro elastic space: JSON round trip, forward shapes, parameter count vs width."""

from __future__ import annotations

import random

import pytest
import torch

from nasforge.errors import ConfigError
from nasforge.space.cell import count_parameters
from nasforge.space.macro import (
    N_STAGES,
    WIDTHS,
    MacroNetwork,
    MacroSpec,
    build_macro_network,
    macro_search_space,
)


def _random_spec(rng: random.Random) -> MacroSpec:
    return MacroSpec.from_params({k: rng.choice(v) for k, v in macro_search_space().items()})


def test_search_space_matches_spec_params() -> None:
    space = macro_search_space()
    assert len(space) == 4 * N_STAGES
    assert space["stage0_kernel"] == [3, 5, 7]
    assert space["stage2_expand"] == [3, 4, 6]
    assert set(MacroSpec.largest().to_params()) == set(space)


def test_json_and_params_round_trip() -> None:
    rng = random.Random(0)
    for _ in range(20):
        spec = _random_spec(rng)
        assert MacroSpec.from_json(spec.to_json()) == spec
        assert MacroSpec.from_params(spec.to_params()) == spec
        assert hash(MacroSpec.from_json(spec.to_json())) == hash(spec)


@pytest.mark.parametrize(
    "bad",
    [
        '{"depths": [1, 2, 3], "widths": [1.0, 1.0, 1.0, 1.0], "kernels": [3, 3, 3, 3], '
        '"expands": [3, 3, 3, 3]}',
        '{"depths": [1, 1, 1, 1], "widths": [1.0, 1.0, 1.0, 1.0], "kernels": [4, 3, 3, 3], '
        '"expands": [3, 3, 3, 3]}',
        '{"depths": [1, 1, 1, 1]}',
        "not json",
    ],
)
def test_bad_spec_raises_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        MacroSpec.from_json(bad)


@pytest.mark.parametrize("in_channels,size", [(1, 8), (3, 32)])
def test_forward_shapes_for_random_specs(in_channels: int, size: int) -> None:
    rng = random.Random(size)
    for _ in range(3):
        spec = _random_spec(rng)
        net = build_macro_network(spec, in_channels, 10)
        assert isinstance(net, MacroNetwork)
        assert len(net.blocks) == sum(spec.depths)
        net.eval()
        with torch.no_grad():
            out = net(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()


def test_parameter_count_monotone_in_width() -> None:
    rng = random.Random(1)
    for _ in range(5):
        params = _random_spec(rng).to_params()
        for stage in range(N_STAGES):
            counts = []
            for w in WIDTHS:
                params[f"stage{stage}_width"] = w
                counts.append(
                    count_parameters(build_macro_network(MacroSpec.from_params(params), 3, 10))
                )
            assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
    small = count_parameters(build_macro_network(MacroSpec.smallest(), 3, 10))
    large = count_parameters(build_macro_network(MacroSpec.largest(), 3, 10))
    assert small < large
