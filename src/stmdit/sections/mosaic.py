"""Whole-section virtual H&E: a generated tile for every spot of a section, laid out where the
spots are, beside the real H&E of the same region at the same scale.

Reading a virtual section as a whole shows what tile-level metrics cannot: whether tumour,
stroma and immune regions appear where the expression says they are. The steps:

* **Synthesis.** Every kept spot of one sample gets a tile conditioned on its measured
  expression (and, optionally, on the morphology of its real tile). Its noise comes from
  :func:`stmdit.generate.spot_generator` with the spot's row in the prepared store, so a
  rerun, another batch size or another subset of spots reproduces the same tile. With a cache
  folder every tile is saved as it is made (one ``.npy`` per spot, written atomically) and an
  interrupted run continues with the spots still missing.
* **Assembly.** A canvas covers the kept spots of the sample at ``um_per_px`` microns per
  output pixel (default: the generated tiles' own resolution, ``tile_um / tile_px``, so no
  tile is resampled). Each tile is scaled to its physical size (``tile_um`` of the store) and
  placed at its spot centre, snapped to the nearest output pixel. Where tiles overlap (Visium:
  128 µm tiles on a 100 µm pitch) they are averaged with a raised-cosine window normalised by
  the summed weights, so seams fade instead of cutting. Where no tile lies (legacy ST: 128 µm
  tiles on a 200 µm pitch, and outside the tissue) the canvas stays white, like glass, and the
  coverage mask is False.
* **Reference.** The real H&E of exactly the canvas region is read through
  :meth:`~stmdit.data.images.SlideImage.read_region` in blocks, so a whole-slide image is never
  loaded whole.

Geometry: positions are microns in the sample's full-resolution frame (``x_um = x_px * mpp``).
Canvas pixel ``(row i, col j)`` covers ``[x0 + j u, x0 + (j + 1) u) x [y0 + i u, y0 + (i + 1) u)``
with ``(x0, y0) = origin_um`` and ``u = um_per_px``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from stmdit import defaults
from stmdit.io import atomic_path, safe_file_name, save_npy, write_json
from stmdit.precision import current_default, resolve_precision
from stmdit.tiles import to_tensor, to_uint8

__all__ = [
    "SectionGeometry",
    "SectionResult",
    "assemble_mosaic",
    "blend_window",
    "read_real_region",
    "side_by_side",
    "synthesize_section",
]

# Fraction of a tile's side over which its blending weight rises from ~0 to 1 at each edge.
# A quarter covers the overlap of Visium tiles (28 µm of 128 µm), so neighbours cross-fade
# over their whole shared strip.
FEATHER = 0.25
BACKGROUND = 255  # white, as glass: where no generated tile lies
_READ_BLOCK = 1024  # output pixels per side of one real-image read


# -- geometry and assembly ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SectionGeometry:
    """Where an output canvas lies on the section (see the module docstring for the convention)."""

    um_per_px: float
    origin_um: tuple[float, float]
    width: int
    height: int

    @classmethod
    def covering(cls, centres_um: np.ndarray, tile_um: float, um_per_px: float) -> SectionGeometry:
        """The smallest canvas that holds every tile of side ``tile_um`` centred at ``centres_um`` (N, 2: x, y)."""
        if um_per_px <= 0:
            raise ValueError(f"um_per_px must be > 0; got {um_per_px}")
        centres_um = np.asarray(centres_um, dtype=float)
        lo = centres_um.min(axis=0) - tile_um / 2
        extent = centres_um.max(axis=0) + tile_um / 2 - lo
        # The small tolerance keeps float noise (e.g. 4096.0000001 px) from adding a pixel.
        width, height = (max(1, math.ceil(e / um_per_px - 1e-6)) for e in extent)
        return cls(float(um_per_px), (float(lo[0]), float(lo[1])), width, height)

    def to_canvas(self, points_um: np.ndarray) -> np.ndarray:
        """Microns (N, 2: x, y) -> continuous canvas coordinates (N, 2: col, row); pixel j spans [j, j + 1)."""
        return (np.asarray(points_um, dtype=float) - np.asarray(self.origin_um)) / self.um_per_px

    def to_dict(self) -> dict:
        return {
            "um_per_px": self.um_per_px,
            "origin_um": list(self.origin_um),
            "width": self.width,
            "height": self.height,
        }


def blend_window(n: int, feather: float = FEATHER) -> np.ndarray:
    """Per-pixel blending weights (n,) along one side of a tile: a raised cosine rising over
    ``feather`` of the side at each edge, 1 in the middle. Every weight is > 0, so a pixel
    covered by a single tile shows that tile exactly once the weights are normalised."""
    if not 0 <= feather <= 0.5:
        raise ValueError(f"feather must be in [0, 0.5]; got {feather}")
    p = (np.arange(n) + 0.5) / n
    if feather == 0:
        return np.ones(n)
    ramp = np.clip(np.minimum(p, 1 - p) / feather, 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * ramp)


def assemble_mosaic(
    tiles: np.ndarray,
    centres_um: np.ndarray,
    tile_um: float,
    geometry: SectionGeometry,
    feather: float = FEATHER,
) -> tuple[np.ndarray, np.ndarray]:
    """Place tiles (N, S, S, 3) uint8 of side ``tile_um`` at ``centres_um`` (N, 2: x, y).

    A tile becomes ``round(tile_um / um_per_px)`` output pixels (antialiased Lanczos when that
    differs from S) and is snapped to the nearest pixel (position error at most half a pixel).
    Overlaps are the weighted mean under :func:`blend_window`; uncovered pixels are white.
    Returns the mosaic (H, W, 3) uint8 and the coverage mask (H, W) bool.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.shape[1] != tiles.shape[2]:
        raise ValueError(f"tiles must be (N, S, S, 3); got {tiles.shape}")
    centres = geometry.to_canvas(centres_um)
    if len(centres) != len(tiles):
        raise ValueError(f"{len(tiles)} tiles but {len(centres)} centres")
    n = max(1, round(tile_um / geometry.um_per_px))
    window = blend_window(n, feather)
    weight2d = np.outer(window, window).astype(np.float32)
    total = np.zeros((geometry.height, geometry.width, 3), np.float32)
    weights = np.zeros((geometry.height, geometry.width), np.float32)
    for tile, (cx, cy) in zip(tiles, centres, strict=True):
        if tile.shape[0] != n:
            tile = np.asarray(Image.fromarray(tile).resize((n, n), Image.Resampling.LANCZOS))
        r0, c0 = round(cy - n / 2), round(cx - n / 2)
        # The part of the tile inside the canvas: canvas rows [top, bottom), columns [left, right).
        top, left = max(r0, 0), max(c0, 0)
        bottom, right = min(r0 + n, geometry.height), min(c0 + n, geometry.width)
        if top >= bottom or left >= right:
            continue
        inside = (slice(top - r0, bottom - r0), slice(left - c0, right - c0))
        total[top:bottom, left:right] += weight2d[inside][..., None] * tile[inside]
        weights[top:bottom, left:right] += weight2d[inside]
    coverage = weights > 0
    mosaic = np.full((geometry.height, geometry.width, 3), BACKGROUND, np.uint8)
    mosaic[coverage] = np.clip(np.round(total[coverage] / weights[coverage][:, None]), 0, 255).astype(
        np.uint8
    )
    return mosaic, coverage


