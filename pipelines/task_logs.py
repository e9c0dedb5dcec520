"""kfp.local's output into one log file per task, and the task's start and end to the console.

``kfp.local`` (2.17) runs each task of a pipeline in a worker thread of the calling process: it
configures the root logger to write to ``sys.stdout`` (the executor input, the task's outputs,
separators), runs the task in a subprocess whose output it copies line by line to
``sys.stdout``, and warns on ``sys.stderr``. :func:`task_output` takes this output at its roots
while the pipeline runs:

* the task's subprocess writes straight into ``<logs>/<task>.log`` (its stdout and stderr), and
  gets its progress file (:data:`nasforge.progress.PROGRESS_ENV`);
* ``sys.stdout`` and ``sys.stderr`` are routed by thread: what kfp.local's worker thread for a
  task writes (its logging, prints and warnings) goes to that task's log, what the orchestrating
  thread writes to ``<logs>/kfp.log``;
* the console hears when each task starts (the subprocess is launched), ends, or is taken from
  kfp.local's cache.

It wraps two kfp.local functions, both looked up through their modules at call time:
``subprocess_task_handler.run_local_subprocess`` (launches a task's process) and
``orchestrator.task_executor.execute_single_task`` (runs one task, cache included).
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from nasforge.console import PER_CANDIDATE, RunConsole, TaskRef
from nasforge.progress import PROGRESS_ENV

KFP_LOG = "kfp.log"
_ITERATION = re.compile(r"-iteration-(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class _Current:
    ref: TaskRef
    log: TextIO
    log_path: Path
    launched: bool = False


class _ThreadRouter(io.TextIOBase):
    """A text stream that writes to the current thread's task log, else to ``default``."""

    def __init__(self, local: threading.local, default: TextIO, encoding: str) -> None:
        self._local = local
        self._default = default
        self._encoding = encoding
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    def _target(self) -> TextIO:
        current = getattr(self._local, "task", None)
        return current.log if current is not None else self._default

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            target = self._target()
            target.write(_ANSI.sub("", text))  # kfp.local colours task names and statuses
            target.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._target().flush()


def task_ref(component: str, pipeline_resource_name: str, arguments: dict[str, Any]) -> TaskRef:
    """Which task of the DAG a kfp.local task is.

    Args:
        component: The component's name in the pipeline spec (``comp-train``,
            ``comp-benchmark-2``, ``comp-collect-cpu-gpu``).
        pipeline_resource_name: kfp.local's name of the (nested) DAG running it; the candidate
            is the iteration of the outer loop (its items are the candidate indices).
        arguments: The task's parameters (the benchmark's ``target``).
    """
    stage = re.sub(r"-\d+$", "", component.removeprefix("comp-"))
    if stage.startswith("collect"):
        stage = "collect"
    candidate = None
    iterations = _ITERATION.findall(pipeline_resource_name)
    if stage in (*PER_CANDIDATE, "benchmark") and iterations:
        candidate = int(iterations[0])
    target = arguments.get("target") if stage == "benchmark" else None
    return TaskRef(stage, candidate, str(target) if target is not None else None)


def candidate_archs(outputs: dict[str, Any]) -> dict[int, str]:
    """``{candidate index: arch_str}`` from the search task's output artifact."""
    art = outputs.get("search")
    path = getattr(art, "path", None) or getattr(art, "uri", None)
    if not path:
        return {}
    try:
        pareto = json.loads((Path(path) / "pareto.json").read_text())
        return {i: str(c.get("arch_str", "")) for i, c in enumerate(pareto["candidates"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class TaskOutput:
    """What :func:`task_output` learned: the failed tasks and their logs."""

    def __init__(self, log_dir: Path, progress_dir: Path) -> None:
        self.log_dir = log_dir
        self.progress_dir = progress_dir
        self.failed: list[tuple[TaskRef, Path]] = []
        self.on_search: Callable[[dict[str, Any]], None] | None = None

    def log_path(self, ref: TaskRef) -> Path:
        return self.log_dir / f"{ref.key}.log"


@contextlib.contextmanager
def task_output(
    log_dir: Path, progress_dir: Path, console: RunConsole, kfp_log: str = KFP_LOG
) -> Iterator[TaskOutput]:
    """While the block runs a kfp.local pipeline: per-task logs, and the console told of tasks.

    Args:
        log_dir: Where the task logs go (``<task key>.log``, ``kfp.log``); appended to, so a
            resumed run keeps the earlier attempts' logs.
        progress_dir: Where each task's progress events go (``<task key>.jsonl``).
        console: Told when tasks start, end or come from the cache.
        kfp_log: File name of the orchestrating thread's output under ``log_dir``.
    """
    from kfp.local import subprocess_task_handler
    from kfp.local.orchestrator import orchestrator_utils, task_executor

    log_dir.mkdir(parents=True, exist_ok=True)
    progress_dir.mkdir(parents=True, exist_ok=True)
    state = TaskOutput(log_dir, progress_dir)
    local = threading.local()
    original_run = subprocess_task_handler.run_local_subprocess
    original_execute = task_executor.execute_single_task
    signature = inspect.signature(original_execute)

    def run_local_subprocess(full_command: list[str], env_vars: dict | None = None) -> int:
        current: _Current | None = getattr(local, "task", None)
        if current is None:  # not one of ours (kfp.local used elsewhere in this process)
            return original_run(full_command, env_vars)
        progress_file = progress_dir / f"{current.ref.key}.jsonl"
        progress_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            **(env_vars or {}),
            PROGRESS_ENV: str(progress_file),
            "PYTHONUNBUFFERED": "1",
        }
        current.log.flush()
        current.launched = True
        console.started(current.ref, progress_file)
        with subprocess.Popen(
            full_command, stdout=current.log, stderr=subprocess.STDOUT, env=env
        ) as proc:
            return proc.wait()

    def execute_single_task(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs).arguments
        component = call["task_spec"].component_ref.name
        try:
            arguments = orchestrator_utils.OrchestratorUtils.make_task_arguments(
                task_inputs_spec=call["task_spec"].inputs, io_store=call["io_store"]
            )
        except Exception:  # the task itself reports bad inputs; the label can do without
            arguments = {}
        ref = task_ref(component, call["pipeline_resource_name"], arguments)
        log_path = state.log_path(ref)
        outputs, status = {}, None
        with open(log_path, "a", buffering=1) as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {ref.key}\n")
            current = local.task = _Current(ref, log, log_path)
            try:
                outputs, status = original_execute(*args, **kwargs)
            finally:
                local.task = None
                ok = getattr(status, "name", None) == "SUCCESS"
                if current.launched:
                    console.finished(ref, ok)
                    if not ok:
                        state.failed.append((ref, log_path))
                elif ok:
                    console.cached(ref)
        if ok and ref.stage == "search" and state.on_search is not None:
            state.on_search(outputs)
        return outputs, status

    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    with open(log_dir / kfp_log, "a", buffering=1) as default:
        default.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pipeline\n")
        router = _ThreadRouter(local, default, enc)
        saved = sys.stdout, sys.stderr, builtins.print
        subprocess_task_handler.run_local_subprocess = run_local_subprocess
        task_executor.execute_single_task = execute_single_task
        sys.stdout = sys.stderr = router
        try:
            yield state
        finally:
            # kfp.local swaps builtins.print for an indenting one around each task, from
            # several threads without a lock: tasks that overlap leave it indenting for good.
            sys.stdout, sys.stderr, builtins.print = saved
            subprocess_task_handler.run_local_subprocess = original_run
            task_executor.execute_single_task = original_execute
