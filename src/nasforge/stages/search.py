"""search: train a weight-sharing supernet, then search its subnets for the Pareto set.

Objectives (all minimised): validation error of the subnet with inherited weights (after BN
recalibration), latency on every target (measured here for runtime targets, looked up for table
targets), and parameter count. The search is an Optuna study whose sampler comes from
:func:`nasforge.search.samplers.make_sampler` — the same strategy code as the tabular benchmark —
stored in SQLite in the output folder, so a killed search resumes without re-evaluating trials.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from safetensors.torch import save_file

from nasforge.checkpoint import checkpoint_for, current_work_dir
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.hardware.predictor import LatencyPredictor
from nasforge.hardware.spaces import CellBlockSpace
from nasforge.hardware.targets import Target, get_target
from nasforge.search.pareto import non_domination_rank
from nasforge.search.samplers import make_sampler
from nasforge.space.cell import CellNetworkShape, count_parameters, is_connected
from nasforge.space.nb201 import OPS, PARAM_NAMES, CellSpec, search_space
from nasforge.stages import StageResult
from nasforge.supernet.cell_supernet import (
    LARGEST_SPEC,
    CellSupernet,
    recalibrate_bn,
    train_supernet_uniform,
)
from nasforge.training import accuracy

STUDY_NAME = "nasforge-search"


def network_shape(
    params: Params, input_shape: tuple[int, ...], num_classes: int
) -> CellNetworkShape:
    """The network shape the search space is built with."""
    return CellNetworkShape(
        in_channels=input_shape[0],
        num_classes=num_classes,
        channels=params.space.channels,
        cells_per_stage=params.space.cells_per_stage,
    )


def resolve_targets(names: list[str]) -> list[Target]:
    """Look up every target and check it can be used here (one-line TargetError otherwise)."""
    targets = [get_target(n) for n in names]
    for t in targets:
        t.check_available()
    return targets


class SubnetEvaluator:
    """Scores subnets of a trained supernet on every objective; caches repeated specs."""

    def __init__(
        self, supernet: CellSupernet, params: Params, data, predictor: LatencyPredictor
    ) -> None:
        self.supernet = supernet
        self.params = params
        self.predictor = predictor
        self.x_train, _ = data.tensors("train")
        self.x_val, self.y_val = data.tensors("val")
        self.cache: dict[str, dict[str, float]] = {}

    def objective_names(self) -> list[str]:
        """Names of the objectives, in the study's order."""
        return (
            ["val_error"] + [f"latency_ms[{t.name}]" for t in self.predictor.targets] + ["params"]
        )

    def evaluate(self, spec: CellSpec) -> dict[str, float]:
        """All objective values of ``spec`` (cached by ``arch_str``)."""
        if spec.arch_str in self.cache:
            return self.cache[spec.arch_str]
        self.supernet.set_active_subnet(spec)
        subnet = self.supernet.get_active_subnet()
        nb = self.params.search.bn_recalibration_batches
        if nb:
            bs = self.params.search.batch_size
            recalibrate_bn(subnet, [self.x_train[i * bs : (i + 1) * bs] for i in range(nb)])
        values = {"val_error": 1.0 - accuracy(subnet, self.x_val, self.y_val)}
        for name, ms in self.predictor.predict(spec).items():
            values[f"latency_ms[{name}]"] = float(ms)
        values["params"] = float(count_parameters(subnet))
        self.cache[spec.arch_str] = values
        return values


def resume_study(study: optuna.Study) -> int:
    """Prepare a study that a killed search left behind; returns its finished trials.

    A trial still RUNNING was being evaluated when the process died (one process owns a local
    study): it is marked FAIL so it is neither counted nor waited for, and its architecture is
    proposed again by the sampler if it is still worth it.
    """
    finished = 0
    for t in study.trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        elif t.state == optuna.trial.TrialState.COMPLETE:
            finished += 1
    if finished:
        print(f"  resumed the search: {finished} finished trials kept", flush=True)
    return finished