def read_real_region(
    image_path: str | os.PathLike, mpp: float, image_scale: float, geometry: SectionGeometry
) -> np.ndarray:
    """The real H&E under the canvas, (H, W, 3) uint8 at the canvas scale.

    ``mpp``: microns per full-resolution pixel; ``image_scale``: image pixels per
    full-resolution pixel (both from the store's sample record). Read in square blocks, each
    resampled from the coarsest pyramid level that suffices; outside the image is white.
    """
    from stmdit.data.images import open_image

    image_per_canvas = geometry.um_per_px / mpp * image_scale
    x0, y0 = (o / mpp * image_scale for o in geometry.origin_um)
    side = _READ_BLOCK * image_per_canvas
    out = np.empty((geometry.height, geometry.width, 3), np.uint8)
    with open_image(image_path) as image:
        for r in range(0, geometry.height, _READ_BLOCK):
            for c in range(0, geometry.width, _READ_BLOCK):
                block = image.read_region(
                    x0 + c * image_per_canvas, y0 + r * image_per_canvas, side, side, out_size=_READ_BLOCK
                )
                h, w = min(_READ_BLOCK, geometry.height - r), min(_READ_BLOCK, geometry.width - c)
                out[r : r + h, c : c + w] = block[:h, :w]
    return out


# -- the side-by-side figure ----------------------------------------------------------------------------


