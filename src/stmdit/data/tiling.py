"""Square tiles of a physical size around spot centres, read region by region.

A tile of ``tile_um`` microns is cut around each spot centre in the sample's image (through the
reader convention's ``image_scale`` and ``mpp``), resized to ``tile_px``, and its tissue fraction
measured against one threshold per slide. Tiles crossing the image edge are padded with white
and flagged. Only the needed region of a large slide is ever read.

Crops of one chunk are cut and resized on a small thread pool (Pillow releases the GIL while it
resamples, so two cores work on independent tiles at once); their tissue masks are then
computed a share of the chunk per thread, many small tiles per call.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import anndata as ad
import numpy as np

if TYPE_CHECKING:
    from stmdit.data.images import SlideImage

# Threads cutting tiles: the cores this process may use, at most 4 (the gain flattens there,
# as every thread reads from the same decoded image in memory).
TILING_THREADS = max(
    1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
)


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


# Tissue fractions are measured on tiles reduced to at most this many pixels a side: enough
# to see glass against tissue, and cheap.
TISSUE_PX = 64


def _shrink(tile: np.ndarray, side: int) -> np.ndarray:
    """Box-downsample a tile for tissue detection, which needs no more than ``side`` px."""
    if tile.shape[0] <= side:
        return tile
    from PIL import Image

    return np.asarray(Image.fromarray(tile).resize((side, side), Image.Resampling.BOX))


class Slide(NamedTuple):
    image: SlideImage
    threshold: float


def _loaded(path: str | os.PathLike) -> SlideImage:
    """The image with its pixels loaded (a JPEG/PNG is decoded on its first read)."""
    from stmdit.data.images import open_image

    image = open_image(path)
    image.read_region(0, 0, 1, 1)
    return image


def open_slide(path: str | os.PathLike) -> Slide:
    """A slide with its pixels loaded and its tissue threshold: the floor of tiling's cost,
    which prepare starts while it parses the counts."""
    image = _loaded(path)
    return Slide(image, slide_threshold(image))


def slide_threshold(image) -> float:
    """One tissue threshold per slide, from its thumbnail, so tiles of a section are judged alike."""
    from stmdit.data.images import tissue_threshold

    return tissue_threshold(image.thumbnail(1024)[0])


def slide_key(path: str | os.PathLike) -> str:
    return str(Path(path).resolve())


class SpotTiler:
    """Reads the tiles of an AnnData's spots (reader convention), opening each slide once.

    ``opened`` may hold slides already opened (or being opened) by :func:`open_slide`,
    keyed by :func:`slide_key` (the tiler takes the dict over and empties it as it uses them):
    prepare starts decoding an image and measuring its tissue threshold while it parses the
    counts. On in-memory images, tiles are cut and measured on a thread pool, which also opens
    the next sample's slide while this one's tiles are cut. A slide is released once its
    sample's last row has been read (rows are read in order; a row of a released slide opens
    it again), so memory holds at most two decoded images.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        tile_um: float,
        tile_px: int,
        boxes: np.ndarray | None = None,
        opened: dict[str, Future] | None = None,
    ):
        self.tile_px = tile_px
        self.samples = adata.uns["stmdit"]["samples"]
        self.sample_ids = adata.obs["sample_id"].astype(str).to_numpy()
        self.boxes = tile_boxes(adata, tile_um)[0] if boxes is None else np.asarray(boxes)
        self._opened = opened if opened is not None else {}
        self._images: dict[str, tuple] = {}
        # The samples whose slides this tiler opened, in order: what prepare's processes report,
        # each of which must open only its own slides.
        self.opened_samples: list[str] = []
        self._pool = ThreadPoolExecutor(TILING_THREADS) if TILING_THREADS > 1 else None
        self._last_row = {sid: row for row, sid in enumerate(self.sample_ids)}
        self._next = dict(itertools.pairwise(self._last_row))  # sample -> the one after it

    def _image(self, sid: str):
        """(image, Future of its tissue threshold); unless the slide was opened beforehand, the
        threshold is computed on the pool while the first tiles are cut, which needs none."""
        if sid not in self._images:
            path = self.samples[sid]["image_path"]
            pending = self._opened.pop(slide_key(path), None)
            threshold = Future()
            if pending is not None:
                image, value = pending.result()
                threshold.set_result(value)
            else:
                image = _loaded(path)
                if self._pool is not None and image.concurrent_reads:
                    threshold = self._pool.submit(slide_threshold, image)
                else:
                    threshold.set_result(slide_threshold(image))
            self._images[sid] = (image, threshold)
            self.opened_samples.append(sid)
            following = self._next.get(sid)
            if self._pool is not None and following is not None and following not in self._images:
                path = self.samples[following]["image_path"]
                if slide_key(path) not in self._opened:
                    self._opened[slide_key(path)] = self._pool.submit(open_slide, path)
        return self._images[sid]

    def _cut(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Spot ``i``'s tile, and the tile reduced for tissue detection."""
        image, _ = self._images[self.sample_ids[i]]
        x0, y0, side = self.boxes[i]
        tile = image.read_region(x0, y0, side, side, out_size=self.tile_px)
        return tile, _shrink(tile, TISSUE_PX)

    def read(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(tiles (n, px, px, 3) uint8, tissue fractions (n,) float32) for spot rows."""
        from stmdit.data.images import tissue_fractions

        rows = np.asarray(rows, dtype=np.int64)
        for sid in dict.fromkeys(self.sample_ids[rows]):  # open (decode) slides before fanning out
            self._image(sid)
        parallel = self._pool is not None and all(
            image.concurrent_reads for image, _ in self._images.values()
        )
        run = self._pool.map if parallel else map
        tiles = np.empty((len(rows), self.tile_px, self.tile_px, 3), np.uint8)
        small = np.empty((len(rows), min(self.tile_px, TISSUE_PX), min(self.tile_px, TISSUE_PX), 3), np.uint8)
        for j, (tile, reduced) in enumerate(run(self._cut, rows)):
            tiles[j], small[j] = tile, reduced
        # Tissue masks of many small tiles at once (per-call overheads would outweigh the
        # pixels), a share of the chunk per thread, each slide's tiles against its threshold.
        sids = self.sample_ids[rows]
        parts = [
            (where, self._images[sid][1].result())
            for sid in dict.fromkeys(sids)
            for where in np.array_split(np.flatnonzero(sids == sid), TILING_THREADS)
            if len(where)
        ]
        measured = run(lambda part: tissue_fractions(small[part[0]], part[1]), parts)
        fractions = np.empty(len(rows), np.float32)
        for (where, _), values in zip(parts, measured, strict=True):
            fractions[where] = values
        for sid in [sid for sid in self._images if self._last_row[sid] <= rows.max(initial=-1)]:
            self._images.pop(sid)[0].close()
        return tiles, fractions

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for pending in self._opened.values():
            if pending.exception() is None:  # a slide that failed to open was never used
                pending.result().image.close()
        self._opened.clear()
        for image, _ in self._images.values():
            image.close()
        self._images.clear()
