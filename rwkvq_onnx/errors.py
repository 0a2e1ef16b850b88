"""One exception family for every user-facing failure.

The CLI catches :class:`RwkvqError` once, prints its message on one line and
exits with status 2; anything else is a bug: one line with its type and
message, exit status 1, and the traceback with `rwkvq-onnx --debug`.
"""
from __future__ import annotations

from pathlib import Path


class RwkvqError(Exception):
    """Base of all errors that are the user's input, not the library's bug."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointError(RwkvqError):
    """A checkpoint that is missing, truncated, of unknown layout or holds bad values."""


class ConfigError(RwkvqError):
    """Flags or configuration values that cannot work together."""


class CalibrationError(RwkvqError):
    """Calibration or evaluation data that is empty, too short or malformed."""


class BudgetError(RwkvqError):
    """A bits-per-weight target that cannot be met."""


class MissingDependencyError(RwkvqError):
    """An optional heavy dependency (TensorRT, tritonclient, a GPU) is absent."""

    def __init__(self, what: str, how: str) -> None:
        super().__init__(f"{what} is not available: {how}")


class OutputError(RwkvqError):
    """An output path that cannot be written."""