def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, which ships with matplotlib and, unlike Pillow's default font, has the µ of
    the scale bar."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _scale_bar_um(panel_um: float) -> float:
    """A round length (1, 2 or 5 x 10^k µm) of about a fifth of the panel width."""
    target = panel_um / 5
    power = 10 ** math.floor(math.log10(target))
    return max(m * power for m in (1, 2, 5) if m * power <= target)


def _length_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def side_by_side(
    real: np.ndarray, virtual: np.ndarray, um_per_px: float, titles: tuple[str, str], note: str = ""
) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Real and virtual panels next to each other at their own pixels (no resampling, so the
    scale bar is exact), with a title above each, a grey frame marking each panel's extent (the
    white background would otherwise blend into the margin) and a scale bar with ``note`` below.

    Returns the figure (uint8) and each panel's box ``[x0, y0, x1, y1]`` in it.
    """
    if real.shape != virtual.shape:
        raise ValueError(f"real and virtual panels differ in shape: {real.shape} vs {virtual.shape}")
    h, w = real.shape[:2]
    size = int(np.clip(w // 32, 12, 48))
    font = _font(size)
    pad, gap = size, size
    top, bottom = 2 * size, 3 * size
    figure = Image.new("RGB", (2 * pad + 2 * w + gap, top + h + bottom), "white")
    draw = ImageDraw.Draw(figure)
    boxes = {}
    for name, panel, title, x in (
        ("real", real, titles[0], pad),
        ("virtual", virtual, titles[1], pad + w + gap),
    ):
        figure.paste(Image.fromarray(panel), (x, top))
        draw.rectangle((x - 1, top - 1, x + w, top + h), outline=(160, 160, 160))
        draw.text((x + w / 2, top - size / 2), title, fill="black", font=font, anchor="ms")
        boxes[name] = [x, top, x + w, top + h]
    bar_um = _scale_bar_um(w * um_per_px)
    bar_px = max(1, round(bar_um / um_per_px))
    y = top + h + size
    draw.rectangle((pad, y, pad + bar_px - 1, y + max(2, size // 4) - 1), fill="black")
    draw.text(
        (pad + bar_px + size // 2, y + size // 8), _length_label(bar_um), fill="black", font=font, anchor="lm"
    )
    if note:
        draw.text((figure.width - pad, y + size // 8), note, fill=(90, 90, 90), font=font, anchor="rm")
    return np.asarray(figure), boxes


# -- synthesis ----------------------------------------------------------------------------------------


@dataclass
class SectionResult:
    """One virtual section. ``spots``: the kept spots of the sample (their obs plus ``store_row``,
    ``x_um``, ``y_um``), in the order of ``tiles``; ``real_image``: where ``real`` was read from
    (``path``, ``mpp``, ``image_scale``); ``n_generated``: tiles made by this call (the rest came
    from the cache); ``expression``: the spots' rows of the store (counts, obs), for the AnnData
    and SpatialData views of :mod:`stmdit.sections.export`."""

    sample: str
    virtual: np.ndarray
    real: np.ndarray
    coverage: np.ndarray
    geometry: SectionGeometry
    tiles: np.ndarray
    spots: pd.DataFrame
    tile_um: float
    real_image: dict
    settings: dict = field(default_factory=dict)
    n_generated: int = 0
    expression: ad.AnnData | None = None
    # A seamless section's denoised canvas in the model's space (a tensor, or its zarr array
    # when drawn out of core): an edit of the section starts from it instead of drawing it again.
    model_canvas: object = None

    def centres_px(self) -> np.ndarray:
        """Spot centres as continuous canvas coordinates (N, 2: col, row)."""
        return self.geometry.to_canvas(self.spots[["x_um", "y_um"]].to_numpy())

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``<sample>_section.png`` (real | virtual), ``<sample>_virtual.png`` (the virtual
        image at its own pixels), ``<sample>_virtual.ome.tif`` (the same as a pyramidal OME-TIFF
        with its pixel size, for QuPath and napari) and ``<sample>_section.json`` (geometry,
        settings, metrics), each atomically."""
        from stmdit.sections.ometiff import write_ome_tiff

        out = Path(out)
        stem = safe_file_name(self.sample)
        seamless = self.settings.get("mode") == "seamless"
        note = (
            ("white: outside the real tissue" if seamless else "white: no spot tile")
            if not self.coverage.all()
            else ""
        )
        conditions = "expression + morphology" if self.settings["use_morphology"] else "expression"
        figure, boxes = side_by_side(
            self.real,
            self.virtual,
            self.geometry.um_per_px,
            (
                f"real H&E, {self.sample}",
                f"virtual H&E from {conditions}, {self.sample} ({len(self.spots)} spots, seed {self.settings['seed']})",
            ),
            note,
        )
        paths = {
            "side_by_side": out / f"{stem}_section.png",
            "virtual": out / f"{stem}_virtual.png",
            "slide": out / f"{stem}_virtual.ome.tif",
            "geometry": out / f"{stem}_section.json",
        }
        for key, pixels in (("side_by_side", figure), ("virtual", self.virtual)):
            with atomic_path(paths[key]) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
        height, width = self.virtual.shape[:2]
        # The same settings and geometry make the same image: the file's UUID follows from them,
        # so a rerun writes the same bytes.
        made_by = json.dumps(
            [self.sample, self.settings, self.geometry.to_dict()], sort_keys=True, default=str
        )
        write_ome_tiff(paths["slide"], lambda y0, y1: self.virtual[y0:y1], height, width,
                       self.geometry.um_per_px, name=f"{self.sample} virtual",
                       uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"stmdit-section:{made_by}")))  # fmt: skip
        write_json(
            paths["geometry"],
            {
                "sample": self.sample,
                **self.geometry.to_dict(),
                "coordinates": "microns in the sample's full-resolution frame (x_px * mpp); canvas pixel (row i, col j) "
                "covers [x0 + j*um_per_px, x0 + (j+1)*um_per_px) x [y0 + i*um_per_px, y0 + (i+1)*um_per_px)",
                "tile_um": self.tile_um,
                "tile_px": int(self.tiles.shape[1]),
                "n_spots": len(self.spots),
                "coverage_fraction": float(self.coverage.mean()),
                **self._method(),
                "metrics": self.metrics(),
                "real_image": self.real_image,
                "side_by_side_panels": boxes,
                "files": {k: p.name for k, p in paths.items()},
                "settings": self.settings,
            },
        )
        return paths

    def _method(self) -> dict:
        """How the virtual image was made, for the JSON record (from the settings' mode)."""
        if self.settings.get("mode") == "seamless":
            s = self.settings
            return {
                "background": f"white (255) outside the real tissue mask dilated by {s['mask_dilation_px']} px",
                "blending": f"MultiDiffusion: {s['window']} px windows every {s['stride']} px denoised jointly, "
                f"their predictions fused at every step with {s['fusion_weights']} weights",
            }
        return {
            "background": "white (255) where no generated tile lies",
            "blending": f"raised-cosine window over {FEATHER:g} of the tile side at each edge, normalised by the summed weights",
        }

    def real_tissue(self) -> np.ndarray:
        """The real tissue the virtual section is measured against: the real H&E's tissue mask
        within :data:`~stmdit.sections.metrics.SPOT_REACH` pitches of a spot
        (:func:`~stmdit.sections.metrics.near_spots`)."""
        from stmdit.data.images import tissue_mask
        from stmdit.sections.metrics import SPOT_REACH, near_spots, pitch_um

        mask = tissue_mask(self.real)
        xy = self.spots[["x_um", "y_um"]].to_numpy()
        if len(xy) < 2:  # no pitch: the mask alone
            return mask
        return mask & near_spots(self.geometry, xy, SPOT_REACH * pitch_um(xy))

    def metrics(self) -> dict:
        """Seam scores (:func:`~stmdit.sections.metrics.seam_score`) of the virtual and of the real
        image, and the fraction of the real tissue (:meth:`real_tissue`) that virtual tissue covers."""
        from stmdit.sections.metrics import seam_score, tissue_coverage

        def finite(value):
            return None if value is None or not np.isfinite(value) else float(value)

        tile = int(self.tiles.shape[1])
        seams = {
            k: seam_score(image, tile=tile) for k, image in (("virtual", self.virtual), ("real", self.real))
        }
        return {
            **{f"seam_score_{k}": finite(v["score"]) for k, v in seams.items()},
            **{f"seam_period_{k}": v["period"] for k, v in seams.items()},
            "tissue_coverage": finite(tissue_coverage(self.virtual, self.real_tissue())),
        }


