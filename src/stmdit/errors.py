"""The project's user-facing failures.

Each of these means "the input or the situation is wrong, and the message says what, where
and what was expected"; the command line prints the message and exits with status 1, without
a traceback (``--verbose`` adds one). They derive from ``ValueError`` (or ``OSError``) so that
code catching the built-in kinds keeps working.
"""

from __future__ import annotations

import errno
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


# What a full or read-only disk, a quota or a file-size limit raise on a write.
WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


class OutputWriteError(StmditError, OSError):
    """Writing an output failed for want of space or permission: the message names the path
    and the cause. What was written before is intact (outputs are replaced atomically), so a
    rerun once the cause is removed resumes."""

    def __init__(self, path: str | os.PathLike, cause: str):
        super().__init__(
            f"cannot write {path}: {cause}. Nothing written before was lost; "
            "free space (or make the folder writable) and rerun to resume"
        )
        self.path = str(path)
