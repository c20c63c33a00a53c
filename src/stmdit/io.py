"""Crash-safe output: everything is written to a temporary sibling and renamed into place,
so a reader sees either the old complete file (or folder) or the new complete one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Works for files and folders. On error the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
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


class UntrustedPickleError(ValueError):
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

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} holds pickled Python objects besides tensors, and loading it runs code from the file. "
                "If you trust where it came from, pass trust_pickle=True (CLI: --trust-pickle), or re-save its "
                "state dict as .safetensors."
            ) from err
    return torch.load(path, map_location="cpu", weights_only=False)


def differences(old: dict, new: dict, old_label: str = "saved", new_label: str = "now") -> list[str]:
    """``key: old (saved) vs new (now)`` for every key whose value differs, in key order."""
    return [f"{k}: {old.get(k)!r} ({old_label}) vs {new.get(k)!r} ({new_label})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]  # fmt: skip


def dataclass_from_yaml(cls, path: str | os.PathLike, what: str, **overrides):
    """Build a config dataclass from a YAML mapping; unknown keys are an error naming them."""
    import dataclasses

    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} must be a mapping of keys to values")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {what} keys {unknown}; known keys are {sorted(known)}")
    return cls(**data)
