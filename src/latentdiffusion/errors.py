"""Errors the CLI turns into one clear line and an exit code (2: usage, 1: data/runtime)."""

from __future__ import annotations


class LdmError(Exception):
    """An expected failure with a message meant for the user; exit code 1."""

    exit_code = 1


class UsageError(LdmError):
    """The user asked for something invalid (bad option or config value); exit code 2."""

    exit_code = 2


class DataError(LdmError):
    """Input files are missing, corrupt or of the wrong shape; exit code 1."""


class CheckpointError(LdmError):
    """A checkpoint is missing, corrupt, of the wrong kind or of an incompatible config."""
