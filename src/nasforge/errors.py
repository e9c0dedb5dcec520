"""User-facing errors.

Every error a user can cause (bad config, missing data, corrupt model file, unknown target, tracking
server down) is raised as a :class:`NasforgeError` subclass. The CLI prints its message on one line and
exits with status 2; anything else is a bug and keeps its traceback.
"""


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
