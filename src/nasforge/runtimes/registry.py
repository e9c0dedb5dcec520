"""The runtime registry: filled by the backend modules of :mod:`nasforge.runtimes` at import.

Every module of the package other than this one and :mod:`nasforge.runtimes.base` is a backend;
the first lookup imports them all (their module level imports no runtime library, so this is
cheap), and each registers its :class:`~nasforge.runtimes.base.Runtime` subclass with
:func:`register_runtime`. Adding a runtime is therefore adding one module.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from nasforge.errors import ModelFileError, TargetError
from nasforge.runtimes.base import Runtime

#: The runtime whose files every bundle has (ONNX): models of ``table:`` targets are run on it,
#: and other runtimes convert its graphs.
BASE_RUNTIME = "onnxruntime"

_RUNTIMES: dict[str, Runtime] = {}
_INFRASTRUCTURE = {"base", "registry"}
_loaded = False


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: make a runtime available under its ``name``.

    Raises:
        ValueError: The class has no name, or another runtime has it.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    known = _RUNTIMES.get(cls.name)
    if known is not None and type(known).__qualname__ != cls.__qualname__:
        raise ValueError(f"runtime '{cls.name}' is registered twice ({cls.__name__})")
    _RUNTIMES[cls.name] = cls()
    return cls


def _load_backends() -> None:
    """Import every backend module of the package once (each registers itself)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import nasforge.runtimes as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in _INFRASTRUCTURE or info.name.startswith("_"):
            continue
        importlib.import_module(f"{package.__name__}.{info.name}")


def list_runtimes() -> list[Runtime]:
    """Every registered runtime, the base runtime first, then by name."""
    _load_backends()
    return sorted(_RUNTIMES.values(), key=lambda r: (r.name != BASE_RUNTIME, r.name))


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``.

    Raises:
        TargetError: Unknown name (the message lists the known ones).
    """
    _load_backends()
    runtime = _RUNTIMES.get(name)
    if runtime is None:
        known = ", ".join(r.name for r in list_runtimes())
        raise TargetError(f"unknown runtime '{name}'; known runtimes: {known}")
    return runtime


def bundle_runtime(runtime: Runtime) -> Runtime:
    """The runtime whose bundle files ``runtime`` loads: itself, or the one it :attr:`reads`."""
    return get_runtime(runtime.reads) if runtime.reads else runtime


def file_kind(path: Path) -> str:
    """What a model file is, by the runtime whose own format its suffix is (for messages)."""
    for runtime in list_runtimes():
        if runtime.suffixes and runtime.suffixes[0] == Path(path).suffix:
            return runtime.file_kind
    return "file"


def companion_files(path: Path) -> list[Path]:
    """The files one model is made of, by the runtime whose own format ``path`` is (an IR's
    ``.xml`` has its ``.bin``); just ``path`` for any other file."""
    path = Path(path)
    for runtime in list_runtimes():
        if runtime.suffixes and runtime.suffixes[0] == path.suffix:
            return runtime.model_files(path)
    return [path]


def versions() -> dict[str, str]:
    """``{runtime name: version}`` of every registered runtime (``""`` if not installed)."""
    return {r.name: r.version() for r in list_runtimes()}


def check_model_file(runtime: Runtime, path: Path) -> None:
    """Raise a one-line :class:`ModelFileError` for a missing, empty or foreign model file, or
    one whose companion files (an IR's ``.bin``) are missing."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelFileError(f"model file is empty: {path}")
    if path.suffix not in runtime.suffixes:
        raise ModelFileError(
            f"{runtime.label} cannot read {file_kind(path)} {path}; "
            f"pass a {' or '.join(runtime.suffixes)} file"
        )
    for f in runtime.model_files(path)[1:]:
        if not f.is_file():
            raise ModelFileError(f"{runtime.file_kind} {path} has no {f.name} beside it")
