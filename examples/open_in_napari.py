"""Open a virtual slide (``<sample>_virtual.ome.tif`` or ``<sample>_edit.ome.tif``) in napari
as a multiscale image at its physical pixel size, beside the real H&E if given.

    pip install "napari[pyqt5]"   # napari is not a dependency of stmdit
    python examples/open_in_napari.py outputs/section/C4_virtual.ome.tif [--headless]

napari's built-in reader opens the file too (``napari C4_virtual.ome.tif``), but as one RGB
image at full resolution, without its pyramid or its pixel size. This script reads every level
of the OME pyramid lazily through tifffile's zarr view and adds them as one multiscale layer
scaled in µm, so zooming out reads the small levels only. ``--headless`` builds napari's
viewer model without a window (for machines without a display or OpenGL) and prints what it
holds.
"""

from __future__ import annotations

import argparse
import re

import tifffile
import zarr


def pyramid(path: str) -> tuple[list, float]:
    """The levels of an OME-TIFF as lazy arrays (largest first) and its µm per pixel."""
    with tifffile.TiffFile(path) as tif:
        ome = tif.ome_metadata or ""
    found = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
    if found is None:
        raise SystemExit(f"{path}: no PhysicalSizeX in its OME metadata; is it an STMDiT virtual slide?")
    group = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    levels = [group[str(k)] for k in range(len(group))] if isinstance(group, zarr.Group) else [group]
    return levels, float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide")
    parser.add_argument("--headless", action="store_true", help="no window: print the layer napari holds")
    args = parser.parse_args()
    levels, um_per_px = pyramid(args.slide)
    if args.headless:
        from napari.components import ViewerModel

        viewer = ViewerModel()
    else:
        import napari

        viewer = napari.Viewer()
    layer = viewer.add_image(levels, multiscale=len(levels) > 1, rgb=True, scale=(um_per_px, um_per_px),
                             units=("um", "um"), name=args.slide.rsplit("/", 1)[-1])  # fmt: skip
    if args.headless:
        shapes = [tuple(level.shape) for level in layer.data]
        print(f"{layer.name}: {len(shapes)} levels {shapes}, {um_per_px} µm per pixel, rgb {layer.rgb}")
    else:
        import napari

        napari.run()


if __name__ == "__main__":
    main()
