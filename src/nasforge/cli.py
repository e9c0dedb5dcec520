"""``nasforge`` command line: one sub-command per stage, plus run / pipeline / bench-search / targets.

The stage sub-commands are built from the stage declarations (:mod:`nasforge.stages.declarations`):
one option per declared input, run through :func:`nasforge.stages.runner.execute`.

User errors (:class:`nasforge.errors.NasforgeError`) print one line ``error: ...`` on stderr and
exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nasforge import __version__
from nasforge.errors import ConfigError, NasforgeError
from nasforge.stages.declarations import DECLARATIONS, StageDeclaration, declaration


def _common(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        help="the params file (default: the built-in defaults, not ./params.yaml)",
    )
    if output:
        p.add_argument(
            "--output",
            type=Path,
            required=True,
            help="output folder; replaced only when the stage succeeds (a failure leaves the "
            "previous one); an interrupted stage run again with the same inputs resumes from "
            "its work folder beside it",
        )
    p.add_argument(
        "--parent-run-id",
        default=os.environ.get("NASFORGE_PARENT_RUN_ID"),
        help="MLflow run to nest this stage's run under (default: $NASFORGE_PARENT_RUN_ID, "
        "else not nested)",
    )
    p.add_argument(
        "--run-name",
        default=None,
        help="name of this stage's MLflow run (default: the stage, with its candidate or target "
        "where it has one, e.g. train-cand-0, as in a pipeline)",
    )
    p.add_argument(
        "--no-tracking",
        action="store_true",
        help="do not log to MLflow or push to the DVC remote (params' tracking section)",
    )


#: Stage commands that can do something else instead of running the stage (option, metavar,
#: help): their declared options are then optional, and checked when the stage runs.
_ALTERNATIVES = {
    "promote": (
        "--rollback",
        "TARGET",
        "withdraw TARGET's champion and restore the previous one (nothing else runs)",
    ),
}


def _stage_parser(sub, decl: StageDeclaration) -> argparse.ArgumentParser:
    """The subcommand of a stage: ``--params``, ``--output`` and one option per declared input."""
    alternative = decl.name in _ALTERNATIVES
    p = sub.add_parser(decl.name, help=decl.help)
    _common(p, output=not alternative)
    if alternative:
        p.add_argument("--output", type=Path, help="output folder (replaced on success)")
    for inp in decl.inputs:
        kwargs: dict = {
            "dest": inp.name,
            "metavar": inp.option.removeprefix("--").upper(),
            "required": not alternative,
            "help": inp.help,
        }
        if inp.is_path:
            kwargs["type"] = Path
            if inp.kind == "artifacts":
                kwargs["nargs"] = "+"
        elif inp.kind == "int":
            kwargs["type"] = int
        p.add_argument(inp.option, **kwargs)
    if alternative:
        option, metavar, what = _ALTERNATIVES[decl.name]
        p.add_argument(option, metavar=metavar, default=None, help=what)
    return p


RUN_DESCRIPTION = """\
Run the whole pipeline on this machine with kfp.local (no cluster): prepare-data, search,
then per candidate train, prune, qat, export and a benchmark per target, then promote (MLflow
registry, champion-<target> aliases) and report. Runs and models are tracked in the MLflow
store of the params' tracking.uri, every dataset and model is versioned in tracking.dvc_remote.

The console shows one line per task as it starts and ends (its candidate and target, tasks
done of all, elapsed time, an estimate of the rest); on a terminal, bars follow the supernet
epochs, search trials, fine-tuning epochs and timed benchmark runs. When the output is not a
terminal (CI, a file) the lines are plain. Each task's own output, and kfp.local's, goes to
RUNS_DIR/<run-id>/logs/<task>.log; the log of a failing task is named on the console.

