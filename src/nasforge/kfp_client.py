"""Submit and schedule a compiled nasforge pipeline on a Kubeflow Pipelines (v2) cluster.

Thin functions over :class:`kfp.Client`: the compiled pipeline spec travels inline with the run or
recurring run (no pipeline upload, so no name clashes between versions), the experiment is
created if missing, and every failure the user can cause or meet (host unreachable, server error,
bad cron expression, run failed) surfaces as a one-line :class:`~nasforge.errors.NasforgeError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nasforge.errors import ConfigError, NasforgeError, TrackingError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "nasforge"
#: Environment defaults, so a CronJob or CI job configures them without extra CLI flags.
SERVICE_ACCOUNT_ENV = "NASFORGE_PIPELINE_RUNNER_SA"
TOKEN_ENV = "KFP_TOKEN"
#: Terminal run states of the KFP v2beta1 API (``V2beta1RuntimeState``).
#: Only SUCCEEDED counts as success; a skipped or cancelled run fails `submit(wait=True)` too.
SUCCEEDED_STATES = frozenset({"SUCCEEDED"})
FAILED_STATES = frozenset({"FAILED", "CANCELED", "CANCELING", "SKIPPED", "ERROR"})
_PACKAGE_SUFFIXES = (".yaml", ".yml", ".tar.gz", ".tgz", ".zip")


class PipelineServerError(TrackingError):
    """The Kubeflow Pipelines API server cannot be reached or refused a request."""


class PipelineRunError(NasforgeError):
    """A submitted pipeline run ended in a state other than success, or did not end in time."""


# ---------------------------------------------------------------------------------------------
# cron (KFP uses robfig/cron with a leading seconds field: 6 fields)
# ---------------------------------------------------------------------------------------------
_MONTHS = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
_DAYS = "SUN MON TUE WED THU FRI SAT".split()
# name, lowest, highest, symbolic names (value = index + offset), whether '?' is allowed
_CRON_FIELDS: tuple[tuple[str, int, int, list[str], int, bool], ...] = (
    ("second", 0, 59, [], 0, False),
    ("minute", 0, 59, [], 0, False),
    ("hour", 0, 23, [], 0, False),
    ("day of month", 1, 31, [], 0, True),
    ("month", 1, 12, _MONTHS, 1, False),
    ("day of week", 0, 6, _DAYS, 0, True),
)
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_EVERY = re.compile(r"^@every\s+(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _cron_value(token: str, field: tuple[str, int, int, list[str], int, bool]) -> int:
    name, low, high, names, offset, _ = field
    upper = token.upper()
    if upper in names:
        return names.index(upper) + offset
    if not token.isdigit():
        raise ValueError(f"'{token}' is not a number in the {name} field")
    value = int(token)
    if not low <= value <= high:
        raise ValueError(f"{value} is outside {low}-{high} in the {name} field")
    return value


def _check_cron_field(text: str, field: tuple[str, int, int, list[str], int, bool]) -> None:
    name, _, _, _, _, question_ok = field
    if text == "?":
        if not question_ok:
            raise ValueError(f"'?' is only allowed in the day-of-month/week fields, not {name}")
        return
    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"step '{step}' in the {name} field must be a positive integer")
        if base == "*":
            continue
        start, dash, end = base.partition("-")
        first = _cron_value(start, field)
        if dash:
            last = _cron_value(end, field)
            if last < first:
                raise ValueError(f"range {base} runs backwards in the {name} field")


def validate_cron(expression: str) -> str:
    """Check a Kubeflow Pipelines cron expression and return it normalised (single spaces).

    KFP schedules use robfig/cron with six fields — ``second minute hour day-of-month month
    day-of-week`` (e.g. ``'0 0 3 * * *'`` = daily at 03:00:00) — or a descriptor such as
    ``@daily`` or ``@every 6h``.

    Args:
        expression: the cron expression.

    Returns:
        The expression with runs of whitespace collapsed.

    Raises:
        ConfigError: the expression is not a valid 6-field cron expression or descriptor.
    """
    normalised = " ".join(expression.split())
    if normalised in _DESCRIPTORS or _EVERY.match(normalised):
        return normalised
    fields = normalised.split(" ") if normalised else []
    if len(fields) == 5:
        raise ConfigError(
            f"cron '{expression}' has 5 fields; KFP cron has 6 (seconds first), "
            f"e.g. '0 {normalised}'"
        )
    if len(fields) != 6:
        raise ConfigError(
            f"cron '{expression}' has {len(fields)} fields; KFP cron needs 6: "
            "second minute hour day-of-month month day-of-week (e.g. '0 0 3 * * *')"
        )
    for text, field in zip(fields, _CRON_FIELDS, strict=True):
        try:
            _check_cron_field(text, field)
        except ValueError as err:
            raise ConfigError(f"invalid cron '{expression}': {err}") from None
    return normalised


# ---------------------------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------------------------
def _check_package(package_path: str | Path) -> str:
    path = Path(package_path)
    if not path.name.endswith(_PACKAGE_SUFFIXES):
        raise ConfigError(
            f"pipeline package {path} must end with one of {', '.join(_PACKAGE_SUFFIXES)} "
            "(compile it with `nasforge pipeline compile`)"
        )
    if not path.is_file():
        raise ConfigError(
            f"pipeline package {path} not found (compile it with `nasforge pipeline compile`)"
        )
    return str(path)


def _check_reachable(host: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when nothing listens at the host (kfp.Client would retry)."""
    parsed = urllib.parse.urlparse(host if "://" in host else f"https://{host}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"KFP host '{host}' is not an http(s) URL (e.g. http://localhost:8888)")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or err.__class__.__name__
        raise PipelineServerError(
            f"cannot reach the Kubeflow Pipelines API at {host}: {reason}"
        ) from None


def _one_line(err: BaseException) -> str:
    """A single-line description of an error from kfp / kfp_server_api / urllib3."""
    status = getattr(err, "status", None)
    reason = getattr(err, "reason", None)
    body = getattr(err, "body", None)
    if status is not None and reason is not None:
        detail = f"HTTP {status} {reason}"
        if body:
            text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
            detail += f": {' '.join(text.split())[:300]}"
        return detail
    return " ".join(str(err).split())[:400] or err.__class__.__name__


@contextlib.contextmanager
def _server_errors(host: str, action: str) -> Iterator[None]:
    """Turn kfp/HTTP/network exceptions raised inside the block into PipelineServerError."""
    import urllib3
    from kfp_server_api.exceptions import ApiException, ApiValueError

    try:
        yield
    except NasforgeError:
        raise
    except (ApiException, ApiValueError, urllib3.exceptions.HTTPError, OSError) as err:
        raise PipelineServerError(
            f"Kubeflow Pipelines at {host}: {action} failed: {_one_line(err)}"
        ) from None
    except ValueError as err:  # kfp.Client's own checks (bad package, duplicate experiments)
        raise PipelineServerError(f"{action} failed: {_one_line(err)}") from None


def _client(host: str, namespace: str | None, token: str | None) -> Any:
    """A kfp.Client for `host`, its chatter (FutureWarning, printed links) kept off stdout."""
    import kfp

    _check_reachable(host)
    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    token = token or os.environ.get(TOKEN_ENV) or None
    if token:
        kwargs["existing_token"] = token
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        with _server_errors(host, "connecting"):
            return kfp.Client(**kwargs)


def _experiment_id(client: Any, host: str, experiment: str, namespace: str | None) -> str:
    with _server_errors(host, f"creating experiment '{experiment}'"):
        with contextlib.redirect_stdout(io.StringIO()):
            return str(client.create_experiment(name=experiment, namespace=namespace).experiment_id)


def _state(run: Any) -> str:
    state = getattr(run, "state", None)
    return str(state).upper() if state is not None else "UNKNOWN"


def submit(
    package_path: str | Path,
    host: str,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    wait: bool = False,
    timeout: float = 6 * 3600,
    *,
    namespace: str | None = None,
    service_account: str | None = None,
    enable_caching: bool | None = None,
    poll_interval: float = 10.0,
    token: str | None = None,
) -> str:
    """Submit one run of a compiled pipeline to a Kubeflow Pipelines server.

    Args:
        package_path: compiled pipeline (``.yaml``/``.yml``/``.zip``/``.tar.gz``), as written by
            ``nasforge pipeline compile``.
        host: KFP API endpoint, e.g. ``http://ml-pipeline-ui.kubeflow:80``.
        experiment: experiment to file the run under (created if missing).
        run_name: display name of the run (default ``nasforge <UTC timestamp>``).
        params: pipeline parameters (names of the pipeline function's arguments).
        wait: block until the run ends and raise unless it succeeded.
        timeout: with ``wait``, seconds to wait before giving up.
        namespace: Kubernetes namespace (multi-user Kubeflow only).
        service_account: Kubernetes service account the run's pods use (default
            ``$NASFORGE_PIPELINE_RUNNER_SA``, else the KFP default).
        enable_caching: override the compile-time caching setting of every task.
        poll_interval: with ``wait``, seconds between status checks.
        token: bearer token for the KFP API (default ``$KFP_TOKEN``, e.g. from CI secrets); in a
            pod on multi-user Kubeflow, kfp.Client picks up the projected token at
            ``KF_PIPELINES_SA_TOKEN_PATH`` instead.

    Returns:
        The run ID.

    Raises:
        ConfigError: the package path is missing or not a pipeline package.
        PipelineServerError: the server cannot be reached or rejected a request.
        PipelineRunError: with ``wait``, the run failed, was cancelled or did not end in time.
    """
    package = _check_package(package_path)
    client = _client(host, namespace, token)
    experiment_id = _experiment_id(client, host, experiment, namespace)
    name = run_name or f"nasforge {time.strftime('%Y-%m-%d %H-%M-%S', time.gmtime())}"
    with _server_errors(host, "creating the run"), contextlib.redirect_stdout(io.StringIO()):
        run = client.run_pipeline(
            experiment_id=experiment_id,
            job_name=name,
            pipeline_package_path=package,
            params=dict(params or {}),
            enable_caching=enable_caching,
            service_account=service_account or os.environ.get(SERVICE_ACCOUNT_ENV) or None,
        )
    run_id = str(run.run_id)
    log.info("submitted run %s (%s) to %s", run_id, name, host)
    if wait:
        final = _wait(client, host, run_id, timeout, poll_interval)
        state = _state(final)
        if state not in SUCCEEDED_STATES:
            error = getattr(final, "error", None)
            detail = f": {_one_line_status(error)}" if error else ""
            raise PipelineRunError(f"pipeline run {run_id} ended {state}{detail}")
    return run_id


def _one_line_status(error: Any) -> str:
    message = getattr(error, "message", None) or str(error)
    return " ".join(str(message).split())[:300]


def _wait(client: Any, host: str, run_id: str, timeout: float, poll_interval: float) -> Any:
    # Our own loop rather than kfp.Client.wait_for_run_completion: it polls every 5 s with no
    # way to change it and raises a bare TimeoutError.
    deadline = time.monotonic() + timeout
    while True:
        with _server_errors(host, f"reading run {run_id}"):
            run = client.get_run(run_id)
        state = _state(run)
        if state in SUCCEEDED_STATES or state in FAILED_STATES:
            return run
        if time.monotonic() >= deadline:
            raise PipelineRunError(
                f"pipeline run {run_id} still {state} after {timeout:g} s (not waiting longer)"
            )
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))


