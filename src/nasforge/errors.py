"""User-facing errors.

Every error a user can cause (bad config, missing data, corrupt model file, unknown target, tracking
server down) is raised as a :class:`NasforgeError` subclass. The CLI prints its message on one line and
exits with status 2; anything else is a bug and keeps its traceback.
"""

import contextlib
from collections.abc import Iterator


class NasforgeError(Exception):
    """Base class of errors caused by user input or the environment, not by a bug."""


class ConfigError(NasforgeError):
    """A configuration field is missing, of the wrong type or out of range."""


class DataError(NasforgeError):
    """A dataset path is missing, unreadable or malformed."""


class ModelFileError(NasforgeError):
    """A model or artifact file is missing, truncated or corrupt."""


class TargetError(NasforgeError):
    """A hardware target is unknown or not available on this machine."""


class TrackingError(NasforgeError):
    """The MLflow tracking server or the DVC remote cannot be reached or refused a request."""


class ArchitectureError(NasforgeError):
    """A stage cannot handle one architecture of its space: a bug, reported naming the architecture."""


@contextlib.contextmanager
def naming_architecture(stage: str, arch: str) -> Iterator[None]:
    """Turn an unexpected failure inside the block into one line naming ``arch`` and the cause.

    Errors the user can fix (:class:`NasforgeError`) pass unchanged; anything else becomes an
    :class:`ArchitectureError` chained to the original (its traceback stays in the task log).
    """
    try:
        yield
    except NasforgeError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ArchitectureError(
            f"{stage} cannot handle architecture {arch}: {type(err).__name__}: {first}"
        ) from err
