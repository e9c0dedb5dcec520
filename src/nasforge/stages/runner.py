"""Run one stage the same way for every caller (CLI, KFP component, DVC via the CLI).

Everything stage-specific comes from the stage's declaration
(:mod:`nasforge.stages.declarations`); the stage function gets an explicit
:class:`~nasforge.stages.StageContext` (its MLflow run, the parent run, its work folder). The CLI
calls :func:`execute`, each KFP component's body is :func:`run_task`, and ``dvc.yaml`` calls the
CLI, so MLflow runs are opened and closed the same way for all three: a nested run per stage, and
the pipeline's parent run marked finished by the stage that ends the pipeline (``report``).

The runner adds what the pure stage functions leave out: thread and seed settings, an atomic
output folder (the stage writes into a hidden sibling that replaces ``output`` only on success, so
a failure never leaves a half-written artifact), the stage's nested MLflow run with its metrics,
tags and small artifacts, the prepared dataset it produced or read as an MLflow dataset input
(:mod:`nasforge.tracking.datasets`), and the DVC hash of every produced model as a tag (pushed to
the DVC remote when one is configured). A failed stage's run carries its one-line error.

A stage attempt also gets a work folder (:mod:`nasforge.checkpoint`) that survives a failure, so
a killed stage run again with the same params and inputs continues where it stopped; it is
removed once the output is in place. Temporary folders left by a killed attempt are cleaned up by
the next one. Under ``nasforge run`` a stage's one-line error is also appended to the run's error
log, so the pipeline's last line can name it, and a task whose ``nasforge run`` died stops too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nasforge import checkpoint
from nasforge.config import Params
from nasforge.errors import ConfigError
from nasforge.stages import StageContext, StageResult
from nasforge.stages.declarations import StageDeclaration, declaration

#: Set by ``nasforge run``: the JSON-lines file a failing stage appends its one-line error to,
#: and the pid of the ``nasforge run`` process (a task whose runner died exits).
ERROR_LOG_ENV = "NASFORGE_ERROR_LOG"
PARENT_PID_ENV = "NASFORGE_PARENT_PID"


def _seed_everything(seed: int, threads: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def clean_stale(output: Path) -> list[Path]:
    """Remove the temporary siblings of ``output`` that killed attempts left behind.

    ``.<name>.partial-<pid>-*`` folders whose process is gone, and ``.<name>.old-*`` folders (a
    replaced output that a kill kept from being deleted). Returns what was removed.
    """
    removed = []
    for p in output.parent.glob(f".{output.name}.partial-*"):
        pid = p.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not checkpoint.pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in output.parent.glob(f".{output.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _watch_parent() -> None:
    """Under ``nasforge run``: exit when that process is gone (SIGKILL leaves tasks orphaned)."""
    pid = os.environ.get(PARENT_PID_ENV, "")
    if not pid.isdigit():
        return

    def watch() -> None:
        while checkpoint.pid_alive(int(pid)):
            time.sleep(1.0)
        print(f"error: nasforge run (pid {pid}) is gone; stopping this task", flush=True)
        os._exit(137)

    threading.Thread(target=watch, name="nasforge-parent-watch", daemon=True).start()


def one_line(err: BaseException) -> str:
    """The one-line description of a stage failure (the message of a NasforgeError)."""
    from nasforge.tracking.mlflow_runs import error_line

    return error_line(err)


def _log_error(label: str, err: BaseException) -> None:
    path = os.environ.get(ERROR_LOG_ENV)
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "a") as f:
        f.write(json.dumps({"stage": label, "error": one_line(err), "time": time.time()}) + "\n")


def _replace_dir(tmp: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output)


def execute(
    stage: str,
    params: Params,
    output: Path,
    *,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tracking: bool = True,
    **inputs: Any,
) -> StageResult:
    """Run ``stage`` with ``inputs`` and write its artifact to ``output``.

    What the stage is — its function, inputs, whether its output is versioned, whether it needs
    its own MLflow run, whether it ends the pipeline's parent run — comes from its
    :class:`~nasforge.stages.declarations.StageDeclaration`. The stage function is called as
    ``run(params, **inputs, output=<temporary folder>, ctx=StageContext(...))``.

    Args:
        stage: One of :data:`nasforge.stages.declarations.STAGES`.
        params: The validated configuration.
        output: Output folder (replaced atomically on success).
        parent_run_id: MLflow run to nest this stage's run under (empty: not nested). When the
            stage ends the pipeline (``report``), this run is marked finished after it succeeds.
        run_name: Name of the stage's MLflow run (default: the declaration's, e.g.
            ``train-cand-0``).
        tracking: Log to MLflow (always on in pipelines; tests may switch it off).
        **inputs: The stage's inputs, exactly as declared.

    Returns:
        The stage's result.

    Raises:
        ConfigError: Unknown stage, inputs other than the declared ones, or tracking off for a
            stage that needs its MLflow run.
    """
    decl = declaration(stage)
    decl.check_inputs(inputs)
    if decl.needs_tracking_run and not tracking:
        raise ConfigError(
            f"{stage} stores its models in its MLflow run and cannot run with tracking off "
            "(drop --no-tracking)"
        )
    parent_run_id = parent_run_id or None
    fn = decl.function()
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    _watch_parent()
    clean_stale(output)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    key = checkpoint.stage_key(stage, params.to_json(), inputs)
    work = checkpoint.work_dir_for(stage, output, key)
    _seed_everything(params.run.seed, params.run.threads)
    label = run_name or decl.label(inputs)
    print(f"==> [{label}] started", flush=True)
    t0 = time.perf_counter()

    def call(run_id: str | None) -> StageResult:
        ctx = StageContext(run_id=run_id, parent_run_id=parent_run_id, work_dir=work)
        # Loops deep in library code (training, supernet) find their checkpoints through it.
        token = checkpoint.set_current_work_dir(work)
        try:
            result = fn(params, **inputs, output=tmp, ctx=ctx)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            checkpoint.reset_current_work_dir(token)
        _replace_dir(tmp, output)
        # The output is in place: what the work folder held to resume is no longer needed.
        shutil.rmtree(work, ignore_errors=True)
        # Paths the stage reported under the temporary folder now live under ``output``.
        result.artifacts = [
            output / Path(a).relative_to(tmp) if tmp in Path(a).parents else Path(a)
            for a in result.artifacts
        ]
        if result.model_dir is not None:
            result.model_dir = output
        return result

    try:
        result = _tracked(decl, params, output, label, parent_run_id, tracking, inputs, call, t0)
    except BaseException as err:
        _log_error(label, err)
        raise
    print(f"==> [{label}] done in {time.perf_counter() - t0:.1f}s", flush=True)
    return result


def run_task(
    stage: str, params_json: str, parent_run_id: str, output: Any, **inputs: Any
) -> StageResult | list[int]:
    """The body of every KFP component: run ``stage`` through :func:`execute`.

    KFP artifacts (anything with a ``path``) become folders, lists of them lists of folders (one
    artifact given to a many-folder input becomes a list of one); values pass unchanged. For a stage whose declaration has a ``loop_metric`` the candidate
    indices ``[0, n)`` are returned, for the DAG's ``ParallelFor``.

    Args:
        stage: The stage's name.
        params_json: ``params.yaml`` as JSON (the pipeline parameter).
        parent_run_id: The pipeline's MLflow run (empty: not nested).
        output: The component's output artifact.
        **inputs: The component's inputs, named as the stage's declared inputs.

    Returns:
        The stage's result, or the loop's indices.
    """
    from nasforge.config import params_from_json

    decl = declaration(stage)
    kinds = {i.name: i.kind for i in decl.inputs}

    def value(name: str, v: Any) -> Any:
        if isinstance(v, list):
            return [Path(a.path) for a in v]
        if hasattr(v, "path"):
            # A task given one folder of a many-folder input (one candidate's export).
            return [Path(v.path)] if kinds.get(name) == "artifacts" else Path(v.path)
        return v

    result = execute(
        stage,
        params_from_json(params_json),
        Path(output.path),
        parent_run_id=parent_run_id or None,
        **{k: value(k, v) for k, v in inputs.items()},
    )
    return list(range(int(result.metrics[decl.loop_metric]))) if decl.loop_metric else result


def _tracked(
    decl: StageDeclaration,
    params: Params,
    output: Path,
    label: str,
    parent_run_id: str | None,
    tracking: bool,
    inputs: dict[str, Any],
    call: Callable[[str | None], StageResult],
    t0: float,
) -> StageResult:
    """Run ``call`` inside the stage's MLflow run (or bare), logging what it produced."""
    if not tracking:
        return call(None)
    from nasforge.tracking.mlflow_runs import close_run, stage_run

    stage = decl.name
    tp = params.tracking
    with stage_run(tp.uri, tp.experiment, stage, parent_run_id, run_name=label) as run:
        run.set_tags(
            {
                "nasforge.output": str(output),
                **{k: v for k, v in inputs.items() if isinstance(v, str | int)},
            }
        )
        if inputs.get("dataset") is not None:
            _log_dataset(tp.uri, run.run_id, Path(inputs["dataset"]), stage)
        result = call(run.run_id)
        seconds = time.perf_counter() - t0
        run.log_metrics({**result.metrics, "stage_seconds": seconds})
        tags = dict(result.tags)
        if decl.versioned and result.model_dir is not None:
            from nasforge.tracking.dvc import push

            # Pushing returns the same md5 that `dvc add` / dvc.lock would record.
            tags["dvc.md5"] = push(result.model_dir, Path(tp.dvc_remote).absolute())
            tags["dvc.remote"] = str(Path(tp.dvc_remote).absolute())
        run.set_tags(tags)
        if decl.versioned:  # a prepared dataset it produced (other outputs are skipped)
            _log_dataset(tp.uri, run.run_id, output, stage, tags.get("dvc.md5"))
        for art in result.artifacts:
            if Path(art).exists():
                run.log_artifact(art)
    if decl.ends_parent_run and parent_run_id:
        # The pipeline's last stage: its parent run ends here, for every caller alike.
        close_run(tp.uri, parent_run_id)
    return result


def _log_dataset(uri: str, run_id: str, dataset: Path, stage: str, md5: str | None = None) -> None:
    """Log the prepared dataset as an MLflow dataset input of the stage run.

    A folder that is not a prepared dataset is left to the stage, which fails with its own error.
    """
    from nasforge.errors import DataError
    from nasforge.tracking.datasets import log_dataset

    if not (dataset / "meta.json").is_file():
        return
    with contextlib.suppress(DataError):
        log_dataset(uri, run_id, dataset, stage, md5)