def schedule(
    package_path: str | Path,
    host: str,
    experiment: str = DEFAULT_EXPERIMENT,
    job_name: str = "nasforge-retrain",
    cron: str = "0 0 3 * * *",
    params: Mapping[str, Any] | None = None,
    *,
    namespace: str | None = None,
    service_account: str | None = None,
    max_concurrency: int = 1,
    no_catchup: bool = True,
    enabled: bool = True,
    token: str | None = None,
) -> str:
    """Create a recurring run (a KFP schedule) of a compiled pipeline.

    Args:
        package_path: compiled pipeline package, as for :func:`submit`.
        host: KFP API endpoint.
        experiment: experiment the scheduled runs are filed under (created if missing).
        job_name: display name of the recurring run.
        cron: KFP 6-field cron (``second minute hour day-of-month month day-of-week``) or a
            descriptor (``@daily``, ``@every 6h``); validated before anything is sent.
        params: pipeline parameters for every scheduled run.
        namespace: Kubernetes namespace (multi-user Kubeflow only).
        service_account: Kubernetes service account the runs' pods use (default
            ``$NASFORGE_PIPELINE_RUNNER_SA``, else the KFP default).
        max_concurrency: most runs of this schedule allowed at once.
        no_catchup: after a pause, run once instead of back-filling every missed slot.
        enabled: create the schedule enabled.
        token: bearer token for the KFP API (default ``$KFP_TOKEN``), as for :func:`submit`.

    Returns:
        The recurring run ID.

    Raises:
        ConfigError: bad cron expression or package path.
        PipelineServerError: the server cannot be reached or rejected a request.
    """
    cron_expression = validate_cron(cron)
    if max_concurrency < 1:
        raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
    package = _check_package(package_path)
    client = _client(host, namespace, token)
    experiment_id = _experiment_id(client, host, experiment, namespace)
    with _server_errors(host, "creating the recurring run"):
        recurring = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            cron_expression=cron_expression,
            max_concurrency=max_concurrency,
            no_catchup=no_catchup,
            params=dict(params or {}),
            pipeline_package_path=package,
            enabled=enabled,
            service_account=service_account or os.environ.get(SERVICE_ACCOUNT_ENV) or None,
        )
    recurring_id = str(recurring.recurring_run_id)
    log.info("scheduled %s (%s, cron '%s') on %s", recurring_id, job_name, cron_expression, host)
    return recurring_id
