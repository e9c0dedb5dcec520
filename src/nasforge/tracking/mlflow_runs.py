"""MLflow runs: one parent run per pipeline run, one nested run per stage task.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids, never the fluent
"active run" state, because each stage runs in its own process (KFP task, DVC stage, CLI call).

The experiment is marked as model training (``mlflow.experimentKind``), so MLflow 3's UI opens
it on its runs rather than the GenAI overview. Runs carry MLflow's source tags (the Source and
Version columns), and a failed stage run carries its one-line error (``nasforge.error``, also the
run's description) with status FAILED (KILLED when interrupted).

KFP's own MLflow integration (the KFP backend's ``plugins.mlflow``, enabled by a cluster
administrator) opens a parent run per pipeline run and a nested run per task, and passes the
task's run to the container as ``MLFLOW_RUN_ID``. It does not replace nasforge's parent run: the
kfp 2.17 SDK's ``Client`` cannot set a run's ``plugins_input`` (so the run lands in the
administrator's default experiment, not ``tracking.experiment``), whether the plugin is on is a
server setting a client cannot see before submitting, and ``kfp.local`` has no plugin at all.
Where it is on, each stage run records the task's KFP run as ``kfp.mlflow_run_id`` and that run
gets ``nasforge.stage_run_id`` back, so the two hierarchies link both ways.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nasforge.errors import TrackingError

PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG = "nasforge.error"
#: MLflow 3's experiment type: "custom_model_development" opens the UI on the training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Set on each task container by KFP's MLflow plugin (with the tracking URI it logs to).
KFP_RUN_ENV = "MLFLOW_RUN_ID"
KFP_POD_ENV = "KFP_POD_NAME"


def _quiet_mlflow() -> None:
    # Alembic/MLflow print migration chatter for every new SQLite connection.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with one line when the tracking store cannot be used.

    Raises:
        TrackingError: An HTTP server does not answer its health check, or a SQLite file's folder
            does not exist.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - user's server
                if resp.status != 200:
                    raise TrackingError(
                        f"MLflow tracking server {uri} answered {resp.status} on /health"
                    )
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable: {reason}") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.exists():
            raise TrackingError(f"MLflow SQLite folder does not exist: {db.parent}")


def client(uri: str):
    """An :class:`mlflow.MlflowClient` for ``uri`` (registry on the same store)."""
    _quiet_mlflow()
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older nasforge: mark it once
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, not in ./mlruns of whatever folder a task runs in.
        location = (Path(uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts").as_uri()
    try:
        return c.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except Exception:  # noqa: BLE001 - another process created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested params into ``section.field`` keys with string values."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


def open_parent_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any]) -> str:
    """Create the parent run of a pipeline run; return its id."""
    check_reachable(uri)
    c = client(uri)
    run = c.create_run(
        experiment_id(uri, experiment),
        run_name=run_name,
        tags={"nasforge.kind": "pipeline", **source_tags("nasforge run")},
    )
    for k, v in flatten(params).items():
        c.log_param(run.info.run_id, k, v[:6000])
    return run.info.run_id


def open_cluster_parent_run(params: Any, run_name: str | None = None) -> str:
    """Open the parent run of a pipeline run submitted to a cluster; return its id or ``""``.

    Only a tracking server (``http(s)://``) is reachable from both the submitting machine and the
    cluster's pods; for any other store (e.g. SQLite on the pipeline volume) the stage runs are
    not nested and ``""`` is returned. The pipeline's report task closes the run.

    Raises:
        TrackingError: The tracking server does not answer.
    """
    import time

    uri = params.tracking.uri
    if not uri.startswith(("http://", "https://")):
        print(
            f"note: tracking store {uri} is not a server; stage runs will not be nested",
            file=sys.stderr,
        )
        return ""
    name = run_name or f"{params.run.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    return open_parent_run(uri, params.tracking.experiment, name, params.model_dump(mode="json"))


@functools.cache
def _git_tags() -> dict[str, str]:
    """The commit of the nasforge checkout that runs (none for an installed wheel)."""
    try:
        from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

        here = str(Path(__file__).resolve().parent)
        commit = get_git_commit(here)
    except Exception:  # noqa: BLE001 - no git, no repository: no version tags
        return {}
    if not commit:
        return {}
    tags = {"mlflow.source.git.commit": commit}
    for key, fn in (("branch", get_git_branch), ("repoURL", get_git_repo_url)):
        with contextlib.suppress(Exception):
            value = fn(here)
            if value:
                tags[f"mlflow.source.git.{key}"] = value
    return tags


def source_tags(name: str) -> dict[str, str]:
    """MLflow's source tags (runs table Source / Version columns) for a nasforge command."""
    import getpass

    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL", **_git_tags()}
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    return tags


def error_line(err: BaseException) -> str:
    """The one-line description of a failure (the message of a NasforgeError)."""
    from nasforge.errors import NasforgeError

    text = " ".join(str(err).split()) or err.__class__.__name__
    return text if isinstance(err, NasforgeError) else f"{err.__class__.__name__}: {text}"


def kfp_task_run(uri: str) -> str | None:
    """The run KFP's MLflow plugin opened for this task, when it logs to ``uri``; else None."""
    run_id, kfp_uri = os.environ.get(KFP_RUN_ENV), os.environ.get("MLFLOW_TRACKING_URI", "")
    if not run_id or not os.environ.get(KFP_POD_ENV):
        return None
    return run_id if kfp_uri.rstrip("/") == uri.rstrip("/") else None


def close_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run finished (or FAILED, KILLED)."""
    client(uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str) -> bool:
    """Mark a run RUNNING again (a resumed pipeline run); False if it no longer exists.

    Its nested runs still RUNNING belong to tasks of the killed attempt: they are marked KILLED.
    """
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        run = c.get_run(run_id)
        c.update_run(run_id, status="RUNNING")
    except MlflowException:
        return False
    stale = c.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'",
    )
    for child in stale:
        c.set_terminated(child.info.run_id, status="KILLED")
    return True


class StageRun:
    """Handle to a stage's MLflow run, passed to the caller of :func:`stage_run`."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._client = client(uri)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log numeric metrics (non-numeric values are skipped)."""
        for k, v in metrics.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self._client.log_metric(self.run_id, k, float(v))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set string tags."""
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def stage_run(
    uri: str,
    experiment: str,
    stage: str,
    parent_run_id: str | None,
    run_name: str | None = None,
) -> Iterator[StageRun]:
    """Open the run of one stage task, nested under ``parent_run_id`` when given.

    The run is marked FAILED if the body raises (KILLED when interrupted), with the one-line
    error as the tag ``nasforge.error`` and as the run's description. Inside a KFP task tracked
    by KFP's MLflow plugin the two runs are cross-linked (see the module docstring).
    """
    check_reachable(uri)
    c = client(uri)
    tags = {"nasforge.stage": stage, **source_tags(f"nasforge {stage}")}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    kfp_run = kfp_task_run(uri)
    if kfp_run:
        tags["kfp.mlflow_run_id"] = kfp_run
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name or stage, tags=tags)
    if kfp_run:
        with contextlib.suppress(Exception):  # the link is a convenience, never a failure
            c.set_tag(kfp_run, "nasforge.stage_run_id", run.info.run_id)
    handle = StageRun(uri, run.info.run_id)
    try:
        yield handle
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt | SystemExit)
        with contextlib.suppress(Exception):  # never hide the stage's own error
            line = error_line(err)[:5000]
            c.set_tag(run.info.run_id, ERROR_TAG, line)
            c.set_tag(run.info.run_id, "mlflow.note.content", f"error: {line}")
        c.set_terminated(run.info.run_id, status="KILLED" if interrupted else "FAILED")
        raise
    c.set_terminated(run.info.run_id, status="FINISHED")
