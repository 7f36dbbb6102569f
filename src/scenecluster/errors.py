"""Errors a user can act on.

Every exception here carries a one-line message that names the file, folder or setting at fault; the CLI
prints it without a traceback and exits non-zero. Anything else escaping is a bug.
"""

from __future__ import annotations


class SceneClusterError(Exception):
    """Base class for errors caused by input or settings, not by a bug."""


class InputError(SceneClusterError):
    """The input location is missing, empty or unreadable."""


class OutputError(SceneClusterError):
    """The output location cannot be used (for example it holds a different run)."""


class ConfigError(SceneClusterError):
    """A setting is invalid."""
