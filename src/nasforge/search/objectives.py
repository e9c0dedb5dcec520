"""What the pipeline's subnet search optimises and what it must satisfy.

Objectives (``search.objectives``) are kinds, expanded to study columns (all minimised):

========  ==========================  =====================================================
kind      column(s)                   what
========  ==========================  =====================================================
error     ``val_error``               1 - validation accuracy with inherited weights
latency   ``latency_ms[<target>]``    latency of the deployed precision, one per target
memory    ``memory_mb``               weights (deployed precision) + peak live activations
energy    ``energy_mj[<target>]``     energy per inference, measured or estimated (labelled)
params    ``params``                  parameter count
macs      ``macs``                    multiply-accumulates of one sample
========  ==========================  =====================================================

Constraints (``search.constraints`` and the budgets) are ``METRIC OP VALUE`` over those metrics
plus ``val_accuracy`` and ``size_mb`` (model bytes at the deployed precision / 1e6); a metric
with a per-target form but no ``[target]`` applies to every target. They enter the Optuna study
through the sampler's ``constraints_func`` (value <= 0 means satisfied).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from nasforge.errors import ConfigError

OBJECTIVE_KINDS: tuple[str, ...] = ("error", "latency", "memory", "energy", "params", "macs")
DEFAULT_OBJECTIVES: tuple[str, ...] = ("error", "latency", "memory")
PER_TARGET = {"latency": "latency_ms", "energy": "energy_mj"}
SINGLE = {"error": "val_error", "memory": "memory_mb", "params": "params", "macs": "macs"}
# Metrics a constraint may name (besides the objective columns), with their aliases.
ALIASES = {
    "accuracy": "val_accuracy",
    "val_accuracy": "val_accuracy",
    "error": "val_error",
    "val_error": "val_error",
    "latency": "latency_ms",
    "latency_ms": "latency_ms",
    "memory": "memory_mb",
    "memory_mb": "memory_mb",
    "energy": "energy_mj",
    "energy_mj": "energy_mj",
    "params": "params",
    "macs": "macs",
    "size": "size_mb",
    "size_mb": "size_mb",
}
PER_TARGET_METRICS = frozenset(PER_TARGET.values())
_CONSTRAINT = re.compile(
    r"^\s*(?P<metric>[a-z_]+)(?:\[(?P<target>[^\]]+)\])?\s*(?P<op><=|>=)\s*(?P<value>\S+)\s*$"
)


def objective_columns(kinds: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Study columns of the objective ``kinds`` for these target names, in a stable order."""
    cols: list[str] = []
    for kind in OBJECTIVE_KINDS:  # the documented order, whatever order params list them in
        if kind not in kinds:
            continue
        if kind in PER_TARGET:
            cols += [f"{PER_TARGET[kind]}[{t}]" for t in targets]
        else:
            cols.append(SINGLE[kind])
    return cols


