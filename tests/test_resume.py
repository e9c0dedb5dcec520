"""Kill and resume: a stage killed with SIGKILL and run again continues where it stopped.

Real processes (the ``nasforge`` CLI), real SIGKILLs at real moments (read from the stage's own
progress lines or its checkpoint files), then the rerun is compared with an uninterrupted run of
the same params: no finished trial or epoch is evaluated twice, and the outputs are the same.
The objectives come from a latency table so the uninterrupted and resumed searches see the same
numbers (measured latencies differ from run to run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import NB201_CSV, TINY

NASFORGE = str(Path(sys.executable).parent / "nasforge")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not NB201_CSV.is_file(), reason="NAS-Bench-201 table not in shared data"),
]


def _params(folder: Path) -> Path:
    doc = {
        **TINY,
        "targets": ["table:raspi4_latency_ms"],
        "search": {**TINY["search"], "supernet_epochs": 3, "trials": 8},
        "train": {"epochs": 4},
    }
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        [NASFORGE, *args, "--no-tracking"], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _kill_when(args: list[str], cwd: Path, moment: Callable[[str], bool]) -> str:
    """Run the CLI and SIGKILL it as soon as ``moment(line)`` holds for a line it printed."""
    proc = subprocess.Popen(
        [NASFORGE, *args, "--no-tracking"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if moment(line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    out = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill:\n{out[-3000:]}"
    return out


def _kill_on_file(args: list[str], cwd: Path, path: Path) -> None:
    """Run the CLI and SIGKILL it as soon as ``path`` exists."""
    proc = subprocess.Popen(
        [NASFORGE, *args, "--no-tracking"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not path.exists():
        assert proc.poll() is None, "finished (or failed) before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].equal(tb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_dir) -> tuple[Path, Path]:
    """An uninterrupted search over the tiny settings: (working folder, search output)."""
    root = tmp_path_factory.mktemp("resume")
    params = _params(root)
    _cli(["search", "--params", str(params), "--data", str(digits_dir), "--output", "ref"], root)
    return root, root / "ref"


def test_search_killed_twice_resumes_to_the_uninterrupted_result(reference, digits_dir):
    root, ref = reference
    params = str(root / "params.yaml")
    args = ["search", "--params", params, "--data", str(digits_dir), "--output", "cut"]

    # 1: killed while training the supernet, after its first epoch.
    _kill_when(args, root, lambda line: "supernet epoch 1/3" in line)
    assert not (root / "cut").exists(), "a killed stage left a half-written output"
    assert (root / ".cut.work" / "supernet.ckpt").is_file()

    # 2: continues the supernet from epoch 2; killed during the search after trial 3.
    out = _kill_when(args, root, lambda line: "search trial 3/8" in line)
    assert re.search(r"resumed supernet after epoch [12]\b", out)
    assert "supernet epoch 1/3" not in out  # the finished epoch is not trained again

    # 3: the supernet is done and the finished trials are kept; the rest are evaluated.
    out = _cli(args, root)
    kept = int(re.search(r"resumed the search: (\d+) finished trials kept", out).group(1))
    assert kept >= 3
    evaluated = [int(n) for n in re.findall(r"search trial (\d+)/8", out)]
    assert evaluated == list(range(kept + 1, 9)), "a finished trial was evaluated again"
    assert "supernet epoch" not in out

    # The same supernet, trials and candidates as the uninterrupted run.
    _same_tensors(ref / "supernet.safetensors", root / "cut" / "supernet.safetensors")
    trials = [
        (t["arch_str"], t["objectives"])
        for t in json.loads((root / "cut" / "history.json").read_text())["trials"]
    ]
    ref_trials = [
        (t["arch_str"], t["objectives"])
        for t in json.loads((ref / "history.json").read_text())["trials"]
    ]
    assert trials == ref_trials
    cands = json.loads((root / "cut" / "pareto.json").read_text())["candidates"]
    ref_cands = json.loads((ref / "pareto.json").read_text())["candidates"]
    assert [c["arch_str"] for c in cands] == [c["arch_str"] for c in ref_cands]
    # Done: the work folder is gone, nothing temporary is left beside the output.
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".cut")) == []


def test_train_killed_resumes_from_its_last_epoch(reference, digits_dir):
    root, search = reference
    params = str(root / "params.yaml")

    def args(out: str) -> list[str]:
        return [
            "train", "--params", params, "--data", str(digits_dir), "--search", str(search),
            "--candidate", "0", "--output", out,
        ]  # fmt: skip

    _cli(args("train-ref"), root)
    _kill_on_file(args("train-cut"), root, root / ".train-cut.work" / "train.ckpt")
    assert not (root / "train-cut").exists()
    out = _cli(args("train-cut"), root)
    done = int(re.search(r"resumed train after epoch (\d+)", out).group(1))
    assert 1 <= done < 4
    _same_tensors(
        root / "train-ref" / "weights.safetensors", root / "train-cut" / "weights.safetensors"
    )
    assert not (root / ".train-cut.work").exists()


def test_a_changed_input_does_not_resume_stale_work(reference, digits_dir, tmp_path):
    """Work left by other params is discarded, not resumed."""
    root, search = reference
    other = yaml.safe_load((root / "params.yaml").read_text())
    other["train"]["epochs"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(other))
    args = [
        "train", "--params", str(tmp_path / "params.yaml"), "--data", str(digits_dir),
        "--search", str(search), "--candidate", "0", "--output", "t",
    ]  # fmt: skip
    _kill_on_file(args, tmp_path, tmp_path / ".t.work" / "train.ckpt")
    other["train"]["epochs"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(other))
    out = _cli(args, tmp_path)
    assert "resumed" not in out


class _Killed(Exception):
    """Stands in for SIGKILL inside one process: raised right after a checkpoint is written."""


class _DyingCheckpoint:
    """An EpochCheckpoint that 'dies' once ``after`` epochs are saved."""

    def __init__(self, path: Path, after: int) -> None:
        from nasforge.checkpoint import EpochCheckpoint

        self.inner, self.after = EpochCheckpoint(path), after

    def resume(self, *args, **kwargs):
        return self.inner.resume(*args, **kwargs)

    def save(self, epoch, *args, **kwargs):
        self.inner.save(epoch, *args, **kwargs)
        if epoch + 1 >= self.after:
            raise _Killed


def _tiny_cell_net(seed: int = 0):
    import torch

    from nasforge.space.cell import CellNetworkShape, build_cell_network
    from nasforge.space.nb201 import CellSpec

    torch.manual_seed(seed)
    spec = CellSpec.from_arch_str(
        "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|nor_conv_1x1~0|none~1|avg_pool_3x3~2|"
    )
    return build_cell_network(spec, CellNetworkShape(1, 10, channels=8))


def test_prune_schedule_resumes_steps_and_epochs(digits_dir, tmp_path):
    """A prune killed in its second step's fine-tuning replays step 1 and resumes step 2."""
    import copy

    import torch

    from nasforge.checkpoint import checkpoint_for
    from nasforge.compress.prune import prune_structured
    from nasforge.data.prepared import load_prepared
    from nasforge.training import fit

    x, y = load_prepared(digits_dir).tensors("train")
    x, y = x[:256], y[:256]
    base = _tiny_cell_net()
    calls: list[int] = []

    def finetune(m, die_at: int | None = None):
        calls.append(1)
        ck = checkpoint_for("finetune")
        if die_at is not None and len(calls) == 2:
            ck = _DyingCheckpoint(ck.path, die_at)
        fit(m, x, y, epochs=3, batch_size=64, lr=0.01, checkpoint=ck)

    def prune(work, ft):
        net = copy.deepcopy(base)
        return prune_structured(
            net, x[:2], channel_ratio=0.5, steps=2, finetune=ft, checkpoint_dir=work
        )[0]

    ref = prune(tmp_path / "ref", finetune)
    calls.clear()
    with pytest.raises(_Killed):
        prune(tmp_path / "cut", lambda m: finetune(m, die_at=2))
    assert (tmp_path / "cut" / "step-1.pt").is_file()
    calls.clear()
    resumed = prune(tmp_path / "cut", finetune)
    assert len(calls) == 1, "step 1 was fine-tuned again"
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert a.shape == b.shape and torch.equal(a, b), k


