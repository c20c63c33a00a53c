"""SpatialData objects (e.g. spatialdata-io's Visium and Xenium readers): a table annotating
circles, and an H&E image element, in one coordinate system."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image

from stmdit.data.readers.convention import (
    HIRES_PX,
    SPACERANGER_FULLRES_SPOT_UM,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    ReaderError,
    add_scanpy_spatial,
    assemble,
    check_counts,
    positive,
    reading,
    scanpy_library,
    unique_genes,
)


def _affine(element, coordinate_system: str, source: str) -> np.ndarray:
    """3 x 3 matrix from the element's (x, y) to the coordinate system's."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if coordinate_system not in transforms:
        raise ReaderError(
            f"{source}: not in coordinate system {coordinate_system!r} (it is in {sorted(transforms)})"
        )
    return np.asarray(
        transforms[coordinate_system].to_affine_matrix(("x", "y"), ("x", "y")), dtype=np.float64
    )


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _uniform_scale(matrix: np.ndarray) -> float | None:
    """The scale of a transformation that only scales (equally along x and y), else None."""
    linear = matrix[:2, :2]
    if abs(linear[0, 1]) > 1e-12 or abs(linear[1, 0]) > 1e-12 or not np.isclose(linear[0, 0], linear[1, 1]):
        return None
    return float(linear[0, 0])


def _largest_image(sdata, name: str | None, source: str) -> tuple[str, np.ndarray]:
    """The named image element, or the one with the most pixels, as (name, (H, W, 3) uint8 of its finest level)."""
    names = [name] if name is not None else list(sdata.images)
    if not names:
        raise ReaderError(f"{source}: no image element; an H&E image is needed to place the spots")
    arrays = {}
    for n in names:
        if n not in sdata.images:
            raise ReaderError(f"{source}: no image element {n!r}; it has {sorted(sdata.images)}")
        element = sdata.images[n]
        pixels = (
            element["scale0"]["image"] if hasattr(element, "children") and "scale0" in element else element
        )
        arrays[n] = pixels
    chosen = max(arrays, key=lambda n: int(np.prod(arrays[n].shape[-2:])))
    pixels = np.asarray(arrays[chosen].transpose("y", "x", "c").values)
    if pixels.shape[-1] < 3:
        raise ReaderError(
            f"{source}: image {chosen!r} has {pixels.shape[-1]} channels; expected an RGB H&E image"
        )
    if pixels.dtype != np.uint8:
        top = float(pixels.max()) or 1.0
        pixels = np.clip(pixels.astype(np.float64) * (255.0 / top if top > 255 else 1.0), 0, 255).astype(
            np.uint8
        )
    return chosen, pixels[..., :3]