Resume: a run that did not finish (killed at any moment, interrupted, or failed) continues
when the same command is run again with the same params, code and dataset: the same run under
the same MLflow parent run; finished tasks are not run again, the search keeps its finished
trials and supernet, train/prune/qat continue after their last finished epoch. --fresh starts
over instead."""

RUN_EPILOG = """\
exit status: 0 done; 2 bad input or a failed task (the last line is "error: <stage>: <its
error>"); 130 interrupted (resumable)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    ap = argparse.ArgumentParser(
        prog="nasforge", description="Hardware-aware NAS and compression pipeline."
    )
    ap.add_argument("--version", action="version", version=f"nasforge {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for decl in DECLARATIONS:
        _stage_parser(sub, decl)

    p = sub.add_parser(
        "run",
        help="run the whole pipeline on this machine (kfp.local); rerun to resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG,
    )
    p.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        metavar="FILE",
        help="the params file (default: params.yaml in the current folder). It is checked "
        "before anything starts: a bad field, a missing dataset, an unknown or unavailable "
        "target or an unreachable tracking server stops the run in one line. Its tracking.uri "
        "(default sqlite:///mlflow.db) and tracking.dvc_remote (default .dvcstore) are relative "
        "to the current folder",
    )
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs"),
        metavar="DIR",
        help="where everything the run writes goes (default: runs): <run-id>/ (named by the "
        "MLflow parent run; report.html, summary.json, logs/ with one log per task), latest/ (a "
        "copy of the last finished run), "
        "kfp-local/ (every task's output: models, exports, benchmarks) and .resume/ (the state "
        "of unfinished runs)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run even if an unfinished run with the same params, code and dataset "
        "exists (default: resume it, under the same MLflow run)",
    )

    p = sub.add_parser("pipeline", help="compile, submit or schedule the KFP pipeline")
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    c = psub.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    c.add_argument(
        "--output",
        type=Path,
        default=Path("pipelines/compiled/nasforge_pipeline.yaml"),
        help="the YAML to write (default: pipelines/compiled/nasforge_pipeline.yaml)",
    )
    which = c.add_mutually_exclusive_group()
    which.add_argument("--params", type=Path, default=None, help="compile for this file's targets")
    which.add_argument(
        "--targets",
        default=None,
        help="comma-separated targets (default: onnxruntime-cpu,openvino-cpu,tensorrt-gpu)",
    )
    for action in ("submit", "schedule"):
        c = psub.add_parser(
            action,
            help="submit one run to a KFP server"
            if action == "submit"
            else "create a recurring run on a KFP server",
        )
        c.add_argument(
            "--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80"
        )
        c.add_argument(
            "--package",
            type=Path,
            default=None,
            help="compiled pipeline (default: compile one for the params' targets)",
        )
        c.add_argument(
            "--params",
            type=Path,
            default=Path("params.yaml"),
            help="the params passed to the run(s) (default: params.yaml)",
        )
        c.add_argument(
            "--experiment",
            default="nasforge",
            help="KFP experiment to file the run(s) under (default: nasforge; created if missing)",
        )
        if action == "submit":
            c.add_argument(
                "--run-name", default=None, help="display name (default: nasforge <UTC time>)"
            )
            c.add_argument(
                "--wait",
                action="store_true",
                help="wait for the run to end; fail unless it succeeded",
            )
            c.add_argument(
                "--timeout",
                type=int,
                default=6 * 3600,
                help="with --wait, seconds to wait (default: 21600)",
            )
        else:
            c.add_argument("--cron", required=True, help="KFP 6-field cron, e.g. '0 0 3 * * *'")
            c.add_argument(
                "--job-name",
                default="nasforge-nightly",
                help="name of the recurring run (default: nasforge-nightly)",
            )

    p = sub.add_parser(
        "bench-search", help="benchmark search strategies on a tabular NAS benchmark"
    )
    p.add_argument(
        "--table", type=Path, required=True, help="CSV with arch_str and the objective columns"
    )
    p.add_argument("--objectives", required=True, help="COL:max,COL:min[,...]")
    p.add_argument(
        "--strategies",
        default="optuna-random,optuna-tpe,optuna-nsga2,regevo,hybrid",
        help="comma-separated strategies (default: %(default)s)",
    )
    p.add_argument(
        "--budgets",
        default="100,300",
        help="evaluation budgets reported, comma-separated (default: 100,300)",
    )
    p.add_argument(
        "--seeds", type=int, default=20, help="seeds per strategy, shared for pairing (default: 20)"
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument(
        "--constraint",
        action="append",
        default=[],
        help="COL:>=:VALUE or COL:<=:VALUE (repeatable); HV then counts feasible cells only",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder for <name>.json, <name>.md and <name>.png"
    )

    p = sub.add_parser(
        "serve", help="serve a target's models over HTTP (dynamic batching, switching)"
    )
    p.add_argument("--source", required=True, help="benchmark/export folder, or 'registry'")
    p.add_argument("--target", required=True, help="runtime target, e.g. onnxruntime-cpu")
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, local only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="most requests grouped into one model run (default: 8)",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=5.0,
        help="how long to wait to fill a batch (default: 5)",
    )
    p.add_argument("--slo-ms", type=float, default=50.0, help="p99 latency objective (default: 50)")
    p.add_argument(
        "--no-switching", action="store_true", help="serve only the most accurate variant"
    )
    p.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="do not load variants whose model files are larger (default: no limit)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="runtime threads (default: physical cores)"
    )
    p.add_argument(
        "--tracking-uri",
        default="sqlite:///mlflow.db",
        help="MLflow tracking URI for --source registry (default: sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--only-champion",
        action="store_true",
        help="with --source registry: serve the champion only, not every version",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="larger request bodies get 413, refused while reading (default: 8 MiB)",
    )
    p.add_argument(
        "--max-items-per-request",
        type=int,
        default=64,
        help="more inputs in one request get 413 (default: 64)",
    )

    p = sub.add_parser("profile", help="build a latency lookup table of a search space on a target")
    p.add_argument("--target", required=True, help="runtime target, e.g. onnxruntime-cpu")
    p.add_argument(
        "--space",
        default=None,
        help="search space, as space.kind in params (default: cell; built in: cell, macro; "
        "macro reads only --input-shape/--num-classes and profiles its whole space)",
    )
    p.add_argument(
        "--input-shape", default="3,32,32", help="C,H,W of the network input (default: 3,32,32)"
    )
    p.add_argument("--num-classes", type=int, default=10, help="classes (default: 10)")
    p.add_argument(
        "--channels", type=int, default=16, help="cell space: stem channels (default: 16)"
    )
    p.add_argument(
        "--cells-per-stage", type=int, default=1, help="cell space: cells per stage (default: 1)"
    )
    p.add_argument(
        "--batch-sizes", default="1,32", help="comma-separated batch sizes (default: 1,32)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="runtime threads (default: physical cores)"
    )
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds (default: 6)")
    p.add_argument(
        "--calibration-networks",
        type=int,
        default=32,
        help="random whole networks timed to calibrate the table (>= 8 for the in-context fit; "
        "default: 32)",
    )
    p.add_argument(
        "--precision",
        default=None,
        help="fp32 or int8 (int8: every block and calibration network is quantized as the "
        "target's runtime deploys INT8 before timing; default the target's precision)",
    )
    p.add_argument("--out", type=Path, default=None, help="table JSON (default: the table cache)")

    p = sub.add_parser("targets", help="list hardware targets and whether they are available here")
    p.add_argument(
        "--table", type=Path, default=None, help="NB201-style CSV for table:<column> targets"
    )
    return ap