def as_store(dataset):
    from stmdit.data.store import DatasetStore

    return dataset if isinstance(dataset, DatasetStore) else DatasetStore(dataset)


def pipeline_fingerprint(pipe, use_morphology: bool) -> str:
    """sha256 over the weights and configurations of what shapes the tiles, so a cache made
    by other weights is never mistaken for this pipeline's."""
    digest = hashlib.sha256()
    modules = {"transformer": pipe.transformer, "ge_encoder": pipe.ge_encoder, "vae": pipe.vae}
    if use_morphology:
        modules["morphology_encoder"] = pipe.morphology_encoder
    for name, module in modules.items():
        if module is None:
            continue
        digest.update(name.encode())
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def sampling_settings(pipe, store, sample, seed, guidance_ge, guidance_morph, steps, use_morphology) -> dict:
    """The settings both section modes record: what was sampled, how, and by which weights."""
    return {
        "sample": sample,
        "dataset": str(store.root.resolve()),
        "seed": int(seed),
        "guidance_ge": float(guidance_ge),
        "guidance_morph": float(guidance_morph),
        "steps": int(steps),
        "use_morphology": bool(use_morphology),
        # What the transformer ran in (the CLI's --precision auto is bf16 on CPUs with bf16 units).
        "precision": resolve_precision(current_default(), next(pipe.transformer.parameters()).device),
        "pipeline_sha256": pipeline_fingerprint(pipe, use_morphology),
    }


