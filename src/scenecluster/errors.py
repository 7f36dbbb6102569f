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


class ConfigError(SceneClusterError, ValueError):
    """A setting is invalid."""


def one_line(exc: BaseException, limit: int = 300, *, with_type: bool = False) -> str:
    """The first line of an exception's message, shortened to ``limit`` characters, for one-line messages.

    An exception with an empty message is named by its type. With ``with_type=True`` the type name is put
    in front (``"OSError: disk full"``), as messages that record a failure without its traceback want.
    """
    message = str(exc).strip()
    text = message.splitlines()[0] if message else type(exc).__name__
    if with_type:
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
