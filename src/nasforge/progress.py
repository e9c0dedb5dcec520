"""Progress of a stage's loops (epochs, trials, timed runs), for whoever watches the stage.

A loop calls :func:`step` once per iteration. Two audiences read it:

* ``nasforge run`` gives every task a progress file (the :data:`PROGRESS_ENV` variable);
  :func:`step` appends one JSON line per update there (at most one every
  :data:`WRITE_INTERVAL_S` per loop, plus the first and the last), and the driver draws its bars
  and its time estimate from these files (:class:`EventReader`, :mod:`nasforge.console`).
* A stage's own output (the task's log file, a KFP pod's log, a single-stage command) gets plain
  lines such as ``  epoch 3/15 loss 0.4312``: the first and last step of a loop and at most one
  line every :data:`ECHO_INTERVAL_S` in between, so a long loop stays readable in a pod log.

A loop that already prints its own milestones passes ``echo=False``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: Set by ``nasforge run`` for each task: the JSON-lines file its progress events go to.
PROGRESS_ENV = "NASFORGE_PROGRESS_FILE"
#: Shortest time between two events of one loop in the progress file (the driver redraws at 4 Hz).
WRITE_INTERVAL_S = 0.25
#: Shortest time between two plain progress lines of one loop in a stage's output.
ECHO_INTERVAL_S = 30.0


class _Loop:
    __slots__ = ("last_done", "last_write", "last_echo")

    def __init__(self) -> None:
        self.last_done = math.inf
        self.last_write = -math.inf
        self.last_echo = -math.inf


_loops: dict[str, _Loop] = {}
_lock = threading.Lock()


def step(kind: str, done: int, total: int, *, echo: bool = True, **info: float | str) -> None:
    """Report that ``done`` of ``total`` iterations of the loop ``kind`` are finished.

    Args:
        kind: What the loop iterates over, e.g. ``"epoch"``, ``"search trial"``; the driver shows
            one bar per kind and task.
        done: Iterations finished (a loop that starts again from a lower count is a new run of it).
        total: Iterations the loop will run.
        echo: Also print a plain, rate-limited line to stdout (off for loops that print their
            own milestones).
        **info: Short values shown next to the bar, e.g. ``loss=0.43``.
    """
    now = time.monotonic()
    with _lock:
        loop = _loops.setdefault(kind, _Loop())
        new = done <= loop.last_done  # first report, or the loop started over
        last = done >= total
        write = new or last or now - loop.last_write >= WRITE_INTERVAL_S
        show = echo and (new or last or now - loop.last_echo >= ECHO_INTERVAL_S)
        loop.last_done = done
        if write:
            loop.last_write = now
        if show:
            loop.last_echo = now
    path = os.environ.get(PROGRESS_ENV)
    if write and path:
        event: dict[str, Any] = {"kind": kind, "done": int(done), "total": int(total)}
        if info:
            event["info"] = info
        event["time"] = time.time()
        try:
            with open(path, "a") as f:
                f.write(json.dumps(event) + "\n")
        except OSError:
            pass  # progress is for the eyes; a full disk must not fail the stage
    if show:
        print(f"  {plain_text(kind, done, total, info)}", file=sys.stdout, flush=True)


def plain_text(kind: str, done: int, total: int, info: dict[str, Any] | None = None) -> str:
    """``"epoch 3/15 loss 0.4312"``: one loop's progress as plain text."""
    parts = [f"{kind} {done}/{total}"]
    for key, value in (info or {}).items():
        parts.append(f"{key} {format_value(value)}")
    return " ".join(parts)


def format_value(value: Any) -> str:
    """A progress value for display: floats with 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class EventReader:
    """Reads the events a task appended to its progress file since the last call.

    A line still being written (no newline yet) is left for the next call.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0

    def read(self) -> list[dict[str, Any]]:
        """The new events, oldest first (none while the file does not exist)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        events = []
        for line in chunk[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and {"kind", "done", "total"} <= event.keys():
                events.append(event)
        return events
