"""Pyramidal, tiled OME-TIFF virtual slides, written in bands so a whole section never sits in memory.

A virtual section can be far larger than memory, and the viewers pathologists use (QuPath,
napari through tifffile) open a slide fast only when it is tiled and carries its own
lower-resolution levels. :func:`write_ome_tiff` writes tifffile's documented OME pyramid: level
0 with ``subifds`` announcing the sub-levels, each sub-level as a reduced-resolution SubIFD
(``subfiletype=1``), all tiled, RGB, zlib-compressed (lossless, and needs no imagecodecs), with
the pixel size both in the OME-XML (``PhysicalSizeX/Y`` in µm) and in the TIFF resolution tags
(pixels per cm) for readers that ignore OME.

**Levels.** Level ``k + 1`` is the 2x2 mean of level ``k``, rounded half up to uint8; an odd last
row or column is averaged over the pixels that exist. Levels are added until the longer side is
at most ``min_level_px``; level ``k`` has ``2**k`` times the pixel size of level 0.

**How levels are made without holding one.** tifffile writes one level after another into the
file, so a sub-level cannot be read back from the level written before it. Instead every level
reads the source again, in batches of ``band_rows`` rows (at least ``2**k``) that start on
multiples of ``2**k`` rows, and halves each batch ``k`` times, rounding after each halving.
Because a batch holds whole ``2**k``-row blocks, this gives exactly the level-by-level 2x2 means.
The price is that ``read_band`` covers the image once per level; no temporary files are written.

**Memory.** The peak is about three batches of the full width (``rows x width x 3`` bytes): the
batch read plus what ``read_band`` needs to make it, the half-size sums while halving, and one
row of tiles queued for tifffile's compression threads. With ``band_rows`` a multiple of
``tile`` and of ``2**k`` a batch is ``band_rows`` rows (measured: 2.5 to 3 bands); otherwise
it can grow to ``max(band_rows, 2**k) + tile`` rows. It never grows with the image's height.

The file is written beside ``path`` and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import tifffile

from stmdit.io import atomic_path

ReadBand = Callable[[int, int], np.ndarray]


def level_shapes(height: int, width: int, min_level_px: int) -> list[tuple[int, int]]:
    """``(height, width)`` of level 0 and of each 2x-downsampled level until the longer side is
    at most ``min_level_px``."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_level_px:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 means of an RGB uint8 image, rounded half up.

    An odd last row or column is repeated first: a block holding one real pixel twice over has
    the mean (and rounding) of the pixels that exist, so one formula covers the edges too.
    """
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # Four uint8 values sum to at most 1020: uint16 holds it at a quarter of float64's memory.
    total = image[0::2, 0::2].astype(np.uint16) + image[1::2, 0::2] + image[0::2, 1::2] + image[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def _checked_read(read_band: ReadBand, y0: int, y1: int, width: int) -> np.ndarray:
    band = np.asarray(read_band(y0, y1))
    if band.shape != (y1 - y0, width, 3) or band.dtype != np.uint8:
        raise ValueError(
            f"read_band({y0}, {y1}) returned shape {band.shape} dtype {band.dtype}; "
            f"expected rows [{y0}, {y1}) as shape {(y1 - y0, width, 3)} dtype uint8"
        )
    return band


def _read_rows(read_band: ReadBand, y0: int, y1: int, width: int, band_rows: int) -> np.ndarray:
    """Rows ``[y0, y1)`` of the source, asked for at most ``band_rows`` rows at a time."""
    parts = [_checked_read(read_band, y, min(y + band_rows, y1), width) for y in range(y0, y1, band_rows)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _level_tiles(
    read_band: ReadBand, height: int, width: int, k: int, band_rows: int, tile: int
) -> Iterator[np.ndarray]:
    """Tiles of level ``k`` in row-major order, made from the source in bands."""
    # Batches start on multiples of 2**k source rows, so every halving pairs the same rows as
    # halving the whole image would; only the image's last batch can have an odd row count.
    step = 2**k
    batch = max(step, band_rows - band_rows % step)
    rest = None  # level-k rows made but not yet tiled: less than a row of tiles
    for y0 in range(0, height, batch):
        last = y0 + batch >= height
        band = _read_rows(read_band, y0, min(y0 + batch, height), width, band_rows)
        for _ in range(k):
            band = halve(band)
        if rest is not None:
            band = np.concatenate([rest, band])
        done = len(band) if last else len(band) - len(band) % tile
        for ty in range(0, done, tile):
            for x in range(0, band.shape[1], tile):
                # A copy, so tiles waiting in tifffile's queue do not keep the whole band alive.
                yield band[ty : ty + tile, x : x + tile].copy()
        rest = band[done:].copy() if done < len(band) else None
        del band  # freed before the next batch is read, not after


def write_ome_tiff(
    path: str | os.PathLike,
    read_band: ReadBand,
    height: int,
    width: int,
    um_per_px: float,
    *,
    tile: int = 256,
    band_rows: int = 1024,
    min_level_px: int = 256,
    name: str | None = None,
    uuid: str | None = None,
) -> dict:
    """Write the RGB uint8 image that ``read_band(y0, y1)`` returns rows of as a pyramidal OME-TIFF.

    ``read_band(y0, y1)`` must return rows ``[y0, y1)`` of the full-resolution image as an array
    of shape ``(y1 - y0, width, 3)``, dtype uint8; it is asked for at most ``band_rows`` rows at a
    time, once per level. ``tile`` must be a multiple of 16 (a TIFF rule). ``uuid``: the OME
    file UUID; derive it from what made the image so that a rerun writes the same bytes (default:
    tifffile's, new every time). Returns
    ``{"path", "levels": [[h, w], ...], "um_per_px": [u, 2u, ...], "tile"}``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be at least 1, got {height} x {width}")
    if not (math.isfinite(um_per_px) and um_per_px > 0):
        raise ValueError(f"um_per_px must be a positive finite number, got {um_per_px}")
    if band_rows < 1 or min_level_px < 1:
        raise ValueError(f"band_rows and min_level_px must be at least 1, got {band_rows}, {min_level_px}")
    shapes = level_shapes(height, width, min_level_px)
    sizes = [um_per_px * 2**k for k in range(len(shapes))]
    metadata = {
        "axes": "YXS",
        "PhysicalSizeX": um_per_px,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": um_per_px,
        "PhysicalSizeYUnit": "µm",
    }
    if name is not None:
        metadata["Name"] = name
    if uuid is not None:
        metadata["UUID"] = uuid
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        # BigTIFF always: the compressed size is unknown up front and may pass 4 GB.
        for k, (h, w) in enumerate(shapes):
            level_options = (
                {"subifds": len(shapes) - 1, "metadata": metadata} if k == 0 else {"subfiletype": 1}
            )
            tif.write(
                _level_tiles(read_band, height, width, k, band_rows, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                resolution=(1e4 / sizes[k], 1e4 / sizes[k]),
                resolutionunit="CENTIMETER",
                # tifffile queues tiles for its compression threads up to this many bytes (512 MB
                # by default); one row of tiles keeps the queue within the memory bound.
                buffersize=tile * w * 3,
                **level_options,
            )
    return {
        "path": str(path),
        "levels": [[h, w] for h, w in shapes],
        "um_per_px": sizes,
        "tile": tile,
    }