def test_qat_resumes_after_its_last_epoch(digits_dir, tmp_path):
    import torch

    from nasforge.checkpoint import EpochCheckpoint
    from nasforge.compress.qat import convert_qat, finetune_qat, prepare_qat
    from nasforge.data.prepared import load_prepared

    x, y = load_prepared(digits_dir).numpy("train")
    x, y = x[:256], y[:256]
    net = _tiny_cell_net()
    example = torch.from_numpy(x[:2])
    kw = {"epochs": 3, "batch_size": 64, "seed": 0, "freeze_bn_after_epochs": 1}

    ref = prepare_qat(net, example, reduce_range=True)
    finetune_qat(ref, x, y, checkpoint=EpochCheckpoint(tmp_path / "ref.ckpt"), **kw)
    cut = prepare_qat(net, example, reduce_range=True)
    with pytest.raises(_Killed):
        finetune_qat(cut, x, y, checkpoint=_DyingCheckpoint(tmp_path / "cut.ckpt", 2), **kw)
    again = prepare_qat(net, example, reduce_range=True)  # a new process prepares anew
    finetune_qat(again, x, y, checkpoint=EpochCheckpoint(tmp_path / "cut.ckpt"), **kw)
    xs = torch.from_numpy(x[:64])
    with torch.no_grad():
        assert torch.equal(convert_qat(ref)(xs), convert_qat(again)(xs))


def test_leftovers_of_a_killed_attempt_are_removed(tmp_path):
    """Temporary folders a SIGKILL left beside an output go on the next attempt; live ones stay."""
    from nasforge.stages.runner import clean_stale

    out = tmp_path / "out"
    dead = tmp_path / ".out.partial-999999999-abcd"  # no such pid
    live = tmp_path / f".out.partial-{os.getppid()}-abcd"  # a process that exists
    old = tmp_path / ".out.old-1234"
    for d in (dead, live, old):
        d.mkdir()
    removed = clean_stale(out)
    assert sorted(removed) == sorted([dead, old])
    assert live.exists() and not dead.exists() and not old.exists()
