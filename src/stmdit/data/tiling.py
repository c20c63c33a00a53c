"""Square tiles of a physical size around spot centres, read region by region.

A tile of ``tile_um`` microns is cut around each spot centre in the sample's image (through the
reader convention's ``image_scale`` and ``mpp``), resized to ``tile_px``, and its tissue fraction
measured against one threshold per slide. Tiles crossing the image edge are padded with white
and flagged. Only the needed region of a large slide is ever read.
"""

from __future__ import annotations

import anndata as ad
import numpy as np


def tile_boxes(adata: ad.AnnData, tile_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Per spot: the tile's box in its image's pixels (x0, y0, side) and whether it crosses
    the image edge. Readers have already dropped spots whose centre lies outside the image."""
    from stmdit.data.images import open_image

    boxes = np.zeros((adata.n_obs, 3))
    at_edge = np.zeros(adata.n_obs, dtype=bool)
    samples = adata.uns["stmdit"]["samples"]
    for sid, rows in adata.obs.groupby("sample_id", observed=True).indices.items():
        meta = samples[str(sid)]
        if not meta.get("image_path"):
            raise ValueError(
                f"sample {sid}: no image (uns['stmdit']['samples'][{sid!r}]['image_path']); tiles need one"
            )
        if not meta.get("mpp") or not np.isfinite(meta["mpp"]):
            raise ValueError(f"sample {sid}: unknown microns per pixel (mpp); pass mpp= to the reader")
        with open_image(meta["image_path"]) as image:
            scale = float(meta.get("image_scale", 1.0))
            side = tile_um / float(meta["mpp"]) * scale
            x0 = adata.obs["x_px"].to_numpy(float)[rows] * scale - side / 2
            y0 = adata.obs["y_px"].to_numpy(float)[rows] * scale - side / 2
            boxes[rows] = np.stack([x0, y0, np.full_like(x0, side)], axis=1)
            at_edge[rows] = (x0 < 0) | (y0 < 0) | (x0 + side > image.width) | (y0 + side > image.height)
    return boxes, at_edge


def _shrink(tile: np.ndarray, side: int) -> np.ndarray:
    """Box-downsample a tile for tissue detection, which needs no more than ``side`` px."""
    if tile.shape[0] <= side:
        return tile
    from PIL import Image

    return np.asarray(Image.fromarray(tile).resize((side, side), Image.Resampling.BOX))


class SpotTiler:
    """Reads the tiles of an AnnData's spots (reader convention), opening each slide once."""

    def __init__(self, adata: ad.AnnData, tile_um: float, tile_px: int, boxes: np.ndarray | None = None):
        self.tile_px = tile_px
        self.samples = adata.uns["stmdit"]["samples"]
        self.sample_ids = adata.obs["sample_id"].astype(str).to_numpy()
        self.boxes = tile_boxes(adata, tile_um)[0] if boxes is None else np.asarray(boxes)
        self._images: dict[str, tuple] = {}

    def _image(self, sid: str):
        from stmdit.data.images import open_image, tissue_threshold

        if sid not in self._images:
            image = open_image(self.samples[sid]["image_path"])
            # One threshold per slide, so tiles of a section are judged alike.
            self._images[sid] = (image, tissue_threshold(image.thumbnail(1024)[0]))
        return self._images[sid]

    def read(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(tiles (n, px, px, 3) uint8, tissue fractions (n,) float32) for spot rows."""
        from stmdit.data.images import tissue_fraction

        rows = np.asarray(rows, dtype=np.int64)
        tiles = np.empty((len(rows), self.tile_px, self.tile_px, 3), np.uint8)
        fractions = np.empty(len(rows), np.float32)
        for j, i in enumerate(rows):
            image, threshold = self._image(self.sample_ids[i])
            x0, y0, side = self.boxes[i]
            tiles[j] = image.read_region(x0, y0, side, side, out_size=self.tile_px)
            fractions[j] = tissue_fraction(_shrink(tiles[j], 64), threshold)
        return tiles, fractions

    def close(self) -> None:
        for image, _ in self._images.values():
            image.close()
        self._images.clear()
