"""Run the whole pipeline on this machine with ``kfp.local`` (no cluster).

Before any task starts, the configuration, the dataset path, the targets and the tracking store
are checked, so bad input fails in one line instead of half-way through the DAG. Relative paths of
the tracking store and the DVC remote are made absolute, because KFP tasks run as separate
processes. The report and summary are copied to ``runs/<run-id>/`` and ``runs/latest/``.

While the DAG runs, the console (:mod:`nasforge.console`) shows one line per task as it starts
and ends, with bars on a terminal; kfp.local's own output and each task's go to
``runs/<run-id>/logs/<task>.log`` (:mod:`nasforge.pipelines.task_logs`), and the log of a task
that fails is named before the one-line error.

An unfinished run (killed at any moment, interrupted, or failed) is resumed by running the same
command again; ``nasforge run --fresh`` starts over instead (see :func:`run_local`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from nasforge import checkpoint
from nasforge.config import Params, load_params
from nasforge.console import Estimator, RunConsole, duration, plan, prior_costs
from nasforge.errors import DataError, NasforgeError, TargetError
from nasforge.hardware.targets import get_target

#: Under the runs folder: one sub-folder per unfinished run (state, kfp.local cache, work folders).
RESUME_DIR = ".resume"
STATE_FILE = "state.json"
#: Under ``runs/<run-id>/``: one log file per task (kfp.local's output and the task's own).
LOG_DIR = "logs"


def _absolute_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).absolute())
    return uri


def preflight(params: Params) -> Params:
    """Validate what a run needs and return params with absolute local paths.

    Raises:
        NasforgeError: The dataset, a target or the tracking store cannot be used.
    """
    from nasforge.tracking.mlflow_runs import check_reachable

    if params.data.source != "digits" and not Path(params.data.source).expanduser().exists():
        raise DataError(f"dataset not found: {params.data.source}")
    for name in params.targets:
        target = get_target(name)
        if gpu_elsewhere(target):
            continue  # searched with its latency table; its benchmark needs a GPU node
        target.check_available()
    tracking = params.tracking.model_copy(
        update={
            "uri": _absolute_uri(params.tracking.uri),
            "dvc_remote": str(Path(params.tracking.dvc_remote).expanduser().absolute()),
        }
    )
    check_reachable(tracking.uri)
    data = params.data
    if data.source != "digits":
        data = data.model_copy(update={"source": str(Path(data.source).expanduser().absolute())})
    return params.model_copy(update={"tracking": tracking, "data": data})


def gpu_elsewhere(target) -> bool:
    """A GPU target this machine cannot run (its benchmark needs a GPU node)."""
    from nasforge.search.setup import GPU_DEVICES

    return target.kind == "runtime" and target.device in GPU_DEVICES and not target.is_available()


def local_targets(params: Params) -> tuple[list[str], list[str]]:
    """(targets benchmarked by this local run, GPU targets left to a GPU node)."""
    here, elsewhere = [], []
    for name in params.targets:
        (elsewhere if gpu_elsewhere(get_target(name)) else here).append(name)
    return here, elsewhere


def _publish(report_dir: Path, runs_dir: Path) -> tuple[Path, dict]:
    """Copy the report to ``runs/<run-id>/`` (beside the task logs) and ``runs/latest/``."""
    summary = json.loads((report_dir / "summary.json").read_text())
    dest = runs_dir / summary["run_id"]
    latest = runs_dir / "latest"
    if dest.exists():
        for p in dest.iterdir():
            if p.name != LOG_DIR:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.copytree(report_dir, dest, dirs_exist_ok=True)
    if latest.exists():
        shutil.rmtree(latest)
    shutil.copytree(dest, latest)
    return dest, summary


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter lines)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- resume ---------------------------------------------------------------------------------


def _code_digest() -> str:
    """Digest of nasforge's own code: a run resumed after a code change could mix two versions."""
    import nasforge
    import nasforge.components
    import nasforge.pipelines

    h = hashlib.sha256()
    for pkg in (nasforge, nasforge.components, nasforge.pipelines):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _dataset_fingerprint(source: str) -> str:
    """Size and modification time of the dataset's files (a changed dataset is a new run)."""
    if source == "digits":
        return "digits"
    path = Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def run_identity(params: Params) -> str:
    """What makes two ``nasforge run`` invocations the same run: params, code and dataset."""
    h = hashlib.sha256()
    for part in (params.to_json(), _code_digest(), _dataset_fingerprint(params.data.source)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _read_state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_state(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, folder / STATE_FILE)


def _close_abandoned(resume_root: Path, uri: str, keep: Path) -> None:
    """Mark the MLflow runs of killed, unfinished runs KILLED (not RUNNING forever).

    Their state stays: running the same params again still resumes them.
    """
    from nasforge.tracking.mlflow_runs import close_run

    for folder in resume_root.glob("*"):
        state = _read_state(folder)
        if folder == keep or not state or state.get("status") != "running":
            continue
        if checkpoint.pid_alive(int(state.get("pid", 0))):
            continue
        with contextlib.suppress(Exception):
            close_run(uri, state["parent_run_id"], "KILLED")
        _write_state(folder, {**state, "status": "killed"})


def _failed_stage(error_log: Path) -> str | None:
    """``'<stage>: <its one-line error>'`` of the last stage that failed, if one said why."""
    try:
        lines = [ln for ln in error_log.read_text().splitlines() if ln.strip()]
        last = json.loads(lines[-1])
    except (OSError, ValueError, IndexError):
        return None
    return f"{last['stage']}: {last['error']}"


class _Interrupts:
    """SIGTERM (a CI timeout, `kill`) or SIGINT ends the run within seconds: state kept, resumable.

    Either signal raises KeyboardInterrupt in the main thread and terminates this process's task
    subprocesses, now and any started until :meth:`restore` (a SIGTERM reaches only this
    process). kfp.local runs a ParallelFor in a thread pool and, on the way out of an
    interrupted loop, waits for every iteration's chain of tasks to finish
    (``executor.shutdown(wait=True)``): without this an interrupted run went on training and
    benchmarking for minutes. Tasks checkpoint as they go, so a terminated task loses nothing
    the next run needs.
    """

    def __init__(self) -> None:
        import threading

        self._done = threading.Event()
        self._reaping = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only; elsewhere signals are left alone)."""
        with contextlib.suppress(ValueError):
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        """Stop terminating tasks and give the signals back."""
        self._done.set()
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous)  # type: ignore[arg-type]

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if not self._reaping:
            import threading

            self._reaping = True
            threading.Thread(target=self._reap, name="nasforge-stop-tasks", daemon=True).start()
        raise KeyboardInterrupt

    def _reap(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.is_set():
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.terminate()
            self._done.wait(0.2)


def run_local(params_path: str | Path, runs_dir: str | Path = "runs", fresh: bool = False) -> dict:
    """Run the full DAG with ``kfp.local`` and publish its report.

    A run that did not finish (killed, interrupted, or failed) is continued by running the same
    command again: same params, code and dataset give the same run, whose finished tasks are
    taken from kfp.local's cache and whose unfinished stages continue from their work folders
    (the search from its study and supernet checkpoint, training from its last epoch). A task
    that fails is not retried here: the failure is bad input or a bug, and the last line names
    the stage and its error.

    Args:
        params_path: The params file.
        runs_dir: Where runs are published (``<run-id>/``, ``latest/``), task outputs written
            (``kfp-local/``) and unfinished runs kept (``.resume/``: state, kfp.local's task
            cache, the stages' work folders).
        fresh: Start anew even if an unfinished run with the same params exists.

    Returns:
        The run's summary.

    Raises:
        NasforgeError: Bad input, or a pipeline task failed.
    """
    import kfp.local

    from nasforge.stages.runner import ERROR_LOG_ENV, PARENT_PID_ENV
    from nasforge.tracking.mlflow_runs import close_run, open_parent_run, reopen_run

    params = preflight(load_params(params_path))
    runs_dir = Path(runs_dir).absolute()
    runs_dir.mkdir(parents=True, exist_ok=True)
    tp = params.tracking
    identity = run_identity(params)
    resume_root = runs_dir / RESUME_DIR
    folder = resume_root / identity[:16]
    state = _read_state(folder)
    if (
        state
        and state.get("status") == "running"
        and checkpoint.pid_alive(int(state.get("pid", 0)))
    ):
        if int(state["pid"]) != os.getpid():
            raise NasforgeError(
                f"run {state['run_name']} with these params is already running (pid {state['pid']})"
            )
    _close_abandoned(resume_root, tp.uri, keep=folder)
    resumed = False
    if state and not fresh and reopen_run(tp.uri, state["parent_run_id"]):
        run_name, parent = state["run_name"], state["parent_run_id"]
        resumed = True
    else:
        if state:
            with contextlib.suppress(Exception):
                close_run(tp.uri, state["parent_run_id"], "KILLED")
        shutil.rmtree(folder, ignore_errors=True)
        run_name = f"{params.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = open_parent_run(tp.uri, tp.experiment, run_name, params.model_dump(mode="json"))
    state = {
        "run_name": run_name,
        "parent_run_id": parent,
        "identity": identity,
        "params": str(Path(params_path).absolute()),
        "status": "running",
        "pid": os.getpid(),
        "started": time.time(),
    }
    _write_state(folder, state)
    error_log = folder / "errors.jsonl"
    error_log.write_text("")
    os.environ[checkpoint.WORK_ROOT_ENV] = str(folder / "work")
    os.environ[ERROR_LOG_ENV] = str(error_log)
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(runs_dir / "kfp-local"),
        enable_caching=True,  # what a resumed run finds here was finished by this run
        cache_root=str(folder / "kfp-cache"),
    )
    from nasforge.pipelines.nasforge_pipeline import build_pipeline, pipeline_arguments
    from nasforge.pipelines.task_logs import candidate_archs, task_output

    here, elsewhere = local_targets(params)
    for name in elsewhere:
        problem = get_target(name).availability_problem()
        print(
            f"==> {name}: {problem} here; its benchmark needs a GPU node (the search uses its "
            "latency table if one was profiled there); the other targets run",
            flush=True,
        )
    if not here:
        raise TargetError(
            f"no target of {params.targets} can be benchmarked here; run on a GPU node"
        )
    verb = "resuming" if resumed else "nasforge run"
    print(
        f"==> {verb} {run_name}: {len(params.targets)} target(s) {params.targets}, dataset {params.data.source}",
        flush=True,
    )
    log_dir = runs_dir / parent / LOG_DIR
    print(f"==> MLflow parent run {parent}; task logs in {_shown(log_dir)}/", flush=True)
    t0 = time.perf_counter()
    refs = plan(params.search.max_candidates, here)
    estimator = Estimator(refs, prior_costs(params, refs), time.monotonic())
    output = None
    interrupts = _Interrupts()
    interrupts.install()
    try:
        with RunConsole(sys.stdout, estimator) as console:

            def on_search(outputs: dict) -> None:
                found = outputs.get("Output")
                if isinstance(found, list):
                    new = plan(len(found), here)
                    console.replan(new, prior_costs(params, new))
                console.set_archs(candidate_archs(outputs))

            with task_output(log_dir, folder / "progress", console) as output:
                output.on_search = on_search
                task = build_pipeline(here, retry=False)(
                    params_json=params.to_json(),
                    **pipeline_arguments(here),
                    run_name=run_name,
                    parent_run_id=parent,
                )
    except RuntimeError as err:  # kfp.local reports a failed task this way
        _write_state(folder, {**state, "status": "failed"})
        close_run(tp.uri, parent, "FAILED")
        sys.stdout.flush()
        for ref, log in output.failed if output is not None else []:
            print(f"==> {ref.key} failed; its log: {_shown(log)}", file=sys.stderr)
        print(f"==> run {run_name} stopped; the same command resumes it", file=sys.stderr)
        cause = _failed_stage(error_log) or f"pipeline failed: {str(err).splitlines()[0]}"
        raise NasforgeError(cause) from None
    except KeyboardInterrupt:
        _write_state(folder, {**state, "status": "interrupted"})
        with contextlib.suppress(Exception):
            close_run(tp.uri, parent, "KILLED")
        print(f"==> run {run_name} interrupted; the same command resumes it", file=sys.stderr)
        raise
    finally:
        interrupts.restore()
        for name in (checkpoint.WORK_ROOT_ENV, ERROR_LOG_ENV, PARENT_PID_ENV):
            os.environ.pop(name, None)
    dest, summary = _publish(Path(task.output.path), runs_dir)
    # Finished: the task outputs stay in runs/kfp-local; the cache and work folders can go.
    shutil.rmtree(folder, ignore_errors=True)
    print(f"==> pipeline finished in {duration(time.perf_counter() - t0)}", flush=True)
    for target, s in summary["targets"].items():
        acc = f"{s['accuracy']:.4f}" if s.get("accuracy") is not None else "-"
        lat = f"{s['latency_p50_ms']:.3f} ms" if s.get("latency_p50_ms") is not None else "-"
        verdict = "promoted" if s["promoted"] else "not promoted"
        print(
            f"    {target}: {s.get('model_name')} v{s.get('version')} acc {acc} p50@1 {lat} -> {verdict} ({s['reason']})"
        )
    print(f"==> report:  {_shown(dest / 'report.html')}")
    print(
        f"==> summary: {_shown(dest / 'summary.json')} "
        f"(also {_shown(runs_dir / 'latest' / 'summary.json')})"
    )
    return summary
