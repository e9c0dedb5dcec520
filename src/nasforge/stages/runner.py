"""Run one stage the same way for every caller (CLI, KFP component, DVC via the CLI).

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
import inspect
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
from nasforge.stages import StageResult

#: Set by ``nasforge run``: the JSON-lines file a failing stage appends its one-line error to,
#: and the pid of the ``nasforge run`` process (a task whose runner died exits).
ERROR_LOG_ENV = "NASFORGE_ERROR_LOG"
PARENT_PID_ENV = "NASFORGE_PARENT_PID"

STAGE_MODULES = {
    "prepare-data": "prepare_data",
    "search": "search",
    "train": "train",
    "prune": "prune",
    "qat": "qat",
    "export": "export",
    "benchmark": "benchmark",
    "promote": "promote",
    "report": "report",
}
# Stages whose output is a dataset or model that DVC should version and MLflow should reference.
VERSIONED = {"prepare-data", "search", "train", "prune", "qat", "export"}


def stage_function(stage: str) -> Callable[..., StageResult]:
    """The ``run`` function of a stage module."""
    import importlib

    return importlib.import_module(f"nasforge.stages.{STAGE_MODULES[stage]}").run


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

    Args:
        stage: One of :data:`nasforge.stages.STAGES`.
        params: The validated configuration.
        output: Output folder (replaced atomically on success).
        parent_run_id: MLflow run to nest this stage's run under.
        run_name: Name of the stage's MLflow run (defaults to the stage name).
        tracking: Log to MLflow (always on in pipelines; tests may switch it off).
        **inputs: The stage's input artifact paths and options.

    Returns:
        The stage's result.
    """
    fn = stage_function(stage)
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    _watch_parent()
    clean_stale(output)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    key = checkpoint.stage_key(stage, params.to_json(), inputs)
    work = checkpoint.work_dir_for(stage, output, key)
    _seed_everything(params.run.seed, params.run.threads)
    label = run_name or stage
    print(f"==> [{label}] started", flush=True)
    t0 = time.perf_counter()

    def call(run_id: str | None) -> StageResult:
        kwargs = dict(inputs)
        accepted = inspect.signature(fn).parameters
        if "run_id" in accepted:
            kwargs["run_id"] = run_id
        if "parent_run_id" in accepted:
            kwargs["parent_run_id"] = parent_run_id
        token = checkpoint.set_current_work_dir(work)
        try:
            result = fn(params, output=tmp, **kwargs)
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
        result = _tracked(stage, params, output, label, parent_run_id, tracking, inputs, call, t0)
    except BaseException as err:
        _log_error(label, err)
        raise
    print(f"==> [{label}] done in {time.perf_counter() - t0:.1f}s", flush=True)
    return result


def _tracked(
    stage: str,
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
        result = call(None)
    else:
        from nasforge.tracking.mlflow_runs import stage_run

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
            if stage in VERSIONED and result.model_dir is not None:
                from nasforge.tracking.dvc import push

                # Pushing returns the same md5 that `dvc add` / dvc.lock would record.
                tags["dvc.md5"] = push(result.model_dir, Path(tp.dvc_remote).absolute())
                tags["dvc.remote"] = str(Path(tp.dvc_remote).absolute())
            run.set_tags(tags)
            if stage == "prepare-data":
                _log_dataset(tp.uri, run.run_id, output, stage, tags.get("dvc.md5"))
            for art in result.artifacts:
                if Path(art).exists():
                    run.log_artifact(art)
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