def read_spatialdata(
    source,
    table: str = "table",
    image: str | None = None,
    coordinate_system: str = "global",
    sample_id: str | None = None,
    patient_id: str | None = None,
    mpp: float | None = None,
) -> ad.AnnData:
    """A SpatialData object or ``.zarr`` store: the table's spots (or cells) at the centres of the
    shapes it annotates, in the pixel frame of an image element.

    ``x_px``/``y_px`` are pixels of ``image`` (default: the image element with the most pixels),
    mapped through both elements' transformations to ``coordinate_system``. Counts come from the
    table's ``layers['counts']`` else ``X``.

    Pixel size: ``mpp`` (microns per pixel of the image), else derived from the layout:

    * shapes that reach the coordinate system through a scale only (spatialdata-io's Xenium:
      cell circles in microns, scaled by 1 / pixel size) are in microns, so the scale gives the
      microns per unit;
    * else circles of one radius are Visium spots whose diameter is Space Ranger's
      ``spot_diameter_fullres`` (a 65 um spot by 10x's definition, as in :func:`read_visium`).

    The spot diameter is Visium's 55 um for equal circles, else the median circle diameter.
    ``uns['spatial']`` shows the image element itself; ``image_path`` is empty, since the image
    lives in the SpatialData store, so ``prepare`` cannot cut tiles from this sample.
    """
    try:
        import spatialdata
    except ImportError as err:
        raise ImportError(
            "read_spatialdata needs the spatialdata extra: pip install 'stmdit[spatialdata]'"
        ) from err
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"SpatialData store not found: {path}")
        with reading(path, "a SpatialData zarr store"):
            sdata = spatialdata.read_zarr(path)
        name = str(path)
    else:
        sdata, path, name = source, None, "the SpatialData object"
    if table not in sdata.tables:
        raise ReaderError(f"{name}: no table {table!r}; it has {sorted(sdata.tables)}")
    adata = sdata.tables[table]
    attrs = adata.uns.get("spatialdata_attrs", {})
    region, region_key, instance_key = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    regions = [region] if isinstance(region, str) else list(region or [])
    shapes_regions = [r for r in regions if r in sdata.shapes]
    if len(shapes_regions) != 1:
        raise ReaderError(
            f"{name}: table {table!r} must annotate exactly one shapes element (circles); it annotates {regions}"
        )
    region = shapes_regions[0]
    rows = np.flatnonzero((adata.obs[region_key].astype(str) == region).to_numpy()) if region_key else None
    adata = adata[rows] if rows is not None else adata
    shapes = sdata.shapes[region]
    if "radius" not in shapes:
        raise ReaderError(f"{name}: shapes {region!r} are not circles (no 'radius' column)")
    where = pd.Index(shapes.index).get_indexer(adata.obs[instance_key].to_numpy())
    if (where < 0).any():
        raise ReaderError(f"{name}: {int((where < 0).sum())} table rows have no circle in {region!r}")
    shapes = shapes.iloc[where]
    centres = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
    radius = shapes["radius"].to_numpy(dtype=np.float64)

    to_cs = _affine(shapes, coordinate_system, f"{name}: shapes {region!r}")
    image_name, pixels = _largest_image(sdata, image, name)
    image_to_cs = _affine(sdata.images[image_name], coordinate_system, f"{name}: image {image_name!r}")
    xy = _apply(np.linalg.inv(image_to_cs), _apply(to_cs, centres))
    units_per_px = float(
        np.sqrt(abs(np.linalg.det(image_to_cs[:2, :2])))
    )  # coordinate-system units per image px

    shape_scale = _uniform_scale(to_cs)
    equal_circles = np.allclose(radius, radius[0])
    if mpp is not None:
        mpp, mpp_source = positive(mpp, "read_spatialdata", "mpp"), "argument"
        spot_um = (
            VISIUM_SPOT_UM if equal_circles else float(np.median(2 * radius) * shape_scale * units_per_px)
        )
    elif shape_scale is not None and not np.isclose(shape_scale, 1.0):
        um_per_unit = 1.0 / shape_scale
        mpp, mpp_source = (
            um_per_unit * units_per_px,
            f"{name}: shapes {region!r} in microns (scale {shape_scale:.6g})",
        )
        spot_um = float(np.median(2 * radius))
    elif equal_circles:
        um_per_unit = SPACERANGER_FULLRES_SPOT_UM / (2 * radius[0] * (shape_scale or 1.0))
        mpp, mpp_source = (
            um_per_unit * units_per_px,
            f"{name}: circle radius as Space Ranger's spot_diameter_fullres",
        )
        spot_um = VISIUM_SPOT_UM
    else:
        raise ReaderError(f"{name}: pixel size unknown (circles of several radii, not in microns); pass mpp=")

    genes = unique_genes(adata.var_names, name, "var_names")
    barcodes = [str(b) for b in adata.obs_names]
    expression = adata.layers["counts"] if "counts" in adata.layers else adata.X
    matrix, is_counts = check_counts(expression, name, f"table {table!r}", barcodes, list(genes))
    obs = pd.DataFrame({"x_px": xy[:, 0], "y_px": xy[:, 1]})
    for col in ("array_row", "array_col", "in_tissue"):
        if col in adata.obs:
            obs[col] = adata.obs[col].to_numpy()
    var = pd.DataFrame({"gene_symbol": [str(g) for g in adata.var_names]}, index=genes)
    sample_id = sample_id or (path.stem if path is not None else region)
    info = {
        "source_format": "spatialdata",
        "image_path": "",
        "image_element": image_name,
        "image_scale": 1.0,
        "mpp": float(mpp),
        "mpp_source": mpp_source,
        "spot_diameter_um": float(spot_um),
        "spot_pitch_um": VISIUM_PITCH_UM if equal_circles else float("nan"),
        "files": {"spatialdata": str(path)} if path is not None else {},
    }
    out = assemble(matrix, is_counts, barcodes, obs, var, sample_id, patient_id, info)
    width = pixels.shape[1]
    if max(pixels.shape[:2]) > HIRES_PX:
        reduce = HIRES_PX / max(pixels.shape[:2])
        size = (max(1, round(pixels.shape[1] * reduce)), max(1, round(pixels.shape[0] * reduce)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
    out.uns["spatial"] = {sample_id: scanpy_library(info, xy, pixels, pixels.shape[1] / width)}
    return add_scanpy_spatial(out)
