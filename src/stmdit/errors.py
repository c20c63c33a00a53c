"""The project's user-facing failures.

Each of these means "the input or the situation is wrong, and the message says what, where
and what was expected"; the command line prints the message and exits with status 1, without
a traceback (``--verbose`` adds one). They derive from ``ValueError`` (or ``OSError``) so that
code catching the built-in kinds keeps working.
"""

from __future__ import annotations

import os


class StmditError(Exception):
    """Base of every user-facing error of STMDiT."""


class ConfigError(StmditError, ValueError):
    """A configuration file (or the options that override it) is malformed or out of range."""


class InputFileError(StmditError, ValueError):
    """An input file cannot be read or holds the wrong content; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


class UnsafePathError(StmditError, ValueError):
    """A name taken from the data would put a file outside its output folder."""


class TrainingDiverged(StmditError, FloatingPointError):
    """The training loss stopped being a finite number."""