def check_inputs(pipe, store, sample: str, use_morphology: bool):
    """Every reason the run would fail, checked before any tile is generated. Returns the
    store's spots (AnnData), the rows of the sample's kept spots, its record and the manifest."""
    if getattr(pipe, "ge_encoder", None) is None:
        raise ValueError(
            "a virtual section is conditioned on measured expression: the pipeline needs a ge_encoder"
        )
    if not pipe.transformer.has_ge:
        raise ValueError(
            "this pipeline's transformer was trained without gene expression (ge_injection='none')"
        )
    if use_morphology and pipe.morphology_encoder is None:
        raise ValueError("use_morphology needs a pipeline with a morphology_encoder")
    manifest = store.manifest()
    if not manifest.get("stages", {}).get("tiles"):
        raise ValueError(f"{store.root}: tiling is not finished; run `stmdit prepare` to the end first")
    adata = store.spots()
    sample_ids = adata.obs["sample_id"].astype(str).to_numpy()
    if sample not in set(sample_ids):
        raise ValueError(f"{store.root}: no sample {sample!r}; it has {sorted(set(sample_ids))}")
    rows = np.flatnonzero((sample_ids == sample) & adata.obs["keep"].to_numpy(dtype=bool))
    if len(rows) == 0:
        raise ValueError(f"{store.root}: sample {sample!r} has no kept spots (all background)")
    meta = adata.uns["stmdit"]["samples"][sample]
    if not meta.get("image_path"):
        raise ValueError(
            f"sample {sample!r} has no H&E image (uns['stmdit']['samples'][{sample!r}]['image_path']); "
            "the real side of the section needs one"
        )
    if not Path(meta["image_path"]).is_file():
        raise FileNotFoundError(f"sample {sample!r}: its H&E image {meta['image_path']} does not exist")
    if not meta.get("mpp") or not np.isfinite(meta["mpp"]):
        raise ValueError(f"sample {sample!r}: unknown microns per pixel (mpp)")
    return adata, rows, meta, manifest


def spot_table(adata, rows, meta) -> tuple[pd.DataFrame, dict]:
    """The kept spots' obs with ``store_row``, ``x_um`` and ``y_um``, and the real image's record
    (``path``, ``mpp``, ``image_scale``) of the sample record ``meta``."""
    mpp, scale = float(meta["mpp"]), float(meta.get("image_scale", 1.0))
    obs = adata.obs.iloc[rows].copy()
    obs["store_row"] = rows
    obs["x_um"] = obs["x_px"].to_numpy(float) * mpp
    obs["y_um"] = obs["y_px"].to_numpy(float) * mpp
    return obs, {"path": str(meta["image_path"]), "mpp": mpp, "image_scale": scale}