def column_kind(column: str) -> str:
    """The objective kind of a study column (``latency_ms[x]`` -> ``latency``)."""
    base = column.split("[", 1)[0]
    for kind, name in {**PER_TARGET, **SINGLE}.items():
        if name == base:
            return kind
    raise ConfigError(f"not an objective column: {column!r}")


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One constraint on a metric of a subnet.

    Attributes:
        metric: Metric name (``val_accuracy``, ``latency_ms[onnxruntime-cpu]``, ``memory_mb`` ...).
        op: ``"<="`` or ``">="``.
        value: The bound.
        source: Where it came from (``search.constraints``, ``budgets.max_latency_ms`` ...).
    """

    metric: str
    op: str
    value: float
    source: str = "search.constraints"

    @property
    def text(self) -> str:
        """``metric op value``, as a user writes it."""
        return f"{self.metric} {self.op} {self.value:g}"

    def violation(self, metrics: Mapping[str, float]) -> float:
        """By how much ``metrics`` break this constraint (<= 0: satisfied), Optuna's convention.

        Raises:
            ConfigError: The metric was not measured.
        """
        if self.metric not in metrics:
            raise ConfigError(f"constraint {self.text!r}: metric {self.metric!r} not measured")
        v = float(metrics[self.metric])
        if not math.isfinite(v):
            return math.inf
        return v - self.value if self.op == "<=" else self.value - v

    def as_dict(self) -> dict[str, Any]:
        """JSON form (``pareto.json``'s ``constraints``)."""
        return {"metric": self.metric, "op": self.op, "value": self.value, "source": self.source}


def parse_constraint(
    text: str, targets: Sequence[str] | None = None, source: str = "search.constraints"
) -> list[Constraint]:
    """Parse ``"METRIC OP VALUE"`` (e.g. ``"memory_mb <= 0.5"``, ``"accuracy >= 0.9"``).

    A per-target metric without ``[target]`` becomes one constraint per target.

    Args:
        text: The constraint.
        targets: The run's target names (checked when given; needed to expand per-target
            metrics).
        source: Recorded with the constraint.

    Raises:
        ConfigError: Bad syntax, unknown metric or target, non-finite value.
    """
    m = _CONSTRAINT.match(text)
    if not m:
        raise ConfigError(
            f"{source}: {text!r} is not 'METRIC <= VALUE' or 'METRIC >= VALUE' "
            f"(metrics: {', '.join(sorted(set(ALIASES.values())))})"
        )
    base = ALIASES.get(m["metric"])
    if base is None:
        raise ConfigError(
            f"{source}: unknown metric {m['metric']!r} in {text!r}; "
            f"choose from {', '.join(sorted(set(ALIASES.values())))}"
        )
    try:
        value = float(m["value"])
    except ValueError:
        raise ConfigError(f"{source}: {m['value']!r} in {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{source}: the bound in {text!r} must be finite")
    target = m["target"]
    if target is not None and base not in PER_TARGET_METRICS:
        raise ConfigError(f"{source}: {base} is not per target; drop [{target}] in {text!r}")
    if target is not None and targets is not None and target not in targets:
        raise ConfigError(
            f"{source}: {text!r} names target {target!r}, not one of targets {list(targets)}"
        )
    if base in PER_TARGET_METRICS and target is None:
        if targets is None:
            return [Constraint(base, m["op"], value, source)]
        return [Constraint(f"{base}[{t}]", m["op"], value, source) for t in targets]
    metric = f"{base}[{target}]" if target else base
    return [Constraint(metric, m["op"], value, source)]


def budget_constraints(
    budgets: Any, targets: Sequence[str], accuracy_margin: float, latency_batch_size: int
) -> tuple[list[Constraint], list[str]]:
    """The budgets as search constraints, and notes on the budgets left to promotion.

    ``min_accuracy`` is checked on accuracy with inherited weights, which fine-tuning with
    distillation raises: the search asks for ``min_accuracy - accuracy_margin`` (promotion still
    applies the exact budget). ``max_latency_ms`` is promotion's batch-1 latency, so it becomes a
    search constraint only when the search measures batch 1. ``max_size_mb`` bounds the model's
    bytes at the deployed precision.
    """
    out: list[Constraint] = []
    notes: list[str] = []
    if budgets.min_accuracy > 0:
        bound = max(0.0, budgets.min_accuracy - accuracy_margin)
        out.append(Constraint("val_accuracy", ">=", bound, "budgets.min_accuracy"))
    if budgets.max_latency_ms is not None:
        if latency_batch_size == 1:
            out += [
                Constraint(
                    f"latency_ms[{t}]", "<=", budgets.max_latency_ms, "budgets.max_latency_ms"
                )
                for t in targets
            ]
        else:
            notes.append(
                f"budgets.max_latency_ms is a batch-1 budget and the search measures batch "
                f"{latency_batch_size}: left to promotion"
            )
    if budgets.max_size_mb is not None:
        out.append(Constraint("size_mb", "<=", budgets.max_size_mb, "budgets.max_size_mb"))
    return out, notes


def check_feasible(
    metrics: Mapping[str, float], constraints: Sequence[Constraint]
) -> tuple[bool, dict[str, float]]:
    """Whether ``metrics`` meet every constraint, and the violated ones with their amounts."""
    violations = {}
    for c in constraints:
        v = c.violation(metrics)
        if v > 0:
            violations[c.text] = v
    return not violations, violations


def explain_infeasible(
    records: Sequence[Mapping[str, Any]], constraints: Sequence[Constraint]
) -> str:
    """One line saying which constraint held every trial back, and the closest trial to it."""
    worst = None
    for c in constraints:
        broken = [r for r in records if c.violation(r["metrics"]) > 0]
        if worst is None or len(broken) > len(worst[1]):
            worst = (c, broken)
    if worst is None or not worst[1]:
        return "no trial satisfies every constraint"
    c, broken = worst
    best = min(records, key=lambda r: c.violation(r["metrics"]))
    return (
        f"no trial satisfies every constraint; {c.text} ({c.source}) rules out {len(broken)} of "
        f"{len(records)}; the closest, {best.get('arch_str', best.get('trial'))}, has "
        f"{c.metric} = {best['metrics'][c.metric]:.4g}"
    )
