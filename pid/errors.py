"""Exceptions that carry a one-line, user-facing message (problem + fix).

Entry points catch `PiDError` and print its message instead of a traceback.
"""

from __future__ import annotations


class PiDError(Exception):
    """Base class of every error this package raises on bad input or missing files."""


class ConfigError(PiDError, ValueError):
    """A setting is invalid (unknown backbone, unsupported checkpoint type, bad resolution, ...)."""


class CheckpointNotFoundError(PiDError, FileNotFoundError):
    """A weight file is neither local nor downloadable; the message holds the download command."""


class CheckpointMismatchError(PiDError, ValueError):
    """A weight file does not fit the network it is loaded into."""


class InputError(PiDError, ValueError):
    """An input file (image, prompt file, manifest) is missing or unreadable."""
