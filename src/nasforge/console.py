"""What ``nasforge run`` shows while the pipeline runs: stage lines, progress bars, time left.

One line per stage task when it starts and when it ends, naming the candidate and target it
belongs to, how many of the DAG's tasks are done, the time elapsed and an estimate of the rest::

    [ 7/18] prune         candidate 1 (|nor_conv_3x3~0|+|nor_co…)  done in 41 s · elapsed 3:12 · ~4 min left

On a terminal, bars under these lines (drawn with ``rich``) follow the loops of the running tasks
(supernet epochs, search trials, fine-tuning epochs, timed benchmark runs) from the events the
tasks write (:mod:`nasforge.progress`). When the output is not a terminal (CI, a file, a pipe)
the same stage lines are printed plainly, without bars or escape codes, plus a status line when
nothing was printed for :data:`HEARTBEAT_S`.

The estimate (:class:`Estimator`) starts from a prior cost per task (:func:`prior_costs`,
seconds of a digits run on a 2-core machine) and rescales it by what the run measures: the
durations of finished tasks per stage, the running tasks' loop progress, and the parallelism
seen so far.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from nasforge.progress import EventReader, format_value

#: Every stage task of the DAG, in pipeline order (``collect`` gathers a candidate's benchmarks).
STAGES = (
    "prepare-data",
    "search",
    "train",
    "prune",
    "qat",
    "export",
    "benchmark",
    "collect",
    "promote",
    "report",
)
PER_CANDIDATE = ("train", "prune", "qat", "export", "collect")
#: The loops drawn as bars, per stage. Inner loops (the latency timing inside the search's
#: trials) are left to the task's log.
BARS: dict[str, tuple[str, ...]] = {
    "search": ("supernet epoch", "search trial"),
    "train": ("epoch",),
    "prune": ("prune step", "epoch"),
    "qat": ("epoch",),
    "benchmark": ("timed run",),
}
#: Without a terminal: a status line when nothing was printed for this long.
HEARTBEAT_S = 300.0
ARCH_CHARS = 24
_NAME_WIDTH = max(len(s) for s in STAGES)


@dataclass(frozen=True)
class TaskRef:
    """One task of the DAG: a stage, for a candidate and a target where it has them."""

    stage: str
    candidate: int | None = None
    target: str | None = None

    @property
    def key(self) -> str:
        """A name unique within a run (``benchmark-cand-0-onnxruntime-cpu``), used for files."""
        parts = [self.stage]
        if self.candidate is not None:
            parts.append(f"cand-{self.candidate}")
        if self.target is not None:
            parts.append(self.target)
        return "-".join(parts)


def plan(candidates: int, targets: Sequence[str]) -> list[TaskRef]:
    """The DAG's tasks in pipeline order for ``candidates`` candidates and these ``targets``."""
    refs = [TaskRef("prepare-data"), TaskRef("search")]
    for c in range(candidates):
        refs += [TaskRef(s, c) for s in ("train", "prune", "qat", "export")]
        refs += [TaskRef("benchmark", c, t) for t in targets]
        refs.append(TaskRef("collect", c))
    return refs + [TaskRef("promote"), TaskRef("report")]


@dataclass(frozen=True)
class Cost:
    """Prior cost of a task in seconds: a fixed part plus one part per loop drawn as a bar."""

    fixed: float
    loops: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.fixed + sum(self.loops.values())


