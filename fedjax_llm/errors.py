"""Errors a user can fix. The command-line tools print their message as one line and exit non-zero;
anything else is a bug and keeps its traceback.

Each message names the place: the config key, the file (and line), the run directory, the client or
cloud and the round, and where it helps says what to do.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave (config, data, files, keys); printed without a traceback."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value or combination that cannot run; the message names the key."""


class DataError(UserError, ValueError):
    """Training data that cannot be read or partitioned; the message names the file or key."""


class ModelError(UserError, ValueError):
    """A model checkpoint or config.json that cannot be used; the message names the file and field."""


class RunDirError(UserError, RuntimeError):
    """A run directory that cannot be used as asked; nothing in it was changed."""


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint, or a state that must not be written."""


class RunStopped(UserError, RuntimeError):
    """Training stopped on purpose (non-finite model, lost quorum); the last checkpoint is intact."""

    exit_code = 1
