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
from stmdit.tiles import to_tensor

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
        for name, t in (
            ("morphology", morphology),
            ("ge", ge),
            ("ge_tokens", ge_tokens),
            ("ge_mask", ge_mask),
        ):
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

    __getitems__ = batch

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
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the number of processes ({num_processes})"
            )
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


class StoreDataset(Dataset):
    """Training examples from a prepared dataset (:mod:`stmdit.data.store`).

    Features that ``stmdit encode`` cached are read from their zarr arrays; the others are
    computed on the fly from the tiles and counts with the store's saved encoders, in
    :meth:`encode_batch` on the training device. Pixel-space latents are always made on the
    fly (they are the tile, rescaled). Arrays are opened lazily, so DataLoader workers each
    open their own handles.
    """

    def __init__(self, root, split: str = "train", ge_tokens: bool = False, encoders: dict | None = None):
        from stmdit.data.encode import load_encoders
        from stmdit.data.store import DatasetStore

        self.store = DatasetStore(root)
        self.split = split
        self.indices = self.store.rows(split)
        if len(self.indices) == 0:
            raise ValueError(f"{self.store.root}: split {split!r} has no kept spots")
        self.encoders = encoders if encoders is not None else load_encoders(self.store)
        cached = set(self.store.features())
        self.cached = {
            name for name in ("latents", "morphology", "ge", "ge_tokens", "ge_mask") if name in cached
        }
        self.has_ge = self.encoders.get("ge_encoder") is not None
        self.want = {"latents", "morphology"} | (
            {"ge"} | ({"ge_tokens", "ge_mask"} if ge_tokens else set()) if self.has_ge else set()
        )
        self._counts = None
        self._arrays = None

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> dict:
        if self._arrays is None:
            arrays = {name: self.store.feature(name) for name in self.cached & self.want}
            arrays["tiles"] = self.store.tiles()
            self._arrays = arrays
        return self._arrays

    def _panel_counts(self) -> tuple[np.ndarray, np.ndarray]:
        if self._counts is None:
            from stmdit.encoders.expression import align_to_panel

            counts, library, _ = align_to_panel(self.store.spots(), self.encoders["ge_encoder"].genes)
            self._counts = (counts, library)
        return self._counts

    def batch(self, indices) -> dict[str, torch.Tensor]:
        rows = self.indices[np.asarray(indices, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        arrays = self._open()
        out = {}
        for name in self.cached & self.want:
            out[name] = torch.from_numpy(np.asarray(arrays[name].oindex[sorted_rows])[back])
        missing = self.want - self.cached
        if missing & {"latents", "morphology"}:
            out["tiles"] = torch.from_numpy(np.asarray(arrays["tiles"].oindex[sorted_rows])[back])
        if missing & {"ge", "ge_tokens", "ge_mask"}:
            counts, library = self._panel_counts()
            out["counts"], out["library"] = torch.from_numpy(counts[rows]), torch.from_numpy(library[rows])
        return out

    __getitems__ = batch

    @torch.no_grad()
    def encode_batch(
        self, batch: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Fill in the features that were not cached, with the frozen encoders on ``device``."""
        from stmdit.encoders.vae import encode_images

        batch = dict(batch)
        tiles = batch.pop("tiles", None)
        counts, library = batch.pop("counts", None), batch.pop("library", None)
        if tiles is not None:
            images = to_tensor(tiles, device)
            if "latents" not in batch:
                vae = self.encoders.get("vae")
                batch["latents"] = encode_images(vae.to(device) if vae is not None else None, images)
            if "morphology" not in batch:
                batch["morphology"] = self.encoders["morphology_encoder"].to(device)(images)
        if counts is not None:
            ge = self.encoders["ge_encoder"].to(device)(counts.to(device), library.to(device))
            for name in ("ge", "ge_tokens", "ge_mask"):
                if name in self.want and name not in batch:
                    batch[name] = ge[name]
        return {k: v.to(device) for k, v in batch.items()}

    def model_kwargs(self) -> dict[str, int]:
        """Channels, sample size and feature widths, read off one encoded example."""
        example = self.encode_batch(self.batch([0]))
        return FeatureDataset(**{k: v for k, v in example.items() if k in FEATURE_KEYS}).model_kwargs()


def collate_batch(batch):
    """DataLoader collate for datasets whose ``__getitems__`` already returns a batch."""
    return batch