def _connected_cell(record: dict[str, Any]) -> bool:
    return is_connected(CellSpec(tuple(record["ops"])))


def select_candidates(
    records: list[dict[str, Any]],
    names: list[str],
    k: int,
    accuracy_window: float = 1.0,
    structurally_valid: Callable[[dict[str, Any]], bool] = _connected_cell,
) -> list[dict[str, Any]]:
    """Pick up to ``k`` candidates: the first non-dominated front, spread over accuracy, then the next
    fronts if the first is smaller than ``k``. Each record gets its ``rank``.

    Only eligible subnets are picked: ``structurally_valid`` ones (for cells: connected — a
    disconnected cell is a constant function, trivially "optimal" on latency and size) within
    ``accuracy_window`` of the best validation accuracy (the same region of interest as the
    tabular benchmark's metric).

    Raises:
        ConfigError: No trials, or none eligible.
    """
    from nasforge.errors import ConfigError

    if not records:
        raise ConfigError("the search produced no trials")
    losses = np.array([[r["objectives"][n] for n in names] for r in records], dtype=float)
    ranks = non_domination_rank(losses)
    for r, rank in zip(records, ranks, strict=True):
        r["rank"] = int(rank)
    best_err = min(r["objectives"]["val_error"] for r in records)
    eligible = [
        r
        for r in records
        if structurally_valid(r)
        and r["objectives"]["val_error"] <= best_err + accuracy_window + 1e-12
    ]
    if not eligible:
        raise ConfigError("the search found no connected subnet; raise search.trials")
    # Ranks among the eligible only, so a dominated-but-eligible subnet can fill the set.
    elig_losses = np.array([[r["objectives"][n] for n in names] for r in eligible], dtype=float)
    elig_ranks = non_domination_rank(elig_losses)
    chosen: list[dict[str, Any]] = []
    for rank in sorted(set(int(x) for x in elig_ranks)):
        front = sorted(
            (r for r, rk in zip(eligible, elig_ranks, strict=True) if rk == rank),
            key=lambda r: r["objectives"]["val_error"],
        )
        need = k - len(chosen)
        if need <= 0:
            break
        if len(front) <= need:
            chosen.extend(front)
        else:
            # Evenly spaced along the front, always keeping its most accurate member.
            idx = np.unique(np.round(np.linspace(0, len(front) - 1, need)).astype(int))
            chosen.extend(front[i] for i in idx)
    return chosen