def _stage_inputs(decl: StageDeclaration, args: argparse.Namespace) -> dict:
    """The declared inputs of ``decl`` from the parsed command line.

    Raises:
        ConfigError: A stage command with an alternative (``promote --rollback``) lacks an option.
    """
    inputs = {i.name: getattr(args, i.name) for i in decl.inputs}
    if args.output is None or any(v is None for v in inputs.values()):
        needs = " and ".join(["--output", *(i.option for i in decl.inputs)])
        option, metavar, _ = _ALTERNATIVES[decl.name]
        raise ConfigError(f"{decl.name} needs {needs} (or {option} {metavar})")
    return inputs


def _check_inputs_exist(decl: StageDeclaration, inputs: dict) -> None:
    for inp in decl.inputs:
        if not inp.is_path:
            continue
        value = inputs[inp.name]
        for v in value if isinstance(value, list) else [value]:
            if not Path(v).exists():
                raise inp.missing(f"{inp.option}: path does not exist: {v}")


def _run_stage(args: argparse.Namespace) -> int:
    from nasforge.config import load_params
    from nasforge.stages.runner import execute

    decl = declaration(args.command)
    inputs = _stage_inputs(decl, args)
    params = load_params(args.params)
    _check_inputs_exist(decl, inputs)
    execute(
        decl.name,
        params,
        args.output,
        parent_run_id=args.parent_run_id,
        run_name=args.run_name,
        tracking=not args.no_tracking,
        **inputs,
    )
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    import tempfile

    from nasforge.config import load_params
    from nasforge.pipelines import nasforge_pipeline as pipe

    if args.pipeline_command == "compile":
        if args.params is not None:
            targets = list(load_params(args.params).targets)
        elif args.targets is not None:
            targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        else:
            targets = list(pipe.CLUSTER_TARGETS)
        path = pipe.compile_pipeline(args.output, targets)
        print(f"compiled {path} for targets {', '.join(targets)}")
        return 0
    from nasforge import kfp_client

    params = load_params(args.params)
    arguments = {"params_json": params.to_json(), **pipe.pipeline_arguments(params.targets)}
    with tempfile.TemporaryDirectory(prefix="nasforge-pipeline-") as tmp:
        package = args.package
        if package is None:
            package = pipe.compile_pipeline(Path(tmp) / "nasforge_pipeline.yaml", params.targets)
        elif Path(package).is_file():  # a missing file is reported by kfp_client
            pipe.check_package_targets(package, params.targets)
        if args.pipeline_command == "submit":
            from nasforge.tracking.mlflow_runs import open_cluster_parent_run

            arguments["parent_run_id"] = open_cluster_parent_run(params, args.run_name)
        return _submit_or_schedule(args, kfp_client, package, arguments)


