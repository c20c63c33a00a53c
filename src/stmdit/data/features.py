"""Training examples as precomputed features.

PixCell pre-extracts VAE latents and UNI embeddings once per tile; the trainer then only
reads tensors. :class:`FeatureDataset` holds them in memory; the batch order comes from
:class:`StepBatchSampler`, which derives every batch from (seed, step) alone so that a
resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from stmdit.diffusion import Condition

FEATURE_KEYS = ("latents", "morphology", "ge", "ge_tokens", "ge_mask")


class FeatureDataset(Dataset):
    """Per-spot latents with their conditioning features (any of which may be absent)."""

    def __init__(
        self,
        latents: torch.Tensor,
        morphology: torch.Tensor | None = None,
        ge: torch.Tensor | None = None,
        ge_tokens: torch.Tensor | None = None,
        ge_mask: torch.Tensor | None = None,
    ):
        if latents.ndim != 4 or latents.shape[2] != latents.shape[3]:
            raise ValueError(f"latents must be (N, C, S, S); got {tuple(latents.shape)}")
        self.tensors = {"latents": latents}
        for name, t in (("morphology", morphology), ("ge", ge), ("ge_tokens", ge_tokens), ("ge_mask", ge_mask)):
            if t is None:
                continue
            if t.shape[0] != latents.shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} rows but latents have {latents.shape[0]}")
            self.tensors[name] = t
        if "ge_mask" in self.tensors and "ge_tokens" not in self.tensors:
            raise ValueError("ge_mask given without ge_tokens")

    def __len__(self) -> int:
        return self.tensors["latents"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}

    def model_kwargs(self) -> dict[str, int]:
        """The STMDiT config entries fixed by this data (channels, size, feature widths)."""
        lat = self.tensors["latents"]
        kw = {"in_channels": lat.shape[1], "sample_size": lat.shape[2]}
        if "morphology" in self.tensors:
            m = self.tensors["morphology"]
            kw["morph_dim"] = m.shape[-1]
            kw["morph_tokens"] = 1 if m.ndim == 2 else m.shape[1]
        if "ge" in self.tensors:
            kw["ge_dim"] = self.tensors["ge"].shape[1]
        if "ge_tokens" in self.tensors:
            kw["ge_token_dim"] = self.tensors["ge_tokens"].shape[2]
        return kw

    def subset(self, indices) -> FeatureDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return FeatureDataset(**{k: v[idx] for k, v in self.tensors.items()})


def batch_condition(batch: dict[str, torch.Tensor], use_ge: bool = True) -> Condition:
    """The conditioning part of a batch; GE is left out for models without a GE pathway."""
    cond = Condition(
        morphology=batch.get("morphology"),
        ge=batch.get("ge"),
        ge_tokens=batch.get("ge_tokens"),
        ge_mask=batch.get("ge_mask"),
    )
    return cond if use_ge else cond.without_ge()


class StepBatchSampler(Sampler[list[int]]):
    """Global batch indices for steps ``start_step .. max_steps - 1``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; step ``s`` takes positions
    ``s * batch_size .. (s + 1) * batch_size`` of the concatenated epochs. With several
    processes, process ``p`` of ``P`` takes every ``P``-th index of the global batch.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        max_steps: int = 1,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        if dataset_size < 1:
            raise ValueError("the training set is empty")
        if batch_size % num_processes:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({num_processes})")
        self.n, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.process_index, self.num_processes = process_index, num_processes

    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def global_batch(self, step: int) -> np.ndarray:
        start = step * self.batch_size
        first_epoch, offset = divmod(start, self.n)
        chunks, need, epoch = [], self.batch_size, first_epoch
        while need > 0:
            perm = self._epoch(epoch)[offset:]
            chunks.append(perm[:need])
            need -= len(chunks[-1])
            epoch, offset = epoch + 1, 0
        return np.concatenate(chunks)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            yield self.global_batch(step)[self.process_index :: self.num_processes].tolist()

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)
