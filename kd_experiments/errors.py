"""User-facing errors.

Every problem a user can cause (a path, a config value, a corrupt file, a
diverging loss) is raised as a :class:`KDError` subclass with a one-line message
that says *what* is wrong and *where*. ``kd-train`` catches these, prints the
single line (no traceback wall), closes the MLflow run as FAILED with the
message as the ``error`` tag, and exits with status 1. Internal invariants stay
plain ``assert`` statements: they are bugs, not user errors.
"""

from __future__ import annotations


class KDError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(KDError, ValueError):
    """A configuration value is invalid (unknown key, out of range, unreachable)."""


class DataError(KDError, ValueError):
    """A dataset path, file or annotation is missing, empty, corrupt or inconsistent."""


class WeightsError(KDError, RuntimeError):
    """Pretrained weights cannot be found or loaded (missing package, bad file)."""


class CheckpointError(KDError, RuntimeError):
    """A checkpoint is corrupt or belongs to another scheme or width."""


class TrainingDivergedError(KDError, RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class TrackingError(KDError, RuntimeError):
    """The MLflow tracking store cannot be reached or written."""
