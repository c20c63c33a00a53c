"""The spots a predictor trains and predicts on, and their expression targets.

A :class:`SpotSet` is spots (AnnData with raw counts) with one tile each, from a prepared store
or built in memory; :func:`expression_targets` turns raw counts into the log1p CP10k values the
predictor learns and is scored on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np

from stmdit.data.store import DatasetStore
from stmdit.encoders.expression import align_to_panel, log1p_cp10k
from stmdit.evaluate.fidelity import pearson_per_gene
from stmdit.predictor.features import square_images, take_rows


class _RowView:
    """Rows of a (zarr) tile array, read lazily: a store's tiles are too large to load whole."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        rows = self.rows[item]
        return np.asarray(take_rows(self.array, rows if np.ndim(rows) else int(rows)))


@dataclass
class SpotSet:
    """Spots and their tiles, as the predictor trains and predicts on them.

    ``adata``: obs with ``sample_id`` (``patient_id`` for leave-one-patient-out), array or pixel
    coordinates (for the neighbours), and raw counts in ``layers['counts']`` for training
    targets; ``tiles``: (N, S, S, 3) tiles, row i = spot i; ``tile_um``: the tiles' physical
    side; ``spot_diameter_um``: one number or one per spot.
    """

    adata: ad.AnnData
    tiles: object
    tile_um: float
    spot_diameter_um: float | np.ndarray

    def __post_init__(self):
        if len(self.tiles) != self.adata.n_obs:
            raise ValueError(f"{len(self.tiles)} tiles for {self.adata.n_obs} spots; give one tile per spot")

    def __len__(self) -> int:
        return self.adata.n_obs

    @property
    def tile_px(self) -> int:
        """The tiles' side in pixels (a tile shows ``tile_um`` µm over this many pixels)."""
        return int(square_images(take_rows(self.tiles, np.arange(1)), "tiles").shape[-1])

    @classmethod
    def from_store(
        cls, store, split: str | None = "train", samples: Sequence[str] | None = None, only_kept: bool = True
    ) -> SpotSet:
        """The spots of a prepared store (a :class:`~stmdit.data.store.DatasetStore` or its folder):
        those of ``split`` (None: all) and of ``samples`` (None: all), kept spots only by default."""
        store = store if isinstance(store, DatasetStore) else DatasetStore(store)
        manifest = store.manifest()
        if not manifest.get("stages", {}).get("tiles"):
            raise ValueError(f"{store.root}: tiling is not finished; run `stmdit prepare` to the end first")
        rows = store.rows(split, only_kept=only_kept)
        adata = store.spots()
        if samples is not None:
            unknown = sorted(set(map(str, samples)) - set(adata.obs["sample_id"].astype(str)))
            if unknown:
                raise ValueError(
                    f"{store.root}: no samples {unknown}; it has {sorted(adata.obs['sample_id'].astype(str).unique())}"
                )
            rows = rows[
                adata.obs["sample_id"].astype(str).iloc[rows].isin([str(s) for s in samples]).to_numpy()
            ]
        adata = adata[rows].copy()
        info = adata.uns["stmdit"]["samples"]
        diameters = np.array(
            [float(info[s].get("spot_diameter_um", np.nan)) for s in adata.obs["sample_id"].astype(str)]
        )
        bad = sorted(set(adata.obs["sample_id"].astype(str)[~np.isfinite(diameters)]))
        if bad:
            raise ValueError(
                f"{store.root}: samples {bad} have no spot diameter (uns['stmdit']['samples'][...]['spot_diameter_um'])"
            )
        return cls(adata, _RowView(store.tiles(), rows), float(manifest["prepare"]["tile_um"]), diameters)

    def subset(self, rows) -> SpotSet:
        rows = np.asarray(rows, dtype=np.int64)
        d = np.asarray(self.spot_diameter_um)
        return SpotSet(
            self.adata[rows].copy(), _RowView(self.tiles, rows), self.tile_um, d if d.ndim == 0 else d[rows]
        )


def require_counts(adata: ad.AnnData, source: str) -> None:
    """Raise when ``adata`` has no raw counts to train on (an H&E-only dataset)."""
    if "counts" not in adata.layers or adata.n_vars == 0:
        raise ValueError(
            f"{source}: no raw counts (layers['counts']); H&E-only data cannot give expression targets. "
            "Train the predictor on spatial transcriptomics and run it on these tiles instead."
        )


def expression_targets(adata: ad.AnnData, genes: Sequence[str], source: str = "spots") -> np.ndarray:
    """Measured log1p CP10k (N, len(genes)) of ``genes``, the library size taken over all genes.

    Needs raw counts; every gene must be measured (a missing gene is an error, not zeros)."""
    require_counts(adata, source)
    counts, library, alignment = align_to_panel(adata, genes, source=source)
    if alignment.missing:
        raise ValueError(
            f"{source}: {len(alignment.missing)} of the predictor's genes are not measured: {alignment.missing[:10]}"
        )
    return log1p_cp10k(counts, library)


def per_gene_pearson(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r per gene (column) across spots; a gene constant in either is 0 (DeepSpot's NaN -> 0)."""
    return np.nan_to_num(pearson_per_gene(measured, predicted), nan=0.0)
