"""search: train a weight-sharing supernet, then search its subnets for the Pareto set.

Objectives (``search.objectives``, all minimised; :mod:`nasforge.search.objectives`): validation
error of the subnet with inherited weights (after BN recalibration), latency of the deployed
precision on every target (measured here or predicted from a profiled table for runtime targets,
looked up for table targets, from a GPU node's table for GPU targets), memory, energy,
parameters, MACs. ``search.constraints`` and the budgets are constraints of the study; degenerate
cells (no input-to-output path) are never evaluated. The search is an Optuna study
(:func:`nasforge.search.study.run_study`) whose sampler comes from
:func:`nasforge.search.samplers.make_sampler` — the same strategy code as the tabular benchmark —
kept in the stage's work folder, so a killed search resumes without re-evaluating trials.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from optuna.distributions import CategoricalDistribution

from nasforge.atomic import save_safetensors
from nasforge.checkpoint import checkpoint_for, current_work_dir
from nasforge.config import Params
from nasforge.data.prepared import load_prepared
from nasforge.hardware.spaces import CellBlockSpace
from nasforge.search.setup import (
    SearchPredictor,
    deployed_precision,
    objective_setup,
    resolve_targets,
    sampler_options,
)
from nasforge.search.study import (
    finish_search,
    pareto_fields,
    run_study,
    select_candidates,
    skipped_trials,
)
from nasforge.search.subnet_metrics import SubnetMetrics
from nasforge.space.cell import CellNetworkShape, is_connected
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


def _connected(params: dict[str, Any]) -> bool:
    return is_connected(CellSpec(tuple(params[n] for n in PARAM_NAMES)))


def _describe_cell(p: dict[str, Any]) -> dict[str, Any]:
    spec = CellSpec(tuple(p[n] for n in PARAM_NAMES))
    return {"arch_str": spec.arch_str, "ops": list(spec.ops)}


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
    # Latency models first: a target that cannot be modelled fails before the supernet trains.
    precision = deployed_precision(params)
    predictor = SearchPredictor(
        targets, CellBlockSpace(shape, data.input_shape[1:]), params, precision
    )
    supernet = CellSupernet(shape)
    x_train, y_train = data.tensors("train")
    x_val, y_val = data.tensors("val")

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
    save_safetensors(
        {k: v.contiguous() for k, v in supernet.state_dict().items()},
        output / "supernet.safetensors",
    )

    setup = objective_setup(params, predictor)
    measurer = SubnetMetrics(
        predictor, data.input_shape, precision, sp.latency_batch_size, params.run.threads
    )
    nb, bs = sp.bn_recalibration_batches, sp.batch_size
    calibration = [x_train[i * bs : (i + 1) * bs] for i in range(nb)]
    cache: dict[str, dict[str, float]] = {}

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        spec = CellSpec(tuple(p[n] for n in PARAM_NAMES))
        if spec.arch_str not in cache:
            supernet.set_active_subnet(spec)
            subnet = supernet.get_active_subnet()
            if calibration:
                recalibrate_bn(subnet, calibration)
            acc = accuracy(subnet, x_val, y_val)
            cache[spec.arch_str] = {
                "val_error": 1.0 - acc,
                "val_accuracy": acc,
                **measurer.measure(subnet, spec, spec.arch_str),
            }
        return cache[spec.arch_str]

    prior, darts = (
        darts_prior(params, shape, x_train, y_train) if sp.prior == "darts" else (None, None)
    )
    t1 = time.perf_counter()
    # The study lives in the work folder, which outlives a killed attempt: a rerun keeps every
    # finished trial. It is copied into the output when the search is done.
    records = run_study(
        evaluate,
        objectives=setup["objectives"],
        distributions={n: CategoricalDistribution(list(OPS)) for n in PARAM_NAMES},
        strategy=sp.strategy,
        seed=params.run.seed,
        trials=sp.trials,
        storage=f"sqlite:///{work / 'study.db'}",
        study_name=STUDY_NAME,
        constraints=setup["constraints"],
        is_valid=_connected,
        search_space=search_space(),
        prior=prior,
        sampler_options=sampler_options(params),
        # The largest subnet is the distillation teacher; evaluating it first anchors the front.
        first=dict(zip(PARAM_NAMES, LARGEST_SPEC.ops, strict=True)),
        describe=_describe_cell,
        progress=lambda msg: print(f"  {msg}", flush=True),
    )
    search_seconds = time.perf_counter() - t1
    if work != output:
        shutil.copy2(work / "study.db", output / "study.db")
    candidates = select_candidates(
        records,
        setup["objectives"],
        sp.max_candidates,
        sp.candidate_accuracy_window,
        setup["constraints"],
    )
    pareto = {
        "space": "cell",
        "shape": shape.to_dict(),
        "teacher": {"arch_str": LARGEST_SPEC.arch_str},
        "targets": [t.describe() for t in targets],
        "latency_sources": predictor.describe(),
        **pareto_fields(setup, measurer, precision, records, candidates),
        "skipped_degenerate": skipped_trials(f"sqlite:///{work / 'study.db'}", STUDY_NAME),
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
        unique_subnets=len(cache),
    )


def run_macro(params: Params, dataset: Path, output: Path) -> StageResult:
    """The search stage over the macro elastic space (MobileNetV2 / Once-for-All style).

    Progressive shrinking of a :class:`~nasforge.supernet.macro_supernet.MacroSupernet`, then
    the same strategies and Optuna study as the cell search
    (:func:`nasforge.supernet.macro_search.run_macro_search`), with the same objectives,
    constraints and targets (:mod:`nasforge.search.setup`).

    Raises:
        ConfigError: a DARTS prior (cell space only) or a table target (its CSV is keyed by
            NB201 cells) was asked for.
    """
    from nasforge.errors import ConfigError
    from nasforge.supernet.macro_search import run_macro_search

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
    return run_macro_search(params, dataset, output)


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
