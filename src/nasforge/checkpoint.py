"""Resumable work: the per-stage work folder and epoch checkpoints of the training loops.

A stage that is killed (SIGKILL, an evicted pod, Ctrl-C) must not start again from nothing. The
runner gives every stage attempt a *work folder* that, unlike the stage's atomic output, survives
a failure: it is keyed by the stage, its params and its inputs, so the next attempt with the same
inputs finds it (:func:`work_dir_for`), and it is removed once the stage's output is in place.
What lives there is the stage's own business: the search keeps its Optuna study and the trained
supernet; training loops keep an :class:`EpochCheckpoint` per loop.

Checkpoints are ``torch.save`` files of tensors and plain values only, read back with
``torch.load(weights_only=True)`` (no arbitrary unpickling), written atomically so a kill during
the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasforge.atomic import atomic_file

#: Where the pipeline's tasks keep their work folders (set by ``nasforge run`` for its tasks);
#: without it a stage's work folder sits beside its output (the single-stage CLI commands).
WORK_ROOT_ENV = "NASFORGE_WORK_ROOT"
KEY_FILE = "key.json"

_current: ContextVar[Path | None] = ContextVar("nasforge_work_dir", default=None)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (to tell a killed attempt's leftovers from a live one's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stage_key(stage: str, params_json: str, inputs: dict[str, Any]) -> str:
    """A digest of what determines a stage's result: its name, params and inputs."""
    doc = {"stage": stage, "params": json.loads(params_json), "inputs": _plain(inputs)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(Path(value).absolute())
    return value


def work_dir_for(stage: str, output: Path, key: str) -> Path:
    """The work folder of one stage attempt (created; emptied if it belonged to other inputs).

    Args:
        stage: The stage name.
        output: The stage's output folder.
        key: :func:`stage_key` of the attempt.
    """
    root = os.environ.get(WORK_ROOT_ENV)
    if root:
        work = Path(root) / f"{stage}-{key[:16]}"
    else:
        work = output.parent / f".{output.name}.work"
    marker = work / KEY_FILE
    if work.exists():
        try:
            same = json.loads(marker.read_text()).get("key") == key
        except (OSError, ValueError):
            same = False
        if not same:  # left by another configuration: nothing in it is ours to resume
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"stage": stage, "key": key}))
    return work


def set_current_work_dir(work: Path | None) -> Any:
    """Make ``work`` the folder :func:`current_work_dir` returns; returns a reset token."""
    return _current.set(work)


def reset_current_work_dir(token: Any) -> None:
    """Undo :func:`set_current_work_dir`."""
    _current.reset(token)


def current_work_dir() -> Path | None:
    """The running stage's work folder, or None outside the runner (nothing is resumed)."""
    return _current.get()


def checkpoint_for(name: str) -> EpochCheckpoint | None:
    """An :class:`EpochCheckpoint` named ``name`` in the current work folder, if there is one."""
    work = current_work_dir()
    return None if work is None else EpochCheckpoint(work / f"{name}.ckpt")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary sibling, then rename (a kill never leaves half a file)."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def rng_state(py_rng: random.Random | None, np_rng: np.random.Generator | None) -> dict[str, Any]:
    """The state of the random generators a loop draws from (and torch's global one)."""
    return {
        "torch": torch.get_rng_state(),
        "python": None if py_rng is None else _py_state(py_rng.getstate()),
        "numpy": None if np_rng is None else json.dumps(np_rng.bit_generator.state),
    }


def _py_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def restore_rng(
    state: dict[str, Any], py_rng: random.Random | None, np_rng: np.random.Generator | None
) -> None:
    """Put the generators back where :func:`rng_state` found them."""
    torch.set_rng_state(state["torch"])
    if py_rng is not None and state.get("python") is not None:
        version, internal, gauss = state["python"]
        py_rng.setstate((version, tuple(internal), gauss))
    if np_rng is not None and state.get("numpy") is not None:
        np_rng.bit_generator.state = json.loads(state["numpy"])


class EpochCheckpoint:
    """The state of one training loop after its last finished epoch.

    Holds the model, optimizer and scheduler state, the random generators and the loss history,
    so a resumed loop continues exactly where the killed one stopped (same batches, same
    sampled subnets, same result as an uninterrupted run).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it cannot be read: start over)."""
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, weights_only=True)
        except Exception:  # a checkpoint from another torch or a damaged disk: start over
            return None

    def save(
        self,
        epoch: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        history: list[float] | None = None,
        py_rng: random.Random | None = None,
        np_rng: np.random.Generator | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record that ``epoch`` (0-based) finished."""
        atomic_torch_save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": None if optimizer is None else optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "history": list(history or []),
                "rng": rng_state(py_rng, np_rng),
                "extra": extra or {},
            },
            self.path,
        )

    def resume(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        py_rng: random.Random | None = None,
        np_rng: np.random.Generator | None = None,
    ) -> tuple[int, list[float], dict[str, Any]]:
        """Load the saved state into the loop's objects.

        Returns:
            ``(first epoch to run, loss history so far, extra)``; ``(0, [], {})`` when there is
            nothing to resume.
        """
        state = self.load()
        if state is None:
            return 0, [], {}
        model.load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], py_rng, np_rng)
        epoch = int(state["epoch"]) + 1
        print(f"  resumed {self.path.stem} after epoch {epoch}", flush=True)
        return epoch, list(state.get("history", [])), dict(state.get("extra") or {})
