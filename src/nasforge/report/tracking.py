"""What the report needs from MLflow: stage wall times and links that open the runs and models.

Each stage task logs the metric ``stage_seconds`` on its run, nested under the pipeline's parent
run (tag ``mlflow.parentRunId``; see :mod:`nasforge.stages.runner`). The report reads them back
here. The tracking store is optional for the report: when it cannot be reached, or there is no
parent run, :func:`tracking_info` says why (``available: False``, ``reason``) instead of raising.

Links: the MLflow 3 UI is a hash-routed single-page app, so a run opens at
``<server>/#/experiments/<experiment id>/runs/<run id>`` and a registered model version at
``<server>/#/models/<name>/versions/<version>`` (routes ``runPage`` and ``modelVersionPage`` of
the UI shipped in the mlflow package). A SQLite or file store has no server: the page shows the
``mlflow ui --backend-store-uri ...`` command that opens it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Short HTTP settings while the report talks to a server, so a dead server costs seconds.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def is_server(uri: str) -> bool:
    """Whether ``uri`` is an MLflow tracking server (http/https)."""
    return uri.startswith(("http://", "https://"))


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """UI link of a run on a tracking server (None for other stores)."""
    if not is_server(uri):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(uri: str, name: str, version: str | int) -> str | None:
    """UI link of a registered model version on a tracking server (None for other stores)."""
    if not is_server(uri):
        return None
    return f"{uri.rstrip('/')}/#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"


def ui_command(uri: str) -> str:
    """The command that opens a non-server store in the MLflow UI (relative paths made absolute)."""
    store = uri
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if not path.startswith("/"):
            store = f"sqlite:///{Path(path).absolute()}"
    elif uri.startswith("file:"):
        pass
    elif "://" not in uri:
        store = str(Path(uri).absolute())
    return f"mlflow ui --backend-store-uri {shlex.quote(store)}"


@contextlib.contextmanager
def _short_http() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in _HTTP_ENV}
    os.environ.update(_HTTP_ENV)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reachable(uri: str, timeout_s: float = 3.0) -> str | None:
    """Why the tracking store cannot be used (None when it can)."""
    from nasforge.errors import TrackingError
    from nasforge.tracking.mlflow_runs import check_reachable

    try:
        check_reachable(uri, timeout_s=timeout_s)
    except TrackingError as err:
        return str(err)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            return f"MLflow SQLite database does not exist: {db}"
    return None


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


def tracking_info(
    uri: str,
    parent_run_id: str | None,
    own_run_id: str | None = None,
    models: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Stage runs, their ``stage_seconds`` and UI links; never raises.

    Args:
        uri: Tracking URI.
        parent_run_id: The pipeline's parent run (None when the report stage ran alone).
        own_run_id: The report stage's own run (its wall time is not logged yet).
        models: ``[{"target", "model_name", "version"}]`` registered model versions to link.

    Returns:
        ``available``, ``reason`` (why not, or None), ``tracking_uri``, ``server`` (bool),
        ``ui_command`` (non-server stores), ``parent`` (run id, experiment id, name, status,
        elapsed seconds, url), ``stages`` (one per child run: run id, name, stage, status,
        ``stage_seconds``, url, ``this`` for the report's own run), ``models`` (with ``url``).
    """
    info: dict[str, Any] = {
        "available": False,
        "reason": None,
        "tracking_uri": uri,
        "server": is_server(uri),
        "ui_command": None if is_server(uri) else ui_command(uri),
        "parent": None,
        "stages": [],
        "models": [
            {**m, "url": model_version_url(uri, m["model_name"], m["version"])}
            for m in (models or [])
            if m.get("version")
        ],
    }
    if not parent_run_id:
        info["reason"] = "no pipeline parent run (the report stage ran on its own)"
        return info
    why = reachable(uri)
    if why:
        info["reason"] = why
        return info
    try:
        with _short_http():
            _query(uri, parent_run_id, own_run_id, info)
    except Exception as err:  # noqa: BLE001 - the report must not fail on tracking problems
        info["reason"] = f"MLflow query failed: {' '.join(str(err).split())[:300]}"
        info["stages"] = []
        return info
    info["available"] = True
    return info


def _query(uri: str, parent_run_id: str, own_run_id: str | None, info: dict[str, Any]) -> None:
    from nasforge.tracking.mlflow_runs import PARENT_TAG, client

    c = client(uri)
    parent = c.get_run(parent_run_id)
    exp = parent.info.experiment_id
    end = parent.info.end_time or int(time.time() * 1000)
    info["parent"] = {
        "run_id": parent_run_id,
        "experiment_id": exp,
        "run_name": parent.info.run_name,
        "status": parent.info.status,
        "elapsed_s": _seconds(end - parent.info.start_time) if parent.info.start_time else None,
        "url": run_url(uri, exp, parent_run_id),
    }
    children = c.search_runs(
        [exp], filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}'", max_results=5000
    )
    stages = []
    for r in sorted(children, key=lambda r: r.info.start_time or 0):
        seconds = r.data.metrics.get("stage_seconds")
        stages.append(
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "stage": r.data.tags.get("nasforge.stage", ""),
                "status": r.info.status,
                "stage_seconds": None if seconds is None else float(seconds),
                "url": run_url(uri, exp, r.info.run_id),
                "this": r.info.run_id == own_run_id,
            }
        )
    info["stages"] = stages


def stage_seconds(info: dict[str, Any]) -> dict[str, float]:
    """``{run name: stage_seconds}`` of the stage runs that logged it (for ``summary.json``)."""
    out: dict[str, float] = {}
    for s in info.get("stages", []):
        if s.get("stage_seconds") is not None:
            name = s.get("run_name") or s["run_id"]
            out[name if name not in out else f"{name} ({s['run_id'][:8]})"] = s["stage_seconds"]
    return out


def stage_totals(info: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per stage kind: number of runs and total ``stage_seconds`` (ParallelFor runs add up)."""
    out: dict[str, dict[str, float]] = {}
    for s in info.get("stages", []):
        if s.get("stage_seconds") is None:
            continue
        t = out.setdefault(s.get("stage") or "?", {"runs": 0, "seconds": 0.0})
        t["runs"] += 1
        t["seconds"] += s["stage_seconds"]
    return out
