"""Weights from outside STMDiT: reading a checkpoint file into a state dict, and the one report
type every such load returns (PixCell / PixArt warm-starts, CancerFoundation).

A load matches the checkpoint's names to the model's: what was copied (``loaded``, some under
another name: ``renamed``), what the model kept from its own initialisation on purpose
(``initial``, e.g. a new GE pathway on a PixCell backbone) or by default (``missing``), and what
the checkpoint held that found no place (``unexpected``, ``shape_mismatch``, ``ignored`` with
the reason). ``notes`` record values that were inferred rather than read; ``caveats`` say why
the model may not reproduce the checkpoint's own outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stmdit.io import load_state_dict_file

# Where training checkpoints keep the model's state dict (PixArt / PixCell: "state_dict").
_WRAPPER_KEYS = ("state_dict", "model", "module", "ema")


@dataclass
class LoadReport:
    """What loading a checkpoint into a model copied, and what it could not match."""

    source: str
    layout: str | None = None
    config: dict = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    initial: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)

    @property
    def unmatched(self) -> list[str]:
        """Names on either side that found no partner: model tensors left at random and
        checkpoint tensors left out."""
        return self.missing + self.unexpected + list(self.shape_mismatch)

    @property
    def clean(self) -> bool:
        """Every model tensor not meant to stay initial was loaded, nothing was left over and
        nothing is known to make the outputs differ from the checkpoint's."""
        return not (self.unmatched or self.caveats)

    def __str__(self) -> str:
        how = f" ({self.layout} layout)" if self.layout else ""
        head = f"loaded {len(self.loaded)} tensors from {self.source}{how}"
        if self.renamed:
            head += f", {len(self.renamed)} of them renamed"
        lines = [head]
        if self.initial:
            lines.append(f"{len(self.initial)} tensors left at their initial state on purpose")
        if self.missing:
            lines.append(f"missing (random init): {self.missing}")
        if self.unexpected:
            lines.append(f"unexpected checkpoint tensors (not loaded): {self.unexpected}")
        if self.shape_mismatch:
            lines.append(
                "another shape than the model's: "
                + ", ".join(f"{k} {list(a)} vs {list(b)}" for k, (a, b) in self.shape_mismatch.items())
            )
        lines += [f"ignored {k}: {why}" for k, why in self.ignored.items()]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"caveat: {c}" for c in self.caveats]
        return "\n".join(lines)


def read_state_dict(
    path: str | os.PathLike, trust_pickle: bool = False, state_dict_key: str | None = None
) -> dict:
    """The state dict in a weights file: ``.safetensors``, or a torch file read with
    ``weights_only=True`` (pickled modules only with ``trust_pickle``, see
    :func:`stmdit.io.load_state_dict_file`). A whole module gives its ``state_dict()``; a
    training checkpoint is opened at ``state_dict_key``, by default the first of
    ``state_dict``, ``model``, ``module``, ``ema`` that holds one. Values are returned as
    stored, non-tensors included, for the caller to report."""
    path = Path(path)
    obj = load_state_dict_file(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} does not hold a state dict (got {type(obj).__name__})")
    if state_dict_key is not None:
        if state_dict_key not in obj:
            raise ValueError(
                f"{path.name} has no {state_dict_key!r} entry; its top-level keys are {list(obj)[:10]}"
            )
        return obj[state_dict_key]
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key]
    raise ValueError(
        f"no state dict found in {path.name}; its top-level keys are {list(obj)[:10]}: pass state_dict_key="
    )
