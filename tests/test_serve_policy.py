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


def test_step_up_waits_until_the_larger_variant_can_keep_up():
    p = SwitchPolicy(V, slo_ms=10, cooldown_batches=1, down_cooldown_batches=1)
    p.choose(20.0, 0.0)
    assert p.current == 1
    # "slow" took 9 ms per sample at batch 1; observed serving it at 4 ms per sample.
    p.observe(2, samples=8, seconds=0.032)
    assert 4e-3 < p.sec_per_sample[2] < 9e-3
    # Latency is low, but 300 samples/s would keep "slow" busy more than 70% of the time.
    for _ in range(20):
        p.choose(1.0, 0.0, rate_per_s=300.0)
    assert p.current == 1
    # Load drops to 50 samples/s: now it can step up.
    p.choose(1.0, 0.0, rate_per_s=50.0)
    assert p.current == 2
    with pytest.raises(ConfigError, match="max_utilization"):
        SwitchPolicy(V, slo_ms=10, max_utilization=0)


def test_expected_batch_time_triggers_step_down_before_the_slo_breaks():
    p = SwitchPolicy(V, slo_ms=10, cooldown_batches=5, down_cooldown_batches=1)
    # Queue 1 ms, p99 fine, but 4 samples at 9 ms each on "slow" would finish after 37 ms.
    assert p.choose(1.0, 1.0, batch_samples=4) == 1
    assert "expected run" in p.switches[0].reason
    # On "mid" (3 ms per sample) one sample fits: 1 + 3 = 4 ms < 9 ms, no further step.
    assert p.choose(1.0, 1.0, batch_samples=1) == 1
