"""Variant-switching policy: pure logic, driven by synthetic load traces."""

from __future__ import annotations

import pytest

from nasforge.errors import ConfigError
from nasforge.serve.policy import SwitchPolicy, VariantInfo

V = [
    VariantInfo("fast", 1.0, 0.80, 1_000),
    VariantInfo("mid", 3.0, 0.85, 5_000),
    VariantInfo("slow", 9.0, 0.90, 20_000),
]


def test_starts_on_most_accurate_within_budget():
    assert SwitchPolicy(V, slo_ms=10).current == 2
    assert SwitchPolicy(V, slo_ms=10, memory_budget_bytes=6_000).current == 1
    with pytest.raises(ConfigError, match="memory budget"):
        SwitchPolicy(V, slo_ms=10, memory_budget_bytes=10)


def test_rejects_bad_config():
    with pytest.raises(ConfigError, match="ordered by latency"):
        SwitchPolicy(list(reversed(V)), slo_ms=10)
    with pytest.raises(ConfigError, match="low_water"):
        SwitchPolicy(V, slo_ms=10, low_water=0.9, high_water=0.5)
    with pytest.raises(ConfigError, match="slo_ms"):
        SwitchPolicy(V, slo_ms=0)


def test_steps_down_under_load_and_back_up_when_it_drops():
    p = SwitchPolicy(V, slo_ms=10, cooldown_batches=5, down_cooldown_batches=2)
    # Overload: p99 15 ms > 0.9 * 10 ms. One step per down-cooldown, never past the fastest.
    picks = [p.choose(15.0, 2.0) for _ in range(10)]
    assert picks[0] == 1 and 0 in picks and picks[-1] == 0
    assert all(b <= a for a, b in zip(picks, picks[1:], strict=False))  # monotone down
    assert [(s.from_index, s.to_index) for s in p.switches] == [(2, 1), (1, 0)]
    # Load drops: p99 2 ms < 0.5 * 10, queue empty: up one step per cool-down of 5 batches.
    picks = [p.choose(2.0, 0.1) for _ in range(12)]
    assert picks[-1] == 2
    ups = p.switches[2:]
    assert [(s.from_index, s.to_index) for s in ups] == [(0, 1), (1, 2)]
    assert ups[1].batch - ups[0].batch >= 5
    assert all(s.reason for s in p.switches)


def test_hysteresis_band_does_not_flap():
    p = SwitchPolicy(V, slo_ms=10, cooldown_batches=3, down_cooldown_batches=1)
    p.choose(12.0, 0.0)  # overloaded once: slow -> mid
    assert p.current == 1
    # p99 oscillates inside the band [5, 9] ms: neither overloaded nor relaxed, no switch.
    for i in range(200):
        p.choose(5.5 if i % 2 else 8.5, 1.0)
    assert len(p.switches) == 1 and p.current == 1


def test_queue_delay_alone_triggers_step_down_and_blocks_step_up():
    p = SwitchPolicy(V, slo_ms=10, cooldown_batches=1, down_cooldown_batches=1)
    p.choose(None, 50.0)  # no latency yet, but requests wait 50 ms in the queue
    assert p.current == 1
    # Low p99 but a queue of 4 ms (> low_water * slo / 2): do not step up yet.
    for _ in range(10):
        p.choose(1.0, 4.0)
    assert p.current == 1


def test_memory_budget_limits_the_ladder():
    p = SwitchPolicy(
        V, slo_ms=10, memory_budget_bytes=6_000, cooldown_batches=1, down_cooldown_batches=1
    )
    for _ in range(5):
        p.choose(1.0, 0.0)
    assert p.current == 1  # "slow" never chosen: over the budget