def run(params: Params, dataset: Path, output: Path) -> StageResult:
    """Train the supernet on ``dataset`` and write the Pareto candidates to ``output``.

    ``space.kind: macro`` searches the macro elastic space instead (:func:`run_macro`).
    """
    if params.space.kind == "macro":
        return run_macro(params, dataset, output)
    sp = params.search
    targets = resolve_targets(params.targets)
    data = load_prepared(dataset)
    torch.manual_seed(params.run.seed)
    shape = network_shape(params, data.input_shape, data.num_classes)
    supernet = CellSupernet(shape)
    x_train, y_train = data.tensors("train")

    work = current_work_dir() or output
    t0 = time.perf_counter()
    losses = train_supernet_uniform(
        supernet,
        x_train,
        y_train,
        epochs=sp.supernet_epochs,
        batch_size=sp.batch_size,
        lr=sp.lr,
        weight_decay=sp.weight_decay,
        seed=params.run.seed,
        log_every=max(1, sp.supernet_epochs // 5),
        checkpoint=checkpoint_for("supernet"),
    )
    supernet_seconds = time.perf_counter() - t0
    output.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in supernet.state_dict().items()},
        str(output / "supernet.safetensors"),
    )

    predictor = LatencyPredictor(
        targets,
        CellBlockSpace(shape, data.input_shape[1:]),
        batch_size=sp.latency_batch_size,
        mode=sp.latency_source,
        threads=params.run.threads,
        progress=lambda msg: print(f"  {msg}", flush=True),
    )
    evaluator = SubnetEvaluator(supernet, params, data, predictor)
    names = evaluator.objective_names()
    prior, darts = (
        darts_prior(params, shape, x_train, y_train) if sp.prior == "darts" else (None, None)
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The study lives in the work folder, which outlives a killed attempt: a rerun keeps every
    # finished trial. It is copied into the output when the search is done.
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=f"sqlite:///{work / 'study.db'}",
        directions=["minimize"] * len(names),
        sampler=make_sampler(
            sp.strategy, params.run.seed, search_space=search_space(), prior=prior
        ),
        load_if_exists=True,
    )
    resume_study(study)
    study.set_metric_names(names)
    distributions = {
        n: optuna.distributions.CategoricalDistribution(list(OPS)) for n in PARAM_NAMES
    }

    # The largest subnet is the distillation teacher; evaluating it first also anchors the front.
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        study.enqueue_trial({n: op for n, op in zip(PARAM_NAMES, LARGEST_SPEC.ops, strict=True)})
    t1 = time.perf_counter()
    while len(done) < sp.trials:
        # One sampler per trial, seeded by the trial's number: its proposals depend only on the
        # finished trials in the study, so a resumed search proposes what an uninterrupted one
        # would have (the strategies keep their state in the study, not in the sampler).
        study.sampler = make_sampler(
            sp.strategy,
            params.run.seed + len(done),
            search_space=search_space(),
            prior=prior,
        )
        trial = study.ask(distributions)
        spec = CellSpec(tuple(trial.params[n] for n in PARAM_NAMES))
        values = evaluator.evaluate(spec)
        study.tell(trial, [values[n] for n in names])
        trial_no = len(done) + 1
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if trial_no % max(1, sp.trials // 5) == 0 or trial_no == sp.trials:
            print(
                f"  search trial {trial_no}/{sp.trials}: {spec.arch_str} err={values['val_error']:.3f}",
                flush=True,
            )
    search_seconds = time.perf_counter() - t1
    if work != output:
        shutil.copy2(work / "study.db", output / "study.db")

    records = []
    for t in done:
        spec = CellSpec(tuple(t.params[n] for n in PARAM_NAMES))
        records.append(
            {
                "trial": t.number,
                "arch_str": spec.arch_str,
                "ops": list(spec.ops),
                "objectives": dict(zip(names, t.values, strict=True)),
            }
        )
    candidates = select_candidates(records, names, sp.max_candidates, sp.candidate_accuracy_window)
    pareto = {
        "objectives": names,
        "shape": shape.to_dict(),
        "teacher": {"arch_str": LARGEST_SPEC.arch_str},
        "targets": [t.describe() for t in targets],
        "latency_sources": predictor.describe(),
        "candidates": [{"id": f"cand-{i}", **c} for i, c in enumerate(candidates)],
        "front": [r for r in records if r["rank"] == 0],
        "energy": "estimated or not modelled in search; measured energy is reported by benchmark",
        "prior": darts,
    }
    return finish_search(
        output,
        pareto,
        records,
        losses,
        sp.strategy,
        supernet_seconds=supernet_seconds,
        search_seconds=search_seconds,
        unique_subnets=len(evaluator.cache),
    )


def finish_search(
    output: Path,
    pareto: dict[str, Any],
    records: list[dict[str, Any]],
    losses: list[float],
    strategy: str,
    *,
    supernet_seconds: float,
    search_seconds: float,
    unique_subnets: int,
    tags: dict[str, str] | None = None,
) -> StageResult:
    """Write ``pareto.json`` and ``history.json`` and summarize a search (either space)."""
    (output / "pareto.json").write_text(json.dumps(pareto, indent=2))
    (output / "history.json").write_text(
        json.dumps({"supernet_loss": losses, "trials": records, "strategy": strategy}, indent=2)
    )
    best = min(records, key=lambda r: r["objectives"]["val_error"])
    print(
        f"  Pareto front: {len(pareto['front'])} subnets; {len(pareto['candidates'])} candidates",
        flush=True,
    )
    return StageResult(
        metrics={
            "supernet_seconds": supernet_seconds,
            "search_seconds": search_seconds,
            "trials": len(records),
            "unique_subnets": unique_subnets,
            "front_size": len(pareto["front"]),
            "candidates": len(pareto["candidates"]),
            "best_val_accuracy": 1.0 - best["objectives"]["val_error"],
        },
        tags={"strategy": strategy, "best_arch_str": best["arch_str"], **(tags or {})},
        model_dir=output,
        artifacts=[output / "pareto.json", output / "history.json"],
    )


def run_macro(params: Params, dataset: Path, output: Path) -> StageResult:
    """The search stage over the macro elastic space (MobileNetV2 / Once-for-All style).

    Progressive shrinking of a :class:`~nasforge.supernet.macro_supernet.MacroSupernet`, then
    the same strategies and Optuna study as the cell search
    (:func:`nasforge.supernet.macro_search.run_macro_search`); latency objectives come from a
    :class:`LatencyPredictor` over the macro block space, resolved from ``targets`` as in the
    cell search.

    Raises:
        ConfigError: a DARTS prior (cell space only) or a table target (its CSV is keyed by
            NB201 cells) was asked for.
    """
    from nasforge.errors import ConfigError
    from nasforge.supernet.macro_search import (
        choices_from_params,
        macro_latency_predictor,
        run_macro_search,
    )

    sp = params.search
    if sp.prior != "none":
        raise ConfigError(
            f"search.prior '{sp.prior}' steers the cell space only (space.kind: cell)"
        )
    targets = resolve_targets(params.targets)
    tables = [t.name for t in targets if t.kind == "table"]
    if tables:
        raise ConfigError(
            f"target {tables[0]!r} looks latencies up by NB201 cell; the macro space needs "
            "runtime targets"
        )
    choices = choices_from_params(params)

    def predictor_factory(input_shape: tuple[int, ...], num_classes: int) -> LatencyPredictor:
        return macro_latency_predictor(
            targets,
            input_shape,
            num_classes,
            batch_size=sp.latency_batch_size,
            mode=sp.latency_source,
            threads=params.run.threads,
            progress=lambda msg: print(f"  {msg}", flush=True),
            choices=choices,
        )

    return run_macro_search(params, dataset, output, predictor_factory=predictor_factory)


def darts_prior(
    params: Params, shape: CellNetworkShape, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Run DARTS (first order, anti-collapse on) and return its op probabilities as a prior.

    Returns:
        The prior ``{edge: {op: probability}}`` for the hybrid sampler, and a JSON record of the
        run (derived cell, its share of parameter-free ops, per-edge probabilities, seconds).
    """
    from nasforge.supernet.darts import op_prior, param_free_share, run_darts

    sp = params.search
    t0 = time.perf_counter()
    result = run_darts(
        x, y, shape, epochs=sp.darts_epochs, seed=params.run.seed, batch_size=sp.batch_size
    )
    prior = op_prior(result.alpha)
    record = {
        "kind": "darts",
        "epochs": sp.darts_epochs,
        "derived_arch_str": result.spec.arch_str,
        "param_free_share": param_free_share(result.spec),
        "op_probabilities": prior,
        "seconds": time.perf_counter() - t0,
    }
    print(f"  DARTS prior ({sp.darts_epochs} epochs): derived {result.spec.arch_str}", flush=True)
    return prior, record


def load_pareto(search_dir: Path) -> dict[str, Any]:
    """Read ``pareto.json`` written by :func:`run`."""
    from nasforge.errors import ModelFileError

    f = Path(search_dir) / "pareto.json"
    if not f.is_file():
        raise ModelFileError(f"not a search output (no pareto.json): {search_dir}")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise ModelFileError(f"corrupt {f}: {err}") from None