def _submit_or_schedule(args: argparse.Namespace, kfp_client, package: Path, arguments) -> int:
    if args.pipeline_command == "submit":
        run_id = kfp_client.submit(
            package,
            args.host,
            experiment=args.experiment,
            run_name=args.run_name,
            params=arguments,
            wait=args.wait,
            timeout=args.timeout,
        )
        print(f"submitted run {run_id}")
    else:
        job_id = kfp_client.schedule(
            package,
            args.host,
            experiment=args.experiment,
            job_name=args.job_name,
            cron=args.cron,
            params=arguments,
        )
        print(f"scheduled recurring run {job_id} ({args.cron})")
    return 0


def _bench_search(args: argparse.Namespace) -> int:
    from nasforge.search.tabular import parse_constraint, parse_objectives, run_bench_search

    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise ConfigError(
            f"--budgets must be comma-separated integers, got {args.budgets!r}"
        ) from None
    doc = run_bench_search(
        args.table,
        parse_objectives(args.objectives),
        [s.strip() for s in args.strategies.split(",") if s.strip()],
        budgets,
        args.seeds,
        args.out,
        workers=args.workers,
        constraints=[parse_constraint(c) for c in args.constraint] or None,
    )
    print(
        json.dumps(
            {s: {b: r["median_gap"] for b, r in v.items()} for s, v in doc["results"].items()},
            indent=1,
        )
    )
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _profile(args: argparse.Namespace) -> int:
    from nasforge.config import params_from_dict
    from nasforge.hardware.table_cache import profile
    from nasforge.hardware.targets import get_target
    from nasforge.space.registry import DEFAULT_SPACE, get_space

    target = get_target(args.target)
    precision = args.precision
    if precision is not None:
        precision = precision.strip().lower()
        if precision not in ("fp32", "int8"):
            raise ConfigError(f"--precision must be fp32 or int8, got {args.precision!r}")
        if precision == "fp32" and target.precision == "int8":
            raise ConfigError(
                f"--precision fp32 contradicts the INT8 target '{target.name}'; "
                f"profile '{target.name.removesuffix('-int8')}' for FP32"
            )
    if target.kind != "runtime":
        raise ConfigError(f"target '{target.name}' is a latency table; it cannot be profiled")
    target.check_available()
    c, h, w = _ints(args.input_shape, "--input-shape")
    kind = args.space or DEFAULT_SPACE
    space_type = get_space(kind)
    settings = {"kind": kind, "channels": args.channels, "cells_per_stage": args.cells_per_stage}
    space_params = params_from_dict({"space": settings}, "nasforge profile").space
    space = space_type.from_params(space_params, (c, h, w), args.num_classes).block_space()
    table, path = profile(
        target,
        space,
        batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
        threads=args.threads,
        out=args.out,
        progress=lambda msg: print(f"  {msg}", flush=True),
        rounds=args.rounds,
        calibration_networks=args.calibration_networks,
        precision=precision,
    )
    print(f"{table.precision} latency table for {target.name} / {kind}: {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from nasforge.serve.server import serve

    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 1e6)
    serve(
        args.source,
        args.target,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        slo_ms=args.slo_ms,
        switching=not args.no_switching,
        memory_budget_bytes=budget,
        threads=args.threads,
        tracking_uri=args.tracking_uri,
        only_champion=args.only_champion,
        max_body_bytes=args.max_body_bytes,
        max_items_per_request=args.max_items_per_request,
    )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from nasforge.config import load_params
    from nasforge.hardware.targets import get_target
    from nasforge.tracking.mlflow_runs import check_reachable
    from nasforge.tracking.registry import model_name_for, rollback

    params = load_params(args.params)
    get_target(args.rollback)  # unknown names fail with the list of known ones
    tp, gate = params.tracking, params.promote
    check_reachable(tp.uri)
    model_name = model_name_for(tp.model_prefix, args.rollback)
    decision = rollback(
        tp.uri,
        model_name,
        args.rollback,
        gate.accuracy_tolerance,
        gate.latency_tolerance,
        gate.latency_floor_ms,  # for versions registered before they recorded their own
    )
    print(f"{args.rollback}: {model_name} {decision.reason}")
    return 0


def _targets(args: argparse.Namespace) -> int:
    from nasforge.hardware.targets import get_target, list_targets

    for name in list_targets(args.table):
        t = get_target(name, table=args.table) if name.startswith("table:") else get_target(name)
        problem = t.availability_problem()
        precision = t.precision if t.kind == "runtime" else "-"  # a table: as its CSV measured
        where = f"{t.runtime:12s} {t.device:14s} {precision:5s}"
        state = "available" if problem is None else f"not available: {problem}"
        print(f"{name:30s} {where} {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nasforge`` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            from nasforge.pipelines.local_run import run_local

            run_local(args.params, args.runs_dir, fresh=args.fresh)
            return 0
        if args.command == "pipeline":
            return _pipeline(args)
        if args.command == "bench-search":
            return _bench_search(args)
        if args.command == "targets":
            return _targets(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "promote" and args.rollback is not None:
            return _rollback(args)
        return _run_stage(args)
    except NasforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
