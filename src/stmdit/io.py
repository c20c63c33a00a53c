"""Crash-safe output: everything is written to a temporary sibling and renamed into place,
so a reader sees either the old complete file (or folder) or the new complete one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from stmdit.errors import WRITE_ERRNOS, InputFileError, OutputWriteError, StmditError, UnsafePathError


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block (disk full, file too large, quota, read-only file
    system) into an :class:`OutputWriteError` naming ``path`` (the file being written, or the
    output it belongs to, rather than a temporary): a write that fails mid-file raises an
    ``OSError`` without a name."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise OutputWriteError(path, os.strerror(err.errno)) from err


# safetensors' Rust writer reports a failed write as SafetensorError("Error while serializing: I/O
# error: No space left on device (os error 28)"): the errno survives only in the message.
_RUST_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def writing_tensors(path: str | os.PathLike) -> Iterator[None]:
    """:func:`writing` for blocks that save with safetensors (directly or through
    ``save_pretrained``), whose failed writes raise its own error type rather than an
    ``OSError``; pair with :func:`save_torch` for ``torch.save``."""
    with writing(path):
        try:
            yield
        except Exception as err:
            from safetensors import SafetensorError

            match = _RUST_OS_ERROR_RE.search(str(err)) if isinstance(err, SafetensorError) else None
            if match is None:
                raise
            code = int(match.group(1))
            raise OSError(code, os.strerror(code)) from err


class _PythonWrites:
    """A binary file seen through ``write`` and ``flush`` alone. Libraries that write a real file
    by its descriptor report a failed write without its errno (torch's zip writer raises
    ``RuntimeError("... unexpected pos ...")``, numpy ``OSError("N requested and M written")``);
    through this they call Python's ``write``, whose ``OSError`` carries it. The error is kept
    for torch, which replaces it."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, except that a failed write (disk full, file too large) raises
    its ``OSError`` rather than torch's ``RuntimeError``, which names neither cause nor file.
    Written as it is serialised: no second copy of ``obj`` in memory."""
    import torch

    with open(path, "wb") as f:
        sink = _PythonWrites(f)
        try:
            torch.save(obj, sink)
        except RuntimeError as err:
            if sink.error is None:
                raise
            raise sink.error from err


def save_npy(path: str | os.PathLike, array) -> None:
    """``np.save`` to ``path`` atomically; a failed write raises :class:`OutputWriteError`
    naming ``path`` (numpy's own file write loses the errno, see :class:`_PythonWrites`)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(_PythonWrites(f), array)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Works for files and folders. On error the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        with writing_tensors(path):  # save_pretrained inside, too
            yield target
        if path.is_dir() and not path.is_symlink():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = tmp / (path.name + ".old")
            os.replace(path, old)
            os.replace(target, path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


class UntrustedPickleError(StmditError, ValueError):
    """A checkpoint holds pickled Python objects; loading it would run code from the file."""


def load_state_dict_file(path: str | os.PathLike, trust_pickle: bool = False):
    """Tensors from ``.safetensors``, or the object in a torch file read with ``weights_only=True``
    (a state dict, or a training checkpoint wrapping one).

    Files that need arbitrary unpickling (whole pickled modules, custom classes) are refused
    unless ``trust_pickle`` is set, because unpickling executes code from the file.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors' own error type derives from Exception only
            raise InputFileError(path, f"not a readable safetensors file ({err})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # A real pickle with objects besides tensors fails on an "Unsupported global"; anything
        # else (an unknown opcode, an invalid load key) means the file is not a torch checkpoint.
        if "Unsupported global" not in str(err):
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
            reason = detail.group(1) if detail else str(err)
            raise InputFileError(path, f"not a readable torch checkpoint ({reason})") from err
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} holds pickled Python objects besides tensors, and loading it runs code from the file. "
                "If you trust where it came from, pass trust_pickle=True (CLI: --trust-pickle), or re-save its "
                "state dict as .safetensors."
            ) from err
    except (RuntimeError, EOFError, ValueError) as err:  # truncated zip archives, empty files
        raise InputFileError(path, f"not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    return torch.load(path, map_location="cpu", weights_only=False)


def differences(old: dict, new: dict, old_label: str = "saved", new_label: str = "now") -> list[str]:
    """``key: old (saved) vs new (now)`` for every key whose value differs, in key order."""
    return [
        f"{k}: {old.get(k)!r} ({old_label}) vs {new.get(k)!r} ({new_label})"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


# atomic_path's temporaries: ".<name>.<random>.tmp".
_TEMPORARY_RE = re.compile(r"^\..+\.[^.]+\.tmp$")
_UNSAFE_CHARACTERS_RE = re.compile(r"[^A-Za-z0-9._-]+")


def remove_stale_temporaries(*folders: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that :func:`atomic_path` left in ``folders`` when a process died
    mid-save (a killed save leaves a hidden ``.<name>.<random>.tmp``); returns what went.

    Call it only where no other process is saving into these folders at the same time."""
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for item in folder.iterdir():
            if _TEMPORARY_RE.match(item.name) and item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
                removed.append(item)
    return removed


def safe_file_name(name: object, fallback: str = "item") -> str:
    """``name`` (a spot, sample, dataset or variant id) as a single portable file name.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``, leading dots
    are dropped (no hidden files, no ``..``), and a name that had to change gets a short hash
    of the original, so that ``a/b`` and ``a_b`` stay two files.
    """
    text = str(name)
    safe = _UNSAFE_CHARACTERS_RE.sub("_", text).lstrip(".")[:120] or fallback
    if safe != text:
        safe = f"{safe}-{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"
    return safe


def path_inside(folder: str | os.PathLike, *names: object, suffix: str = "") -> Path:
    """``folder / safe(name) / ... / safe(last) + suffix``, checked to stay inside ``folder``."""
    folder = Path(folder)
    if not names:
        raise ValueError("path_inside needs at least one name")
    parts = [safe_file_name(n) for n in names]
    parts[-1] += suffix
    path = folder.joinpath(*parts)
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):  # e.g. a symlinked sub-folder pointing elsewhere
        raise UnsafePathError(f"{path} would be written outside the output folder {folder}")
    return path
