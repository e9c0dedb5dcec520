"""Atomic writes whose files get the permissions of an ordinary write.

Writing to a temporary sibling and renaming it over the target keeps a kill from leaving half a
file. :func:`tempfile.mkstemp` and :func:`tempfile.mkdtemp` create their file and folder private
(``0600``/``0700``) whatever the umask, and a rename keeps that mode, so a model written this
way could not be read by the group that serves it. The helpers here give the temporary file or
folder the mode ``open()``/``mkdir()`` would have given it (``0666``/``0777`` less the umask)
before it is renamed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask (read without changing it where the kernel reports it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere the only way to read it is to set it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets from ``open()`` (``mkdir()``) under the umask."""
    return (0o777 if directory else 0o666) & ~umask()


def give_default_mode(path: str | os.PathLike[str]) -> None:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` the mode a normal one would have."""
    os.chmod(path, default_mode(directory=os.path.isdir(path)))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Args:
        path: The file to write.
        suffix: Suffix of the temporary file (writers that infer the format from the
            extension need the real one, e.g. ``.onnx``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        give_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def temp_dir_beside(path: str | os.PathLike[str]) -> Path:
    """A new empty folder beside ``path`` (to be renamed to it), with a normal folder's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    give_default_mode(tmp)
    return tmp


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``safetensors.torch.save_file`` with an ordinary file's mode.

    safetensors (0.8) also writes through a private temporary file and a rename, so its files
    come out ``0600`` like ``mkstemp``'s.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    give_default_mode(path)
