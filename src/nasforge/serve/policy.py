"""SLO-aware choice of a Pareto variant per batch, with hysteresis.

Variants are ordered fastest first (index 0 = lowest latency, usually lowest accuracy). The
policy starts on the most accurate variant that fits the memory budget and, before each batch,
looks at what the server has observed lately:

* **step down** (to the next faster variant) when the recent p99 latency or queue delay
  exceeds ``high_water`` × the SLO — the server is falling behind; given the batch size, also
  when the queue delay plus the batch's expected run time on the current variant would exceed
  it (so the step happens before the batch that would break the objective runs);
* **step up** (to the next more accurate variant) only when p99 is under ``low_water`` × the
  SLO *and* the queue is nearly empty, for ``cooldown_batches`` batches in a row since the last
  switch — load really dropped.

The gap between the two water marks plus the cool-down is the hysteresis: a load level near the
boundary keeps the current variant instead of flapping. When the server also reports the recent
arrival rate, a step up additionally needs the more accurate variant to keep up with it: rate ×
that variant's observed seconds per sample (from :meth:`SwitchPolicy.observe`; its batch-1
latency until it has served) must stay under ``max_utilization``. Without this, a load above the
larger variant's capacity makes the policy climb back every cool-down, overload, and fall again. Every switch is recorded (from, to,
reason) so the server can log it and count it in its metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from nasforge.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class VariantInfo:
    """What the policy knows about one variant.

    Attributes:
        name: Display name.
        latency_ms: Batch-1 latency p50 used for ordering (ms).
        accuracy: Test accuracy, or ``None`` if unknown.
        memory_bytes: Memory the variant needs while loaded (model bytes as an estimate).
    """

    name: str
    latency_ms: float
    accuracy: float | None
    memory_bytes: int


@dataclasses.dataclass(frozen=True)
class Switch:
    """One variant switch."""

    batch: int
    from_index: int
    to_index: int
    reason: str


class SwitchPolicy:
    """Pick the variant for the next batch from observed p99 latency and queue delay.

    Args:
        variants: Variants ordered by ``latency_ms`` ascending (fastest first).
        slo_ms: p99 latency objective (end to end on the server, queue included).
        memory_budget_bytes: Variants needing more are never chosen; ``None`` = no limit.
        high_water: Step down when p99 or queue delay exceeds ``high_water * slo_ms``.
        low_water: Step up only when p99 is below ``low_water * slo_ms``.
        cooldown_batches: Batches to wait after a switch before stepping up again.
        down_cooldown_batches: Batches to wait after a switch before stepping down again, so
            latencies of the previous variant still in the window do not cascade the policy
            straight to the fastest variant.
        max_utilization: Step up only if the recent arrival rate would keep the more accurate
            variant busy less than this share of the time (used when a rate is passed).

    Raises:
        ConfigError: Bad thresholds, unordered variants, or no variant fits the memory budget.
    """

    def __init__(
        self,
        variants: Sequence[VariantInfo],
        slo_ms: float,
        memory_budget_bytes: int | None = None,
        high_water: float = 0.9,
        low_water: float = 0.5,
        cooldown_batches: int = 20,
        down_cooldown_batches: int = 3,
        max_utilization: float = 0.7,
    ) -> None:
        if not variants:
            raise ConfigError("variant switching needs at least one variant")
        if slo_ms <= 0:
            raise ConfigError(f"slo_ms must be > 0, got {slo_ms}")
        if not 0 < low_water < high_water:
            raise ConfigError(
                f"need 0 < low_water < high_water, got low={low_water} high={high_water}"
            )
        if cooldown_batches < 1 or down_cooldown_batches < 1:
            raise ConfigError("cooldown_batches and down_cooldown_batches must be >= 1")
        if not 0 < max_utilization <= 1:
            raise ConfigError(f"max_utilization must be in (0, 1], got {max_utilization}")
        lat = [v.latency_ms for v in variants]
        if lat != sorted(lat):
            raise ConfigError("variants must be ordered by latency, fastest first")
        self.variants = list(variants)
        self.slo_ms = float(slo_ms)
        self.high_water = high_water
        self.low_water = low_water
        self.cooldown_batches = cooldown_batches
        self.down_cooldown_batches = down_cooldown_batches
        self.max_utilization = max_utilization
        # Seconds per sample of each variant: batch-1 latency until observed serving (EMA).
        self.sec_per_sample = [v.latency_ms / 1000 for v in self.variants]
        self.allowed = [
            i
            for i, v in enumerate(self.variants)
            if memory_budget_bytes is None or v.memory_bytes <= memory_budget_bytes
        ]
        if not self.allowed:
            smallest = min(v.memory_bytes for v in self.variants)
            raise ConfigError(
                f"no variant fits the memory budget of {memory_budget_bytes} bytes "
                f"(smallest needs {smallest})"
            )
        self.current = self.allowed[-1]
        self.switches: list[Switch] = []
        self._batches = 0
        self._since_switch = cooldown_batches

    def observe(self, index: int, samples: int, seconds: float, smoothing: float = 0.2) -> None:
        """Record that variant ``index`` ran a batch of ``samples`` in ``seconds``."""
        if samples > 0 and seconds > 0:
            old = self.sec_per_sample[index]
            self.sec_per_sample[index] = (1 - smoothing) * old + smoothing * seconds / samples

    def choose(
        self,
        p99_ms: float | None,
        queue_delay_ms: float,
        rate_per_s: float | None = None,
        batch_samples: int | None = None,
    ) -> int:
        """Return the variant index for the next batch and record a switch if it changes.

        Args:
            p99_ms: p99 latency over the recent window, ``None`` before any request finished.
            queue_delay_ms: Queue delay of the batch about to run (oldest request in it).
            rate_per_s: Recent arrival rate in samples per second, if known (gates step-ups).
            batch_samples: Samples in the batch about to run, if known: the expected latency
                of its oldest request (queue delay + run time) can trigger a step down.

        Returns:
            Index into ``variants``.
        """
        self._batches += 1
        self._since_switch += 1
        pos = self.allowed.index(self.current)
        hi = self.high_water * self.slo_ms
        lo = self.low_water * self.slo_ms
        expected_ms = queue_delay_ms
        if batch_samples:
            expected_ms += 1000 * self.sec_per_sample[self.current] * batch_samples
        overloaded = (expected_ms > hi or (p99_ms is not None and p99_ms > hi)) and (
            self._since_switch >= self.down_cooldown_batches
        )
        # The queue must be nearly empty too: a low p99 of the faster variant alone would
        # otherwise invite stepping up while requests still pile up.
        relaxed = (
            p99_ms is not None
            and p99_ms < lo
            and queue_delay_ms < lo / 2
            and self._since_switch >= self.cooldown_batches
        )
        if relaxed and rate_per_s is not None and pos < len(self.allowed) - 1:
            nxt = self.allowed[pos + 1]
            relaxed = rate_per_s * self.sec_per_sample[nxt] < self.max_utilization
        if overloaded and pos > 0:
            reason = (
                f"p99 {p99_ms if p99_ms is not None else float('nan'):.2f} ms / queue "
                f"{queue_delay_ms:.2f} ms (+ expected run {expected_ms - queue_delay_ms:.2f} ms) "
                f"above {hi:.2f} ms"
            )
            self._switch(self.allowed[pos - 1], reason)
        elif relaxed and pos < len(self.allowed) - 1:
            reason = (
                f"p99 {p99_ms:.2f} ms below {lo:.2f} ms and queue {queue_delay_ms:.2f} ms "
                f"for {self._since_switch} batches"
            )
            self._switch(self.allowed[pos + 1], reason)
        return self.current

    def _switch(self, to: int, reason: str) -> None:
        self.switches.append(Switch(self._batches, self.current, to, reason))
        self.current = to
        self._since_switch = 0