def prior_costs(params: Any, refs: Sequence[TaskRef]) -> dict[str, Cost]:
    """Prior cost of each task from the params, in seconds.

    The fixed parts were measured on a tiny digits run on a shared 2-core machine (most of a
    small task is starting Python, torch and an MLflow run, and for qat/export the graph
    capture); the per-iteration parts are estimates. Only the ratios matter much:
    :class:`Estimator` rescales them by the durations it measures.
    """
    sp, bp = params.search, params.benchmark
    runtime_targets = sum(1 for t in params.targets if not t.startswith("table:"))
    latency_per_trial = 1.0 * runtime_targets if sp.latency_source == "measure" else 0.05
    train_runs = params.train.tune.trials if params.train.tune.enabled else 1
    timed = 2 * len(bp.batch_sizes) * (bp.warmup + bp.repeats)
    by_stage = {
        "prepare-data": Cost(7.0),
        "search": Cost(
            9.0,
            {
                "supernet epoch": 1.0 * sp.supernet_epochs,
                "search trial": (0.3 + latency_per_trial) * sp.trials,
            },
        ),
        "train": Cost(9.0, {"epoch": 0.5 * params.train.epochs * train_runs}),
        "prune": Cost(9.0, {"epoch": 0.5 * params.prune.finetune_epochs, "prune step": 0.2}),
        "qat": Cost(18.0, {"epoch": 1.5 * params.qat.epochs}),
        "export": Cost(19.0),
        "benchmark": Cost(10.0, {"timed run": 0.002 * timed}),
        "collect": Cost(1.0),
        "promote": Cost(11.0),
        "report": Cost(12.0),
    }
    return {r.key: by_stage[r.stage] for r in refs}


@dataclass
class _Task:
    ref: TaskRef
    cost: Cost
    state: str = "waiting"  # waiting, running, done, failed, cached
    started: float | None = None
    seconds: float | None = None
    loops: dict[str, tuple[int, int, dict[str, Any]]] = field(default_factory=dict)


class Estimator:
    """How many tasks are done and how long the rest will take.

    Work is counted in task-seconds: a finished task counts its measured duration, a running one
    the share of its expected cost its loops report done (or, without loops, the share of its
    expected cost already spent, at most 95%). A task's expected cost is its prior times the
    ratio measured/prior of the finished tasks of its stage (of all finished tasks for a stage
    none has finished yet). The time left is the remaining work divided by the rate at which
    work got done since the run started (which accounts for tasks running side by side).
    Tasks taken from the cache of an earlier attempt count as done and as no work.
    """

    def __init__(self, refs: Sequence[TaskRef], costs: dict[str, Cost], start: float) -> None:
        self.start = start
        self.tasks: dict[str, _Task] = {}
        self.replan(refs, costs)

    def replan(self, refs: Sequence[TaskRef], costs: dict[str, Cost]) -> None:
        """Set the DAG's tasks (once the search has said how many candidates there are)."""
        old = self.tasks
        self.tasks = {r.key: old.get(r.key) or _Task(r, costs[r.key]) for r in refs}
        for key, task in old.items():  # a task that ran is kept even if the plan lost it
            if key not in self.tasks and task.state != "waiting":
                self.tasks[key] = task

    def _task(self, ref: TaskRef) -> _Task:
        if ref.key not in self.tasks:
            cost = Cost(10.0)
            for t in self.tasks.values():
                if t.ref.stage == ref.stage:
                    cost = t.cost
                    break
            self.tasks[ref.key] = _Task(ref, cost)
        return self.tasks[ref.key]

    def started(self, ref: TaskRef, now: float) -> None:
        task = self._task(ref)
        task.state, task.started, task.loops = "running", now, {}

    def finished(self, ref: TaskRef, now: float, ok: bool = True) -> float:
        """Mark a task finished; returns its duration."""
        task = self._task(ref)
        task.seconds = now - (task.started if task.started is not None else now)
        task.state = "done" if ok else "failed"
        return task.seconds

    def cached(self, ref: TaskRef) -> None:
        self._task(ref).state = "cached"

    def progress(self, ref: TaskRef, kind: str, done: int, total: int, info: dict) -> None:
        task = self._task(ref)
        if task.state == "running":
            task.loops[kind] = (done, total, info)

    @property
    def done(self) -> int:
        return sum(1 for t in self.tasks.values() if t.state in ("done", "cached"))

    @property
    def total(self) -> int:
        return len(self.tasks)

    def running(self) -> list[_Task]:
        return [t for t in self.tasks.values() if t.state == "running"]

    def _scale(self) -> Callable[[_Task], float]:
        measured: dict[str, list[float]] = {}
        for t in self.tasks.values():
            if t.state == "done" and t.seconds is not None:
                m = measured.setdefault(t.ref.stage, [0.0, 0.0])
                m[0] += t.seconds
                m[1] += t.cost.total
        spent = sum(m[0] for m in measured.values())
        prior = sum(m[1] for m in measured.values())
        overall = spent / prior if prior > 0 and spent > 0 else 1.0

        def expected(task: _Task) -> float:
            m = measured.get(task.ref.stage)
            ratio = m[0] / m[1] if m and m[1] > 0 and m[0] > 0 else overall
            return task.cost.total * ratio

        return expected

    def fraction(self, task: _Task, now: float, expected: float) -> float:
        """Share of a running task's work done."""
        loops = {k: v for k, v in task.cost.loops.items() if v > 0}
        reported = [k for k in loops if k in task.loops]
        if reported:
            done = 0.0
            for kind in reported:
                d, n, _ = task.loops[kind]
                done += loops[kind] * min(1.0, d / n if n > 0 else 1.0)
            # Loops come one after another: a later loop under way means the earlier ones ended.
            order = list(loops)
            last = max(order.index(k) for k in reported)
            done += sum(loops[k] for k in order[:last] if k not in reported)
            # A loop under way means the task has started up (about half its fixed cost).
            done += task.cost.fixed / 2
            return min(0.99, done / task.cost.total)
        spent = now - (task.started if task.started is not None else now)
        return min(0.95, spent / expected) if expected > 0 else 0.0

    def remaining(self, now: float) -> float | None:
        """Seconds until the run ends, or None before any task of this run has finished."""
        expected = self._scale()
        done_work = left = 0.0
        finished = False
        for t in self.tasks.values():
            if t.state == "done":
                done_work += t.seconds or 0.0
                finished = True
            elif t.state == "running":
                e = expected(t)
                f = self.fraction(t, now, e)
                done_work += f * e
                left += (1.0 - f) * e
            elif t.state == "waiting":
                left += expected(t)
        elapsed = now - self.start
        if not finished or done_work <= 0 or elapsed <= 0:
            return None
        return left * elapsed / done_work


