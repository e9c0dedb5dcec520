"""nasforge run's console: progress events, stage lines, bars, the time estimate, task logs; and
the permissions of files written atomically."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nasforge import progress
from nasforge.console import (
    BARS,
    Estimator,
    RunConsole,
    TaskRef,
    clock,
    duration,
    plan,
    prior_costs,
    stage_line,
    time_left,
)
from nasforge.pipelines.task_logs import _ThreadRouter, task_ref
from tests.conftest import tiny_params

ANSI = re.compile(r"\x1b\[")
TARGETS = ["onnxruntime-cpu", "openvino-cpu"]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def _fresh_loops(monkeypatch):
    monkeypatch.setattr(progress, "_loops", {})


# --- progress events ----------------------------------------------------------------------------


def test_step_writes_rate_limited_events_the_reader_reads(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(path))
    now = FakeClock(0.0)
    monkeypatch.setattr(progress.time, "monotonic", now)
    reader = progress.EventReader(path)
    assert reader.read() == []  # no file yet
    for i in range(1, 101):
        now.t = i * 0.01  # 100 steps in one second: first, one per 0.25 s, last
        progress.step("epoch", i, 100, loss=1.0 / i)
    events = reader.read()
    assert [e["done"] for e in events] == [1, 26, 51, 76, 100]
    assert events[-1]["info"]["loss"] == pytest.approx(0.01) and events[-1]["total"] == 100
    assert reader.read() == []  # nothing new
    # Echo: only the first and the last step within ECHO_INTERVAL_S.
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["  epoch 1/100 loss 1", "  epoch 100/100 loss 0.01"]
    # A loop that starts over is a new bar: its first step is written and echoed at once.
    progress.step("epoch", 1, 5)
    assert [e["done"] for e in reader.read()] == [1]
    assert capsys.readouterr().out == "  epoch 1/5\n"


def test_step_echo_interval_and_silent_loops(monkeypatch, capsys):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    now = FakeClock(0.0)
    monkeypatch.setattr(progress.time, "monotonic", now)
    for i in range(1, 11):
        now.t = i * 10.0  # one step every 10 s: a line every ECHO_INTERVAL_S (30 s)
        progress.step("search trial", i, 10)
        progress.step("timed run", i, 10, echo=False)
    out = capsys.readouterr().out
    assert "timed run" not in out
    assert [ln.split()[-1] for ln in out.splitlines()] == ["1/10", "4/10", "7/10", "10/10"]


def test_reader_leaves_a_partial_line_and_skips_garbage(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"kind": "epoch", "done": 1, "total": 3}\nnot json\n{"kind": "ep')
    reader = progress.EventReader(path)
    assert [e["done"] for e in reader.read()] == [1]
    with open(path, "a") as f:
        f.write('och", "done": 2, "total": 3}\n[1, 2]\n')
    assert [(e["kind"], e["done"]) for e in reader.read()] == [("epoch", 2)]


def test_step_survives_an_unwritable_progress_file(tmp_path, monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, str(tmp_path / "missing-dir" / "p.jsonl"))
    progress.step("epoch", 1, 2, echo=False)  # no exception: progress never fails a stage


# --- the DAG's tasks and the time estimate ------------------------------------------------------


def test_plan_counts_every_task_of_the_dag():
    refs = plan(2, TARGETS)
    # prepare-data, search, 2 x (train, prune, qat, export, collect), 2 x 2 benchmarks, promote, report
    assert len(refs) == 2 + 2 * 5 + 4 + 2
    keys = [r.key for r in refs]
    assert len(set(keys)) == len(keys)
    assert "benchmark-cand-1-openvino-cpu" in keys and keys[-2:] == ["promote", "report"]


def _estimator(costs_total: dict[str, float] | None = None) -> Estimator:
    refs = [TaskRef("prepare-data"), TaskRef("search"), TaskRef("report")]
    from nasforge.console import Cost

    costs = {r.key: Cost(10.0) for r in refs}
    for k, v in (costs_total or {}).items():
        costs[k] = Cost(v)
    return Estimator(refs, costs, start=0.0)


def test_estimate_rescales_priors_by_measured_durations():
    est = _estimator()
    a, b, c = TaskRef("prepare-data"), TaskRef("search"), TaskRef("report")
    assert est.remaining(0.0) is None  # nothing measured yet
    est.started(a, 0.0)
    assert est.finished(a, 20.0) == 20.0
    # Took twice its prior: the two others (prior 10 each) are expected to take 20 each.
    assert est.remaining(20.0) == pytest.approx(40.0)
    est.started(b, 20.0)
    # Half of search's expected 20 s spent: 10 s done of it, 10 s + report's 20 s left.
    # Work done 30 task-seconds in 30 s of wall time: 30 s left.
    assert est.remaining(30.0) == pytest.approx(30.0)
    est.finished(b, 40.0)
    est.started(c, 40.0)
    est.finished(c, 60.0)
    assert est.remaining(60.0) == 0.0 and est.done == est.total == 3


def test_estimate_counts_parallel_work_and_ignores_cached_tasks():
    from nasforge.console import Cost

    refs = [TaskRef("train", i) for i in range(4)]
    est = Estimator(refs, {r.key: Cost(10.0) for r in refs}, start=0.0)
    est.cached(refs[0])
    est.started(refs[1], 0.0)
    est.started(refs[2], 0.0)
    est.finished(refs[1], 10.0)
    est.finished(refs[2], 10.0)
    # 20 task-seconds done in 10 s (two at a time); 10 left for the last one: 5 s at that rate.
    assert est.remaining(10.0) == pytest.approx(5.0)
    assert est.done == 3


def test_running_loops_give_the_share_of_a_task_done():
    from nasforge.console import Cost

    ref = TaskRef("search")
    est = Estimator(
        [TaskRef("prepare-data"), ref],
        {
            "prepare-data": Cost(10.0),
            "search": Cost(10.0, {"supernet epoch": 30, "search trial": 60}),
        },
        start=0.0,
    )
    est.started(TaskRef("prepare-data"), 0.0)
    est.finished(TaskRef("prepare-data"), 10.0)
    est.started(ref, 10.0)
    task = est.tasks["search"]
    # no loop yet: the share of the expected cost (here 100 s) already spent, at most 95%
    assert est.fraction(task, 20.0, 100.0) == pytest.approx(0.1)
    assert est.fraction(task, 500.0, 100.0) == pytest.approx(0.95)
    # a loop under way: started up (half the fixed 10 s) and half the supernet's 30
    est.progress(ref, "supernet epoch", 15, 30, {"loss": 1.0})
    assert est.fraction(task, 20.0, 100.0) == pytest.approx((5 + 15) / 100)
    est.progress(ref, "search trial", 30, 60, {})
    # the supernet loop is over once the trials run, reported or not
    est.tasks["search"].loops.pop("supernet epoch")
    assert est.fraction(task, 20.0, 100.0) == pytest.approx((5 + 30 + 30) / 100)


events = st.lists(
    st.tuples(st.integers(0, 17), st.sampled_from(["run", "cached"]), st.floats(0.1, 500.0)),
    max_size=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    candidates=st.integers(0, 3),
    n_targets=st.integers(1, 2),
    history=events,
    scale=st.floats(0.5, 20.0),
)
def test_estimate_is_finite_nonnegative_and_scales_with_time(candidates, n_targets, history, scale):
    """Over random DAG sizes and histories: the estimate is >= 0, 0 once all is done, and a
    machine k times slower (every duration and the clock times k) gets k times the estimate."""
    params = tiny_params()
    refs = plan(candidates, TARGETS[:n_targets])
    costs = prior_costs(params, refs)

    def replay(k: float) -> tuple[Estimator, float]:
        est = Estimator(refs, costs, start=0.0)
        now = 0.0
        for idx, kind, seconds in history:
            ref = refs[idx % len(refs)]
            if est.tasks[ref.key].state != "waiting":
                continue
            if kind == "cached":
                est.cached(ref)
                continue
            est.started(ref, now)
            now += seconds * k
            est.finished(ref, now)
        return est, now

    est, now = replay(1.0)
    left = est.remaining(now)
    if any(t.state == "done" for t in est.tasks.values()):
        assert left is not None and left >= 0.0
        slow, slow_now = replay(scale)
        assert slow.remaining(slow_now) == pytest.approx(left * scale, rel=1e-6, abs=1e-6)
        if est.done == est.total:
            assert left == 0.0
    else:
        assert left is None


# --- text ---------------------------------------------------------------------------------------


def test_durations_and_time_left():
    assert duration(41.2) == "41 s" and duration(192) == "3:12" and duration(3723) == "1:02:03"
    assert clock(59.9) == "0:59" and clock(3600) == "1:00:00"
    assert time_left(None) is None and time_left(20) == "<1 min left"
    assert time_left(181) == "~4 min left" and time_left(3 * 3600) == "~3.0 h left"


class _Utf8(io.StringIO):
    encoding = "utf-8"


def test_stage_line_names_candidate_and_target():
    from nasforge.console import Glyphs

    arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|none~1|avg_pool_3x3~2|"
    line = stage_line(
        7,
        18,
        TaskRef("benchmark", 1, "openvino-cpu"),
        "done in 41 s",
        archs={1: arch},
        glyphs=Glyphs.for_stream(_Utf8()),
        elapsed=192,
        left=200,
    )
    assert line == (
        "[ 7/18] benchmark    candidate 1 (|nor_conv_3x3~0|+|nor_c…) on openvino-cpu  "
        "done in 41 s · elapsed 3:12 · ~4 min left"
    )
    ascii_line = stage_line(
        0, 9, TaskRef("search"), "started", archs={}, glyphs=Glyphs.for_stream(io.StringIO())
    )
    assert ascii_line == "[0/9] search       started" and ascii_line.isascii()


@settings(max_examples=200, deadline=None)
@given(
    stage=st.sampled_from(["train", "benchmark", "prune", "promote"]),
    candidate=st.one_of(st.none(), st.integers(0, 99)),
    arch=st.text(min_size=0, max_size=200),
    done=st.integers(0, 500),
    elapsed=st.floats(0, 1e6),
    left=st.one_of(st.none(), st.floats(0, 1e7)),
)
def test_plain_stage_lines_are_single_ascii_lines(stage, candidate, arch, done, elapsed, left):
    from nasforge.console import Glyphs

    arch = "".join(ch for ch in arch if ch.isascii() and ch.isprintable())
    ref = TaskRef(stage, candidate, "onnxruntime-cpu" if stage == "benchmark" else None)
    line = stage_line(
        done,
        500,
        ref,
        "started",
        archs={candidate: arch} if candidate is not None else {},
        glyphs=Glyphs.for_stream(io.StringIO()),
        elapsed=elapsed,
        left=left,
    )
    assert "\n" not in line and line.isascii() and not ANSI.search(line)
    assert line.startswith(f"[{done:>3}/500] {stage}")
    if candidate is not None:
        assert f"candidate {candidate}" in line


# --- the console: plain vs terminal -------------------------------------------------------------


def _console(stream, live, now, tmp_path):
    refs = plan(1, TARGETS[:1])
    est = Estimator(refs, prior_costs(tiny_params(), refs), start=now())
    return RunConsole(stream, est, live=live, clock=now, heartbeat_s=60.0), refs


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich would colour a pipe; the console stays plain
    monkeypatch.setenv("TERM", "xterm-256color")
    assert _console(io.StringIO(), None, FakeClock(), tmp_path)[0].live is False
    assert _console(_Tty(), None, FakeClock(), tmp_path)[0].live is True
    monkeypatch.setenv("TERM", "dumb")
    assert _console(_Tty(), None, FakeClock(), tmp_path)[0].live is False


def test_plain_console_prints_lines_without_escape_codes(tmp_path):
    now = FakeClock()
    out = io.StringIO()  # not a terminal
    console, refs = _console(out, None, now, tmp_path)
    assert console.live is False
    search = refs[1]
    events = tmp_path / "search.jsonl"
    with console:
        console.started(refs[0])
        now.t += 5
        console.finished(refs[0], ok=True)
        console.started(search, events)
        events.write_text(json.dumps({"kind": "search trial", "done": 3, "total": 6}) + "\n")
        now.t += 61
        console._poll()
        beat = console.heartbeat_text()
        console.cached(refs[2])
        console.finished(search, ok=False)
    text = out.getvalue()
    assert not ANSI.search(text) and text.isascii()
    lines = text.splitlines()
    assert lines[0] == "[ 0/10] prepare-data started - elapsed 0:00"
    assert lines[1].startswith("[ 1/10] prepare-data done in 5 s - elapsed 0:05")
    assert "search trial 3/6" in beat and "1/10 stages done" in beat
    assert "candidate 0" in lines[3] and "done earlier (cached)" in lines[3]
    assert lines[4].startswith("[ 2/10] search       FAILED after 1:01")


def test_terminal_console_draws_bars_for_the_stage_loops(tmp_path):
    from rich.console import Console

    now = FakeClock()
    out = io.StringIO()
    console, refs = _console(out, True, now, tmp_path)
    assert console.live is True
    train = refs[2]
    events = tmp_path / "train.jsonl"
    console.started(train, events)  # outside the context: no live thread in the test
    events.write_text(
        json.dumps({"kind": "epoch", "done": 1, "total": 2, "info": {"loss": 0.5}})
        + "\n"
        + json.dumps({"kind": "timed run", "done": 3, "total": 5})  # not a train bar
        + "\n"
    )
    screen = Console(file=io.StringIO(), force_terminal=True, width=120, color_system="standard")
    screen.print(console.render_bars())
    drawn = screen.file.getvalue()
    assert ANSI.search(drawn) and "━" in drawn
    assert "train cand 0" in drawn and "epoch" in drawn and "1/2" in drawn and "loss 0.5" in drawn
    assert "timed run" not in drawn and BARS["train"] == ("epoch",)
    assert "0/10 stages done" in drawn
    assert ANSI.search(out.getvalue())  # the stage line itself is styled


def test_live_console_survives_tasks_ending_in_many_threads(tmp_path):
    """Stage lines printed from kfp.local's worker threads while rich redraws the bars (a lock
    taken in the opposite order by the two once hung the whole run)."""
    out = io.StringIO()
    refs = plan(4, TARGETS)
    est = Estimator(refs, prior_costs(tiny_params(), refs), start=0.0)
    console = RunConsole(out, est, live=True)
    console._rich.width = 100

    def worker(k: int) -> None:
        for _ in range(50):
            for ref in refs[k::4]:
                console.started(ref, tmp_path / f"{ref.key}.jsonl")
                console.finished(ref, ok=True)

    def redraw(stop: threading.Event) -> None:  # rich's refresh thread, much faster
        while not stop.is_set():
            console._live_display.refresh()

    console.__enter__()
    stop = threading.Event()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
    painter = threading.Thread(target=redraw, args=(stop,), daemon=True)
    for t in [*threads, painter]:
        t.start()
    deadline = time.monotonic() + 120  # a hang detector, not a speed assertion
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stop.set()
    painter.join(timeout=5)
    hung = [t for t in [*threads, painter] if t.is_alive()]
    assert not hung, "the console deadlocked"  # (stopping the display would hang too)
    console.__exit__(None, None, None)
    assert out.getvalue().count("done in") == 50 * len(refs)


def test_task_ref_from_kfp_names():
    root = "nasforge-2026-01-01/for-loop-2-iteration-1"
    assert task_ref("comp-train", root, {"candidate": 1}) == TaskRef("train", 1)
    assert task_ref("comp-benchmark-2", root + "/for-loop-4-iteration-0", {"target": "x"}) == (
        TaskRef("benchmark", 1, "x")
    )
    assert task_ref("comp-collect-cpu-gpu", root, {}) == TaskRef("collect", 1)
    assert task_ref("comp-search", "nasforge-2026", {}) == TaskRef("search")
    assert TaskRef("benchmark", 1, "x").key == "benchmark-cand-1-x"


def test_thread_router_sends_each_thread_to_its_log():
    local = threading.local()
    default, mine = io.StringIO(), io.StringIO()
    router = _ThreadRouter(local, default, "utf-8")

    def task():
        local.task = type("T", (), {"log": mine})()
        router.write("from the task\n")

    t = threading.Thread(target=task)
    t.start()
    t.join()
    router.write("from the orchestrator\n")
    assert mine.getvalue() == "from the task\n"
    assert default.getvalue() == "from the orchestrator\n"


# --- file modes ---------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_have_the_modes_of_ordinary_writes(tmp_path, umask):
    import torch

    from nasforge.atomic import atomic_file, temp_dir_beside
    from nasforge.atomic import umask as read_umask
    from nasforge.checkpoint import atomic_torch_save
    from nasforge.compress.prune import save_model
    from nasforge.export.onnx import export_fp32

    assert read_umask() == umask
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask
    assert _mode(temp_dir_beside(tmp_path / "d")) == 0o777 & ~umask
    atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "c.pt")
    assert _mode(tmp_path / "c.pt") == 0o666 & ~umask
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    save_model(net, tmp_path / "model", {"arch_str": "x"})
    assert _mode(tmp_path / "model") == 0o777 & ~umask
    for f in (tmp_path / "model").iterdir():
        assert _mode(f) == 0o666 & ~umask, f
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "b.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not (tmp_path / "b.json").exists() and not list(tmp_path.glob(".b.json*"))
    if umask == 0o022:  # one ONNX export is enough to cover the export path
        export_fp32(net.eval(), torch.zeros(2, 1, 2, 2), tmp_path / "m.onnx")
        assert _mode(tmp_path / "m.onnx") == 0o644
