"""Training data from a config's ``data`` section.

``source: synthetic`` simulates tissue with the embedded simulator (the demo's default);
its keys are those of :func:`prepare_synthetic`, encoder specs included.
``source: store`` reads a prepared dataset (``path``; ``access``, how batches are read, see
:mod:`stmdit.data.loading`; ``split`` default train, ``val_split``
default val), with cached features where ``stmdit encode`` wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata
import numpy as np
import torch

from stmdit.data.features import FeatureDataset
from stmdit.data.synthetic import SimulatedTissue, simulate_tissue
from stmdit.encoders.expression import align_to_panel
from stmdit.encoders.vae import encode_images
from stmdit.tiles import to_tensor


@dataclass
class TrainingData:
    """What a training run needs: features, and the frozen components that made them."""

    train: FeatureDataset
    val: FeatureDataset | None = None
    ge_encoder: object | None = None
    morphology_encoder: object | None = None
    vae: object | None = None


@dataclass
class SyntheticData(TrainingData):
    tissue: SimulatedTissue | None = None
    train_index: np.ndarray | None = None
    held_out_index: np.ndarray | None = None

    @property
    def adata(self) -> anndata.AnnData:
        return self.tissue.adata

    @property
    def tiles(self) -> torch.Tensor:
        """All tiles as (N, 3, H, W) floats in [0, 1]."""
        return to_tensor(self.tissue.tiles)


def prepare_synthetic(
    n_sections: int = 6,
    grid: int = 24,
    tile_size: int = 32,
    n_genes: int = 128,
    seed: int = 0,
    ge_encoder: str = "panel",
    morphology_encoder: str = "stain",
    vae: str | None = "none",
    ge_tokens: bool = False,
    trust_pickle: bool = False,
) -> SyntheticData:
    """Simulate sections, hold the last one out, build the frozen encoders on the others
    (specs as in :mod:`stmdit.encoders.factory`) and encode every spot. ``ge_tokens`` also
    keeps the per-gene encoder outputs (for ``ge_pooling: pma`` models)."""
    from stmdit.encoders.factory import build_ge_encoder, build_morphology_encoder, build_vae

    if n_sections < 2:
        raise ValueError(f"data.n_sections must be >= 2 (one is held out); got {n_sections}")
    tissue = simulate_tissue(n_sections=n_sections, grid=grid, tile_size=tile_size, seed=seed)
    adata = tissue.adata
    sections = sorted(adata.obs["sample_id"].unique())
    held_out = adata.obs["sample_id"].to_numpy() == sections[-1]
    train_idx, test_idx = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    tiles = to_tensor(tissue.tiles)

    ge = build_ge_encoder(ge_encoder, adata[train_idx], n_genes=n_genes, trust_pickle=trust_pickle)
    morphology = build_morphology_encoder(
        morphology_encoder, tiles[train_idx], tile_size, trust_pickle=trust_pickle
    )
    codec = build_vae(vae)
    counts, library, _ = align_to_panel(adata, ge.genes)
    with torch.no_grad():
        ge_out = ge(torch.from_numpy(counts), torch.from_numpy(library))
        features = FeatureDataset(
            latents=encode_images(codec, tiles),
            morphology=torch.cat([morphology(chunk) for chunk in tiles.split(256)]),
            ge=ge_out["ge"],
            ge_tokens=ge_out["ge_tokens"] if ge_tokens else None,
            ge_mask=ge_out["ge_mask"] if ge_tokens else None,
        )
    return SyntheticData(
        train=features.subset(train_idx),
        val=features.subset(test_idx),
        ge_encoder=ge,
        morphology_encoder=morphology,
        vae=codec,
        tissue=tissue,
        train_index=train_idx,
        held_out_index=test_idx,
    )


def load_training_data(spec: dict, model: dict | None = None) -> TrainingData:
    """Training data for a config's ``data`` section. ``model`` (the config's model section)
    says whether per-gene GE tokens are needed (``ge_pooling: pma``)."""
    spec = dict(spec or {})
    source = spec.pop("source", "synthetic")
    needs_tokens = (model or {}).get("ge_pooling") == "pma"
    if source == "synthetic":
        spec.setdefault("ge_tokens", needs_tokens)
        try:
            return prepare_synthetic(**spec)
        except TypeError as err:
            raise ValueError(f"data (source: synthetic): {err}") from err
    if source == "store":
        from stmdit.data.features import StoreDataset
        from stmdit.data.loading import DEFAULT_ACCESS

        if "path" not in spec:
            raise ValueError("data (source: store) needs path: the prepared dataset folder")
        unknown = set(spec) - {"path", "split", "val_split", "access"}
        if unknown:
            raise ValueError(
                f"data (source: store): unknown keys {sorted(unknown)}; use path, split, val_split, access"
            )
        access = spec.get("access", DEFAULT_ACCESS)
        train = StoreDataset(spec["path"], spec.get("split", "train"), ge_tokens=needs_tokens, access=access)
        val_split = spec.get("val_split", "val")
        val = None
        if len(train.store.rows(val_split)):
            val = StoreDataset(
                spec["path"], val_split, ge_tokens=needs_tokens, encoders=train.encoders, access=access
            )
        enc = train.encoders
        return TrainingData(train, val, enc["ge_encoder"], enc["morphology_encoder"], enc["vae"])
    raise ValueError(f"data.source must be 'synthetic' or 'store'; got {source!r}")