# --- text -------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``"41 s"`` under a minute, else ``"3:12"`` or ``"1:02:03"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def clock(seconds: float) -> str:
    """Elapsed time as ``m:ss`` (``h:mm:ss`` past an hour)."""
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def time_left(seconds: float | None) -> str | None:
    """``"~4 min left"`` (rounded up), ``"<1 min left"``; None when unknown."""
    if seconds is None:
        return None
    if seconds < 60:
        return "<1 min left"
    minutes = int(-(-seconds // 60))
    if minutes < 120:
        return f"~{minutes} min left"
    return f"~{minutes / 60:.1f} h left"


@dataclass(frozen=True)
class Glyphs:
    """Separator and ellipsis: typographic on a UTF-8 stream, ASCII elsewhere."""

    sep: str
    more: str

    @classmethod
    def for_stream(cls, stream: TextIO) -> Glyphs:
        enc = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        return cls("·", "…") if enc == "utf8" else cls("-", "...")


def describe(ref: TaskRef, archs: dict[int, str], glyphs: Glyphs) -> str:
    """``"candidate 1 (|nor_conv_3x3~0|+…) on openvino-cpu"``: what a task works on."""
    parts = []
    if ref.candidate is not None:
        text = f"candidate {ref.candidate}"
        arch = archs.get(ref.candidate)
        if arch:
            if len(arch) > ARCH_CHARS:
                arch = arch[: ARCH_CHARS - 1] + glyphs.more
            text += f" ({arch})"
        parts.append(text)
    if ref.target is not None:
        parts.append(f"on {ref.target}")
    return " ".join(parts)


def stage_line(
    done: int,
    total: int,
    ref: TaskRef,
    event: str,
    *,
    archs: dict[int, str],
    glyphs: Glyphs,
    elapsed: float | None = None,
    left: float | None = None,
) -> str:
    """One stage line: ``[ k/N] <stage>  <what it works on>  <event> · elapsed · ~time left``."""
    width = len(str(total))
    head = f"[{done:>{width}}/{total}] {ref.stage:<{_NAME_WIDTH}}"
    what = describe(ref, archs, glyphs)
    text = f"{head} {what}  {event}" if what else f"{head} {event}"
    tail = []
    if elapsed is not None:
        tail.append(f"elapsed {clock(elapsed)}")
    if left_text := time_left(left):
        tail.append(left_text)
    if tail:
        text += f" {glyphs.sep} " + f" {glyphs.sep} ".join(tail)
    return text


def _loop_text(kind: str, done: int, total: int, info: dict[str, Any]) -> str:
    extra = " ".join(f"{k} {format_value(v)}" for k, v in info.items())
    return f"{kind} {done}/{total}" + (f" {extra}" if extra else "")


# --- the console --------------------------------------------------------------------------------


class RunConsole:
    """Stage lines and progress for one ``nasforge run`` (thread-safe: tasks run in threads).

    Args:
        stream: Where to write (the terminal or whatever stdout is).
        estimator: The run's task list and time estimate.
        live: Draw bars (default: when ``stream`` is a terminal).
        clock: Monotonic time source (tests pass their own).
        heartbeat_s: Without bars, a status line after this long without output.
    """

    def __init__(
        self,
        stream: TextIO,
        estimator: Estimator,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        from rich.console import Console

        self.stream = stream
        self.estimator = estimator
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.glyphs = Glyphs.for_stream(stream)
        self.archs: dict[int, str] = {}
        if live is None:  # the stream itself, not rich's FORCE_COLOR & co: CI logs stay plain
            isatty = getattr(stream, "isatty", lambda: False)
            live = bool(isatty()) and os.environ.get("TERM", "") not in ("dumb", "unknown")
        self.live = live
        self._rich = Console(file=stream, highlight=False, soft_wrap=True, force_terminal=live)
        self._lock = threading.RLock()  # the state: estimator, readers, architectures
        self._out_lock = threading.Lock()  # whole lines on the stream
        self._readers: dict[str, EventReader] = {}
        self._live_display: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_output = clock()

    # - lifecycle -

    def __enter__(self) -> RunConsole:
        if self.live:
            from rich.live import Live

            self._live_display = Live(
                console=self._rich,
                get_renderable=self.render_bars,
                refresh_per_second=4,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live_display.start()
        else:
            self._thread = threading.Thread(
                target=self._plain_loop, name="nasforge-console", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._live_display is not None:
            self._live_display.stop()
            self._live_display = None

    # - events from the driver -

    def print(self, text: str, style: str | None = None, bold: int = 0) -> None:
        """A line of its own (above the bars on a terminal); ``bold``: its first characters.

        Never called with the state lock held: rich's live display holds its own lock while it
        asks :meth:`render_bars` (which takes the state lock) for the bars, and printing takes
        rich's lock.
        """
        with self._out_lock:
            if self.live:
                from rich.text import Text

                line = Text(text, style=style or "")
                line.stylize("bold", 0, bold)
                self._rich.print(line)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()
            self._last_output = self.clock()

    def set_archs(self, archs: dict[int, str]) -> None:
        """The candidates' architectures (known once the search is done)."""
        with self._lock:
            self.archs = dict(archs)

    def replan(self, refs: Sequence[TaskRef], costs: dict[str, Cost]) -> None:
        with self._lock:
            self.estimator.replan(refs, costs)

    def started(self, ref: TaskRef, progress_file: Path | None = None) -> None:
        with self._lock:
            self.estimator.started(ref, self.clock())
            if progress_file is not None:
                self._readers[ref.key] = EventReader(progress_file)
            line = self._stage_line(ref, "started")
        self.print(*line)

    def finished(self, ref: TaskRef, ok: bool) -> float:
        """Print the task's end line; returns its duration."""
        with self._lock:
            self._poll()
            seconds = self.estimator.finished(ref, self.clock(), ok)
            self._readers.pop(ref.key, None)
            if ok:
                line = self._stage_line(ref, f"done in {duration(seconds)}", "green")
            else:
                line = self._stage_line(ref, f"FAILED after {duration(seconds)}", "bold red")
        self.print(*line)
        return seconds

    def cached(self, ref: TaskRef) -> None:
        with self._lock:
            self.estimator.cached(ref)
            line = self._stage_line(ref, "done earlier (cached)", "dim")
        self.print(*line)

    # - rendering -

    def _stage_line(
        self, ref: TaskRef, event: str, style: str | None = None
    ) -> tuple[str, str | None, int]:
        """(text, style, bold characters) of a stage line; called with the state lock held."""
        now = self.clock()
        est = self.estimator
        line = stage_line(
            est.done,
            est.total,
            ref,
            event,
            archs=self.archs,
            glyphs=self.glyphs,
            elapsed=now - est.start,
            left=None if event == "started" else est.remaining(now),
        )
        return line, style, line.index("]") + 2 + len(ref.stage)

    def _poll(self) -> None:
        for key, reader in list(self._readers.items()):
            task = self.estimator.tasks.get(key)
            if task is None:
                continue
            for e in reader.read():
                info = e.get("info") if isinstance(e.get("info"), dict) else {}
                self.estimator.progress(task.ref, str(e["kind"]), e["done"], e["total"], info)

    def status_text(self) -> str:
        """``"7/18 stages done · elapsed 3:12 · ~4 min left"``."""
        now = self.clock()
        est, sep = self.estimator, self.glyphs.sep
        parts = [f"{est.done}/{est.total} stages done", f"elapsed {clock(now - est.start)}"]
        if left := time_left(est.remaining(now)):
            parts.append(left)
        return f" {sep} ".join(parts)

    def bars(self) -> list[tuple[str, str, int, int, dict[str, Any]]]:
        """(task label, loop, done, total, info) for every loop drawn as a bar."""
        rows = []
        for task in self.estimator.running():
            label = task.ref.stage
            if task.ref.candidate is not None:
                label += f" cand {task.ref.candidate}"
            if task.ref.target is not None:
                label += f" {task.ref.target}"
            for kind in BARS.get(task.ref.stage, ()):
                if kind in task.loops:
                    d, n, info = task.loops[kind]
                    rows.append((label, kind, d, n, info))
        return rows

    def render_bars(self) -> Any:
        """The live area under the stage lines: one bar per running loop and a status line."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            self._poll()
            rows = self.bars()
            status = self.status_text()
            running = [t.ref for t in self.estimator.running()]
        table = Table.grid(padding=(0, 1))
        for _ in range(5):
            table.add_column()
        for label, kind, d, n, info in rows:
            extra = " ".join(f"{k} {format_value(v)}" for k, v in info.items())
            table.add_row(
                Text(f"  {label}", style="bold"),
                Text(kind),
                ProgressBar(total=max(n, 1), completed=min(d, n), width=30),
                Text(f"{d}/{n}"),
                Text(extra, style="dim"),
            )
        waiting = [r for r in running if r.stage not in BARS]
        names = ", ".join(
            r.stage + (f" cand {r.candidate}" if r.candidate is not None else "") for r in waiting
        )
        footer = Text(f"  {status}" + (f" {self.glyphs.sep} running {names}" if names else ""))
        return Group(table, footer)

    def _plain_loop(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                self._poll()
                if self.clock() - self._last_output < self.heartbeat_s:
                    continue
                text = self.heartbeat_text()
            self.print(text)

    def heartbeat_text(self) -> str:
        """The plain status line: what runs, how far its loops are, and the time estimate."""
        sep = self.glyphs.sep
        running = []
        for task in self.estimator.running():
            name = task.ref.stage + (
                f" cand {task.ref.candidate}" if task.ref.candidate is not None else ""
            )
            loops = [
                _loop_text(k, *task.loops[k])
                for k in BARS.get(task.ref.stage, ())
                if k in task.loops
            ]
            running.append(name + (f" ({', '.join(loops)})" if loops else ""))
        head = f"  {self.glyphs.more} running: " + ("; ".join(running) or "nothing")
        return f"{head} {sep} {self.status_text()}"
