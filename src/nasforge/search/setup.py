"""What a pipeline search needs besides its space: targets, latency, objectives, constraints.

The search stage (:mod:`nasforge.stages.search`, one body for every search space) builds its
study from these, so objectives, constraints, the deployed precision and GPU targets mean the
same in every space.
"""

from __future__ import annotations

from typing import Any

from nasforge.errors import NasforgeError, TargetError
from nasforge.hardware.predictor import LatencyPredictor
from nasforge.hardware.targets import GPU_DEVICES as GPU_DEVICES  # the local driver's import
from nasforge.hardware.targets import Target, get_target
from nasforge.search.objectives import (
    Constraint,
    budget_constraints,
    objective_columns,
    parse_constraint,
)


def deployed_precision(params: Any) -> str:
    """The precision whose latency and size the search optimises: what promotion ships."""
    return "int8" if params.promote.precision == "int8" else "fp32"


def resolve_targets(names: list[str]) -> list[Target]:
    """Look up every target; those that run here must be usable (one-line TargetError).

    A GPU target on a machine without one is kept: the search uses its latency model (a table
    profiled on a GPU node) without running it, and only its benchmark needs a GPU node.
    """
    targets = [get_target(n) for n in names]
    for t in targets:
        if not _remote_gpu(t):
            t.check_available()
    return targets


class SearchPredictor:
    """Latency of subnets on every target the search can model, at the deployed precision.

    Targets that run here are measured or predicted as ``search.latency_source`` says; a GPU
    target without a GPU here is predicted from its profiled table when one exists, and left out
    of the objectives otherwise (``skipped`` says why; its benchmark needs a GPU node).
    """

    def __init__(self, targets: list[Target], space: Any, params: Any, precision: str) -> None:
        sp = params.search
        progress = lambda msg: print(f"  {msg}", flush=True)  # noqa: E731
        here = [t for t in targets if not _remote_gpu(t)]
        remote = [t for t in targets if _remote_gpu(t)]
        self.predictors: list[LatencyPredictor] = []
        self.skipped: dict[str, str] = {}
        if here:
            self.predictors.append(
                LatencyPredictor(
                    here,
                    space,
                    batch_size=sp.latency_batch_size,
                    mode=sp.latency_source,
                    threads=params.run.threads,
                    progress=progress,
                    precision=precision,
                )
            )
        for t in remote:
            try:
                self.predictors.append(
                    LatencyPredictor(
                        [t],
                        space,
                        batch_size=sp.latency_batch_size,
                        mode="table",
                        threads=params.run.threads,
                        precision=precision,
                    )
                )
            except NasforgeError as err:
                why = (str(err).strip().splitlines() or [type(err).__name__])[0]
                self.skipped[t.name] = why
                print(
                    f"  {t.name}: left out of the search's objectives ({why}); "
                    "its benchmark needs a GPU node",
                    flush=True,
                )
        self.targets = [t for p in self.predictors for t in p.targets]
        if not self.targets:
            name, why = next(iter(self.skipped.items()))
            raise TargetError(f"no target's latency can be modelled here: {name}: {why}")

    def predict(self, spec: Any) -> dict[str, float]:
        """Latency in ms of ``spec`` on every modelled target."""
        out: dict[str, float] = {}
        for p in self.predictors:
            out.update(p.predict(spec))
        return out

    def describe(self) -> dict[str, Any]:
        """How each target's latency is obtained (and why a target is not modelled)."""
        out: dict[str, Any] = {}
        for p in self.predictors:
            out.update(p.describe())
        for name, why in self.skipped.items():
            out[name] = {"source": "not modelled", "why": why}
        return out


def _remote_gpu(t: Target) -> bool:
    return t.needs_gpu and not t.is_available()


def search_constraints(params: Any, target_names: list[str]) -> tuple[list[Constraint], list[str]]:
    """``search.constraints`` and the budgets, as constraints of the study, plus notes."""
    out: list[Constraint] = []
    for text in params.search.constraints:
        out += parse_constraint(text, target_names, "search.constraints")
    budgets, notes = budget_constraints(
        params.budgets,
        target_names,
        params.search.budget_accuracy_margin,
        params.search.latency_batch_size,
    )
    return out + budgets, notes


def objective_setup(params: Any, predictor: Any) -> dict[str, Any]:
    """Objective columns, constraints and notes of this run's search."""
    names = [t.name for t in predictor.targets]
    objectives = objective_columns(params.search.objectives, names)
    constraints, notes = search_constraints(params, names)
    for name in getattr(predictor, "skipped", {}):
        # A constraint on a target the search cannot model is left to promotion.
        kept = [c for c in constraints if f"[{name}]" not in c.metric]
        if len(kept) != len(constraints):
            notes.append(f"constraints on {name} left to promotion: its latency is not modelled")
        constraints = kept
    return {"objectives": objectives, "constraints": constraints, "notes": notes}


def sampler_options(params: Any) -> dict[str, Any]:
    """The strategy's settings: sized to the trial budget, then what params set."""
    from nasforge.search.samplers import default_sampler_options

    sp = params.search
    return {**default_sampler_options(sp.strategy, sp.trials), **sp.sampler_options}
