"""Training examples as precomputed features.

PixCell pre-extracts VAE latents and UNI embeddings once per tile; the trainer then only
reads tensors. :class:`FeatureDataset` holds them in memory, :class:`StoreDataset` reads
them from a prepared store; the batch order comes from each one's ``batch_sampler``
(:mod:`stmdit.data.loading`), which derives every batch from (seed, step) alone so that a
resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from stmdit.data.loading import DEFAULT_ACCESS, BlockBatchSampler, StepBatchSampler, choose_access
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

    def batch_sampler(self, batch_size: int, seed: int, **kw) -> Sampler[list[int]]:
        """Fully random batches (the rows are in memory); ``kw`` as :class:`StepBatchSampler`."""
        return StepBatchSampler(len(self), batch_size, seed, **kw)

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


class StoreDataset(Dataset):
    """Training examples from a prepared dataset (:mod:`stmdit.data.store`).

    Features that ``stmdit encode`` cached are read from their zarr arrays; the others are
    computed on the fly from the tiles and counts with the store's saved encoders, in
    :meth:`encode_batch` on the training device. Pixel-space latents are always made on the
    fly (they are the tile, rescaled). Arrays are opened lazily, so DataLoader workers each
    open their own handles.
    """

    def __init__(
        self,
        root,
        split: str = "train",
        ge_tokens: bool = False,
        encoders: dict | None = None,
        access: str = DEFAULT_ACCESS,
    ):
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
        self._memory = None
        self.access = choose_access(access, self._row_bytes() * len(self.indices))
        if self.access == "memory":  # before any DataLoader worker forks: they share it
            self._memory = {name: np.asarray(a.oindex[self.indices]) for name, a in self._open().items()}
        self._arrays = None  # each DataLoader worker opens its own handles

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> dict:
        """The arrays a batch reads: the cached features wanted, and the tiles when a feature
        is made from them on the fly."""
        if self._arrays is None:
            arrays = {name: self.store.feature(name) for name in self.cached & self.want}
            if self.want - self.cached & {"latents", "morphology"}:
                arrays["tiles"] = self.store.tiles()
            self._arrays = arrays
        return self._arrays

    def _row_bytes(self) -> int:
        return sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in self._open().values())

    def batch_sampler(self, batch_size: int, seed: int, **kw) -> Sampler[list[int]]:
        """The batch order of this dataset's ``access`` (:mod:`stmdit.data.loading`); ``kw`` as
        :class:`StepBatchSampler`."""
        if self.access != "blocks":
            return StepBatchSampler(len(self), batch_size, seed, **kw)
        chunk_rows = int(self.store.manifest()["prepare"]["chunk_rows"])
        return BlockBatchSampler(self.indices // chunk_rows, batch_size, seed, **kw)

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
        if self._memory is not None:
            out = {
                name: torch.from_numpy(a[np.asarray(indices, dtype=np.int64)])
                for name, a in self._memory.items()
            }
        else:  # one sorted request per array: each chunk it touches is decompressed once
            out = {
                name: torch.from_numpy(np.asarray(a.oindex[sorted_rows])[back])
                for name, a in self._open().items()
            }
        missing = self.want - self.cached
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
