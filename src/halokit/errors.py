"""User-facing errors. The CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

EXIT_USER_ERROR = 2  # the exit code of every user error (bad config, data, paths)


class UserError(Exception):
    """A problem with the user's input (config, data, paths) rather than a bug in halokit."""


class ConfigError(UserError):
    """A config key has an unknown name, a wrong type or an invalid value."""


class DataError(UserError):
    """A data file cannot be read or one of its rows is invalid.

    The message always names the file, and the row (line for JSONL) and field when one is at fault.
    """