def _generate(pipe, adata, rows, store, settings, batch_size, cache, progress) -> tuple[np.ndarray, int]:
    """Tiles for store ``rows``, from the cache where present; returns (tiles, number generated)."""
    from stmdit.generate import spot_generator

    tiles: dict[int, np.ndarray] = {}
    if cache is not None:
        tiles = {int(r): np.load(cache / f"{r}.npy") for r in rows if (cache / f"{r}.npy").exists()}
    pending = [int(r) for r in rows if int(r) not in tiles]
    real_tiles = store.tiles() if settings["use_morphology"] else None
    bar = tqdm(
        total=len(rows),
        initial=len(rows) - len(pending),
        desc=f"section {settings['sample']}",
        unit="spot",
        disable=not progress,
    )
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        kwargs = {"expression": adata[batch]}
        if real_tiles is not None:
            kwargs["morphology"] = to_tensor(np.asarray(real_tiles.oindex[batch]))
        images = pipe(
            **kwargs,
            guidance_ge=settings["guidance_ge"],
            guidance_morph=settings["guidance_morph"],
            num_inference_steps=settings["steps"],
            generator=[spot_generator(settings["seed"], r) for r in batch],
            output_type="np",
            progress=False,
        ).images
        for r, image in zip(batch, to_uint8(images), strict=True):
            tiles[r] = image
            if cache is not None:
                save_npy(cache / f"{r}.npy", image)
        bar.update(len(batch))
    bar.close()
    return np.stack([tiles[int(r)] for r in rows]), len(pending)


def synthesize_section(
    pipe,
    dataset,
    sample: str,
    seed: int = 0,
    guidance_ge: float = defaults.GUIDANCE_GE,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    steps: int = defaults.STEPS,
    use_morphology: bool = False,
    um_per_px: float | None = None,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> SectionResult:
    """Generate a tile for every kept spot of ``sample`` and assemble the virtual section.

    Args:
        pipe: an :class:`~stmdit.STMDiTPipeline` with a GE encoder (on any device).
        dataset: a prepared store (:class:`~stmdit.data.store.DatasetStore` or its folder).
        sample: the ``sample_id`` to synthesise.
        seed: noise seed; a spot's noise is ``spot_generator(seed, store row)``.
        guidance_ge, guidance_morph, steps: sampling settings (``guidance_morph`` acts only with
            ``use_morphology``).
        use_morphology: also condition on each spot's real tile (a reconstruction rather than a
            purely expression-driven section).
        um_per_px: output resolution; default ``tile_um / generated tile px``.
        batch_size: spots per forward pass; does not change the tiles.
        cache_dir: folder for the per-spot tile cache (reused by reruns with the same pipeline
            weights, store and settings); None: no cache.

    The canvas is assembled in memory (float32 sums, 16 bytes per output pixel): a 6.5 mm
    Visium section at 0.5 µm per pixel is about 13,000 px square, 2.7 GB; a coarser
    ``um_per_px`` gives an overview for a fraction of that.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    store = as_store(dataset)
    sample = str(sample)
    adata, rows, meta, manifest = check_inputs(pipe, store, sample, use_morphology)
    tile_um = float(manifest["prepare"]["tile_um"])
    settings = sampling_settings(
        pipe, store, sample, seed, guidance_ge, guidance_morph, steps, use_morphology
    )
    cache = None
    if cache_dir is not None:
        # The store's preparation fixes what each row is; its parameters and time identify it.
        made_by = {
            **settings,
            "store": {"prepare": manifest["prepare"], "spots": manifest["stages"]["spots"]},
        }
        key = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"{safe_file_name(sample)}_seed{seed}_{key}"
        cache.mkdir(parents=True, exist_ok=True)
        write_json(cache / "made_by.json", made_by)
    settings["mode"] = "spots"  # after the cache key, so caches made before modes existed stay valid
    tiles, n_generated = _generate(pipe, adata, rows, store, settings, batch_size, cache, progress)

    obs, real_image = spot_table(adata, rows, meta)
    centres = obs[["x_um", "y_um"]].to_numpy()
    um_per_px = float(um_per_px) if um_per_px is not None else tile_um / tiles.shape[1]
    geometry = SectionGeometry.covering(centres, tile_um, um_per_px)
    virtual, coverage = assemble_mosaic(tiles, centres, tile_um, geometry)
    real = read_real_region(real_image["path"], real_image["mpp"], real_image["image_scale"], geometry)
    return SectionResult(
        sample,
        virtual,
        real,
        coverage,
        geometry,
        tiles,
        obs,
        tile_um,
        real_image,
        settings,
        n_generated,
        adata[rows].copy(),
    )
