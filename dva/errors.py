"""The one exception a user sees: bad input, reported as one line naming file and field."""

from __future__ import annotations


class DvaInputError(Exception):
    """Input that dva cannot use; the message names the file and the field.

    Caught once in the CLI, printed as one line on stderr, exit code 2.
    """


class DvaClusterError(Exception):
    """A pass that the cluster could not finish (its workers kept being lost); the message says what
    was lost and that `--resume` continues. Caught once in the CLI, one line on stderr, exit code 1.
    """


class DvaFormatWarning(UserWarning):
    """Input that dva can use but that a user should know about (printed as one line)."""
